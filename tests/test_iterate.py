"""iterate.py: the order of the steps, each iteration's model feeding the next, the epoch schedules,
resume after a failed step, refusal of changed settings (and --restart), the OpenAI path through
the real data_process.py against the fake server, --objective (sft, dpo, sft+dpo) reaching the
fine-tuning stage and the summary, the opt-in counseling evaluation (Counsel_eval.py: one judge for
every iteration, its scores in the summary), and bad input.

The stages are replaced by `Stages`, which checks every command against the real stage's
signature (as fire would parse it), records it and writes the files the real stage would."""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, embedded_tokenizer, make_tiny_llama
from fake_openai import FakeOpenAI
from fire.parser import DefaultParseValue

import arena_med
import Counsel_eval
import data_process
import IMHI_eval
import iterate
import llama_finetune
import MedQA_eval
from mentalarena.store.jsonl import append_jsonl

MODULES = {"arena_med.py": arena_med, "llama_finetune.py": llama_finetune, "data_process.py": data_process,
           "MedQA_eval.py": MedQA_eval, "IMHI_eval.py": IMHI_eval, "Counsel_eval.py": Counsel_eval}
KEY = "sk-proj-ITERATE0TEST0KEY0abc123"
QUICK = ["--limit", "2", "--max_steps", "3", "--method", "lora", "--eval_limit", "4"]


class Stages:
    """Stands in for iterate.run_stage. `fail` maps (script, n-th call of it) to an exit status;
    `real` maps a script to a function that runs the real stage on the argv instead."""

    def __init__(self, fail: dict | None = None, real: dict | None = None):
        self.calls: list[dict] = []
        self.argvs: list[list[str]] = []  # the command lines as given, before any env: value is read
        self.fail = fail or {}
        self.real = real or {}

    def __call__(self, script: str, argv: list[str], launcher: list[str] | None = None) -> int:
        command = argv[0] if argv and not argv[0].startswith("--") else None
        args = {}
        self.argvs.append(list(argv))
        for flag in argv[1 if command else 0:]:
            key, _, value = flag.removeprefix("--").partition("=")
            # an address handed over in the environment, read back as the stage reads it (backends.endpoint_list)
            args[key] = os.environ[value[4:]] if value.startswith("env:") else DefaultParseValue(value)
        inspect.signature(getattr(MODULES[script], command or "run")).bind(**args)  # the real stage takes it
        self.calls.append({"script": script, "command": command, "args": args, "launcher": launcher})
        code = self.fail.get((script, sum(c["script"] == script for c in self.calls)), 0)
        if code:
            return code
        if script in self.real:
            return self.real[script](argv)
        FAKES[script](args)
        return 0

    def of(self, script: str) -> list[dict]:
        return [c["args"] for c in self.calls if c["script"] == script]


def _iteration(folder: str | Path) -> int:
    return int(Path(folder).name.removeprefix("iter"))


def fake_arena(args: dict) -> None:
    """Records as arena_med.py writes them: the six SFT fields plus the searches' scored tries (one
    treatment and one medication preference pair each; no diagnoses, so no encoder is needed)."""
    Path(args["output_file"]).parent.mkdir(parents=True, exist_ok=True)
    for i in range(args.get("limit", 3)):
        append_jsonl(args["output_file"], {
            "symptom": f"Patient {i} sleeps badly.", "illness": "Depression", "treatment": "CBT",
            "explain_t": "It helps.", "medicine": "None", "explain_m": "-", "patient_id": f"s-{i}", "sample": 0,
            "treatment_search": {"tries": [{"candidate": "Rest.", "score": 2}, {"candidate": "CBT.", "score": 8}]},
            "medicine_search": {"tries": [{"candidate": "Sertraline.", "score": 7},
                                          {"candidate": "Diazepam.", "score": 3}]}})


def fake_finetune(args: dict) -> None:
    out = Path(args["output_dir"]) / args["new_name"]
    assert not out.exists(), "a re-run must not find a stale model"
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "config.json").write_text("{}")
    k = _iteration(args["output_dir"])
    # as llama_finetune.py writes it; without --objective, as it wrote it before (no objective, no pairs)
    preference = {"objective": args["objective"], "pairs": 10 * k + 7} if "objective" in args else {}
    (out / "finetune_config.json").write_text(json.dumps({
        "summary": {"examples": 4, "steps": args.get("max_steps"), "epochs": args["nepoch"], "train_loss": 3.0 - k / 2,
                    "loss_first": 3.5, "loss_last": 2.5, **preference}, "merged": str(out / "merged")}))


def fake_medqa(args: dict) -> None:
    out = Path(args["output_dir"]) / "m"
    out.mkdir(parents=True, exist_ok=True)
    sets = ["MedQA", "MedMCQA", "PubMedQA"] if "data_dir" in args else [args["dataset"]]
    k = _iteration(Path(args["output_dir"]).parent.parent)
    for name in sets:
        accuracy = 40.0 + 10 * k + {"MedQA": 0, "MedMCQA": 1, "PubMedQA": 2}[name]
        # rule R (the reference's scorer); iteration 0 stands for a results file without it
        reference = {"accuracy_reference": 10.0 + 5 * k + {"MedQA": 0, "MedMCQA": 1, "PubMedQA": 4}[name]} if k else {}
        (out / f"{name}.results.json").write_text(json.dumps({"benchmark": name, "accuracy": accuracy, "n": 4,
                                                              **reference}))


def fake_imhi(args: dict) -> None:
    out = Path(args["output_dir"]) / "m" / "IMHI"
    out.mkdir(parents=True, exist_ok=True)
    k = _iteration(Path(args["output_dir"]).parent.parent)
    for i, name in enumerate(["CAMS", "dreaddit"]):
        (out / f"{name}.results.json").write_text(json.dumps({
            "test_set": "IMHI", "dataset": name,
            "scores": {"reference": {"weighted_f1": 1.0}, "fixed": {"weighted_f1": 20.0 + k + i}}}))


