"""Biomedical QA accuracy (MedQA, MedMCQA, PubMedQA, MMLU), as in the MentalArena paper.

    python MedQA_eval.py --model gpt-4o --dataset MedQA --data_file data/MedQA/psychosis.jsonl
    python MedQA_eval.py suite --model meta-llama/Meta-Llama-3-8B-Instruct --data_dir ../MentalArena/data
    python MedQA_eval.py report --output_dir outputs/eval

Zero-shot, one chat turn per question under the system text "You are a psychiatric expert.",
256 new tokens, temperature 0 for API models and 0.1 for local ones, each evaluation repeated
(`--repeats`, the paper: 5) and averaged. Every answer is scored twice in the same run: by the
reference's rule (`accuracy_reference`, faithful, mis-scores "The answer is C.") and by a robust
answer extraction (`accuracy`). Per-answer rows go to `<stem>.samples.jsonl` (a re-run resumes
from them); `<stem>.results.json` holds the figures and the settings that made them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from mentalarena import cli
from mentalarena.store import keys

from mentalarena.reports import figures

from mentalarena.loop import paper

from mentalarena.evaluation import qa
from mentalarena.engines.backends import make_backend
from mentalarena.engines.routes import endpoint_list, require_keys, resolve_backend
from mentalarena.errors import InputError, ModelCallError, check_choice
from mentalarena.flags import check_numbers
from mentalarena.cli import answers_on_file, auto_dtype
from mentalarena.store.keys import model_tag, request_seed, settings_hash
from mentalarena.store.files import write_atomic
from mentalarena.store.jsonl import append_jsonl, write_json_atomic
from mentalarena.store.locks import hold_all
from mentalarena.progress import Progress
from mentalarena.prompts import Prompts

log = logging.getLogger("medqa_eval")

# The paper's tables: (dataset, subset); the main table's subsets are the paper's own files.
MAIN_TABLE = [("MedQA", None), ("MedMCQA", None), ("PubMedQA", None)]
GENERALIZATION_TABLE = [("MedMCQA", s) for s in (
    "Anatomy", "ENT", "Medicine", "Microbiology", "Ophthalmology", "Pathology", "Pediatrics",
    "Pharmacology", "Psychiatry", "Skin")] + [("MMLU", s) for s in (
        "medical_genetics", "college_biology", "college_medicine", "professional_medicine",
        "clinical_knowledge", "high_school_biology")]
TABLES = {"main": MAIN_TABLE, "generalization": GENERALIZATION_TABLE}
SCORERS = {"accuracy": "robust answer extraction", "accuracy_reference": "the reference's rule R (faithful)"}
# Flags that change how a run goes, not its answers (iterate.py lets a re-run change them).
RUNNING_FLAGS = ("progress", "batch_size", "device", "request_timeout", "api_key_env")
# Table 2's QA columns (mentalarena/loop/paper.py, METHOD.md §7's second-hand transcription), accuracy %.
PUBLISHED = paper.published(paper.QA_COLUMNS)
# Where a folder laid out like the paper's `data/` (or ../shared/data) keeps each set.
LOCAL_FILES = {
    ("MedQA", None): ["medqa/psychosis.jsonl"],
    ("MedMCQA", None): ["medmcqa/psychosis.jsonl"],
    ("PubMedQA", None): ["pubmedqa/test_samples.jsonl"],
    ("MedMCQA", "*"): ["medmcqa/subjects/{s}.jsonl", "medmcqa/illnesses/{s}.jsonl"],
    ("MMLU", "*"): ["mmlu/{s}_test.jsonl", "mmlu/test/{s}_test.jsonl", "mmlu/{s}.jsonl"],
}  # names matched regardless of case: the paper's data/ has MedQA/, MedMCQA/illnesses/, MMLU/test/


# ---------------------------------------------------------------------------------- commands
def run(
    # model
    model: str | None = None,          # None: the embedded SmolLM2-135M-Instruct; a path / org/name: hf; else OpenAI
    backend: str = "auto",            # auto | embedded | hf | openai
    api_base: str | None = None,      # an OpenAI-compatible server (vLLM, ...), or replicas as a comma list
    api_key_env: str | None = None,   # the environment variable with --api_base's key (None: none; the OpenAI API: OPENAI_API_KEY)
    request_timeout: float = 600.0,   # served models: seconds one request may take in all
    # data
    dataset: str = "PubMedQA",        # MedQA | MedMCQA | PubMedQA | MMLU (the reference's default)
    name: str | None = None,          # MedMCQA subject (e.g. Anatomy) or MMLU subset (e.g. college_medicine)
    data_file: str | None = None,     # a local file in the paper's (or the hub's) format; None: the hub
    cop_base: int | None = None,      # MedMCQA `cop` numbering: 1 (paper files, default for files) or 0 (hub)
    limit: int | None = None,         # first N questions only
    with_context: bool = False,       # PubMedQA: put the abstract before the question (the paper did not)
    # decoding
    repeats: int = 5,                 # independent runs averaged (the paper: 5); mean and std are reported
    temperature: float | None = None,  # None: 0 for API models, 0.1 for open ones (the reference's values)
    open_model: bool | None = None,   # an open-weight model (0.1), also when served over --api_base; None: local ones only
    max_new_tokens: int = 256,
    batch_size: int = 64,             # local: sequences decoded together; API: requests in flight
    seed: int = 0,
    dtype: str | None = "auto",       # local weights: auto (bfloat16 as the reference where the device has it) | float32 | ...
    device: str | None = None,
    # output
    output_dir: str = "outputs/eval",
    prompt_dir: str | None = None,    # a folder of edited prompts/*.txt
    progress: bool = True,
) -> dict:
    """Evaluate one model on one dataset (and subset); returns the results dict."""
    check_numbers(run, dict(locals()))
    job = _job(dataset, name, data_file, limit, cop_base)
    prompts = Prompts(prompt_dir)
    prompts.check(["qa_system", qa.benchmark(dataset).template])
    settings = _settings(model, backend, api_base, temperature, open_model, max_new_tokens, repeats, seed, with_context,
                         dtype, device)
    require_keys(settings, api_key_env)  # a key that is not there: found before anything is written
    with ExitStack() as held:
        hold_all(held, [_samples_file(Path(output_dir), settings, job)])
        chat = _backend(settings, batch_size, dtype, device, api_key_env, request_timeout)
        try:
            return evaluate(chat, job, prompts, settings, Path(output_dir), progress)
        finally:
            chat.close()


def suite(
    model: str | None = None, backend: str = "auto", api_base: str | None = None, api_key_env: str | None = None,
    request_timeout: float = 600.0,
    tables: str = "main,generalization",  # which of the paper's tables: main, generalization
    data_dir: str | None = None,       # a folder laid out like the paper's data/ (medqa/, medmcqa/, ...); else the hub
    limit: int | None = None, with_context: bool = False, repeats: int = 5,
    temperature: float | None = None, open_model: bool | None = None, max_new_tokens: int = 256,
    batch_size: int = 64, seed: int = 0,
    dtype: str | None = "auto", device: str | None = None, output_dir: str = "outputs/eval",
    prompt_dir: str | None = None, progress: bool = True,
) -> dict:
    """Every dataset and subset of the paper's tables with one model loaded once, then the report."""
    check_numbers(suite, dict(locals()))
    chosen = cli.names(tables)
    for t in chosen:
        check_choice("tables", t, tuple(TABLES))
    jobs = [_job(d, s, _local_file(data_dir, d, s), limit, None) for t in chosen for d, s in TABLES[t]]
    prompts = Prompts(prompt_dir)
    prompts.check(["qa_system", "qa_choice", "qa_decision"])
    settings = _settings(model, backend, api_base, temperature, open_model, max_new_tokens, repeats, seed, with_context,
                         dtype, device)
    require_keys(settings, api_key_env)  # a key that is not there: found before anything is written
    results = {}
    with ExitStack() as held:
        hold_all(held, [_samples_file(Path(output_dir), settings, job) for job in jobs])
        chat = _backend(settings, batch_size, dtype, device, api_key_env, request_timeout)
        try:
            for job in jobs:
                out = evaluate(chat, job, prompts, settings, Path(output_dir), progress)
                results[_stem(job)] = out
        finally:
            chat.close()
    print(report(output_dir))
    return results


