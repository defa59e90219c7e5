"""Encoder-decoder models (MentalBART, MentalT5 and any `AutoModelForSeq2SeqLM` checkpoint).

The prompt goes to the encoder and the answer comes out of the decoder, so the decoder's output is
the whole answer: it is never sliced by the prompt length (the reference sliced every model's output
that way, which cuts the start off an encoder-decoder's answer or empties it). Encoder inputs are
padded on the right, as these models were trained (learned absolute positions in BART); the attention
mask hides the pads. The same module scores text with such a model (`target_log_likelihood`, the
computation behind BART-score).
"""
from __future__ import annotations

import copy
import json
import logging
import threading
from pathlib import Path
from typing import Iterator

import torch

from mentalarena.engines.chat import ChatBackend, Reply
from mentalarena.store.keys import request_seed
from mentalarena.errors import InputError
from mentalarena.engines.halving import run_halving
from mentalarena.engines.sampling import SeededSampler, checkpoint_sampling, row_generators

log = logging.getLogger("mentalarena.seq2seq")

# The reference's generate(max_length=2048): for an encoder-decoder that counts the answer only.
REFERENCE_MAX_LENGTH = 2048


def is_encoder_decoder(model: str) -> bool:
    """Whether a local folder or hub id holds an encoder-decoder model (its config's
    `is_encoder_decoder`). A hub id that cannot be resolved here counts as not one."""
    config = Path(model, "config.json")
    if config.is_file():
        try:
            return bool(json.loads(config.read_text(encoding="utf-8")).get("is_encoder_decoder"))
        except (OSError, ValueError):
            return False
    if Path(model).exists():
        return False
    try:
        from transformers import AutoConfig
        return bool(getattr(AutoConfig.from_pretrained(model), "is_encoder_decoder", False))
    except Exception:  # offline, gated, or not a model id: leave it to the causal backend's loader
        return False


