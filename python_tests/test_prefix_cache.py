"""GroupPrefixCache and generation with the shared-prefix cache: same tokens and logits as the expanded cache (with and
without Bridge, ragged groups, finished rows and compaction), conversions, row selection, memory, errors."""

import pytest
import torch
from hf_models import MODEL_TYPES, bridged_model, left_padded, tiny_model

import bridge_ops
from bridge_ops._loader import _C
from bridge_ops.hf import attention, decode_step

pytest.importorskip("transformers")
from bridge_ops.cache import GroupPrefixCache  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
WIDTHS = [3, 1, 2]


@pytest.fixture
def cascade_calls(monkeypatch):
    """Counts the cascade op calls of the attention function (so a silent fallback to SDPA fails the tests)."""
    calls = []
    original = bridge_ops.ops.cascade_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(bridge_ops.ops, "cascade_attention", spy)  # the HF forward's attention function (ops.*)
    monkeypatch.setattr(decode_step, "cascade_attention", spy)  # generate's flat decode step, layers in Python
    if _C is not None:  # its layers fused: each decode_layer call runs the cascade op once (in C++)
        layer = torch.ops.bridge_ops.decode_layer

        def layer_spy(hidden, cos, *args):
            q_features, head_dim = args[5][0].shape[0], cos.shape[1]  # weights[0]: q_proj's [Hq * Dh, D]
            calls.append(torch.Size([hidden.shape[0], q_features // head_dim, head_dim]))
            return layer(hidden, cos, *args)

        monkeypatch.setattr(torch.ops.bridge_ops, "decode_layer", layer_spy)
    return calls


def generate_both(model, seed=0, **kwargs):
    results = {}
    for cache in ("expanded", "shared-prefix"):
        torch.manual_seed(seed)
        results[cache] = bridge_ops.generate(model, PROMPTS, WIDTHS, return_logits=True, cache=cache, **kwargs)
    return results["expanded"], results["shared-prefix"]


def assert_same_generation(expanded, shared, atol=1e-4):
    assert shared.sequences == expanded.sequences
    for group_a, group_b in zip(expanded.logits, shared.logits):
        for a, b in zip(group_a, group_b):
            assert a.shape == b.shape and (a - b).abs().max().item() < atol


@pytest.mark.parametrize("bridged", [False, True], ids=["plain", "bridge"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_shared_prefix_generation_equals_expanded(model_type, bridged, cascade_calls):
    model = bridged_model(model_type) if bridged else tiny_model(model_type)
    expanded, shared = generate_both(model, max_new_tokens=6, eos_token_id=[])
    assert_same_generation(expanded, shared)
    layers = model.config.num_hidden_layers
    assert len(cascade_calls) == 5 * layers and cascade_calls[0] == (sum(WIDTHS), 4, 16)  # every decode step, layer
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("bridged", [False, True], ids=["plain", "bridge"])
def test_finished_rows_and_compaction(bridged, cascade_calls):
    """EOS ends some rows early (their peers keep going, Bridge hides them as keys) and whole groups leave the batch
    and the cache: the batch of the cascade calls shrinks, the results stay equal."""
    model = bridged_model("qwen2", seed=3) if bridged else tiny_model("qwen2", seed=3)
    probe = bridge_ops.generate(model, PROMPTS, WIDTHS, max_new_tokens=6, eos_token_id=[], do_sample=False)
    eos = probe.sequences[1][0][1]  # group 1 (one row) finishes at step 1, others when they draw it
    expanded, shared = generate_both(model, max_new_tokens=10, eos_token_id=eos, do_sample=False)
    assert_same_generation(expanded, shared)
    assert any(len(s) < 10 for group in shared.sequences for s in group)
    assert min(shape[0] for shape in cascade_calls) < sum(WIDTHS)  # rows were compacted away


def test_sampling_with_top_p_agrees(cascade_calls):
    expanded, shared = generate_both(
        bridged_model("llama", seed=5), seed=7, max_new_tokens=8, eos_token_id=[], top_p=0.9, temperature=0.8
    )
    assert_same_generation(expanded, shared)


def test_auto_cache_uses_the_cascade_where_it_can(cascade_calls):
    bridge_ops.generate(tiny_model("qwen3"), PROMPTS, WIDTHS, max_new_tokens=3, eos_token_id=[])
    assert len(cascade_calls) == 2 * 2  # default cache="auto": shared-prefix for a full-attention model
    cascade_calls.clear()
    windowed = tiny_model("mistral", sliding_window=4)
    assert attention.unsupported_reason(windowed) == "a sliding window (4 positions)"
    expanded, shared = (
        bridge_ops.generate(windowed, PROMPTS, WIDTHS, max_new_tokens=3, eos_token_id=[], cache=c, do_sample=False)
        for c in ("expanded", "auto")
    )
    assert not cascade_calls and shared.sequences == expanded.sequences
    assert attention.unsupported_reason(tiny_model("llama")) is None


def test_unknown_cache_kind_is_refused():
    with pytest.raises(ValueError, match="cache must be one of"):
        bridge_ops.generate(tiny_model("llama"), PROMPTS, 2, max_new_tokens=2, cache="paged")


# ---------------------------------------------------------------------------------------------------------------
# The cache itself
# ---------------------------------------------------------------------------------------------------------------


def prompt_forward(model, cache, steps=3):
    """Fills `cache` as a plain HF cache: the prompts (one row per group), then `steps` one-token forwards over the
    members (expanded rows). Returns the logits of the last step."""
    ids, mask = left_padded(PROMPTS)
    rows = torch.repeat_interleave(torch.arange(len(PROMPTS)), torch.tensor(WIDTHS))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        if isinstance(cache, GroupPrefixCache):
            mask, positions = mask[rows], positions[rows]
        else:
            cache.batch_select_indices(rows)
            mask, positions = mask[rows], positions[rows]
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            tokens = torch.randint(3, 60, (rows.numel(), 1), generator=gen)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(
                input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            ).logits
    return logits


def filled_caches(model_type="llama"):
    from transformers import DynamicCache

    model = tiny_model(model_type)
    shared = GroupPrefixCache(WIDTHS, torch.tensor([len(p) for p in PROMPTS]))
    dynamic = DynamicCache(config=model.config)
    return model, shared, dynamic, prompt_forward(model, shared), prompt_forward(model, dynamic)


def test_usable_as_a_plain_cache_with_any_attention():
    """Outside the cascade, update returns the expanded keys: HF's SDPA attention gives the DynamicCache's logits."""
    model, shared, dynamic, shared_logits, dynamic_logits = filled_caches()
    assert (shared_logits - dynamic_logits).abs().max().item() < 1e-5
    assert shared.get_seq_length() == dynamic.get_seq_length() == 5 + 3


def test_conversions_round_trip():
    model, shared, dynamic, _, _ = filled_caches()
    expanded = shared.to_dynamic_cache()
    for a, b in zip(expanded.layers, dynamic.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    back = GroupPrefixCache.from_dynamic_cache(dynamic, WIDTHS, shared.prefix_lens, prefix_length=5)
    assert torch.equal(back.cu_group_lens, shared.cu_group_lens) and back.get_seq_length() == shared.get_seq_length()
    for a, b in zip(back.layers, shared.layers):
        for name in ("prefix_keys", "prefix_values", "suffix_keys", "suffix_values"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    dynamic.layers[1].keys[1, 0, 4, 0] += 1  # row 1 of group 0 no longer shares the prompt
    with pytest.raises(ValueError, match="layer 1: the rows of a group do not share"):
        GroupPrefixCache.from_dynamic_cache(dynamic, WIDTHS, shared.prefix_lens, prefix_length=5)


def test_prompt_bytes_are_divided_by_the_width():
    _, shared, dynamic, _, _ = filled_caches()
    prefix_bytes, suffix_bytes = shared.nbytes()
    expanded_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in dynamic.layers)
    per_position = expanded_bytes // (sum(WIDTHS) * 8)  # 8 = 5 prompt + 3 generated positions
    assert prefix_bytes == len(PROMPTS) * 5 * per_position  # one copy per group, not one per row
    assert suffix_bytes == sum(WIDTHS) * 3 * per_position


def test_row_selection_drops_groups_and_keeps_order():
    _, shared, dynamic, _, _ = filled_caches()
    keep = torch.tensor([0, 1, 2, 4, 5])  # group 1 (row 3) leaves
    shared.batch_select_indices(keep)
    dynamic.batch_select_indices(keep)
    assert shared.cu_group_lens.tolist() == [0, 3, 5] and shared.prefix_lens.tolist() == [5, 3]
    for a, b in zip(shared.to_dynamic_cache().layers, dynamic.layers):
        assert torch.equal(a.keys, b.keys)
    with pytest.raises(ValueError, match="keep the rows of a group adjacent"):
        shared.batch_select_indices(torch.tensor([0, 3, 1]))


def test_row_selection_honours_a_bool_mask_and_refuses_fractions():
    _, shared, dynamic, _, _ = filled_caches()
    keep = torch.tensor([True, True, True, False, True, True])  # a mask, as DynamicCache reads one: group 1 leaves
    shared.batch_select_indices(keep)
    dynamic.batch_select_indices(keep)
    assert shared.cu_group_lens.tolist() == [0, 3, 5] and shared.prefix_lens.tolist() == [5, 3]
    for a, b in zip(shared.to_dynamic_cache().layers, dynamic.layers):
        assert torch.equal(a.keys, b.keys)
    with pytest.raises(ValueError, match="a bool row mask must have shape \\[5\\]"):
        shared.batch_select_indices(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="integer row indices or a bool mask, got torch.float32"):
        shared.batch_select_indices(torch.tensor([0.0, 1.0]))
    for widths in ([3, 1.5, 2], [3, "1", 2]):
        with pytest.raises(TypeError, match="widths must be an integer"):
            GroupPrefixCache(widths, torch.tensor([5, 2, 3]))


def test_wrong_batches_and_unsupported_operations_are_refused():
    model, shared, _, _, _ = filled_caches()
    with pytest.raises(ValueError, match="one row per group member"):
        model(input_ids=torch.ones(2, 1, dtype=torch.long), past_key_values=shared)
    fresh = GroupPrefixCache(WIDTHS, torch.tensor([5, 2, 3]))
    with pytest.raises(ValueError, match="one row per group"):
        model(input_ids=torch.ones(6, 2, dtype=torch.long), past_key_values=fresh)
    with pytest.raises(ValueError, match="prefix_lens must have shape"):
        GroupPrefixCache(WIDTHS, torch.tensor([5, 2]))
    with pytest.raises(NotImplementedError):
        shared.reorder_cache(torch.arange(6))
    shared.reset()
    assert shared.get_seq_length() == 0 and shared.layers[0].prefix_keys is None


def test_the_cascade_view_needs_the_prompts_stored():
    with pytest.raises(ValueError, match="store the prompts first"):
        GroupPrefixCache(WIDTHS, torch.tensor([5, 2, 3])).cascade_view()


def _with_sinks(model):
    """A model whose attention modules carry sinks (gpt-oss style), which the cascade refuses."""
    for layer in model.model.layers:
        layer.self_attn.sinks = torch.nn.Parameter(torch.zeros(layer.self_attn.config.num_attention_heads))
    return model


AUTO_CASES = {  # model -> the reason the cascade gives (None: it serves the model)
    "llama": (lambda: tiny_model("llama"), None),
    "gemma2 (softcapping)": (
        lambda: _auto_model("gemma2", head_dim=16, final_logit_softcapping=None),
        "attention logit softcapping",
    ),
    "gemma3 (sliding layers)": (
        lambda: _auto_model("gemma3_text", head_dim=16, sliding_window=4),
        "layers other than full attention",
    ),
    "mistral (sliding window)": (lambda: tiny_model("mistral", sliding_window=4), "a sliding window (4 positions)"),
    "falcon (no attention registry)": (lambda: _auto_model("falcon"), "does not call registered attention functions"),
    "llama (sinks)": (lambda: _with_sinks(tiny_model("llama")), "attention sinks"),
}


def _auto_model(model_type, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(vocab_size=61, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)
    settings.update(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).eval()


@pytest.mark.parametrize("case", list(AUTO_CASES))
def test_auto_cache_never_picks_a_path_that_raises(case):
    """Where the expanded cache generates, cache="auto" generates the same tokens: it refuses the cascade for every
    feature the cascade attention would raise on, with the reason."""
    build, reason = AUTO_CASES[case]
    model = build()
    got = attention.unsupported_reason(model)
    assert got == reason if reason is None else reason in got
    if reason is not None:
        with pytest.raises((NotImplementedError, RuntimeError)):
            bridge_ops.generate(model, PROMPTS, WIDTHS, max_new_tokens=3, cache="shared-prefix", do_sample=False)
    expanded, auto = (
        bridge_ops.generate(model, PROMPTS, WIDTHS, max_new_tokens=3, eos_token_id=[], cache=c, do_sample=False)
        for c in ("expanded", "auto")
    )
    assert auto.sequences == expanded.sequences


CASCADE_PROMPTS = [[1, 5, 6, 7, 8], [1, 10], [1, 12, 13]]


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("transformers")
    from hf_models import bridged_model

    return bridged_model("llama")


def _cascade_decode_logits(model, cache, steps=3):
    """The prompts' forward into `cache`, then decode steps through the cascade attention, as `generate` runs them."""
    from hf_models import left_padded

    from bridge_ops.hf.attention import routed_to_cascade

    ids, mask = left_padded(CASCADE_PROMPTS)
    rows = torch.repeat_interleave(torch.arange(len(CASCADE_PROMPTS)), torch.tensor([3, 1, 2]))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens = torch.randint(3, 60, (steps, rows.numel(), 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), bridge_ops.groups(model, sizes=[1, 1, 1]):
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    mask, positions = mask[rows], positions[rows, -1:]
    with torch.no_grad(), routed_to_cascade(model, cache) as kwargs, bridge_ops.groups(model, sizes=[3, 1, 2]):
        for step in range(steps):
            mask, positions = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), positions + 1
            logits = model(
                input_ids=tokens[step], attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
            ).logits  # kwargs hold the cache's cascade view
    return logits


@pytest.mark.guarantee
def test_a_deep_copied_group_prefix_cache_is_independent(model):
    import copy

    from bridge_ops.cache import GroupPrefixCache

    lens = torch.tensor([len(p) for p in CASCADE_PROMPTS])
    fresh = _cascade_decode_logits(model, GroupPrefixCache([3, 1, 2], lens))
    copied = _cascade_decode_logits(model, copy.deepcopy(GroupPrefixCache([3, 1, 2], lens)))
    torch.testing.assert_close(copied, fresh, rtol=0, atol=0)
    original = GroupPrefixCache([3, 1, 2], lens)
    _cascade_decode_logits(model, original)
    clone = copy.deepcopy(original)
    clone.batch_select_indices(torch.tensor([0, 1, 2]))
    assert original.num_rows == 6 and original.layers[0].cache is original and clone.layers[0].cache is clone


@pytest.mark.guarantee
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