def report(output_dir: str = "outputs/eval", output_file: str | None = None) -> str:
    """One markdown table (rows: models, columns: benchmarks, mean ± std over repeats) for each
    scorer, from every results JSON under `output_dir`, next to the paper's published numbers; beside
    the report, one PNG per scorer (`<report stem>_<scorer>.png`, see `figure_panel`)."""
    check_numbers(report, dict(locals()))
    found = sorted(Path(output_dir).rglob("*.results.json"))
    if not found:
        raise InputError(f"{output_dir}: no *.results.json files (run an evaluation first)")
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in found]
    columns = sorted({r["benchmark"] for r in rows}, key=_column_order)
    text = [f"# Biomedical QA accuracy (%), from {len(rows)} result files in {output_dir}", ""]
    target = Path(output_file) if output_file else Path(output_dir) / "report.md"
    for scorer, title in SCORERS.items():
        figure = figures.score_bars([figure_panel(rows, columns, scorer)], target.with_name(
            f"{target.stem}_{scorer}.png"), f"Biomedical QA accuracy, {title} (`{scorer}`), {output_dir}")
        text += [f"## {title} (`{scorer}`)", "", *_table(rows, columns, scorer), "",
                 f"![{scorer}]({figure.name}) `{figure.name}`: each model's mean with its std over repeats as "
                 "the error bar (none for one run), the paper's published numbers hatched, the majority "
                 "answer dashed.", ""]
    text += ["## Published (paper Table 2, METHOD.md §7; mean of 5 runs)", "",
             *_published_table(), "",
             "The paper's PubMedQA rows are 97.9 % 'yes' (the majority row above shows each set's "
             "constant-answer share); a score near it says little.", ""]
    markdown = "\n".join(text)
    write_atomic(target, markdown)
    return markdown


