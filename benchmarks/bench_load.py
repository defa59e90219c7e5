"""Start-up cost of the embedded model: the GGUF file dequantized at every start (the cache off)
against the dense copy the cache keeps (`mentalarena/engines/gguf_cache.py`), each in a fresh process.

    python benchmarks/bench_load.py            # a new empty cache folder: first load, then 2 later ones

Each line is one process: the seconds to import transformers and the seconds of the whole load
(`hf_backend._load`: tokenizer and model, as every script does), then a tiny greedy reply as a check
that the model works. The first cached load includes the conversion and the writing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(dtype: str) -> None:
    sys.path.insert(0, str(ROOT))
    start = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401
    imported = time.perf_counter()
    from mentalarena.engines.hf_backend import EMBEDDED_GGUF, _load, embedded_model_dir
    tokenizer, model = _load(embedded_model_dir(), EMBEDDED_GGUF, "cpu", dtype)
    loaded = time.perf_counter()
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    print(json.dumps({"import_s": round(imported - start, 2), "load_s": round(loaded - imported, 2),
                      "reply": tokenizer.decode(out[0, ids["input_ids"].shape[1]:])}), flush=True)


def run(label: str, cache: str, dtype: str) -> dict:
    env = dict(os.environ, MENTALARENA_CACHE=cache)
    wall = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", dtype], env=env, capture_output=True, text=True,
                          check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(label=label, process_s=round(time.perf_counter() - wall, 2))
    print(f"{label:34s} import {result['import_s']:6.2f} s   load {result['load_s']:6.2f} s   "
          f"process {result['process_s']:6.2f} s   reply {result['reply']!r}", flush=True)
    return result


def main(dtype: str = "float32", later: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        direct = run("GGUF dequantized (cache off)", "off", dtype)
        first = run("first load (converts, writes)", tmp, dtype)
        rest = [run(f"later load {i + 1} (cached)", tmp, dtype) for i in range(later)]
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    best = min(r["load_s"] for r in rest)
    print(f"\ncache size {size / 2**20:.0f} MiB; load: direct {direct['load_s']} s, first {first['load_s']} s, "
          f"later {best} s ({direct['load_s'] / best:.1f}x faster)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        import fire
        fire.Fire(main)
