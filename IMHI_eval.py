"""IMHI mental-health analysis (the MentaLLaMA benchmark): generation, labels, F1, explanation quality.

    python IMHI_eval.py --model path/to/MentaLLaMA-chat-7B --test_dataset IMHI --test_dir MentalLLaMA/test_data
    python IMHI_eval.py --model path/to/MentalBART --test_dataset IMHI-completion --test_dir MentalLLaMA/test_data
    python IMHI_eval.py --generated_dir MentalLLaMA/model_output/MentaLLaMA-chat-13B      # score only, no model
    python IMHI_eval.py report --output_dir outputs/imhi

As the reference `IMHI.py`: the raw `query` goes to the model with no chat template and no system
prompt, greedy, and the answer may run until prompt + answer reach 2048 tokens. Every answer is
labelled by both rule sets of `mentalarena.evaluation.imhi` side by side (`reference`: faithful; `fixed`:
corrected), optionally by the MentalBERT classifiers (`classifier`), and the explanations can be
scored against the goldens (BART-score, ROUGE, BLEU, BERTScore). Per-row answers go to
`<dataset>.samples.jsonl` (a re-run resumes from them), `generated/<dataset>.csv` is the
`goldens,generated_text` file of the MentaLLaMA tools, `<dataset>.results.json` holds the figures
and the settings that made them, and `report.md` one table for the model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import statistics
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from mentalarena import cli
from mentalarena.store import keys

from mentalarena.reports import figures

from mentalarena.evaluation import imhi
from mentalarena.engines.backends import make_backend
from mentalarena.engines.routes import endpoint_list, require_keys, resolve_backend
from mentalarena.errors import InputError, check_choice
from mentalarena.flags import check_numbers
from mentalarena.cli import answers_on_file, auto_dtype, names
from mentalarena.store.keys import model_tag, request_seed, settings_hash
from mentalarena.store.files import write_atomic
from mentalarena.store.jsonl import append_jsonl, write_json_atomic
from mentalarena.store.locks import hold_all
from mentalarena.progress import Progress
from mentalarena.engines.seq2seq_backend import REFERENCE_MAX_LENGTH, Seq2SeqBackend, is_encoder_decoder

log = logging.getLogger("imhi_eval")

ROOT = Path(__file__).resolve().parent
DEFAULT_TEST_DIR = ROOT / "data" / "imhi_sample"
EMBEDDED = "embedded:SmolLM2-135M-Instruct"
# --test_dataset -> where a MentaLLaMA checkout (or ../shared/data/imhi) keeps that set, first found wins.
TEST_SETS = {
    "IMHI": ("test_instruction", "test_data/test_instruction"),
    "IMHI-completion": ("test_complete", "test_data/test_complete"),
    "expert": ("expert", "test_instruction_expert", "test_data/test_instruction_expert",
               "human_evaluation/test_instruction_expert"),
}
EXPLANATION_METRICS = ("bart", "rouge", "bleu", "bertscore")
# Flags that change how a run goes, not its answers (iterate.py lets a re-run change them).
RUNNING_FLAGS = ("progress", "batch_size", "device", "request_timeout", "api_key_env")
# The classifier labels scored against the goldens as each rule set reads them: `reference` with
# label_inference.py's gold keywords (the MentaLLaMA paper's numbers), `fixed` with the fixed rules.
CLASSIFIER_SCORES = {"reference": "classifier", "fixed": "classifier_fixed"}
# The PyPI package each optional metric imports (module, package).
METRIC_PACKAGES = {"rouge": ("rouge_score", "rouge-score"), "bleu": ("sacrebleu", "sacrebleu"),
                   "bertscore": ("bert_score", "bert-score")}
# EVALUATION.md B (second-hand): MentaLLaMA-chat-13B, weighted F1 with the classifier labels.
PUBLISHED = {"DR": 85.68, "dreaddit": 75.79, "loneliness": 85.10, "Irf": 76.49, "MultiWD": 75.11,
             "SAD": 63.62, "CAMS": 45.52, "swmh": 71.70, "t-sid": 75.31}


@dataclass
class Job:
    """One dataset file of one test set: its rows, each with a key that changes when the row does."""
    test_set: str | None
    dataset: str
    path: Path
    rows: list[dict]


# ---------------------------------------------------------------------------------- commands
def run(
    # model
    model: str | None = None,          # None: the embedded SmolLM2-135M-Instruct; a path / org/name: hf or seq2seq; else OpenAI
    backend: str = "auto",            # auto | embedded | hf | seq2seq | openai (seq2seq: found from the config's is_encoder_decoder)
    api_base: str | None = None,      # an OpenAI-compatible server (vLLM, ...), or replicas as a comma list
    api_key_env: str | None = None,   # the environment variable with --api_base's key (None: none; the OpenAI API: OPENAI_API_KEY)
    request_timeout: float = 600.0,   # served models: seconds one request may take in all
    # data
    test_dataset: str = "IMHI",       # IMHI | IMHI-completion | expert, a comma list of them, or all
    test_dir: str | None = None,      # IMHI CSVs, or a folder with test_instruction/, test_complete/, expert/; None: data/imhi_sample
    datasets: str | None = None,      # comma list (CAMS,dreaddit); None: every CSV found, sorted by name
    limit: int | None = None,         # first N rows of each dataset
    generated_dir: str | None = None,  # score this folder of goldens,generated_text CSVs; no model is loaded
    # decoding
    prompting: str | None = None,     # raw (the reference: the query as is) | chat (the chat template); None: raw, chat for API models
    max_new_tokens: int | None = None,  # None: as the reference's max_length=2048, until prompt + answer reach 2048 tokens
    temperature: float = 0.0,         # 0: greedy
    batch_size: int = 32,             # local: sequences decoded together; API: requests in flight; also the scorers' batch
    seed: int = 0,
    dtype: str | None = "auto",       # local weights: auto (bfloat16 where the device has it, else float32) | float32 | ...
    device: str | None = None,
    # scoring
    rules: str = "reference,fixed",   # rule sets side by side: reference (faithful) and fixed (corrected)
    label_model_dir: str | None = None,  # <dir>/<dataset>/: one MentalBERT classifier per dataset; goldens read by each --rules set
    explanation_metrics: str | None = None,  # comma list of bart, rouge, bleu, bertscore; None: none
    bart_model: str | None = None,    # a local BART checkpoint for BART-score (the reference: bart-large-cnn + ParaBank2 weights)
    bertscore_model: str | None = None,  # a local BERT-style checkpoint for BERTScore
    # output
    output_dir: str = "outputs/imhi",
    progress: bool = True,
) -> list[dict]:
    """Generate answers for every chosen IMHI file and score them (or score `generated_dir`)."""
    check_numbers(run, dict(locals()))
    wanted = [_canonical(name) for name in names(datasets)]
    if generated_dir:
        jobs = [_generated_job(name, path, limit) for name, path in _select(Path(generated_dir), wanted)]
        scorers = Scorers(names(rules), label_model_dir, names(explanation_metrics), bart_model,
                          bertscore_model, [j.dataset for j in jobs], device, int(batch_size))
        out_dir = Path(output_dir) / model_tag(Path(generated_dir).resolve().name)
        results = [_score_generated(job, scorers, out_dir) for job in jobs]
        print(report(str(out_dir)))
        return results
    jobs = _test_jobs(test_dataset, test_dir, wanted, limit)
    scorers = Scorers(names(rules), label_model_dir, names(explanation_metrics), bart_model, bertscore_model,
                      sorted({j.dataset for j in jobs}), device, int(batch_size))
    settings = _settings(model, backend, api_base, prompting, temperature, max_new_tokens, seed, dtype, device)
    require_keys(settings, api_key_env)  # a key that is not there: found before anything is written
    print("[imhi] settings " + json.dumps(cli.public_settings(settings)), file=sys.stderr, flush=True)
    model_dir = Path(output_dir) / model_tag(settings["model"])
    samples = [model_dir / job.test_set / f"{job.dataset}.samples.jsonl" for job in jobs]
    results = []
    with ExitStack() as held:
        hold_all(held, samples)  # one writer per answers file
        for path in samples:  # answers of other settings on file stop the run before the model loads
            _answered(path, settings_hash(settings))
        chat = _backend(settings, int(batch_size), device, api_key_env, request_timeout)
        try:
            for job in jobs:
                generation = generate(chat, job, settings, model_dir / job.test_set, progress)
                results.append(_score_and_save(job, generation, scorers, model_dir / job.test_set, settings, chat))
        finally:
            chat.close()
    print(report(str(model_dir)))
    return results


def report(output_dir: str = "outputs/imhi", output_file: str | None = None) -> str:
    """One markdown table (rows: test set and dataset, columns: rule sets side by side) from every
    results JSON under `output_dir`, written to `output_file` (default `<output_dir>/report.md`), with
    a PNG beside it (`<report stem>_scores.png`, see `figure_panels`)."""
    check_numbers(report, dict(locals()))
    found = sorted(Path(output_dir).rglob("*.results.json"))
    if not found:
        raise InputError(f"{output_dir}: no *.results.json files (run an evaluation first)")
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in found]
    rows.sort(key=lambda r: (str(r.get("model")), str(r.get("test_set")), r["dataset"]))
    models = {str(r.get("model")) for r in rows}
    text = [f"# IMHI, {len(rows)} result files in {output_dir}", "",
            "Scores in %. `reference`: the reference's rules (faithful; rows whose golden they cannot read "
            "are dropped); `fixed`: the corrected rules; `classifier`: the MentalBERT classifiers' labels against the "
            "goldens read as the reference's label_inference.py reads them (the MentaLLaMA paper's numbers; rows "
            "whose golden it cannot read are dropped); `classifier_fixed`: the same labels, goldens read by the fixed rules. "
            "w-F1: weighted F1 (IMHI's main number); m-F1: macro F1 (micro F1 equals accuracy here and is "
            "kept in the results files); OOD: answers no rule reads, given the default label.", "",
            *_score_table(rows, show_model=len(models) > 1), ""]
    if any(r.get("explanations") for r in rows):
        text += ["## Explanation quality (golden vs generated)", "", *_explanation_table(rows), ""]
    text += ["Published (MentaLLaMA paper, second-hand): MentaLLaMA-chat-13B, weighted F1 with the classifier "
             "labels: " + ", ".join(f"{k} {v:.2f}" for k, v in PUBLISHED.items()) + ".", ""]
    target = Path(output_file) if output_file else Path(output_dir) / "report.md"
    figure = figures.score_bars(figure_panels(rows), target.with_name(f"{target.stem}_scores.png"),
                                f"IMHI, {len(rows)} result files in {output_dir}")
    text += [f"![IMHI scores]({figure.name}) `{figure.name}`: per dataset, each rule set's weighted F1 and "
             "accuracy (the table's numbers; one run, no error bars), the majority answer dashed, the published "
             "MentaLLaMA-chat-13B weighted F1 hatched (IMHI test sets only).", ""]
    markdown = "\n".join(text)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, markdown)
    return markdown


def figure_panels(rows: list[dict]) -> list[dict]:
    """What the report's figure draws (two `figures.score_bars` panels, weighted F1 then accuracy):
    per dataset (`set/dataset`), one bar per model and rule set with the table's number, the
    majority baseline of the first row of that dataset, and, for weighted F1, the published
    MentaLLaMA-chat-13B number where the dataset is one of the IMHI test set's."""
    several = len({str(r.get("model")) for r in rows}) > 1
    present = [rules for rules in SCORE_COLUMNS if any(rules in row.get("scores", {}) for row in rows)]
    groups = list(dict.fromkeys(_group(row) for row in rows))
    panels = []
    for key, title in (("weighted_f1", "weighted F1 (%)"), ("accuracy", "accuracy (%)")):
        series: dict[str, dict] = {}
        for row, rules in ((row, rules) for rules in present for row in rows):
            label = f"{row.get('model')}: {rules}" if several else rules
            entry = series.setdefault(label, {"label": label, "published": False, "values": {}, "errors": {}})
            entry["values"][_group(row)] = ((row.get("scores") or {}).get(rules) or {}).get(key)
        baseline: dict[str, float | None] = {}
        for row in rows:
            if baseline.get(_group(row)) is None:
                baseline[_group(row)] = (row.get("majority_baseline") or {}).get(key)
        published = [] if key != "weighted_f1" else [{
            "label": "published: MentaLLaMA-chat-13B (classifier)", "published": True, "errors": {},
            "values": {_group(r): PUBLISHED[r["dataset"]] for r in rows
                       if r["dataset"] in PUBLISHED and r.get("test_set") in (None, "IMHI")}}]
        panels.append({"title": title, "ylabel": title, "groups": groups, "series": list(series.values()) + published,
                       "baseline": baseline, "baseline_label": "majority answer (constant)"})
    return panels