def fake_counsel(args: dict) -> None:
    """A results file as Counsel_eval.py writes it (the fields the loop reads): win rate 30 + 10k, rubric
    5 + k/2 over all statements, 10 and 1 below on the risk ones; a reward where --scorers names it."""
    k = _iteration(Path(args["output_dir"]).parent.parent)
    out = Path(args["output_dir"]) / "m"
    out.mkdir(parents=True, exist_ok=True)
    reward = "reward" in str(args.get("scorers", ""))

    def subset(shift: float) -> dict:
        return {"rows": 4, "answered": 4, "pairwise": {"win_rate": 30.0 + 10 * k - 10 * shift, "ci95": [0.0, 100.0],
                                                       "wins": 1, "ties": 1, "losses": 1, "unjudged": 0},
                "rubric": {"overall": {"mean": 5.0 + k / 2 - shift, "ci95": [1.0, 10.0]}, "empathy": {"mean": 6.0}},
                **({"reward": {"mean": 0.12345 + k - shift, "ci95": [0.0, 1.0]}} if reward else {})}
    (out / "counsel_sample.results.json").write_text(json.dumps({
        "model": "m", "dataset": "counsel_sample", "complete": True, "baseline": "data field reference_response",
        "judge": {"model": args["judge_model"]}, "principles": [{"key": "empathy", "title": "Empathy"}],
        "subsets": {"all": subset(0), "risk": subset(1), "no_risk": subset(0)}}))


FAKES = {"arena_med.py": fake_arena, "llama_finetune.py": fake_finetune, "MedQA_eval.py": fake_medqa,
         "IMHI_eval.py": fake_imhi, "Counsel_eval.py": fake_counsel}


@pytest.fixture
def stages(monkeypatch):
    def install(**kwargs) -> Stages:
        fake = Stages(**kwargs)
        monkeypatch.setattr(iterate, "run_stage", fake)
        return fake
    return install


def state_of(work: Path) -> dict:
    return json.loads((work / "state.json").read_text())


def merged(work: Path, k: int) -> str:
    return str(work.resolve() / f"iter{k}" / "model" / "merged")


