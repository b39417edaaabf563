"""bridge_ops.hf.decode_step: the flat decode step equals the HF forward's step bit for bit (its decoder layers
fused into the compiled op bridge_ops::decode_layer and op by op in Python), and is used only where it applies."""

import pytest
import torch
from hf_models import MODEL_TYPES, bridged_model, left_padded, tiny_model

import bridge_ops
from bridge_ops import cache
from bridge_ops._loader import _C
from bridge_ops.hf import decode_step
from bridge_ops.train.pmatch import apply_parameter_matched_mlp

PROMPTS = [[1, 5, 9, 11, 3], [1, 7], [1, 4, 4, 8, 21, 30, 2, 6]]  # ragged, left-padded


needs_c = pytest.mark.skipif(_C is None, reason="the compiled extension is not loaded")
FUSED = [pytest.param(True, marks=needs_c, id="fused"), pytest.param(False, id="python")]


def _generate(model, fast: bool, monkeypatch, fused: bool = True, **kwargs):
    """generate(return_logits) with the flat step (fast; its layers fused or in Python) or the HF forward."""
    calls = []
    real = decode_step.DecodeStep.__call__

    def counted(self, *args):
        calls.append(self.fused)
        return real(self, *args)

    with monkeypatch.context() as m:
        m.setattr(decode_step.DecodeStep, "__call__", counted)
        if not fused:
            m.setattr(decode_step, "fused_layer_reason", lambda model: "off (the test)")
        if not fast:
            m.setattr(bridge_ops.generation, "step_for", lambda model, cache: None)
        ids, mask = left_padded(PROMPTS)
        gens = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
        out = bridge_ops.generate(
            model, ids, [3, 1, 4], 9, attention_mask=mask, generators=gens, return_logits=True, **kwargs
        )
    return out, calls


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


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if t in decode_step.MODEL_TYPES])
def test_flat_step_equals_hf_forward(model_type, fused, monkeypatch):
    """Same tokens and bit-identical logits at every step, for plain, Bridge, P-Match and stacked residual blocks,
    ragged groups and rows finishing early; the suffix buffers grow past their first capacity (_SUFFIX_GROWTH)."""
    monkeypatch.setattr(cache, "_SUFFIX_GROWTH", 4)
    for name, model in _variants(model_type).items():
        assert decode_step.unsupported_reason(model) is None, name
        fast, calls = _generate(model, True, monkeypatch, fused, eos_token_id=7)
        slow, no_calls = _generate(model, False, monkeypatch, eos_token_id=7)
        assert len(calls) > 0 and set(calls) == {fused} and no_calls == [], name
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
    assert calls == []
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


@needs_c
def test_fused_layer_reason():
    """Fused where the op reproduces the layer; a norm with another forward (or class) runs in Python."""
    model = tiny_model("llama")
    assert decode_step.fused_layer_reason(model) is None and decode_step.DecodeStep(model).fused
    norm = model.model.layers[1].post_attention_layernorm
    norm.forward = lambda hidden: hidden
    assert "LlamaRMSNorm" in decode_step.fused_layer_reason(model)
    assert not decode_step.DecodeStep(model).fused