def load_seq2seq(path: str, device: str, dtype: str | None):
    """Tokenizer and model (eval mode, on `device`) of a local folder or hub id; InputError if absent."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load seq2seq model {path!r}: {str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    tokenizer.padding_side = "right"
    return tokenizer, model


def _position_limit(config) -> int | None:
    """Learned absolute positions (BART) bound each side; relative ones (T5) do not."""
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


class Seq2SeqBackend(ChatBackend):
    """Batched `generate` of an encoder-decoder on raw text prompts (`stream(..., chat=False)`)."""

    batched = True

    def __init__(self, model_name_or_path: str, temperature: float = 0.0, max_new_tokens: int | None = None,
                 top_p: float | None = None, top_k: int | None = None, device: str | None = None, dtype: str | None = None,
                 max_batch_size: int = 16, seed: int = 0, name: str | None = None):
        self.name = name or f"seq2seq:{model_name_or_path}"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer, self.model = load_seq2seq(model_name_or_path, self.device, dtype)
        limit = _position_limit(self.model.config)
        # None: the reference's max_length=2048 (answer tokens only), within the decoder's positions
        # (the decoder start token takes the first one)
        wanted = REFERENCE_MAX_LENGTH if max_new_tokens is None else int(max_new_tokens)
        self.max_new_tokens = min(wanted, limit - 1) if limit else wanted
        # encoder side: the position table and the tokenizer's own limit (a huge sentinel when unset)
        limits = [x for x in (limit, getattr(self.tokenizer, "model_max_length", None)) if x and x < 1 << 30]
        self.context_limit = min(limits) if limits else None
        self.temperature, self.seed = temperature, seed
        self.sampling = checkpoint_sampling(self.model.generation_config, top_p, top_k)
        self.top_p, self.top_k = self.sampling["top_p"], self.sampling["top_k"]
        self.max_batch_size = max_batch_size
        self.generation_config = self._greedy_or_sampling()
        self._lock = threading.Lock()
        self.truncated_prompts = 0

    def _greedy_or_sampling(self):
        """The checkpoint's generation config keeps its token ids (decoder start, forced BOS/EOS) but
        loses its search settings (beams, length penalties, n-gram blocking): greedy means greedy."""
        config = copy.deepcopy(self.model.generation_config)
        config.update(num_beams=1, num_beam_groups=1, min_length=0, min_new_tokens=None, no_repeat_ngram_size=0,
                      repetition_penalty=1.0, length_penalty=1.0, early_stopping=False, max_length=None,
                      max_new_tokens=self.max_new_tokens, top_k=None, do_sample=False, temperature=None,
                      top_p=None)  # sampling, when asked, is done row by row by SeededSampler
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def stats(self) -> dict:
        return {"truncated_prompts": self.truncated_prompts, "max_new_tokens": self.max_new_tokens}

    def generate(self, conversations: list[list[dict]]) -> list[Reply]:
        raise InputError(f"{self.name}: an encoder-decoder model reads raw text; use --prompting raw")

    def stream(self, conversations, seeds=None, chat: bool = True) -> Iterator[tuple[int, Reply]]:
        """(index, reply) per prompt, batch by batch in order of prompt length. Sampling (temperature
        > 0) draws each row from its own seed (`seeds`, else derived from `seed` and the row's index).
        A batch that fails is run again in halves (halving.py): a request that fails alone yields a
        ModelCallError instead of a reply."""
        if chat:
            raise InputError(f"{self.name}: an encoder-decoder model reads raw text; use --prompting raw")
        lengths = [len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"]) for text in conversations]
        seeds = seeds if seeds is not None else [request_seed(self.seed, i) for i in range(len(conversations))]
        order = sorted(range(len(conversations)), key=lambda i: -lengths[i])

        def run(rows: list[int]) -> list[Reply]:
            with self._lock, torch.inference_mode():
                return self._generate_batch([conversations[i] for i in rows], [lengths[i] for i in rows],
                                            [seeds[i] for i in rows])

        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            yield from zip(chunk, run_halving(run, chunk, self.name))

    def _generate_batch(self, texts: list[str], lengths: list[int], seeds: list[int]) -> list[Reply]:
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=self.context_limit is not None,
                               max_length=self.context_limit).to(self.device)
        sampler = ([SeededSampler(self.temperature, self.top_p, row_generators(seeds, self.device),
                                  self.top_k)]
                   if self.temperature > 0 else [])
        out = self.model.generate(**batch, generation_config=self.generation_config, logits_processor=sampler)
        special = set(self.tokenizer.all_special_ids)
        replies = []
        fed = batch["attention_mask"].sum(1).tolist()
        for row, length, used in zip(out.tolist(), lengths, fed):
            truncated = length > used
            self.truncated_prompts += truncated
            replies.append(Reply(self.tokenizer.decode(row, skip_special_tokens=True).strip(), prompt_tokens=used,
                                 completion_tokens=sum(t not in special for t in row), truncated=truncated))
        return replies


def target_log_likelihood(model, tokenizer, sources: list[str], targets: list[str], batch_size: int = 4,
                          max_length: int = 1024) -> list[float]:
    """Per pair, the mean log-probability per target token of `target` given `source` (BART-score's
    formula: log-likelihood summed over the target's tokens, special ones included, divided by their
    number). Both sides are cut at `max_length` tokens and padded on the right."""
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    device = next(model.parameters()).device
    scores: list[float | None] = [None] * len(sources)
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]) - len(targets[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            src = tokenizer([sources[i] for i in chunk], max_length=max_length, truncation=True, padding=True,
                            return_tensors="pt").to(device)
            tgt = tokenizer([targets[i] for i in chunk], max_length=max_length, truncation=True, padding=True,
                            return_tensors="pt").to(device)
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=tgt["input_ids"])
            logits = model(input_ids=src["input_ids"], attention_mask=src["attention_mask"],
                           decoder_input_ids=decoder_input_ids).logits.float()
            token_logp = torch.log_softmax(logits, dim=-1).gather(-1, tgt["input_ids"][..., None]).squeeze(-1)
            mask = tgt["attention_mask"].to(token_logp.dtype)
            for i, value in zip(chunk, ((token_logp * mask).sum(1) / mask.sum(1)).tolist()):
                scores[i] = value
    return scores