def figure_panel(rows: list[dict], columns: list[str], scorer: str) -> dict:
    """What the report's figure for `scorer` draws (a `figures.score_bars` panel): the numbers of
    `_table` (each model's mean and std over repeats; no error bar for a single run), the majority
    answer's accuracy as the baseline, and the paper's published numbers on the sets it has."""
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["benchmark"]] = r
    series = [{"label": str(model), "published": False,
               "values": {c: cells[c].get(scorer) for c in columns if c in cells},
               "errors": {c: cells[c].get(f"{scorer}_std") for c in columns
                          if c in cells and (cells[c].get("repeats") or 1) > 1}}
              for model, cells in sorted(by_model.items(), key=lambda kv: str(kv[0]))]
    series += [{"label": f"published: {model}", "published": True, "errors": {},
                "values": {c: cells[c] for c in columns if c in cells}}
               for model, cells in PUBLISHED.items() if any(c in cells for c in columns)]
    return {"title": SCORERS[scorer], "ylabel": "accuracy (%)", "groups": list(columns), "series": series,
            "baseline": {r["benchmark"]: (r.get("majority_baseline") or {}).get("accuracy") for r in rows},
            "baseline_label": "majority answer (constant)"}


# ---------------------------------------------------------------------------------- the loop
def evaluate(chat, job: dict, prompts: Prompts, settings: dict, output_dir: Path, progress: bool) -> dict:
    """Ask every (question, repeat) not yet answered, append each answer as it comes, then score."""
    items = job["items"]
    samples = _samples_file(output_dir, settings, job)
    out_dir = samples.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    # What changes an answer is hashed; how many questions (--limit) and repeats are asked is not, so
    # raising either tops up the same run (each answer's seed depends only on its question and repeat).
    run_hash = settings_hash({**{k: v for k, v in settings.items() if k != "repeats"}, "data": job["source"],
                              "templates": [prompts.template("qa_system"),
                                            prompts.template(qa.benchmark(job["dataset"]).template)]})
    prompts_now = {item.id: qa.render_prompt(item, prompts, settings["with_context"]) for item in items}
    done = _answered(samples, run_hash, prompts_now)
    todo = [(item, r) for item in items for r in range(settings["repeats"]) if (item.id, r) not in done]
    print(f"[eval] {job['dataset']}{'/' + job['subset'] if job['subset'] else ''}: {len(items)} questions "
          f"x {settings['repeats']} repeats from {job['source']}; {len(done)} answers on file, {len(todo)} to ask",
          file=sys.stderr, flush=True)
    system = prompts.render("qa_system")
    conversations = [[{"role": "system", "content": system}, {"role": "user", "content": prompts_now[item.id]}]
                     for item, _ in todo]
    seeds = [request_seed(settings["seed"], item.id, r) for item, r in todo]
    failures = 0
    bar = Progress(len(todo), _stem(job), enabled=progress and bool(todo))
    start = time.perf_counter()
    for index, reply in chat.stream(conversations, seeds=seeds):
        item, r = todo[index]
        if isinstance(reply, ModelCallError):
            failures += 1
            bar.failure()
            log.error("%s repeat %d: %s", item.id, r, reply)
        else:
            append_jsonl(samples, _sample_row(item, r, conversations[index][1]["content"], reply.text, run_hash,
                                              seeds[index]))
            bar.reply(reply)
    bar.close()
    wall = time.perf_counter() - start
    answers = _answered(samples, run_hash, prompts_now)
    results = _results(job, settings, list(answers.values()), run_hash, failures, wall, chat)
    write_json_atomic(out_dir / f"{_stem(job)}.results.json", results)
    _print_results(results)
    return results


