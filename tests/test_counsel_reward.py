"""The reward-model scorer of Counsel_eval.py (mentalarena/evaluation/reward.py), on a tiny random
LlamaForSequenceClassification with the embedded SmolLM2 tokenizer and its chat template."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from mentalarena.errors import InputError
from mentalarena.evaluation.reward import RewardModel, check_reward_model, pair_ids

STATEMENTS = [
    "I can't sleep.",
    "My mother keeps calling me at work and I don't know how to tell her to stop without hurting her. " * 6,
    "Hi",
    "I feel like nobody at school understands me, and lately I skip lunch so I don't have to sit alone.",
    "Everything is fine, I guess.",
    "Since the divorce I drink more than I should, most nights, and I hide it from my kids. " * 12,
    "Why bother?",
]
RESPONSES = [
    "That sounds exhausting. What happens when you lie down at night?",
    "It sounds like you care about her a lot and also need some boundaries. " * 3,
    "Hello! What would you like to talk about today?",
    "That must feel lonely. " * 20,
    "You say fine, but 'I guess' makes me wonder what else is there.",
    "Thank you for telling me; that takes courage.",
    "It sounds like you feel hopeless right now. Can you tell me more?",
]


def save_tiny_reward(folder: Path, tokenizer, **config) -> str:
    """A randomly initialised LlamaForSequenceClassification (2 layers, hidden 32, `num_labels`
    outputs, 1 by default) with `tokenizer`, saved to `folder`. The head's weights are scaled up so
    that the scores of different pairs differ well beyond float noise."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = {"max_position_embeddings": 2048, "num_labels": 1, **config}
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config))
    with torch.no_grad():
        model.score.weight.mul_(50)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory, tokenizer):
    return save_tiny_reward(tmp_path_factory.mktemp("tiny-reward"), tokenizer)


