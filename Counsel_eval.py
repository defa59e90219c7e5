"""How good is the model as a therapist? Responses to client statements, scored by a reward model
and by an LLM judge (pairwise against a baseline, and a 1-10 rubric per counseling principle).

    python Counsel_eval.py --scorers rubric,pairwise                      # bundled sample, embedded model as all roles
    python Counsel_eval.py --model path/to/ckpt --judge_model gpt-4o-2024-08-06 --baseline_model gpt-4o-2024-08-06 \
        --reward_model Psychotherapy-LLM/PsychoCounsel-Llama3-8B-Reward --scorers reward,pairwise,rubric \
        --data_file Psychotherapy-LLM/PsychoCounsel-Preference --split test
    python Counsel_eval.py --from_records outputs/records.jsonl --scorers rubric   # patient turns of self-play
    python Counsel_eval.py report --output_dir outputs/counsel

The evaluated model answers each statement as a therapist (system text `prompts/counsel_system.txt`),
one turn, batched, each request with its own seed. Scorers, any subset of `--scorers`:
- `reward`: a sequence-classification reward model reads [user: statement, assistant: response]
  through its chat template; mean and bootstrap 95% interval.
- `pairwise`: the judge compares the response with a baseline's in both orders (model as A, then
  as B) on the principles of `prompts/counsel_principles.txt`; win rate (ties half) with its interval.
- `rubric`: the judge scores each response 1-10 per principle; means and intervals.
Statements flagged `risk` (self-harm indicators) are also reported on their own. Per-row files
(responses, judge replies, rewards) are appended as they come, so a re-run resumes; the results
JSON, the per-row `scored` file and the report are rewritten from them.
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from mentalarena import cli

from mentalarena.evaluation import counsel

from mentalarena.reports import figures
from mentalarena.engines.backends import make_backend
from mentalarena.engines.routes import check_loadable, judge_route, require_credentials, route, runs_on
from mentalarena.cli import names
from mentalarena.store.keys import model_fingerprint, model_tag, request_seed, settings_hash
from mentalarena.errors import InputError, check_choice
from mentalarena.flags import check_numbers
from mentalarena.store.files import write_atomic
from mentalarena.store.jsonl import append_jsonl, read_jsonl, repair_torn_tail, write_json_atomic
from mentalarena.store.locks import hold_all
from mentalarena.progress import Progress
from mentalarena.training.sft import write_rows
from mentalarena.prompts import Prompts

log = logging.getLogger("counsel_eval")

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT / "data" / "counsel_sample.jsonl"
EMBEDDED = "embedded:SmolLM2-135M-Instruct"
SCORERS = ("reward", "pairwise", "rubric")
# Flags that change how a run goes, not its answers (iterate.py lets a re-run change them).
RUNNING_FLAGS = ("progress", "batch_size", "reward_batch_size", "device", "request_timeout", "api_key_env",
                 "judge_api_key_env", "baseline_api_key_env")
TEMPLATES = {"system": "counsel_system", "pairwise": "counsel_pairwise", "rubric": "counsel_rubric",
             "principles": "counsel_principles"}
SUBSETS = (("all", lambda r: True), ("risk", lambda r: r["risk"]), ("no_risk", lambda r: not r["risk"]))


# ---------------------------------------------------------------------------------- commands
def run(
    # the evaluated model
    model: str | None = None,          # None: the embedded SmolLM2-135M-Instruct; a path / org/name: hf; else OpenAI
    backend: str = "auto",            # auto | embedded | hf | openai
    api_base: str | None = None,      # an OpenAI-compatible server (vLLM, llama.cpp, ...), or replicas as a comma list
    # data
    data_file: str | None = None,     # .jsonl/.json/.csv/.parquet, or a `datasets` folder / hub id; None: data/counsel_sample.jsonl
    split: str | None = None,         # the split of a `datasets` source (None: test if there is one, else the first)
    text_field: str | None = None,    # the client-statement field; None: the first of statement, question, prompt, ...
    from_records: str | None = None,  # instead of --data_file: self-play records (comma list); their patient turns
    limit: int | None = None,         # first N statements only
    # responses
    temperature: float = 0.7,
    max_new_tokens: int = 512,
    batch_size: int = 16,             # local: sequences decoded together; API: requests in flight
    seed: int = 0,
    dtype: str | None = "auto",
    device: str | None = None,
    # scoring
    scorers: str | tuple = "rubric,pairwise",  # any of reward, pairwise, rubric
    judge_model: str | None = None,   # None: the evaluated model judges itself (fine for a demo, not for a study)
    judge_backend: str = "auto",
    judge_api_base: str | None = None,  # None: where --api_base serves, if it does; see README "Counseling evaluation"
    judge_temperature: float = 0.0,
    judge_max_new_tokens: int = 512,
    baseline_model: str | None = None,  # pairwise: the opponent, answering the same statements the same way
    baseline_backend: str = "auto",
    baseline_api_base: str | None = None,
    api_key_env: str | None = None,   # the environment variable with --api_base's key (None: none; the OpenAI API: OPENAI_API_KEY)
    judge_api_key_env: str | None = None,  # the same for --judge_api_base (None: --api_base's, when served there)
    baseline_api_key_env: str | None = None,  # the same for --baseline_api_base
    request_timeout: float = 600.0,   # served models: seconds one request may take in all
    baseline_file: str | None = None,  # pairwise: baseline responses on file (fields id or statement, and response)
    baseline_field: str = "reference_response",  # pairwise: else the data file's own responses in this field
    reward_model: str | None = None,  # reward: a sequence-classification reward model (local path or hub id)
    reward_batch_size: int = 8,
    reward_max_length: int = 4096,
    bootstrap: int = 2000,            # bootstrap resamples for the 95% intervals
    # output
    output_dir: str = "outputs/counsel",
    prompt_dir: str | None = None,    # a folder of edited prompts/*.txt
    progress: bool = True,
) -> dict:
    """Answer every statement, score the answers with `scorers`, write results; returns them."""
    check_numbers(run, dict(locals()))
    wanted = _scorers(scorers)
    rows, source, dataset = _statements(data_file, from_records, split, text_field, baseline_field, limit)
    prompts = Prompts(prompt_dir)
    prompts.check([TEMPLATES[n] for n in ("system", "principles", *(s for s in ("pairwise", "rubric") if s in wanted))])
    principles = counsel.read_principles(prompts.template(TEMPLATES["principles"]),
                                         str(prompts.dir / f"{TEMPLATES['principles']}.txt"))

    contestant = route(model, backend, api_base, api_key_env)
    judge = (judge_route(contestant, judge_model, judge_backend, judge_api_base, judge_api_key_env) or contestant) \
        if {"pairwise", "rubric"} & set(wanted) else None
    # the opponent follows the judge's rule: served over the API, it goes where --api_base serves unless told
    opponent = (judge_route(contestant, baseline_model, baseline_backend, baseline_api_base, baseline_api_key_env,
                            "baseline_api_key_env") or contestant) if baseline_model and "pairwise" in wanted else None
    for r in (contestant, judge, opponent):
        if r is not None:
            require_credentials(r)
    if "reward" in wanted:
        from mentalarena.evaluation.reward import check_reward_model
        if not reward_model:
            raise InputError("--scorers reward needs --reward_model (a sequence-classification reward model: "
                             "a local folder or a hub id)")
        check_reward_model(reward_model)
    baseline_name = _baseline_name(wanted, opponent, baseline_file, baseline_field, rows)
    if "pairwise" in wanted and opponent is None:  # read before any model loads: a bad file writes nothing
        baselines = counsel.load_baseline_file(baseline_file, baseline_field, rows) if baseline_file else \
            {r["key"]: r["baseline"] for r in rows if r.get("baseline")}
    else:
        baselines = {}

    generation = {"system": prompts.template(TEMPLATES["system"]), "temperature": float(temperature),
                  "max_new_tokens": int(max_new_tokens), "seed": int(seed), "dtype": dtype, "device": device,
                  "request_timeout": float(request_timeout)}
    settings = _settings(contestant, generation)
    model_dir = Path(output_dir) / model_tag(settings["model"])
    files = {"samples": model_dir / f"{dataset}.samples.jsonl", "judge": model_dir / f"{dataset}.judge.jsonl",
             "reward": model_dir / f"{dataset}.reward.jsonl", "scored": model_dir / f"{dataset}.scored.jsonl",
             "results": model_dir / f"{dataset}.results.json"}
    print(f"[counsel] {len(rows)} statements from {source['source']} ({sum(r['risk'] for r in rows)} flagged risk); "
          f"scorers {','.join(wanted)}; " + _routes_line(contestant, judge, opponent), file=sys.stderr, flush=True)
    start, failures = time.perf_counter(), {}
    with ExitStack() as held:
        baseline_samples = None
        if opponent is not None:
            baseline_samples = Path(output_dir) / model_tag(opponent.model or EMBEDDED) / f"{dataset}.samples.jsonl"
        hold_all(held, [files["samples"], files["judge"], files["reward"],
                        *([baseline_samples] if baseline_samples and baseline_samples != files["samples"] else [])])
        # every route with something to ask is reached before the evaluated model is asked anything
        # (served ones: their server answers and takes the key; local ones: loadable, loaded when used)
        judging = None if judge is None else {
            "model": judge.model or EMBEDDED, "runs_on": runs_on(judge), "temperature": float(judge_temperature),
            "max_new_tokens": int(judge_max_new_tokens), "seed": int(seed), **_fingerprint(judge)}
        needs = _needs(contestant, opponent, judging, rows, generation, files, baseline_samples, baselines, wanted,
                       prompts, principles)
        served = preflight({"responses": (contestant if needs["responses"] else None, temperature, max_new_tokens),
                            "baseline": (opponent if needs["baseline"] else None, temperature, max_new_tokens),
                            "judge": (judge if needs["judge"] else None, judge_temperature, judge_max_new_tokens)},
                           generation, batch_size)
        for chat in served.values():
            held.callback(chat.close)
        model_dir.mkdir(parents=True, exist_ok=True)
        responses, failures["responses"] = respond(contestant, rows, generation, dataset, files["samples"], batch_size,
                                                   "responses", progress, served.get("responses"))
        if opponent is not None:
            baseline_samples.parent.mkdir(parents=True, exist_ok=True)
            answered, failures["baseline"] = respond(opponent, rows, generation, dataset, baseline_samples,
                                                     batch_size, "baseline", progress, served.get("baseline"))
            baselines = {k: a["response"] for k, a in answered.items()}
        verdicts = {}
        if judge is not None:
            verdicts, failures["judge"] = judge_all(judge, judging, rows, responses, baselines, wanted, prompts,
                                                    principles, files["judge"], generation, batch_size, progress,
                                                    served.get("judge"))
        rewards = {}
        if "reward" in wanted:
            rewards = reward_all(reward_model, rows, responses, files["reward"], device, dtype,
                                 int(reward_batch_size), int(reward_max_length))
        scored = _scored_rows(rows, responses, baselines, verdicts, rewards, wanted, principles)
        write_rows(files["scored"], scored)
        results = {
            "model": settings["model"], "dataset": dataset, "source": source, "rows": len(rows),
            "answered": len(responses), "complete": len(responses) == len(rows) and not any(failures.values()),
            "failed_requests": failures, "scorers": wanted, "baseline": baseline_name,
            "principles": [{"key": p.key, "title": p.title} for p in principles],
            # risk and no_risk only where some statement is flagged (else no_risk would repeat all)
            "subsets": {name: summarise([s for s in scored if keep(s)], wanted, principles, int(seed), int(bootstrap))
                        for name, keep in SUBSETS if name == "all" or any(s["risk"] for s in scored)},
            "settings": cli.public_settings(settings),
            "judge": None if judge is None else {"model": judge.model or EMBEDDED, "runs_on": runs_on(judge),
                                                 "temperature": float(judge_temperature),
                                                 "max_new_tokens": int(judge_max_new_tokens)},
            "reward": {"model": reward_model, "max_length": int(reward_max_length), "dtype": cli.auto_dtype(dtype, device)}
            if "reward" in wanted else None, "bootstrap": int(bootstrap), "seed": int(seed),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "files": {k: v.name for k, v in files.items() if k != "results"},
        }
        write_json_atomic(files["results"], results)
        _print_results(results)
        report(str(Path(output_dir)))
    return results


def report(output_dir: str = "outputs/counsel", output_file: str | None = None) -> str:
    """One markdown table across every model and dataset under `output_dir` (each subset: all, risk,
    no_risk), a per-principle rubric table, and `<report stem>_scores.png` beside it."""
    check_numbers(report, dict(locals()))
    found = sorted(Path(output_dir).rglob("*.results.json"))
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in found]
    rows = [r for r in rows if "subsets" in r and "principles" in r]
    if not rows:
        raise InputError(f"{output_dir}: no Counsel_eval results (*.results.json); run an evaluation first")
    rows.sort(key=lambda r: (r["dataset"], r["model"]))
    text = [f"# Counseling evaluation, {len(rows)} result files in {output_dir}", "",
            "Means with bootstrap 95% intervals over statements. Win rate: % of the judged statements won against the "
            "baseline, ties counted half, each statement judged in both orders (a verdict that follows the position "
            "rather than the response counts as a tie, `inconsistent`). W/T/L: wins, ties, losses; `unjudged`: a "
            "verdict could not be read. Rubric: the judge's 1-10 score per principle, `overall` the mean of each "
            "statement's scores. `risk`: statements flagged with self-harm indicators. Words: the mean response length "
            "(the baseline's in brackets); judges tend to favour longer answers, so compare lengths before win rates.", "",
            *_main_table(rows), ""]
    keys = list(dict.fromkeys(p["key"] for r in rows for p in r["principles"]))
    if any("rubric" in (s or {}) for r in rows for s in r["subsets"].values()):
        text += ["## Rubric by principle (1-10)", "", *_rubric_table(rows, keys), ""]
    target = Path(output_file) if output_file else Path(output_dir) / "report.md"
    figure = figures.interval_dots(figure_panels(rows, keys), target.with_name(f"{target.stem}_scores.png"),
                                   f"Counseling evaluation, {len(rows)} result files in {output_dir}")
    text += [f"![counseling scores]({figure.name}) `{figure.name}`: the table's means with their 95% intervals, "
             "one colour per model.", ""]
    markdown = "\n".join(text)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, markdown)
    return markdown


# ---------------------------------------------------------------------------------- the calls
def respond(where, rows: list[dict], generation: dict, dataset: str, samples: Path, batch_size: int, label: str,
            progress: bool, chat=None) -> tuple[dict[str, dict], int]:
    """Every statement's response from the model at `where`, asked once: answers on file with these
    settings are reused (others are kept and ignored). Returns (row key -> answer, failed calls).
    `chat`: the route's backend when the preflight built it already (served models); else one is built."""
    run_hash = settings_hash(_settings(where, generation))
    done = _on_file(samples, run_hash)
    todo = [r for r in rows if r["key"] not in done]
    print(f"[counsel] {label} of {where.model or EMBEDDED}: {len(rows) - len(todo)} on file, {len(todo)} to ask",
          file=sys.stderr, flush=True)
    if todo:
        conversations = [[{"role": "system", "content": generation["system"]}, {"role": "user", "content": r["statement"]}]
                         for r in todo]
        seeds = [request_seed(generation["seed"], dataset, r["key"]) for r in todo]
        owned = chat is None
        chat = chat or _backend(where, generation["temperature"], generation["max_new_tokens"], generation, batch_size)
        failed = _collect(chat, conversations, seeds, label, progress, owned, lambda i, reply: append_jsonl(samples, {
            "id": todo[i]["key"], "row": todo[i]["row"], "statement_id": todo[i]["id"], "statement": todo[i]["statement"],
            "risk": todo[i]["risk"], "response": reply.text, "seed": seeds[i], "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens, "truncated": reply.truncated, "settings_hash": run_hash}))
    else:
        failed = 0
    done = _on_file(samples, run_hash)
    return {r["key"]: done[r["key"]] for r in rows if r["key"] in done}, failed


def judge_all(where, judging: dict, rows, responses, baselines, wanted, prompts: Prompts, principles, path: Path,
              generation: dict, batch_size: int, progress: bool, chat=None) -> tuple[dict[str, dict], int]:
    """The judge's replies: for each answered row, both pairwise orders (where a baseline exists) and
    one rubric call. Replies on file for the same judge settings and the same texts are reused."""
    asks, todo, hashes = judge_asks(judging, rows, responses, baselines, wanted, prompts, principles, path)
    print(f"[counsel] judge {judging['model']}: {len(asks) - len(todo)} verdicts on file, {len(todo)} to ask",
          file=sys.stderr, flush=True)
    failed = 0
    if todo:
        seeds = [request_seed(judging["seed"], "judge", a[0]) for a in todo]
        owned = chat is None
        chat = chat or _backend(where, judging["temperature"], judging["max_new_tokens"], generation, batch_size)
        failed = _collect(chat, [[{"role": "user", "content": a[4]}] for a in todo], seeds, "judge", progress, owned,
                          lambda i, reply: append_jsonl(path, {
                              "id": todo[i][0], "kind": todo[i][1], "key": todo[i][2], "order": todo[i][3],
                              "reply": reply.text, "seed": seeds[i], "prompt_tokens": reply.prompt_tokens,
                              "completion_tokens": reply.completion_tokens, "truncated": reply.truncated,
                              "settings_hash": hashes[todo[i][1]]}))
    on_file = _judged(path, set(hashes.values()))
    out: dict[str, dict] = {}
    for ident, kind, key, order, _ in asks:
        if ident in on_file:
            out.setdefault(key, {})[order or kind] = on_file[ident]["reply"]
    return out, failed


def judge_asks(judging: dict, rows, responses, baselines, wanted, prompts: Prompts, principles, path: Path):
    """(every judge request these answers call for, those not yet on file, the hash of each kind):
    both pairwise orders where a baseline exists and one rubric call per answered row, each request
    found again by its exact prompt and judge settings."""
    block = counsel.principles_block(principles)
    hashes = {kind: settings_hash({**judging, "kind": kind}) for kind in ("pairwise", "rubric") if kind in wanted}
    asks = []  # (kind, row key, order, prompt), then with its id in front
    for r in rows:
        answer = responses.get(r["key"])
        if answer is None:
            continue
        if "pairwise" in hashes and r["key"] in baselines:
            model_text, base_text = answer["response"], baselines[r["key"]]
            for order, (a, b) in (("model_first", (model_text, base_text)), ("baseline_first", (base_text, model_text))):
                asks.append(("pairwise", r["key"], order, prompts.render(
                    TEMPLATES["pairwise"], principles=block, statement=r["statement"], response_a=a, response_b=b)))
        if "rubric" in hashes:
            lines = "\n".join(f"{p.key}: <score>" for p in principles)
            asks.append(("rubric", r["key"], None, prompts.render(
                TEMPLATES["rubric"], principles=block, statement=r["statement"], response=answer["response"],
                score_lines=lines)))
    # a reply is found again by its exact prompt and judge settings: any edit asks anew
    asks = [(counsel.digest(kind, hashes[kind], prompt), kind, key, order, prompt) for kind, key, order, prompt in asks]
    on_file = _judged(path, set(hashes.values()))
    return asks, [a for a in asks if a[0] not in on_file], hashes


def reward_all(reward_model: str, rows, responses, path: Path, device, dtype, batch_size: int, max_length: int) -> dict:
    """Row key -> {"score", "truncated"}: the reward model's score of each answered row, cached by
    reward settings and text."""
    fingerprint = model_fingerprint(reward_model)
    run_hash = settings_hash({"reward_model": reward_model, "max_length": max_length,
                              "dtype": cli.auto_dtype(dtype, device),
                              **({"model_fingerprint": fingerprint} if fingerprint else {})})
    on_file = {e["id"]: e for e in _entries(path) if e.get("settings_hash") == run_hash}
    answered = [(r, responses[r["key"]]["response"]) for r in rows if r["key"] in responses]
    todo = [(r, text) for r, text in answered if counsel.digest(r["statement"], text) not in on_file]
    print(f"[counsel] reward {reward_model}: {len(answered) - len(todo)} on file, {len(todo)} to score",
          file=sys.stderr, flush=True)
    if todo:
        from mentalarena.evaluation.reward import RewardModel
        scorer = RewardModel(reward_model, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length)
        step = 16 * batch_size  # scores reach the file chunk by chunk: a crash keeps what was done
        try:
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                for (r, text), score in zip(chunk, scorer.score([r["statement"] for r, _ in chunk], [t for _, t in chunk])):
                    append_jsonl(path, {"id": counsel.digest(r["statement"], text), "key": r["key"],
                                        "score": round(float(score), 6), "settings_hash": run_hash})
            described = scorer.describe()
        finally:
            scorer.close()
        print(f"[counsel] reward model: {described}", file=sys.stderr, flush=True)
        on_file = {e["id"]: e for e in _entries(path) if e.get("settings_hash") == run_hash}
    return {r["key"]: on_file[counsel.digest(r["statement"], t)]["score"] for r, t in answered
            if counsel.digest(r["statement"], t) in on_file}


def _collect(chat, conversations, seeds, label: str, progress: bool, close: bool, keep) -> int:
    """Stream the calls, `keep(index, reply)` each answer as it comes; returns the failures. `close`:
    the backend was built for these calls (a local model's memory goes back at once)."""
    bar = Progress(len(conversations), label, enabled=progress)
    failed = 0
    try:
        for index, reply in chat.stream(conversations, seeds=seeds):
            if isinstance(reply, Exception):
                failed += 1
                bar.failure()
                log.error("%s request %d: %s", label, index, reply)
            else:
                keep(index, reply)
                bar.reply(reply)
    finally:
        bar.close()
        if close:
            chat.close()
    return failed


def _backend(where, temperature: float, max_new_tokens: int, generation: dict, batch_size: int):
    chat = make_backend(where.model if where.kind != "embedded" else None, where.kind, where.api_base,
                        temperature=temperature, max_new_tokens=max_new_tokens, seed=generation["seed"],
                        max_parallel=batch_size, max_batch_size=batch_size, device=generation["device"],
                        dtype=None if where.kind == "openai" else cli.auto_dtype(generation["dtype"], generation["device"]),
                        prefix_cache_gb=0, key_env=where.key_env, key_flag=where.key_flag,
                        request_timeout=generation["request_timeout"])
    return cli.checked(chat, "counsel")


def _fingerprint(where) -> dict:
    """{"model_fingerprint": ...} for a local model folder (retrained in place: another model), else {}."""
    fingerprint = model_fingerprint(where.model) if where.kind == "hf" else None
    return {"model_fingerprint": fingerprint} if fingerprint else {}


def _needs(contestant, opponent, judging, rows, generation, files, baseline_samples, baselines, wanted, prompts,
           principles) -> dict[str, bool]:
    """Which roles have something to ask (a re-run with everything on file builds no backend at all)."""
    answered = _on_file(files["samples"], settings_hash(_settings(contestant, generation)))
    needs = {"responses": any(r["key"] not in answered for r in rows), "baseline": False, "judge": False}
    if opponent is not None:
        on_file = _on_file(baseline_samples, settings_hash(_settings(opponent, generation)))
        needs["baseline"] = any(r["key"] not in on_file for r in rows)
        baselines = {k: a["response"] for k, a in on_file.items()}
    if judging is not None:
        needs["judge"] = needs["responses"] or needs["baseline"] or bool(
            judge_asks(judging, rows, answered, baselines, wanted, prompts, principles, files["judge"])[1])
    return needs


def preflight(roles: dict, generation: dict, batch_size: int) -> dict:
    """role -> backend, checked, for every role served over an API (its server answers, takes the
    key, knows the model), before any statement is sent anywhere; a local model must be loadable
    (`check_loadable`), and loads only when its role runs. A role that fails closes those built."""
    served = {}
    try:
        for role, (where, temperature, max_new_tokens) in roles.items():
            if where is None:
                continue
            if where.kind == "openai":
                served[role] = _backend(where, float(temperature), int(max_new_tokens), generation, batch_size)
            else:
                check_loadable(where)
    except BaseException:
        for chat in served.values():
            chat.close()
        raise
    return served


# ---------------------------------------------------------------------------------- results
def summarise(scored: list[dict], wanted: list[str], principles, seed: int, n_boot: int) -> dict:
    """One subset's figures: response lengths, and each scorer's mean / win rate with its interval."""
    answered = [s for s in scored if s["response"] is not None]
    out = {"rows": len(scored), "answered": len(answered),
           "response_words": _mean_words([s["response"] for s in answered]),
           "baseline_words": _mean_words([s["baseline"] for s in answered if s.get("baseline")])}
    if "reward" in wanted:
        out["reward"] = counsel.mean_ci([s["reward"] for s in answered if s.get("reward") is not None], seed, n_boot)
    if "pairwise" in wanted:
        out["pairwise"] = counsel.win_rate([s["pairwise"] for s in answered if s.get("pairwise")], seed, n_boot)
        out["pairwise"]["no_baseline"] = sum(not s.get("baseline") for s in answered)
    if "rubric" in wanted:
        out["rubric"] = counsel.rubric_summary([s["rubric"] for s in answered if s.get("rubric")], principles, seed, n_boot)
    return out


def _scored_rows(rows, responses, baselines, verdicts, rewards, wanted, principles) -> list[dict]:
    """One line per statement: the texts, every judge reply as read, and the reward."""
    out = []
    for r in rows:
        answer, judged = responses.get(r["key"]), verdicts.get(r["key"], {})
        row = {"row": r["row"], "id": r["id"], "risk": r["risk"], "condition": r["condition"], "severity": r["severity"],
               "statement": r["statement"], "response": answer["response"] if answer else None,
               "baseline": baselines.get(r["key"])}
        if "pairwise" in wanted and answer and "model_first" in judged and "baseline_first" in judged:
            first, second = (counsel.parse_verdict(judged[o]) for o in ("model_first", "baseline_first"))
            row["pairwise"] = {"model_first": first, "baseline_first": second, **counsel.combine_orders(first, second)}
        if "rubric" in wanted and answer and "rubric" in judged:
            row["rubric"] = counsel.parse_rubric(judged["rubric"], principles)
        if "reward" in wanted and r["key"] in rewards:
            row["reward"] = rewards[r["key"]]
        row["judge_replies"] = judged
        out.append(row)
    return out


def _mean_words(texts: list[str]) -> float | None:
    return round(statistics.fmean(len(t.split()) for t in texts), 1) if texts else None


# ---------------------------------------------------------------------------------- report tables and figure
def _ci(summary: dict | None, digits: int = 1) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    low, high = summary["ci95"]
    return f"{summary['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _main_table(rows: list[dict]) -> list[str]:
    head = ["model", "dataset", "subset", "answered", "words (baseline)", "reward", "win rate vs baseline", "W/T/L",
            "inconsistent", "unjudged", "rubric overall"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        for subset, s in r["subsets"].items():
            pair = s.get("pairwise") or {}
            win = {"mean": pair.get("win_rate"), "ci95": pair.get("ci95")}
            baseline = f" ({r['baseline']})" if pair and r.get("baseline") else ""
            lines.append("| " + " | ".join([
                r["model"], r["dataset"], subset, f"{s['answered']} of {s['rows']}",
                _fmt(s.get("response_words")) + (f" ({s['baseline_words']})" if pair and s.get("baseline_words") else ""),
                _ci(s.get("reward"), 3), _ci(win) + baseline if pair else "–",
                f"{pair['wins']}/{pair['ties']}/{pair['losses']}" if pair else "–",
                _fmt(pair.get("inconsistent")), _fmt(pair.get("unjudged")),
                _ci((s.get("rubric") or {}).get("overall"), 2)]) + " |")
    return lines


def _rubric_table(rows: list[dict], keys: list[str]) -> list[str]:
    head = ["model", "dataset", "subset", *keys, "rows with every score"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        for subset, s in r["subsets"].items():
            rubric = s.get("rubric")
            if rubric:
                cells = [_ci(rubric.get(k), 2) + (f" (n={rubric[k]['n']})" if rubric.get(k) else "") for k in keys]
                lines.append("| " + " | ".join([r["model"], r["dataset"], subset, *cells,
                                                f"{rubric['overall']['complete_rows']} of {rubric['overall']['rows']}"]) + " |")
    return lines


def figure_panels(rows: list[dict], keys: list[str]) -> list[dict]:
    """What the report's figure draws (`figures.interval_dots`): win rate, rubric overall and reward
    per dataset and subset, and the rubric per principle (subset `all`), one series per model."""
    several_sets = len({r["dataset"] for r in rows}) > 1
    panels = []
    for title, ylabel, ylim, pick in (("win rate vs baseline (%)", "win rate (%)", (-3, 103), lambda s: {
            "mean": (s.get("pairwise") or {}).get("win_rate"), "ci95": (s.get("pairwise") or {}).get("ci95")}),
            ("rubric overall (1-10)", "score", (0.5, 10.5), lambda s: (s.get("rubric") or {}).get("overall")),
            ("reward model score", "reward", None, lambda s: s.get("reward"))):
        series: dict[str, dict] = {}
        groups = []
        for r in rows:
            for subset, s in r["subsets"].items():
                group = f"{r['dataset']}/{subset}" if several_sets else subset
                groups.append(group)
                value = pick(s) or {}
                entry = series.setdefault(r["model"], {"label": r["model"], "points": {}})
                if value.get("mean") is not None:
                    entry["points"][group] = (value["mean"], *value["ci95"])
        panels.append({"title": title, "ylabel": ylabel, "groups": list(dict.fromkeys(groups)),
                       "series": list(series.values()), "reference": 50.0 if "win" in title else None, "ylim": ylim})
    series = {}
    for r in rows:
        rubric = r["subsets"]["all"].get("rubric") or {}
        label = f"{r['model']} ({r['dataset']})" if several_sets else r["model"]
        series[label] = {"label": label, "points": {k: (rubric[k]["mean"], *rubric[k]["ci95"])
                                                    for k in keys if (rubric.get(k) or {}).get("mean") is not None}}
    panels.append({"title": "rubric by principle (all statements)", "ylabel": "score (1-10)", "groups": keys,
                   "series": list(series.values()), "reference": None, "ylim": (0.5, 10.5)})
    return panels


def _print_results(r: dict) -> None:
    for subset, s in r["subsets"].items():
        parts = [f"{s['answered']} answered"]
        if s.get("reward"):
            parts.append(f"reward {_ci(s['reward'], 3)}")
        if s.get("pairwise"):
            p = s["pairwise"]
            parts.append(f"win rate {_ci({'mean': p['win_rate'], 'ci95': p['ci95']})} "
                         f"(W/T/L {p['wins']}/{p['ties']}/{p['losses']}, unjudged {p['unjudged']})")
        if s.get("rubric"):
            parts.append(f"rubric {_ci(s['rubric']['overall'], 2)}")
        print(f"[counsel] {r['model']} {r['dataset']} {subset}: " + "; ".join(parts), flush=True)
    if not r["complete"]:
        print(f"[counsel] INCOMPLETE: {r['rows'] - r['answered']} statements unanswered, failed requests "
              f"{r['failed_requests']} (re-run to retry)", flush=True)


def _fmt(value) -> str:
    return "–" if value is None else str(value)


# ---------------------------------------------------------------------------------- setup helpers
def _scorers(value) -> list[str]:
    wanted = list(dict.fromkeys(names(value)))
    if not wanted:
        raise InputError(f"--scorers must name at least one of {', '.join(SCORERS)}")
    for name in wanted:
        check_choice("scorers", name, SCORERS)
    return wanted


def _statements(data_file, from_records, split, text_field, baseline_field, limit):
    """(rows, source notes, dataset name for the output files)."""
    if data_file and from_records:
        raise InputError("give --data_file or --from_records, not both")
    if from_records:
        files = names(from_records)
        for name in files:
            if not Path(name).exists():  # a folder: the reader's own line
                raise InputError(f"{name}: --from_records file not found")
        rows, notes = counsel.load_record_turns(files, limit)
        return rows, notes, "records-" + model_tag(Path(files[0]).stem)
    source = str(data_file or DEFAULT_DATA)
    rows, notes = counsel.load_statements(source, split=split, text_field=text_field, baseline_field=baseline_field,
                                          limit=limit)
    stem = Path(source).stem if Path(source).suffix else model_tag(source)
    return rows, notes, stem + (f"-{split}" if split else "")


def _baseline_name(wanted, opponent, baseline_file, baseline_field, rows) -> str | None:
    if "pairwise" not in wanted:
        return None
    if opponent is not None:
        return opponent.model or EMBEDDED
    if baseline_file:
        if not Path(baseline_file).is_file():
            raise InputError(f"{baseline_file}: --baseline_file not found")
        return f"file {Path(baseline_file).name}"
    if any(r.get("baseline") for r in rows):
        return f"data field {baseline_field}"
    raise InputError(f"--scorers pairwise needs a baseline: --baseline_model, --baseline_file, or data whose rows have "
                     f"a {baseline_field!r} field (--baseline_field)")


def _routes_line(contestant, judge, opponent) -> str:
    """Where every role's calls (and the client statements in them) go."""
    parts = [f"model {contestant.model or 'embedded'!r} -> {contestant.where()}"]
    for role, where in (("judge", judge), ("baseline", opponent)):
        if where is contestant:
            parts.append(f"{role} -> the evaluated model")
        elif where is not None:
            parts.append(f"{role} {where.model or 'embedded'!r} -> {where.where()}")
    return "; ".join(parts)


def _settings(where, generation: dict) -> dict:
    """What makes one model's responses: the model, where it runs, and the decoding settings."""
    return {"model": where.model or EMBEDDED, "runs_on": runs_on(where), "system": generation["system"],
            # a local model retrained into the same folder is another model (hub ids and API names: none)
            **_fingerprint(where),
            "temperature": generation["temperature"], "max_new_tokens": generation["max_new_tokens"],
            "seed": generation["seed"],
            "dtype": None if where.kind == "openai" else cli.auto_dtype(generation["dtype"], generation["device"])}


def _entries(path: Path) -> list[dict]:
    repair_torn_tail(path)
    return read_jsonl(path)


def _on_file(samples: Path, run_hash: str) -> dict[str, dict]:
    """Row key -> answer, for the answers on file made with these settings."""
    return {e["id"]: e for e in _entries(samples) if e.get("settings_hash") == run_hash and "response" in e}


def _judged(path: Path, hashes: set[str]) -> dict[str, dict]:
    return {e["id"]: e for e in _entries(path) if e.get("settings_hash") in hashes and "reply" in e}


COMMANDS = {"run": run, "report": report}


def _exit_code(command, out) -> int:
    if command is report:
        print(out)
        return 0
    return 0 if out["complete"] else 1


def main(argv: list[str] | None = None) -> int:
    """`Counsel_eval.py [run] --model ...` or `report --output_dir ...`. Exit 0 when every call was
    answered, 1 when some failed (a re-run retries them), 2 on bad input."""
    return cli.main(COMMANDS, run, _exit_code, argv)


if __name__ == "__main__":
    sys.exit(main())
