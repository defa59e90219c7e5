"""Fine-tune an OpenAI model on its own self-play records (METHOD.md §5-6): convert, check, upload, train.

    python data_process.py --input_file test.jsonl --finetune_file ft.jsonl --base_model gpt-3.5-turbo-0125 --n_epochs 4
    python data_process.py --input_file iter1.jsonl,iter1b.jsonl --convert_only     # only write the file
    python data_process.py --input_file test.jsonl --wait      # poll until the job ends, print the model id
    # preference fine-tuning (DPO) on pairs from the try-and-reflect scores (mentalarena/training/preference.py);
    # the base model must be one OpenAI offers DPO for (default gpt-4.1-mini-2025-04-14)
    python data_process.py --input_file iter1.jsonl --method dpo --min_margin 2 --beta 0.1 --wait

The questions are the reference's three (--sft_questions project: the project's rewording), read
from prompts/ or --prompt_dir; --reference_glue writes the treatment question as the reference does.

--method sft (the paper) trains on the best answers (`<first input>.openai.jsonl`); --method dpo on
chosen / rejected pairs (`<first input>.openai_dpo.jsonl`), which only arena_med.py's scored records
carry (the reference's six-field records hold none).

The job is recorded beside the data in `<finetune_file>.job.json`. Re-running with the same data and
settings reuses that job instead of creating another (and with --wait, waits for it again); new data
or settings (the method and beta among them) create a new job. The key comes from OPENAI_API_KEY.

--select ppl_iqr,kcenter --select_size N (--method sft) uploads a subset chosen as MentalQLM does
(`mentalarena/training/selection.py`): answer perplexity under the embedded model (or --select_model), then
k-center on sentence embeddings; the counts go into the result and the settings into the job record.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import openai

from mentalarena import cli

from mentalarena.training import preference
from mentalarena.cli import names, public_url
from mentalarena.selfplay.data import one_line
from mentalarena.errors import InputError, check_choice
from mentalarena.flags import check_numbers
from mentalarena.store.jsonl import write_json_atomic
from mentalarena.store.locks import OutputLock
from mentalarena.engines.openai_client import (RETRY, STOP, Credentials, classify, connection_cause, credentials, describe,
                                       is_openai_api, make_client, redact, retry_after, server_message, stop_reason)
from mentalarena.training.selection import check_options as check_selection
from mentalarena.training.selection import select as select_rows
from mentalarena.training.selection import summary as selection_summary
from mentalarena.prompts import Prompts
from mentalarena.training.sft import Questions, convert, write_rows

CHAT_ROLES = {"system", "user", "assistant"}
METHODS = ("sft", "dpo")
# sft: the model the paper's GPT runs fine-tuned; dpo: OpenAI offers preference fine-tuning for the
# gpt-4.1 family (gpt-4.1, -mini, -nano of 2025-04-14, and fine-tunes of them), not for gpt-3.5-turbo
DEFAULT_MODELS = {"sft": "gpt-3.5-turbo-0125", "dpo": "gpt-4.1-mini-2025-04-14"}
SUFFIXES = {"sft": ".openai.jsonl", "dpo": ".openai_dpo.jsonl"}
ENDED = {"succeeded", "failed", "cancelled"}
RETRYABLE_END = {"failed", "cancelled"}  # a job that ended this way is not reused: a re-run tries again
LEGACY_STATE = {"method": "sft", "beta": None}  # what a job record written before --method existed means
# Flags that change how a run goes, not the job it makes (iterate.py lets a re-run change them).
RUNNING_FLAGS = ("poll_seconds", "request_timeout", "api_key_env")


class APIFailure(Exception):
    """An API request failed (after the retries a transient fault gets); the message is one line
    without secrets."""


# The job's metadata carries this run's request tag, so that after a failure whose outcome is
# unknown (a timeout, a dropped connection) the job it may have created is found, never made twice.
REQUEST_TAG = "mentalarena_request"
IDEMPOTENT_ATTEMPTS = 4  # transient faults are retried; a job creation without an answer never is


def run(
    input_file: str | list[str],  # self-play records (or converted rows); several as a comma list
    finetune_file: str | None = None,  # default: <first input>.openai.jsonl (dpo: .openai_dpo.jsonl)
    base_model: str | None = None,  # None: gpt-3.5-turbo-0125 (sft, the paper's), gpt-4.1-mini-2025-04-14 (dpo)
    n_epochs: int | str = 4,  # the paper: 4 in iteration 1, 6 in iteration 2; "auto" lets OpenAI choose
    method: str = "sft",  # sft: the paper's supervised fine-tuning; dpo: preference pairs (OpenAI's method "dpo")
    # preference pairs (--method dpo; mentalarena/training/preference.py)
    min_margin: float = 2.0,  # least score gap (1-10 scale) between the chosen and the rejected try
    all_pairs: bool = False,  # every two tries at least min_margin apart, not only the best and the worst
    diagnosis_pairs: bool = True,  # also the diagnosis the final illness came from against the other
    diagnosis_margin: float = 0.05,  # least cosine-similarity gap when no doctor is named
    beta: float | str | None = None,  # DPO's beta; None / auto: OpenAI chooses
    # API
    api_key: str | None = None,  # accepted for the paper's command line; OPENAI_API_KEY is preferred
    api_base: str | None = None,  # any OpenAI-compatible server that implements files + fine-tuning
    api_key_env: str | None = None,  # the environment variable with --api_base's key (None: none; the OpenAI API: OPENAI_API_KEY)
    request_timeout: float = 600.0,  # seconds one API request may take in all (an upload of a large file too)
    suffix: str | None = None,  # added to the fine-tuned model's name
    wait: bool = False,  # poll until the job ends and print the fine-tuned model id
    poll_seconds: float = 30.0,
    # data
    convert_only: bool = False,  # write and check the file, touch no API
    sft_questions: str = "reference",  # reference: the reference's three questions (the paper's data) | project: reworded
    reference_glue: bool = False,  # the reference's missing newline before the treatment question
    prompt_dir: str | None = None,  # a folder of edited prompts/*.txt (the sft_* questions and system text)
    min_examples: int = 10,  # OpenAI refuses jobs with fewer; checked before uploading (0: off)
    # data selection (--method sft; MentalQLM, mentalarena/training/selection.py)
    select: str | tuple | None = None,  # ppl_iqr | kcenter | ppl_iqr,kcenter (applied in that order); None: every row
    select_size: int | None = None,  # kcenter: how many examples to keep (required with kcenter)
    iqr_factor: float = 1.5,  # ppl_iqr: keep answer perplexities within [Q1 - f*IQR, Q3 + f*IQR]
    select_model: str | None = None,  # ppl_iqr's model; None: the embedded one (OpenAI models give no log-probs here)
) -> dict:
    """Convert the records, check the file against the chat (or preference) format, upload it, create
    (or reuse) the job."""
    check_numbers(run, dict(locals()))
    inputs = _paths(input_file)
    check_choice("method", method, METHODS)
    methods = check_selection(select, select_size, iqr_factor, select_model)
    if methods and method == "dpo":
        raise InputError("--select picks SFT examples; --method dpo uploads preference pairs")
    beta = _beta(beta, method)
    questions = Questions(Prompts(prompt_dir), sft_questions, reference_glue)
    questions.check()
    base_model = base_model or DEFAULT_MODELS[method]
    finetune = Path(finetune_file) if finetune_file else Path(inputs[0]).with_suffix(SUFFIXES[method])
    if finetune.resolve() in {Path(p).resolve() for p in inputs}:
        raise InputError(f"--finetune_file {finetune} is also an input file: it would be overwritten")

    state_path = finetune.with_name(finetune.name + ".job.json")
    # Every check that can fail on input runs before the fine-tuning file is replaced.
    creds, old_state = (None, {}) if convert_only else (_credentials(api_key, api_key_env, api_base), _read_state(state_path))
    if method == "dpo" and str(base_model).removeprefix("ft:").startswith("gpt-3.5"):
        print(f"warning: OpenAI offers DPO for the gpt-4.1 models, not {base_model}; the job will likely be "
              f"refused (--base_model {DEFAULT_MODELS['dpo']})", file=sys.stderr)
    if method == "dpo":
        rows, report = preference.convert(inputs, "openai", min_margin=min_margin, all_pairs=all_pairs,
                                          diagnosis=diagnosis_pairs, diagnosis_margin=diagnosis_margin,
                                          questions=questions)
    else:
        rows, report = convert(inputs, "openai", questions=questions)
    for problem in report.problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    print(f"[data_process] {report.summary()}", flush=True)
    selection = None
    if methods and rows:  # perplexities of the chat rows through the scoring model's chat template
        rows, selection = select_rows(rows, methods, fmt="chat_template", size=select_size, factor=iqr_factor,
                                      model=select_model or "embedded")
        print(f"[data_process] selection: {selection_summary(selection)}", flush=True)
    what = "preference pairs" if method == "dpo" else "examples"
    if not rows:
        raise InputError(f"{', '.join(inputs)}: no preference pairs: {report.why_none()}" if method == "dpo"
                         else f"{', '.join(inputs)}: no training examples")
    if len(rows) < min_examples:
        message = f"{', '.join(inputs)}: {len(rows)} {what}; OpenAI fine-tuning needs at least {min_examples}"
        if not convert_only:
            raise InputError(message + " (--min_examples 0 skips this check for other servers)")
        print(f"warning: {message}", file=sys.stderr)
    with OutputLock(finetune):  # one writer of the file and its job record at a time
        write_rows(finetune, rows)
        # a guard on what is uploaded: the conversion should never fail it
        problems = (preference.validate_openai_file if method == "dpo" else validate_chat_file)(finetune)
        if problems:
            raise InputError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        print(f"[data_process] wrote {len(rows)} {what} -> {finetune}", flush=True)
        result = {"report": report.as_dict(), "finetune_file": str(finetune), "method": method, "job_id": None,
                  "status": None, "fine_tuned_model": None, "selection": selection}
        if method == "dpo":
            result["pairs"] = len(rows)
        if convert_only:
            return result

        client = make_client(api_base, creds, float(request_timeout))
        settings = {"data_sha256": hashlib.sha256(finetune.read_bytes()).hexdigest(), "api_base": public_url(api_base),
                    "base_model": base_model, "method": method, "n_epochs": n_epochs, "beta": beta, "suffix": suffix,
                    "selection": selection["settings"] if selection else None}
        print(f"[data_process] job settings {json.dumps(settings)}", flush=True)
        with _api(creds, public_url(api_base) or "OpenAI API") as step:
            job, state = _job_for(client, settings, old_state, finetune, state_path, step)
            if wait:
                job = _wait(client, job, poll_seconds, state, state_path, step)
        _print_job(job)
        result.update(job_id=job.id, status=job.status, fine_tuned_model=job.fine_tuned_model)
        return result


def _job_for(client, settings: dict, old: dict, finetune: Path, state_path: Path, step: list[str]):
    """The job for this data and these settings: the recorded one unless it ended badly, else a new
    one. Creating a job costs money, so it is never retried blindly: the request's tag is fsynced into
    the job record first, and after a failure whose outcome is unknown (here or in a run that died)
    the job that request may have made is looked for before any other is created."""
    old = {**LEGACY_STATE, **old}  # a job recorded before --method existed was an SFT job
    same_data = all(old.get(k) == settings[k] for k in ("data_sha256", "api_base"))
    same = same_data and all(old.get(k) == settings[k] for k in settings)
    if same and old.get("job_id"):
        step[0] = f"retrieving job {old['job_id']}"
        job = _retrying(lambda: client.fine_tuning.jobs.retrieve(old["job_id"]), step)
        if job.status not in RETRYABLE_END:
            print(f"[data_process] same data and settings as job {job.id}: reusing it (status {job.status})", flush=True)
            _save(old, state_path, job)
            return job, old
        print(f"[data_process] job {job.id} ended {job.status}: creating a new one", flush=True)
    elif old.get("job_id"):
        changed = [k for k in settings if old.get(k) != settings[k]]
        print(f"[data_process] {', '.join(changed)} changed since job {old['job_id']}: creating a new job", flush=True)
    pending = old.get("pending_request") if same and not old.get("job_id") else None
    state = {**settings, "finetune_file": str(finetune), "file_id": old.get("file_id") if same_data else None,
             "job_id": None, "status": None, "fine_tuned_model": None, "pending_request": pending,
             "previous_jobs": old.get("previous_jobs", []) + ([old["job_id"]] if old.get("job_id") else [])}
    if state["file_id"] is None:
        step[0] = f"uploading {finetune}"
        with open(finetune, "rb") as f:
            state["file_id"] = _retrying(lambda: client.files.create(file=f, purpose="fine-tune"), step, rewind=f).id
        write_json_atomic(state_path, state)  # a crash after this reuses the upload
    if pending:  # an earlier run asked for a job and never heard whether it was made
        job = _find_job(client, state, step)
        if job is not None:
            print(f"[data_process] found job {job.id}, created by an earlier attempt that did not hear back "
                  f"(request {pending['tag']}): using it (status {job.status})", flush=True)
            state["pending_request"] = None
            _save(state, state_path, job)
            return job, state
    state["pending_request"] = pending or {"tag": uuid.uuid4().hex, "since": int(time.time())}
    write_json_atomic(state_path, state)  # fsynced before the job is asked for
    step[0] = "creating the fine-tuning job"
    extra = {"suffix": str(state["suffix"])} if state["suffix"] is not None else {}
    try:
        job = _retrying(lambda: client.fine_tuning.jobs.create(
            training_file=state["file_id"], model=settings["base_model"], method=job_method(settings),
            metadata={REQUEST_TAG: state["pending_request"]["tag"]}, **extra), step, answered_only=True)
    except openai.OpenAIError as exc:
        if not _unanswered(exc):  # the server answered no: no job was made
            raise
        time.sleep(2.0)  # the server may still be making it
        job = _find_job(client, state, step)
        if job is None:
            raise APIFailure(f"{public_url(settings['api_base']) or 'OpenAI API'}: creating the fine-tuning job failed "
                             f"without an answer ({describe(exc)}), so it may or may not exist; none with request tag "
                             f"{state['pending_request']['tag']} is listed yet. Re-run the same command: it looks for "
                             "that job again before creating one") from None
        print(f"[data_process] the job request got no answer ({describe(exc)}), but job {job.id} exists: using it",
              flush=True)
    state["pending_request"] = None
    _save(state, state_path, job)
    print(f"[data_process] created job {job.id} on file {state['file_id']} (status {job.status})", flush=True)
    return job, state


def _find_job(client, state: dict, step: list[str]):
    """The job that this state's pending request made, if it exists: tagged with its request tag, or
    (servers that drop metadata) on the same uploaded file and base model, created since the request
    and not one of the jobs this record replaced."""
    tag, since = state["pending_request"]["tag"], state["pending_request"]["since"]
    step[0] = f"looking for the job of request {tag}"
    listed = _retrying(lambda: client.fine_tuning.jobs.list(limit=100, metadata={REQUEST_TAG: tag}), step)
    for job in listed.data:
        if (getattr(job, "metadata", None) or {}).get(REQUEST_TAG) == tag:
            return job
    for job in listed.data:
        if (job.training_file == state["file_id"] and job.model == state["base_model"]
                and job.id not in state["previous_jobs"] and (job.created_at or 0) >= since - 300):
            return job
    return None


def _unanswered(err: Exception) -> bool:
    """No answer came (a timeout, a dropped connection, a 5xx from a proxy): the request may have
    been carried out. A 4xx is an answer: it was not."""
    return isinstance(err, openai.APIConnectionError) or (isinstance(err, openai.APIStatusError) and err.status_code >= 500)


def _retrying(call, step: list[str], rewind=None, answered_only: bool = False):
    """A request with retries of transient faults only; anything else, or the last failure, goes up
    as it is. `rewind`: a file to read again from the start. `answered_only` (job creation, which is
    not idempotent): only faults the server answered (429 rate limits, 408) are retried, since the
    request was then surely not carried out."""
    for attempt in range(IDEMPOTENT_ATTEMPTS):
        try:
            return call()
        except openai.OpenAIError as exc:
            if classify(exc) != RETRY or attempt + 1 == IDEMPOTENT_ATTEMPTS or (answered_only and _unanswered(exc)):
                raise
            delay = retry_after(exc)
            delay = min(30.0, 2.0 ** attempt) if delay is None else delay
            print(f"warning: {step[0]}: {describe(exc)}; retry {attempt + 1}/{IDEMPOTENT_ATTEMPTS - 1} in {delay:.0f} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)
            if rewind is not None:
                rewind.seek(0)
    raise AssertionError("unreachable")


def job_method(settings: dict) -> dict:
    """The job's `method`: supervised with n_epochs, or dpo with n_epochs and beta (left out: OpenAI's choice)."""
    hyper = {"n_epochs": settings["n_epochs"]}
    if settings["method"] == "sft":
        return {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    if settings.get("beta") is not None:
        hyper["beta"] = settings["beta"]
    return {"type": "dpo", "dpo": {"hyperparameters": hyper}}


def _wait(client, job, poll_seconds: float, state: dict, state_path: Path, step: list[str]):
    """Poll until the job ends; the state file follows each change so an interrupted wait can resume."""
    step[0] = f"polling job {job.id}"
    last = None
    while job.status not in ENDED:
        if job.status != last:
            print(f"[data_process] job {job.id}: {job.status}", flush=True)
            _save(state, state_path, job)
            last = job.status
        time.sleep(poll_seconds)
        job = _retrying(lambda job_id=job.id: client.fine_tuning.jobs.retrieve(job_id), step)
    _save(state, state_path, job)
    return job


def _save(state: dict, state_path: Path, job) -> None:
    state.update(job_id=job.id, status=job.status, fine_tuned_model=job.fine_tuned_model)
    write_json_atomic(state_path, state)


def _print_job(job) -> None:
    line = f"[data_process] job {job.id}: {job.status}"
    if job.fine_tuned_model:
        line += f", fine-tuned model {job.fine_tuned_model}"
    if job.status in RETRYABLE_END and job.error is not None and job.error.message:
        line += f" ({one_line(job.error.message, 400)})"
    print(line, flush=True)


def validate_chat_file(path: str | Path) -> list[str]:
    """Problems against OpenAI's chat fine-tuning format, one "<file>: line N: ..." per bad line."""
    problems = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}: line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: not valid JSON ({exc.msg})")
                continue
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages:
                problems.append(f'{where}: field "messages" must be a non-empty list')
            elif not all(isinstance(m, dict) and m.get("role") in CHAT_ROLES for m in messages):
                problems.append(f"{where}: every message needs a role among {', '.join(sorted(CHAT_ROLES))}")
            elif not all(isinstance(m.get("content"), str) for m in messages):
                problems.append(f'{where}: every message needs a text "content"')
            elif not any(m["role"] == "assistant" for m in messages):
                problems.append(f"{where}: no assistant message to learn from")
    return problems


