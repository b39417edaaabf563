"""Bridge in HuggingFace models: patching, group metadata, save/load, and generation with the KV cache."""

import dataclasses
import os

import pytest
import torch
from hf_models import EOS, MODEL_TYPES, PAD, bridged_model, left_padded, tiny_config, tiny_model

import bridge_ops
from bridge_ops.hf import bridge_blocks

pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
NAN = float("nan")


def teacher_forced_logits(model, prompts, widths, result, eos=EOS):
    """One forward over prompt + generated tokens of every member, with the groups and key mask generation used:
    logits[r, t] is what predicted generated token t of row r."""
    ids, mask = left_padded(prompts)
    rows = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(widths))
    members = [seq for group in result.sequences for seq in group]
    steps = max(len(s) for s in members)
    generated = torch.full((len(members), steps), PAD, dtype=torch.long)
    key_visible = torch.zeros(len(members), steps, dtype=torch.bool)
    for r, seq in enumerate(members):
        generated[r, : len(seq)] = torch.tensor(seq)
        key_visible[r, : len(seq)] = True  # up to and including its EOS
    full_ids = torch.cat([ids[rows], generated], dim=1)
    full_mask = torch.cat([mask[rows], torch.ones_like(generated)], dim=1)
    key_mask = torch.cat([mask[rows].bool(), key_visible], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    cu = bridge_ops.cu_group_lens_from_sizes(widths)
    with torch.no_grad(), bridge_ops.groups(model, cu_group_lens=cu, key_mask=key_mask):
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    return logits[:, ids.shape[1] - 1 : -1].float(), members


def assert_incremental_matches_teacher_forced(model, prompts, widths, result, atol=2e-4):
    full, members = teacher_forced_logits(model, prompts, widths, result)
    stepwise = [lg for group in result.logits for lg in group]
    for r, (seq, step_logits) in enumerate(zip(members, stepwise)):
        assert step_logits.shape[0] == len(seq)
        err = (full[r, : len(seq)] - step_logits).abs().max().item() if seq else 0.0
        assert err < atol, f"row {r}: incremental vs teacher-forced logits differ by {err:.2e}"


def eos_after_two_steps(model, prompts, widths, seed):
    """An EOS token that makes some (not all) rows finish early: a token row 0 draws at step 2."""
    torch.manual_seed(seed)
    probe = bridge_ops.generate(model, prompts, widths, max_new_tokens=6, eos_token_id=[], top_k=0)
    return probe.sequences[0][0][2]


# ---------------------------------------------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_zero_initialized_bridge_leaves_logits_identical(model_type):
    model = tiny_model(model_type)
    ids, mask = left_padded([p for p in PROMPTS for _ in range(3)])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    bridge_ops.apply_bridge(model, d_bridge=32)
    assert len(bridge_blocks(model)) == 2
    assert all(type(b.norm) is type(model.model.layers[0].post_attention_layernorm) for b in bridge_blocks(model))
    with torch.no_grad(), bridge_ops.groups(model, width=3):
        bridged = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(bridged, base)
    with bridge_ops.groups(model, width=3):  # with autograd, through BridgeBlock.forward instead of the fused op
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


def test_patch_is_per_instance_keeps_weights_and_is_removable():
    model, other = tiny_model("qwen2"), tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bridge_ops.apply_bridge(model, d_bridge=32)
    assert not hasattr(other.model.layers[0], "bridge") and "forward" not in vars(other.model.layers[0])
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert {k for k in after if ".bridge." in k} == {
        f"model.layers.{i}.bridge.{n}"
        for i in range(2)
        for n in ("norm.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
    }
    assert model.config.bridge == {"d_bridge": 32, "num_heads": 1, "init_std": model.config.hidden_size**-0.5}
    bridge_ops.remove_bridge(model)
    assert set(model.state_dict()) == set(before) and not hasattr(model.config, "bridge")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits, rtol=0, atol=0)


def test_bridge_parameters_are_in_the_models_dtype_and_the_share_is_reported():
    model = bridge_ops.apply_bridge(tiny_model("llama").to(torch.bfloat16), d_bridge=16)
    assert all(p.dtype == torch.bfloat16 for p in bridge_ops.bridge_parameters(model))
    share = bridge_ops.parameter_share(model)
    assert share["bridge_parameters"] == 2 * (4 * 64 * 16 + 64)
    assert share["share"] == pytest.approx(share["bridge_parameters"] / share["total_parameters"])


def test_generic_path_and_unsupported_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    ids = torch.tensor([[3, 4, 5], [3, 4, 5], [6, 7, 8], [6, 7, 8]])
    with torch.no_grad():
        base = gpt2(ids).logits
    bridge_ops.apply_bridge(gpt2, d_bridge=16)  # GPT-2 is not registered: its blocks have an `mlp`
    assert len(bridge_blocks(gpt2)) == 2 and isinstance(bridge_blocks(gpt2)[0].norm, torch.nn.RMSNorm)
    with torch.no_grad(), bridge_ops.groups(gpt2, width=2):
        assert torch.equal(gpt2(ids).logits, base)

    class Toy(torch.nn.Module):
        base_model_prefix = "body"

        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "toy-lm", "hidden_size": 8})()
            self.body = torch.nn.Module()
            self.body.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

    with pytest.raises(ValueError, match="model type 'toy-lm'"):
        bridge_ops.apply_bridge(Toy())


