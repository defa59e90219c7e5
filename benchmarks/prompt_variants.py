"""What the two wordings of the final-illness question and of the extraction block do to records.

Reads self-play records (arena_med.py output, which keeps each session's patient review and best
candidates) and asks the same model again, only the step in question, in each wording:

- final illness (step 9): `prompts/final_illness.txt` (the illness name only, the default) against
  `prompts/final_illness_reference.txt` (the reference's question: which diagnosis is more accurate);
- extraction (step 11): `prompts/extraction.txt` (labels with colons, the default) against
  `prompts/extraction_reference.txt` (the reference's block: `Explanation` without a colon); each
  reply parsed by both parsers.

It prints, per wording, the share of illnesses that talk about the diagnoses instead of naming one
(they mention a doctor, "diagnosis 1/2", "first/second diagnosis" or "more accurate"), the share
that name two illnesses (they contain "both" or " and "), and the share of empty explanations.

    python benchmarks/prompt_variants.py --records_file outputs/demo.jsonl --samples 3
    python benchmarks/prompt_variants.py --records_file R.jsonl --base_model M --api_base http://host/v1
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mentalarena.engines.backends import make_backend  # noqa: E402
from mentalarena.cli import checked  # noqa: E402
from mentalarena.store.keys import request_seed
from mentalarena.store.jsonl import read_jsonl  # noqa: E402
from mentalarena.selfplay.parsing import parse_extraction, parse_extraction_reference  # noqa: E402
from mentalarena.prompts import Prompts  # noqa: E402

TALKS_ABOUT_DIAGNOSES = re.compile(r"doctor|diagnos[ie]s\s*(?:#|no\.?\s*)?[12]\b|\b(?:first|second)\s+diagnosis|"
                                   r"more accurate", re.I)
NAMES_TWO = re.compile(r"\bboth\b|\band\b", re.I)


def illness_shares(replies: list[str]) -> dict:
    n = len(replies) or 1
    return {"n": len(replies),
            "talks_about_diagnoses": round(sum(bool(TALKS_ABOUT_DIAGNOSES.search(r)) for r in replies) / n, 3),
            "names_two": round(sum(bool(NAMES_TWO.search(r)) for r in replies) / n, 3),
            "empty": round(sum(not r.strip() for r in replies) / n, 3),
            "mean_words": round(sum(len(r.split()) for r in replies) / n, 1)}


def extraction_shares(replies: list[str]) -> dict:
    out = {}
    n = len(replies) or 1
    for name, parse in (("robust", parse_extraction), ("reference", parse_extraction_reference)):
        fields = [parse(r) for r in replies]
        out[name] = {key: round(sum(not f[key] for f in fields) / n, 3)
                     for key in ("treatment", "explain_t", "medicine", "explain_m")}
    return out


def main(records_file: str, base_model: str | None = None, backend: str = "auto", api_base: str | None = None,
         samples: int = 3, temperature: float = 0.8, max_new_tokens: int = 256, seed: int = 0,
         dtype: str | None = None, out_file: str | None = None) -> dict:
    records = [r for r in read_jsonl(Path(records_file)) if r.get("patient_review") and r.get("treatment_search")]
    if not records:
        sys.exit(f"error: {records_file}: no records with patient_review and treatment_search (arena_med.py output)")
    prompts = Prompts()
    chat = checked(make_backend(base_model, backend, api_base, temperature=temperature, max_new_tokens=max_new_tokens,
                                seed=seed, dtype=dtype, prefix_cache_gb=0), "variants")
    jobs = []  # (variant, text)
    for r in records:
        cands = r["treatment_search"]["best"] + "\n" + r["medicine_search"]["best"]
        for k in range(samples):
            key = (seed, r["patient_id"], r["sample"], k)
            jobs += [("illness/name", prompts.render("final_illness", review=r["patient_review"]), key),
                     ("illness/reference", prompts.render("final_illness_reference", review=r["patient_review"]), key),
                     ("extraction/colons (default)", prompts.render("extraction", candidates=cands), key),
                     ("extraction/reference", prompts.render("extraction_reference", candidates=cands), key)]
    convs = [[{"role": "user", "content": text}] for _, text, _ in jobs]
    seeds = [request_seed(*key, variant) for variant, _, key in jobs]
    replies = [reply.text for reply in chat.generate(convs, seeds)]
    chat.close()
    by_variant: dict[str, list[str]] = {}
    for (variant, _, _), reply in zip(jobs, replies):
        by_variant.setdefault(variant, []).append(reply)
    result = {"records": len(records), "samples": samples, "model": chat.name,
              "illness": {v.split("/")[1]: illness_shares(t) for v, t in by_variant.items() if v.startswith("illness")},
              "extraction": {v.split("/")[1]: extraction_shares(t) for v, t in by_variant.items()
                             if v.startswith("extraction")}}
    print(json.dumps(result, indent=1))
    if out_file:
        Path(out_file).write_text(json.dumps({**result, "replies": by_variant}, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