def _group(row: dict) -> str:
    return f"{row['test_set']}/{row['dataset']}" if row.get("test_set") else row["dataset"]


# ---------------------------------------------------------------------------------- the loop
def generate(chat, job: Job, settings: dict, out_dir: Path, progress: bool) -> dict:
    """Ask every row not yet answered, append each answer as it comes, then rewrite the CSV from the
    answers on file (in row order; rows still unanswered are left out and counted)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = out_dir / f"{job.dataset}.samples.jsonl"
    run_hash = settings_hash(settings)
    done = _answered(samples, run_hash)
    todo = [row for row in job.rows if row["key"] not in done]
    print(f"[imhi] {job.test_set}/{job.dataset}: {len(job.rows)} rows from {job.path}; "
          f"{len(job.rows) - len(todo)} answers on file, {len(todo)} to ask", file=sys.stderr, flush=True)
    raw = settings["prompting"] == "raw"
    prompts = [row["query"] if raw else [{"role": "user", "content": row["query"]}] for row in todo]
    seeds = [request_seed(settings["seed"], job.dataset, row["key"]) for row in todo]
    bar = Progress(len(todo), f"{job.test_set}/{job.dataset}", enabled=progress and bool(todo))
    failures, start = 0, time.perf_counter()
    for index, reply in chat.stream(prompts, seeds=seeds, chat=not raw):
        row = todo[index]
        if isinstance(reply, Exception):
            failures += 1
            bar.failure()
            log.error("%s row %d: %s", job.dataset, row["row"], reply)
        else:
            append_jsonl(samples, {"row": row["row"], "key": row["key"], "seed": seeds[index], "query": row["query"],
                                   "golden": row["golden"], "generated_text": reply.text,
                                   "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                                   "truncated": reply.truncated, "settings_hash": run_hash})
            bar.reply(reply)
    bar.close()
    answers = _answered(samples, run_hash)
    answered = [answers[row["key"]] for row in job.rows if row["key"] in answers]
    imhi.write_generated_csv(out_dir / "generated" / f"{job.dataset}.csv",
                             [a["golden"] for a in answered], [a["generated_text"] for a in answered])
    return {"answers": answered, "failed_requests": failures, "wall_seconds": round(time.perf_counter() - start, 1),
            "settings_hash": run_hash, "samples_file": samples.name}


def _answered(samples: Path, run_hash: str) -> dict[str, dict]:
    """Row key -> the answer on file."""
    return {row["key"]: row for row in answers_on_file(samples, run_hash, ("key", "generated_text"))}


def _score_and_save(job: Job, generation: dict, scorers: Scorers, out_dir: Path, settings: dict, chat) -> dict:
    answers = generation["answers"]
    results = {
        "test_set": job.test_set, "dataset": job.dataset, "source": str(job.path.resolve()),
        "model": settings["model"], "backend": settings["backend"], "rows": len(job.rows), "answered": len(answers),
        "complete": len(answers) == len(job.rows), "missing_answers": len(job.rows) - len(answers),
        **(scorers.score(job.dataset, [a["golden"] for a in answers], [a["generated_text"] for a in answers])
           if answers else {"scores": {}}),
        "empty_outputs": sum(not a["generated_text"].strip() for a in answers),
        "truncated_prompts": sum(bool(a.get("truncated")) for a in answers),
        "failed_requests": generation["failed_requests"], "wall_seconds": generation["wall_seconds"],
        "backend_stats": chat.stats(), "settings": cli.public_settings(settings),
        "settings_hash": generation["settings_hash"],
        "files": {"samples": generation["samples_file"], "generated": f"generated/{job.dataset}.csv"},
    }
    write_json_atomic(out_dir / f"{job.dataset}.results.json", results)
    _print_results(results)
    return results


def _score_generated(job: Job, scorers: Scorers, out_dir: Path) -> dict:
    goldens, generated = [r["golden"] for r in job.rows], [r["generated_text"] for r in job.rows]
    results = {"test_set": job.test_set, "dataset": job.dataset, "source": str(job.path.resolve()), "model": None,
               "backend": None, "rows": len(job.rows), "answered": len(job.rows), "complete": True,
               "missing_answers": 0, **scorers.score(job.dataset, goldens, generated),
               "empty_outputs": sum(not g.strip() for g in generated)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / f"{job.dataset}.results.json", results)
    _print_results(results)
    return results


# ---------------------------------------------------------------------------------- scoring
class Scorers:
    """Everything that turns (goldens, generated texts) into figures: the rule sets, the optional
    classifiers and explanation metrics. Checked up front (before any model loads); the scoring
    models are loaded once, at first use, and shared by every dataset."""

    def __init__(self, rules: list[str], label_model_dir: str | None, metrics: list[str], bart_model: str | None,
                 bertscore_model: str | None, datasets: list[str], device: str | None, batch_size: int):
        if not rules:
            raise InputError(f"--rules must name at least one of {', '.join(imhi.RULES)}")
        for name in rules:
            check_choice("rules", name, imhi.RULES)
        for name in metrics:
            check_choice("explanation_metrics", name, EXPLANATION_METRICS)
        self.rules, self.metrics, self.batch_size = list(dict.fromkeys(rules)), list(dict.fromkeys(metrics)), batch_size
        self.device = device
        self.classifiers = {d: _model_folder(Path(label_model_dir), d) for d in datasets} if label_model_dir else None
        self.bart_model = _checkpoint("bart_model", bart_model, "bart" in self.metrics)
        self.bertscore_model = _checkpoint("bertscore_model", bertscore_model, "bertscore" in self.metrics)
        for metric in self.metrics:
            if metric in METRIC_PACKAGES and importlib.util.find_spec(METRIC_PACKAGES[metric][0]) is None:
                raise InputError(f"--explanation_metrics {metric} needs the PyPI package {METRIC_PACKAGES[metric][1]}: "
                                 f"pip install {METRIC_PACKAGES[metric][1]}")
        self._loaded: dict[str, object] = {}

    def score(self, dataset: str, goldens: list[str], generated: list[str]) -> dict:
        """{"scores": {rule set: metrics}, "majority_baseline", "warnings"[, "explanations"]}."""
        out: dict = {"scores": {}}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for rules in self.rules:
                out["scores"][rules] = _guarded(dataset, rules, lambda r=rules: imhi.score(dataset, goldens, generated, r))
            if self.classifiers:
                predicted = self.classify(dataset, generated)
                for rules in self.rules:  # the goldens read by each rule set, as the rule labels
                    out["scores"][CLASSIFIER_SCORES[rules]] = _guarded(
                        dataset, f"classifier ({rules} goldens)",
                        lambda r=rules: imhi.classifier_score(dataset, goldens, predicted, r))
            out["majority_baseline"] = _guarded(dataset, "majority", lambda: imhi.majority_baseline(dataset, goldens))
        out["warnings"] = [str(w.message) for w in caught]
        for message in out["warnings"]:
            log.warning("%s", message)
        if self.metrics:
            out["explanations"] = self._explanations(goldens, generated)
        return out

    # ---- classifier labels (the reference's label_inference.py)
    def classify(self, dataset: str, texts: list[str]) -> list[int]:
        """Rule label ids from `<label_model_dir>/<dataset>`: argmax over the first 512 tokens of the
        generated text alone."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder, mapping = self.classifiers[dataset], imhi.CLASSIFIER_LABELS[dataset]
        device = self._device()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
        ids = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                  max_length=512, return_tensors="pt").to(device)
                ids += model(**batch).logits.argmax(-1).tolist()
        return [mapping[i] for i in ids]

    # ---- explanation quality (the reference's score.py)
    def _explanations(self, goldens: list[str], generated: list[str]) -> dict:
        out = {"n": len(goldens)}
        if "bart" in self.metrics:
            out["bart_score"] = round(statistics.fmean(self.bart_scores(goldens, generated)), 4)
        if "rouge" in self.metrics:
            out.update(rouge(goldens, generated))
        if "bleu" in self.metrics:
            out["bleu"] = bleu(goldens, generated)
        if "bertscore" in self.metrics:
            out["bertscore_f1"] = round(100 * statistics.fmean(self.bertscore_f1(goldens, generated)), 2)
        return out

    def bart_scores(self, goldens: list[str], generated: list[str]) -> list[float]:
        """Log-likelihood per token of the golden given the generated text (the reference's direction)."""
        from mentalarena.engines.seq2seq_backend import load_seq2seq, target_log_likelihood

        if "bart" not in self._loaded:
            self._loaded["bart"] = load_seq2seq(self.bart_model, self._device(), "float32")
        tokenizer, model = self._loaded["bart"]
        return target_log_likelihood(model, tokenizer, generated, goldens, batch_size=4)

    def bertscore_f1(self, goldens: list[str], generated: list[str]) -> list[float]:
        """BERTScore F1 per pair; an empty answer scores 0, as bert_score itself rules (its own code
        for empty strings fails with transformers 5, so they never reach it)."""
        if "bertscore" not in self._loaded:
            from bert_score import BERTScorer
            from bert_score.utils import model2layers
            from transformers import AutoConfig

            layers = model2layers.get(Path(self.bertscore_model).name) or AutoConfig.from_pretrained(
                self.bertscore_model).num_hidden_layers
            self._loaded["bertscore"] = BERTScorer(model_type=self.bertscore_model, num_layers=layers,
                                                   batch_size=self.batch_size, device=self._device())
        keep = [i for i, text in enumerate(generated) if text.strip()]
        f1 = [0.0] * len(generated)
        if keep:
            _, _, scores = self._loaded["bertscore"].score([generated[i] for i in keep], [goldens[i] for i in keep])
            for i, value in zip(keep, scores.tolist()):
                f1[i] = value
        return f1

    def _device(self) -> str:
        import torch
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def rouge(goldens: list[str], generated: list[str]) -> dict:
    """ROUGE-1/2/L F-measure (rouge-score, no stemming as `evaluate`'s default), mean over pairs, x100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    pairs = [scorer.score(g, p) for g, p in zip(goldens, generated)]
    return {key: round(100 * statistics.fmean(s[key].fmeasure for s in pairs), 2) for key in ("rouge1", "rouge2", "rougeL")}


def bleu(goldens: list[str], generated: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokens, up to 4-grams, no smoothing: `evaluate`'s "bleu"), 0-100."""
    from sacrebleu.metrics import BLEU

    return round(BLEU(smooth_method="none").corpus_score(generated, [goldens]).score, 2)