def test_forward_without_groups_explains_what_to_do():
    model = bridge_ops.apply_bridge(tiny_model("llama"), d_bridge=16)
    with pytest.raises(RuntimeError, match="with bridge_ops.groups"):
        model(torch.tensor([PROMPTS[0]]))
    with pytest.raises(ValueError, match="not a positive multiple of width 2"), bridge_ops.groups(model, width=2):
        model(torch.tensor([PROMPTS[0]] * 3))
    with pytest.raises(ValueError, match="exactly one of"):
        with bridge_ops.groups(model, width=2, sizes=[1, 1]):
            pass
    with pytest.raises(ValueError, match="already has Bridge"):
        bridge_ops.apply_bridge(model)


def test_groups_context_hides_keys_after_eos():
    """Inside groups(..., eos_token_id=...), a row's keys vanish right after its EOS: peers' outputs at later
    positions equal those of a run where the finished row's later tokens are arbitrary."""
    model = bridged_model("llama")
    prompt = torch.tensor([[5, 6, 7]] * 2)
    outs = []
    for late in (20, 30):
        with torch.no_grad(), bridge_ops.groups(model, width=2, eos_token_id=EOS):
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            model(input_ids=torch.tensor([[EOS], [9]]), past_key_values=cache, use_cache=True)
            outs.append(model(input_ids=torch.tensor([[late], [10]]), past_key_values=cache, use_cache=True).logits)
    assert torch.equal(outs[0][1], outs[1][1])  # row 1 does not see row 0 after its EOS
    assert not torch.equal(outs[0][0], outs[1][0])


def recorded_key_masks(monkeypatch):
    """Every key mask a Bridge layer receives, in call order."""
    masks = []
    residual = bridge_ops.BridgeBlock.residual

    def spy(block, hidden, cu_group_lens, key_mask=None):
        masks.append(key_mask.clone())
        return residual(block, hidden, cu_group_lens, key_mask)

    monkeypatch.setattr(bridge_ops.BridgeBlock, "residual", spy)
    return masks


