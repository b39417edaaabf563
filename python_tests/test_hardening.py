"""Hardening (issue 13): no silent garbage, no half-loaded models, no lost training, errors that say what to fix.

Each test here failed on the code before the fix it covers.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_inputs
from test_prefix_attention import cascade_inputs

import bridge_ops
from bridge_ops import reference

NAN, INF = float("nan"), float("inf")
compiled = pytest.mark.skipif(not hasattr(torch.ops.bridge_ops, "prefix_suffix_attention"), reason="no compiled _C")


# ---- ops: non-finite values ------------------------------------------------------------------------------------------
def _poison(args, case):
    """A NaN or +inf where the row of group 0 (rows 0-1) or row 3 (group 1) can see it; P = 70 spans two key blocks
    and the vectorized exp."""
    q, pk, pv, _, sk, sv, _, _ = args
    if case == "prefix-key-nan":
        pk[0, 0, 60, 3] = NAN
    elif case == "prefix-value-nan":
        pv[0, 1, 69, 0] = NAN
    elif case == "prefix-key-plus-inf-score":
        q[0, 0] = q[0, 0].abs()
        pk[0, 0, 65] = INF
    elif case == "suffix-key-nan":
        sk[3, 1, 2, 5] = NAN
    elif case == "query-nan":
        q[3, 2, 0] = NAN


@compiled
@pytest.mark.parametrize(
    "case", ["prefix-key-nan", "prefix-value-nan", "prefix-key-plus-inf-score", "suffix-key-nan", "query-nan"]
)
def test_prefix_suffix_attention_propagates_nan_and_inf_like_the_reference(case):
    args = cascade_inputs([2, 3], 4, 2, 16, 70, 4, prefix_lens=[70, 70])
    _poison(args, case)
    out, lse = bridge_ops.prefix_suffix_attention(*args, return_lse=True)
    ref_out, ref_lse = reference.prefix_suffix_attention(*args)
    q, pk, pv, _, sk, sv, _, _ = args  # stock attention over each row's [prefix; suffix]
    group = torch.tensor([0, 0, 1, 1, 1])
    keys, values = (torch.cat([p[group], s], 2).repeat_interleave(2, 1) for p, s in ((pk, sk), (pv, sv)))
    sdpa = F.scaled_dot_product_attention(q[:, :, None], keys, values)[:, :, 0]
    nan = torch.isnan(ref_out)
    assert nan.any() and not nan.all()
    assert torch.equal(torch.isnan(out), nan) and torch.equal(torch.isnan(sdpa), nan)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(out[~nan], ref_out[~nan])
    torch.testing.assert_close(lse[finite], ref_lse[finite])


@compiled
def test_prefix_suffix_attention_never_reads_padding():
    args = cascade_inputs([2, 1], 2, 1, 8, 12, 3, prefix_lens=[5, 12], suffix_lens=[1, 3, 2])
    q, pk, pv, _, sk, sv, _, _ = args
    pk[0, :, :7], pv[0, :, :7] = NAN, INF  # left padding of group 0's prompt
    sk[0, :, 1:], sv[0, :, 1:], sv[2, :, 2] = NAN, NAN, NAN  # beyond suffix_lens
    out, lse = bridge_ops.prefix_suffix_attention(*args, return_lse=True)
    ref_out, ref_lse = reference.prefix_suffix_attention(*args)
    assert torch.isfinite(out).all() and torch.isfinite(ref_out).all()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("merge", [bridge_ops.merge_attention_states, reference.merge_attention_states])
def test_merge_attention_states_takes_plus_inf_lse_as_an_empty_side(merge):
    o_a, o_b = torch.randn(4, 8), torch.randn(4, 8)
    lse_a = torch.tensor([INF, 0.5, INF, NAN])
    lse_b = torch.tensor([1.5, INF, INF, 0.0])
    o_a[0], o_b[1], o_a[2] = NAN, NAN, NAN  # an empty side is never read
    out, lse = merge(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(out[0], o_b[0])
    torch.testing.assert_close(out[1], o_a[1])
    assert torch.equal(out[2], torch.zeros(8)) and lse[2] == -INF
    assert torch.isnan(out[3]).all() and torch.isnan(lse[3])
    torch.testing.assert_close(lse[:2], torch.tensor([1.5, 0.5]))


def test_reference_keeps_nan_of_hidden_keys_in_their_own_row():
    """A padding or finished row's key/value is hidden from its peers: a NaN there reaches its own output only, in
    the reference as in the fused kernel."""
    q, k, v, cu, mask = make_inputs([3, 2, 1], 4, 2, 8)  # ragged: the reference pads the groups
    mask[:] = True
    mask[1, :2] = False  # row 1: left padding at positions 0-1
    mask[4, 3] = False  # row 4: finished before position 3
    for row, position in ((1, 0), (1, 1), (4, 3)):
        k[row, position], v[row, position] = NAN, NAN
    out = bridge_ops.bridge_attention(q, k, v, cu, mask)
    ref, _ = reference.bridge_attention(q, k, v, cu, mask)
    poisoned = torch.zeros(6, 4, dtype=torch.bool)
    poisoned[1, :2] = poisoned[4, 3] = True
    for result in (out, ref):
        assert torch.equal(torch.isnan(result).any(-1).any(-1), poisoned)
    torch.testing.assert_close(out[~poisoned], ref[~poisoned])


# ---- ops: fake kernels, double backward, argument errors -------------------------------------------------------------
def _decode_args():
    hidden, norm = torch.randn(4, 1, 16), torch.ones(16)
    w, o = torch.randn(8, 16), torch.randn(16, 8)
    mask = torch.ones(4, 1, dtype=torch.bool)
    return dict(
        hidden=hidden,
        norm_weight=norm,
        eps=1e-6,
        q_weight=w,
        k_weight=w,
        v_weight=w,
        o_weight=o,
        cu_group_lens=bridge_ops.cu_group_lens_from_width(4, 2),
        key_mask=mask,
        num_heads=2,
    )


@compiled
@pytest.mark.parametrize("name", ["norm_weight", "cu_group_lens", "key_mask", "k_weight"])
def test_block_decode_with_an_argument_on_meta_is_an_error(name):
    args = _decode_args()
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but hidden is on cpu"):
        bridge_ops.bridge_block_decode(**args)


@compiled
@pytest.mark.parametrize("name", ["lse", "grad_lse"])
def test_attention_backward_with_an_argument_on_meta_is_an_error(name):
    q, k, v, cu, mask = make_inputs([3, 2], 4, 2, 8)
    _, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    args = dict(
        grad_out=torch.randn_like(q),
        grad_lse=torch.randn_like(lse),
        q=q,
        k=k,
        v=v,
        lse=lse,
        cu_group_lens=cu,
        key_mask=mask,
        scale=None,
    )
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but q is on cpu"):
        torch.ops.bridge_ops.bridge_attention_backward(*args.values())


@compiled
def test_double_backward_raises_instead_of_returning_zeros():
    q, k, v, cu, mask = make_inputs([3, 2], 3, 2, 8, torch.float64, requires_grad=True)

    def loss(impl):
        out, lse = impl(q, k, v, cu, mask)
        return out.square().sum() + lse.sum()

    grads = torch.autograd.grad(loss(torch.ops.bridge_ops.bridge_attention), (q, k, v), create_graph=True)
    expected = torch.autograd.grad(loss(reference.bridge_attention), (q, k, v))
    for got, want in zip(grads, expected):  # first order is right, even with create_graph=True
        torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="bridge_attention has no double backward"):
        torch.autograd.grad(grads[0].sum(), q)


@pytest.mark.parametrize(
    "bad", [np.zeros((5, 4, 2, 8), dtype=np.float32), [[0.0]], None], ids=["numpy", "list", "None"]
)
def test_ops_refuse_non_tensors_naming_the_argument(bad):
    q, k, v, cu, mask = make_inputs([3, 2], 4, 2, 8)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got"):
        bridge_ops.bridge_attention(bad, k, v, cu, mask)
    with pytest.raises(TypeError, match="key_mask must be a torch.Tensor or None"):
        bridge_ops.bridge_attention(q, k, v, cu, np.ones((5, 4), dtype=bool))
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        bridge_ops.bridge_block_decode(**dict(_decode_args(), hidden=bad))
    with pytest.raises(TypeError, match="lse_b must be a torch.Tensor"):
        bridge_ops.merge_attention_states(torch.randn(2, 4), torch.randn(2), torch.randn(2, 4), bad)
    args = cascade_inputs([2], 2, 1, 8, 4, 1)
    args[3] = bad
    with pytest.raises(TypeError, match="prefix_lens must be a torch.Tensor"):
        bridge_ops.prefix_suffix_attention(*args)


@pytest.mark.parametrize("impl", [bridge_ops.bridge_block_decode, reference.bridge_block_decode])
def test_block_decode_refuses_a_bad_eps_and_a_norm_weight_of_another_dtype(impl):
    for eps in (0.0, -1e-6, NAN, INF):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            impl(**dict(_decode_args(), eps=eps))
    args = _decode_args()
    with pytest.raises(ValueError, match="norm_weight must have the dtype of hidden"):
        impl(**dict(args, norm_weight=args["norm_weight"].double()))


def test_cu_group_lens_from_sizes_refuses_fractions_and_int32_overflow():
    with pytest.raises(ValueError, match="group sizes must be integers"):
        bridge_ops.cu_group_lens_from_sizes([2.5, 1.5])
    with pytest.raises(ValueError, match="add up to 2147483649 rows"):
        bridge_ops.cu_group_lens_from_sizes([2**31, 1])
    assert bridge_ops.cu_group_lens_from_sizes(np.array([2, 3])).tolist() == [0, 2, 5]


# ---- generation and the shared-prefix cache --------------------------------------------------------------------------
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


def _cascade_decode_logits(model, cache, steps=3):
    """The prompts' forward into `cache`, then decode steps through the cascade attention, as `generate` runs them."""
    from hf_models import left_padded

    from bridge_ops.hf.attention import cascade_attention

    ids, mask = left_padded(PROMPTS)
    rows = torch.repeat_interleave(torch.arange(len(PROMPTS)), torch.tensor([3, 1, 2]))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens = torch.randint(3, 60, (steps, rows.numel(), 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), bridge_ops.groups(model, sizes=[1, 1, 1]):
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    mask, positions = mask[rows], positions[rows, -1:]
    with torch.no_grad(), cascade_attention(model, cache) as kwargs, bridge_ops.groups(model, sizes=[3, 1, 2]):
        for step in range(steps):
            mask, positions = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), positions + 1
            logits = model(
                input_ids=tokens[step], attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
            ).logits  # kwargs hold the cache's cascade view
    return logits


