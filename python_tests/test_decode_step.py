"""bridge_ops.hf.decode_step: the flat decode step equals the HF forward's step bit for bit, and is used only where
it applies."""

import pytest
import torch
from hf_models import MODEL_TYPES, bridged_model, left_padded, tiny_model

import bridge_ops
from bridge_ops.hf import decode_step
from bridge_ops.train.pmatch import apply_parameter_matched_mlp

PROMPTS = [[1, 5, 9, 11, 3], [1, 7], [1, 4, 4, 8, 21, 30, 2, 6]]  # ragged, left-padded


def _generate(model, fast: bool, monkeypatch, **kwargs):
    """generate(return_logits) with the flat step (fast) or the HF forward."""
    calls = []
    real = decode_step.DecodeStep.__call__

    def counted(self, *args):
        calls.append(1)
        return real(self, *args)

    with monkeypatch.context() as m:
        m.setattr(decode_step.DecodeStep, "__call__", counted)
        if not fast:
            m.setattr(bridge_ops.generation, "step_for", lambda model, cache: None)
        ids, mask = left_padded(PROMPTS)
        gens = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
        out = bridge_ops.generate(
            model, ids, [3, 1, 4], 9, attention_mask=mask, generators=gens, return_logits=True, **kwargs
        )
    return out, len(calls)


def _variants(model_type: str):
    extra = {"sliding_window": None} if model_type == "mistral" else {}  # (a window: the expanded cache)
    plain = tiny_model(model_type, seed=3, **extra)
    with_pmatch = tiny_model(model_type, seed=4, **extra)
    apply_parameter_matched_mlp(with_pmatch, 8, init_std=0.3)
    with torch.no_grad():  # a P-Match block that changes the output (its down projection starts at zero)
        for name, p in with_pmatch.named_parameters():
            if "pmatch" in name or "parameter_matched" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    bridged = bridged_model(model_type, seed=5, **extra)
    both = bridged_model(model_type, seed=6, **extra)
    apply_parameter_matched_mlp(both, 8, init_std=0.3)
    return {"plain": plain, "pmatch": with_pmatch, "bridge": bridged, "bridge+pmatch": both}


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if t in decode_step.MODEL_TYPES])
def test_flat_step_equals_hf_forward(model_type, monkeypatch):
    """Same tokens and bit-identical logits at every step, for plain, Bridge, P-Match and stacked residual blocks,
    ragged groups and rows finishing early."""
    for name, model in _variants(model_type).items():
        assert decode_step.unsupported_reason(model) is None, name
        fast, calls = _generate(model, True, monkeypatch, eos_token_id=7)
        slow, no_calls = _generate(model, False, monkeypatch, eos_token_id=7)
        assert calls > 0 and no_calls == 0, name
        assert fast.sequences == slow.sequences, name
        pairs = [(a, b) for group_a, group_b in zip(fast.logits, slow.logits) for a, b in zip(group_a, group_b)]
        assert len(pairs) == 8 and all(torch.equal(a, b) for a, b in pairs), name


def test_falls_back_where_it_does_not_apply(monkeypatch):
    """qwen3 (query/key norms: not a supported type), the expanded cache, training mode and a forward hook
    decode through the HF forward."""
    if "qwen3" in MODEL_TYPES:
        assert "qwen3" in decode_step.unsupported_reason(tiny_model("qwen3"))
    model = tiny_model("llama")
    _, calls = _generate(model, True, monkeypatch, cache="expanded")
    assert calls == 0
    model.train()
    assert "training" in decode_step.unsupported_reason(model)
    model.eval()
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "hooks" in decode_step.unsupported_reason(model)
    handle.remove()
    assert decode_step.unsupported_reason(model) is None
    with pytest.raises(ValueError, match="training"):
        decode_step.DecodeStep(model.train())


def test_lora_projections_fall_back():
    """A PEFT LoRA layer replaces the nn.Linear projections: the HF forward runs them."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "nn.Linear" in decode_step.unsupported_reason(model.get_base_model())
