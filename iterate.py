"""The self-play loop (METHOD.md §1): generate -> fine-tune -> evaluate, N times; each iteration's
fine-tuned model is the next iteration's base model.

    # open models (default): the embedded SmolLM2, one short iteration on a CPU (the README has the whole command)
    python iterate.py --work_dir outputs/iterate_demo --iterations 1 --limit 2 --max_steps 5 --eval_limit 4 ...
    # the paper's Llama run: 4 iterations of 4, 5, 7, 7 epochs (QLoRA on CUDA), GPT-4-turbo as the judge
    python iterate.py --work_dir runs/llama --base_model meta-llama/Meta-Llama-3.1-8B-Instruct \\
        --judge_model gpt-4-turbo-2024-04-09 --patients_file ... --qa_data_dir ... --imhi_test_dir ...
    # the paper's GPT run: 2 iterations of 4 and 6 epochs through OpenAI fine-tuning
    python iterate.py --work_dir runs/gpt --backend openai --patients_file ...
    # Table 2 in one command: everything the paper's run used, only the data paths to give
    python iterate.py --preset paper_llama --work_dir runs/llama --patients_file ... --qa_data_dir ... --imhi_test_dir ...
    python iterate.py --preset paper_gpt --work_dir runs/gpt --patients_file ... --qa_data_dir ... --imhi_test_dir ...
    # preference learning instead of SFT (issue 12): DPO on the try-and-reflect pairs
    python iterate.py --work_dir runs/llama_dpo --objective dpo --finetune_args '{"beta": 0.1}' ...
    python iterate.py --work_dir runs/gpt_dpo --backend openai --objective dpo ...   # from gpt-4.1-mini-2025-04-14

Each step is one of the project's scripts, run in a child process: arena_med.py (generate),
llama_finetune.py --merge or data_process.py --wait (fine-tune), MedQA_eval.py, IMHI_eval.py and
(opt-in, --eval ...,counsel) Counsel_eval.py (evaluate). A child process gives all of its memory back
when it ends (a GPU's too), and a crash in a stage cannot take the loop down with it. Everything
lives under --work_dir:

    state.json                  each step: status, the stage commands (its settings), outputs, figures
    summary.md                  the table printed at the end
    summary.png                 its figure: each benchmark (and the train loss) by iteration
    iter0/eval/{qa,imhi,counsel}/  the starting model (--eval_base)
    iterK/records.jsonl         self-play records of iteration K (made by the model of iteration K-1)
    iterK/model/                adapter, finetune_config.json and merged/ (open models)
    iterK/finetune.openai.jsonl the uploaded data, and .job.json with the job (OpenAI; DPO: .openai_dpo.jsonl)
    iterK/eval/{qa,imhi,counsel}/  the evaluations of the model of iteration K

Re-running the same command resumes at the first unfinished step, and the step itself resumes (its
records, checkpoints or answers). Settings that differ from those a recorded step ran with are
refused, unless --restart discards that step's outputs and those that depend on them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fire.parser import DefaultParseValue

import arena_med
import data_process
import Counsel_eval
import IMHI_eval
import llama_finetune
import MedQA_eval
from mentalarena import cli
from mentalarena.reports import figures
from mentalarena.loop import paper
from mentalarena.cli import has_credentials, names, public_url
from mentalarena.engines.routes import judge_route, require_credentials, route
from mentalarena.errors import InputError, check_choice
from mentalarena.flags import check_numbers
from mentalarena.store.files import write_atomic
from mentalarena.store.jsonl import read_jsonl, write_json_atomic
from mentalarena.store.locks import OutputLock
from mentalarena.training.sft import WORDINGS

ROOT = Path(__file__).resolve().parent
BACKENDS = ("open", "openai")
PAPER_EPOCHS = {"open": (4, 5, 7, 7), "openai": (4, 6)}  # METHOD.md §1: the Llama and the GPT-3.5 runs
# --objective: sft (the paper), dpo (preference pairs from the try-and-reflect scores), sft+dpo (both,
# open models only: one llama_finetune.py run). OpenAI fine-tunes one method per job (data_process --method).
OBJECTIVES = ("sft", "dpo", "sft+dpo")
OPENAI_DATA = {"sft": "finetune.openai.jsonl", "dpo": "finetune.openai_dpo.jsonl"}  # iterK/<this>, per method
# the stages' preference-pair flags: refused in --finetune_args when --objective sft would ignore them
PREFERENCE_FLAGS = ("min_margin", "all_pairs", "diagnosis_pairs", "diagnosis_margin", "beta", "dpo_lr", "dpo_nepoch",
                    "dpo_loss")
STEPS = ("generate", "finetune", "eval_qa", "eval_imhi", "eval_counsel")
EVALS = {"qa": "eval_qa", "imhi": "eval_imhi", "counsel": "eval_counsel"}  # counsel: opt-in (it needs a judge)
QA_SAMPLES = (("MedQA", ROOT / "data" / "qa_sample" / "medqa.jsonl"),
              ("PubMedQA", ROOT / "data" / "qa_sample" / "pubmedqa.jsonl"))
STOP_WAIT = 30  # seconds a stage gets to stop by itself after Ctrl-C (a checkpoint being saved)
WORK = "<work_dir>"  # how state.json writes paths inside --work_dir, so the folder can move
# Each stage's flags that change how a step runs, not what it makes (the stage says which): a re-run may
# change them. A training batch size is not one of them: it changes the model.
RUNNING_FLAGS = {"arena_med.py": arena_med.RUNNING_FLAGS, "llama_finetune.py": llama_finetune.RUNNING_FLAGS,
                 "data_process.py": data_process.RUNNING_FLAGS, "MedQA_eval.py": MedQA_eval.RUNNING_FLAGS,
                 "IMHI_eval.py": IMHI_eval.RUNNING_FLAGS, "Counsel_eval.py": Counsel_eval.RUNNING_FLAGS}
# The flags the loop sets for a stage's outputs: never compared by content (they are what the step makes).
OUTPUT_FLAGS = frozenset({"output_file", "output_dir", "finetune_file", "new_name"})
IMHI_RULE_PREFERENCE = ("classifier", "classifier_fixed", "fixed", "reference")  # the summary's w-F1: the paper's labels first
SUMMARY_FIGURE = "summary.png"  # beside summary.md: each benchmark by iteration


@dataclass
class Call:
    """One run of a stage script: `python <script> [command] --key=value ...`."""
    script: str
    args: dict
    command: str | None = None

    def argv(self) -> list[str]:
        """The stage's command line. A server address with credentials in it is passed as
        `env:<variable>` (see `secrets`), so no user:password ever shows in the process list."""
        flags = [f"--{key}={_flag_value(f'env:{_secret_variable(key)}' if _secret_url(key, value) else value)}"
                 for key, value in self.args.items() if value is not None]
        return ([self.command] if self.command else []) + flags

    def secrets(self) -> dict[str, str]:
        """The environment the stage needs for the addresses `argv` names by variable."""
        return {_secret_variable(key): value for key, value in self.args.items() if _secret_url(key, value)}

    def shown(self, work_dir: Path) -> str:
        """The command as printed: paths under --work_dir relative to the current folder, no credentials."""
        here = os.path.relpath(work_dir)
        here = str(work_dir) if here.startswith("..") else here
        args = {key: here + value[len(WORK):] if isinstance(value, str) and value.startswith(WORK) else value
                for key, value in self.record(work_dir)["args"].items()}
        return shlex.join([self.script, *Call(self.script, args, self.command).argv()])

    def record(self, work_dir: Path) -> dict:
        """The call as state.json keeps it: JSON types, paths under --work_dir relative, no credentials."""
        args = {key: _portable(value, work_dir) for key, value in self.args.items() if value is not None}
        return json.loads(json.dumps({"script": self.script, "command": self.command, "args": args}))


@dataclass
class Plan:
    """The resolved flags: what every step of every iteration runs."""
    work_dir: Path
    backend: str
    base_model: str | None
    epochs: list
    objective: str
    evals: list[str]
    eval_base: bool
    api_base: str | None
    api_key_env: str | None
    qa_data_dir: str | None
    imhi_test_dir: str | None
    counsel_data: str | None
    arena: dict
    finetune: dict
    qa: dict
    imhi: dict
    counsel: dict
    launcher: list[str] | None
    preset: str | None = None  # --preset: the summary adds Table 2's layout

    @property
    def state_file(self) -> Path:
        return self.work_dir / "state.json"

    def steps(self) -> list[tuple[int, str]]:
        order = [(0, step) for step in self.evals] if self.eval_base else []
        for k in range(1, len(self.epochs) + 1):
            order += [(k, "generate"), (k, "finetune")] + [(k, step) for step in self.evals]
        return order


class StepFailed(Exception):
    """A stage ended badly; `code` is the loop's exit status (2: the stage rejected its input)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def run_stage(script: str, argv: list[str], launcher: list[str] | None = None) -> int:
    """Run one stage script in a child process (the tests replace this function); its exit status."""
    child = subprocess.Popen([*(launcher or [sys.executable]), str(ROOT / script), *argv])
    try:
        return child.wait()
    except KeyboardInterrupt:
        _let_stop(child, script)
        raise