def test_a_deep_copied_group_prefix_cache_is_independent(model):
    import copy

    from bridge_ops.cache import GroupPrefixCache

    lens = torch.tensor([len(p) for p in PROMPTS])
    fresh = _cascade_decode_logits(model, GroupPrefixCache([3, 1, 2], lens))
    copied = _cascade_decode_logits(model, copy.deepcopy(GroupPrefixCache([3, 1, 2], lens)))
    torch.testing.assert_close(copied, fresh, rtol=0, atol=0)
    original = GroupPrefixCache([3, 1, 2], lens)
    _cascade_decode_logits(model, original)
    clone = copy.deepcopy(original)
    clone.batch_select_indices(torch.tensor([0, 1, 2]))
    assert original.num_rows == 6 and original.layers[0].cache is original and clone.layers[0].cache is clone


def test_group_prefix_cache_honors_the_cache_layer_api():
    """transformers' test_dynamic_cache pattern: update layers, read `cache.layers[i].keys / .values`."""
    from bridge_ops.cache import GroupPrefixCache

    prefill = torch.tensor([1.0, 2.0])[None, None, :, None]
    update3, update4 = torch.tensor(3.0)[None, None, None, None], torch.tensor(4.0)[None, None, None, None]
    cache = GroupPrefixCache([1], torch.tensor([2]))
    cache.update(prefill, prefill, 0)
    cache.update(update3, update3, 0)
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [1.0, 2.0, 3.0]
    cache.update(update4, update4, 0)
    assert cache.layers[0].values[0, 0, :, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    cache.update(prefill + 10, prefill + 10, 1)  # a second layer, independently
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [11.0, 12.0] and cache.layers[0].keys.shape[2] == 4
    with pytest.raises(NotImplementedError, match="convert with to_dynamic_cache"):
        cache.layers[0].keys = prefill


# ---- load_bridge: validate everything, then load; checksums ----------------------------------------------------------
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, getattr(model.config, "bridge", None)


def _assert_unchanged(model, snapshot):
    state, bridge = snapshot
    assert model.state_dict().keys() == state.keys() and getattr(model.config, "bridge", None) == bridge
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _resave(directory, edit_tensors=None, **config_changes):
    """Rewrites a saved Bridge consistently (its checksum updated): a wrong save, not a corrupted file."""
    from safetensors.torch import load_file, save_file

    from bridge_ops.files import read_json, self_digest, sha256_of, write_json

    path = directory / "bridge.safetensors"
    tensors = load_file(path)
    if edit_tensors is not None:
        edit_tensors(tensors)
    save_file(tensors, path)
    config = read_json(directory / "bridge_config.json")
    config.update(config_changes, sha256={"bridge.safetensors": sha256_of(path)})
    config["sha256"]["bridge_config.json"] = self_digest(config, "bridge_config.json")
    write_json(directory / "bridge_config.json", config)


def _drop_layer_1(tensors):
    for key in [k for k in tensors if k.startswith("layers.1.")]:
        del tensors[key]


def _nan_norm(tensors):
    tensors["layers.0.norm.weight"][3] = NAN


def _int_q(tensors):
    tensors["layers.0.q_proj.weight"] = tensors["layers.0.q_proj.weight"].int()


BAD_SAVES = {
    "missing layer": (dict(edit_tensors=_drop_layer_1), "no tensor layers.1.k_proj.weight"),
    "misshapen tensor": (
        dict(edit_tensors=lambda t: t.update({"layers.1.o_proj.weight": torch.zeros(64, 16)})),
        r"layers.1.o_proj.weight has shape \[64, 16\], the model needs \[64, 32\]",
    ),
    "edited d_bridge": (dict(d_bridge=16), "d_bridge 16 \\(saved\\) vs 32 \\(model\\)|the model needs \\[16, 64\\]"),
    "NaN weight": (dict(edit_tensors=_nan_norm), "layers.0.norm.weight holds NaN or infinite values"),
    "integer tensor": (dict(edit_tensors=_int_q), "not a floating-point tensor"),
}


@pytest.mark.parametrize("bridged", [False, True], ids=["plain", "bridged"])
@pytest.mark.parametrize("case", list(BAD_SAVES))
def test_load_bridge_refuses_before_changing_the_model(tmp_path, case, bridged):
    from hf_models import bridged_model, tiny_model

    bridge_ops.save_bridge(bridged_model("llama", seed=1), tmp_path)
    changes, message = BAD_SAVES[case]
    _resave(tmp_path, **changes)
    target = bridged_model("llama") if bridged else tiny_model("llama")
    before = _snapshot(target)
    with pytest.raises(ValueError, match=message):
        bridge_ops.load_bridge(target, tmp_path)
    _assert_unchanged(target, before)
    assert bridge_ops.hf.is_bridged(target) == bridged


def test_load_bridge_refuses_another_model_type_unless_allowed(tmp_path):
    from hf_models import bridged_model, tiny_model

    saved = bridged_model("llama")
    bridge_ops.save_bridge(saved, tmp_path)
    qwen2 = tiny_model("qwen2")
    before = _snapshot(qwen2)
    with pytest.raises(ValueError, match="model_type 'llama' \\(saved\\) vs 'qwen2' \\(model\\); pass allow_other"):
        bridge_ops.load_bridge(qwen2, tmp_path)
    _assert_unchanged(qwen2, before)
    bridge_ops.load_bridge(qwen2, tmp_path, allow_other_model_type=True)
    for a, b in zip(bridge_ops.bridge_parameters(saved), bridge_ops.bridge_parameters(qwen2)):
        assert torch.equal(a, b)


def test_load_bridge_refuses_a_flipped_bit_naming_the_file(tmp_path):
    from hf_models import bridged_model, tiny_model

    bridge_ops.save_bridge(bridged_model("llama"), tmp_path)
    path = tmp_path / "bridge.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # one bit of a weight: still a valid safetensors file
    path.write_bytes(bytes(data))
    target = tiny_model("llama")
    before = _snapshot(target)
    with pytest.raises(ValueError, match=f"{path} is corrupted or was replaced: its sha256 is"):
        bridge_ops.load_bridge(target, tmp_path)
    _assert_unchanged(target, before)


def test_unreadable_bridge_files_are_named(tmp_path):
    from hf_models import bridged_model, tiny_model

    bridge_ops.save_bridge(bridged_model("llama"), tmp_path)
    config = tmp_path / "bridge_config.json"
    text = config.read_text()
    config.write_text(text[:-10])
    with pytest.raises(ValueError, match=f"{config} is not valid JSON"):
        bridge_ops.load_bridge(tiny_model("llama"), tmp_path)
    config.write_text(text.replace('"sha256"', '"old_sha256"'))  # a file saved before checksums existed
    weights = tmp_path / "bridge.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cannot read {weights} \\(truncated or not a safetensors file\\)"):
        bridge_ops.load_bridge(tiny_model("llama"), tmp_path, allow_missing_checksum=True)