def _guarded(dataset: str, what: str, compute):
    """A score, or None with a warning when no row is left to score (every golden unreadable)."""
    try:
        return compute()
    except ValueError as err:
        warnings.warn(f"{dataset}: no {what} score ({err})", stacklevel=2)
        return None


# ---------------------------------------------------------------------------------- setup helpers
def _test_jobs(test_dataset, test_dir: str | None, wanted: list[str], limit: int | None) -> list[Job]:
    sets = names(test_dataset)
    sets = list(TEST_SETS) if sets == ["all"] else sets
    if not sets:
        raise InputError(f"--test_dataset must name one of {', '.join(TEST_SETS)} (or all)")
    for name in sets:
        check_choice("test_dataset", name, tuple(TEST_SETS))
    jobs = []
    for name in dict.fromkeys(sets):
        folder = _test_folder(Path(test_dir) if test_dir else DEFAULT_TEST_DIR, name, several=len(sets) > 1)
        for dataset, path in _select(folder, wanted):
            rows = imhi.read_imhi_csv(path)[:int(limit) if limit else None]
            jobs.append(Job(name, dataset, path, [{"row": i, "key": _row_key(i, r["query"], r["golden"]), **r}
                                                  for i, r in enumerate(rows)]))
    return jobs


def _test_folder(root: Path, test_set: str, several: bool) -> Path:
    """The folder of one test set: `root` itself when it holds CSV files, else its subfolder."""
    if not root.is_dir():
        raise InputError(f"{root}: --test_dir is not a folder")
    if _csv_files(root):
        if several:
            raise InputError(f"{root}: holds CSV files itself, so it is one test set; name one --test_dataset, "
                             f"or give a folder with {', '.join(s[0] + '/' for s in TEST_SETS.values())}")
        return root
    for sub in TEST_SETS[test_set]:
        if (root / sub).is_dir():
            return root / sub
    raise InputError(f"{root}: no CSV files, and no {' or '.join(s + '/' for s in TEST_SETS[test_set])} "
                     f"folder for --test_dataset {test_set}")