def _let_stop(child: subprocess.Popen, script: str) -> None:
    """After Ctrl-C (which the child got too): give it time to finish a checkpoint or a row and stop by
    itself, where `subprocess.run` would kill it 0.25 s later; killed after STOP_WAIT s or a second Ctrl-C."""
    print(f"[iterate] waiting up to {STOP_WAIT} s for {script} to stop (it may be saving); "
          "Ctrl-C again to kill it now", file=sys.stderr, flush=True)
    try:
        child.wait(timeout=STOP_WAIT)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def run(
    work_dir: str | None = None,       # every output and state.json go here (required)
    preset: str | None = None,         # paper_llama | paper_gpt: every setting of the paper's run (Table 2);
                                       #   a flag given with another value than its default overrides it
    backend: str = "open",             # open: llama_finetune.py (merged models); openai: data_process.py --wait
    base_model: str | None = None,     # iteration 1's model; None: the embedded SmolLM2 (open), gpt-3.5-turbo-0125 (openai)
    iterations: int | None = None,     # None: one per value of the epoch schedule
    epochs: str | tuple | int | None = None,  # per iteration, comma list; None: the paper's 4,5,7,7 (open) or 4,6 (openai)
    # self-play (arena_med.py)
    patients_file: str | None = None,  # Patient-Psi-CM JSON list; None: the bundled samples
    principles_file: str | None = None,  # roleplay-doh CSV (the paper: roleplay-doh_filtered.csv); None: the bundled sample
    limit: int | None = None,          # first N patients
    num_samples: int | None = None,    # sessions per patient
    judge_model: str | None = None,    # the helper calls (paper: gpt-4-turbo-2024-04-09); None: the model itself
    api_base: str | None = None,       # openai backend: an OpenAI-compatible server for every stage
    api_key_env: str | None = None,    # the environment variable with --api_base's key (None: none; the OpenAI API
                                       #   always gets OPENAI_API_KEY, no other server does)
    # fine-tuning (llama_finetune.py)
    method: str | None = None,         # auto (qlora on CUDA, else lora) | qlora | lora | full
    max_steps: int | None = None,      # optimizer steps per iteration (overrides the epochs)
    sft_questions: str | None = None,  # the fine-tuning questions: None / reference (the reference's) | project
    objective: str = "sft",            # sft (the paper) | dpo | sft+dpo (open only): llama_finetune.py --objective,
                                       # data_process.py --method; pair flags (beta, min_margin, ...) in --finetune_args
    finetune_launcher: str | None = None,  # e.g. "accelerate launch --num_processes 4"; None: this python
    # evaluation (MedQA_eval.py, IMHI_eval.py, Counsel_eval.py)
    eval: str | tuple = "qa,imhi",     # comma list of qa, imhi, counsel (opt-in: it needs a judge), or none
    eval_limit: int | None = None,     # first N questions / rows of every evaluated set
    eval_base: bool = True,            # also evaluate the starting model (iteration 0)
    qa_data_dir: str | None = None,    # the paper's data/ layout (MedQA_eval.py suite); None: data/qa_sample
    imhi_test_dir: str | None = None,  # IMHI test CSVs or folders; None: data/imhi_sample
    counsel_data: str | None = None,   # client statements (Counsel_eval.py --data_file); None: data/counsel_sample.jsonl
    prompt_dir: str | None = None,     # a folder of edited prompts/*.txt, for every stage that reads prompts
    # anything else, given to the stage as its flags
    arena_args: dict | None = None,    # e.g. '{"max_new_tokens": 32, "max_tries": 2}'
    finetune_args: dict | None = None,
    qa_args: dict | None = None,
    imhi_args: dict | None = None,
    counsel_args: dict | None = None,  # its judge: counsel_args' judge_model, else --judge_model where it runs where the
                                       #   evaluated model runs, else the starting model (see _counsel_judge)
    restart: bool = False,             # discard the outputs of steps whose settings changed (and of what depends on them)
) -> dict:
    """Run (or resume) every step of every iteration; returns the summary rows and the exit status."""
    flags = dict(locals())
    check_numbers(run, flags)
    chosen = apply_preset(flags) if preset else None
    plan = make_plan(**flags)
    if chosen:
        print(preset_listing(chosen, flags, plan), flush=True)
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    with OutputLock(plan.state_file):  # one loop per work directory
        return _run(plan, flags, restart)


def _run(plan: Plan, flags: dict, restart: bool) -> dict:
    state = load_state(plan.state_file)
    check_recorded(plan, state, restart)
    state["settings"] = {key: _portable(value, plan.work_dir) for key, value in flags.items()}
    _save(plan, state)
    print(f"[iterate] {plan.backend} backend, objective {plan.objective}, {len(plan.epochs)} iteration(s), epochs "
          f"{','.join(map(str, plan.epochs))}, evaluations {', '.join(plan.evals).replace('eval_', '') or 'none'} "
          f"-> {plan.work_dir}",
          flush=True)
    for line in data_routes(plan):
        print(f"[iterate] where the data goes: {line}", flush=True)
    failure = None
    for iteration, step in plan.steps():
        entry = state["steps"].get(_key(iteration, step))
        if entry and entry["status"] == "done":
            print(f"[iterate] iteration {iteration} {step}: done earlier ({_brief(entry['outputs'])}); skipped", flush=True)
            continue
        try:
            execute(plan, state, iteration, step)
        except StepFailed as exc:
            failure = exc
            break
    rows = summary_rows(plan, state)
    figure = figures.iteration_lines(summary_figure_panels(rows), plan.work_dir / SUMMARY_FIGURE,
                                     f"MentalArena iterations in {plan.work_dir}")
    markdown = summary_markdown(plan, rows) + f"\nFigure: [{figure.name}]({figure.name}), each benchmark by iteration.\n"
    write_atomic(plan.work_dir / "summary.md", markdown)
    print(markdown, flush=True)
    return {"exit_code": failure.code if failure else 0, "error": str(failure) if failure else None,
            "rows": rows, "state_file": str(plan.state_file)}