def test_groups_block_keeps_no_state_between_unrelated_forwards(monkeypatch):
    """Inside one groups(..., eos_token_id=...) block, two unrelated generations of the same batch size and a
    teacher-forced forward (no cache) see exactly the key masks they see in separate blocks: EOS state follows a KV
    cache, never the batch size. Each generation still equals teacher forcing over its own tokens."""
    model = bridged_model("llama")
    width, steps = 2, 8
    eos = eos_after_two_steps(model, PROMPTS[:2], [width] * 2, seed=3)
    batches = [left_padded([p for p in prompts for _ in range(width)]) for prompts in (PROMPTS[:2], PROMPTS[1:])]
    teacher_ids = torch.randint(3, 60, (2 * width, 6), generator=torch.Generator().manual_seed(0))
    masks = recorded_key_masks(monkeypatch)

    def generation(seed, ids, mask):
        torch.manual_seed(seed)
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            max_new_tokens=steps,
            eos_token_id=eos,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_logits=True,
        )

    forwards = [
        lambda: generation(3, *batches[0]),
        lambda: generation(4, *batches[1]),
        lambda: model(input_ids=teacher_ids),
    ]
    with torch.no_grad(), bridge_ops.groups(model, width=width, eos_token_id=eos):
        together = [forward() for forward in forwards]
    masks_together = list(masks)
    masks.clear()
    apart = []
    for forward in forwards:
        with torch.no_grad(), bridge_ops.groups(model, width=width, eos_token_id=eos):
            apart.append(forward())
    assert len(masks) == len(masks_together) and all(torch.equal(a, b) for a, b in zip(masks, masks_together))
    assert all(mask.all() for mask in masks_together[-2:])  # the teacher-forced forward hides nothing

    for (ids, _), prompts, out, alone in zip(batches, (PROMPTS[:2], PROMPTS[1:]), together, apart):
        assert torch.equal(out.sequences, alone.sequences)
        rows = out.sequences[:, ids.shape[1] :].tolist()
        sequences = [
            [row[: row.index(eos) + 1] if eos in row else row for row in rows[g * width : (g + 1) * width]]
            for g in range(len(prompts))
        ]
        assert any(len(s) < steps for g in sequences for s in g)  # some rows finished while their peers went on
        step_logits = torch.stack(out.logits, dim=1)
        result = bridge_ops.GenerationOutput(
            sequences,
            None,
            0,
            1.0,
            [[step_logits[g * width + m, : len(s)] for m, s in enumerate(group)] for g, group in enumerate(sequences)],
        )
        assert_incremental_matches_teacher_forced(model, prompts, [width] * len(prompts), result)


def test_continuing_a_cache_the_block_did_not_start_is_refused():
    from transformers import DynamicCache

    model = bridged_model("llama")
    cache = DynamicCache(config=model.config)
    prompt = torch.tensor([[5, 6, 7]] * 2)
    with torch.no_grad():
        with bridge_ops.groups(model, width=2):
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="first forward ran outside"):
            with bridge_ops.groups(model, width=2, eos_token_id=EOS):
                model(input_ids=torch.tensor([[8], [9]]), past_key_values=cache, use_cache=True)


# ---------------------------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = bridged_model("qwen3")
    bridge_ops.save_bridge(model, tmp_path / "bridge")
    fresh = tiny_model("qwen3")
    bridge_ops.load_bridge(fresh, tmp_path / "bridge")  # adds the blocks from the saved config
    for a, b in zip(bridge_ops.bridge_parameters(model), bridge_ops.bridge_parameters(fresh)):
        assert torch.equal(a, b)
    assert fresh.config.bridge == model.config.bridge


