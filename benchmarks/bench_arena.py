"""Self-play throughput: one request at a time (as the reference) versus concurrent batched sessions.

Same embedded model, same patients, same settings, both measured in this one run (these machines
are noisy, so only the ratio measured side by side means much). The reference-style run makes one
model call at a time with no cache reuse; it is slow, so by default it runs the first
`baseline_sessions` sessions of the same list and its rate is compared per session.

    python benchmarks/bench_arena.py                     # 8 sessions concurrent, 2 sessions serial
    python benchmarks/bench_arena.py --sessions 8 --baseline_sessions 8   # fully like for like
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import arena_med  # noqa: E402


def measure(label: str, out_dir: Path, **flags) -> dict:
    start = time.perf_counter()
    summary = arena_med.run(output_file=str(out_dir / f"{label}.jsonl"), progress=False, **flags)
    wall = time.perf_counter() - start
    sessions = summary["sessions_ok"] + summary["sessions_failed"]
    return {"label": label, "sessions": sessions, "failed": summary["sessions_failed"],
            "wall_s": round(wall, 1), "sessions_per_hour": round(3600 * sessions / wall, 2),
            "model_calls": summary["model_calls"], "prompt_tokens": summary["prompt_tokens"],
            "completion_tokens": summary["completion_tokens"], "base": summary["clients"]["base"]}


def main(sessions: int = 8, baseline_sessions: int = 2, concurrency: int = 8, max_new_tokens: int = 64,
         dialogue_rounds: int = 4, max_decode_rounds: int = 1, max_tries: int = 2, seed: int = 0,
         dtype: str = "auto"):
    settings = dict(max_new_tokens=max_new_tokens, dialogue_rounds=dialogue_rounds,
                    max_decode_rounds=max_decode_rounds, max_tries=max_tries, seed=seed, dtype=dtype)
    print("[bench] settings " + json.dumps(settings), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fast = measure("concurrent_batched", out, limit=sessions, concurrency=concurrency, **settings)
        print("[bench] " + json.dumps(fast), flush=True)
        slow = measure("one_at_a_time", out, limit=baseline_sessions, concurrency=1, max_batch_size=1,
                       prefix_cache_gb=0, **settings)
        print("[bench] " + json.dumps(slow), flush=True)
    ratio = fast["sessions_per_hour"] / slow["sessions_per_hour"]
    print(f"\none at a time (reference) : {slow['sessions_per_hour']:8.2f} sessions/hour "
          f"({slow['sessions']} sessions, {slow['wall_s']} s)")
    print(f"concurrent batched        : {fast['sessions_per_hour']:8.2f} sessions/hour "
          f"({fast['sessions']} sessions, concurrency {concurrency}, {fast['wall_s']} s)")
    print(f"speed-up                  : {ratio:8.2f}x")
    return None


if __name__ == "__main__":
    import fire
    fire.Fire(main)