def test_save_bridge_records_checksums_and_leaves_no_temporary_files(tmp_path):
    from hf_models import bridged_model

    from bridge_ops.files import read_json, self_digest, sha256_of

    bridge_ops.save_bridge(bridged_model("llama"), tmp_path)
    config = read_json(tmp_path / "bridge_config.json")
    assert config["sha256"] == {
        "bridge.safetensors": sha256_of(tmp_path / "bridge.safetensors"),
        "bridge_config.json": self_digest(config, "bridge_config.json"),
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bridge.safetensors", "bridge_config.json"]


# ---- training: checksums, resume checks, rewards, the non-finite guard -----------------------------------------------
TRAIN_PROMPTS = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14], [1, 20, 21]]
SFT_GROUPS = [(TRAIN_PROMPTS[0], [[3, 4, 2], [3, 5, 2]]), (TRAIN_PROMPTS[1], [[6, 2], [7, 2]])]


def _sft(model, out_dir, **config):
    from bridge_ops.train import SFTConfig, train_sft

    settings = {**dict(steps=2, lr=1e-2, groups_per_step=2, progress=False, out_dir=str(out_dir)), **config}
    return train_sft(model, SFT_GROUPS, SFTConfig(**settings))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_params(model, before):
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished 2-step SFT run's output directory (tests copy it before changing anything)."""
    from hf_models import bridged_model

    out = tmp_path_factory.mktemp("sft")
    _sft(bridged_model(), out)
    return out