def _results(job, settings, rows, run_hash, failures, wall, chat) -> dict:
    """The figures, from each question's answers on file scored NOW against the question as the data
    file has it (a corrected gold, another --cop_base: new verdicts from the stored answers)."""
    items = {i.id: i for i in job["items"]}
    rows = [{**row, **_verdicts(row["output"], items[row["id"]])} for row in rows if row["id"] in items]
    wanted = set(items)
    per_repeat = []
    for r in range(settings["repeats"]):
        got = [row for row in rows if row["repeat"] == r and row["id"] in wanted]
        if got:
            per_repeat.append({"repeat": r, "n": len(got),
                               "accuracy": _percent(sum(x["correct"] for x in got), len(got)),
                               "accuracy_reference": _percent(sum(x["correct_reference"] for x in got), len(got)),
                               "unparsed": sum(x["extracted"] is None for x in got)})
    label, share = qa.majority_baseline(job["items"])
    expected = len(job["items"]) * settings["repeats"]
    answered = sum(p["n"] for p in per_repeat)
    return {
        "benchmark": _stem(job), "dataset": job["dataset"], "subset": job["subset"], "source": job["source"],
        "source_sha256": job.get("source_sha256"),
        "model": settings["model"], "backend": settings["backend"], "n": len(job["items"]),
        "repeats": settings["repeats"], "complete": answered == expected, "missing_answers": expected - answered,
        "accuracy": _mean(per_repeat, "accuracy"), "accuracy_std": _std(per_repeat, "accuracy"),
        "accuracy_reference": _mean(per_repeat, "accuracy_reference"),
        "accuracy_reference_std": _std(per_repeat, "accuracy_reference"),
        "unparsed_answers": sum(p["unparsed"] for p in per_repeat),
        "majority_baseline": {"answer": label, "accuracy": round(100 * share, 2)},
        "gold_distribution": dict(sorted(Counter(i.gold for i in job["items"]).items())),
        "per_repeat": per_repeat, "failed_requests": failures, "wall_seconds": round(wall, 1),
        "backend_stats": chat.stats(), "settings": cli.public_settings(settings), "settings_hash": run_hash,
        "samples_file": f"{_stem(job)}.samples.jsonl",
    }


def _sample_row(item: qa.QAItem, repeat: int, prompt: str, output: str, run_hash: str, seed: int) -> dict:
    return {"id": item.id, "repeat": repeat, "seed": seed, "prompt": prompt, "output": output,
            **_verdicts(output, item), "settings_hash": run_hash}


