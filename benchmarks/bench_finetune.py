"""Fine-tuning throughput: the paper's unpacked group-by-length batches versus packed blocks, and
DPO (TRL's DPOTrainer, as `llama_finetune.py --objective dpo` runs it) next to them.

The SFT modes train the same examples for one epoch each, from the same base model with a fresh LoRA
adapter of the same initial weights, with llama_finetune.py's own tokenization, collator and Trainer
settings, in this one run. Throughput counts real tokens only (not padding); `padded tokens` is what the model
actually computed on. Only the ratio measured side by side means much on a shared machine.

    python benchmarks/bench_finetune.py                          # embedded model, LoRA, CPU
    python benchmarks/bench_finetune.py --model meta-llama/Meta-Llama-3.1-8B-Instruct --method qlora \\
        --examples 256 --peak_tflops 989                         # 8B QLoRA on one H100 (bf16 dense peak)

MFU = 6 x parameters x tokens/s / peak FLOP/s, the usual convention for training. It overstates
the work LoRA does (the frozen weights get no weight gradients: about 4 x parameters per token), so
read LoRA MFU as an upper bound of the hardware share used.

DPO trains pairs with the same prompts and answers: each example's answer is the chosen one, and the
answer of the next sampled example of the same kind is the rejected one (scored self-play records,
given with --pair_files, give their own pairs instead). Its tokens are those of both sequences,
prompt + chosen and prompt + rejected, each of which also goes through the frozen reference (the
adapter switched off) without gradients; so a DPO token costs more than an SFT token, and the DPO /
SFT ratio says by how much.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mentalarena.training import trainers as training  # noqa: E402
from mentalarena.cli import names  # noqa: E402
from mentalarena.engines.embedded import EMBEDDED_GGUF, embedded_model_dir  # noqa: E402
from mentalarena.training.sft import dedup, load_pairs, to_openai, to_text  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "arena_outputs" / "gpt_iter1_output.jsonl"


class CountingCollator(training.Collator):
    """Also counts the token slots of every batch, padding included."""

    computed = 0

    def __call__(self, features):
        batch = super().__call__(features)
        self.computed += batch["input_ids"].numel()
        return batch


def train_once(label: str, base_model, train_set: list[dict], real_tokens: int, opts: dict, tokenizer) -> dict:
    """One epoch over `train_set` with a fresh adapter (same seed, so the same initial weights) on
    the shared base model, which gets its plain layers back afterwards."""
    from transformers import Trainer, set_seed

    set_seed(opts["seed"])
    model = training.add_lora(base_model, opts["method"], opts["lora_r"], 16, 0.1, None, opts["gradient_checkpointing"])
    params = training.parameter_counts(model)[1]
    collator = CountingCollator(tokenizer.pad_token_id)
    args = training.training_args(
        output_dir=str(opts["scratch"]), num_train_epochs=1, per_device_train_batch_size=opts["batch_size"],
        optim=opts["optim"], learning_rate=2e-4, weight_decay=0.001, max_grad_norm=0.3, warmup_ratio=0.03,
        lr_scheduler_type="constant_with_warmup", group_by_length=True,
        gradient_checkpointing=opts["gradient_checkpointing"] and opts["method"] != "qlora",
        save_strategy="no", report_to="none", logging_steps=1000, disable_tqdm=True, seed=opts["seed"],
        remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator)
    _warm_up(model, collator([{k: v[:64] for k, v in row.items()} for row in train_set[:1]]))
    collator.computed = 0
    wall = _timed(trainer.train)
    row = {"mode": label, "rows": len(train_set), "steps": trainer.state.global_step, "tokens": real_tokens,
           "padded_tokens": collator.computed, "wall_s": round(wall, 2), "tokens_per_s": round(real_tokens / wall, 1),
           "parameters": params}
    if opts["peak_tflops"]:
        row["mfu"] = round(6 * params * real_tokens / wall / (opts["peak_tflops"] * 1e12), 4)
    del trainer
    model.unload()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def train_dpo(base_model, rows: list[dict], opts: dict, tokenizer) -> dict:
    """One epoch of DPO over `rows` (TRL preference rows) with a fresh adapter on the shared base
    model, the settings llama_finetune.py uses; the base gets its plain layers back afterwards."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(opts["seed"])
    args = training.training_args(
        DPOConfig, output_dir=str(opts["scratch"]), num_train_epochs=1, per_device_train_batch_size=opts["batch_size"],
        optim=opts["optim"], learning_rate=5e-6, weight_decay=0.001, max_grad_norm=0.3, warmup_ratio=0.03,
        lr_scheduler_type="constant_with_warmup", group_by_length=False, beta=0.1, max_length=opts["max_seq_length"],
        gradient_checkpointing=opts["gradient_checkpointing"] and opts["method"] != "qlora",
        save_strategy="no", report_to="none", logging_steps=1000, disable_tqdm=True, seed=opts["seed"],
        bf16=False, fp16=False)  # TRL would default to bf16 mixed precision; the SFT rows use none either
    trainer = DPOTrainer(model=base_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=training.lora_config(opts["lora_r"], 16, 0.1, None))
    data = trainer.train_dataset
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                                  data["rejected_ids"]))
    params = training.parameter_counts(trainer.model)[1]
    wall = _timed(trainer.train)
    row = {"mode": "DPO pairs (chosen + rejected)", "rows": len(data), "steps": trainer.state.global_step,
           "tokens": tokens, "padded_tokens": None, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
           "parameters": params}
    if opts["peak_tflops"]:
        row["mfu"] = round(6 * params * tokens / wall / (opts["peak_tflops"] * 1e12), 4)
    trainer.model.unload()
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def dpo_rows(sampled: list, fmt: str, pair_files: list[str]) -> list[dict]:
    """Preference rows: from scored records when given, else the sampled SFT examples' own answers
    (chosen) against the next sampled answer of the same kind (rejected)."""
    from mentalarena.training.preference import PreferencePair, load_preferences, to_trl, to_trl_text

    if pair_files:
        pairs, report = load_preferences(pair_files)
        if not pairs:
            raise SystemExit(f"--pair_files: no pairs ({report.why_none()})")
    else:
        pairs = []
        for i, p in enumerate(sampled):
            same = [q for q in sampled[i + 1:] + sampled[:i] if q.kind == p.kind and q.answer != p.answer]
            if same:
                pairs.append(PreferencePair(p.system, p.question, p.answer, same[0].answer, p.kind))
    write = to_trl_text if fmt == "original" else to_trl
    return [{k: write(p)[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]


def _timed(work) -> float:
    """Seconds `work()` takes, the GPU's queued work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _warm_up(model, batch: dict) -> None:
    """One untimed forward and backward: first-call costs (allocator, kernels) stay out of the timing."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    model.train()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def main(model: str | None = None, method: str = "lora", data_files: str | tuple | None = None,
         examples: int = 12, max_seq_length: int = 1024, batch_size: int = 4, format: str = "original",
         lora_r: int = 64, dtype: str = "auto", peak_tflops: float | None = None,
         gradient_checkpointing: bool = False, seed: int = 0, output: str | None = None,
         dpo: bool = True, pair_files: str | tuple | None = None) -> dict:
    gguf = None
    base = model
    if model in (None, "embedded"):
        base, gguf = embedded_model_dir(), EMBEDDED_GGUF
    method = training.resolve_method(method, gguf is not None)
    torch_dtype = training.resolve_dtype(dtype, method)
    pairs, _ = load_pairs(names(data_files) or [str(DEFAULT_DATA)])
    unique = list({(p.system, p.question, p.answer): p for p in pairs}.values())
    sampled = random.Random(seed).sample(unique, min(examples, len(unique)))
    rows = dedup([to_text(p) if format == "original" else to_openai(p) for p in sampled])
    tokenizer = training.load_tokenizer(base, gguf)
    encoded, stats = training.encode_rows(rows, tokenizer, format, max_seq_length, answer_only=False, add_eos=True)
    opts = {"base": base, "gguf": gguf, "method": method, "dtype": torch_dtype, "lora_r": lora_r,
            "batch_size": batch_size, "seed": seed, "peak_tflops": peak_tflops,
            "gradient_checkpointing": gradient_checkpointing, "scratch": ROOT / "outputs" / "bench_finetune",
            "max_seq_length": max_seq_length,
            "optim": "paged_adamw_32bit" if method == "qlora" else "adamw_torch"}
    print(f"{base} ({method}, {str(torch_dtype).removeprefix('torch.')}), {len(encoded)} examples, "
          f"{stats['tokens_per_epoch']} tokens ({stats['truncated']} cut at {max_seq_length}), batch {batch_size}, "
          f"{torch.get_num_threads()} CPU threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    base_model = training.load_model(base, gguf, method, torch_dtype)
    results = [train_once(label, base_model, rows, stats["tokens_per_epoch"], opts, tokenizer) for label, rows in (
        ("unpacked, group-by-length (paper)", encoded), ("packed", training.pack(encoded, max_seq_length)))]
    if dpo:
        results.append(train_dpo(base_model, dpo_rows(sampled, format, names(pair_files)), opts, tokenizer))
    print(f"{'mode':36s} {'rows':>5s} {'steps':>6s} {'tokens':>8s} {'padded':>8s} {'wall s':>8s} {'tokens/s':>9s}"
          + ("      MFU" if peak_tflops else ""))
    for r in results:
        padded = "" if r["padded_tokens"] is None else r["padded_tokens"]
        print(f"{r['mode']:36s} {r['rows']:5d} {r['steps']:6d} {r['tokens']:8d} {padded:>8} "
              f"{r['wall_s']:8.1f} {r['tokens_per_s']:9.1f}" + (f" {100 * r['mfu']:7.2f}%" if peak_tflops else ""))
    ratio = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    print(f"packed / unpacked tokens/s: {ratio:.2f}x")
    if dpo:
        dpo_ratio = results[2]["tokens_per_s"] / results[0]["tokens_per_s"]
        print(f"DPO / SFT (unpacked) tokens/s: {dpo_ratio:.2f}x")
    report = {"model": base, "method": method, "dtype": str(torch_dtype), "examples": len(encoded),
              "max_seq_length": max_seq_length, "batch_size": batch_size, "results": results, "ratio": round(ratio, 3),
              "dpo_ratio": round(dpo_ratio, 3) if dpo else None}
    if output:
        Path(output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    import fire
    fire.Fire(main, serialize=lambda _: None)