@pytest.fixture
def run_dir(sft_run, tmp_path):
    import shutil

    return shutil.copytree(sft_run, tmp_path / "run")


def test_checkpoints_have_a_manifest_and_are_written_atomically(run_dir):
    from bridge_ops.files import read_json, sha256_of

    manifest = read_json(run_dir / "checkpoint.json")
    assert manifest["sha256"] == sha256_of(run_dir / "checkpoint.pt") and manifest["step"] == 2
    assert manifest["run"] == "sft (SFTConfig)" and manifest["config"]["lr"] == 1e-2
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.json", "checkpoint.pt", "metrics.jsonl"]


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped bit", "truncated", "no manifest", "garbage manifest"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(run_dir, damage):
    from hf_models import bridged_model

    checkpoint, manifest = run_dir / "checkpoint.pt", run_dir / "checkpoint.json"
    if damage == "flipped bit":
        _flip_a_bit(checkpoint)
        message = f"{checkpoint} is corrupted or was replaced"
    elif damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
        message = f"{checkpoint} is corrupted or was replaced"
    elif damage == "no manifest":
        manifest.unlink()
        message = f"{checkpoint} has no checkpoint.json beside it"
    else:
        manifest.write_text("{not json")
        message = f"{manifest} is not valid JSON"
    model = bridged_model()
    before = _params(model)
    with pytest.raises(ValueError, match=message):
        _sft(model, run_dir, steps=3)
    _assert_same_params(model, before)