def _verdicts(output: str, item: qa.QAItem) -> dict:
    """An answer scored against the question's gold by both scorers."""
    extracted = qa.extract_answer(output, item)
    return {"gold": item.gold, "extracted": extracted, "correct": extracted == item.gold,
            "correct_reference": qa.score_reference(output, item)}


def _answered(samples: Path, run_hash: str, prompts: dict[str, str]) -> dict[tuple[str, int], dict]:
    """(id, repeat) -> the answer on file to the question as it reads now: an answer to an edited
    question (another prompt under the same id) is not its answer, and is asked again; the latest
    of several answers wins."""
    return {(row["id"], row["repeat"]): row for row in answers_on_file(samples, run_hash, ("id", "repeat"))
            if row["id"] in prompts and row.get("prompt") == prompts[row["id"]]}


# ---------------------------------------------------------------------------------- setup helpers
def _job(dataset: str, name: str | None, data_file: str | None, limit: int | None, cop_base: int | None) -> dict:
    bench = qa.benchmark(dataset)
    subset = _subset(bench, name, data_file)
    items = qa.load_items(bench.name, name=name, data_file=data_file, cop_base=cop_base)
    if limit is not None:
        items = items[:int(limit)]
    if not items:
        raise InputError(f"{data_file or bench.hub_id}: no questions to evaluate")
    source = str(Path(data_file).resolve()) if data_file else f"hub:{bench.hub_id}"
    digest = hashlib.sha256(Path(data_file).read_bytes()).hexdigest()[:16] if data_file else None
    return {"dataset": bench.name, "subset": subset, "items": items, "source": source, "limit": limit,
            "source_sha256": digest}


def _subset(bench: qa.Benchmark, name: str | None, data_file: str | None) -> str | None:
    if bench.name == "MMLU":
        if name:
            return qa.mmlu_subject(name)
        return qa.mmlu_subject(Path(data_file).stem) if data_file else None
    if bench.name == "MedMCQA" and name and name not in qa.NO_SUBJECT_FILTER:
        return name
    return None


def _local_file(data_dir: str | None, dataset: str, subset: str | None) -> str | None:
    if not data_dir:
        return None
    patterns = LOCAL_FILES.get((dataset, subset)) or LOCAL_FILES.get((dataset, "*"), [])
    for pattern in patterns:
        if path := qa.find_ignoring_case(data_dir, pattern.format(s=subset)):
            return str(path)
    if subset is None:
        raise InputError(f"{data_dir}: no {' or '.join(patterns)} (the paper's {dataset} subset is not on the hub)")
    return None  # a subject / subset file that is not there comes from the hub


def _settings(model, backend, api_base, temperature, open_model, max_new_tokens, repeats, seed, with_context,
              dtype=None, device=None) -> dict:
    api_base = ",".join(endpoint_list(api_base)) or None  # one server, or replicas as a comma list
    kind = resolve_backend(model, backend, api_base)
    open_weights = kind != "openai" if open_model is None else bool(open_model)
    if temperature is None:  # the reference: 0 for API calls, 0.1 in its local pipeline
        temperature = 0.1 if open_weights else 0.0
        why = ("an open model: the reference's local pipeline used 0.1" if open_weights else
               "an API model, as the reference" + (" (a served open model: --open_model)" if api_base else ""))
        print(f"[eval] temperature {temperature} ({why}); --temperature sets another", file=sys.stderr, flush=True)
    fingerprint = keys.model_fingerprint(model) if kind == "hf" else None
    return {"model": model or "embedded:SmolLM2-135M-Instruct", "backend": kind, "api_base": api_base,
            # a local model retrained into the same folder is another model (hub ids and API names: none)
            **({"model_fingerprint": fingerprint} if fingerprint else {}),
            "temperature": float(temperature), "max_new_tokens": int(max_new_tokens), "repeats": int(repeats),
            "seed": int(seed), "with_context": bool(with_context),
            # local weights answer differently in another precision; a served model's is the server's
            "dtype": None if kind == "openai" else auto_dtype(dtype, device)}


