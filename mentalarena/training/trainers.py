"""Supervised fine-tuning machinery shared by `llama_finetune.py` and its benchmark: rows -> token ids
with labels, packing, the batch collator, and model loading for full / LoRA / QLoRA training.

Tokenization is done here, not by a trainer library, so the label mask is explicit: every token that
is not to be learned has label -100. The first token of every example is always masked: it has no
context of its own (in a packed block, it would be predicted from the end of the previous example).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch

from mentalarena.errors import InputError
from mentalarena.engines.hf_backend import FALLBACK_TEMPLATE
from mentalarena.training.sft import TEXT_ANSWER

IGNORE = -100  # label of a token that is not learned (the loss skips it)
METHODS = ("auto", "qlora", "lora", "full")
FORMATS = ("original", "chat_template")


# ---------------------------------------------------------------------------------- rows -> tokens
def render(row: dict, tokenizer, fmt: str) -> tuple[str, int]:
    """The training text of one row and the character where its answer starts.

    `original`: the reference's `text` field as is (METHOD.md §5). `chat_template`: the row's
    system/user/assistant messages through the tokenizer's chat template."""
    if fmt == "original":
        text = row["text"]
        return text, text.index(TEXT_ANSWER) + len(TEXT_ANSWER)
    messages = row["messages"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if text.startswith(prompt):
        return text, len(prompt)
    return text, text.rindex(messages[-1]["content"])  # templates that render the last turn differently


def encode(row: dict, tokenizer, fmt: str, max_len: int, answer_only: bool, add_eos: bool) -> dict:
    """Token ids and labels of one row, cut to `max_len` tokens. `truncated` flags a cut row."""
    text, answer_start = render(row, tokenizer, fmt)
    # The original format is plain text: the tokenizer adds its BOS, as the reference's trainer did.
    # A chat template writes its own special tokens.
    enc = tokenizer(text, add_special_tokens=fmt == "original", return_offsets_mapping=tokenizer.is_fast)
    ids = enc["input_ids"]
    if tokenizer.is_fast:  # a token belongs to the answer when it ends inside it
        in_answer = [end > answer_start for _, end in enc["offset_mapping"]]
    else:
        prompt_len = len(tokenizer(text[:answer_start], add_special_tokens=fmt == "original")["input_ids"])
        in_answer = [i >= prompt_len for i in range(len(ids))]
    # End with EOS so the model learns to stop, unless the chat template already closes the turn with it.
    if add_eos and tokenizer.eos_token_id is not None and tokenizer.eos_token not in text[answer_start:]:
        ids, in_answer = ids + [tokenizer.eos_token_id], in_answer + [True]
    labels = [t if (a or not answer_only) else IGNORE for t, a in zip(ids, in_answer)]
    labels[0] = IGNORE
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": len(ids) > max_len}


def encode_rows(rows: list[dict], tokenizer, fmt: str, max_len: int, answer_only: bool,
                add_eos: bool) -> tuple[list[dict], dict]:
    """Every row encoded; rows left without a single learned token (the answer cut off) are dropped."""
    examples, truncated, dropped = [], 0, 0
    for row in rows:
        ex = encode(row, tokenizer, fmt, max_len, answer_only, add_eos)
        truncated += ex.pop("truncated")
        if all(label == IGNORE for label in ex["labels"]):
            dropped += 1
            continue
        examples.append(ex)
    stats = {"examples": len(examples), "truncated": truncated, "dropped_no_answer_tokens": dropped,
             "tokens_per_epoch": sum(len(e["input_ids"]) for e in examples),
             "learned_tokens_per_epoch": sum(sum(label != IGNORE for label in e["labels"]) for e in examples)}
    return examples, stats


def pack(examples: list[dict], block: int) -> list[dict]:
    """Examples into blocks of at most `block` tokens, first-fit by decreasing length; no example
    is split. Position ids restart at 0 for each example: transformers reads a restart as a
    sequence boundary and masks attention across it (see `Collator`)."""
    bins: list[list[dict]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True):
        n = len(ex["input_ids"])
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([])
            room.append(block)
            slot = len(bins) - 1
        bins[slot].append(ex)
        room[slot] -= n
    return [{"input_ids": [t for e in b for t in e["input_ids"]],
             "labels": [t for e in b for t in e["labels"]],
             "position_ids": [p for e in b for p in range(len(e["input_ids"]))]} for b in bins]


class Collator:
    """Right-padded batches. Unpacked rows get an attention mask. Packed rows get position ids and
    no attention mask: transformers (>= 4.54, eager and sdpa attention) then builds a block-diagonal
    causal mask from the position restarts, so no token attends to another example. Padding forms a
    segment of its own (positions restart at 0) whose labels are ignored."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        batch = {"input_ids": [], "labels": []}
        if packed:
            batch["position_ids"] = []
        else:
            batch["attention_mask"] = []
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_id] * pad)
            batch["labels"].append(f["labels"] + [IGNORE] * pad)
            if packed:
                batch["position_ids"].append(f["position_ids"] + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ---------------------------------------------------------------------------------- models
def resolve_method(method: str, gguf: bool) -> str:
    """`auto`: QLoRA where it can run (CUDA and bitsandbytes), as the paper; plain LoRA otherwise
    and for the embedded GGUF model (135M parameters: nothing to gain from 4-bit weights)."""
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    qlora_ok, why = qlora_available()
    if method == "qlora" and not qlora_ok:
        raise InputError(f"--method qlora needs {why}; use --method lora (same adapter, unquantized base)")
    if method == "qlora" and gguf:
        raise InputError("--method qlora needs a transformers checkpoint, not the embedded GGUF model; use --method lora")
    if method == "auto":
        return "qlora" if qlora_ok and not gguf else "lora"
    return method


def qlora_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "a CUDA GPU (none found)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "bitsandbytes (pip install bitsandbytes)"
    return True, ""


def resolve_dtype(dtype: str, method: str) -> torch.dtype:
    """`auto`: float16 compute for QLoRA (the paper); on CUDA bfloat16 where supported, else
    float16; float32 on CPU."""
    if dtype != "auto":
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise InputError(f"--dtype must be auto or a torch dtype name (float32, bfloat16, float16), not {dtype!r}")
        return getattr(torch, dtype)
    if method == "qlora":
        return torch.float16
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(base: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    try:
        source, gguf_file = _dense_copy(base, gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as exc:
        raise InputError(f"--base_model {base}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the reference
    if not tokenizer.chat_template:
        # the layout every script here falls back to at inference (hf_backend), so training and use agree
        tokenizer.chat_template = FALLBACK_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(base: str, gguf_file: str | None, method: str, dtype: torch.dtype):
    """The base model for training. QLoRA: 4-bit NF4 weights, `dtype` compute (METHOD.md §6), one
    copy per process on its own GPU (never device_map="auto", which would split one copy across the
    GPUs of every process under `accelerate launch`). Full: float32 master weights (mixed precision
    comes from the trainer). LoRA: the frozen base in `dtype`."""
    kwargs: dict = {"dtype": torch.float32 if method == "full" else dtype}
    if method == "qlora":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = dense_model(base, gguf_file, **kwargs)
    except OSError as exc:
        raise InputError(f"--base_model {base}: cannot load it ({str(exc).splitlines()[0]})") from exc
    model.config.use_cache = False  # no key/value cache while training
    return model


def dense_model(base: str, gguf_file: str | None, **kwargs):
    """`from_pretrained`, with a GGUF file unpacked into plain dense weights. transformers 5 keeps
    a GGUF "quantizer" on such a model even when it unpacked every weight, and then refuses to
    train it or to save it: the weights are dense, so the marker goes."""
    from transformers import AutoModelForCausalLM

    source, gguf_file = _dense_copy(base, gguf_file)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        try:
            from transformers import GgufConfig
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass  # transformers 4 always unpacks GGUF weights, with no quantizer
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    # the base's own name, not the cache folder's: peft records it in the adapter's config
    model.config.name_or_path = model.name_or_path = base
    if gguf_file and getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        if "quantization_config" in vars(model.config):
            delattr(model.config, "quantization_config")
    return model


def _dense_copy(base: str, gguf_file: str | None) -> tuple[str, str | None]:
    """A GGUF base as the dense copy the model cache keeps (converted on first use, gguf_cache.py);
    unchanged when there is no GGUF file or the cache is off or cannot be written."""
    if gguf_file:
        from mentalarena.engines.gguf_cache import dense_folder
        folder = dense_folder(base, gguf_file)
        if folder is not None:
            return str(folder), None
    return base, gguf_file


def add_lora(model, method: str, r: int, alpha: int, dropout: float, target_modules: list[str] | None,
             gradient_checkpointing: bool):
    """Wrap the model with a fresh LoRA adapter (no bias, causal LM, as the paper). Target modules:
    peft's default for the architecture unless given (q_proj, v_proj for Llama, as the reference)."""
    from peft import get_peft_model

    model = prepare_kbit(model, method, gradient_checkpointing)
    try:
        return get_peft_model(model, lora_config(r, alpha, dropout, target_modules))
    except ValueError as exc:
        raise InputError(f"--target_modules: {str(exc).splitlines()[0]}") from exc


def lora_config(r: int, alpha: int, dropout: float, target_modules: list[str] | str | None):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=target_modules or None)