# ---------------------------------------------------------------------------------- the steps
def execute(plan: Plan, state: dict, iteration: int, step: str) -> None:
    """Run one step's stage calls, record it as running, then as done with its figures (or failed)."""
    model = model_of(plan, state, iteration if step.startswith("eval") else iteration - 1)
    calls = calls_for(plan, iteration, step, model)
    key = _key(iteration, step)
    state["steps"][key] = {"iteration": iteration, "step": step, "status": "running",
                           "calls": [c.record(plan.work_dir) for c in calls],
                           "inputs": [input_digests(c, state) for c in calls], "started_at": _now()}
    _save(plan, state)
    (plan.work_dir / f"iter{iteration}").mkdir(exist_ok=True)
    started = time.time()
    for call in calls:
        print(f"[iterate] iteration {iteration}/{len(plan.epochs)} {step}: {call.shown(plan.work_dir)}", flush=True)
        os.environ.update(call.secrets())  # inherited by the stage, never on its command line
        code = run_stage(call.script, call.argv(), plan.launcher if step == "finetune" else None)
        if code == 2:  # the stages check their input before they write anything: nothing to keep
            del state["steps"][key]
            _save(plan, state)
            raise StepFailed(f"iteration {iteration} {step}: {call.script} rejected its input (exit status 2, "
                             "its message is above); nothing of this step was kept", 2)
        if code != 0:
            _fail(plan, state, key, code)
            raise StepFailed(f"iteration {iteration} {step}: {call.script} failed (exit status {code}); fix the "
                             "cause and re-run the same command: finished steps are kept and this one resumes")
    try:
        outputs = collect_outputs(plan, iteration, step)
    except StepFailed as exc:
        _fail(plan, state, key, 1)
        raise StepFailed(f"iteration {iteration} {exc}") from None
    state["steps"][key].update(status="done", outputs=outputs, finished_at=_now(),
                               wall_seconds=round(time.time() - started, 1))
    _save(plan, state)
    print(f"[iterate] iteration {iteration} {step}: done in {time.time() - started:.1f} s ({_brief(outputs)})", flush=True)


def calls_for(plan: Plan, iteration: int, step: str, model: str | None) -> list[Call]:
    """The stage commands of one step: the user's stage flags, then what the loop itself decides."""
    folder = plan.work_dir / f"iter{iteration}"
    served = {"api_base": plan.api_base, "api_key_env": plan.api_key_env} if plan.api_base else {}
    records = str(folder / "records.jsonl")
    if step == "generate":
        return [Call("arena_med.py", {**plan.arena, "base_model": model, **served, "output_file": records})]
    if step == "finetune" and plan.backend == "open":
        return [Call("llama_finetune.py", {**plan.finetune, "base_model": model, "new_name": "model",
                                           "output_dir": str(folder), "data_files": records,
                                           "nepoch": plan.epochs[iteration - 1], "merge": True})]
    if step == "finetune":
        return [Call("data_process.py", {**plan.finetune, "input_file": records, "base_model": model, **served,
                                         "finetune_file": str(folder / OPENAI_DATA[plan.objective]),
                                         "n_epochs": plan.epochs[iteration - 1], "wait": True})]
    out = {"model": model, **served}
    if step == "eval_qa" and plan.qa_data_dir:
        return [Call("MedQA_eval.py", {"tables": "main", **plan.qa, **out, "data_dir": plan.qa_data_dir,
                                       "output_dir": str(folder / "eval" / "qa")}, "suite")]
    if step == "eval_qa":  # no data folder: the bundled sample questions
        return [Call("MedQA_eval.py", {**plan.qa, **out, "dataset": dataset, "data_file": str(path),
                                       "output_dir": str(folder / "eval" / "qa")}) for dataset, path in QA_SAMPLES]
    if step == "eval_counsel":  # the judge (in plan.counsel) is the same in every iteration
        return [Call("Counsel_eval.py", {**plan.counsel, **out, "data_file": plan.counsel_data,
                                         "output_dir": str(folder / "eval" / "counsel")})]
    return [Call("IMHI_eval.py", {**plan.imhi, **out, "test_dir": plan.imhi_test_dir,
                                  "output_dir": str(folder / "eval" / "imhi")})]


def model_of(plan: Plan, state: dict, iteration: int) -> str | None:
    """The model after `iteration` (0: the starting one): where its fine-tuning step put it."""
    if iteration == 0:
        return plan.base_model
    entry = state["steps"].get(_key(iteration, "finetune"))
    if not entry or entry["status"] != "done":
        raise StepFailed(f"iteration {iteration} finetune has not finished, so its model does not exist yet")
    return _local(entry["outputs"]["model"], plan.work_dir)


def collect_outputs(plan: Plan, iteration: int, step: str) -> dict:
    """The files a finished step left and the figures the summary needs, read back from them."""
    folder = plan.work_dir / f"iter{iteration}"
    if step == "finetune" and plan.backend == "open":
        return _merged_model(folder, plan.work_dir)
    if step == "finetune":
        return _openai_model(folder / OPENAI_DATA[plan.objective], plan.work_dir)
    return {"generate": _records, "eval_qa": _qa_scores, "eval_imhi": _imhi_scores,
            "eval_counsel": _counsel_scores}[step](folder, plan.work_dir)


def _records(folder: Path, work_dir: Path) -> dict:
    records = _must_exist(folder / "records.jsonl", "generate")
    return {"records_file": _portable(str(records), work_dir), "records": len(read_jsonl(records, allow_torn_tail=True))}


def _merged_model(folder: Path, work_dir: Path) -> dict:
    config = _read_json(folder / "model" / "finetune_config.json", "finetune")
    merged, summary = config.get("merged"), config.get("summary", {})
    if not merged or not (Path(merged) / "config.json").is_file():
        raise StepFailed(f"finetune: {folder / 'model'} holds no merged model")
    return {"model": _portable(str(Path(merged).resolve()), work_dir),
            **{k: summary.get(k) for k in ("examples", "steps", "epochs", "train_loss", "loss_first", "loss_last")},
            # a config written before --objective existed is an SFT one
            "objective": summary.get("objective") or "sft", "pairs": summary.get("pairs")}


def _openai_model(data: Path, work_dir: Path) -> dict:
    job = _read_json(data.with_name(data.name + ".job.json"), "finetune")
    if job.get("status") != "succeeded" or not job.get("fine_tuned_model"):
        raise StepFailed(f"finetune: job {job.get('job_id')} ended {job.get('status')} without a fine-tuned model")
    rows = sum(1 for line in _must_exist(data, "finetune").read_text(encoding="utf-8").split("\n") if line.strip())
    method = job.get("method") or "sft"  # a job record of before --method: SFT
    # the uploaded file holds one row per example: for DPO, one per preference pair
    return {"model": job["fine_tuned_model"], "job_id": job.get("job_id"), "examples": rows, "objective": method,
            "pairs": rows if method == "dpo" else None}


def _qa_scores(folder: Path, work_dir: Path) -> dict:
    sets = {r["benchmark"]: {k: r.get(k) for k in ("accuracy", "accuracy_std", "accuracy_reference", "n", "repeats",
                                                     "source")}
            for r in _results(folder / "eval" / "qa", "eval_qa")}
    return {"accuracy": _mean(s["accuracy"] for s in sets.values()),
            "accuracy_reference": _mean(s["accuracy_reference"] for s in sets.values()), "sets": sets}


