"""How likely a reference model finds the answers of SFT rows: per-row answer perplexity.

Shared by data selection (`selection.py`, MentalQLM's perplexity pruning) and the data report. A
row is tokenized exactly as fine-tuning tokenizes it (`training.encode`, answer-only labels, no
EOS added), so "the answer" is the same token span the answer-only loss learns. The perplexity of
a row is exp(mean negative log-likelihood of its answer tokens, each given everything before it).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from mentalarena.errors import InputError


def load_scorer(base_model: str | None = None):
    """(model, tokenizer) in eval mode. None / "" / "embedded": the embedded SmolLM2 GGUF model
    (dequantized, as fine-tuning loads it); otherwise a local model folder or a hub id. The model is
    float32 on a CPU, bfloat16 (else float16) on CUDA, where it is placed."""
    import torch

    from mentalarena.engines.embedded import EMBEDDED_GGUF, embedded_model_dir
    from mentalarena.training.trainers import dense_model, load_tokenizer, resolve_dtype

    if base_model in (None, "", "embedded"):
        base, gguf = embedded_model_dir(), EMBEDDED_GGUF
    else:
        base, gguf = str(base_model), None
        if Path(base, "adapter_config.json").is_file():
            raise InputError(f"{base} is a LoRA adapter; score with a full model (its merged/ folder, or its base)")
    tokenizer = load_tokenizer(base, gguf)
    try:
        model = dense_model(base, gguf, dtype=resolve_dtype("auto", "lora"))
    except OSError as exc:
        raise InputError(f"{base}: cannot load the model ({str(exc).splitlines()[0]})") from exc
    if torch.cuda.is_available():  # this process's own GPU under `accelerate launch`
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return model.eval(), tokenizer


def answer_perplexities(model, tokenizer, rows: list[dict], fmt: str = "original", max_len: int = 1024,
                        batch_size: int = 8) -> list[float]:
    """The answer perplexity of each row, in the rows' order. `fmt`: "original" for `{"text": ...}`
    rows, "chat_template" for `{"messages": [...]}` rows. Rows are cut to `max_len` tokens as in
    training: a cut answer is scored on its tokens that remain, and a row whose answer is cut off
    entirely gets NaN. Rows are batched by length (right padding, masked out of attention and of
    the sum); only the answer positions are projected to the vocabulary."""
    import torch

    from mentalarena.training.trainers import IGNORE, encode

    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number of at least 1, not {batch_size!r}")
    encoded = [encode(row, tokenizer, fmt, max_len, answer_only=True, add_eos=False) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: (len(encoded[i]["input_ids"]), i))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out = [math.nan] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = [i for i in order[start:start + batch_size] if any(x != IGNORE for x in encoded[i]["labels"])]
        if not chunk:
            continue
        width = max(len(encoded[i]["input_ids"]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(encoded[i]["input_ids"])
            ids[row, :n] = torch.tensor(encoded[i]["input_ids"])
            labels[row, :n] = torch.tensor(encoded[i]["labels"])
            attention[row, :n] = 1
        # position t predicts token t + 1: keep the positions whose next token is an answer token
        targets = labels[:, 1:]
        keep = torch.zeros((len(chunk), width), dtype=torch.bool)
        keep[:, :-1] = targets != IGNORE
        with torch.inference_mode():
            logits = _answer_logits(model, ids.to(device), attention.to(device), keep.to(device))
            logp = torch.log_softmax(logits.float(), dim=-1)
            wanted = targets[keep[:, :-1]].to(device)
            nll = -logp.gather(-1, wanted.unsqueeze(-1)).squeeze(-1).double().cpu()
        owner = torch.arange(len(chunk)).unsqueeze(1).expand(-1, width)[keep]  # the row of each kept position
        sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, owner, nll)
        counts = torch.bincount(owner, minlength=len(chunk))
        for row, i in enumerate(chunk):
            out[i] = math.exp(float(sums[row]) / int(counts[row]))
    return out


def _answer_logits(model, ids, attention, keep):
    """Logits at the `keep` positions, (number kept, vocabulary): through transformers'
    `logits_to_keep` mask where the model takes it (the vocabulary projection only where needed),
    else the full logits indexed."""
    import inspect

    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits
        if logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
            return logits
        if logits.dim() == 3 and logits.shape[:2] == keep.shape:
            return logits[keep]
    return model(input_ids=ids, attention_mask=attention).logits[keep]