def prepare_kbit(model, method: str, gradient_checkpointing: bool):
    """QLoRA's preparation of a 4-bit base (float32 norms, input gradients); other bases unchanged."""
    if method != "qlora":
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, all) parameters; peft counts 4-bit weights at their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def training_args(config_class=None, **kwargs):
    """`TrainingArguments` (or a subclass such as TRL's `DPOConfig`) across transformers 4.56-5.x,
    which renamed three settings: the warm-up ratio (5.x: a `warmup_steps` below 1), group-by-length
    (5.x: a sampling strategy) and gradient checkpointing (5.x: activation checkpointing)."""
    from transformers import TrainingArguments

    config_class = config_class or TrainingArguments
    names = {f.name for f in dataclasses.fields(config_class)}
    ratio = kwargs.pop("warmup_ratio")
    kwargs["warmup_steps" if "warmup_ratio" not in names else "warmup_ratio"] = ratio
    grouped = kwargs.pop("group_by_length")
    if "train_sampling_strategy" in names:
        kwargs["train_sampling_strategy"] = "group_by_length" if grouped else "random"
    else:
        kwargs["group_by_length"] = grouped
    checkpointing = kwargs.pop("gradient_checkpointing")
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[key] = checkpointing
    kwargs[key + "_kwargs"] = {"use_reentrant": False} if checkpointing else None
    return config_class(**kwargs)


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None

