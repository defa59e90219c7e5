"""MedQA_eval throughput: one question at a time (as the reference) versus continuous batching.

Same embedded model object, same questions, same prompts and decoding settings (256 new tokens,
temperature 0.1, the reference's local values), both measured in this one run; only the ratio
measured side by side means much on these noisy machines.

- one at a time: what the reference does, a transformers `generate` call per question (and per
  repeat: the paper ran each evaluation 5 times by hand), in the same dtype.
- batched: `MedQA_eval`'s path, `backend.stream` (continuous batching; the repeats of a question
  share one prefill).

    python benchmarks/bench_eval.py                          # 64 questions, 1 run each
    python benchmarks/bench_eval.py --questions 24 --repeats 5   # the paper's protocol
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import MedQA_eval  # noqa: E402
from mentalarena.evaluation import qa  # noqa: E402
from mentalarena.engines.backends import make_backend  # noqa: E402
from mentalarena.prompts import Prompts  # noqa: E402

PAPER_FILE = ROOT.parent / "shared" / "data" / "medqa" / "psychosis.jsonl"


def conversations(data_file: str, n: int) -> list[list[dict]]:
    prompts = Prompts()
    items = qa.load_items("MedQA", data_file=data_file)[:n]
    system = prompts.render("qa_system")
    return [[{"role": "system", "content": system}, {"role": "user", "content": qa.render_prompt(i, prompts)}]
            for i in items]


def one_at_a_time(backend, convs: list[list[dict]], repeats: int, seed: int) -> dict:
    model = backend.model
    generated = prompt_tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for r in range(repeats):
            for c in convs:
                torch.manual_seed(seed + r)
                ids = torch.tensor([backend.encode(c)])
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=backend.temperature, max_new_tokens=backend.max_new_tokens,
                                     pad_token_id=backend.pad_id)
                generated += out.shape[1] - ids.shape[1]
                prompt_tokens += ids.shape[1]
    return _rate("one at a time (reference)", len(convs) * repeats, time.perf_counter() - start,
                 generated, prompt_tokens)


def batched(backend, convs: list[list[dict]], repeats: int, seed: int) -> dict:
    todo = [(c, r) for c in convs for r in range(repeats)]
    seeds = [MedQA_eval.request_seed(seed, str(i), r) for i, (_, r) in enumerate(todo)]
    prefilled = backend.prefilled_tokens
    start = time.perf_counter()
    replies = dict(backend.stream([c for c, _ in todo], seeds=seeds))
    wall = time.perf_counter() - start
    return _rate("continuous batching", len(todo), wall, sum(r.completion_tokens for r in replies.values()),
                 backend.prefilled_tokens - prefilled)


def _rate(label: str, answers: int, wall: float, generated: int, prefilled: int) -> dict:
    return {"label": label, "answers": answers, "wall_s": round(wall, 1), "answers_per_s": round(answers / wall, 3),
            "generated_tokens": generated, "prefilled_tokens": prefilled}


def main(questions: int = 64, repeats: int = 1, batch_size: int = 64, data_file: str | None = None,
         dtype: str = "auto", max_new_tokens: int = 256, temperature: float = 0.1, seed: int = 0):
    data_file = data_file or (str(PAPER_FILE) if PAPER_FILE.exists() else str(ROOT / "data/qa_sample/medqa.jsonl"))
    convs = conversations(data_file, questions)
    dtype = MedQA_eval.auto_dtype(dtype, None)
    backend = make_backend(None, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                           max_batch_size=batch_size, dtype=dtype, prefix_cache_gb=0)
    settings = {"data_file": data_file, "questions": len(convs), "repeats": repeats, "batch_size": batch_size,
                "dtype": dtype, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "threads": torch.get_num_threads()}
    print("[bench] settings " + json.dumps(settings), flush=True)
    dict(backend.stream(convs[:1]))  # warm-up
    fast = batched(backend, convs, repeats, seed)
    print("[bench] " + json.dumps(fast), flush=True)
    slow = one_at_a_time(backend, convs, repeats, seed)
    print("[bench] " + json.dumps(slow), flush=True)
    ratio = fast["answers_per_s"] / slow["answers_per_s"]
    print(f"\none at a time (reference) : {slow['answers_per_s']:7.3f} answers/s ({slow['answers']} answers, "
          f"{slow['wall_s']} s, {slow['generated_tokens']} tokens generated)")
    print(f"continuous batching       : {fast['answers_per_s']:7.3f} answers/s ({fast['answers']} answers, "
          f"{fast['wall_s']} s, {fast['generated_tokens']} tokens generated)")
    print(f"speed-up                  : {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    import fire
    fire.Fire(main, serialize=lambda _: None)