def test_save_pretrained_reload_apply_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = bridged_model("mistral")
    model.save_pretrained(tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.bridge == model.config.bridge
    bridge_ops.apply_bridge(reloaded)  # hyper-parameters from config.bridge
    bridge_ops.load_bridge(reloaded, tmp_path / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    ids = torch.tensor([PROMPTS[0]] * 2)
    with torch.no_grad(), bridge_ops.groups(model, width=2), bridge_ops.groups(reloaded, width=2):
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_base_state_dict_is_the_unbridged_models_and_the_bridge_file_completes_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from bridge_ops.hf import base_state_dict

    plain = tiny_model("llama")
    model = bridged_model("llama")
    base = base_state_dict(model)
    assert list(base) == list(plain.state_dict()) and all(".bridge." not in k for k in base)
    model.save_pretrained(tmp_path, state_dict=base)
    bridge_ops.save_bridge(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    bridge_ops.load_bridge(reloaded, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_loading_into_another_shape_fails_clearly(tmp_path):
    bridge_ops.save_bridge(bridged_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="hidden_size 64 \\(saved\\) vs 32 \\(model\\)"):
        bridge_ops.load_bridge(tiny_model("llama", hidden_size=32, head_dim=8), tmp_path)
    with pytest.raises(ValueError, match="num_layers 2 \\(saved\\) vs 3 \\(model\\)"):
        bridge_ops.load_bridge(tiny_model("llama", num_hidden_layers=3), tmp_path)
    other_width = bridge_ops.apply_bridge(tiny_model("llama"), d_bridge=16)
    with pytest.raises(ValueError, match="d_bridge 32 \\(saved\\) vs 16 \\(model\\)"):
        bridge_ops.load_bridge(other_width, tmp_path)


def _saved_bridge(directory):
    """The Bridge weights load_bridge reads from `directory` into a fresh model."""
    model = bridge_ops.load_bridge(tiny_model("llama"), directory)
    return [p.detach().clone() for p in bridge_ops.bridge_parameters(model)]


@pytest.mark.parametrize("trials", [3, pytest.param(30, marks=pytest.mark.slow)])
def test_save_bridge_killed_at_random_points_leaves_the_old_or_the_new_save(tmp_path, trials):
    from helpers import kill_during_saves

    models = [bridged_model("llama", seed=1), bridged_model("llama", seed=2)]
    saves = [lambda m=m: bridge_ops.save_bridge(m, tmp_path) for m in models]
    outcomes = kill_during_saves(tmp_path, saves, _saved_bridge, trials)
    print(f"save_bridge, {trials} kills: {dict(outcomes)}")
    assert outcomes["old"] + outcomes["new"] == trials


def test_two_threads_saving_into_one_directory_give_the_last_save(tmp_path):
    import threading

    models = [bridged_model("llama", seed=1), bridged_model("llama", seed=2)]
    errors = []

    def save_often(model):
        try:
            for _ in range(15):
                bridge_ops.save_bridge(model, tmp_path)
        except Exception as e:  # reported below: a save must never fail
            errors.append(e)

    threads = [threading.Thread(target=save_often, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    loaded = _saved_bridge(tmp_path)
    assert any(all(torch.equal(a, b) for a, b in zip(loaded, bridge_ops.bridge_parameters(m))) for m in models)
    assert sorted(os.listdir(tmp_path)) == ["bridge.safetensors", "bridge_config.json"]


def test_saving_a_model_without_bridge_creates_nothing(tmp_path):
    with pytest.raises(ValueError, match="this model has no Bridge blocks"):
        bridge_ops.save_bridge(tiny_model("llama"), tmp_path / "out")
    with pytest.raises(ValueError, match="1 blocks given for a model with 2 layers"):
        model = bridged_model("llama")
        bridge_ops.save_bridge(model, tmp_path / "out", blocks=bridge_blocks(model)[:1])
    assert not (tmp_path / "out").exists()


def _edit_config(directory, **changes):
    from bridge_ops.files import read_json, write_json

    config = read_json(directory / "bridge_config.json")
    config.update(changes)
    write_json(directory / "bridge_config.json", {k: v for k, v in config.items() if v is not None})


def test_the_checksum_covers_the_config_and_a_missing_one_is_refused_unless_allowed(tmp_path):
    bridge_ops.save_bridge(bridged_model("llama"), tmp_path)
    _edit_config(tmp_path, num_heads=4)
    with pytest.raises(ValueError, match="bridge_config.json was edited after it was saved"):
        bridge_ops.load_bridge(tiny_model("llama"), tmp_path)
    bridge_ops.save_bridge(bridged_model("llama"), tmp_path)
    _edit_config(tmp_path, sha256=None)
    weights = tmp_path / "bridge.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # a flipped bit of a weight, which only the deleted checksum would have caught
    weights.write_bytes(bytes(data))
    message = "records no sha256 of bridge.safetensors and bridge_config.json .* pass allow_missing_checksum=True"
    with pytest.raises(ValueError, match=message):
        bridge_ops.load_bridge(tiny_model("llama"), tmp_path)
    bridge_ops.load_bridge(tiny_model("llama"), tmp_path, allow_missing_checksum=True)  # explicitly unverified


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sha256", "abc", "sha256 must be dict, got 'abc'"),
        ("sha256", {"bridge.safetensors": 3}, "sha256 must map file names to sha256 hex digests"),
        ("num_heads", "2", "num_heads must be int or null, got '2'"),
        ("d_bridge", 32.0, "d_bridge must be int, got 32.0"),
    ],
)
def test_config_fields_of_the_wrong_type_are_refused_naming_the_file(tmp_path, field, value, message):
    bridge_ops.save_bridge(bridged_model("llama"), tmp_path)
    _edit_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"{tmp_path / 'bridge_config.json'}: {message}"):
        bridge_ops.load_bridge(tiny_model("llama"), tmp_path)


def test_integer_arguments_are_refused_when_they_are_not_integers():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"d_bridge must be an integer, got 16.0 \(float\)"):
        bridge_ops.apply_bridge(model, 16.0)
    with pytest.raises(TypeError, match=r"num_heads must be an integer, got '2'"):
        bridge_ops.apply_bridge(model, 16, "2")
    assert not bridge_ops.hf.is_bridged(model)
    bridged = bridged_model("llama")
    for kwargs, name in ((dict(width=2, eos_token_id="x"), "eos_token_id"), (dict(width=2.0), "width")):
        with pytest.raises(TypeError, match=f"{name} must be an integer"):
            with bridge_ops.groups(bridged, **kwargs):
                pass


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("compact", [True, False])
def test_incremental_decoding_equals_teacher_forced_forward(model_type, compact):
    model = bridged_model(model_type)
    widths = [3, 1, 2]
    eos = eos_after_two_steps(model, PROMPTS, widths, seed=3)
    torch.manual_seed(3)
    result = bridge_ops.generate(
        model, PROMPTS, widths, max_new_tokens=8, eos_token_id=eos, top_k=0, compact=compact, return_logits=True
    )
    lengths = [len(s) for g in result.sequences for s in g]
    assert min(lengths) < 8 and max(lengths) == 8, lengths  # some rows finished early, some did not
    assert all(s[-1] == eos for g in result.sequences for s in g if len(s) < 8)
    assert_incremental_matches_teacher_forced(model, PROMPTS, widths, result)


def test_bridge_really_mixes_members_during_generation():
    """Member 0's logits depend on its peers: teacher-forcing its own tokens without them gives other logits
    (except at the first token, which comes from the shared prompt)."""
    model = bridged_model("llama")
    torch.manual_seed(0)
    together = bridge_ops.generate(
        model, [PROMPTS[0]], 3, max_new_tokens=6, eos_token_id=[], top_k=0, return_logits=True
    )
    member = bridge_ops.GenerationOutput([[together.sequences[0][0]]], None, 6, 1.0)
    alone, _ = teacher_forced_logits(model, [PROMPTS[0]], [1], member)
    with_peers = together.logits[0][0]
    torch.testing.assert_close(alone[0, :1], with_peers[:1], rtol=0, atol=1e-5)
    assert (alone[0, 1:] - with_peers[1:]).abs().max() > 1e-2


@pytest.mark.parametrize("width", [1, 2, 8, 16])
def test_width_agnostic(width):
    """Bridge has no positional encoding among members: a model built and trained at width 4 runs at any width."""
    model = bridged_model("qwen2")
    torch.manual_seed(width)
    result = bridge_ops.generate(model, PROMPTS[:2], width, max_new_tokens=5, top_k=0, return_logits=True)
    assert [len(g) for g in result.sequences] == [width, width]
    assert_incremental_matches_teacher_forced(model, PROMPTS[:2], [width, width], result)


def test_prefill_once_equals_expanded_prefill():
    from transformers import DynamicCache

    model = bridged_model("llama")
    ids, mask = left_padded(PROMPTS)
    width = 4
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    once = DynamicCache(config=model.config)
    with torch.no_grad(), bridge_ops.groups(model, width=1):
        logits_once = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=once).logits
    rows = torch.arange(len(PROMPTS)).repeat_interleave(width)
    once.batch_select_indices(rows)
    naive = DynamicCache(config=model.config)
    with torch.no_grad(), bridge_ops.groups(model, width=width):
        logits_naive = model(
            input_ids=ids[rows], attention_mask=mask[rows], position_ids=positions[rows], past_key_values=naive
        ).logits
    torch.testing.assert_close(logits_once[rows], logits_naive, rtol=0, atol=1e-5)
    for layer_once, layer_naive in zip(once.layers, naive.layers):
        torch.testing.assert_close(layer_once.keys, layer_naive.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer_once.values, layer_naive.values, rtol=0, atol=1e-5)


def test_groups_of_different_prompts_do_not_interact():
    # compact=False keeps the batch shape fixed, so that the comparison can be bit-exact: when the other group
    # finishes earlier in one run, compaction changes the batch size and with it the float rounding of the matmuls.
    model = bridged_model("llama")
    a = bridge_ops.generate(
        model, [PROMPTS[0], [20, 21, 22]], [3, 2], max_new_tokens=6, do_sample=False, return_logits=True, compact=False
    )
    b = bridge_ops.generate(
        model, [PROMPTS[0], [30, 31, 32]], [3, 2], max_new_tokens=6, do_sample=False, return_logits=True, compact=False
    )
    assert a.sequences[0] == b.sequences[0]
    assert all(torch.equal(x, y) for x, y in zip(a.logits[0], b.logits[0]))
    assert a.sequences[1] != b.sequences[1]


def test_compaction_does_not_change_surviving_rows():
    model = bridged_model("qwen3")
    widths = [2, 3, 1]
    eos = eos_after_two_steps(model, PROMPTS, widths, seed=5)
    runs = [
        bridge_ops.generate(
            model,
            PROMPTS,
            widths,
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=eos,
            compact=compact,
            return_logits=True,
        )
        for compact in (True, False)
    ]
    assert runs[0].sequences == runs[1].sequences
    for x, y in zip(sum(runs[0].logits, []), sum(runs[1].logits, [])):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_hf_generate_with_num_return_sequences_matches_bridge_ops_generate():
    model = bridged_model("llama")
    ids, mask = left_padded(PROMPTS)
    width, steps = 4, 8
    eos = eos_after_two_steps(model, PROMPTS, [width] * 3, seed=11)
    torch.manual_seed(11)
    ours = bridge_ops.generate(
        model, ids, width, max_new_tokens=steps, attention_mask=mask, eos_token_id=eos, top_k=0, compact=False
    )
    torch.manual_seed(11)
    theirs = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        num_return_sequences=width,
        max_new_tokens=steps,
        top_k=0,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    generated = theirs[:, ids.shape[1] :].tolist()
    ours_flat = [s for g in ours.sequences for s in g]
    assert any(len(s) < steps for s in ours_flat)
    for mine, hf in zip(ours_flat, generated):
        assert mine == hf[: len(mine)]
    # greedy at width 1
    greedy_ours = bridge_ops.generate(
        model, ids, 1, max_new_tokens=steps, attention_mask=mask, do_sample=False, eos_token_id=eos
    )
    greedy_hf = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps, eos_token_id=eos, pad_token_id=PAD
    )[:, ids.shape[1] :].tolist()
    for (mine,), hf in zip(greedy_ours.sequences, greedy_hf):
        assert mine == hf[: len(mine)]