def _select(folder: Path, wanted: list[str]) -> list[tuple[str, Path]]:
    """(dataset, file) pairs: the `wanted` ones in that order, else every CSV sorted by name; other
    files (README.md, results) are skipped."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    files = _csv_files(folder)
    if not files:
        raise InputError(f"{folder}: no CSV files (expected IMHI files such as CAMS.csv, dreaddit.csv)")
    if not wanted:
        return [(imhi.dataset_name(path), path) for path in files]
    by_name = {path.name.split(".")[0].lower(): path for path in files}
    missing = [name for name in wanted if name.lower() not in by_name]
    if missing:
        raise InputError(f"{folder}: no {', '.join(m + '.csv' for m in missing)} "
                         f"(found: {', '.join(p.name for p in files)})")
    return [(name, by_name[name.lower()]) for name in wanted]


def _csv_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".csv")


def _canonical(name: str) -> str:
    known = {n.lower(): n for n in imhi.DATASETS}
    if name.lower() not in known:
        raise InputError(f"--datasets: unknown IMHI dataset {name!r} (known: {', '.join(imhi.DATASETS)})")
    return known[name.lower()]


def _generated_job(dataset: str, path: Path, limit: int | None) -> Job:
    goldens, generated = imhi.read_generated_csv(path)
    pairs = list(zip(goldens, generated))[:int(limit) if limit else None]
    return Job(None, dataset, path, [{"row": i, "golden": g, "generated_text": t} for i, (g, t) in enumerate(pairs)])


def _model_folder(root: Path, dataset: str) -> Path:
    """`<root>/<dataset>/`, a classifier with as many labels as the dataset has (checked here, from
    its config, so that a wrong folder stops the run before any model loads)."""
    if not root.is_dir():
        raise InputError(f"{root}: --label_model_dir is not a folder")
    folder = next((root / n for n in (dataset, dataset.lower()) if (root / n / "config.json").is_file()), None)
    if folder is None:
        raise InputError(f"{root}: no classifier for {dataset} (expected {root / dataset}/config.json, "
                         "the layout of the MentalBERT classifiers)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{folder / 'config.json'}: unreadable ({err})") from None
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != len(imhi.CLASSIFIER_LABELS[dataset]):
        raise InputError(f"{folder}: a classifier with {labels} labels; {dataset} needs {len(imhi.CLASSIFIER_LABELS[dataset])}")
    return folder


def _checkpoint(flag: str, path: str | None, needed: bool) -> str | None:
    if not needed:
        return path
    if not path:
        raise InputError(f"--explanation_metrics {flag.split('_')[0]} needs --{flag} (a local checkpoint folder)")
    if not Path(path, "config.json").is_file():
        raise InputError(f"--{flag} {path}: no config.json there (a local checkpoint folder is needed)")
    return path


def _settings(model, backend, api_base, prompting, temperature, max_new_tokens, seed, dtype, device) -> dict:
    api_base = ",".join(endpoint_list(api_base)) or None  # one server, or replicas as a comma list
    kind = _resolve_backend(model, backend, api_base)
    prompting = prompting or ("chat" if kind == "openai" else "raw")
    check_choice("prompting", prompting, ("raw", "chat"))
    if kind == "openai" and prompting == "raw":
        raise InputError("--prompting raw needs a local model (an API takes chat messages); use --prompting chat")
    if kind == "seq2seq" and prompting == "chat":
        raise InputError("--prompting chat needs a chat model; an encoder-decoder reads the raw query")
    fingerprint = keys.model_fingerprint(model) if kind in ("hf", "seq2seq") else None
    return {"model": model or EMBEDDED, "backend": kind, "api_base": api_base, "prompting": prompting,
            # a local model retrained into the same folder is another model (hub ids and API names: none)
            **({"model_fingerprint": fingerprint} if fingerprint else {}),
            "temperature": float(temperature), "max_new_tokens": None if max_new_tokens is None else int(max_new_tokens),
            "seed": int(seed), "dtype": None if kind == "openai" else auto_dtype(dtype, device)}


def _resolve_backend(model: str | None, backend: str, api_base: str | None) -> str:
    """The shared rule, plus seq2seq: named, or a local/hub model whose config is an encoder-decoder."""
    if backend == "seq2seq":
        if not model:
            raise InputError("--backend seq2seq needs --model (a MentalBART / MentalT5 style checkpoint)")
        return "seq2seq"
    kind = resolve_backend(model, backend, api_base)
    return "seq2seq" if kind == "hf" and is_encoder_decoder(model) else kind


def _backend(settings: dict, batch_size: int, device: str | None, api_key_env: str | None = None,
             request_timeout: float | None = None):
    common = dict(temperature=settings["temperature"], seed=settings["seed"], device=device, dtype=settings["dtype"])
    if settings["backend"] == "seq2seq":
        return Seq2SeqBackend(settings["model"], max_new_tokens=settings["max_new_tokens"],
                              max_batch_size=batch_size, **common)
    # None: the reference's max_length=2048, i.e. prompt + answer bounded by 2048 tokens (API: 2048 new tokens)
    reference = settings["max_new_tokens"] is None
    model = None if settings["backend"] == "embedded" else settings["model"]
    chat = make_backend(model, settings["backend"], settings["api_base"], max_parallel=batch_size,
                        max_batch_size=batch_size, prefix_cache_gb=0,
                        max_new_tokens=REFERENCE_MAX_LENGTH if reference else settings["max_new_tokens"],
                        max_context_tokens=REFERENCE_MAX_LENGTH if reference and settings["backend"] != "openai" else None,
                        key_env=api_key_env, request_timeout=request_timeout, **common)
    return cli.checked(chat, "imhi")


# ---------------------------------------------------------------------------------- small helpers
def _row_key(index: int, query: str, golden: str) -> str:
    """Row number plus a digest of its text: an edited test file re-asks exactly the rows that changed."""
    digest = hashlib.sha256((query + "\0" + golden).encode()).hexdigest()[:12]
    return f"{index}:{digest}"


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


SCORE_COLUMNS = {"reference": ("acc", "w-F1", "m-F1", "OOD", "dropped"), "fixed": ("acc", "w-F1", "m-F1", "OOD"),
                 "classifier": ("acc", "w-F1", "m-F1", "dropped"), "classifier_fixed": ("acc", "w-F1", "m-F1")}
_KEYS = {"acc": "accuracy", "w-F1": "weighted_f1", "m-F1": "macro_f1", "OOD": "ood", "dropped": "dropped"}


def _score_table(rows: list[dict], show_model: bool) -> list[str]:
    present = [r for r in SCORE_COLUMNS if any(r in row.get("scores", {}) for row in rows)]
    head = (["model"] if show_model else []) + ["set", "dataset", "rows"]
    head += [f"{rules} {c}" for rules in present for c in SCORE_COLUMNS[rules]] + ["majority acc", "majority w-F1"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        cells = ([str(row.get("model"))] if show_model else []) + [row.get("test_set") or "–", row["dataset"]]
        cells.append(f"{row['answered']}" + ("" if row["complete"] else f" of {row['rows']} (incomplete)"))
        for rules in present:
            scores = row.get("scores", {}).get(rules) or {}
            cells += [_fmt(scores.get(_KEYS[c])) for c in SCORE_COLUMNS[rules]]
        majority = row.get("majority_baseline") or {}
        cells += [_fmt(majority.get("accuracy")), _fmt(majority.get("weighted_f1"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _explanation_table(rows: list[dict]) -> list[str]:
    keys = [("bart_score", "BART-score"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"),
            ("bleu", "BLEU"), ("bertscore_f1", "BERTScore F1")]
    keys = [(k, title) for k, title in keys if any(k in (r.get("explanations") or {}) for r in rows)]
    lines = ["| set | dataset | " + " | ".join(t for _, t in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for row in rows:
        if row.get("explanations"):
            values = [_fmt(row["explanations"].get(k), 4 if k == "bart_score" else 2) for k, _ in keys]
            lines.append(f"| {row.get('test_set') or '–'} | {row['dataset']} | " + " | ".join(values) + " |")
    return lines


def _print_results(r: dict) -> None:
    parts = [f"{rules} acc {s['accuracy']} w-F1 {s['weighted_f1']} OOD {s['ood']}"
             + (f" dropped {s['dropped']}" if s.get("dropped") else "")
             for rules, s in r.get("scores", {}).items() if s]
    majority = r.get("majority_baseline") or {}
    print(f"[imhi] {r.get('test_set') or 'scored'}/{r['dataset']}: {r['answered']} rows; " + "; ".join(parts)
          + (f"; majority w-F1 {majority['weighted_f1']}" if majority else "")
          + ("" if r["complete"] else f"; INCOMPLETE: {r['missing_answers']} rows missing (re-run to retry)"),
          flush=True)


COMMANDS = {"run": run, "report": report}


def _exit_code(command, out) -> int:
    if command is report:
        print(out)
        return 0
    return 0 if all(r["complete"] for r in out) else 1


def main(argv: list[str] | None = None) -> int:
    """`IMHI_eval.py [run] --model ...` or `report --output_dir ...`. Exit 0 when every row was
    answered, 1 when some requests failed, 2 on bad input."""
    return cli.main(COMMANDS, run, _exit_code, argv)


if __name__ == "__main__":
    sys.exit(main())
