"""Generation's guarantees: a prompt given as one string, arguments refused before anything runs, numpy
integers accepted."""

import numpy as np
import pytest
import torch

import bridge_ops

NAN = float("nan")
pytestmark = pytest.mark.guarantee

PROMPTS = [[1, 5, 6, 7, 8], [1, 10], [1, 12, 13]]


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("transformers")
    from hf_models import bridged_model

    return bridged_model("llama")


def test_generate_takes_one_string_as_one_prompt():
    from bridge_ops.charlm import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer()
    out = bridge_ops.generate(tiny_causal_lm(tok, hidden_size=32, num_layers=1), "12+7=", 2, 3, tokenizer=tok)
    assert len(out.sequences) == 1 and len(out.sequences[0]) == 2


BAD_GENERATE_ARGS = {
    "all-zero mask row": (dict(attention_mask=torch.tensor([[1, 1], [0, 0]])), ValueError, "prompt 1 has no token"),
    "right padding": (dict(attention_mask=torch.tensor([[1, 1], [1, 0]])), ValueError, "must be left-padded"),
    "top_p above 1": (dict(top_p=1.5), ValueError, "top_p must be a number in"),
    "top_p NaN": (dict(top_p=NAN), ValueError, "top_p must be a number in"),
    "temperature 0": (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    "top_k negative": (dict(top_k=-1), ValueError, "top_k must be >= 0"),
    "id past the vocabulary": (dict(prompts=torch.tensor([[1, 61]])), ValueError, "token id 61 at position 1"),
    "pad -1": (dict(pad_token_id=-1), ValueError, "pad_token_id -1 is outside the model's vocabulary"),
    "pad 999": (dict(pad_token_id=999), ValueError, "pad_token_id 999 is outside"),
    "prompt past max positions": (
        dict(prompts=torch.ones(1, 300, dtype=torch.long)),
        ValueError,
        "a prompt of 300 tokens plus max_new_tokens=3 passes the model's max_position",
    ),
    "generation past max positions": (
        dict(prompts=torch.ones(1, 250, dtype=torch.long), max_new_tokens=8),
        ValueError,
        "lower max_new_tokens",
    ),
    "width 2.0": (dict(width=2.0), TypeError, "width must be an integer, got 2.0"),
    "width True": (dict(width=True), TypeError, "width must be an integer, got True"),
    "max_new_tokens 2.5": (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an integer, got 2.5"),
    "eos as text": (dict(eos_token_id="</s>"), TypeError, "eos_token_id must be an integer, got '</s>'"),
    "float input_ids": (dict(prompts=torch.ones(1, 2)), TypeError, "input_ids must hold integer token ids"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE_ARGS))
def test_generate_refuses_bad_arguments_before_running(model, case, monkeypatch):
    overrides, error, message = BAD_GENERATE_ARGS[case]
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    args = {**dict(prompts=torch.tensor([[1, 5], [1, 6]]), width=2, max_new_tokens=3), **overrides}
    with pytest.raises(error, match=message):
        bridge_ops.generate(model, args.pop("prompts"), args.pop("width"), args.pop("max_new_tokens"), **args)
    assert not calls


def test_generate_accepts_numpy_integers(model):
    out = bridge_ops.generate(model, PROMPTS, np.int64(2), np.int64(2), top_k=np.int64(5))
    assert [len(g) for g in out.sequences] == [2, 2, 2]
