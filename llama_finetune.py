"""Fine-tune an open model on its own self-play data (METHOD.md §5-6): QLoRA as the paper, or plain
LoRA / full fine-tuning, which also run on a CPU.

    python llama_finetune.py --base_model meta-llama/Meta-Llama-3.1-8B-Instruct --new_name llama_iter1 \\
        --nepoch 4 --data_files outputs/arena.jsonl                 # the paper: QLoRA on a CUDA GPU
    python llama_finetune.py --new_name smol_iter1 --data_files outputs/demo.jsonl --max_steps 20 --merge
    accelerate launch llama_finetune.py --base_model ... --new_name ... --data_files ...   # several GPUs

`--data_files` takes self-play records (converted here, `mentalarena/training/sft.py`) or rows already
converted (`text` or `messages`), detected row by row; exact duplicates of the formatted rows are
dropped before training. `--select ppl_iqr,kcenter --select_size N` then keeps a subset (MentalQLM:
`mentalarena/training/selection.py`; SFT rows only). Output: `<output_dir>/<new_name>/` holds the adapter (the model itself for
`--method full`), the tokenizer and `finetune_config.json` (every setting, the data files with their
hashes, the conversion counts, the loss, the steps, the wall time, the library versions);
`checkpoints/` holds the trainer's checkpoints and TensorBoard logs, and `--merge` adds `merged/`,
a full model that every script here takes as `--base_model` / `--model`. A re-run resumes from the
last checkpoint, and a finished run with the same settings is not trained again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from contextlib import nullcontext
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mentalarena.cli import main as cli_main
from mentalarena.training.checkpoints import marker_callback
from mentalarena.cli import names
from mentalarena.store.keys import settings_hash
from mentalarena.errors import InputError, check_choice
from mentalarena.flags import check_numbers
from mentalarena.store.jsonl import write_json_atomic
from mentalarena.store.locks import OutputLock
from mentalarena.training.selection import parse_methods
from mentalarena.training.sft import convert

SCHEDULERS = ("constant_with_warmup", "constant", "linear", "cosine")
# Flags that change how a run goes, not what it learns: a resumed run may change them.
OBJECTIVES = ("sft", "dpo", "sft+dpo")
# Flags only the preference stage reads: left out of an SFT run's settings (and hash)
DPO_FLAGS = ("objective", "beta", "dpo_lr", "dpo_nepoch", "dpo_loss", "min_margin", "all_pairs", "diagnosis_pairs",
             "diagnosis_margin")
# TRL 1.16's DPO loss types (its `loss_type`), checked here so a typo fails before any model loads
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# Data selection flags (mentalarena/training/selection.py): left out of the settings (and hash) of a run without --select
SELECT_FLAGS = ("select", "select_size", "iqr_factor", "select_model")
# How the records are asked about (mentalarena/training/sft.Questions): hashed through the rows they make
QUESTION_FLAGS = ("sft_questions", "prompt_dir")
RUNNING_FLAGS = ("output_dir", "resume", "merge", "logging_steps", "save_steps", "save_total_limit",
                 "gradient_checkpointing")


def run(
    # model and data (the paper's flags)
    base_model: str | None = None,     # None / "embedded": the embedded SmolLM2-135M-Instruct; an HF id or folder (merged/ too)
    new_name: str | None = None,       # output folder <output_dir>/<new_name> (required)
    nepoch: float = 4,                 # epochs (the paper's Llama iterations: 4, 5, 7, 7)
    data_files: str | tuple | None = None,  # comma list: self-play records or converted rows (text / messages / pairs)
    # objective
    objective: str = "sft",            # sft: the paper | dpo: preference pairs | sft+dpo: SFT, then DPO from the SFT adapter
    beta: float = 0.1,                 # DPO: how far the trained model may move from the reference (TRL's beta)
    dpo_lr: float = 5e-6,              # DPO learning rate (--lr is SFT's)
    dpo_nepoch: float | None = None,   # DPO epochs; None: --nepoch
    dpo_loss: str = "sigmoid",         # TRL's loss_type: sigmoid (DPO), ipo, hinge, robust, ...
    min_margin: float = 2.0,           # pairs: least score gap (1-10 scale) between the chosen and the rejected try
    all_pairs: bool = False,           # pairs: every two tries at least --min_margin apart, not only best vs worst
    diagnosis_pairs: bool = True,      # pairs: the diagnosis the final illness comes from vs the other one
    diagnosis_margin: float = 0.05,    # pairs: least cosine-similarity gap that attributes the final illness
    # method
    method: str = "auto",              # auto (qlora on CUDA with bitsandbytes, else lora) | qlora | lora | full
    lora_r: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.1,
    target_modules: str | tuple | None = None,  # comma list or all-linear; None: peft's default (q_proj,v_proj for Llama)
    dtype: str = "auto",               # auto: float16 compute for qlora, bfloat16 (else float16) on CUDA, float32 on CPU
    # what the model sees
    format: str = "original",          # original: the paper's "### System: ... Question: ...\n ### Answer: ..." text; chat_template
    sft_questions: str = "reference",  # reference: the reference's three questions (the paper's data) | project: reworded
    reference_glue: bool = False,      # the reference's missing newline before the treatment question
    prompt_dir: str | None = None,     # a folder of edited prompts/*.txt (the sft_* questions and system text)
    max_seq_length: int = 1024,        # tokens per example (the reference's trainer cut at 1024); longer ones are cut
    packing: bool = False,             # SFT: examples into blocks of max_seq_length tokens (the paper: no packing)
    answer_only_loss: bool = False,    # SFT: loss on the answer tokens only (the paper: on the whole text)
    add_eos: bool = True,              # SFT: end each example with EOS where the format does not (the reference did not)
    # data selection before tokenizing (MentalQLM; mentalarena/training/selection.py): SFT rows only
    select: str | tuple | None = None,  # ppl_iqr | kcenter | ppl_iqr,kcenter (applied in that order); None: every row
    select_size: int | None = None,    # kcenter: how many rows to keep (required with kcenter)
    iqr_factor: float = 1.5,           # ppl_iqr: keep answer perplexities within [Q1 - f*IQR, Q3 + f*IQR]
    select_model: str | None = None,   # ppl_iqr: the perplexity model; None: the base model being fine-tuned
    # optimisation (the paper's values)
    lr: float = 2e-4,
    batch_size: int = 4,               # per device (DPO: pairs per device)
    grad_accum: int = 1,
    weight_decay: float = 0.001,
    max_grad_norm: float = 0.3,
    warmup_ratio: float = 0.03,
    lr_scheduler: str = "constant_with_warmup",  # constant: the reference's setting, under which the warm-up is ignored
    optim: str = "auto",               # auto: paged_adamw_32bit for qlora (the paper), else adamw_torch
    group_by_length: bool = True,      # SFT: batches of similar lengths (packed: the partly filled blocks together)
    max_steps: int | None = None,      # stop after this many optimizer steps (overrides nepoch; each stage of sft+dpo)
    seed: int = 42,                    # the reference left the trainer's default, 42
    gradient_checkpointing: bool = False,
    # running and output
    output_dir: str = "models",
    resume: bool = True,               # continue from the last checkpoint in <output_dir>/<new_name>/checkpoints
    merge: bool = False,               # also write <output_dir>/<new_name>/merged, a full model with the adapter merged in
    logging_steps: int = 10,
    save_steps: int = 25,              # the reference's value
    save_total_limit: int = 2,
) -> dict:
    """Convert, tokenize, train, save; returns the summary that is also printed."""
    flags = dict(locals())
    check_numbers(run, flags)
    from mentalarena.engines.embedded import EMBEDDED_GGUF, embedded_model_dir
    from mentalarena.training.selection import check_options as check_selection
    from mentalarena.training.trainers import FORMATS, resolve_dtype, resolve_method

    # ---- every input is checked before any model loads
    if not new_name or not str(new_name).strip("/."):
        raise InputError("--new_name is required (the output goes to <output_dir>/<new_name>)")
    files = names(data_files)
    if not files:
        raise InputError("--data_files is required: self-play records or converted rows (JSONL), comma-separated")
    check_choice("objective", objective, OBJECTIVES)
    _questions(flags).check()  # the wording and every question template, before any record is read
    check_choice("format", format, FORMATS)
    check_choice("lr_scheduler", lr_scheduler, SCHEDULERS)
    check_choice("dpo_loss", dpo_loss, DPO_LOSSES)
    if check_selection(select, select_size, iqr_factor, select_model) and objective == "dpo":
        raise InputError("--select picks SFT rows, and --objective dpo trains on preference pairs only "
                         "(with --objective sft+dpo it selects the SFT stage's rows)")
    if objective == "dpo" and packing:
        raise InputError("--packing is for SFT examples; DPO trains on whole pairs (with sft+dpo it packs the SFT stage)")
    gguf = None
    if base_model in (None, "", "embedded"):
        base, gguf = embedded_model_dir(), EMBEDDED_GGUF
    else:
        base = str(base_model)
        if Path(base, "adapter_config.json").is_file():
            raise InputError(f"--base_model {base} is a LoRA adapter; pass the full model: its merged/ folder "
                             "(llama_finetune.py --merge) or the model it was trained from")
    method = resolve_method(method, gguf is not None)
    torch_dtype = resolve_dtype(dtype, method)
    if optim == "auto":
        optim = "paged_adamw_32bit" if method == "qlora" else "adamw_torch"
    modules = names(target_modules)
    modules = "all-linear" if modules == ["all-linear"] else modules or None
    model = {"base": base, "gguf": gguf, "method": method, "dtype": torch_dtype, "optim": optim, "modules": modules}
    # one run per output folder (sft+dpo: both stages); under accelerate launch, the main process holds it
    with OutputLock(Path(output_dir) / new_name) if _is_main() else nullcontext():
        return _train(flags, files, model)


def _train(flags: dict, files: list[str], model: dict) -> dict:
    """One stage (sft or dpo), or sft+dpo: a complete SFT run in <new_name>/sft, then DPO from its
    adapter (or model) in <new_name>."""
    objective = flags["objective"]
    if objective != "sft+dpo":
        return _stage(flags, files, model, objective)
    out = Path(flags["output_dir"]) / flags["new_name"]
    _say(f"sft+dpo: stage 1 of 2, SFT -> {out / 'sft'}")
    sft = _stage({**flags, "output_dir": str(out), "new_name": "sft", "merge": False}, files, model, "sft")
    if not sft.get("ok"):
        return sft
    _say(f"sft+dpo: stage 2 of 2, DPO from {out / 'sft'} -> {out}")
    summary = _stage(flags, files, model, "dpo", start=out / "sft")
    summary["sft_stage"] = {k: sft.get(k) for k in ("output", "steps", "train_loss", "loss_first", "loss_last")}
    return summary


def _stage(flags: dict, files: list[str], model: dict, objective: str, start: Path | None = None) -> dict:
    """One training run into <output_dir>/<new_name>: SFT on the records' answers, or DPO on their
    preference pairs (from `start`, a finished SFT stage, when given)."""
    started = time.time()
    base, gguf, method, torch_dtype = model["base"], model["gguf"], model["method"], model["dtype"]
    out = Path(flags["output_dir"]) / flags["new_name"]
    fmt = flags["format"]

    # ---- data: SFT pairs (METHOD.md §5) or preference pairs (mentalarena/training/preference.py)
    methods, selection = [], None
    if objective == "sft":
        rows, report = convert(files, "text" if fmt == "original" else "openai", questions=_questions(flags))
        if not rows:
            raise InputError(f"{', '.join(files)}: no training rows ({report.summary()})")
        methods = parse_methods(flags["select"])
        if methods:  # after conversion and duplicate removal, before tokenizing
            rows, selection = _select(rows, methods, flags)
    else:
        from mentalarena.training.preference import load_preferences, to_trl, to_trl_text
        pairs, report = load_preferences(
            files, min_margin=flags["min_margin"], all_pairs=flags["all_pairs"], diagnosis=flags["diagnosis_pairs"],
            diagnosis_margin=flags["diagnosis_margin"], questions=_questions(flags))
        if not pairs:
            raise InputError(f"{', '.join(files)}: no preference pairs: {report.why_none()}")
        rows = [to_trl_text(p) if fmt == "original" else _trl_columns(to_trl(p)) for p in pairs]
    for problem in report.problems:
        _say(f"skipped a bad record: {problem}")
    _say(f"{'data' if objective == 'sft' else 'pairs'}: {report.summary()}")

    settings = dict(flags)
    for name in QUESTION_FLAGS:  # what they change is in the rows, which rows_sha256 below carries
        settings.pop(name, None)
    if flags["objective"] == "sft" or objective == "sft":
        for name in DPO_FLAGS:  # a plain SFT run (or the SFT stage) keeps the hash it had before DPO existed
            settings.pop(name, None)
    if objective == "sft" and methods:
        settings["select"] = methods  # one spelling whether fire gave a tuple or a comma string
    else:  # a run without selection (or the DPO stage) keeps the hash it had before --select existed
        for name in SELECT_FLAGS:
            settings.pop(name, None)
    settings.update(base_model=flags["base_model"] or "embedded", base_gguf_file=gguf, data_files=files,
                    method=method, dtype=str(torch_dtype).removeprefix("torch."), optim=model["optim"],
                    target_modules=model["modules"], rows_sha256=hashlib.sha256(json.dumps(rows).encode()).hexdigest())
    if start is not None:  # DPO from an SFT stage: that stage's settings are part of this one's
        settings["start_from"] = str(start)
        settings["start_settings_hash"] = json.loads((start / "finetune_config.json").read_text())["settings_hash"]
    digest = settings_hash({k: v for k, v in settings.items() if k not in RUNNING_FLAGS})
    checkpoints = out / "checkpoints"
    done = _finished(out, digest)
    if done is not None:
        _say(f"{out} already holds this training (settings {digest}); nothing to train")
        if flags["merge"] and not done.get("merged"):
            done["merged"] = _merge(out, base, gguf)
            write_json_atomic(out / "finetune_config.json", done)
        return {**done["summary"], "merged": done.get("merged"), "skipped": True, "ok": True}
    _check_checkpoints(checkpoints, digest, flags["resume"])
    _say("settings " + json.dumps(settings))

    # ---- tokens, model and trainer
    from mentalarena.training.trainers import load_tokenizer

    tokenizer = load_tokenizer(str(start) if start is not None else base, None if start is not None else gguf)
    if objective == "sft":
        trainer, params, stats = _sft_trainer(model, tokenizer, rows, checkpoints, flags)
    else:
        trainer, params, stats = _dpo_trainer(model, tokenizer, rows, checkpoints, flags, start)
        stats["pairs"] = len(rows)
    trainer.add_callback(marker_callback())  # each checkpoint marked complete once saved, for the resume above
    last = _last_checkpoint(checkpoints) if flags["resume"] else None
    if _is_main():
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json_atomic(checkpoints / "settings.json", {"settings_hash": digest, "settings": settings})
    if last:
        _say(f"resuming from {last}")
    result = trainer.train(resume_from_checkpoint=last)
    if objective == "dpo" and "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")  # TRL's frozen copy of the SFT adapter (the reference), not an output
    trainer.save_model(str(out))

    history = [e for e in trainer.state.log_history if "loss" in e]
    losses = [(e["step"], e["loss"]) for e in history]
    summary = {"objective": flags["objective"] if objective == "dpo" else "sft", "pairs": len(rows) if objective == "dpo" else None,
               "examples": stats["examples"], "tokens_per_epoch": stats["tokens_per_epoch"],
               "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
               "train_loss": result.training_loss, "loss_first": losses[0][1] if losses else None,
               "loss_last": losses[-1][1] if losses else None, "output": str(out),
               "wall_seconds": round(time.time() - started, 1), "resumed_from": last,
               "ok": math.isfinite(result.training_loss)}
    if objective == "dpo" and history:
        for key, name in (("rewards/margins", "reward_margin"), ("rewards/accuracies", "reward_accuracy")):
            values = [e[key] for e in history if key in e]
            summary[name + "_first"], summary[name + "_last"] = (values[0], values[-1]) if values else (None, None)
    if not _is_main():
        return summary
    trained = trainer.model if method == "lora" else None  # qlora: merged into a reloaded unquantized base
    del trainer
    config = {"settings": settings, "settings_hash": digest, "base_gguf_file": gguf,
              "data_files": [_file_info(f) for f in files], "tokenization": stats,
              "trainable_parameters": params[0], "all_parameters": params[1], "loss_history": losses,
              "log_history": history, "train_metrics": result.metrics, "tensorboard": _tensorboard_dir(checkpoints),
              "world_size": int(os.environ.get("WORLD_SIZE", 1)), "versions": _versions(), "summary": summary}
    config["conversion" if objective == "sft" else "preference"] = report.as_dict()
    if objective == "sft":
        config["selection"] = selection
    if objective == "dpo":
        from mentalarena.training.preference import to_trl
        from mentalarena.training.sft import write_rows
        # every pair made (TRL may still drop or cut long ones), readable back
        write_rows(out / "dpo_pairs.jsonl", [to_trl(p) for p in pairs])
        config["pairs_file"] = str(out / "dpo_pairs.jsonl")
    config["figure"] = _figure(history, out / "training_curves.png", f"{flags['objective']}: {out}")
    if method == "full":
        config["merged"] = str(out)  # already a full model
    elif flags["merge"]:
        config["merged"] = _merge(out, base, gguf, trained)
    write_json_atomic(out / "finetune_config.json", config)
    summary["merged"] = config.get("merged")
    _print_summary(summary, config)
    return summary


# ---------------------------------------------------------------------------------- helpers
def _questions(flags: dict):
    from mentalarena.prompts import Prompts
    from mentalarena.training.sft import Questions
    return Questions(Prompts(flags["prompt_dir"]), flags["sft_questions"], flags["reference_glue"])


def _select(rows: list[dict], methods: list[str], flags: dict) -> tuple[list[dict], dict]:
    """MentalQLM's selection (mentalarena/training/selection.py): perplexity under --select_model (default the
    base model being fine-tuned), k-center on the bundled sentence encoder."""
    from mentalarena.training.selection import select, summary

    model = flags["select_model"] or flags["base_model"] or "embedded"
    kept, report = select(rows, methods, fmt=flags["format"], size=flags["select_size"], factor=flags["iqr_factor"],
                          model=model, max_len=flags["max_seq_length"])
    _say(f"selection: {summary(report)}")
    if not kept:
        raise InputError(f"--select {','.join(methods)} kept no row of {len(rows)}")
    return kept, report


def _sft_trainer(model: dict, tokenizer, rows: list[dict], checkpoints: Path, flags: dict):
    """Rows -> token ids with labels (mentalarena/training/trainers.py), the model with its LoRA adapter
    (unless full), and a plain transformers Trainer around them."""
    from transformers import Trainer, set_seed

    from mentalarena.training.trainers import Collator, add_lora, encode_rows, load_model, pack, parameter_counts

    max_len = flags["max_seq_length"]
    examples, stats = encode_rows(rows, tokenizer, flags["format"], max_len, flags["answer_only_loss"], flags["add_eos"])
    if not examples:
        raise InputError(f"no example keeps an answer token within --max_seq_length {max_len}")
    train_set = pack(examples, max_len) if flags["packing"] else examples
    stats["train_rows"] = len(train_set)
    _say(f"tokens: {stats['examples']} examples ({stats['truncated']} cut at {max_len} tokens, "
         f"{stats['dropped_no_answer_tokens']} dropped), {stats['tokens_per_epoch']} tokens per epoch"
         + (f", packed into {len(train_set)} blocks" if flags["packing"] else ""))

    method = model["method"]
    set_seed(flags["seed"])  # the adapter's initial weights too
    net = load_model(model["base"], model["gguf"], method, model["dtype"])
    if method != "full":
        net = add_lora(net, method, flags["lora_r"], flags["lora_alpha"], flags["lora_dropout"], model["modules"],
                       flags["gradient_checkpointing"])
    params = parameter_counts(net)
    _say_model(model, params)
    args = _args(model, checkpoints, flags, None, num_train_epochs=flags["nepoch"], learning_rate=flags["lr"],
                 group_by_length=flags["group_by_length"], remove_unused_columns=False)
    trainer = Trainer(model=net, args=args, train_dataset=train_set, data_collator=Collator(tokenizer.pad_token_id),
                      processing_class=tokenizer, callbacks=[_log_last_step_callback()])
    return trainer, params, stats


def _dpo_trainer(model: dict, tokenizer, rows: list[dict], checkpoints: Path, flags: dict, start: Path | None):
    """TRL's DPOTrainer on the preference rows. The reference model is had the TRL way: for a new
    LoRA adapter, the same weights with the adapter switched off; for DPO from an SFT adapter, a
    frozen copy of that adapter inside the same model (TRL's "ref" adapter), so no second full
    model is loaded; for full fine-tuning, a second, frozen copy of the starting model."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from mentalarena.training.trainers import load_model, lora_config, parameter_counts, prepare_kbit

    method = model["method"]
    source, gguf = (str(start), None) if start is not None and method == "full" else (model["base"], model["gguf"])
    set_seed(flags["seed"])  # the adapter's initial weights too
    net = load_model(source, gguf, method, model["dtype"])
    ref, peft_config = None, None
    if method == "full":
        ref = load_model(source, gguf, method, model["dtype"]).eval().requires_grad_(False)
    else:
        net = prepare_kbit(net, method, flags["gradient_checkpointing"])
        if start is not None:
            net = PeftModel.from_pretrained(net, str(start), is_trainable=True)
        else:
            peft_config = lora_config(flags["lora_r"], flags["lora_alpha"], flags["lora_dropout"], model["modules"])
    args = _args(model, checkpoints, flags, DPOConfig, num_train_epochs=flags["dpo_nepoch"] or flags["nepoch"],
                 learning_rate=flags["dpo_lr"], group_by_length=False, beta=flags["beta"],
                 loss_type=[flags["dpo_loss"]], max_length=flags["max_seq_length"], dataset_num_proc=None)
    try:
        trainer = DPOTrainer(model=net, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[_log_last_step_callback()])
    except ValueError as exc:  # e.g. an unknown loss type, or target modules the model lacks
        raise InputError(f"DPO: {str(exc).splitlines()[0]}") from exc
    params = parameter_counts(trainer.model)
    _say_model(model, params)
    data = trainer.train_dataset
    lengths = [(len(p), len(c), len(r)) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
    cut = sum(p + max(c, r) > flags["max_seq_length"] for p, c, r in lengths)
    stats = {"examples": len(data), "dropped_prompt_too_long": len(rows) - len(data), "truncated": cut,
             "tokens_per_epoch": sum(2 * p + c + r for p, c, r in lengths),
             "learned_tokens_per_epoch": sum(c + r for _, c, r in lengths)}
    _say(f"tokens: {stats['examples']} pairs ({cut} cut at {flags['max_seq_length']} tokens, "
         f"{stats['dropped_prompt_too_long']} dropped: prompt alone too long), {stats['tokens_per_epoch']} tokens per epoch")
    if not len(data):
        raise InputError(f"no pair keeps an answer token within --max_seq_length {flags['max_seq_length']}")
    return trainer, params, stats


def _args(model: dict, checkpoints: Path, flags: dict, config_class, **specific):
    """Trainer settings both objectives share (the paper's), plus the objective's own."""
    import torch

    from mentalarena.training.trainers import tensorboard_available, training_args

    method, torch_dtype = model["method"], model["dtype"]
    cuda = torch.cuda.is_available()
    amp = method == "full" and cuda and torch_dtype != torch.float32  # float32 master weights, mixed precision
    tensorboard = tensorboard_available()
    if not tensorboard:
        _say("TensorBoard logs: off (pip install tensorboard to have them)")
    return training_args(
        config_class, output_dir=str(checkpoints), max_steps=flags["max_steps"] or -1,
        per_device_train_batch_size=flags["batch_size"], gradient_accumulation_steps=flags["grad_accum"],
        optim=model["optim"], weight_decay=flags["weight_decay"],
        max_grad_norm=flags["max_grad_norm"], warmup_ratio=flags["warmup_ratio"],
        lr_scheduler_type=flags["lr_scheduler"],
        gradient_checkpointing=flags["gradient_checkpointing"] and method != "qlora",  # qlora: set by peft
        bf16=amp and torch_dtype == torch.bfloat16, fp16=amp and torch_dtype == torch.float16,
        logging_steps=flags["logging_steps"], logging_first_step=True, save_strategy="steps",
        save_steps=flags["save_steps"], save_total_limit=flags["save_total_limit"], seed=flags["seed"],
        data_seed=flags["seed"], report_to=["tensorboard"] if tensorboard else "none",
        dataloader_pin_memory=cuda, ddp_find_unused_parameters=False if method != "full" else None, **specific)


def _say_model(model: dict, params: tuple[int, int]) -> None:
    _say(f"model: {model['base']} ({model['method']}, {str(model['dtype']).removeprefix('torch.')}), "
         f"{params[0]:,} of {params[1]:,} parameters trained")


def _trl_columns(row: dict) -> dict:
    return {k: row[k] for k in ("prompt", "chosen", "rejected")}


def _figure(history: list[dict], path: Path, title: str) -> str | None:
    """The training curves as a PNG beside the model (loss; for DPO also the reward margin and accuracy)."""
    if not history:
        return None
    from mentalarena.reports.figures import training_curves
    training_curves(history, path, title)
    return str(path)


def _log_last_step_callback():
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        """The final step's loss is logged too, so the summary can say where the loss ended."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    return LogLastStep()


def _merge(out: Path, base: str, gguf: str | None, trained=None) -> str:
    """Base weights + adapter -> `out/merged`, a plain full model with the tokenizer (and its chat
    template). A LoRA model just trained is merged as it is in memory; otherwise (QLoRA, or a run
    finished earlier) the base is loaded again unquantized and the saved adapter applied: merging
    into 4-bit weights would round the adapter away."""
    from peft import PeftModel

    from mentalarena.training.trainers import dense_model, load_tokenizer, resolve_dtype

    target = out / "merged"
    if trained is None:
        trained = PeftModel.from_pretrained(dense_model(base, gguf, dtype=resolve_dtype("auto", "lora")), str(out))
    model = trained.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(str(target))
    tokenizer = load_tokenizer(str(out), None)
    tokenizer.padding_side = "left"  # for generation
    tokenizer.save_pretrained(str(target))
    _say(f"merged ({str(model.dtype).removeprefix('torch.')}) -> {target}")
    return str(target)


def _finished(out: Path, digest: str) -> dict | None:
    """The config of a finished run with these settings; a different finished run is refused."""
    path = out / "finetune_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("settings_hash") != digest:
        raise InputError(f"{out} holds a model trained with other settings (hash {config.get('settings_hash')} "
                         f"!= {digest}); use another --new_name or remove the folder")
    return config


def _check_checkpoints(checkpoints: Path, digest: str, resume: bool) -> None:
    """Checkpoints of other settings are never resumed; without --resume they are cleared."""
    recorded = checkpoints / "settings.json"
    if not resume:
        if _is_main() and checkpoints.exists():
            shutil.rmtree(checkpoints)
        return
    if recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8")).get("settings_hash") != digest:
        raise InputError(f"{checkpoints} holds checkpoints of other settings; use another --new_name, "
                         "or --resume false to start again")


def _last_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete checkpoint: one a kill cut short while saving is named and moved aside
    (mentalarena/training/checkpoints.py), not handed to the trainer."""
    from mentalarena.training.checkpoints import newest_complete
    last, notes = newest_complete(checkpoints, move_aside=_is_main())
    for note in notes:
        _say(note)
    return last


def _file_info(path: str) -> dict:
    data = Path(path).read_bytes()
    return {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _tensorboard_dir(checkpoints: Path) -> str | None:
    runs = checkpoints / "runs"
    return str(runs) if runs.is_dir() else None


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _is_main() -> bool:
    """Rank 0 under `accelerate launch` / torchrun, or a single process."""
    return int(os.environ.get("RANK", 0)) == 0


def _say(message: str) -> None:
    if _is_main():
        print(f"[finetune] {message}", flush=True)


def _print_summary(summary: dict, config: dict) -> None:
    loss = (f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} (mean {summary['train_loss']:.4f})"
            if summary["loss_first"] is not None else f"mean loss {summary['train_loss']:.4f}")
    _say(f"done: {summary['examples']} examples, {summary['tokens_per_epoch']} tokens per epoch, "
         f"{summary['steps']} steps ({summary['epochs']} epochs), {loss}, {summary['wall_seconds']} s")
    _say(f"written: {summary['output']} (adapter or model, tokenizer, finetune_config.json)"
         + (f"; merged model: {summary['merged']}" if summary.get("merged") else "")
         + (f"; TensorBoard: {config['tensorboard']}" if config["tensorboard"] else ""))


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when trained (or already done), 1 when the loss is not finite, 2 on bad input."""
    return cli_main({}, run, lambda _, summary: 0 if isinstance(summary, dict) and summary.get("ok") else 1, argv)


if __name__ == "__main__":
    sys.exit(main())
