"""IMHI generation throughput: one row at a time (as the reference) versus IMHI_eval's batched path.

Same embedded model (loaded once), same rows, same prompts, same dtype, greedy, same length limit,
both measured in this one run (these machines are noisy, so only the ratio measured side by side
means much). The reference-style run calls `model.generate` once per row and decodes the tokens after
the prompt. The batched run is `IMHI_eval.generate` itself: continuous batching, the per-row JSONL
and the CSV rewrite included. The answers of both are compared.

    python benchmarks/bench_imhi.py --rows 64 --max_new_tokens 128                     # raw queries (the reference)
    python benchmarks/bench_imhi.py --rows 64 --max_new_tokens 128 --prompting chat    # longer answers
    python benchmarks/bench_imhi.py --rows 64 --max_new_tokens None    # the reference's max_length=2048

Every row costs one prefill of its prompt in both runs, at the same speed (a CPU prefill is already
compute-bound), so the speed-up grows with the answer length: batching shrinks only the decode steps.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import IMHI_eval as ev  # noqa: E402
from mentalarena.evaluation import imhi  # noqa: E402
from mentalarena.engines.hf_backend import HFBackend  # noqa: E402

SHARED_FILE = ev.ROOT.parent / "shared" / "data" / "imhi" / "test_instruction" / "dreaddit.csv"


def one_at_a_time(backend: HFBackend, prompts: list[str], max_new_tokens: int | None, raw: bool = True) -> list[str]:
    """The reference's loop with a batch of one: tokenize the prompt text, generate, decode the rest.
    `max_new_tokens` None: the reference's max_length=2048 (prompt included)."""
    answers = []
    with torch.inference_mode():
        for prompt in prompts:
            # raw: the tokenizer's default special tokens, as the reference; chat: the template has them
            inputs = backend.tokenizer(prompt, return_tensors="pt", add_special_tokens=raw).to(backend.device)
            limit = {"max_length": ev.REFERENCE_MAX_LENGTH} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
            out = backend.model.generate(**inputs, do_sample=False, pad_token_id=backend.pad_id,
                                         eos_token_id=sorted(backend.eos_ids), **limit)
            answers.append(backend.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def batched(backend: HFBackend, job: ev.Job, settings: dict) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        generation = ev.generate(backend, job, settings, Path(tmp), progress=False)
    by_row = {a["row"]: a["generated_text"] for a in generation["answers"]}
    return [by_row[row["row"]] for row in job.rows]


def main(rows: int = 64, data_file: str | None = None, max_new_tokens: int | None = 128, batch_size: int = 32,
         prompting: str = "raw", dtype: str = "auto"):
    path = Path(data_file) if data_file else (SHARED_FILE if SHARED_FILE.exists() else ev.DEFAULT_TEST_DIR / "dreaddit.csv")
    table = imhi.read_imhi_csv(path)[:rows]
    job = ev.Job("IMHI", imhi.dataset_name(path), path,
                 [{"row": i, "key": ev._row_key(i, r["query"], r["golden"]), **r} for i, r in enumerate(table)])
    settings = ev._settings(None, "embedded", None, prompting, 0.0, max_new_tokens, 0, dtype, None)
    backend = ev._backend(settings, batch_size, None)  # exactly what the CLI builds
    # the prompt text each row's model.generate sees: the raw query, or it rendered by the chat template
    prompts = [r["query"] if prompting == "raw" else backend.render([{"role": "user", "content": r["query"]}])
               for r in table]
    prompt_tokens = sum(len(backend.tokenizer(p)["input_ids"]) for p in prompts)
    print("[bench] " + json.dumps({"file": str(path), "rows": len(table), "prompt_tokens": prompt_tokens,
                                   "prompting": prompting, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                                   "dtype": settings["dtype"], "threads": torch.get_num_threads()}), flush=True)
    one_at_a_time(backend, prompts[:1], 4, prompting == "raw")  # warm-up, so neither side pays first-call costs
    start = time.perf_counter()
    fast = batched(backend, job, settings)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = one_at_a_time(backend, prompts, max_new_tokens, prompting == "raw")
    slow_s = time.perf_counter() - start
    same = sum(a == b for a, b in zip(fast, slow))
    answer_tokens = sum(len(backend.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in fast)
    print(f"\none row at a time (reference) : {len(table) / slow_s:8.3f} rows/s ({slow_s:.1f} s)")
    print(f"batched (IMHI_eval)           : {len(table) / fast_s:8.3f} rows/s ({fast_s:.1f} s, batch {batch_size})")
    print(f"speed-up                      : {slow_s / fast_s:8.2f}x")
    print(f"identical answers             : {same} of {len(table)} (mean answer {answer_tokens / len(table):.1f} tokens)")


if __name__ == "__main__":
    import fire
    fire.Fire(main)