def _imhi_scores(folder: Path, work_dir: Path) -> dict:
    """Weighted F1 per set and rule set; the summary's figure uses the paper's labels where present."""
    found = _results(folder / "eval" / "imhi", "eval_imhi")
    sets, accuracy = ({f"{r.get('test_set')}/{r['dataset']}": {rules: (scores or {}).get(metric)
                                                                for rules, scores in r.get("scores", {}).items()}
                       for r in found} for metric in ("weighted_f1", "accuracy"))
    rules = next((name for name in IMHI_RULE_PREFERENCE if any(name in s for s in sets.values())), None)
    return {"weighted_f1": _mean(s.get(rules) for s in sets.values()), "rules": rules, "sets": sets,
            "accuracy_sets": accuracy}


def _counsel_scores(folder: Path, work_dir: Path) -> dict:
    """Counsel_eval.py's win rate (%), rubric overall (1-10) and reward per data set and subset (all,
    risk); the summary's figures are subset `all`, the mean over the data sets (one, as the loop runs it)."""
    found = [r for r in _results(folder / "eval" / "counsel", "eval_counsel") if "subsets" in r]
    if not found:
        raise StepFailed(f"eval_counsel: no Counsel_eval.py results under {folder / 'eval' / 'counsel'}")

    def figures_of(subset: dict) -> dict:
        return {"win_rate": (subset.get("pairwise") or {}).get("win_rate"),
                "rubric_overall": ((subset.get("rubric") or {}).get("overall") or {}).get("mean"),
                "reward": (subset.get("reward") or {}).get("mean")}

    sets = {r["dataset"]: {name: figures_of(r["subsets"][name]) for name in ("all", "risk") if name in r["subsets"]}
            for r in found}
    digits = {"win_rate": 2, "rubric_overall": 2, "reward": 4}  # a reward model's scale may be small
    mean = {f"{prefix}{key}": _mean(((s.get(subset) or {}).get(key) for s in sets.values()), places)
            for prefix, subset in (("", "all"), ("risk_", "risk")) for key, places in digits.items()}
    return {**mean, "complete": all(r.get("complete") for r in found),
            "judge": next(((r.get("judge") or {}).get("model") for r in found if r.get("judge")), None),
            "baseline": next((r.get("baseline") for r in found if r.get("baseline")), None), "sets": sets}


# ---------------------------------------------------------------------------------- settings and state
def make_plan(work_dir, preset, backend, base_model, iterations, epochs, patients_file, principles_file, limit, num_samples,
              judge_model,
              api_base, api_key_env, method, max_steps, sft_questions, objective, finetune_launcher, eval, eval_limit,
              eval_base, qa_data_dir, imhi_test_dir, counsel_data, prompt_dir, arena_args, finetune_args, qa_args,
              imhi_args, counsel_args, restart) -> Plan:
    """Every flag checked and resolved before anything runs or is written."""
    if not work_dir:
        raise InputError("--work_dir is required: the folder for every iteration's outputs and state.json")
    if Path(work_dir).exists() and not Path(work_dir).is_dir():
        raise InputError(f"--work_dir {work_dir} is a file, not a folder")
    check_choice("backend", backend, BACKENDS)
    check_choice("objective", objective, OBJECTIVES)
    if sft_questions is not None:
        check_choice("sft_questions", sft_questions, tuple(WORDINGS))
    wanted = names(eval)
    for name in wanted:
        check_choice("eval", name, (*EVALS, "none"))
    if "none" in wanted and len(wanted) > 1:
        raise InputError(f"--eval none cannot be combined with other evaluations: {','.join(wanted)}")
    if backend == "openai":
        if method is not None or max_steps is not None:
            raise InputError("--method and --max_steps are for --backend open; OpenAI fine-tuning takes --epochs only")
        if objective not in OPENAI_DATA:
            raise InputError(f"--objective {objective} is for --backend open; OpenAI fine-tunes one method per job: "
                             "run the SFT iterations, then DPO ones from the SFT model (--objective dpo --base_model "
                             "<its ft: id>)")
        require_credentials(route(base_model or data_process.DEFAULT_MODELS[objective], "openai", api_base, api_key_env))
    elif api_base or api_key_env:
        raise InputError(f"--{'api_base' if api_base else 'api_key_env'} is for --backend openai (a server that also "
                         "fine-tunes); a served judge goes in --arena_args '{\"judge_api_base\": \"...\", "
                         "\"judge_api_key_env\": \"...\"}'")
    if not isinstance(eval_base, bool) or not isinstance(restart, bool):
        raise InputError("--eval_base and --restart take True or False")
    for name, path, kind in (("patients_file", patients_file, "file"), ("principles_file", principles_file, "file"),
                             ("qa_data_dir", qa_data_dir, "dir"),
                             ("imhi_test_dir", imhi_test_dir, "dir")):
        if path is not None and not (Path(path).is_file() if kind == "file" else Path(path).is_dir()):
            raise InputError(f"--{name} {path}: {'file' if kind == 'file' else 'folder'} not found")
    if prompt_dir is not None and not Path(prompt_dir).is_dir():
        raise InputError(f"--prompt_dir {prompt_dir}: folder not found")
    prompts = ("prompt_dir", _absolute(prompt_dir))
    finetune_stage = llama_finetune.run if backend == "open" else data_process.run
    qa_stage = MedQA_eval.suite if qa_data_dir else MedQA_eval.run
    # the stage's own default (sft) is left off its command line, so the paper's commands stay as they were
    chosen = None if objective == "sft" else objective
    finetune_top = ({"method": ("method", method), "max_steps": ("max_steps", max_steps),
                     "objective": ("objective", chosen)} if backend == "open" else {"method": ("objective", chosen)})
    finetune_top.update(sft_questions=("sft_questions", sft_questions), prompt_dir=prompts)
    finetune = _stage_args("finetune_args", finetune_args, finetune_stage, FINETUNE_RESERVED[backend], finetune_top)
    extra = [key for key in PREFERENCE_FLAGS if key in finetune]
    if objective == "sft" and extra:
        raise InputError(f"--finetune_args: {', '.join(extra)} {'is' if len(extra) == 1 else 'are'} for "
                         "--objective dpo or sft+dpo (preference pairs); --objective sft trains on the best answers only")
    counsel = _stage_args("counsel_args", counsel_args, Counsel_eval.run, COUNSEL_RESERVED,
                          {"limit": ("eval_limit", eval_limit), "prompt_dir": prompts})
    if counsel_data is not None and counsel.get("from_records"):
        raise InputError("--counsel_data and --counsel_args from_records both name the statements; give one")
    start = _absolute(base_model) if base_model is not None else (
        data_process.DEFAULT_MODELS[objective] if backend == "openai" else None)
    arena = _stage_args("arena_args", arena_args, arena_med.run, ARENA_RESERVED,
                        {"patients_file": ("patients_file", _absolute(patients_file)),
                         "principles_file": ("principles_file", _absolute(principles_file)), "limit": ("limit", limit),
                         "num_samples": ("num_samples", num_samples), "judge_model": ("judge_model", judge_model),
                         "prompt_dir": prompts})
    if "eval_counsel" in [EVALS[n] for n in EVALS if n in wanted]:
        _counsel_judge(counsel, arena, backend, api_base, api_key_env, start)
    return Plan(
        work_dir=Path(work_dir).resolve(), backend=backend,
        base_model=start,
        epochs=_schedule(backend, epochs, iterations), objective=objective,
        evals=[EVALS[n] for n in EVALS if n in wanted],
        eval_base=eval_base, api_base=api_base, api_key_env=api_key_env, qa_data_dir=_absolute(qa_data_dir),
        imhi_test_dir=_absolute(imhi_test_dir), counsel_data=_absolute(counsel_data),
        arena=arena, finetune=finetune,
        qa=_stage_args("qa_args", qa_args, qa_stage, QA_RESERVED, {"limit": ("eval_limit", eval_limit),
                                                                    "prompt_dir": prompts}),
        imhi=_stage_args("imhi_args", imhi_args, IMHI_eval.run, IMHI_RESERVED, {"limit": ("eval_limit", eval_limit)}),
        counsel=counsel,
        launcher=shlex.split(finetune_launcher) if finetune_launcher else None, preset=preset)