def test_gradient_checkpointing_recompute_sees_the_groups_of_its_forward():
    """Groups travel with the forward's kwargs: the checkpointed layers' recompute, run by a backward after the
    groups block closed and another forward ran, gives the gradients of a run without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = bridged_model("llama").train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        ids, mask = left_padded([p for p in PROMPTS for _ in range(2)])
        with bridge_ops.groups(model, width=2):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        with torch.no_grad(), bridge_ops.groups(model, width=3):
            model(input_ids=ids)
        loss.backward()
        grads.append([p.grad for p in bridge_ops.bridge_parameters(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_generation_prints_no_deprecation_warning():
    """The cache goes to the model under the argument name its transformers version expects."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for cache in ("shared-prefix", "expanded"):
            bridge_ops.generate(bridged_model("llama"), PROMPTS, 2, max_new_tokens=3, cache=cache)


def test_generation_inputs_and_errors():
    model = bridged_model("llama")
    with pytest.raises(ValueError, match="2 widths given for 3 prompts"):
        bridge_ops.generate(model, PROMPTS, [2, 2])
    with pytest.raises(ValueError, match="every width must be >= 1"):
        bridge_ops.generate(model, PROMPTS, 0)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        bridge_ops.generate(model, ["hello"], 2)
    with pytest.raises(ValueError, match="at least one token"):
        bridge_ops.generate(model, [[]], 2)
    with pytest.raises(RuntimeError, match="outside a groups"), bridge_ops.groups(model, width=2):
        bridge_ops.generate(model, PROMPTS, 2)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(torch.tensor([PROMPTS[0]]), num_beams=2, max_new_tokens=2)
    # works without Bridge too (independent samples), returning one list per prompt
    plain = bridge_ops.generate(tiny_model("llama"), PROMPTS, 2, max_new_tokens=3, return_log_probs=True)
    assert [len(g) for g in plain.sequences] == [2, 2, 2] and len(plain.log_probs[0]) == 2
    assert plain.num_tokens == sum(len(s) for g in plain.sequences for s in g)