@pytest.fixture(scope="module")
def reference(tiny_reward):
    """The tiny model and its tokenizer as loaded from disk, float32: the one-row forward that defines a score."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (AutoModelForSequenceClassification.from_pretrained(tiny_reward, dtype="float32").eval(),
            AutoTokenizer.from_pretrained(tiny_reward))


def alone(model, ids: list[int]) -> float:
    """The score of one row fed alone: no padding, no attention mask."""
    import torch

    with torch.inference_mode():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def test_batched_scores_equal_one_row_forwards_in_input_order(tiny_reward, reference):
    model, tok = reference
    scorer = RewardModel(tiny_reward, dtype="float32", device="cpu", batch_size=3)
    got = scorer.score(STATEMENTS, RESPONSES)
    lengths = [len(pair_ids(tok, s, r)) for s, r in zip(STATEMENTS, RESPONSES)]
    assert max(lengths) > 5 * min(lengths)  # very different lengths: real padding in every batch
    want = [alone(model, pair_ids(tok, s, r)) for s, r in zip(STATEMENTS, RESPONSES)]
    assert all(isinstance(x, float) for x in got)
    assert got == pytest.approx(want, abs=1e-4)
    assert min(abs(a - b) for i, a in enumerate(want) for b in want[i + 1:]) > 1e-2  # rows tell apart
    order = [3, 6, 0, 5, 2, 4, 1]
    permuted = scorer.score([STATEMENTS[i] for i in order], [RESPONSES[i] for i in order])
    assert permuted == pytest.approx([got[i] for i in order], abs=1e-4)
    assert scorer.describe() == {"model": tiny_reward, "dtype": "float32", "device": "cpu", "max_length": 4096,
                                 "truncated": 0}
    assert scorer.score([], []) == []
    with pytest.raises(ValueError):
        scorer.score(STATEMENTS[:2], RESPONSES[:1])
    scorer.close()
    assert scorer.model is None
    assert scorer.score(STATEMENTS[:1], RESPONSES[:1]) == pytest.approx(want[:1], abs=1e-4)  # loads again


def test_pair_ids_is_the_chat_template_of_the_two_messages(tokenizer):
    ids = pair_ids(tokenizer, "I feel stuck.", "What does stuck feel like for you?")
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "I feel stuck."},
                                          {"role": "assistant", "content": "What does stuck feel like for you?"}],
                                         tokenize=False, add_generation_prompt=False)
    assert tokenizer.decode(ids) == text
    decoded = tokenizer.decode(ids)
    assert decoded.index("I feel stuck.") < decoded.index("What does stuck feel like for you?")
    assert not decoded.rstrip().endswith("<|im_start|>assistant")  # no generation prompt


def test_long_pair_keeps_its_last_tokens(tiny_reward, reference, caplog):
    model, tok = reference
    ids = [pair_ids(tok, s, r) for s, r in zip(STATEMENTS, RESPONSES)]
    limit = 60
    long = [i for i, x in enumerate(ids) if len(x) > limit]
    assert 0 < len(long) < len(ids)
    scorer = RewardModel(tiny_reward, dtype="float32", device="cpu", batch_size=4, max_length=limit)
    with caplog.at_level(logging.WARNING, logger="mentalarena.evaluation.reward"):
        got = scorer.score(STATEMENTS, RESPONSES)
    assert scorer.describe()["truncated"] == len(long)
    warnings = [r for r in caplog.records if r.name == "mentalarena.evaluation.reward"]
    assert len(warnings) == 1 and f"{len(long)} of {len(ids)} pairs" in warnings[0].getMessage()
    want = [alone(model, x[-limit:]) for x in ids]
    assert got == pytest.approx(want, abs=1e-4)
    assert alone(model, ids[long[0]]) != pytest.approx(got[long[0]], abs=1e-3)  # the cut did change the score
    scorer.score(STATEMENTS[:2], RESPONSES[:2])
    assert scorer.describe()["truncated"] == len(long) + sum(len(x) > limit for x in ids[:2])  # a running count


def test_bad_models_are_one_clear_line(tmp_path, tiny_reward, tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=re.escape(str(empty)) + ".*config.json"):
        RewardModel(str(empty))
    with pytest.raises(InputError, match="no such folder"):
        check_reward_model(str(tmp_path / "absent" / "model"))

    two = save_tiny_reward(tmp_path / "two-labels", tokenizer, num_labels=2)
    with pytest.raises(InputError, match=re.escape(f"a reward model has one output; {two} has 2 labels")):
        check_reward_model(two)

    causal = tmp_path / "causal"
    shutil.copytree(tiny_reward, causal)
    config = json.loads((causal / "config.json").read_text())
    (causal / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(InputError, match=re.escape(f"{causal}: not a sequence-classification model")):
        RewardModel(str(causal))

    templateless = tmp_path / "no-template"
    shutil.copytree(tiny_reward, templateless)
    for name in ("chat_template.jinja", "chat_template.json"):
        (templateless / name).unlink(missing_ok=True)
    settings = json.loads((templateless / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (templateless / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(InputError, match=re.escape(f"{templateless}: its tokenizer has no chat template")):
        RewardModel(str(templateless), dtype="float32", device="cpu")


def test_uncached_hub_id_offline_says_to_pass_a_local_path(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    check_reward_model("some-org/not-a-cached-reward-model")  # a hub id passes the cheap check
    with pytest.raises(InputError, match="some-org/not-a-cached-reward-model.*local path"):
        RewardModel("some-org/not-a-cached-reward-model", device="cpu")


# a template that ends where the response ends, so that pairs end in different tokens
BARE_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"


def save_bare_template_reward(folder: Path, tokenizer, pad_token: str | None = None, **config) -> str:
    save_tiny_reward(folder, tokenizer, **config)
    (folder / "chat_template.jinja").write_text(BARE_TEMPLATE)
    if pad_token is not None:
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": pad_token}))
    return str(folder)


def test_a_pair_that_ends_in_the_pad_id_keeps_its_one_row_score(tmp_path, tokenizer):
    """The head pools at the rightmost token that is not the pad id. A row whose last token is the
    pad id is scored alone, under the config the model came with."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    statements, responses = STATEMENTS + ["Okay."], RESPONSES + ["You made it!"]
    bang = tokenizer.convert_tokens_to_ids("!")
    # 1. the config's own pad id is the last token of one pair
    folder = save_bare_template_reward(tmp_path / "pad-config", tokenizer, pad_token_id=bang)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = [pair_ids(tok, s, r) for s, r in zip(statements, responses)]
    assert [x[-1] == bang for x in ids] == [False] * len(STATEMENTS) + [True]
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype="float32").eval()
    got = RewardModel(folder, dtype="float32", device="cpu", batch_size=3).score(statements, responses)
    assert got == pytest.approx([alone(model, x) for x in ids], abs=1e-4)
    # 2. no pad id in the config, and the tokenizer's pad token (which batches pad with) is that last
    # token: alone, the model pools at the very last token, so the score must too
    folder = save_bare_template_reward(tmp_path / "pad-tokenizer", tokenizer, pad_token="!")
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype="float32").eval()
    assert model.config.pad_token_id is None
    scorer = RewardModel(folder, dtype="float32", device="cpu", batch_size=3)
    assert scorer.tokenizer.pad_token_id == bang
    got = scorer.score(statements, responses)
    want = [alone(model, x) for x in ids]
    assert got == pytest.approx(want, abs=1e-4)
    assert scorer.model.config.pad_token_id is None  # the config as it came
    import torch
    with torch.inference_mode():  # what padding-aware pooling would give the last pair: another score
        model.config.pad_token_id = bang
        assert alone(model, ids[-1]) != pytest.approx(want[-1], abs=1e-3)


def test_a_checkpoint_without_a_trained_head_fails_at_load(tmp_path, tokenizer):
    """A causal LM whose config claims a one-output classifier passes the cheap check; at load its
    head would be random weights, which is an InputError rather than scores."""
    from conftest import make_tiny_llama

    folder = tmp_path / "causal-as-reward"
    make_tiny_llama(folder, tokenizer)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"],
                                                    "id2label": {"0": "LABEL_0"}}))
    check_reward_model(str(folder))
    scorer = RewardModel(str(folder), dtype="float32", device="cpu")
    with pytest.raises(InputError, match=re.escape(f"reward model {folder}: weights missing") + ".*score.weight"):
        scorer.score(["Hi"], ["Hello"])