def _layer_args(rows=3, groups=(2, 1), prefix=5, slot=2, capacity=4, seed=0, bias=True, dtype=torch.float32):
    """Arguments of bridge_ops::decode_layer for a small GQA layer (D 16, 4 query heads, 2 KV heads, Dh 4)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    dim, hq, hkv, dh, inner = 16, 4, 2, 4, 24
    attention = [(hq * dh, dim), (hkv * dh, dim), (hkv * dh, dim), (dim, hq * dh)]
    shapes = attention + [(inner, dim), (inner, dim), (dim, inner)]
    weights = [rand(*s) * 0.3 for s in shapes]
    biases = [rand(s[0]) * 0.1 if bias and i < 3 else None for i, s in enumerate(shapes)]
    cu = torch.tensor([0, *torch.tensor(groups).cumsum(0).tolist()], dtype=torch.int32)
    angle = rand(rows, dh // 2).repeat(1, 2)
    return [
        rand(rows, 1, dim),
        angle.cos(),
        angle.sin(),
        1 + rand(dim) * 0.1,
        1e-6,
        1 + rand(dim) * 0.1,
        1e-5,
        weights,
        biases,
        rand(len(groups), hkv, prefix, dh),
        rand(len(groups), hkv, prefix, dh),
        torch.tensor([prefix, prefix - 2][: len(groups)], dtype=torch.int32),
        rand(rows, hkv, capacity, dh),
        rand(rows, hkv, capacity, dh),
        slot,
        cu,
        dh**-0.5,
    ]


def _python_layer(args):
    """The Python flat step's layer on the same arguments (its key and value appended to a copy of the suffix)."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hidden, cos, sin, w_in, eps_in, w_post, eps_post, weights, biases, pk, pv, plens, sk, sv, slot, cu, scaling = args
    norms = []
    for w, eps in ((w_in, eps_in), (w_post, eps_post)):
        norm = LlamaRMSNorm(w.shape[0], eps=eps).to(w.dtype)
        norm.weight.data.copy_(w)
        norms.append(norm)
    layer = decode_step._Layer(norms[0], norms[1], weights, biases, torch.nn.SiLU(), cos.shape[1], scaling, [])
    kv = SimpleNamespace(prefix_keys=pk, prefix_values=pv)

    def append_rows(k, v):
        kv.suffix_keys = torch.cat([sk[:, :, :slot], k], dim=2)
        kv.suffix_values = torch.cat([sv[:, :, :slot], v], dim=2)

    kv.append_rows = append_rows
    step = SimpleNamespace(rotate=__import__("transformers").models.llama.modeling_llama.apply_rotary_pos_emb)
    cache = SimpleNamespace(prefix_lens=plens, cu_group_lens=cu)
    out = decode_step.DecodeStep._layer(step, layer, hidden, cos, sin, kv, cache)
    return out, kv.suffix_keys, kv.suffix_values


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_layer_op_equals_the_python_layer(bias, dtype):
    """Bit for bit, with GQA, ragged groups, left-padded prompts and Qwen2-style biases, in float32 (decode_linear's
    kernel) and bfloat16 / float64 (at::linear); the key and value land in suffix[:, :, slot], positions after it
    untouched."""
    args = _layer_args(bias=bias, dtype=dtype)
    after = args[14] + 1
    untouched = args[12][:, :, after:].clone(), args[13][:, :, after:].clone()
    with torch.no_grad():
        expected, keys, values = _python_layer(args)
        out = torch.ops.bridge_ops.decode_layer(*args)
    assert torch.equal(out, expected)
    assert torch.equal(args[12][:, :, :after], keys) and torch.equal(args[13][:, :, :after], values)
    assert torch.equal(args[12][:, :, after:], untouched[0]) and torch.equal(args[13][:, :, after:], untouched[1])


@needs_c
def test_decode_layer_opcheck():
    torch.library.opcheck(torch.ops.bridge_ops.decode_layer.default, tuple(_layer_args()))


@needs_c
@pytest.mark.parametrize(
    "index, value, match",
    [
        (0, torch.zeros(3, 2, 16), "hidden must have shape"),
        (1, torch.zeros(3, 5), "cos must have shape"),
        (4, 0.0, "input_norm_weight's eps"),
        (7, [torch.zeros(16, 16)] * 6, "weights must hold the 7"),
        (8, [None] * 3, "biases must hold 7"),
        (12, torch.zeros(3, 2, 4, 6), "suffix_k must be the suffix buffer"),
        (14, 4, "slot must index"),
    ],
)
def test_decode_layer_errors(index, value, match):
    args = _layer_args()
    args[index] = value
    with pytest.raises(ValueError, match=match):
        torch.ops.bridge_ops.decode_layer(*args)