def _paths(input_file) -> list[str]:
    paths = names(input_file)
    if not paths:
        raise InputError("--input_file is empty")
    return paths


def _beta(beta, method: str) -> float | None:
    """DPO's beta (its range checked with the other flags): None (OpenAI chooses; also "auto") or a
    positive number; only for --method dpo."""
    if beta is None or beta == "auto":
        return None
    if method != "dpo":
        raise InputError("--beta is for --method dpo (the strength of DPO's preference penalty)")
    return float(beta)


def _credentials(api_key: str | None, api_key_env: str | None, api_base: str | None) -> Credentials:
    """What the fine-tuning server is sent: OPENAI_API_KEY for the OpenAI API, the variable named by
    --api_key_env elsewhere, or --api_key (the paper's flag: warned about)."""
    if api_key:
        print("warning: --api_key puts the key in your shell history and the process list; export it and name "
              "the variable with --api_key_env (OPENAI_API_KEY for the OpenAI API)", file=sys.stderr)
        return Credentials(str(api_key), "--api_key", is_openai_api(api_base))
    return credentials(api_base, api_key_env)


def _read_state(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: not valid JSON (delete it to start a new job)") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a JSON object (delete it to start a new job)")
    return state


@contextmanager
def _api(creds: Credentials, where: str) -> Iterator[list[str]]:
    """Turns any SDK error into an APIFailure naming the server and the step; the caller updates
    step[0] as it goes."""
    step = ["calling the API"]
    try:
        yield step
    except openai.APIStatusError as exc:
        if classify(exc) == STOP and exc.status_code not in (400, 404):  # a key, its credit, a redirect
            raise APIFailure(f"{where}: {step[0]}: " + stop_reason(exc, "the server", creds, "api_key_env")) from None
        detail = server_message(exc, (creds.key,))
        raise APIFailure(f"{where}: {step[0]}: {describe(exc)}" + (f": {detail}" if detail else "")) from None
    except openai.APIConnectionError as exc:
        raise APIFailure(f"{where}: {step[0]}: {connection_cause(exc)}") from None
    except openai.OpenAIError as exc:
        raise APIFailure(f"{where}: {redact(f'{step[0]}: {type(exc).__name__}: {exc}', (creds.key,))}") from None


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the job exists (or succeeded, with --wait), 1 when the API failed or the job did, 2 on bad input."""
    return cli.main({}, run, _exit_code, argv, failures=(APIFailure,))


def _exit_code(_, result) -> int:
    return 1 if isinstance(result, dict) and result.get("status") in RETRYABLE_END else 0


if __name__ == "__main__":
    sys.exit(main())