def test_resume_refuses_another_config_unless_the_changes_are_allowed(run_dir):
    from hf_models import bridged_model

    model = bridged_model()
    with pytest.raises(
        ValueError,
        match=r"another configuration: lr 0.01 \(checkpoint\) vs 0.02 \(now\), seed 0 "
        r"\(checkpoint\) vs 1 \(now\); resume with the same settings",
    ):
        _sft(model, run_dir, steps=3, lr=0.02, seed=1)
    history = _sft(model, run_dir, steps=3, lr=0.02, allow_resume_changes=("lr",))
    assert [h["step"] for h in history] == [3]  # resumed after step 2, at the new learning rate


def test_grpo_refuses_the_output_directory_of_an_sft_run(run_dir):
    from hf_models import EOS, bridged_model

    from bridge_ops.train import GRPOConfig, train_grpo

    model = bridged_model()
    before = _params(model)
    config = GRPOConfig(steps=3, width=2, prompts_per_step=2, max_new_tokens=2, progress=False, out_dir=str(run_dir))
    with pytest.raises(ValueError, match=r"holds the checkpoint of a sft \(SFTConfig\) run, not of this grpo"):
        train_grpo(model, TRAIN_PROMPTS, lambda i, r: 1.0, config, eos_token_id=EOS)
    _assert_same_params(model, before)