def _backend(settings: dict, batch_size: int, dtype: str | None, device: str | None, api_key_env: str | None = None,
             request_timeout: float | None = None):
    model = None if settings["backend"] == "embedded" else settings["model"]
    chat = make_backend(model, settings["backend"], settings["api_base"], temperature=settings["temperature"],
                        max_new_tokens=settings["max_new_tokens"], seed=settings["seed"],
                        max_parallel=int(batch_size), max_batch_size=int(batch_size),
                        dtype=settings["dtype"], device=device, prefix_cache_gb=0, key_env=api_key_env,
                        request_timeout=request_timeout)
    return cli.checked(chat, "eval")


def _samples_file(output_dir: Path, settings: dict, job: dict) -> Path:
    return output_dir / model_tag(settings["model"]) / f"{_stem(job)}.samples.jsonl"


# ---------------------------------------------------------------------------------- small helpers
def _stem(job: dict) -> str:
    return job["dataset"] + (f"-{job['subset']}" if job["subset"] else "")


def _percent(k: int, n: int) -> float:
    return round(100 * k / n, 2)


def _mean(per_repeat: list[dict], key: str) -> float | None:
    return round(statistics.fmean(p[key] for p in per_repeat), 2) if per_repeat else None


def _std(per_repeat: list[dict], key: str) -> float | None:
    """Sample standard deviation over repeats (0 for a single run)."""
    values = [p[key] for p in per_repeat]
    return round(statistics.stdev(values), 2) if len(values) > 1 else (0.0 if values else None)


def _column_order(benchmark: str) -> tuple:
    main = [d for d, _ in MAIN_TABLE]
    return (0, main.index(benchmark)) if benchmark in main else (1, benchmark)


def _table(rows: list[dict], columns: list[str], scorer: str) -> list[str]:
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["benchmark"]] = r
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, cells in sorted(by_model.items()):
        lines.append(f"| {model} | " + " | ".join(_cell(cells.get(c), scorer) for c in columns) + " |")
    majority = {r["benchmark"]: r["majority_baseline"]["accuracy"] for r in rows}
    lines.append("| majority answer (constant) | " + " | ".join(f"{majority[c]:.2f}" for c in columns) + " |")
    return lines


def _cell(result: dict | None, scorer: str) -> str:
    if not result or result.get(scorer) is None:
        return "–"
    text = f"{result[scorer]:.2f} ± {result[scorer + '_std']:.2f}"
    notes = [] if result["complete"] else ["incomplete"]
    if result["repeats"] == 1:
        notes.append("1 run")
    return text + (f" ({', '.join(notes)})" if notes else "")


def _published_table() -> list[str]:
    columns = [d for d, _ in MAIN_TABLE]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, cells in PUBLISHED.items():
        lines.append(f"| {model} | " + " | ".join(f"{cells[c]:.2f}" for c in columns) + " |")
    return lines


def _print_results(r: dict) -> None:
    print(f"[eval] {r['benchmark']} ({r['model']}): accuracy {r['accuracy']} ± {r['accuracy_std']}, "
          f"accuracy_reference {r['accuracy_reference']} ± {r['accuracy_reference_std']}, n={r['n']} "
          f"x {r['repeats']}, majority baseline {r['majority_baseline']['accuracy']} "
          f"('{r['majority_baseline']['answer']}'), unparsed {r['unparsed_answers']}"
          + ("" if r["complete"] else f", INCOMPLETE: {r['missing_answers']} answers missing (re-run to retry)"),
          flush=True)


COMMANDS = {"run": run, "suite": suite, "report": report}


def _exit_code(command, out) -> int:
    if command is report:
        print(out)
        return 0
    results = [out] if command is run else list(out.values())
    return 0 if all(r["complete"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """`MedQA_eval.py [run] --model ...` (the paper's form), `suite ...` or `report ...`.
    Exit 0 when everything was answered, 1 when some requests failed, 2 on bad input."""
    return cli.main(COMMANDS, run, _exit_code, argv)


if __name__ == "__main__":
    sys.exit(main())