def apply_preset(flags: dict) -> paper.Preset:
    """Fill `flags` with the preset's values wherever the user left a flag at its default; the
    preset's stage flags go under the user's own (a key the user gives wins). Every data path the
    preset needs must be given: the paper's data is not bundled."""
    chosen = paper.preset(flags["preset"])
    missing = [name for name in chosen.needs if flags.get(name) is None]
    if missing:
        raise InputError(f"--preset {chosen.name} needs {', '.join('--' + m for m in missing)}: "
                         + "; ".join(PRESET_DATA[m] for m in missing))
    defaults = _run_defaults()
    for name, value in chosen.flags.items():
        if flags[name] == defaults[name]:
            flags[name] = value
    for name, values in chosen.stage_args.items():
        given = _json_dict(flags[name])
        flags[name] = {**values, **given} if isinstance(given, dict) else given  # not a dict: refused later
    return chosen


PRESET_DATA = {"patients_file": "the Patient-Psi-CM JSON (106 profiles; the MentalArena repository's data/)",
               "principles_file": "roleplay-doh_filtered.csv (SALT-NLP/roleplay-doh_principles, the 25 creators the paper used)",
               "qa_data_dir": "a folder laid out like the paper's data/ (medqa/, medmcqa/, pubmedqa/)",
               "imhi_test_dir": "the IMHI test_instruction CSVs of MentaLLaMA (CAMS.csv, dreaddit.csv, Irf.csv)"}


def preset_listing(chosen: paper.Preset, flags: dict, plan: Plan) -> str:
    """The resolved settings of a preset run, each with where it came from, and why the preset chose it."""
    defaults = _run_defaults()
    lines = [f"[iterate] --preset {chosen.name}: {chosen.title}", "[iterate] resolved settings [from]:"]
    for name, value in flags.items():
        if name in ("preset", "restart") or name.endswith("_args"):
            continue
        source = ("preset" if name in chosen.flags and value == chosen.flags[name] else
                  "default" if value == defaults[name] else "you")
        shown = value if name == "work_dir" else _portable(value, plan.work_dir)
        lines.append(f"[iterate]   --{name} = {shown!r}  [{source}]")
    for name, stage in (("arena_args", plan.arena), ("finetune_args", plan.finetune), ("qa_args", plan.qa),
                        ("imhi_args", plan.imhi)):
        preset_args = chosen.stage_args.get(name, {})
        for key, value in stage.items():
            source = ("preset" if preset_args.get(key, object()) == value else
                      f"--{key}" if key in flags and flags[key] is not None else "you")
            lines.append(f"[iterate]   --{name} {key} = {_portable(value, plan.work_dir)!r}  [{source}]")
    lines.append("[iterate] the preset's choices and their sources:")
    lines += [f"[iterate]   {what}: {value} ({source})" for what, value, source in chosen.notes]
    return "\n".join(lines)


def _run_defaults() -> dict:
    """Each flag of `run` and its default: a preset fills the flags left at these."""
    return {name: p.default for name, p in inspect.signature(run).parameters.items()}