def test_resume_into_another_d_bridge_changes_nothing(run_dir):
    from hf_models import bridged_model

    model = bridged_model(d_bridge=16)
    before = _params(model)
    with pytest.raises(
        ValueError,
        match="q_proj.weight is torch.float32 \\[32, 64\\] in the checkpoint, torch.float32 \\[16, 64\\] in the model",
    ):  # other initial weights are allowed here, so the tensors themselves are checked
        _sft(model, run_dir, steps=3, allow_resume_changes=("initial_weights",))
    _assert_same_params(model, before)


@pytest.mark.parametrize("bad", [NAN, INF, None, "1"], ids=["nan", "inf", "None", "str"])
def test_grpo_refuses_a_reward_that_is_not_a_finite_number(bad):
    from hf_models import EOS, bridged_model

    from bridge_ops.train import GRPOConfig, train_grpo

    model = bridged_model()
    before = _params(model)
    config = GRPOConfig(steps=1, width=3, prompts_per_step=2, max_new_tokens=2, progress=False)
    chosen = []

    def reward(index, response):
        chosen.append(index)
        return bad if len(chosen) == 5 else 1.0  # the second group's second member

    with pytest.raises(
        ValueError, match=f"reward_fn returned {bad!r} for prompt {{}} \\(response 1\\)".replace("{}", r"\d")
    ):
        train_grpo(model, TRAIN_PROMPTS, reward, config, eos_token_id=EOS)
    _assert_same_params(model, before)


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_training_before_the_update(poison):
    from bridge_ops.train import TrainConfig, Trainer

    weight = torch.nn.Parameter(torch.ones(3))
    model = torch.nn.Module()
    model.weight = weight

    def step_fn(step, optimizer_step):
        loss = weight.sum() + (NAN if poison == "loss" and step == 2 else 0.0)
        if poison == "gradient" and step == 2:
            weight.register_hook(lambda g: g * NAN)
        loss.backward()
        optimizer_step(loss)
        return {"loss": loss.item()}

    trainer = Trainer(model, {"weight": weight}, TrainConfig(steps=3, lr=0.1, progress=False), step_fn)
    with pytest.raises(FloatingPointError, match="step 2: the .* is not finite; training stopped before the update"):
        trainer.train()
    assert trainer.step == 1 and torch.isfinite(weight).all() and weight.grad is None
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.9), atol=1e-3, rtol=0)  # one AdamW step of lr 0.1