def test_list_prompts_take_integer_ids_only_and_no_attention_mask():
    model = bridged_model("llama")
    for prompt, bad in (([5, 6.0, 7], "6.0"), ([5, True, 7], "True")):
        with pytest.raises(TypeError, match=f"prompts\\[1\\] must be an integer, got {bad}"):
            bridge_ops.generate(model, [PROMPTS[0], prompt], 2, max_new_tokens=2)
    with pytest.raises(TypeError, match="prompts\\[0\\] must be a list of token ids"):
        bridge_ops.generate(model, [5, 6, 7], 2, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask goes with an input_ids tensor"):
        bridge_ops.generate(model, PROMPTS, 2, max_new_tokens=2, attention_mask=torch.ones(3, 5, dtype=torch.long))


def test_a_width_beyond_the_memory_is_refused_before_anything_is_allocated():
    model = bridged_model("llama")
    with pytest.raises(ValueError, match="3000000000 sequences .* need at least .* GiB .* lower the width"):
        bridge_ops.generate(model, PROMPTS, 10**9, max_new_tokens=32)


def test_aggregation_helpers():
    out = bridge_ops.GenerationOutput([[[1, 2], [3], [1, 2]], [[4], [5]]], None, 6, 1.0)
    assert out.majority_vote(lambda s: s[0]) == [1, 4]
    assert out.majority_vote(lambda s: None) == [None, None]
    assert out.best_of_n(len) == [[1, 2], [4]]
    assert bridge_ops.majority_vote(["b", None, "a", "a", "b"]) == "b"  # tie: first seen
    with pytest.raises(ValueError):
        bridge_ops.best_of_n([], len)


def test_decode_steps_use_the_fused_op(monkeypatch):
    calls = []
    real = torch.ops.bridge_ops.bridge_block_decode

    class Counting:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    monkeypatch.setattr(bridge_ops.ops.torch.ops.bridge_ops, "bridge_block_decode", Counting())
    model = bridged_model("llama")
    bridge_ops.generate(model, PROMPTS, 2, max_new_tokens=3, do_sample=False, eos_token_id=[])
    decode_calls = [s for s in calls if s[1] == 1]
    assert len(decode_calls) == 2 * 2  # 2 layers x 2 decode steps (the first token comes from the prefill)
    assert tiny_config("llama").num_hidden_layers == 2


def test_a_sampling_config_draws_what_its_keyword_arguments_draw():
    model = bridged_model("llama")
    sampling = bridge_ops.SamplingConfig(max_new_tokens=5, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=[EOS])
    torch.manual_seed(3)
    by_config = bridge_ops.generate(model, PROMPTS, [2, 1, 3], sampling=sampling)
    torch.manual_seed(3)
    by_keywords = bridge_ops.generate(
        model, PROMPTS, [2, 1, 3], 5, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=[EOS]
    )
    assert by_config.sequences == by_keywords.sequences
    greedy = bridge_ops.generate(model, PROMPTS, 2, 2, sampling=sampling, do_sample=False)  # a keyword overrides
    assert greedy.sequences == bridge_ops.generate(model, PROMPTS, 2, 2, do_sample=False).sequences
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampling.temperature = 1.0
    assert sampling.updated(temperature=None, top_k=5) == dataclasses.replace(sampling, top_k=5)


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


@pytest.mark.guarantee
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


@pytest.mark.guarantee
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


@pytest.mark.guarantee
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


@pytest.mark.guarantee
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


@pytest.mark.guarantee
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
