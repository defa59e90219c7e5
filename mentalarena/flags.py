"""The range of every numeric flag of every script, by flag name: a name means the same thing in
every script (`--limit` is always a whole number of at least 1), so it is written once. A command
calls `check_numbers(run, dict(locals()))` at its first line, before any file is read or written
and before any model loads."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mentalarena.errors import InputError


@dataclass(frozen=True)
class Range:
    """What a numeric flag takes: bounds (None: none), whether a bound itself is out, whole numbers
    only, and words taken as they are (`auto`). `noun` names the number where "a number" says too little."""
    low: float | None = None
    high: float | None = None
    whole: bool = False
    above: bool = False   # low itself is out: > low
    below: bool = False   # high itself is out: < high
    words: tuple[str, ...] = ()
    noun: str = ""

    def admits(self, value) -> bool:
        if isinstance(value, str):  # fire hands over text it cannot read as a number ("abc") as it is
            return value in self.words
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.whole and not isinstance(value, int):
            return False
        low_ok = self.low is None or (value > self.low if self.above else value >= self.low)
        return low_ok and (self.high is None or (value < self.high if self.below else value <= self.high))

    def describe(self) -> str:
        kind = self.noun or ("a whole number" if self.whole else "a number")
        if self.low is not None and self.high is not None:
            if self.whole:
                text = f"{self.low} or {self.high}" if self.high - self.low == 1 else \
                    f"{kind} from {self.low} to {self.high}"
            else:
                text = f"{kind} in {'(' if self.above else '['}{self.low}, {self.high}{')' if self.below else ']'}"
        elif self.above:
            text = "a positive number" if self.low == 0 and not (self.whole or self.noun) else \
                f"{kind} greater than {self.low}"
        else:
            text = f"{kind} of at least {self.low}"
        return text + "".join(f" or {word}" for word in self.words)


def whole(low: int, high: int | None = None) -> Range:
    return Range(low, high, whole=True)


POSITIVE = Range(0, above=True)
AT_LEAST_0 = Range(0)
FRACTION = Range(0, 1, below=True)  # [0, 1): a share of something that cannot be all of it
COUNT = whole(1)
SEED = whole(0, 2**32 - 1)  # numpy's seed range (arena_med and the trainer seed numpy with it)
OWN_CHECK = None  # the command reads this flag itself (a comma list of numbers, say); nothing to do here

RANGES: dict[str, Range | None] = {
    # how much is run
    "limit": COUNT, "eval_limit": COUNT, "max_records": COUNT, "num_samples": COUNT, "repeats": COUNT,
    "iterations": COUNT, "max_steps": COUNT, "select_size": COUNT, "min_examples": whole(0),  # 0: no check
    "concurrency": COUNT, "batch_size": COUNT, "max_batch_size": COUNT, "reward_batch_size": COUNT, "grad_accum": COUNT,
    # decoding
    "temperature": AT_LEAST_0, "judge_temperature": AT_LEAST_0,
    "top_p": Range(0, 1, above=True), "top_k": whole(0),  # top-k 0: off
    "max_new_tokens": COUNT, "judge_max_new_tokens": COUNT, "max_context_tokens": COUNT,
    "max_seq_length": COUNT, "reward_max_length": COUNT, "seed": SEED,
    # the self-play session (arena_med.py); 0 dialogue rounds: the opening, then the decoder
    "dialogue_rounds": whole(0), "max_decode_rounds": whole(0), "num_principle_groups": COUNT, "max_tries": COUNT,
    "target_score": whole(1, 10),  # the judge's health scale
    "similarity_threshold": Range(-1, 1, noun="a cosine similarity"), "prefix_cache_gb": AT_LEAST_0,
    # training
    "nepoch": POSITIVE, "dpo_nepoch": POSITIVE, "lr": POSITIVE, "dpo_lr": POSITIVE, "beta": POSITIVE,
    "lora_r": COUNT, "lora_alpha": COUNT, "lora_dropout": FRACTION, "warmup_ratio": FRACTION,
    "weight_decay": AT_LEAST_0, "max_grad_norm": AT_LEAST_0,  # 0: no clipping
    # transformers reads save_total_limit 0 as "keep every checkpoint", the opposite of what it says
    "logging_steps": COUNT, "save_steps": COUNT, "save_total_limit": COUNT,
    "min_margin": POSITIVE, "diagnosis_margin": Range(0, 2, below=True, noun="a cosine-similarity gap"),
    "iqr_factor": AT_LEAST_0,
    # services
    "n_epochs": Range(1, whole=True, words=("auto",)), "poll_seconds": POSITIVE, "request_timeout": POSITIVE,
    # evaluation
    "bootstrap": whole(0), "cop_base": whole(0, 1),  # MedMCQA's answer numbering: from 0 (hub) or 1 (paper)
}
# (script.command, flag): where a name means something else in one command
OVERRIDES: dict[tuple[str, str], Range | None] = {
    ("data_process.run", "beta"): Range(0, above=True, words=("auto",)),  # auto: OpenAI chooses
    ("iterate.run", "epochs"): OWN_CHECK,  # a comma list, one value per iteration (iterate._schedule)
}


def check_numbers(function: Callable, values: dict, where: str = "") -> None:
    """Every numeric flag of `function` that `values` holds (the command's `locals()` at its first
    line), against its range: the first out of range is one line, "{where}--flag must be ..., not v".
    None passes where the flag's default is None."""
    for name, parameter in inspect.signature(function).parameters.items():
        if name not in values or not is_numeric(parameter):
            continue
        value, rule = values[name], range_of(function, name)
        if rule is None or (value is None and parameter.default is None):
            continue
        if not rule.admits(value):
            raise InputError(f"{where}--{name} must be {rule.describe()}, not {value!r}")


def numeric_flags(function: Callable) -> list[str]:
    """The flags of `function` annotated with a number type (`int`, `float | None`, `int | str` ...)."""
    return [name for name, p in inspect.signature(function).parameters.items() if is_numeric(p)]


def has_range(function: Callable, name: str) -> bool:
    return (command_name(function), name) in OVERRIDES or name in RANGES


def range_of(function: Callable, name: str) -> Range | None:
    return OVERRIDES.get((command_name(function), name), RANGES.get(name))


def command_name(function: Callable) -> str:
    """`script.command`, from the file (a script run as `python x.py` is the module `__main__`)."""
    return f"{Path(inspect.getfile(function)).stem}.{function.__name__}"


def is_numeric(parameter: inspect.Parameter) -> bool:
    # the scripts use `from __future__ import annotations`: annotations are text
    annotation = parameter.annotation if isinstance(parameter.annotation, str) else getattr(
        parameter.annotation, "__name__", str(parameter.annotation))
    return any(part.strip() in ("int", "float") for part in annotation.split("|"))