@pytest.mark.parametrize(
    "field, value",
    [
        ("log_every", 0),
        ("steps", 0),
        ("lr", 0.0),
        ("lr", NAN),
        ("checkpoint_every", -1),
        ("max_grad_norm", -1.0),
        ("steps", 2.5),
    ],
)
def test_train_configs_refuse_bad_values(field, value):
    from bridge_ops.train import GRPOConfig, SFTConfig

    for config in (SFTConfig, GRPOConfig):
        with pytest.raises(ValueError, match=f"{field} must be"):
            config(**{field: value})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("minibatches", 0, "minibatches must be an integer >= 1, got 0"),
        ("groups_per_prompt", 0, "groups_per_prompt must be an integer >= 1"),
        ("width", 2.0, "width must be an integer >= 1"),
        ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
        ("temperature", 0.0, "temperature must be a finite number > 0"),
        ("minibatches", 3, "prompts_per_step=16 must be a multiple of minibatches=3"),
    ],
)
def test_grpo_config_refuses_bad_values_when_built_and_when_set_later(field, value, message):
    from hf_models import bridged_model

    from bridge_ops.train import GRPOConfig, train_grpo

    with pytest.raises(ValueError, match=message):
        GRPOConfig(**{field: value})
    config = GRPOConfig(progress=False)
    setattr(config, field, value)  # set after construction (as the recipes do): refused when training starts
    with pytest.raises(ValueError, match=message):
        train_grpo(bridged_model(), TRAIN_PROMPTS, lambda i, r: 1.0, config)


def test_sft_config_set_after_construction_is_checked_when_training_starts():
    from hf_models import bridged_model

    from bridge_ops.train import SFTConfig, train_sft

    config = SFTConfig(progress=False)
    config.steps = 0
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        train_sft(bridged_model(), [(TRAIN_PROMPTS[0], [[3, 2]])], config)


def test_arithmetic_task_refuses_more_problems_than_exist_at_once():
    import time

    from bridge_ops.tasks import ArithmeticTask

    start = time.perf_counter()
    with pytest.raises(ValueError, match="train split of .* has 3321 distinct problems, fewer than the 100000"):
        ArithmeticTask(max_operand=9).problems("train", 100_000)
    assert time.perf_counter() - start < 5


# ---- the CLI ---------------------------------------------------------------------------------------------------------
def test_cli_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    from bridge_ops.cli import main

    args = ["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]
    assert main(args) == 2  # the exit status of `bridge-ops` (sys.exit(main()))
    err = capsys.readouterr().err
    assert err.startswith("bridge-ops: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(OSError):
        main(["--debug", *args])


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--model", "m", "--widths", "1,a"], "argument --widths: 'a' is not an integer"),
        (["eval", "--model", "m", "--widths", "0"], "argument --widths: must be >= 1, got 0"),
        (["eval", "--model", "m", "--test-problems", "0"], "argument --test-problems: must be >= 1, got 0"),
        (["tiny-model", "d", "--hidden-size", "0"], "argument --hidden-size: must be >= 1, got 0"),
        (["tiny-model", "d", "--layers", "0"], "argument --layers: must be >= 1, got 0"),
        (["train", "grpo", "--model", "m", "--out", "o", "--minibatches", "0"], "argument --minibatches: must be >= 1"),
    ],
)
def test_cli_bad_numbers_are_argument_errors(args, message, capsys):
    from bridge_ops.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


PRETRAIN = [
    "train",
    "pretrain",
    "--hidden-size",
    "32",
    "--layers",
    "1",
    "--batch",
    "8",
    "--train-problems",
    "16",
    "--no-progress",
]


def test_pretrain_checks_its_output_directory_before_training(tmp_path, capsys):
    from bridge_ops.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*PRETRAIN, "--out", str(blocker / "out"), "--steps", "1000"]) == 2  # fails at once, trains nothing
    assert f"cannot write to the output directory {blocker / 'out'}" in capsys.readouterr().err


def test_pretrain_checkpoints_and_resumes(tmp_path):
    import json

    from bridge_ops.cli import main

    out = tmp_path / "base"
    assert main([*PRETRAIN, "--out", str(out), "--steps", "2"]) == 0
    assert (out / "checkpoint.pt").exists() and (out / "checkpoint.json").exists()
    assert main([*PRETRAIN, "--out", str(out), "--steps", "3"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