def _json_dict(value):
    """A stage-args value as fire hands it: a dict, JSON text of one, or None."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return {} if value is None else value


def _counsel_judge(counsel: dict, arena: dict, backend: str, api_base: str | None, api_key_env: str | None,
                   start: str | None) -> None:
    """One counseling judge for every iteration (or the scores are not comparable across them): the one
    named in --counsel_args; else the self-play judge, but only where it runs where the evaluated
    model runs (the counseling statements never go to a third party unasked); else the starting model
    ("embedded": Counsel_eval's name of the embedded model), which runs where the evaluated model runs."""
    if counsel.get("judge_model"):
        return
    judge = arena.get("judge_model")
    if judge:
        model_route = _model_route(backend, start, api_base, api_key_env)
        judge_where = judge_route(model_route, _absolute(judge), arena.get("judge_backend", "auto"),
                                  arena.get("judge_api_base"), arena.get("judge_api_key_env"))
        if judge_where is None or (judge_where.kind != "openai") == (model_route.kind != "openai") and \
                judge_where.servers == model_route.servers:
            counsel["judge_model"] = _absolute(judge)
            return
        print(f"[iterate] counseling judge: the starting model, not the self-play judge {judge!r}, which runs at "
              f"{judge_where.where()}, not where the evaluated model runs; to send the counseling statements there, "
              "name it in --counsel_args '{\"judge_model\": ...}'", flush=True)
    counsel["judge_model"] = start or "embedded"


def _model_route(backend: str, model: str | None, api_base: str | None, api_key_env: str | None):
    """Where the evaluated (and trained) model runs: a local model (open backend), else --api_base or the OpenAI API."""
    if backend == "open":
        return route(model, "embedded" if model is None else "hf")
    return route(model or "gpt", "openai", api_base, api_key_env)


def data_routes(plan: Plan) -> list[str]:
    """Where each stage's data goes, in one line per stage, printed before the first step."""
    model = _model_route(plan.backend, plan.base_model, plan.api_base, plan.api_key_env)
    arena = plan.arena
    judge = judge_route(model, arena.get("judge_model"), arena.get("judge_backend", "auto"), arena.get("judge_api_base"),
                        arena.get("judge_api_key_env"))
    lines = [f"generate: patients to the model -> {model.where()}; to the judge -> "
             + ("the model" if judge is None else f"{judge.model!r} at {judge.where()}")]
    lines.append("finetune: the records stay on this machine (local training)" if plan.backend == "open" else
                 f"finetune: the records are uploaded to {model.where()} for fine-tuning")
    for step, what in (("eval_qa", "QA questions"), ("eval_imhi", "IMHI posts")):
        if step in plan.evals:
            lines.append(f"{step}: {what} -> {model.where()}")
    if "eval_counsel" in plan.evals:
        counsel = plan.counsel
        named = counsel.get("judge_model")
        cjudge = judge_route(model, None if named == "embedded" and model.kind == "embedded" else named,
                             counsel.get("judge_backend", "auto"),
                             counsel.get("judge_api_base"), counsel.get("judge_api_key_env"))
        line = (f"eval_counsel: client statements -> {model.where()}; to the judge -> "
                + ("the model" if cjudge is None else f"{cjudge.model!r} at {cjudge.where()}"))
        if counsel.get("baseline_model"):
            base = judge_route(model, counsel["baseline_model"], counsel.get("baseline_backend", "auto"),
                               counsel.get("baseline_api_base"), counsel.get("baseline_api_key_env"), "baseline_api_key_env")
            line += "; to the baseline -> " + ("the model" if base is None else f"{base.model!r} at {base.where()}")
        lines.append(line)
    return lines


LOOP_MODEL = "the loop sets it: --base_model for the first iteration, then each iteration's fine-tuned model"
ARENA_RESERVED = {"base_model": LOOP_MODEL, "output_file": "each iteration writes iterK/records.jsonl",
                  "api_base": "use --api_base (with --backend openai)", "api_key_env": "use --api_key_env"}
FINETUNE_RESERVED = {
    "open": {"base_model": LOOP_MODEL, "new_name": "each iteration writes iterK/model",
             "output_dir": "each iteration writes iterK/model", "data_files": "the iteration's own records",
             "nepoch": "use --epochs (one value per iteration)", "merge": "the next iteration needs the merged model",
             "objective": "use --objective"},
    "openai": {"base_model": LOOP_MODEL, "input_file": "the iteration's own records",
               "finetune_file": "each iteration writes iterK/finetune.openai.jsonl (DPO: .openai_dpo.jsonl)",
               "method": "use --objective (sft or dpo)",
               "n_epochs": "use --epochs (one value per iteration)", "wait": "the next iteration needs the model id",
               "convert_only": "the next iteration needs the model id", "api_base": "use --api_base",
               "api_key_env": "use --api_key_env"},
}
QA_RESERVED = {"model": LOOP_MODEL, "output_dir": "each iteration writes iterK/eval/qa",
               "data_dir": "use --qa_data_dir", "dataset": "use --qa_data_dir for other sets",
               "data_file": "use --qa_data_dir for other sets", "api_base": "use --api_base",
               "api_key_env": "use --api_key_env"}
IMHI_RESERVED = {"model": LOOP_MODEL, "output_dir": "each iteration writes iterK/eval/imhi",
                 "test_dir": "use --imhi_test_dir", "generated_dir": "the loop evaluates its own models",
                 "api_base": "use --api_base", "api_key_env": "use --api_key_env"}
COUNSEL_RESERVED = {"model": LOOP_MODEL, "output_dir": "each iteration writes iterK/eval/counsel",
                    "data_file": "use --counsel_data", "api_base": "use --api_base", "api_key_env": "use --api_key_env"}


def _stage_args(flag: str, given, function, reserved: dict, top: dict) -> dict:
    """A stage's flags: the loop's own convenience flags plus the user's dict, each key checked
    against the stage's signature, so a typo stops the run before anything starts."""
    given = _json_dict(given)  # fire leaves a dict it cannot parse as text
    if not isinstance(given, dict):
        raise InputError(f"--{flag} must be a dict of the stage's flags, e.g. '{{\"max_new_tokens\": 32}}', not {given!r}")
    known = inspect.signature(function).parameters
    stage = f"{Path(inspect.getfile(function)).name}{'' if function.__name__ == 'run' else ' ' + function.__name__}"
    for key in given:
        if key == "api_key":
            raise InputError(f"--{flag}: a key does not belong on the command line or in state.json; export OPENAI_API_KEY")
        if key in reserved:
            raise InputError(f"--{flag}: {key} is not yours to set here: {reserved[key]}")
        if key not in known:
            raise InputError(f"--{flag}: {stage} has no flag --{key}")
        if key in top and top[key][1] is not None:
            raise InputError(f"--{flag}: {key} is also given as --{top[key][0]}; give it once")
    merged = {key: value for key, (_, value) in top.items() if value is not None}
    merged.update({key: _json_literal(value) for key, value in given.items()})
    # the stage's own range check, now: a bad value stops the loop before its first step (None: the default)
    check_numbers(function, {key: value for key, value in merged.items() if value is not None}, f"--{flag}: ")
    return merged


def check_recorded(plan: Plan, state: dict, restart: bool) -> None:
    """Every recorded step must have run with the settings the flags give now. Otherwise refuse, or
    with --restart discard it: a changed generate or finetune step takes every later step with it
    (they depend on its records or model), a changed evaluation only itself."""
    for iteration, step in plan.steps():
        entry = state["steps"].get(_key(iteration, step))
        if entry is None:
            continue
        try:
            model = model_of(plan, state, iteration if step.startswith("eval") else iteration - 1)
            calls = calls_for(plan, iteration, step, model)
            changed = _differences(entry["calls"], [c.record(plan.work_dir) for c in calls]) or \
                _changed_inputs(entry.get("inputs"), [input_digests(c, state) for c in calls])
        except StepFailed:
            changed = "the model it was given no longer exists"
        if not changed:
            continue
        ran = "ran" if entry["status"] == "done" else "was started"
        if not restart:
            raise InputError(f"{plan.state_file}: iteration {iteration} {step} {ran} with other settings ({changed}); "
                             "re-run with those, use another --work_dir, or pass --restart to discard its outputs")
        print(f"[iterate] --restart: iteration {iteration} {step} {ran} with other settings ({changed})", flush=True)
        discard(plan, state, iteration, step)


def discard(plan: Plan, state: dict, iteration: int, step: str) -> None:
    """Remove a step's state entry and files; for generate or finetune also every later step's."""
    start = _order(iteration, step)
    doomed = {(iteration, step)} if step.startswith("eval") else {
        (k, s) for k in _iterations_on_disk(plan, state) for s in STEPS if _order(k, s) >= start}
    for k, s in sorted(doomed, key=lambda pair: _order(*pair)):
        state["steps"].pop(_key(k, s), None)
        for path in _step_files(plan.work_dir / f"iter{k}", s):
            if path.exists():
                print(f"[iterate] --restart: removing {path}", flush=True)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    _save(plan, state)


def load_state(path: Path) -> dict:
    if not path.exists():
        return {"version": 1, "steps": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); delete it to re-check every step "
                         "(finished stages find their outputs and skip the work)") from None
    if not isinstance(state, dict) or not isinstance(state.get("steps"), dict):
        raise InputError(f'{path}: field "steps" is missing (not a state file of iterate.py)')
    return state


# ---------------------------------------------------------------------------------- the summary
def summary_rows(plan: Plan, state: dict) -> list[dict]:
    """One row per iteration (0: the starting model): its model, records, loss and scores."""
    def done(k: int, step: str) -> dict:
        entry = state["steps"].get(_key(k, step))
        return entry["outputs"] if entry and entry["status"] == "done" else {}

    rows = []
    for k in range(0 if plan.eval_base and plan.evals else 1, len(plan.epochs) + 1):
        model = (plan.base_model or "embedded") if k == 0 else done(k, "finetune").get("model")
        qa, imhi, counsel = done(k, "eval_qa"), done(k, "eval_imhi"), done(k, "eval_counsel")
        finetune = done(k, "finetune") if k else {}
        rows.append({"iteration": k, "model": model.removeprefix(WORK + "/") if model else None,
                     # what trained it (a step recorded before --objective existed: sft), on how many pairs
                     "objective": (finetune.get("objective") or "sft") if finetune else None,
                     "pairs": finetune.get("pairs"),
                     # the epochs trained (fewer than planned when --max_steps stops first)
                     "epochs": (finetune.get("epochs") or plan.epochs[k - 1]) if k else None,
                     "records": done(k, "generate").get("records"),
                     "train_loss": done(k, "finetune").get("train_loss"), "qa_accuracy": qa.get("accuracy"),
                     "qa_accuracy_reference": qa.get("accuracy_reference"),
                     "imhi_weighted_f1": imhi.get("weighted_f1"), "imhi_rules": imhi.get("rules"),
                     "qa": {name: s["accuracy"] for name, s in qa.get("sets", {}).items()},
                     "qa_reference": {name: s.get("accuracy_reference") for name, s in qa.get("sets", {}).items()},
                     "imhi": {name: s.get(imhi.get("rules")) for name, s in imhi.get("sets", {}).items()},
                     # Table 2's IMHI number: accuracy over all rows (paper.TABLE2_IMHI_RULES)
                     "imhi_accuracy": {name: next((s[k] for k in paper.TABLE2_IMHI_RULES if s.get(k) is not None), None)
                                       for name, s in imhi.get("accuracy_sets", {}).items()},
                     # Counsel_eval.py: subset `all`, and the statements flagged risk where there are any
                     "counsel_win_rate": counsel.get("win_rate"), "counsel_rubric": counsel.get("rubric_overall"),
                     "counsel_reward": counsel.get("reward"), "counsel_complete": counsel.get("complete"),
                     "counsel_judge": counsel.get("judge"), "counsel_baseline": counsel.get("baseline"),
                     "counsel_risk": {title: counsel.get(key) for title, key in COUNSEL_RISK_COLUMNS
                                      if counsel.get(key) is not None}})
    return rows


