"""llama_finetune.py: label masks and packing checked token by token, LoRA training of a tiny random
Llama (loss goes down; adapter and merged model load back and generate), resume, bad input, and the
embedded model fine-tuned, merged and then used by arena_med.py as its base model.

The tiny model has the embedded SmolLM2 tokenizer (read offline from the GGUF file) and a few
thousand parameters per layer, so each training run takes seconds on a CPU.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_same_up_to_a_tie, reply_token_ids

import arena_med
import llama_finetune
from mentalarena.store.jsonl import read_jsonl
from mentalarena.store.locks import OutputLock
from mentalarena.training.sft import SFTPair, to_openai, to_text
from mentalarena.training.trainers import IGNORE, Collator, encode, pack

SYMPTOMS = [
    "Patient History: lost her job in spring and sleeps four hours a night.\nSituation: a friend calls.\n"
    "Automatic Thoughts: she will see that I failed.\nEmotions: shame\nBehavior: lets the phone ring",
    "Patient History: a student who moved abroad.\nSituation: an exam next week.\n"
    "Automatic Thoughts: I will fail and everyone will know.\nEmotions: fear\nBehavior: stays in bed",
    "Patient History: a nurse caring for her father.\nSituation: a double shift.\n"
    "Automatic Thoughts: I can never rest.\nEmotions: exhaustion\nBehavior: snaps at colleagues",
    "Patient History: a retired teacher living alone.\nSituation: his birthday.\n"
    "Automatic Thoughts: nobody remembers me.\nEmotions: sadness\nBehavior: skips meals",
]
ILLNESSES = ["Major depressive disorder", "Generalized anxiety disorder", "Burnout", "Persistent depressive disorder"]
MEDICINES = ["Sertraline", "Escitalopram", "None", "Bupropion"]  # "None": the medication pair is skipped


def write_records(path, n=4):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"symptom": SYMPTOMS[i], "illness": ILLNESSES[i], "treatment": "CBT",
                                "explain_t": "it reframes the thoughts", "medicine": MEDICINES[i],
                                "explain_m": "it lifts the mood"}) + "\n")
    return path


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return str(write_records(tmp_path_factory.mktemp("data") / "arena.jsonl"))


def tiny_args(tiny_base, records, out, name="t", *extra):
    return ["--base_model", tiny_base, "--new_name", name, "--data_files", records, "--output_dir", str(out),
            "--method", "lora", "--lora_r", "8", "--target_modules", "all-linear", "--max_seq_length", "128",
            "--logging_steps", "1", "--warmup_ratio", "0", *extra]


# ---------------------------------------------------------------------------------- labels and packing
def test_answer_only_labels_cover_exactly_the_answer_and_eos(tokenizer):
    pair = SFTPair("You are a psychiatric expert.", SYMPTOMS[0] + "\nWhat is the diagnosis?", ILLNESSES[0], "diagnosis")
    row = to_text(pair)
    whole = encode(row, tokenizer, "original", 512, answer_only=False, add_eos=True)
    only = encode(row, tokenizer, "original", 512, answer_only=True, add_eos=True)
    ids = whole["input_ids"]
    assert ids == only["input_ids"] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == row["text"]
    learned = [i for i, label in enumerate(only["labels"]) if label != IGNORE]
    start = learned[0]
    assert learned == list(range(start, len(ids)))  # one contiguous run to the end
    assert [only["labels"][i] for i in learned] == ids[start:]
    assert tokenizer.decode(ids[start:]) == " " + pair.answer + tokenizer.eos_token  # " Major" carries its space
    assert tokenizer.decode(ids[:start]).endswith("### Answer:")
    # whole-text loss: every token but the first (which nothing predicts)
    assert whole["labels"] == [IGNORE] + ids[1:]
    # without EOS, and cut short: the cut keeps the first tokens
    cut = encode(row, tokenizer, "original", 10, answer_only=False, add_eos=False)
    assert cut["truncated"] and cut["input_ids"] == ids[:10]


def test_chat_template_answer_only_labels(tokenizer):
    pair = SFTPair("You are a psychiatric expert.", "Which illness?", ILLNESSES[1], "diagnosis")
    ex = encode(to_openai(pair), tokenizer, "chat_template", 512, answer_only=True, add_eos=True)
    learned = [t for t in ex["labels"] if t != IGNORE]
    prompt = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label == IGNORE]
    assert tokenizer.decode(learned).startswith(pair.answer)
    assert tokenizer.decode(learned).count(tokenizer.eos_token) == 1  # the template's end of turn, not a second EOS
    assert "Which illness?" in tokenizer.decode(prompt) and pair.answer not in tokenizer.decode(prompt)
    # a template that does not close the turn with EOS (the fallback layout) gets one appended
    from mentalarena.engines.hf_backend import FALLBACK_TEMPLATE
    own, tokenizer.chat_template = tokenizer.chat_template, FALLBACK_TEMPLATE
    try:
        ex = encode(to_openai(pair), tokenizer, "chat_template", 512, answer_only=True, add_eos=True)
    finally:
        tokenizer.chat_template = own
    learned = [t for t in ex["labels"] if t != IGNORE]
    assert tokenizer.decode(learned) == " " + pair.answer + "\n\n" + tokenizer.eos_token


def test_packing_keeps_examples_whole_and_apart(tokenizer, tiny_base):
    from transformers import LlamaForCausalLM

    def example(n, start):
        ids = list(range(start, start + n))
        return {"input_ids": ids, "labels": [IGNORE] + ids[1:]}

    examples = [example(5, 100), example(9, 200), example(4, 300), example(7, 400)]
    # first-fit by decreasing length into 13 tokens: 9 opens a block, 7 opens another, 5 joins the 7, 4 the 9
    blocks = pack(examples, 13)
    by_first = {b["input_ids"][0]: b for b in blocks}
    assert sorted(by_first) == [200, 400]
    assert by_first[200]["input_ids"] == list(range(200, 209)) + list(range(300, 304))
    assert by_first[200]["position_ids"] == list(range(9)) + list(range(4))
    assert by_first[200]["labels"] == [IGNORE] + list(range(201, 209)) + [IGNORE, 301, 302, 303]
    assert by_first[400]["input_ids"] == list(range(400, 407)) + list(range(100, 105))
    assert by_first[400]["labels"] == [IGNORE] + list(range(401, 407)) + [IGNORE, 101, 102, 103, 104]

    batch = Collator(pad_id=0)([by_first[200], by_first[400]])
    assert "attention_mask" not in batch
    assert batch["input_ids"][0].tolist() == by_first[200]["input_ids"]
    assert batch["input_ids"][1].tolist() == by_first[400]["input_ids"] + [0]  # one pad, a segment of its own
    assert batch["labels"][1].tolist()[-1] == IGNORE and batch["position_ids"][1].tolist()[-1] == 0
    # attention does not cross examples: the second example's logits in the block equal its logits alone
    # (transformers reads the restarts only without a key/value cache, as in training: load_model turns it off)
    model = LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([list(range(100, 105))])).logits
        unmasked = model(input_ids=batch["input_ids"][1:2]).logits  # same tokens, plain causal attention
    torch.testing.assert_close(packed[1, 7:12], alone[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked[0, 7:12], alone[0], atol=1e-3)

    plain = Collator(pad_id=0)([examples[0], examples[1]])
    assert plain["attention_mask"].tolist() == [[1] * 5 + [0] * 4, [1] * 9]
    assert plain["labels"][0].tolist() == [IGNORE, 101, 102, 103, 104] + [IGNORE] * 4


# ---------------------------------------------------------------------------------- training
def test_lora_training_lowers_the_loss_and_the_outputs_load_back(tiny_base, records, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from mentalarena.engines.hf_backend import HFBackend

    out = tmp_path / "models"
    code = llama_finetune.main(tiny_args(tiny_base, records, out, "t", "--max_steps", "8", "--lr", "1e-2",
                                         "--merge"))
    assert code == 0
    printed = capsys.readouterr().out
    folder = out / "t"
    config = json.loads((folder / "finetune_config.json").read_text())
    # 4 records -> 12 pairs, one medication skipped ("None") -> 11 rows
    assert config["conversion"]["records"] == 4 and config["conversion"]["rows"] == 11
    assert config["conversion"]["skipped_medicine"] == 1 and config["tokenization"]["examples"] == 11
    assert config["summary"]["steps"] == 8 and config["settings"]["method"] == "lora"
    assert config["data_files"][0]["sha256"] and config["versions"]["transformers"]
    losses = [loss for _, loss in config["loss_history"]]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
    assert "done: 11 examples" in printed and "merged model" in printed
    assert (folder / "adapter_config.json").is_file() and (folder / "tokenizer.json").is_file()

    # the adapter through peft, the merged model through the project's loader: same weights, same logits
    base = LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(folder)).eval()
    merged = HFBackend(str(folder / "merged"), temperature=0, max_new_tokens=5, device="cpu")
    ids = torch.tensor([merged.tokenizer("### System: You are a psychiatric expert.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    # greedy answers of the adapter (W x + B A x) and of the merged weights ((W + B A) x): the same
    # tokens, up to a tie that the two roundings may break differently
    conv = [[{"role": "user", "content": "Which illness?"}]]
    from_adapter = HFBackend(str(folder), temperature=0, max_new_tokens=5, device="cpu")
    seen_adapter, seen_merged = reply_token_ids(monkeypatch, from_adapter), reply_token_ids(monkeypatch, merged)
    (ids_adapter,), (ids_merged,) = (seen_adapter[from_adapter.generate(conv)[0].text],
                                     seen_merged[merged.generate(conv)[0].text])
    assert len(ids_merged) > 0
    prompt = merged.encode(conv[0])
    with torch.no_grad():  # the logits each of the merged model's steps chose from, teacher-forced
        logits = merged.model(input_ids=torch.tensor([prompt + list(ids_merged)])).logits[0, len(prompt) - 1:]

    def ended(ids):
        return list(ids) + ([None] if len(ids) < 5 else [])

    assert_same_up_to_a_tie(ended(ids_adapter), ended(ids_merged), logits.__getitem__, end=merged.eos_ids)


def test_packed_answer_only_training_runs(tiny_base, records, tmp_path):
    out = tmp_path / "models"
    args = tiny_args(tiny_base, records, out, "p", "--max_steps", "2", "--packing", "--answer_only_loss",
                     "--format", "chat_template")
    args[args.index("--max_seq_length") + 1] = "256"
    assert llama_finetune.main(args) == 0
    config = json.loads((out / "p" / "finetune_config.json").read_text())
    stats = config["tokenization"]
    assert stats["examples"] == 11 and stats["tokens_per_epoch"] < 11 * 100
    assert stats["train_rows"] <= 5  # blocks of 256 tokens hold several examples of under 100 tokens
    assert stats["learned_tokens_per_epoch"] < stats["tokens_per_epoch"] / 2
    assert config["summary"]["steps"] == 2


def test_full_fine_tuning_writes_a_loadable_model(tiny_base, records, tmp_path):
    from mentalarena.engines.hf_backend import HFBackend

    out = tmp_path / "models"
    args = tiny_args(tiny_base, records, out, "f", "--max_steps", "2", "--merge")
    args[args.index("--method") + 1] = "full"
    assert llama_finetune.main(args) == 0
    config = json.loads((out / "f" / "finetune_config.json").read_text())
    assert config["merged"] == str(out / "f") and not (out / "f" / "merged").exists()
    assert config["trainable_parameters"] == config["all_parameters"]
    backend = HFBackend(str(out / "f"), temperature=0, max_new_tokens=3, device="cpu")
    assert backend.generate([[{"role": "user", "content": "Hello"}]])[0].completion_tokens > 0


def test_resume_continues_the_step_count(tiny_base, records, tmp_path, capsys):
    out = tmp_path / "models"
    args = tiny_args(tiny_base, records, out, "r", "--max_steps", "4", "--save_steps", "2")
    assert llama_finetune.main(args) == 0
    folder = out / "r"
    first = json.loads((folder / "finetune_config.json").read_text())
    # as if killed after the checkpoint at step 2
    (folder / "finetune_config.json").unlink()
    shutil.rmtree(folder / "checkpoints" / "checkpoint-4")
    capsys.readouterr()
    assert llama_finetune.main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    second = json.loads((folder / "finetune_config.json").read_text())
    assert second["summary"]["steps"] == 4 and second["summary"]["resumed_from"].endswith("checkpoint-2")
    assert [s for s, _ in second["loss_history"]] == [1, 2, 3, 4]
    assert second["loss_history"][:2] == first["loss_history"][:2]  # restored, not retrained
    # finished: a third run trains nothing; other settings on the same name are refused
    assert llama_finetune.main(args) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert llama_finetune.main(args[:-4] + ["--max_steps", "5", "--save_steps", "2"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_checkpoints_made_with_other_settings_are_refused_and_resume_false_starts_again(
        tiny_base, records, tmp_path, capsys):
    """A run killed after its checkpoint at step 2 (no finetune_config.json yet): a re-run with another
    learning rate must not resume from those weights; one that changes only how the run goes may."""
    out = tmp_path / "models"
    args = tiny_args(tiny_base, records, out, "k", "--max_steps", "4", "--save_steps", "2")
    assert llama_finetune.main(args) == 0
    folder, checkpoints = out / "k", out / "k" / "checkpoints"
    (folder / "finetune_config.json").unlink()  # as if killed after the checkpoint at step 2
    shutil.rmtree(checkpoints / "checkpoint-4")
    recorded = (checkpoints / "settings.json").read_bytes()
    kept = sorted(p.name for p in checkpoints.iterdir())
    capsys.readouterr()

    assert llama_finetune.main(args + ["--lr", "5e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {checkpoints} holds checkpoints of other settings; use another --new_name, "
                   "or --resume false to start again")
    assert (checkpoints / "settings.json").read_bytes() == recorded  # nothing touched, nothing trained
    assert sorted(p.name for p in checkpoints.iterdir()) == kept and not (folder / "finetune_config.json").exists()

    # --resume false (the README's and the message's words): the old checkpoints are cleared and the new
    # settings train from step 0
    assert llama_finetune.main(args + ["--lr", "5e-3", "--resume", "false"]) == 0
    assert "resuming from" not in capsys.readouterr().out
    config = json.loads((folder / "finetune_config.json").read_text())
    assert config["summary"]["resumed_from"] is None and config["settings"]["lr"] == 5e-3
    assert [s for s, _ in config["loss_history"]] == [1, 2, 3, 4]
    assert json.loads((checkpoints / "settings.json").read_text())["settings_hash"] == config["settings_hash"]

    # a flag of how the run goes (--logging_steps, --save_steps) is no other setting: killed again, it resumes
    (folder / "finetune_config.json").unlink()
    shutil.rmtree(checkpoints / "checkpoint-4")
    running = args + ["--lr", "5e-3"]
    running[running.index("--logging_steps") + 1] = "2"
    assert llama_finetune.main(running) == 0
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in capsys.readouterr().out


def cut_optimizer(folder: Path) -> None:
    data = (folder / "optimizer.pt").read_bytes()
    (folder / "optimizer.pt").write_bytes(data[: len(data) // 2])


# how a stop while saving checkpoint-4 leaves it (the trainer writes trainer_state.json last, then the marker)
DAMAGE = {
    "killed before trainer_state.json": lambda c: ((c / "complete.json").unlink(), (c / "trainer_state.json").unlink()),
    "killed while writing optimizer.pt": lambda c: ((c / "complete.json").unlink(), (c / "trainer_state.json").unlink(),
                                                    cut_optimizer(c)),
    "power cut: optimizer.pt lost its tail": cut_optimizer,  # the marker says what it should be
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_checkpoint_cut_short_is_moved_aside_and_the_one_before_resumed(tiny_base, records, tmp_path, capsys, damage):
    out = tmp_path / "models"
    args = tiny_args(tiny_base, records, out, "c", "--max_steps", "4", "--save_steps", "2")
    assert llama_finetune.main(args) == 0
    folder, checkpoints = out / "c", out / "c" / "checkpoints"
    assert all((checkpoints / f"checkpoint-{n}" / "complete.json").is_file() for n in (2, 4))
    first = json.loads((folder / "finetune_config.json").read_text())
    (folder / "finetune_config.json").unlink()  # the run never finished
    DAMAGE[damage](checkpoints / "checkpoint-4")
    capsys.readouterr()

    assert llama_finetune.main(args) == 0
    said = capsys.readouterr().out
    assert ("[finetune] checkpoint-4 is incomplete (the run was stopped while saving it); moved aside to "
            "incomplete-checkpoint-4, resuming from checkpoint-2\n") in said
    assert f"resuming from {checkpoints / 'checkpoint-2'}\n" in said
    second = json.loads((folder / "finetune_config.json").read_text())
    assert second["summary"]["resumed_from"] == str(checkpoints / "checkpoint-2") and second["summary"]["steps"] == 4
    assert second["loss_history"][:2] == first["loss_history"][:2]  # restored from step 2, not retrained
    assert (checkpoints / "incomplete-checkpoint-4" / "adapter_model.safetensors").is_file()  # kept, not deleted
    assert (checkpoints / "checkpoint-4" / "complete.json").is_file()  # saved again, whole


@pytest.mark.parametrize("objective", ["sft", "sft+dpo"])
def test_a_second_run_on_the_same_new_name_stops_at_once(tiny_base, records, tmp_path, capsys, objective):
    """Two runs training into one folder would mix their checkpoints: the second one gets one line."""
    out = tmp_path / "models"
    with OutputLock(out / "busy"):  # the first run, holding the folder (sft+dpo: both its stages)
        code = llama_finetune.main(tiny_args(tiny_base, records, out, "busy", "--objective", objective))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out / 'busy'}: another run is writing it (pid {os.getpid()} on ")
    assert err.endswith("wait for it to end, or choose another output") and "\n" not in err
    assert not (out / "busy").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_qlora_without_cuda_says_use_lora(tmp_path, records, capsys):
    code = llama_finetune.main(["--new_name", "q", "--data_files", records, "--method", "qlora",
                                "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "CUDA" in err and "--method lora" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["missing_file", "unknown_method", "bad_line", "no_name", "bad_format", "select_dpo",
                                  "select_no_size", "select_unknown"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, records, capsys, case):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(records).readline() + "{not json\n")
    args = {"missing_file": ["--new_name", "x", "--data_files", str(tmp_path / "nope.jsonl")],
            "unknown_method": ["--new_name", "x", "--data_files", records, "--method", "dora"],
            "bad_line": ["--new_name", "x", "--data_files", f"{records},{bad}"],
            "no_name": ["--data_files", records],
            "bad_format": ["--new_name", "x", "--data_files", records, "--format", "alpaca"],
            "select_dpo": ["--new_name", "x", "--data_files", records, "--objective", "dpo", "--select", "ppl_iqr"],
            "select_no_size": ["--new_name", "x", "--data_files", records, "--select", "ppl_iqr,kcenter"],
            "select_unknown": ["--new_name", "x", "--data_files", records, "--select", "ppl"]}[case]
    code = llama_finetune.main(args + ["--output_dir", str(tmp_path / "models")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    expected = {"missing_file": "nope.jsonl: file not found", "unknown_method": "--method must be one of",
                "bad_line": "bad.jsonl: line 2: not valid JSON", "no_name": "--new_name is required",
                "bad_format": "--format must be one of",
                "select_dpo": "--select picks SFT rows, and --objective dpo trains on preference pairs only",
                "select_no_size": "--select kcenter needs --select_size",
                "select_unknown": "--select must be a comma list of ppl_iqr, kcenter, not 'ppl'"}[case]
    assert expected in err
    assert not (tmp_path / "models").exists()


def test_selection_keeps_a_subset_before_tokenizing_and_is_recorded(tiny_base, records, tmp_path, capsys):
    """--select ppl_iqr,kcenter on the 11 rows: perplexity under the base being fine-tuned (the tiny
    Llama), then k-center keeps 5; the counts and settings go into finetune_config.json, the flags into
    the settings hash, and a re-run selects the same rows (same hash: nothing to train)."""
    out = tmp_path / "models"
    args = tiny_args(tiny_base, records, out, "s", "--max_steps", "1", "--select", "ppl_iqr,kcenter",
                     "--select_size", "5")
    assert llama_finetune.main(args) == 0
    printed = capsys.readouterr().out
    config = json.loads((out / "s" / "finetune_config.json").read_text())
    selection = config["selection"]
    ppl, kcenter = selection["steps"]
    assert (ppl["method"], ppl["in"], kcenter["method"], kcenter["in"]) == ("ppl_iqr", 11, "kcenter", ppl["kept"])
    assert ppl["kept"] + ppl["dropped"] == 11 and ppl["kept"] >= 5 and kcenter["kept"] == 5
    assert (selection["rows_in"], selection["rows_kept"]) == (11, 5) and config["tokenization"]["examples"] == 5
    assert selection["settings"]["perplexity_model"] == tiny_base and selection["settings"]["encoder"]
    assert selection["settings"]["max_len"] == 128 and selection["settings"]["iqr_factor"] == 1.5
    assert config["settings"]["select"] == ["ppl_iqr", "kcenter"] and config["settings"]["select_size"] == 5
    assert "[finetune] selection: 11 rows -> 5 kept: ppl_iqr kept" in printed
    assert llama_finetune.main(args) == 0
    assert "nothing to train" in capsys.readouterr().out
    # another size is another setting
    assert llama_finetune.main(args[:-1] + ["4"]) == 2
    assert "other settings" in capsys.readouterr().err

    # without --select: no selection, and no select flags in the settings (the hash runs had before)
    assert llama_finetune.main(tiny_args(tiny_base, records, out, "n", "--max_steps", "1")) == 0
    plain = json.loads((out / "n" / "finetune_config.json").read_text())
    assert plain["selection"] is None and not {"select", "select_size", "iqr_factor", "select_model"} & set(plain["settings"])


# ---------------------------------------------------------------------------------- the embedded model
def test_embedded_model_finetuned_merged_and_used_by_arena_med(tmp_path, records):
    from mentalarena.engines.hf_backend import HFBackend

    out = tmp_path / "models"
    assert llama_finetune.main(["--new_name", "smol", "--data_files", records, "--output_dir", str(out),
                                "--max_steps", "1", "--batch_size", "2", "--max_seq_length", "64", "--lora_r", "8",
                                "--lr", "1e-3", "--warmup_ratio", "0", "--merge"]) == 0
    config = json.loads((out / "smol" / "finetune_config.json").read_text())
    assert config["settings"]["method"] == "lora" and config["base_gguf_file"].endswith(".gguf")
    # the adapter names the embedded model's folder as its base, not the model cache's dense copy
    from mentalarena.engines.hf_backend import embedded_model_dir
    adapter = json.loads((out / "smol" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == embedded_model_dir()
    merged = out / "smol" / "merged"
    # the adapter folder loads too (its GGUF base is found through finetune_config.json), to the same weights
    via_adapter = HFBackend(str(out / "smol"), device="cpu")
    via_merged = HFBackend(str(merged), device="cpu")
    ids = torch.tensor([via_merged.encode([{"role": "user", "content": "How do you feel today?"}])])
    assert via_adapter.encode([{"role": "user", "content": "Hi"}]) == via_merged.encode([{"role": "user", "content": "Hi"}])
    with torch.no_grad():
        # W x + B A x against (W + B A) x: equal up to float32 rounding, which grows with the logits' size
        torch.testing.assert_close(via_adapter.model(input_ids=ids).logits, via_merged.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    del via_adapter, via_merged

    assert_arena_runs_on(merged, tmp_path)


def assert_arena_runs_on(model: Path, tmp_path: Path) -> None:
    """One short self-play session with `model` as the base model: it loads, plays and names an illness."""
    arena_out = tmp_path / "arena_after.jsonl"
    code = arena_med.main(["--base_model", str(model), "--output_file", str(arena_out), "--limit", "1",
                           "--max_new_tokens", "8", "--dialogue_rounds", "1", "--max_decode_rounds", "0",
                           "--max_tries", "1", "--progress", "False"])
    assert code == 0
    (record,) = read_jsonl(arena_out)
    assert record["models"]["base"] == f"hf:{model}" and record["illness"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_on_cuda(tiny_base, records, tmp_path):
    out = tmp_path / "models"
    args = tiny_args(tiny_base, records, out, "q", "--max_steps", "2", "--merge")
    args[args.index("--method") + 1] = "qlora"
    assert llama_finetune.main(args) == 0
    config = json.loads((out / "q" / "finetune_config.json").read_text())
    assert config["settings"]["method"] == "qlora" and config["settings"]["optim"] == "paged_adamw_32bit"
    assert (out / "q" / "merged" / "config.json").is_file()
