"""Prefill and decode tokens/s of the embedded model in float32 and bfloat16, on both local paths,
side by side in one run (these machines are noisy: only ratios measured together mean much).

- self-play path: `HFBackend.generate`, one batch of `rows` conversations (as `arena_med.py`
  sends the calls of its sessions in flight), the prefix cache off so every prompt token is
  prefilled; prefill and decode seconds are the backend's own counters;
- evaluation path: `HFBackend.stream` (continuous batching, `batcher.py`), the same prompts;
  prefill is the time spent in the batcher's one-prompt-at-a-time prefill, decode the rest.

With `--sessions N`, it also runs N real self-play sessions (`arena_med.run`, concurrency N,
short settings) in each dtype and reads the base model's own prefill and decode counters.

End of sequence is ignored on both micro paths, so every row decodes exactly `new_tokens` tokens in both
dtypes (sampled replies would otherwise end at different lengths and change the batch size).

    python benchmarks/bench_dtype.py                 # 8 rows of ~512 prompt tokens, 32 new tokens, 2 rounds
    python benchmarks/bench_dtype.py --rows 4 --prompt_tokens 1024 --rounds 3
    python benchmarks/bench_dtype.py --rounds 1 --sessions 2        # and 2 sessions per dtype
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mentalarena.engines import batcher  # noqa: E402
from mentalarena.selfplay.data import DEFAULT_PATIENTS_FILE, load_patients  # noqa: E402
from mentalarena.engines.hf_backend import EMBEDDED_GGUF, HFBackend, embedded_model_dir  # noqa: E402


def conversations(backend: HFBackend, rows: int, prompt_tokens: int) -> list[list[dict]]:
    """A patient persona (the bundled patients, as JSON) as the system message, cut to about
    `prompt_tokens` tokens, and a doctor's question; a different patient per row."""
    patients = load_patients(DEFAULT_PATIENTS_FILE)
    convs = []
    for row in range(rows):
        text = ""
        for i in range(len(patients)):
            text += json.dumps(patients[(row + i) % len(patients)], ensure_ascii=False) + "\n"
        ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
        persona = backend.tokenizer.decode(ids[:max(1, prompt_tokens - 40)])
        convs.append([{"role": "system", "content": "You are the patient described here.\n" + persona},
                      {"role": "user", "content": "Doctor: how have you been sleeping this week?"}])
    return convs


def self_play(backend: HFBackend, convs, seeds) -> dict:
    backend.prefilled_tokens, backend.prefill_seconds, backend.decode_seconds = 0, 0.0, 0.0
    replies = backend.generate(convs, seeds=seeds)
    return {"prefill_tokens": backend.prefilled_tokens, "prefill_s": backend.prefill_seconds,
            "decode_tokens": sum(r.completion_tokens for r in replies), "decode_s": backend.decode_seconds}


def evaluation(backend: HFBackend, convs, seeds) -> dict:
    spent = [0.0]
    prefill = batcher.ContinuousBatcher._prefill

    def timed(self, *args):
        start = time.perf_counter()
        try:
            return prefill(self, *args)
        finally:
            spent[0] += time.perf_counter() - start
    batcher.ContinuousBatcher._prefill = timed
    backend.prefilled_tokens = 0
    try:
        start = time.perf_counter()
        replies = [r for _, r in backend.stream(convs, seeds=seeds)]
        total = time.perf_counter() - start
    finally:
        batcher.ContinuousBatcher._prefill = prefill
    return {"prefill_tokens": backend.prefilled_tokens, "prefill_s": spent[0],
            "decode_tokens": sum(r.completion_tokens for r in replies), "decode_s": total - spent[0]}


def sessions_run(n: int, dtype: str, out_dir: Path) -> dict:
    import arena_med

    summary = arena_med.run(output_file=str(out_dir / f"{dtype}.jsonl"), limit=n, concurrency=n, max_new_tokens=64,
                            dialogue_rounds=2, max_decode_rounds=1, max_tries=1, dtype=dtype, progress=False)
    base = summary["clients"]["base"]
    return {"prefill_tokens": base["prefilled_tokens"], "prefill_s": base["prefill_seconds"],
            "decode_tokens": base["completion_tokens"], "decode_s": base["decode_seconds"],
            "prompt_tokens": base["prompt_tokens"], "wall_s": summary.get("wall_seconds")}


def main(rows: int = 8, prompt_tokens: int = 512, new_tokens: int = 32, rounds: int = 2,
         temperature: float = 0.8, dtypes: str = "float32,bfloat16", sessions: int = 0):
    names = [d.strip() for d in dtypes.split(",")]
    backends = {}
    for name in names:
        start = time.perf_counter()
        backends[name] = HFBackend(embedded_model_dir(), gguf_file=EMBEDDED_GGUF, temperature=temperature,
                                   max_new_tokens=new_tokens, max_batch_size=rows, dtype=name, prefix_cache_gb=0)
        backends[name].eos_ids = set()  # every row decodes exactly new_tokens tokens
        print(f"[bench] {name}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
    convs = conversations(backends[names[0]], rows, prompt_tokens)
    seeds = list(range(rows))
    print("[bench] " + json.dumps({"rows": rows, "prompt_tokens": [len(backends[names[0]].encode(c)) for c in convs],
                                   "new_tokens": new_tokens, "temperature": temperature, "rounds": rounds,
                                   "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    for name in names:  # warm-up (first calls set up kernels), not counted
        with torch.inference_mode():
            self_play(backends[name], convs[:2], seeds[:2])
            evaluation(backends[name], convs[:2], seeds[:2])
    totals = {(path, name): {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
              for path in ("self-play", "evaluation") for name in names}
    for r in range(rounds):  # interleaved, so a busy spell of the machine hits both dtypes alike
        for path, fn in (("self-play", self_play), ("evaluation", evaluation)):
            for name in names:
                with torch.inference_mode():
                    got = fn(backends[name], convs, seeds)
                for key, value in got.items():
                    totals[path, name][key] += value
                print(f"[bench] round {r + 1} {path:10s} {name:8s} prefill {got['prefill_tokens'] / got['prefill_s']:7.0f} "
                      f"tok/s   decode {got['decode_tokens'] / got['decode_s']:6.0f} tok/s", flush=True)
    if sessions:
        del backends
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                got = sessions_run(sessions, name, Path(tmp))
                totals["sessions", name] = got
                print(f"[bench] sessions {name}: " + json.dumps(got), flush=True)
    rate = {k: (v["prefill_tokens"] / v["prefill_s"], v["decode_tokens"] / v["decode_s"]) for k, v in totals.items()}
    print(f"\n{'path':10s}  {'dtype':8s}  {'prefill tok/s':>13s}  {'decode tok/s':>12s}")
    for (path, name), (pre, dec) in rate.items():
        print(f"{path:10s}  {name:8s}  {pre:13.0f}  {dec:12.0f}")
    if len(names) == 2:
        a, b = names
        for path in ("self-play", "evaluation") + (("sessions",) if sessions else ()):
            print(f"{path:10s}  {b}/{a}: prefill {rate[path, b][0] / rate[path, a][0]:.2f}x, "
                  f"decode {rate[path, b][1] / rate[path, a][1]:.2f}x")


if __name__ == "__main__":
    import fire
    fire.Fire(main)
