"""Does the same command with the same --seed give the same records at every concurrency level?

Runs arena_med.py once per concurrency level (same patients, seed and settings; each run into its
own output) and compares the records call by call. Every flag of arena_med.py is accepted, so the
check runs on any backend: the local engine (float32 holds at every level; bfloat16 holds at one
level, but a row padded in a batch gets other bfloat16 logits than alone, see batch_invariance.py,
so records differ between levels), or a server (`--api_base`; a server gives identical
replies only if it honours per-request seeds and its numerics do not depend on what else it is
serving: llama.cpp's prompt cache, for one, makes them depend on timing).

    python benchmarks/check_reproducible.py --limit 2 --num_samples 2 --levels 1,8 --dtype float32
    python benchmarks/check_reproducible.py --base_model M --api_base http://host:8000/v1 --levels 1,16
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import arena_med  # noqa: E402
from mentalarena.cli import names  # noqa: E402
from mentalarena.store.jsonl import read_jsonl  # noqa: E402


def replies(path: Path) -> dict:
    """(patient, sample) -> the replies of the session, in call order."""
    rows = read_jsonl(path)  # lines end at "\n" only: a reply may hold U+2028
    return {(r["patient_id"], r["sample"]): [c["reply"] for c in r["transcript"]] for r in rows}


def main(levels: str = "1,8", limit: int = 2, num_samples: int = 2, max_new_tokens: int = 32,
         dialogue_rounds: int = 1, max_decode_rounds: int = 1, max_tries: int = 2, keep_dir: str | None = None,
         **flags) -> dict:
    """`keep_dir`: write the records there (to compare them by hand) instead of a temporary folder."""
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = keep_dir or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for level in [int(x) for x in names(levels)]:
            start = time.perf_counter()
            out = Path(tmp) / f"c{level}.jsonl"
            summary = arena_med.run(output_file=str(out), concurrency=level, limit=limit, num_samples=num_samples,
                                    max_new_tokens=max_new_tokens, dialogue_rounds=dialogue_rounds,
                                    max_decode_rounds=max_decode_rounds, max_tries=max_tries, progress=False, **flags)
            runs[level] = replies(out)
            print(f"concurrency {level:>3}: {summary['sessions_ok']} sessions, {summary['model_calls']} calls, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
    first, *others = runs
    report = {"levels": list(runs), "sessions": len(runs[first])}
    for level in others:
        same_sessions = sum(runs[level].get(key) == calls for key, calls in runs[first].items())
        pairs = [(a, b) for key, calls in runs[first].items() for a, b in zip(calls, runs[level].get(key, []))]
        same_calls = sum(a == b for a, b in pairs)
        report[f"{first}_vs_{level}"] = {"identical_sessions": same_sessions, "identical_calls": same_calls,
                                         "calls": len(pairs)}
        print(f"concurrency {first} vs {level}: {same_sessions} of {len(runs[first])} sessions identical, "
              f"{same_calls} of {len(pairs)} replies identical", flush=True)
    samples = [calls for (pid, k), calls in runs[first].items() if k == 1]
    if samples:
        differ = sum(runs[first][(pid, 0)] != runs[first][(pid, 1)] for (pid, k) in runs[first] if k == 1)
        print(f"samples 0 and 1 of a patient differ in {differ} of {len(samples)} patients", flush=True)
    return report


if __name__ == "__main__":
    import fire
    fire.Fire(main, serialize=lambda _: None)
