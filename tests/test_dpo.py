"""llama_finetune.py --objective dpo | sft+dpo: TRL's DPOTrainer on preference pairs built from scored
self-play records. A tiny random Llama (the embedded tokenizer) trains in seconds: the loss is finite
and moves, the chosen-minus-rejected log-probability margin on the training pairs grows (computed here
directly, not read from the trainer's logs), the adapter loads back and generates; SFT then DPO
starts from the SFT adapter; resume; full fine-tuning; bad input; and the embedded model, one DPO step,
merged and used by arena_med.py as its base model.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import shared_data
from test_llama_finetune import assert_arena_runs_on

import llama_finetune
from mentalarena.store.jsonl import read_jsonl
from mentalarena.training.preference import load_preferences, to_trl_text

PATIENTS = [
    ("lost her job in spring and sleeps four hours a night", "Major depressive disorder", "Generalized anxiety"),
    ("a student abroad who cannot face an exam next week", "Social anxiety disorder", "Bipolar disorder"),
    ("a nurse who snaps at colleagues after double shifts", "Burnout with depressive features", "Schizophrenia"),
    ("a retired teacher who skips meals and sees nobody", "Persistent depressive disorder", "Panic disorder"),
]


def scored_record(i: int) -> dict:
    """A self-play record as arena_med.py writes it, with the fields the pair builder reads. The final
    illness names Doctor 1, so the diagnosis pair is attributed without the sentence encoder."""
    history, first, second = PATIENTS[i]
    return {"symptom": f"Patient History: {history}.", "illness": f"Doctor 1's diagnosis: {first}",
            "treatment": "Cognitive behavioural therapy", "explain_t": "it reframes the thoughts",
            "medicine": "Sertraline", "explain_m": "it lifts the mood",
            "diagnoses": [f"The patient has {first}.", f"The patient has {second}."],
            "treatment_search": {"tries": [
                {"candidate": f"Weekly cognitive behavioural therapy focused on {history.split()[1]}.", "score": 8},
                {"candidate": "Tell the patient to stop worrying.", "score": 2},
                {"candidate": "Group therapy.", "score": 0}]},  # no score: in no pair
            "medicine_search": {"tries": [
                {"candidate": "Sertraline 50 mg daily, reviewed after four weeks.", "score": 7},
                {"candidate": "No medication at all.", "score": 3}]}}


def write_scored(path, n=4):
    path.write_text("".join(json.dumps(scored_record(i)) + "\n" for i in range(n)), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_scored(tmp_path_factory.mktemp("data") / "arena.jsonl")


def tiny_args(tiny_base, records, out, name, *extra):
    return ["--base_model", tiny_base, "--new_name", name, "--data_files", records, "--output_dir", str(out),
            "--objective", "dpo", "--method", "lora", "--lora_r", "8", "--target_modules", "all-linear",
            "--max_seq_length", "256", "--logging_steps", "1", "--warmup_ratio", "0", "--batch_size", "4", *extra]


def margins(model, tokenizer, rows) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt) for each plain-text row, EOS included (TRL
    appends it to plain completions), summed over the completion's tokens."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        totals = []
        for answer in (row["chosen"], row["rejected"]):
            ids = tokenizer(row["prompt"] + answer + tokenizer.eos_token)["input_ids"]
            assert ids[:len(prompt)] == prompt  # the prompt ends on a token boundary
            x = torch.tensor([ids])
            with torch.no_grad():
                logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
            token_logps = logp.gather(-1, x[0, 1:, None])[:, 0]
            totals.append(float(token_logps[len(prompt) - 1:].sum()))
        out.append(totals[0] - totals[1])
    return out


# ---------------------------------------------------------------------------------- DPO with LoRA
def test_dpo_raises_the_chosen_margin_and_the_adapter_loads_back(tiny_base, records, tokenizer, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "models"
    assert llama_finetune.main(tiny_args(tiny_base, records, out, "d", "--max_steps", "6", "--dpo_lr", "1e-2")) == 0
    folder = out / "d"
    config = json.loads((folder / "finetune_config.json").read_text())
    summary = config["summary"]
    # 4 records: 4 treatment pairs (8 vs 2), 4 medication pairs (7 vs 3), 4 diagnosis pairs (Doctor 1 named)
    assert summary["objective"] == "dpo" and summary["pairs"] == 12 and summary["examples"] == 12
    assert config["preference"]["kinds"] == {"diagnosis": 4, "treatment": 4, "medication": 4}
    assert config["preference"]["unscored"] == 4 and config["preference"]["score_gaps"] == {"4": 4, "6": 4}
    assert config["settings"]["beta"] == 0.1 and config["settings"]["objective"] == "dpo"
    assert "pairs: 4 records" in capsys.readouterr().out
    losses = [loss for _, loss in config["loss_history"]]
    assert all(math.isfinite(x) for x in losses) and len(losses) == 6
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the first step
    assert losses[-1] < losses[0] - 0.1
    assert summary["reward_margin_last"] > summary["reward_margin_first"]

    # the pairs trained on are written beside the model, and read back to the same pairs
    again, _ = load_preferences(str(folder / "dpo_pairs.jsonl"))
    built, _ = load_preferences(records)
    assert [p.key() for p in again] == [p.key() for p in built]
    assert (folder / "training_curves.png").stat().st_size > 10_000

    # the adapter: only the trained one (TRL's frozen reference copy is not saved), loads back and generates
    assert not (folder / "ref").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(folder)).eval()
    rows = [to_trl_text(p) for p in built]
    before, after = margins(base, tokenizer, rows), margins(trained, tokenizer, rows)
    assert sum(after) / len(after) > sum(before) / len(before) + 0.5
    assert sum(a > b for a, b in zip(after, before)) >= 10  # nearly every pair, not an average of a few
    ids = tokenizer("### System: You are a psychiatric expert.", return_tensors="pt")["input_ids"]
    generated = trained.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] == ids.shape[1] + 5


def test_sft_then_dpo_starts_from_the_sft_adapter(tiny_base, records, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "models"
    # a DPO learning rate so small that the DPO adapter must stay where it started
    # no LoRA dropout: the policy's forward pass is then exactly the reference's at the first step
    args = tiny_args(tiny_base, records, out, "sd", "--max_steps", "2", "--lr", "1e-2", "--dpo_lr", "1e-9",
                     "--lora_dropout", "0")
    args[args.index("--objective") + 1] = "sft+dpo"
    assert llama_finetune.main(args + ["--merge"]) == 0
    sft_config = json.loads((out / "sd" / "sft" / "finetune_config.json").read_text())
    dpo_config = json.loads((out / "sd" / "finetune_config.json").read_text())
    assert sft_config["summary"]["objective"] == "sft" and "objective" not in sft_config["settings"]
    assert dpo_config["summary"]["objective"] == "sft+dpo" and dpo_config["summary"]["pairs"] == 12
    # DPO trained, from policy == reference == the SFT model: its first step (before any update) scores
    # every pair's chosen-minus-rejected log-ratio 0, so the loss is log 2 and the reward margin 0. A
    # reference other than the SFT model (the base) would put both elsewhere.
    assert [s for s, _ in dpo_config["loss_history"]] == [1, 2]
    assert dpo_config["loss_history"][0][1] == pytest.approx(math.log(2), abs=1e-4)
    assert dpo_config["summary"]["reward_margin_first"] == pytest.approx(0, abs=1e-4)
    assert dpo_config["settings"]["start_settings_hash"] == sft_config["settings_hash"]
    sft_w = load_file(out / "sd" / "sft" / "adapter_model.safetensors")
    dpo_w = load_file(out / "sd" / "adapter_model.safetensors")
    assert sft_w.keys() == dpo_w.keys() and not any(".ref." in k for k in dpo_w)
    moved = [k for k in sft_w if "lora_B" in k and sft_w[k].abs().max() > 0]
    assert moved  # SFT trained the adapter away from its zero start ...
    for key in sft_w:  # ... and DPO continued from it (a fresh adapter would have new random A and zero B)
        torch.testing.assert_close(dpo_w[key], sft_w[key], rtol=0, atol=1e-6)
    assert (out / "sd" / "merged" / "config.json").is_file()
    # the SFT stage is the same run as a plain SFT run with these flags: its hash ignores the DPO flags
    capsys.readouterr()
    args[args.index("--dpo_lr") + 1] = "1e-8"
    assert llama_finetune.main(args) == 2  # the DPO stage changed: refused on the same name ...
    captured = capsys.readouterr()
    assert f"{out / 'sd' / 'sft'} already holds this training" in captured.out  # ... after the SFT stage was kept
    assert "other settings" in captured.err


def test_dpo_resume_continues_the_step_count(tiny_base, records, tmp_path, capsys):
    out = tmp_path / "models"
    args = tiny_args(tiny_base, records, out, "r", "--max_steps", "4", "--save_steps", "2", "--dpo_lr", "1e-3")
    assert llama_finetune.main(args) == 0
    folder = out / "r"
    first = json.loads((folder / "finetune_config.json").read_text())
    (folder / "finetune_config.json").unlink()  # as if killed after the checkpoint at step 2
    shutil.rmtree(folder / "checkpoints" / "checkpoint-4")
    capsys.readouterr()
    assert llama_finetune.main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    second = json.loads((folder / "finetune_config.json").read_text())
    assert second["summary"]["steps"] == 4 and second["summary"]["resumed_from"].endswith("checkpoint-2")
    assert [s for s, _ in second["loss_history"]] == [1, 2, 3, 4]
    assert second["loss_history"][:2] == first["loss_history"][:2]
    for (_, a), (_, b) in zip(second["loss_history"][2:], first["loss_history"][2:]):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4)  # the same steps, resumed
    assert llama_finetune.main(args) == 0
    assert "nothing to train" in capsys.readouterr().out


def three_tries(i: int) -> dict:
    """scored_record with a third scored treatment try between the other two (8, 5, 2): best against
    worst gives one treatment pair, --all_pairs three."""
    row = scored_record(i)
    tries = row["treatment_search"]["tries"]
    tries.insert(1, {"candidate": f"Fortnightly counselling about {PATIENTS[i][0].split()[-1]}.", "score": 5})
    return row


def test_full_dpo_with_chat_template_writes_a_full_model(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    records = tmp_path / "three.jsonl"
    records.write_text("".join(json.dumps(three_tries(i)) + "\n" for i in range(4)), encoding="utf-8")
    out = tmp_path / "models"
    args = tiny_args(tiny_base, str(records), out, "f", "--max_steps", "1", "--format", "chat_template",
                     "--all_pairs", "--min_margin", "1")
    args[args.index("--method") + 1] = "full"
    assert llama_finetune.main(args) == 0
    config = json.loads((out / "f" / "finetune_config.json").read_text())
    assert config["merged"] == str(out / "f") and config["settings"]["method"] == "full"
    assert config["trainable_parameters"] == config["all_parameters"]  # the reference copy is not counted in
    # --all_pairs, --min_margin 1: per record the diagnosis, three treatment pairs (8 > 5, 8 > 2, 5 > 2, in
    # try order) and the medication pair (7 > 3): 5, where best against worst gives 3 (12 in all)
    assert config["summary"]["pairs"] == 20 and config["settings"]["all_pairs"] is True
    assert config["preference"]["kinds"] == {"diagnosis": 4, "treatment": 12, "medication": 4}
    rows = read_jsonl(out / "f" / "dpo_pairs.jsonl")
    first = scored_record(0)["treatment_search"]["tries"]
    middle = three_tries(0)["treatment_search"]["tries"][1]["candidate"]
    assert [(r["kind"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["margin"]) for r in rows[:5]] == [
        ("diagnosis", "The patient has Major depressive disorder.", "The patient has Generalized anxiety.", None),
        ("treatment", first[0]["candidate"], middle, 3),
        ("treatment", first[0]["candidate"], first[1]["candidate"], 6),
        ("treatment", middle, first[1]["candidate"], 3),
        ("medication", "Sertraline 50 mg daily, reviewed after four weeks.", "No medication at all.", 4)]
    assert rows[0]["prompt"][-1]["role"] == "user" and rows[0]["chosen"][0]["role"] == "assistant"
    model = AutoModelForCausalLM.from_pretrained(out / "f")
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["reference_records", "sft_rows", "packing", "beta", "loss", "margin", "objective"])
def test_bad_input_is_one_line_and_exit_2(tiny_base, records, tmp_path, capsys, case):
    sft_rows = tmp_path / "sft.jsonl"
    sft_rows.write_text(json.dumps({"text": "### System: s Question: q\n ### Answer: a"}) + "\n")
    data = {"sft_rows": str(sft_rows)}.get(case, records)
    if case == "reference_records":  # the one case that reads the reference data (skipped without it)
        data = str(shared_data("arena_outputs", "gpt_iter1_output.jsonl"))
    extra = {"packing": ["--packing"], "beta": ["--beta", "0"], "loss": ["--dpo_loss", "sigmod"],
             "margin": ["--min_margin", "0"], "objective": []}.get(case, [])
    args = tiny_args(tiny_base, data, tmp_path / "models", "x", *extra)
    if case == "objective":
        args[args.index("--objective") + 1] = "rlhf"
    code = llama_finetune.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    expected = {"reference_records": "none of the 257 records carries try-and-reflect scores",
                "sft_rows": "sft.jsonl: line 1: an SFT row", "packing": "--packing is for SFT",
                "beta": "--beta must be a positive number", "loss": "--dpo_loss must be one of",
                "margin": "--min_margin must be a positive number", "objective": "--objective must be one of"}[case]
    assert expected in err
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------------------------- the embedded model
def test_embedded_model_one_dpo_step_merged_and_used_by_arena_med(tmp_path):
    """From scored records to a DPO-trained embedded model in one command, then self-play with it.
    The diagnoses are attributed by the bundled sentence encoder (the illness names no doctor)."""
    records = tmp_path / "arena.jsonl"
    rows = []
    for i in range(2):
        row = scored_record(i)
        row["illness"] = PATIENTS[i][1]  # no doctor named: the encoder decides
        rows.append(row)
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "models"
    assert llama_finetune.main(["--objective", "dpo", "--new_name", "smol", "--data_files", str(records),
                                "--output_dir", str(out), "--max_steps", "1", "--batch_size", "2",
                                "--max_seq_length", "256", "--lora_r", "8", "--dpo_lr", "1e-4", "--warmup_ratio", "0",
                                "--merge"]) == 0
    config = json.loads((out / "smol" / "finetune_config.json").read_text())
    assert config["settings"]["method"] == "lora" and config["base_gguf_file"].endswith(".gguf")
    assert config["preference"]["diagnosis_similarity"] == 2 and config["preference"]["kinds"]["diagnosis"] == 2
    assert math.isfinite(config["summary"]["train_loss"])
    assert_arena_runs_on(out / "smol" / "merged", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_dpo_on_cuda(tiny_base, records, tmp_path):
    out = tmp_path / "models"
    args = tiny_args(tiny_base, records, out, "q", "--max_steps", "2", "--merge")
    args[args.index("--method") + 1] = "qlora"
    args[args.index("--objective") + 1] = "sft+dpo"
    assert llama_finetune.main(args) == 0
    config = json.loads((out / "q" / "finetune_config.json").read_text())
    assert config["settings"]["method"] == "qlora" and config["summary"]["pairs"] == 12
    assert math.isfinite(config["summary"]["train_loss"]) and (out / "q" / "merged" / "config.json").is_file()
