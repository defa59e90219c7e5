"""Token sampling with one random stream per request, so that a sampled reply depends on its own
seed and not on which other requests share its batch (or on the concurrency that built the batch).

Every local engine samples through `sample_rows`: the continuous batcher, the prefix-reuse batches
of self-play, and transformers' own `generate` (through `SeededSampler`, for models the fast paths
cannot run and for encoder-decoders).

The draw is a Gumbel-max race: each token's score plus its own Gumbel noise, the best wins, which
is an exact draw from softmax(logits / temperature). The same logits computed in another batch
shape differ in the last digits (about 5e-5 here, float32); a race flips only when the two best
scores are that close. Inverse-CDF sampling (one uniform against the cumulative sum over the
vocabulary), which this replaced, flips whenever the uniform falls among the many tiny steps of
the tail, where those last digits add up: measured on the embedded model, 58 of 68,200 draws
flipped between a row alone and the same row left-padded in a batch, against none with the race.

The noise of token t at a step is a hash of (the row's key for that step, t): counter-based, so it
is computed only for the tokens that can still win (those within the noise's range of the best
score) and is the same whatever else is in the batch.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

# splitmix64's constants as signed 64-bit integers (torch has no unsigned 64-bit arithmetic)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX_1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX_2 = 0x94D049BB133111EB - (1 << 64)
_BITS = 23  # (n + 0.5) / 2^23 is exact in float32
# The uniforms lie in [2^-24, 1 - 2^-24], so the Gumbel noise lies in [-2.81, 16.64]: a token whose
# score is further than 19.45 below the best cannot win, whatever its noise.
_NOISE_SPAN = 20.5


def row_generators(seeds: list[int], device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def checkpoint_sampling(generation_config, top_p: float | None = None, top_k: int | None = None) -> dict:
    """The top-p / top-k a transformers pipeline called with only a temperature would use: the
    checkpoint's generation config, and transformers' own defaults (top_p 1.0, top_k 50) for what it
    leaves unset. Explicit values (--top_p, --top_k) win. top_k 0 means no top-k filter."""
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", lambda: {})()
    used, source = {}, {}
    for name, given, fallback in (("top_p", top_p, 1.0), ("top_k", top_k, 50)):
        value = given
        source[name] = "flag"
        if value is None:
            value = getattr(generation_config, name, None) if generation_config is not None else None
            source[name] = "generation_config"
        if value is None:
            value = getattr(GenerationConfig(), name, None)  # transformers 4.x keeps defaults here
            value = defaults.get(name, fallback) if value is None else value
            source[name] = "transformers_default"
        used[name] = value
    if not 0.0 < float(used["top_p"]) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {used['top_p']}")
    if int(used["top_k"]) < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {used['top_k']}")
    return {"top_p": float(used["top_p"]), "top_k": int(used["top_k"]), "source": source}


def filter_scores(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """transformers' sampling warpers, in its order (temperature already applied): top-k keeps the
    k best scores (ties with the k-th kept), then top-p keeps the smallest set of the best tokens
    whose probability under the remaining scores reaches top_p (at least one token)."""
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(scores, dim=-1)
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        drop[..., 0] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return scores


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float,
                generators: list[torch.Generator], top_k: int = 0) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else a Gumbel-max draw keyed by the row's own
    generator (one 62-bit key per row and step) among the tokens top-k and top-p leave."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = filter_scores(logits.float() / temperature, top_k, top_p)
    keys = torch.cat([torch.randint(0, 1 << 62, (1,), generator=g, device=g.device) for g in generators])
    keys = keys.to(scores.device)
    contenders = scores >= scores.max(-1, keepdim=True).values - _NOISE_SPAN
    if contenders.sum() * 2 > contenders.numel():  # a flat distribution: the whole table at once is cheaper
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        return (scores + gumbel(keys[:, None], vocab[None, :])).argmax(-1)
    rows, tokens = contenders.nonzero(as_tuple=True)
    race = torch.full_like(scores, float("-inf"))
    race[rows, tokens] = scores[rows, tokens] + gumbel(keys[rows], tokens)
    return race.argmax(-1)


def gumbel(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise for each (key, token) pair, from a splitmix64-style hash (arithmetic
    shifts, as torch shifts signed integers: a fixed mixing all the same)."""
    z = keys + tokens.to(torch.int64) * _GOLDEN
    z = (z ^ (z >> 30)) * _MIX_1
    z = (z ^ (z >> 27)) * _MIX_2
    z = z ^ (z >> 31)
    u = (((z >> (63 - _BITS)) & ((1 << _BITS) - 1)).float() + 0.5) / (1 << _BITS)
    return -torch.log(-torch.log(u))


class SeededSampler(LogitsProcessor):
    """For transformers' `generate` run greedy (`do_sample=False`): leaves each row only the token
    drawn from that row's own generator, so greedy search takes it. transformers' own sampling
    draws from one global generator for the whole batch, which would tie a reply to its batch."""

    def __init__(self, temperature: float, top_p: float, generators: list[torch.Generator], top_k: int = 0):
        self.temperature, self.top_p, self.top_k, self.generators = temperature, top_p, top_k, generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        picks = sample_rows(scores, self.temperature, self.top_p, self.generators, self.top_k)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(-1, picks[:, None], 0.0)
