"""How far does a row's next-token distribution move when it shares a padded batch, per dtype?

Runs a few prompts through the model one at a time and then together (left-padded, as the local
engine batches them), and prints the largest logit difference of each prompt's last position. This
is why records depend on --concurrency under bfloat16 and not under float32
(benchmarks/check_reproducible.py measures the records themselves).

    python benchmarks/batch_invariance.py                       # the embedded model, float32 and bfloat16
    python benchmarks/batch_invariance.py --model path/to/model --dtypes bfloat16
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ("The patient's coping strategies are avoidance and withdrawal. Which group of principles fits?",
           "Hello",
           "Describe a week in which the patient felt anxious, worried and sad at work and at home, in detail.",
           "What is the most likely diagnosis?")


def main(model: str | None = None, dtypes: str = "float32,bfloat16") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mentalarena.cli import names
    from mentalarena.engines.embedded import EMBEDDED_GGUF, embedded_model_dir
    from mentalarena.training.trainers import _dense_copy, load_tokenizer

    base, gguf = (embedded_model_dir(), EMBEDDED_GGUF) if model is None else (model, None)
    tokenizer = load_tokenizer(base, gguf)
    tokenizer.padding_side = "left"
    source, gguf = _dense_copy(base, gguf)
    result = {}
    for name in names(dtypes):
        net = AutoModelForCausalLM.from_pretrained(source, torch_dtype=getattr(torch, name),
                                                   **({"gguf_file": gguf} if gguf else {})).eval()
        with torch.no_grad():
            alone = [net(**tokenizer(p, return_tensors="pt")).logits[0, -1].float() for p in PROMPTS]
            together = net(**tokenizer(list(PROMPTS), return_tensors="pt", padding=True)).logits[:, -1].float()
        gaps = [float((a - b).abs().max()) for a, b in zip(alone, together)]
        result[name] = gaps
        print(f"{name:>9}: largest |logit alone - logit in the padded batch| per prompt: "
              + ", ".join(f"{g:.2g}" for g in gaps), flush=True)
    return result


if __name__ == "__main__":
    import fire
    fire.Fire(main)
