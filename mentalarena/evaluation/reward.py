"""A reward model as a scorer of therapist answers (Counsel_eval.py).

The model is a sequence-classification head with one output over a chat model, e.g. the public
PsychoCounsel-Llama3-8B-Reward. One pair (client statement, therapist response) is laid out by the
model's own chat template as [user: statement, assistant: response], without a generation prompt,
and its score is the head's one logit.

The score of a pair is, by definition, what the model as loaded gives that pair fed alone (batch of
one, no padding). Batching must not change it: pairs are batched by length with right padding and an
attention mask, and the head pools at the rightmost token that is not `config.pad_token_id`
(transformers' rule), which is the pair's own last position as long as that token is not the pad
id; a pair that ends in the pad id is scored alone, under the config the model came with.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from mentalarena.errors import InputError

log = logging.getLogger("mentalarena.evaluation.reward")


def _looks_like_path(model: str) -> bool:
    """A name that can only be a folder: absolute, ./ ../ ~ or more than one '/' (a hub id is org/name)."""
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def _head_size(config: dict) -> int:
    """The number of outputs a config gives the classification head, as transformers reads it:
    `num_labels`, else the size of `id2label`, else its default of 2 (transformers 5 writes neither
    for two labels)."""
    if config.get("num_labels") is not None:
        return int(config["num_labels"])
    if config.get("id2label"):
        return len(config["id2label"])
    return 2


def check_reward_model(model: str) -> None:
    """A cheap check before anything loads. A local folder needs a config.json of a
    sequence-classification model whose head has one output; a hub id passes (it is checked when it
    loads). InputError otherwise, naming the model."""
    if not isinstance(model, str) or not model.strip():
        raise InputError(f"the reward model must be a local folder or a hub id, not {model!r}")
    path = Path(model).expanduser()
    if not path.exists():
        if _looks_like_path(model):
            raise InputError(f"reward model {model}: no such folder")
        return  # a hub id: checked at load
    if not path.is_dir():
        raise InputError(f"reward model {model}: not a folder (a reward model is a folder with config.json and weights)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"reward model {model}: no config.json in the folder (not a transformers model)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"reward model {model}: cannot read config.json ({str(exc).splitlines()[0]})") from exc
    if not isinstance(config, dict):
        raise InputError(f"reward model {model}: config.json is not a JSON object")
    _check_head(model, config.get("architectures"), _head_size(config))


def _check_head(model: str, architectures, labels: int) -> None:
    if architectures and not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise InputError(f"reward model {model}: not a sequence-classification model "
                         f"(architectures: {', '.join(map(str, architectures))})")
    if labels != 1:
        raise InputError(f"a reward model has one output; {model} has {labels} labels")


def pair_ids(tokenizer, statement: str, response: str) -> list[int]:
    """The token ids of one pair through the tokenizer's chat template: [user: statement,
    assistant: response], no generation prompt. A plain list of ints (transformers 5 returns a
    BatchEncoding from `apply_chat_template(tokenize=True)`, older versions a list)."""
    messages = [{"role": "user", "content": statement}, {"role": "assistant", "content": response}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    if hasattr(out, "keys"):  # BatchEncoding / dict
        out = out["input_ids"]
    if hasattr(out, "tolist"):  # a tensor or array
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):  # a batch of one
        out = out[0]
    return [int(t) for t in out]


class RewardModel:
    """A sequence-classification reward model (one output logit), e.g. the public
    PsychoCounsel-Llama3-8B-Reward: scores a (client statement, therapist response) pair, given to the
    model through its own chat template as [user: statement, assistant: response].

    The constructor checks the model (`check_reward_model`) and loads its tokenizer (a tokenizer
    without a chat template is an InputError); the model itself loads on the first `score`."""

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = "auto",
                 batch_size: int = 8, max_length: int = 4096):
        import torch

        from mentalarena.cli import auto_dtype

        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a whole number of at least 1, not {batch_size!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise InputError(f"max_length must be a whole number of at least 1, not {max_length!r}")
        check_reward_model(model)
        self.name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = auto_dtype(dtype, self.device) or "float32"
        self.batch_size, self.max_length = batch_size, max_length
        self.truncated = 0
        self.tokenizer = self._load_tokenizer()
        self.model = None
        self._own_pad: int | None = None  # config.pad_token_id as the model came (None: pool at the last token)
        self._pad: int | None = None  # the id padding uses, which the head skips when it pools

    # ---- loading
    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load reward model {self.name!r}: {str(exc).splitlines()[0]} "
                             "(offline, a hub id must be in the local cache; else pass a local path)") from exc
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"reward model {self.name}: its tokenizer has no chat template "
                             "(the pair is laid out by the model's own template)")
        return tokenizer

    def _load(self):
        if self.model is not None:
            return self.model
        import torch
        from transformers import AutoModelForSequenceClassification

        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                self.name, dtype=getattr(torch, self.dtype), output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load reward model {self.name!r}: {str(exc).splitlines()[0]} "
                             "(offline, a hub id must be in the local cache; else pass a local path)") from exc
        _check_head(self.name, getattr(model.config, "architectures", None), int(model.config.num_labels))
        missing = sorted(info.get("missing_keys") or ())
        if missing:  # e.g. a causal LM read as a classifier: its head would be random
            raise InputError(f"reward model {self.name}: weights missing from the checkpoint "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): not a trained reward model")
        self._own_pad = _pad_id(model)
        pad = self._own_pad
        if pad is None:  # batches need a pad id the head can skip
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            if pad is None:
                pad = 0  # nothing to go by; rows that end in it are scored alone all the same
        self._pad = int(pad)
        self.model = model.to(self.device).eval()
        return self.model

    # ---- scoring
    def score(self, statements: list[str], responses: list[str]) -> list[float]:
        """The reward of each (statement, response) pair, in the input order. A pair longer than
        `max_length` tokens keeps its last `max_length` tokens (the head reads the end of the
        response) and counts in `describe()["truncated"]`."""
        import torch

        statements, responses = list(statements), list(responses)
        if len(statements) != len(responses):
            raise ValueError(f"{len(statements)} statements but {len(responses)} responses")
        if not statements:
            return []
        model = self._load()
        encoded, cut = [], 0
        for statement, response in zip(statements, responses):
            ids = pair_ids(self.tokenizer, statement, response)
            if len(ids) > self.max_length:
                ids, cut = ids[-self.max_length:], cut + 1
            encoded.append(ids)
        if cut:
            self.truncated += cut
            log.warning("%s: %d of %d pairs longer than max_length=%d tokens; each keeps its last %d tokens",
                        self.name, cut, len(encoded), self.max_length, self.max_length)
        alone = [i for i, ids in enumerate(encoded) if ids[-1] == self._pad]
        batched = sorted((i for i, ids in enumerate(encoded) if ids[-1] != self._pad), key=lambda i: (len(encoded[i]), i))
        out = [0.0] * len(encoded)
        with torch.inference_mode():
            for start in range(0, len(batched), self.batch_size):
                chunk = batched[start:start + self.batch_size]
                width = max(len(encoded[i]) for i in chunk)
                ids = torch.full((len(chunk), width), self._pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, :len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                    attention[row, :len(encoded[i])] = 1
                with _pooling_pad(model, self._pad):
                    logits = model(input_ids=ids.to(self.device), attention_mask=attention.to(self.device)).logits
                for row, value in zip(chunk, logits[:, 0].float().cpu().tolist()):
                    out[row] = value
            for i in alone:  # the head would pool before the last token: the model's own rule, one row
                with _pooling_pad(model, self._own_pad):
                    logits = model(input_ids=torch.tensor([encoded[i]], dtype=torch.long, device=self.device)).logits
                out[i] = float(logits[0, 0].float())
        return out

    def describe(self) -> dict:
        return {"model": self.name, "dtype": self.dtype, "device": self.device, "max_length": self.max_length,
                "truncated": self.truncated}

    def close(self) -> None:
        """Frees the model (a later `score` loads it again)."""
        if self.model is None:
            return
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _pad_id(model) -> int | None:
    return model.config.get_text_config().pad_token_id


@contextmanager
def _pooling_pad(model, pad: int | None):
    """The head pools at the rightmost token that is not `config.pad_token_id` (the text config's:
    transformers 5 reads it there), the last token where it is None; set for one forward pass."""
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    before = [c.pad_token_id for c in configs]
    for c in configs:
        c.pad_token_id = pad
    try:
        yield
    finally:
        for c, value in zip(configs, before):
            c.pad_token_id = value