# ---------------------------------------------------------------------------------- the loop
def test_steps_run_in_order_and_each_model_feeds_the_next(tmp_path, stages, capsys):
    work, fake = tmp_path / "run", stages()
    code = iterate.main(["--work_dir", str(work), "--iterations", "2", *QUICK,
                         "--arena_args", '{"max_new_tokens": 32, "progress": false}'])
    assert code == 0
    evals = [("MedQA_eval.py", "MedQA"), ("MedQA_eval.py", "PubMedQA"), ("IMHI_eval.py", None)]
    one = [("arena_med.py", None), ("llama_finetune.py", None), *evals]
    assert [(c["script"], c["args"].get("dataset")) for c in fake.calls] == evals + one + one

    # iteration 1 starts from the embedded model (no --base_model), iteration 2 from iteration 1's merged model
    assert [a.get("base_model") for a in fake.of("arena_med.py")] == [None, merged(work, 1)]
    assert [a.get("base_model") for a in fake.of("llama_finetune.py")] == [None, merged(work, 1)]
    assert [a.get("model") for a in fake.of("IMHI_eval.py")] == [None, merged(work, 1), merged(work, 2)]
    assert [a.get("model") for a in fake.of("MedQA_eval.py")][::2] == [None, merged(work, 1), merged(work, 2)]
    # the paper's first two epochs, the merge, the stage flags passed through
    assert [(a["nepoch"], a["merge"], a["max_steps"], a["method"]) for a in fake.of("llama_finetune.py")] == \
        [(4, True, 3, "lora"), (5, True, 3, "lora")]
    arena = fake.of("arena_med.py")[1]
    assert (arena["max_new_tokens"], arena["progress"], arena["limit"]) == (32, False, 2)
    assert arena["output_file"] == str(work.resolve() / "iter2" / "records.jsonl")
    assert fake.of("llama_finetune.py")[1]["data_files"] == arena["output_file"]
    assert fake.of("MedQA_eval.py")[0]["data_file"].endswith("data/qa_sample/medqa.jsonl")
    assert {a["limit"] for a in fake.of("MedQA_eval.py") + fake.of("IMHI_eval.py")} == {4}

    state = state_of(work)
    assert [(e["iteration"], e["step"], e["status"]) for e in state["steps"].values()] == \
        [(0, "eval_qa", "done"), (0, "eval_imhi", "done")] + [
            (k, s, "done") for k in (1, 2) for s in ("generate", "finetune", "eval_qa", "eval_imhi")]
    assert state["steps"]["2/finetune"]["outputs"]["model"] == "<work_dir>/iter2/model/merged"
    assert state["steps"]["1/generate"]["calls"][0]["args"]["output_file"] == "<work_dir>/iter1/records.jsonl"

    rows = [line for line in (work / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[:5] == ["| iteration | model | objective | epochs | records | pairs | train loss | QA acc | QA acc (rule R) "
                        "| IMHI w-F1 |",
                        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                        "| 0 | embedded | – | – | – | – | – | 41.00 | – | 20.50 |",
                        "| 1 | iter1/model/merged | sft | 4 | 2 | – | 2.5000 | 51.00 | 17.00 | 21.50 |",
                        "| 2 | iter2/model/merged | sft | 5 | 2 | – | 2.0000 | 61.00 | 22.00 | 22.50 |"]
    assert all("objective" not in a for a in fake.of("llama_finetune.py"))  # sft: the paper's command line
    # per set: each QA set with its rule-R score beside it, then the IMHI sets
    assert rows[5:7] == ["| iteration | MedQA | MedQA (rule R) | PubMedQA | PubMedQA (rule R) | IMHI/CAMS | IMHI/dreaddit |",
                         "| --- | --- | --- | --- | --- | --- | --- |"]
    assert rows[7:] == ["| 0 | 40.00 | – | 42.00 | – | 20.00 | 21.00 |", "| 1 | 50.00 | 15.00 | 52.00 | 19.00 | 21.00 | 22.00 |",
                        "| 2 | 60.00 | 20.00 | 62.00 | 24.00 | 22.00 | 23.00 |"]
    assert state["steps"]["2/eval_qa"]["outputs"]["accuracy_reference"] == 22.0
    out = capsys.readouterr().out
    assert "[iterate] iteration 1/2 finetune: llama_finetune.py --method=lora" in out
    assert "| 2 | iter2/model/merged | sft | 5 | 2 | – | 2.0000 | 61.00 | 22.00 | 22.50 |" in out
    # the figure beside summary.md, named on its last line
    assert (work / "summary.png").read_bytes().startswith(b"\x89PNG") and (work / "summary.png").stat().st_size > 5000
    assert (work / "summary.md").read_text().endswith("\nFigure: [summary.png](summary.png), each benchmark by iteration.\n")


def test_the_summary_figure_plots_the_summary_tables_numbers(tmp_path, stages):
    stages()
    result = iterate.run(work_dir=str(tmp_path / "run"), iterations=2, limit=2, max_steps=3, method="lora", eval_limit=4)
    panels = {p["title"]: {s["label"]: s["points"] for s in p["series"]}
              for p in iterate.summary_figure_panels(result["rows"])}
    assert panels == {
        "QA accuracy (robust)": {"MedQA": [(0, 40.0), (1, 50.0), (2, 60.0)], "PubMedQA": [(0, 42.0), (1, 52.0), (2, 62.0)],
                                 "mean over the sets": [(0, 41.0), (1, 51.0), (2, 61.0)]},
        # iteration 0's results files carry no rule-R score: no point there
        "QA accuracy (rule R)": {"MedQA": [(0, None), (1, 15.0), (2, 20.0)], "PubMedQA": [(0, None), (1, 19.0), (2, 24.0)],
                                 "mean over the sets": [(0, None), (1, 17.0), (2, 22.0)]},
        "IMHI weighted F1 (`fixed` labels)": {"IMHI/CAMS": [(0, 20.0), (1, 21.0), (2, 22.0)],
                                              "IMHI/dreaddit": [(0, 21.0), (1, 22.0), (2, 23.0)],
                                              "mean over the sets": [(0, 20.5), (1, 21.5), (2, 22.5)]},
        "train loss (the objective's own)": {"train loss": [(0, None), (1, 2.5), (2, 2.0)]}}


def test_the_summary_figure_is_written_with_nothing_to_plot(tmp_path, stages):
    work = tmp_path / "run"
    stages(fail={("arena_med.py", 1): 1})  # no evaluation, and the first step fails: no number at all
    assert iterate.main(["--work_dir", str(work), "--eval", "none", *QUICK]) == 1
    assert (work / "summary.png").stat().st_size > 0 and "summary.png" in (work / "summary.md").read_text()


@pytest.mark.parametrize("args, schedule", [
    ([], [4, 5, 7, 7]),                                 # the paper's Llama schedule, one iteration per value
    (["--iterations", "2"], [4, 5]),
    (["--epochs", "3", "--iterations", "3"], [3, 3, 3]),  # one value for every iteration
    (["--epochs", "2,1.5"], [2, 1.5]),
])
def test_epoch_schedule(tmp_path, stages, args, schedule):
    fake = stages()
    assert iterate.main(["--work_dir", str(tmp_path / "w"), "--eval", "none", *QUICK, *args]) == 0
    assert [a["nepoch"] for a in fake.of("llama_finetune.py")] == schedule
    assert all(c["script"] in ("arena_med.py", "llama_finetune.py") for c in fake.calls)


def test_a_failed_step_is_resumed_and_finished_steps_are_not_rerun(tmp_path, stages, capsys):
    work = tmp_path / "run"
    argv = ["--work_dir", str(work), "--iterations", "2", "--eval", "qa", "--finetune_launcher", "accelerate launch",
            *QUICK]
    fake = stages(fail={("llama_finetune.py", 2): 1})
    assert iterate.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: iteration 2 finetune: llama_finetune.py failed (exit status 1)" in err
    assert "re-run the same command" in err
    steps = state_of(work)["steps"]
    assert (steps["2/generate"]["status"], steps["2/finetune"]["status"]) == ("done", "failed")
    assert "2/eval_qa" not in steps and fake.calls[-1]["launcher"] == ["accelerate", "launch"]
    assert all(c["launcher"] is None for c in fake.calls if c["script"] != "llama_finetune.py")

    again = stages()
    assert iterate.main(argv) == 0
    assert [c["script"] for c in again.calls] == ["llama_finetune.py", "MedQA_eval.py", "MedQA_eval.py"]
    assert again.calls[0]["args"]["base_model"] == merged(work, 1)
    assert "iteration 2 generate: done earlier (records 2); skipped" in capsys.readouterr().out
    assert state_of(work)["steps"]["2/finetune"]["status"] == "done"


def test_a_stage_that_rejects_its_input_exits_2_and_leaves_no_record(tmp_path, stages, capsys):
    work = tmp_path / "run"
    stages(fail={("arena_med.py", 1): 2})
    assert iterate.main(["--work_dir", str(work), "--eval", "none", *QUICK]) == 2
    assert "arena_med.py rejected its input (exit status 2" in capsys.readouterr().err
    assert state_of(work)["steps"] == {}


def test_a_stage_that_succeeds_without_its_outputs_is_a_failed_step(tmp_path, stages, capsys):
    work = tmp_path / "run"
    stages(real={"llama_finetune.py": lambda argv: 0})
    assert iterate.main(["--work_dir", str(work), "--eval", "none", *QUICK]) == 1
    assert "error: iteration 1 finetune: the stage ended without writing" in capsys.readouterr().err
    assert state_of(work)["steps"]["1/finetune"]["status"] == "failed"


def test_changed_settings_are_refused_and_restart_redoes_only_what_depends_on_them(tmp_path, stages, capsys):
    work = tmp_path / "run"
    base = ["--work_dir", str(work), "--iterations", "2", "--eval", "qa", "--limit", "2", "--method", "lora",
            "--eval_limit", "4"]
    stages()
    assert iterate.main([*base, "--max_steps", "3"]) == 0
    before = (work / "state.json").read_bytes()

    fake = stages()
    assert iterate.main([*base, "--max_steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {work.resolve() / 'state.json'}: iteration 1 finetune ran with other settings "
                   "(--max_steps 3 -> 4); re-run with those, use another --work_dir, or pass --restart to discard "
                   "its outputs")
    assert fake.calls == [] and (work / "state.json").read_bytes() == before

    # a flag that changes only how a stage runs is no change
    assert iterate.main([*base, "--max_steps", "3", "--arena_args", '{"concurrency": 2}']) == 0
    assert fake.calls == []

    # an evaluation setting: --restart redoes the evaluations only
    assert iterate.main([*base, "--max_steps", "3", "--eval_limit", "5", "--restart"]) == 0
    assert [c["script"] for c in fake.calls] == ["MedQA_eval.py"] * 6
    assert "--restart: removing" in capsys.readouterr().out

    # a fine-tuning setting: --restart redoes that fine-tuning and everything after it, not the self-play before it
    redo = stages()
    assert iterate.main([*base, "--max_steps", "4", "--eval_limit", "5", "--restart"]) == 0
    scripts = [c["script"] for c in redo.calls]
    assert scripts == ["llama_finetune.py", "MedQA_eval.py", "MedQA_eval.py", "arena_med.py", "llama_finetune.py",
                       "MedQA_eval.py", "MedQA_eval.py"]
    assert not (work / "iter2" / "records.jsonl.tmp").exists()
    assert len((work / "iter2" / "records.jsonl").read_text().splitlines()) == 2  # rewritten, not appended


def test_a_training_batch_size_is_a_change_and_a_stage_s_running_flag_is_not(tmp_path, stages, capsys):
    """Which flags cannot change a step's output is the stage's own list: a new training batch size
    makes another model (today it was ignored, and the old model kept), more self-play concurrency
    does not."""
    work = tmp_path / "run"
    base = ["--work_dir", str(work), "--iterations", "1", "--eval", "none", *QUICK]
    stages()
    assert iterate.main([*base, "--finetune_args", '{"batch_size": 4}']) == 0
    fake = stages()
    assert iterate.main([*base, "--finetune_args", '{"batch_size": 8}']) == 2
    assert "iteration 1 finetune ran with other settings (--batch_size 4 -> 8)" in capsys.readouterr().err
    assert iterate.main([*base, "--finetune_args", '{"batch_size": 4}', "--arena_args",
                         '{"concurrency": 2, "max_batch_size": 4}']) == 0
    assert fake.calls == []


def test_an_input_file_corrected_in_place_is_a_change(tmp_path, stages, capsys):
    """Inputs are compared by content: a patients file fixed under the same name is another input."""
    patients = tmp_path / "patients.json"
    patients.write_text((ROOT / "data" / "sample_patients.json").read_text())
    work = tmp_path / "run"
    base = ["--work_dir", str(work), "--iterations", "1", "--eval", "none", "--patients_file", str(patients), *QUICK]
    stages()
    assert iterate.main(base) == 0
    fake = stages()
    assert iterate.main(base) == 0 and fake.calls == []  # the same content: nothing to do
    patients.write_text(patients.read_text().replace("Priya", "Priyanka", 1))
    assert iterate.main(base) == 2
    assert "iteration 1 generate ran with other settings (--patients_file: the content changed)" in capsys.readouterr().err
    assert fake.calls == []
    assert iterate.main([*base, "--restart"]) == 0
    assert [c["script"] for c in fake.calls] == ["arena_med.py", "llama_finetune.py"]


def test_the_loop_says_where_each_stage_s_data_goes_before_the_first_step(tmp_path, stages, capsys):
    stages()
    assert iterate.main(["--work_dir", str(tmp_path / "run"), "--iterations", "1", "--eval", "qa,counsel",
                         "--judge_model", "gpt-4o-2024-08-06", *QUICK]) == 0
    out = capsys.readouterr().out
    first_step = out.index("[iterate] iteration 0/1 eval_qa")
    routes = [line for line in out[:first_step].splitlines() if "where the data goes" in line]
    assert len(routes) == 4, out[:first_step]
    assert "generate: patients to the model -> a local model in this process; to the judge -> 'gpt-4o-2024-08-06' at " \
           "the OpenAI API" in routes[0]
    assert "finetune: the records stay on this machine" in routes[1]
    assert "eval_counsel: client statements -> a local model in this process; to the judge -> the model" in routes[3]


def test_openai_path_takes_each_fine_tuned_id_from_data_process(tmp_path, stages, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    work = tmp_path / "gpt"
    with FakeOpenAI(job_statuses=("queued", "running", "succeeded")) as server:
        fake = stages(real={"data_process.py": data_process.main})
        code = iterate.main(["--work_dir", str(work), "--backend", "openai", "--api_base", server.base_url,
                             "--eval", "qa", "--limit", "3", "--judge_model", "gpt-4-turbo-2024-04-09",
                             "--finetune_args", '{"min_examples": 0, "poll_seconds": 0.01}'])
    assert code == 0
    jobs = [c for c in server.job_creates]
    assert [j["method"]["supervised"]["hyperparameters"]["n_epochs"] for j in jobs] == [4, 6]  # the paper's GPT schedule
    first = state_of(work)["steps"]["1/finetune"]["outputs"]["model"]
    assert first.startswith("ft:gpt-3.5-turbo-0125:fake::")
    assert [j["model"] for j in jobs] == ["gpt-3.5-turbo-0125", first]
    assert [a["base_model"] for a in fake.of("arena_med.py")] == ["gpt-3.5-turbo-0125", first]
    assert {a["judge_model"] for a in fake.of("arena_med.py")} == {"gpt-4-turbo-2024-04-09"}
    second = state_of(work)["steps"]["2/finetune"]["outputs"]["model"]
    assert [a["model"] for a in fake.of("MedQA_eval.py")][::2] == ["gpt-3.5-turbo-0125", first, second]
    assert {a["api_base"] for c in fake.calls for a in [c["args"]]} == {server.base_url}
    assert all(a["wait"] is True for a in fake.of("data_process.py"))
    assert [len(u["content"].splitlines()) for u in server.uploads] == [6, 6]  # 3 records, 2 pairs each
    written = "".join(p.read_text() for p in work.rglob("*") if p.is_file() and p.suffix in (".json", ".md"))
    assert KEY not in written and second in (work / "summary.md").read_text()
    assert all("method" not in a for a in fake.of("data_process.py"))  # sft: the paper's command line
    outputs = state_of(work)["steps"]["2/finetune"]["outputs"]
    assert (outputs["objective"], outputs["pairs"], outputs["examples"]) == ("sft", None, 6)


def test_arena_args_pass_the_score_parser_through(tmp_path, stages):
    fake = stages()
    assert iterate.main(["--work_dir", str(tmp_path / "run"), "--iterations", "1", *QUICK,
                         "--arena_args", '{"score_parser": "reference"}']) == 0
    assert [a["score_parser"] for a in fake.of("arena_med.py")] == ["reference"]


# ---------------------------------------------------------------------------------- data selection
def test_selection_flags_reach_the_finetune_stage_through_finetune_args(tmp_path, stages, capsys):
    """--finetune_args takes llama_finetune.py's --select flags as they are: no flag of iterate.py's own."""
    from mentalarena.training.selection import check_options

    work, fake = tmp_path / "run", stages()
    assert iterate.main(["--work_dir", str(work), "--iterations", "2", "--eval", "none", *QUICK, "--finetune_args",
                         '{"select": "ppl_iqr,kcenter", "select_size": 100, "iqr_factor": 2}']) == 0
    calls = fake.of("llama_finetune.py")
    assert len(calls) == 2
    for args in calls:  # as the stage's fire parses its command line (the comma list quoted: it stays text)
        assert (args["select"], args["select_size"], args["iqr_factor"]) == ("ppl_iqr,kcenter", 100, 2)
        assert check_options(args["select"], args["select_size"], args["iqr_factor"]) == ["ppl_iqr", "kcenter"]
    assert "ppl_iqr,kcenter'\"'\"'' --select_size=100 --iqr_factor=2 --new_name=model" in capsys.readouterr().out
    # a typo in a selection flag stops the loop before anything runs
    fake = stages()
    assert iterate.main(["--work_dir", str(tmp_path / "other"), *QUICK, "--finetune_args", '{"select_sizes": 5}']) == 2
    assert "llama_finetune.py has no flag --select_sizes" in capsys.readouterr().err and fake.calls == []


# ---------------------------------------------------------------------------------- --objective
@pytest.mark.parametrize("objective", ["dpo", "sft+dpo"])
def test_the_objective_reaches_llama_finetune_and_the_summary_shows_its_pairs(tmp_path, stages, capsys, objective):
    work, fake = tmp_path / "run", stages()
    assert iterate.main(["--work_dir", str(work), "--iterations", "2", "--eval", "none", "--objective", objective,
                         *QUICK, "--finetune_args", '{"beta": 0.2, "min_margin": 3}']) == 0
    assert [(a["objective"], a["beta"], a["min_margin"], a["nepoch"]) for a in fake.of("llama_finetune.py")] == \
        [(objective, 0.2, 3, 4), (objective, 0.2, 3, 5)]
    assert [c["args"]["objective"] for c in state_of(work)["steps"]["1/finetune"]["calls"]] == [objective]
    assert state_of(work)["settings"]["objective"] == objective
    outputs = state_of(work)["steps"]["2/finetune"]["outputs"]
    assert (outputs["objective"], outputs["pairs"]) == (objective, 27)  # read back from finetune_config.json
    summary = (work / "summary.md").read_text()
    assert f"open backend, objective {objective}; starting model embedded" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    assert rows[2:] == [f"| 1 | iter1/model/merged | {objective} | 4 | 2 | 17 | 2.5000 | – | – | – |",
                        f"| 2 | iter2/model/merged | {objective} | 5 | 2 | 27 | 2.0000 | – | – | – |"]
    assert "pairs: the preference pairs the fine-tuning trained on" in summary
    out = capsys.readouterr().out
    assert f"[iterate] open backend, objective {objective}, 2 iteration(s)" in out
    assert f"llama_finetune.py --method=lora --max_steps=3 --objective={objective} --beta=0.2 --min_margin=3" in out


def test_a_changed_objective_is_refused_and_restart_redoes_only_the_fine_tuning(tmp_path, stages, capsys):
    work = tmp_path / "run"
    base = ["--work_dir", str(work), "--iterations", "1", "--eval", "none", *QUICK]
    stages()
    assert iterate.main(base) == 0
    fake = stages()
    assert iterate.main([*base, "--objective", "dpo"]) == 2
    err = capsys.readouterr().err
    assert "iteration 1 finetune ran with other settings (--objective None -> dpo)" in err and fake.calls == []

    assert iterate.main([*base, "--objective", "dpo", "--restart"]) == 0
    assert [(c["script"], c["args"].get("objective")) for c in fake.calls] == [("llama_finetune.py", "dpo")]
    rows = [line for line in (work / "summary.md").read_text().splitlines() if line.startswith("| 1 ")]
    assert rows == ["| 1 | iter1/model/merged | dpo | 4 | 2 | 17 | 2.5000 | – | – | – |"]
    assert iterate.main([*base, "--objective", "dpo"]) == 0 and len(fake.calls) == 1  # the same: nothing to do


def test_openai_dpo_jobs_start_from_a_dpo_capable_model_and_count_their_pairs(tmp_path, stages, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    work = tmp_path / "gpt"
    with FakeOpenAI(job_statuses=("queued", "succeeded")) as server:
        fake = stages(real={"data_process.py": data_process.main})
        code = iterate.main(["--work_dir", str(work), "--backend", "openai", "--api_base", server.base_url,
                             "--objective", "dpo", "--eval", "none", "--limit", "3",
                             "--finetune_args", '{"min_examples": 0, "poll_seconds": 0.01, "beta": 0.1}'])
    assert code == 0
    assert [a["method"] for a in fake.of("data_process.py")] == ["dpo", "dpo"]
    assert [j["method"] for j in server.job_creates] == [
        {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": n, "beta": 0.1}}} for n in (4, 6)]
    first = state_of(work)["steps"]["1/finetune"]["outputs"]["model"]
    assert first.startswith("ft:gpt-4.1-mini-2025-04-14:fake::")
    assert [j["model"] for j in server.job_creates] == ["gpt-4.1-mini-2025-04-14", first]
    assert [a["base_model"] for a in fake.of("arena_med.py")] == ["gpt-4.1-mini-2025-04-14", first]
    # 3 records: a treatment pair (gap 6) and a medication pair (gap 4) each
    assert [len(u["content"].splitlines()) for u in server.uploads] == [6, 6]
    assert (work / "iter1" / "finetune.openai_dpo.jsonl").is_file()
    assert not (work / "iter1" / "finetune.openai.jsonl").exists()
    outputs = state_of(work)["steps"]["2/finetune"]["outputs"]
    assert (outputs["objective"], outputs["pairs"]) == ("dpo", 6)
    rows = [line for line in (work / "summary.md").read_text().splitlines() if line.startswith("| 1 ")]
    assert rows == [f"| 1 | {first} | dpo | 4 | 3 | 6 | – | – | – | – |"]


# ---------------------------------------------------------------------------------- --eval counsel
def test_counsel_eval_runs_each_model_with_one_judge_and_its_scores_reach_the_summary(tmp_path, stages, capsys):
    work, fake = tmp_path / "run", stages()
    assert iterate.main(["--work_dir", str(work), "--iterations", "2", "--eval", "qa,counsel", *QUICK]) == 0
    assert [c["script"] for c in fake.calls][:3] == ["MedQA_eval.py", "MedQA_eval.py", "Counsel_eval.py"]
    counsel = fake.of("Counsel_eval.py")
    assert [a.get("model") for a in counsel] == [None, merged(work, 1), merged(work, 2)]
    assert [a["output_dir"] for a in counsel] == [str(work.resolve() / f"iter{k}" / "eval" / "counsel") for k in (0, 1, 2)]
    # the embedded model judges every iteration, also the fine-tuned ones; --eval_limit is its --limit;
    # no --counsel_data: the bundled sample (no --data_file)
    assert [(a["judge_model"], a["limit"], "data_file" in a, "api_base" in a) for a in counsel] == \
        [("embedded", 4, False, False)] * 3
    outputs = state_of(work)["steps"]["2/eval_counsel"]["outputs"]
    assert (outputs["win_rate"], outputs["rubric_overall"], outputs["reward"], outputs["complete"]) == (50.0, 6.0, None, True)
    assert (outputs["risk_win_rate"], outputs["risk_rubric_overall"], outputs["judge"]) == (40.0, 5.0, "embedded")
    assert "iteration 2 eval_counsel: done in" in capsys.readouterr().out

    summary = (work / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    assert rows[:5] == ["| iteration | model | objective | epochs | records | pairs | train loss | QA acc | QA acc (rule R) "
                        "| IMHI w-F1 | counsel win % | counsel rubric |",
                        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                        "| 0 | embedded | – | – | – | – | – | 41.00 | – | – | 30.00 | 5.00 |",
                        "| 1 | iter1/model/merged | sft | 4 | 2 | – | 2.5000 | 51.00 | 17.00 | – | 40.00 | 5.50 |",
                        "| 2 | iter2/model/merged | sft | 5 | 2 | – | 2.0000 | 61.00 | 22.00 | – | 50.00 | 6.00 |"]
    assert rows[5] == ("| iteration | MedQA | MedQA (rule R) | PubMedQA | PubMedQA (rule R) | counsel win % (risk) "
                       "| counsel rubric (risk) |")
    assert rows[7:] == ["| 0 | 40.00 | – | 42.00 | – | 20.00 | 4.00 |", "| 1 | 50.00 | 15.00 | 52.00 | 19.00 | 30.00 | 4.50 |",
                        "| 2 | 60.00 | 20.00 | 62.00 | 24.00 | 40.00 | 5.00 |"]
    assert "judged by embedded in every iteration." in summary and "evaluations: qa, counsel." in summary

    panels = {p["title"]: {s["label"]: s["points"] for s in p["series"]}
              for p in iterate.summary_figure_panels(iterate.summary_rows(iterate.make_plan(**{
                  **{k: p.default for k, p in inspect.signature(iterate.run).parameters.items()},
                  "work_dir": str(work), "iterations": 2, "eval": "qa,counsel"}), state_of(work)))}
    assert panels["counsel win rate vs baseline (ties half)"] == {
        "risk statements": [(0, 20.0), (1, 30.0), (2, 40.0)], "all statements": [(0, 30.0), (1, 40.0), (2, 50.0)]}
    assert panels["counsel rubric overall (judge, 1-10)"] == {
        "risk statements": [(0, 4.0), (1, 4.5), (2, 5.0)], "all statements": [(0, 5.0), (1, 5.5), (2, 6.0)]}
    assert "counsel reward model score" not in panels  # no reward scorer: no panel


@pytest.mark.parametrize("flags, judge", [
    ([], "org/starter"),                                                 # the starting model
    (["--judge_model", "org/big-judge"], "org/big-judge"),               # the loop's judge, local like the model
    # the loop's judge runs on the OpenAI API, a third party to a local model: not sent there unasked
    (["--judge_model", "gpt-4o-2024-08-06"], "org/starter"),
    (["--judge_model", "gpt-4o-2024-08-06", "--counsel_args", '{"judge_model": "org/judge"}'], "org/judge"),
    (["--counsel_args", '{"judge_model": "gpt-4o-2024-08-06"}'], "gpt-4o-2024-08-06"),  # named for counseling
])
def test_the_counsel_judge_is_the_same_in_every_iteration(tmp_path, stages, flags, judge):
    statements = tmp_path / "statements.jsonl"
    append_jsonl(statements, {"statement": "I can't sleep.", "reference_response": "That sounds hard."})
    fake = stages()
    assert iterate.main(["--work_dir", str(tmp_path / "run"), "--iterations", "2", "--eval", "counsel",
                         "--base_model", "org/starter", "--counsel_data", str(statements), *QUICK, *flags]) == 0
    counsel = fake.of("Counsel_eval.py")
    assert [a["model"] for a in counsel] == ["org/starter", merged(tmp_path / "run", 1), merged(tmp_path / "run", 2)]
    assert [(a["judge_model"], a["data_file"]) for a in counsel] == [(judge, str(statements.resolve()))] * 3


def test_a_served_loop_sends_the_counsel_model_and_its_judge_to_the_server(tmp_path):
    """The call the loop plans, read through Counsel_eval.py's own routes: the judge (the starting
    model) is served where the evaluated model is, never the OpenAI API by itself."""
    from mentalarena.engines.backends import judge_route, route

    server = "http://127.0.0.1:1/v1"
    defaults = {k: p.default for k, p in inspect.signature(iterate.run).parameters.items()}
    plan = iterate.make_plan(**{**defaults, "work_dir": str(tmp_path / "gpt"), "backend": "openai", "api_base": server,
                                "eval": "counsel", "eval_limit": 5})
    (call,) = iterate.calls_for(plan, 1, "eval_counsel", "ft:gpt-3.5-turbo-0125:org::abc")
    assert call.script == "Counsel_eval.py" and call.command is None
    assert {k: call.args[k] for k in ("model", "api_base", "judge_model", "limit")} == {
        "model": "ft:gpt-3.5-turbo-0125:org::abc", "api_base": server, "judge_model": "gpt-3.5-turbo-0125", "limit": 5}
    inspect.signature(Counsel_eval.run).bind(**call.args)
    contestant = route(call.args["model"], "auto", call.args["api_base"])
    judge = judge_route(contestant, call.args["judge_model"])
    assert (judge.model, judge.kind, judge.servers) == ("gpt-3.5-turbo-0125", "openai", (server,))
    # the embedded model's name for Counsel_eval.py is "embedded": its own model, not one looked up elsewhere
    assert judge_route(route(None), "embedded").kind == "embedded"


def test_changed_counsel_settings_redo_only_the_counsel_evaluations(tmp_path, stages, capsys):
    work = tmp_path / "run"
    base = ["--work_dir", str(work), "--iterations", "1", "--eval", "imhi,counsel", *QUICK]
    stages()
    assert iterate.main(base) == 0
    fake = stages()
    changed = [*base, "--counsel_args", '{"scorers": "reward,rubric", "reward_model": "org/rm", '
                                        '"judge_api_base": "http://user:secret@judge:8000/v1"}']
    assert iterate.main(changed) == 2
    assert "iteration 0 eval_counsel ran with other settings (--scorers None -> reward,rubric" in capsys.readouterr().err
    assert fake.calls == []

    assert iterate.main([*changed, "--restart"]) == 0
    assert [c["script"] for c in fake.calls] == ["Counsel_eval.py", "Counsel_eval.py"]
    assert fake.of("Counsel_eval.py")[0]["judge_api_base"] == "http://user:secret@judge:8000/v1"
    # ... handed over in the environment: no command line (what `ps` shows) holds the password
    assert all("secret" not in flag for argv in fake.argvs for flag in argv)
    assert "--judge_api_base=env:MENTALARENA_JUDGE_API_BASE" in fake.argvs[0]
    assert "--restart: removing" in capsys.readouterr().out
    assert "secret" not in (work / "state.json").read_text()  # the settings' dicts lose credentials too
    rows = [line for line in (work / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[0].endswith("| IMHI w-F1 | counsel win % | counsel rubric | counsel reward |")
    assert rows[2:4] == ["| 0 | embedded | – | – | – | – | – | – | – | 20.50 | 30.00 | 5.00 | 0.1235 |",
                         "| 1 | iter1/model/merged | sft | 4 | 2 | – | 2.5000 | – | – | 21.50 | 40.00 | 5.50 | 1.1235 |"]
    panels = {p["title"]: {s["label"]: s["points"] for s in p["series"]}
              for p in iterate.summary_figure_panels(iterate.run(work_dir=str(work), iterations=1, eval="imhi,counsel",
                                                                 limit=2, max_steps=3, method="lora", eval_limit=4,
                                                                 counsel_args=json.loads(changed[-1]))["rows"])}
    assert panels["counsel reward model score"] == {"all statements": [(0, 0.1235), (1, 1.1235)]}
    assert len(fake.calls) == 2  # the same settings: nothing to do


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    ([], "--work_dir is required"),
    (["--backend", "hf"], "--backend must be one of open, openai"),
    (["--eval", "qa,mmlu"], "--eval must be one of qa, imhi, counsel, none"),
    (["--eval", "counsel", "--counsel_args", '{"model": "x"}'], "--counsel_args: model is not yours to set here"),
    (["--counsel_args", '{"output_dir": "x"}'], "output_dir is not yours to set here: each iteration writes "
                                                 "iterK/eval/counsel"),
    (["--counsel_args", '{"data_file": "x.jsonl"}'], "data_file is not yours to set here: use --counsel_data"),
    (["--counsel_args", '{"api_base": "http://127.0.0.1:1/v1"}'], "api_base is not yours to set here: use --api_base"),
    (["--counsel_args", '{"judge_modle": "gpt-4o"}'], "--counsel_args: Counsel_eval.py has no flag --judge_modle"),
    (["--eval_limit", "3", "--counsel_args", '{"limit": 2}'], "--counsel_args: limit is also given as --eval_limit"),
    (["--counsel_data", "s.jsonl", "--counsel_args", '{"from_records": "r.jsonl"}'],
     "--counsel_data and --counsel_args from_records both name the statements"),
    (["--epochs", "4,x"], "--epochs must be a comma list of positive numbers"),
    (["--iterations", "3", "--epochs", "4,5"], "--iterations 3 needs 3 epoch values, --epochs gives 2 (4,5)"),
    (["--limit", "0"], "--limit must be a whole number of at least 1"),
    (["--arena_args", "[1, 2]"], "--arena_args must be a dict of the stage's flags"),
    (["--arena_args", '{"max_new_token": 3}'], "--arena_args: arena_med.py has no flag --max_new_token"),
    (["--arena_args", '{"output_file": "x.jsonl"}'], "--arena_args: output_file is not yours to set here"),
    (["--finetune_args", '{"nepoch": 2}'], "nepoch is not yours to set here: use --epochs"),
    (["--qa_args", '{"tables": "main"}'], "--qa_args: MedQA_eval.py has no flag --tables"),
    (["--limit", "2", "--arena_args", '{"limit": 3}'], "--arena_args: limit is also given as --limit"),
    (["--finetune_args", '{"api_key": "sk-secret-123456"}'], "export OPENAI_API_KEY"),
    (["--patients_file", "nowhere.json"], "--patients_file nowhere.json: file not found"),
    (["--api_base", "http://127.0.0.1:1/v1"], "--api_base is for --backend openai"),
    (["--backend", "openai", "--method", "lora"], "--method and --max_steps are for --backend open"),
    (["--backend", "openai"], "the OpenAI API (https://api.openai.com/v1) needs OPENAI_API_KEY"),
    (["--backend", "openai", "--api_base", "http://127.0.0.1:1/v1", "--epochs", "4,1.5"],
     "--epochs must be a comma list of whole numbers"),
    (["--objective", "ppo"], "--objective must be one of sft, dpo, sft+dpo, not 'ppo'"),
    (["--backend", "openai", "--api_base", "http://127.0.0.1:1/v1", "--objective", "sft+dpo"],
     "--objective sft+dpo is for --backend open; OpenAI fine-tunes one method per job"),
    (["--finetune_args", '{"objective": "dpo"}'], "--finetune_args: objective is not yours to set here: use --objective"),
    (["--backend", "openai", "--api_base", "http://127.0.0.1:1/v1", "--finetune_args", '{"method": "dpo"}'],
     "--finetune_args: method is not yours to set here: use --objective (sft or dpo)"),
    (["--finetune_args", '{"beta": 0.1, "min_margin": 3}'],
     "--finetune_args: min_margin, beta are for --objective dpo or sft+dpo"),
])
def test_bad_input_is_one_line_exit_2_and_runs_nothing(tmp_path, stages, capsys, monkeypatch, args, message):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    fake = stages()
    argv = args if not args or args[0] == "--work_dir" else ["--work_dir", "run", *args]
    assert iterate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert "sk-secret" not in err
    assert fake.calls == [] and not (tmp_path / "run").exists()


def test_a_broken_state_file_is_bad_input(tmp_path, stages, capsys):
    work = tmp_path / "run"
    work.mkdir()
    (work / "state.json").write_text("{torn")
    fake = stages()
    assert iterate.main(["--work_dir", str(work), *QUICK]) == 2
    assert "state.json: not valid JSON" in capsys.readouterr().err
    assert fake.calls == [] and (work / "state.json").read_text() == "{torn"


@pytest.mark.parametrize("value", ["a,b", "123", "None", "false", "/runs/x y/iter1", "ft:gpt-3.5-turbo:org::abc",
                                   "{x}", 0.001, -3, True, ("a", "b")])
def test_flag_values_reach_the_stage_unchanged(value):
    assert DefaultParseValue(iterate._flag_value(value)) == value


def test_recorded_urls_lose_their_credentials(tmp_path):
    assert iterate._portable("http://user:pw@host:8000/v1", tmp_path) == "http://host:8000/v1"
    assert iterate._portable(str(tmp_path / "iter1" / "x"), tmp_path) == "<work_dir>/iter1/x"


# ---------------------------------------------------------------------------------- the real stages
def test_one_iteration_of_the_real_stages_on_a_tiny_model(tmp_path):
    """Each stage's own CLI in its own process, on a randomly initialised 2-layer Llama with the
    embedded tokenizer: the loop reads back what the real stages write."""
    tiny = make_tiny_llama(tmp_path / "tiny", embedded_tokenizer())
    work = tmp_path / "run"
    result = iterate.run(
        work_dir=str(work), base_model=tiny, iterations=1, eval_base=False, limit=1, method="lora", max_steps=1,
        eval_limit=1, arena_args={"max_new_tokens": 8, "dialogue_rounds": 1, "max_decode_rounds": 0, "max_tries": 1,
                                  "progress": False},
        finetune_args={"lora_r": 8, "target_modules": "all-linear", "max_seq_length": 128},
        qa_args={"repeats": 1, "max_new_tokens": 4, "progress": False},
        imhi_args={"max_new_tokens": 4, "datasets": "dreaddit", "progress": False})
    assert result["exit_code"] == 0
    (row,) = result["rows"]
    assert row["model"] == "iter1/model/merged" and row["records"] == 1 and row["train_loss"] > 0
    assert set(row["qa"]) == {"MedQA", "PubMedQA"} and set(row["imhi"]) == {"IMHI/dreaddit"}
    assert (work / "iter1" / "model" / "merged" / "config.json").is_file()


# ---------------------------------------------------------------------------------- Ctrl-C during a stage
STAGE = """
import signal, sys, time
from pathlib import Path
def stop(*_):
    time.sleep({seconds})  # the rest of a checkpoint being saved
    Path({saved!r}).write_text("whole")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
Path({ready!r}).write_text(str(__import__("os").getpid()))
time.sleep(60)
"""


def ctrl_c_during_a_stage(tmp_path: Path, seconds: float, monkeypatch) -> tuple[Path, int, list]:
    """iterate.run_stage on a stage that takes `seconds` to stop after SIGINT; Ctrl-C reaches both
    processes, as a terminal sends it to the whole group. (The files it left, the stage's pid, and
    what was done to the stage's process: ("wait", timeout) and ("kill",), in order.)"""
    import signal
    import subprocess
    import threading
    import time

    saved, ready = tmp_path / "saved", tmp_path / "ready"
    (tmp_path / "stage.py").write_text(STAGE.format(seconds=seconds, saved=str(saved), ready=str(ready)))
    done: list[tuple] = []
    real_wait, real_kill = subprocess.Popen.wait, subprocess.Popen.kill

    def wait(self, timeout=None):
        done.append(("wait", timeout))
        return real_wait(self, timeout)

    def kill(self):
        done.append(("kill",))
        return real_kill(self)

    monkeypatch.setattr(subprocess.Popen, "wait", wait)
    monkeypatch.setattr(subprocess.Popen, "kill", kill)

    def press():
        while not ready.exists() or not ready.read_text():
            time.sleep(0.02)
        os.kill(int(ready.read_text()), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        iterate.run_stage(str(tmp_path / "stage.py"), [])
    return saved, int(ready.read_text()), done


def test_ctrl_c_lets_the_stage_finish_saving_before_it_is_stopped(tmp_path, capsys, monkeypatch):
    saved, pid, done = ctrl_c_during_a_stage(tmp_path, 1.5, monkeypatch)  # subprocess.run killed it after 0.25 s
    assert saved.read_text() == "whole"
    assert done == [("wait", None), ("wait", iterate.STOP_WAIT)]  # waited for it, never killed it
    assert f"[iterate] waiting up to 30 s for {tmp_path / 'stage.py'} to stop" in capsys.readouterr().err
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped


def test_a_stage_that_does_not_stop_is_killed_after_the_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(iterate, "STOP_WAIT", 0.5)
    saved, pid, done = ctrl_c_during_a_stage(tmp_path, 30, monkeypatch)
    # the wait it was given (STOP_WAIT), then killed and reaped: it never got to save
    assert done == [("wait", None), ("wait", 0.5), ("kill",), ("wait", None)] and not saved.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
