"""Fine-tune an open model on its own self-play data (METHOD.md §5-6): QLoRA as the paper, or plain
LoRA / full fine-tuning, which also run on a CPU.

    python llama_finetune.py --base_model meta-llama/Meta-Llama-3.1-8B-Instruct --new_name llama_iter1 \\
        --nepoch 4 --data_files outputs/arena.jsonl                 # the paper: QLoRA on a CUDA GPU
    python llama_finetune.py --new_name smol_iter1 --data_files outputs/demo.jsonl --max_steps 20 --merge
    accelerate launch llama_finetune.py --base_model ... --new_name ... --data_files ...   # several GPUs

`--data_files` takes self-play records (converted here, `mentalarena/sft.py`) or rows already
converted (`text` or `messages`), detected row by row; exact duplicates of the formatted rows are
dropped before training. Output: `<output_dir>/<new_name>/` holds the adapter (the model itself for
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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mentalarena.cli import main as cli_main
from mentalarena.cli import names, settings_hash
from mentalarena.errors import InputError, check_choice
from mentalarena.jsonl import write_json_atomic
from mentalarena.sft import dedup, load_pairs, to_openai, to_text

SCHEDULERS = ("constant_with_warmup", "constant", "linear", "cosine")
# Flags that change how a run goes, not what it learns: a resumed run may change them.
RUNNING_FLAGS = ("output_dir", "resume", "merge", "logging_steps", "save_steps", "save_total_limit",
                 "gradient_checkpointing")


def run(
    # model and data (the paper's flags)
    base_model: str | None = None,     # None / "embedded": the embedded SmolLM2-135M-Instruct; an HF id or folder (merged/ too)
    new_name: str | None = None,       # output folder <output_dir>/<new_name> (required)
    nepoch: float = 4,                 # epochs (the paper's Llama iterations: 4, 5, 7, 7)
    data_files: str | tuple | None = None,  # comma list: self-play records or converted rows (text / messages)
    # method
    method: str = "auto",              # auto (qlora on CUDA with bitsandbytes, else lora) | qlora | lora | full
    lora_r: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.1,
    target_modules: str | tuple | None = None,  # comma list or all-linear; None: peft's default (q_proj,v_proj for Llama)
    dtype: str = "auto",               # auto: float16 compute for qlora, bfloat16 (else float16) on CUDA, float32 on CPU
    # what the model sees
    format: str = "original",          # original: the paper's "### System: ... Question: ...\n ### Answer: ..." text; chat_template
    reference_glue: bool = False,      # the reference's missing newline before the treatment question
    max_seq_length: int = 1024,        # tokens per example (the reference's trainer cut at 1024); longer ones are cut
    packing: bool = False,             # examples into blocks of max_seq_length tokens (the paper: no packing)
    answer_only_loss: bool = False,    # loss on the answer tokens only (the paper: on the whole text)
    add_eos: bool = True,              # end each example with EOS where the format does not (the reference did not)
    # optimisation (the paper's values)
    lr: float = 2e-4,
    batch_size: int = 4,               # per device
    grad_accum: int = 1,
    weight_decay: float = 0.001,
    max_grad_norm: float = 0.3,
    warmup_ratio: float = 0.03,
    lr_scheduler: str = "constant_with_warmup",  # constant: the reference's setting, under which the warm-up is ignored
    optim: str = "auto",               # auto: paged_adamw_32bit for qlora (the paper), else adamw_torch
    group_by_length: bool = True,      # batches of similar lengths (packed: the partly filled blocks together)
    max_steps: int | None = None,      # stop after this many optimizer steps (overrides nepoch)
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
    started = time.time()
    from mentalarena.hf_backend import EMBEDDED_GGUF, embedded_model_dir
    from mentalarena.training import FORMATS, resolve_dtype, resolve_method

    # ---- every input is checked before any model loads
    if not new_name or not str(new_name).strip("/."):
        raise InputError("--new_name is required (the output goes to <output_dir>/<new_name>)")
    files = names(data_files)
    if not files:
        raise InputError("--data_files is required: self-play records or converted rows (JSONL), comma-separated")
    check_choice("format", format, FORMATS)
    check_choice("lr_scheduler", lr_scheduler, SCHEDULERS)
    _check_numbers(nepoch=nepoch, lora_r=lora_r, lora_alpha=lora_alpha, lr=lr, batch_size=batch_size,
                   grad_accum=grad_accum, max_seq_length=max_seq_length, logging_steps=logging_steps,
                   save_steps=save_steps)
    if not 0 <= lora_dropout < 1 or not 0 <= warmup_ratio < 1 or (max_steps is not None and max_steps < 1):
        raise InputError("--lora_dropout and --warmup_ratio must be in [0, 1), --max_steps at least 1")
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

    # ---- conversion (METHOD.md §5): pairs -> the rows of the chosen format -> exact duplicates dropped
    pairs, report = load_pairs(files, reference_glue=reference_glue)
    for problem in report.problems:
        _say(f"skipped a bad record: {problem}")
    rows = dedup([to_text(p) if format == "original" else to_openai(p) for p in pairs])
    report.rows, report.duplicates = len(rows), len(pairs) - len(rows)
    if not rows:
        raise InputError(f"{', '.join(files)}: no training rows ({report.summary()})")
    _say(f"data: {report.summary()}")

    settings = dict(flags)
    settings.update(base_model=base_model or "embedded", base_gguf_file=gguf, data_files=files, method=method,
                    dtype=str(torch_dtype).removeprefix("torch."), optim=optim, target_modules=modules,
                    rows_sha256=hashlib.sha256(json.dumps(rows).encode()).hexdigest())
    digest = settings_hash({k: v for k, v in settings.items() if k not in RUNNING_FLAGS})
    out = Path(output_dir) / new_name
    checkpoints = out / "checkpoints"
    done = _finished(out, digest)
    if done is not None:
        _say(f"{out} already holds this training (settings {digest}); nothing to train")
        if merge and not done.get("merged"):
            done["merged"] = _merge(out, base, gguf)
            write_json_atomic(out / "finetune_config.json", done)
        return {**done["summary"], "merged": done.get("merged"), "skipped": True, "ok": True}
    _check_checkpoints(checkpoints, digest, resume)
    _say("settings " + json.dumps(settings))

    # ---- tokens
    from mentalarena.training import encode_rows, load_tokenizer, pack

    tokenizer = load_tokenizer(base, gguf)
    examples, stats = encode_rows(rows, tokenizer, format, max_seq_length, answer_only_loss, add_eos)
    if not examples:
        raise InputError(f"no example keeps an answer token within --max_seq_length {max_seq_length}")
    train_set = pack(examples, max_seq_length) if packing else examples
    stats["train_rows"] = len(train_set)
    _say(f"tokens: {stats['examples']} examples ({stats['truncated']} cut at {max_seq_length} tokens, "
         f"{stats['dropped_no_answer_tokens']} dropped), {stats['tokens_per_epoch']} tokens per epoch"
         + (f", packed into {len(train_set)} blocks" if packing else ""))

    # ---- model and trainer
    trainer, params = _trainer(base, gguf, method, torch_dtype, tokenizer, train_set, checkpoints, flags, optim,
                               modules)
    last = _last_checkpoint(checkpoints) if resume else None
    if _is_main():
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json_atomic(checkpoints / "settings.json", {"settings_hash": digest, "settings": settings})
    if last:
        _say(f"resuming from {last}")
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(out))

    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    summary = {"examples": stats["examples"], "tokens_per_epoch": stats["tokens_per_epoch"],
               "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
               "train_loss": result.training_loss, "loss_first": losses[0][1] if losses else None,
               "loss_last": losses[-1][1] if losses else None, "output": str(out),
               "wall_seconds": round(time.time() - started, 1), "resumed_from": last,
               "ok": math.isfinite(result.training_loss)}
    if not _is_main():
        return summary
    trained = trainer.model if method == "lora" else None  # qlora: merged into a reloaded unquantized base
    del trainer
    config = {"settings": settings, "settings_hash": digest, "base_gguf_file": gguf,
              "data_files": [_file_info(f) for f in files], "conversion": report.as_dict(), "tokenization": stats,
              "trainable_parameters": params[0], "all_parameters": params[1], "loss_history": losses,
              "train_metrics": result.metrics, "tensorboard": _tensorboard_dir(checkpoints),
              "world_size": int(os.environ.get("WORLD_SIZE", 1)), "versions": _versions(), "summary": summary}
    if method == "full":
        config["merged"] = str(out)  # already a full model
    elif merge:
        config["merged"] = _merge(out, base, gguf, trained)
    write_json_atomic(out / "finetune_config.json", config)
    summary["merged"] = config.get("merged")
    _print_summary(summary, config)
    return summary


# ---------------------------------------------------------------------------------- helpers
def _trainer(base, gguf, method, torch_dtype, tokenizer, train_set, checkpoints, flags, optim, modules):
    """The model (with its LoRA adapter unless full) and a plain transformers Trainer around it."""
    import torch
    from transformers import Trainer, set_seed

    from mentalarena.training import Collator, add_lora, load_model, parameter_counts, tensorboard_available, training_args

    set_seed(flags["seed"])  # the adapter's initial weights too
    model = load_model(base, gguf, method, torch_dtype)
    if method != "full":
        model = add_lora(model, method, flags["lora_r"], flags["lora_alpha"], flags["lora_dropout"], modules,
                         flags["gradient_checkpointing"])
    params = parameter_counts(model)
    _say(f"model: {base} ({method}, {str(torch_dtype).removeprefix('torch.')}), "
         f"{params[0]:,} of {params[1]:,} parameters trained")
    cuda = torch.cuda.is_available()
    amp = method == "full" and cuda and torch_dtype != torch.float32  # float32 master weights, mixed precision
    tensorboard = tensorboard_available()
    if not tensorboard:
        _say("TensorBoard logs: off (pip install tensorboard to have them)")
    args = training_args(
        output_dir=str(checkpoints), num_train_epochs=flags["nepoch"], max_steps=flags["max_steps"] or -1,
        per_device_train_batch_size=flags["batch_size"], gradient_accumulation_steps=flags["grad_accum"],
        optim=optim, learning_rate=flags["lr"], weight_decay=flags["weight_decay"],
        max_grad_norm=flags["max_grad_norm"], warmup_ratio=flags["warmup_ratio"],
        lr_scheduler_type=flags["lr_scheduler"], group_by_length=flags["group_by_length"],
        gradient_checkpointing=flags["gradient_checkpointing"] and method != "qlora",  # qlora: set by peft
        bf16=amp and torch_dtype == torch.bfloat16, fp16=amp and torch_dtype == torch.float16,
        logging_steps=flags["logging_steps"], logging_first_step=True, save_strategy="steps",
        save_steps=flags["save_steps"], save_total_limit=flags["save_total_limit"], seed=flags["seed"],
        data_seed=flags["seed"], report_to=["tensorboard"] if tensorboard else "none",
        remove_unused_columns=False, dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False if method != "full" else None)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=Collator(tokenizer.pad_token_id),
                      processing_class=tokenizer, callbacks=[_log_last_step_callback()])
    return trainer, params


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

    from mentalarena.training import dense_model, load_tokenizer, resolve_dtype

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
    from transformers.trainer_utils import get_last_checkpoint
    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def _check_numbers(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise InputError(f"--{name} must be a positive number, not {value!r}")


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