COUNSEL_RISK_COLUMNS = (("counsel win % (risk)", "risk_win_rate"), ("counsel rubric (risk)", "risk_rubric_overall"))


def summary_markdown(plan: Plan, rows: list[dict]) -> str:
    header = ["iteration", "model", "objective", "epochs", "records", "pairs", "train loss", "QA acc",
              "QA acc (rule R)", "IMHI w-F1"]
    # Counsel_eval.py's columns where it ran (or is planned); the reward where a row has one
    counsel = "eval_counsel" in plan.evals or any(r["counsel_win_rate"] is not None or r["counsel_rubric"] is not None
                                                  or r["counsel_reward"] is not None for r in rows)
    reward = any(r["counsel_reward"] is not None for r in rows)
    header += (["counsel win %", "counsel rubric"] if counsel else []) + (["counsel reward"] if reward else [])
    lines = [f"# MentalArena iterations in {plan.work_dir}", "",
             f"{plan.backend} backend, objective {plan.objective}; starting model {plan.base_model or 'embedded'}; "
             f"evaluations: {', '.join(plan.evals).replace('eval_', '') or 'none'}. Scores in %; – : not done (yet).",
             "",
             _md_row(header), _md_row(["---"] * len(header))]
    for r in rows:
        lines.append(_md_row([r["iteration"], r["model"], r["objective"], r["epochs"], r["records"], r["pairs"],
                              _fmt(r["train_loss"], 4), _fmt(r["qa_accuracy"]), _fmt(r["qa_accuracy_reference"]),
                              _fmt(r["imhi_weighted_f1"]),
                              *([_fmt(r["counsel_win_rate"]), _fmt(r["counsel_rubric"])] if counsel else []),
                              *([_fmt(r["counsel_reward"], 4)] if reward else [])]))
    rules = next((r["imhi_rules"] for r in rows if r["imhi_rules"]), None)
    notes = ["pairs: the preference pairs the fine-tuning trained on (dpo, sft+dpo); train loss is the "
             "objective's own (a DPO loss is not comparable with an SFT one)."] if any(r["pairs"] for r in rows) else []
    notes += (["QA acc: the mean over the QA sets of `accuracy` (robust answer extraction, MedQA_eval.py); "
              "QA acc (rule R): of `accuracy_reference`, the reference's own scorer, which the paper's numbers "
              "come from."] if any(r["qa"] for r in rows) else [])
    notes += [f"IMHI w-F1: the mean over the IMHI sets of the weighted F1 with the `{rules}` labels (IMHI_eval.py)."
              ] if rules else []
    judge = next((r["counsel_judge"] for r in rows if r["counsel_judge"]), None)
    baseline = next((r["counsel_baseline"] for r in rows if r["counsel_baseline"]), None)
    notes += [f"counsel win %: Counsel_eval.py's win rate against the baseline ({baseline or 'none'}, ties half), "
              f"counsel rubric: the 1-10 rubric overall, both over all statements and judged by {judge} in every "
              "iteration" + ("; counsel reward: the reward model's mean score." if reward else ".")
              ] if judge or reward else []
    # (title, row field, set): each QA set's robust score with its rule-R score beside it, then IMHI
    columns = [c for q in dict.fromkeys(s for r in rows for s in r["qa"])
               for c in ((q, "qa", q), (f"{q} (rule R)", "qa_reference", q))]
    columns += [(s, "imhi", s) for s in dict.fromkeys(s for r in rows for s in r["imhi"])]
    columns += [(t, "counsel_risk", t) for t, _ in COUNSEL_RISK_COLUMNS if any(t in r["counsel_risk"] for r in rows)]
    if columns:
        lines += ["", *notes, "", "## Per set", "", _md_row(["iteration", *(t for t, _, _ in columns)]),
                  _md_row(["---"] * (len(columns) + 1))]
        lines += [_md_row([r["iteration"], *(_fmt(r[field].get(s)) for _, field, s in columns)])
                  for r in rows]
    elif notes:
        lines += ["", *notes]
    if plan.preset:
        lines += ["", *table2_markdown(plan.preset, rows)]
    return "\n".join(lines) + "\n"


def table2_markdown(name: str, rows: list[dict]) -> list[str]:
    """The paper's Table 2 for this run: each iteration beside the paper's numbers for the same model."""
    chosen = paper.preset(name)
    header = ["", *paper.TABLE2_COLUMNS, "AVG"]
    return [f"## Table 2 ({chosen.title})", "",
            "Accuracy %. QA: rule R, the reference's scorer, mean over the repeats; IMHI: accuracy over all "
            f"rows ({' or '.join(paper.TABLE2_IMHI_RULES)} labels); AVG: the mean of the six, when all six are "
            "there. The paper's lines are METHOD.md §7's transcription.", "",
            _md_row(header), _md_row(["---"] * len(header)),
            *(_md_row([line[0], *(_fmt(v) for v in line[1:])]) for line in paper.table2_rows(rows, *chosen.rows))]


def summary_figure_panels(rows: list[dict]) -> list[dict]:
    """What summary.png draws (`figures.iteration_lines` panels), the summary table's numbers by
    iteration: QA accuracy (robust), QA accuracy (rule R) and IMHI w-F1, each set and the mean
    (thick), and the train loss; where Counsel_eval.py ran, its win rate and rubric overall (all
    statements thick, the risk ones thin) and reward. A score not there (not run, not recorded) is no point."""
    def panel(title: str, ylabel: str, mean: str, per_set: str | None) -> dict:
        sets = list(dict.fromkeys(s for r in rows for s in r[per_set])) if per_set else []
        series = [{"label": name, "mean": False, "points": [(r["iteration"], r[per_set].get(name)) for r in rows]}
                  for name in sets]
        label = "mean over the sets" if per_set else ylabel
        return {"title": title, "ylabel": ylabel,
                "series": series + [{"label": label, "mean": True, "points": [(r["iteration"], r[mean]) for r in rows]}]}

    rules = next((r["imhi_rules"] for r in rows if r["imhi_rules"]), None)
    return [panel("QA accuracy (robust)", "accuracy (%)", "qa_accuracy", "qa"),
            panel("QA accuracy (rule R)", "accuracy (%)", "qa_accuracy_reference", "qa_reference"),
            panel(f"IMHI weighted F1 (`{rules}` labels)", "weighted F1 (%)", "imhi_weighted_f1", "imhi"),
            panel("train loss (the objective's own)", "train loss", "train_loss", None)] + _counsel_panels(rows)


def _counsel_panels(rows: list[dict]) -> list[dict]:
    """Counsel_eval.py's panels, none where it never ran (the figure stays as it was)."""
    def line(label: str, values: list, mean: bool) -> dict:
        return {"label": label, "mean": mean, "points": [(r["iteration"], v) for r, v in zip(rows, values)]}

    panels = []
    for (title, ylabel, field), (risk, _) in zip(
            (("counsel win rate vs baseline (ties half)", "win rate (%)", "counsel_win_rate"),
             ("counsel rubric overall (judge, 1-10)", "score (1-10)", "counsel_rubric")), COUNSEL_RISK_COLUMNS):
        series = [line("risk statements", [r["counsel_risk"].get(risk) for r in rows], False)
                  ] if any(risk in r["counsel_risk"] for r in rows) else []
        panels.append({"title": title, "ylabel": ylabel,
                       "series": series + [line("all statements", [r[field] for r in rows], True)]})
    panels.append({"title": "counsel reward model score", "ylabel": "reward",
                   "series": [line("all statements", [r["counsel_reward"] for r in rows], True)]})
    return [p for p in panels if any(y is not None for s in p["series"] for _, y in s["points"])]


def _md_row(cells: list) -> str:
    return "| " + " | ".join("–" if c is None else str(c) for c in cells) + " |"


def _fmt(value, digits: int = 2) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------- small helpers
def _schedule(backend: str, epochs, iterations) -> list:
    """Epochs per iteration: one value for every iteration, or one value for all."""
    values = names(epochs) if epochs is not None else [str(e) for e in PAPER_EPOCHS[backend]]
    parsed = []
    for value in values:
        try:
            number = float(value)
        except ValueError:
            number = 0.0
        if number <= 0 or (backend == "openai" and not number.is_integer()):
            kind = "whole numbers" if backend == "openai" else "positive numbers"
            raise InputError(f"--epochs must be a comma list of {kind} (e.g. 4,5,7,7), not {epochs!r}")
        parsed.append(int(number) if number.is_integer() else number)
    if not parsed:
        raise InputError("--epochs is empty")
    count = len(parsed) if iterations is None else iterations
    if len(parsed) == 1:
        return parsed * count
    if len(parsed) < count:
        raise InputError(f"--iterations {count} needs {count} epoch values, --epochs gives {len(parsed)} "
                         f"({','.join(map(str, parsed))}); give one per iteration, or one for all")
    return parsed[:count]


def _json_literal(value):
    """fire reads '{"progress": false}' with the JSON literal as text; take it as JSON means."""
    return {"true": True, "false": False, "null": None}.get(value, value) if isinstance(value, str) else value


def _flag_value(value) -> str:
    """Text the stage's fire parses back to exactly `value` (a string fire would read as a number,
    a tuple or None is quoted)."""
    if isinstance(value, str) and DefaultParseValue(value) == value:
        return value
    return repr(value)


def _portable(value, work_dir: Path):
    """Paths under --work_dir written relative to it, credentials cut out of URLs (in lists too)."""
    if isinstance(value, (list, tuple)):
        return [_portable(v, work_dir) for v in value]
    if isinstance(value, dict):  # a stage-args dict (--counsel_args' judge_api_base, ...)
        return {key: _portable(v, work_dir) for key, v in value.items()}
    if not isinstance(value, str):
        return value
    root = str(work_dir)
    if value == root or value.startswith(root + os.sep):
        return WORK + value[len(root):]
    return public_url(value) if "://" in value else value


def _local(value: str, work_dir: Path) -> str:
    return str(work_dir) + value[len(WORK):] if value.startswith(WORK) else value


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (the stages run with the same cwd, but state.json must not depend
    on it); a model name that is not a local path stays as it is."""
    return str(Path(path).resolve()) if path is not None and Path(str(path)).exists() else path


def _differences(old: list[dict], new: list[dict]) -> str:
    """'' when the calls agree on everything but the stage's running flags (its RUNNING_FLAGS: how it
    runs, not what it makes); else what changed."""
    if [(c["script"], c.get("command")) for c in old] != [(c["script"], c.get("command")) for c in new]:
        return "other stage commands: " + ", ".join(c["script"] for c in new)
    changes = []
    for o, n in zip(old, new):
        running = RUNNING_FLAGS[n["script"]]
        for key in dict.fromkeys([*o["args"], *n["args"]]):
            if key not in running and o["args"].get(key) != n["args"].get(key):
                changes.append(f"--{key} {o['args'].get(key)} -> {n['args'].get(key)}")
    return ", ".join(dict.fromkeys(changes))


def input_digests(call: Call, state: dict) -> dict[str, str]:
    """flag -> sha256 of the file or folder it names, for every input of the call that is a local
    path (its outputs aside): a step is compared with what it read, not with a path. Digests are
    remembered in state["digests"] by file size and modification time, so unchanged files (a merged
    model's weights) are not read again at every resume."""
    cache = state.setdefault("digests", {})
    return {key: _path_digest(Path(value), cache) for key, value in call.args.items()
            if key not in OUTPUT_FLAGS and isinstance(value, str) and value and _is_local_path(value)}


def _changed_inputs(old: list[dict] | None, new: list[dict]) -> str:
    """'' when every input recorded for the step has the content it had (a step recorded before
    inputs were kept is compared by its flags only); else which changed."""
    if not old:
        return ""
    changed = [key for o, n in zip(old, new) for key in o if key in n and o[key] != n[key]]
    return ", ".join(f"--{key}: the content changed" for key in dict.fromkeys(changed))


def _is_local_path(value: str) -> bool:
    return "://" not in value and not value.startswith("env:") and Path(value).exists()


def _path_digest(path: Path, cache: dict) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path) if file != path else ''}\0{_file_digest(file, cache)}\0".encode())
    return digest.hexdigest()[:16]


def _file_digest(file: Path, cache: dict) -> str:
    stat = file.stat()
    known = cache.get(str(file))
    if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
        return known["sha256"]
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    cache[str(file)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return cache[str(file)]["sha256"]


def _secret_url(key: str, value) -> bool:
    return key.endswith("api_base") and isinstance(value, str) and has_credentials(value)


def _secret_variable(key: str) -> str:
    return f"MENTALARENA_{key.upper()}"


def _results(folder: Path, step: str) -> list[dict]:
    found = sorted(folder.rglob("*.results.json"))
    if not found:
        raise StepFailed(f"{step}: no *.results.json under {folder}")
    return [json.loads(p.read_text(encoding="utf-8")) for p in found]


def _read_json(path: Path, step: str) -> dict:
    return json.loads(_must_exist(path, step).read_text(encoding="utf-8"))


def _must_exist(path: Path, step: str) -> Path:
    if not path.is_file():
        raise StepFailed(f"{step}: the stage ended without writing {path}")
    return path


def _mean(values, digits: int = 2) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), digits) if present else None


def _brief(outputs: dict) -> str:
    parts = []
    for key in ("records", "examples", "pairs", "train_loss", "accuracy", "weighted_f1", "win_rate", "rubric_overall",
                "reward", "model"):
        if outputs.get(key) is not None:
            value = outputs[key]
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts) or "no figures"


def _step_files(folder: Path, step: str) -> list[Path]:
    return {"generate": [folder / "records.jsonl", folder / "records.errors.jsonl", folder / "records.summary.json"],
            "finetune": [folder / "model", *(folder / f"{name}{tail}" for name in OPENAI_DATA.values()
                                             for tail in ("", ".job.json"))],
            "eval_qa": [folder / "eval" / "qa"], "eval_imhi": [folder / "eval" / "imhi"],
            "eval_counsel": [folder / "eval" / "counsel"]}[step]


def _iterations_on_disk(plan: Plan, state: dict) -> set[int]:
    found = {int(p.name[4:]) for p in plan.work_dir.glob("iter*") if p.name[4:].isdigit()}
    return found | {e["iteration"] for e in state["steps"].values()} | {k for k, _ in plan.steps()}


def _fail(plan: Plan, state: dict, key: str, code: int) -> None:
    state["steps"][key].update(status="failed", exit_code=code, finished_at=_now())
    _save(plan, state)


def _save(plan: Plan, state: dict) -> None:
    state["updated_at"] = _now()
    write_json_atomic(plan.state_file, state)


def _key(iteration: int, step: str) -> str:
    return f"{iteration}/{step}"


def _order(iteration: int, step: str) -> tuple[int, int]:
    return iteration, STEPS.index(step)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every step is done, 1 when a step failed, 2 on bad input (the loop's or a stage's)."""
    return cli.main({}, run, _exit_code, argv)


def _exit_code(_, result: dict) -> int:
    if result["error"]:
        print(f"error: {result['error']}", file=sys.stderr)
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
