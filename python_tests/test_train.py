"""Training: the GRPO loss by hand, cross-sample gradients through Bridge, frozen-base SFT, resume, pmatch, eval."""

import math

import pytest
import torch
from helpers import assert_same_params, named_params
from hf_models import EOS, PAD, bridged_model, tiny_model

import bridge_ops
from bridge_ops.train import (
    GRPOConfig,
    GRPOLossConfig,
    SFTConfig,
    apply_parameter_matched_mlp,
    collect_warmup_groups,
    evaluate_widths,
    group_advantages,
    grouped_batch,
    grpo_loss,
    remove_parameter_matched_mlp,
    select_trainable,
    token_log_probs,
    train_grpo,
    train_sft,
)

NAN, INF = float("nan"), float("inf")
PROMPTS = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14], [1, 20, 21]]


def reward_even_first(index, response):
    """A verifiable toy reward: the first generated token is even."""
    return float(bool(response) and response[0] % 2 == 0)


# ---- the loss -------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, [2, 2, 4])
    # group 1: mean 0.5, std 0.5 -> +-1; group 2: constant -> 0; group 3: mean .25, std sqrt(3)/4
    s = math.sqrt(3) / 4
    expected = torch.tensor([1.0, -1.0, 0.0, 0.0, -0.25 / s, -0.25 / s, -0.25 / s, 0.75 / s])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        group_advantages(rewards, [2, 2, 4], scale_rewards=False),
        torch.tensor([0.5, -0.5, 0.0, 0.0, -0.25, -0.25, -0.25, 0.75]),
    )
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(rewards, [2, 2])


def test_grpo_loss_by_hand():
    # one group of two rows; row 0 has advantage +1 and two tokens, row 1 advantage -1 and one token
    log_probs = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), 0.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True], [True, False]])
    out = grpo_loss(log_probs, old, adv, mask, GRPOLossConfig(clip_low=0.2, clip_high=0.28))
    # token (0,0): ratio 1.5 clipped to 1.28 -> -1.28 (no gradient); (0,1): ratio 0.5, min(0.5, 0.8) -> -0.5;
    # (1,0): ratio 1.1, A=-1: min(-1.1, -1.1) -> +1.1; token-level mean over 3 tokens
    assert out["loss"].item() == pytest.approx((-1.28 - 0.5 + 1.1) / 3, abs=1e-6)
    assert out["clip_fraction"].item() == pytest.approx(1 / 3)
    out["loss"].backward()
    # d/dlogp of -ratio*A = -ratio*A (ratio = exp(logp - old)); clipped token: 0; masked token: 0
    torch.testing.assert_close(log_probs.grad, torch.tensor([[0.0, -0.5 / 3], [1.1 / 3, 0.0]]))


def test_grpo_loss_kl_and_global_token_count():
    log_probs = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = grpo_loss(log_probs, log_probs, torch.zeros(1), mask, GRPOLossConfig(beta=0.5), ref, total_tokens=4.0)
    kl = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]
    assert out["kl"].item() == pytest.approx(sum(kl) / 2)
    assert out["loss"].item() == pytest.approx(0.5 * sum(kl) / 4.0)
    with pytest.raises(ValueError, match="ref_log_probs"):
        grpo_loss(log_probs, log_probs, torch.zeros(1), mask, GRPOLossConfig(beta=0.5))


# ---- teacher-forced log-probs equal what generation sampled from ----------------------------------------------------
@pytest.mark.parametrize("bridged", [True, False])
def test_token_log_probs_match_generation(bridged):
    model = bridged_model() if bridged else tiny_model()
    torch.manual_seed(3)
    result = bridge_ops.generate(
        model, PROMPTS[:3], [3, 1, 2], 6, eos_token_id=EOS, pad_token_id=PAD, return_log_probs=True
    )
    batch = grouped_batch(PROMPTS[:3], result.sequences, PAD)
    with torch.no_grad():
        per_token = token_log_probs(model, batch)
    sums = per_token.double().sum(1)
    expected = torch.tensor([lp for group in result.log_probs for lp in group], dtype=torch.float64)
    torch.testing.assert_close(sums, expected, atol=1e-4, rtol=1e-4)
    assert batch.response_mask.sum(1).tolist() == [len(s) for g in result.sequences for s in g]


def test_gradients_cross_group_members_but_not_groups():
    """Row 0's loss reaches row 1 (same group) through Bridge, never rows 2-3 (another group); none without Bridge."""
    responses = [[[3, 4, 5], [6, 7, EOS]], [[8, 9, 10], [11, EOS]]]
    batch = grouped_batch(PROMPTS[:2], responses, PAD)
    for model, crosses in ((bridged_model(), True), (tiny_model(), False)):
        captured = {}

        def keep(module, args, output):
            output.retain_grad()
            captured["embeds"] = output  # noqa: B023 (the hook is removed within this iteration)

        hook = model.get_input_embeddings().register_forward_hook(keep)
        token_log_probs(model, batch)[0].sum().backward()
        hook.remove()
        grad = captured["embeds"].grad.abs().sum(dim=(1, 2))
        assert grad[0] > 0
        assert (grad[1] > 0) == crosses
        assert grad[2:].eq(0).all()


# ---- SFT, GRPO, resume -----------------------------------------------------------------------------------------
def _named_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sft_with_frozen_base_changes_only_bridge_weights():
    model = bridge_ops.apply_bridge(tiny_model(), d_bridge=16, num_heads=2)
    before = _named_state(model)
    groups = [(PROMPTS[0], [[3, 4, EOS], [3, 5, EOS]]), (PROMPTS[1], [[6, EOS], [6, EOS], [7, EOS]])]
    history = train_sft(
        model,
        groups,
        SFTConfig(steps=3, lr=1e-2, groups_per_step=2, progress=False),
        trainable=select_trainable(model, "bridge"),
    )
    assert history[-1]["loss"] < history[0]["loss"]
    after = _named_state(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".bridge." in n for n in changed)
    assert any("o_proj" in n for n in changed)  # the zero-initialized output projection left zero


def _grpo_config(**kw):
    settings = dict(
        steps=4,
        lr=1e-2,
        width=3,
        prompts_per_step=2,
        max_new_tokens=4,
        progress=False,
        loss=GRPOLossConfig(beta=0.1),
        minibatches=2,
    )
    settings.update(kw)
    return GRPOConfig(**settings)


def test_grpo_trains_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = bridged_model()
    history = train_grpo(straight, PROMPTS, reward_even_first, _grpo_config(), eos_token_id=EOS)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) for h in history) and any(h["grad_norm"] > 0 for h in history)

    resumed = bridged_model()
    train_grpo(resumed, PROMPTS, reward_even_first, _grpo_config(steps=2, out_dir=str(tmp_path)), eos_token_id=EOS)
    assert (tmp_path / "checkpoint.pt").exists() and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    fresh = bridged_model()  # a new process would start from the same initial model
    train_grpo(fresh, PROMPTS, reward_even_first, _grpo_config(steps=4, out_dir=str(tmp_path)), eos_token_id=EOS)
    for name, p in straight.named_parameters():
        assert torch.equal(p, dict(fresh.named_parameters())[name]), name


def test_grpo_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple"):
        train_grpo(bridged_model(), PROMPTS, reward_even_first, _grpo_config(prompts_per_step=3), eos_token_id=EOS)
    with pytest.raises(ValueError, match="prompts_per_step"):
        train_grpo(bridged_model(), PROMPTS, reward_even_first, _grpo_config(prompts_per_step=8), eos_token_id=EOS)


def test_collect_correct_groups_keeps_prompts_with_two_correct():
    groups = collect_warmup_groups(
        bridged_model(),
        PROMPTS,
        6,
        "correct",
        reward_fn=reward_even_first,
        max_new_tokens=3,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    assert groups
    for prompt, responses, masks in groups:
        assert prompt in PROMPTS and len(responses) >= 2 and masks is None
        assert all(reward_even_first(0, r) == 1.0 for r in responses)


def test_generators_make_a_prompts_samples_independent_of_the_batch():
    model = bridged_model()

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    both = bridge_ops.generate(model, PROMPTS[:2], 3, 5, generators=gens([7, 8]), eos_token_id=EOS)
    alone = bridge_ops.generate(model, PROMPTS[1:2], 3, 5, generators=gens([8]), eos_token_id=EOS)
    assert both.sequences[1] == alone.sequences[0]
    with pytest.raises(ValueError, match="generators"):
        bridge_ops.generate(model, PROMPTS[:2], 3, 5, generators=gens([7]))


# ---- the parameter-matched baseline and evaluation ---------------------------------------------------------------
def test_parameter_matched_mlp_matches_bridge_count_and_starts_at_zero():
    base = tiny_model()
    ids = torch.tensor([PROMPTS[0]])
    expected = base(input_ids=ids).logits
    bridged = bridge_ops.apply_bridge(tiny_model(), d_bridge=16, num_heads=2)
    matched = apply_parameter_matched_mlp(tiny_model(), d_bridge=16)
    count = sum(p.numel() for p in select_trainable(matched, "pmatch").values())
    assert count == bridge_ops.parameter_share(bridged)["bridge_parameters"]
    torch.testing.assert_close(matched(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="already"):
        apply_parameter_matched_mlp(matched, d_bridge=16)
    with pytest.raises(ValueError, match="no bridge parameters"):
        select_trainable(tiny_model(), "bridge")


def test_parameter_matched_mlp_is_removable_like_bridge_and_stacks_with_it():
    import copy

    model, other = tiny_model(), tiny_model()
    names = set(model.state_dict())
    ids = torch.tensor([PROMPTS[0]])
    apply_parameter_matched_mlp(model, d_bridge=16)
    bridge_ops.apply_bridge(model, d_bridge=16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.pmatch.down.weight.normal_()
        copied = copy.deepcopy(model)  # the patched forwards are bound to the copy's layers, not the original's
        for layer in model.model.layers:
            layer.pmatch.down.weight.zero_()
        with bridge_ops.groups(model, width=1), bridge_ops.groups(copied, width=1):
            assert not torch.equal(copied(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="remove those first"):
        remove_parameter_matched_mlp(model)  # Bridge wraps the P-Match blocks: it comes out first
    bridge_ops.remove_bridge(model)
    remove_parameter_matched_mlp(model)
    assert set(model.state_dict()) == names
    assert all("forward" not in vars(layer) and not hasattr(layer, "pmatch") for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no `pmatch` blocks"):
        remove_parameter_matched_mlp(model)


def test_evaluate_widths_counts_by_hand(monkeypatch):
    import bridge_ops.train.data as data_module  # evaluate_widths samples through data.rollout -> generate

    samples = {0: [[4], [5], [5]], 1: [[4], [4], [4]]}  # the responses each prompt gets, in order

    def fake_generate(model, prompts, width, max_new_tokens=None, **kwargs):
        index = {tuple(p): i for i, p in enumerate(PROMPTS)}
        sequences = [samples[index[tuple(p)]][:width] for p in prompts]
        return bridge_ops.GenerationOutput(sequences, None, 0, 1.0)

    monkeypatch.setattr(data_module, "generate", fake_generate)
    answers = ["4", "4"]
    results = evaluate_widths(
        tiny_model(), PROMPTS[:2], lambda i, r: float(str(r[0]) == answers[i]), lambda r: str(r[0]), answers, (1, 2, 3)
    )
    by_width = {r["width"]: r for r in results}
    assert by_width[1] == {
        "width": 1,
        "peers": "group",
        "mean_accuracy": 1.0,
        "all_correct": 1.0,
        "any_correct": 1.0,
        "majority_accuracy": 1.0,
        "distinct_correct": 1.0,
    }
    # width 2: prompt 0 gets 4, 5 (tie: the first answer wins the vote), prompt 1 gets 4, 4
    assert by_width[2] == {
        "width": 2,
        "peers": "group",
        "mean_accuracy": 0.75,
        "all_correct": 0.5,
        "any_correct": 1.0,
        "majority_accuracy": 1.0,
        "distinct_correct": 1.0,
    }
    # width 3: prompt 0 votes 5 (two of three)
    assert by_width[3] == {
        "width": 3,
        "peers": "group",
        "mean_accuracy": 4 / 6,
        "all_correct": 0.5,
        "any_correct": 1.0,
        "majority_accuracy": 0.5,
        "distinct_correct": 1.0,
    }


def test_train_method_depends_on_its_seed_not_on_the_global_rng():
    """The added blocks' initialization follows MethodSpec.seed: a run does not depend on torch's global RNG state."""
    from bridge_ops.charlm import char_tokenizer, tiny_causal_lm
    from bridge_ops.tasks import ArithmeticTask
    from bridge_ops.train import task_data
    from bridge_ops.train.recipes import MethodSpec, train_method

    task = ArithmeticTask(max_operand=9)
    tok = char_tokenizer(task.alphabet)
    train = task_data(task, tok, "train", 32)
    base = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    spec = MethodSpec(seed=3, d_bridge=8)
    spec.grpo.steps, spec.grpo.prompts_per_step, spec.grpo.width = 1, 4, 2
    models = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        models.append(train_method(base, "bridge", train, spec, progress=False)[0])
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("trains", ["added", "all"])
def test_warmup_trains_the_added_blocks_or_every_parameter(trains):
    from bridge_ops.charlm import char_tokenizer, tiny_causal_lm
    from bridge_ops.tasks import ArithmeticTask
    from bridge_ops.train import task_data
    from bridge_ops.train.recipes import MethodSpec, train_method

    task = ArithmeticTask(max_operand=9)
    tok = char_tokenizer(task.alphabet)
    train = task_data(task, tok, "train", 16)
    train.reward = lambda index, response: 1.0  # every sample is "correct": the warm-up has data
    base = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    spec = MethodSpec(d_bridge=8, warmup_prompts=8, warmup_trains=trains)
    spec.warmup.steps, spec.warmup.groups_per_step = 2, 4
    spec.grpo.steps, spec.grpo.prompts_per_step, spec.grpo.width = 1, 4, 2
    after_warmup = {}

    def on_stage(stage, model):
        after_warmup.update({n: p.detach().clone() for n, p in model.named_parameters()})

    train_method(base, "bridge-distinct", train, spec, progress=False, on_stage=on_stage)
    moved = {n for n, p in base.named_parameters() if not torch.equal(p, after_warmup[n])}
    assert bool(moved) == (trains == "all")
    assert any(
        not torch.equal(p, torch.zeros_like(p)) for n, p in after_warmup.items() if "o_proj" in n and "bridge" in n
    )
    with pytest.raises(ValueError, match="warmup_trains"):
        train_method(base, "bridge-distinct", train, MethodSpec(warmup_trains="base"), progress=False)


def test_grpo_with_a_warmup_trains_every_parameter_and_needs_warmup_trains_all():
    """`grpo-correct`: the independent baseline with a warm-up (rejection-sampling fine-tuning, then GRPO)."""
    from bridge_ops.charlm import char_tokenizer, tiny_causal_lm
    from bridge_ops.tasks import ArithmeticTask
    from bridge_ops.train import task_data
    from bridge_ops.train.recipes import MethodSpec, parse_method, train_method

    assert parse_method("grpo-correct") == ("grpo", "correct")
    with pytest.raises(ValueError, match="warm-up one of"):
        parse_method("grpo-sloppy")
    task = ArithmeticTask(max_operand=9)
    tok = char_tokenizer(task.alphabet)
    train = task_data(task, tok, "train", 16)
    train.reward = lambda index, response: 1.0
    base = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    spec = MethodSpec(warmup_prompts=8)
    spec.warmup.steps, spec.warmup.groups_per_step = 2, 4
    spec.grpo.steps, spec.grpo.prompts_per_step, spec.grpo.width = 1, 4, 2
    with pytest.raises(ValueError, match="warmup_trains='all'"):
        train_method(base, "grpo-correct", train, spec, progress=False)
    spec.warmup_trains = "all"
    after_warmup = {}
    model, log = train_method(
        base,
        "grpo-correct",
        train,
        spec,
        progress=False,
        on_stage=lambda stage, m: after_warmup.update({n: p.detach().clone() for n, p in m.named_parameters()}),
    )
    assert log["warmup_groups"][0]["groups"] > 0 and "pmatch" not in str(list(model.state_dict()))
    assert all(not torch.equal(p, after_warmup[n]) for n, p in base.named_parameters() if n.endswith("q_proj.weight"))


# ---- warm-up modes, loss masks, learning-rate groups, group rewards ---------------------------------------------
def test_grouped_batch_loss_masks_select_the_loss_tokens():
    responses = [[[3, 4, EOS], [5, 6, 7, EOS]], [[8, EOS]]]
    masks = [[[False, True, True], None], None]
    batch = grouped_batch(PROMPTS[:2], responses, PAD, loss_masks=masks)
    assert batch.loss_mask.tolist() == [[False, True, True, False], [True] * 4, [True, True, False, False]]
    assert torch.equal(batch.response_mask & batch.loss_mask, batch.loss_mask)
    model = bridged_model()
    with torch.no_grad():
        per_token = token_log_probs(model, batch)
    expected = -(per_token * batch.loss_mask).sum() / batch.loss_mask.sum()
    assert bridge_ops.train.sft_loss(per_token, batch.loss_mask).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="loss mask"):
        grouped_batch(PROMPTS[:1], [[[3, EOS]]], PAD, loss_masks=[[[True]]])


def test_distinct_warmup_removes_duplicates_and_repair_keeps_wrong_rows_with_answer_loss():
    model = bridged_model()
    kwargs = dict(max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD, min_correct=1)
    correct = collect_warmup_groups(model, PROMPTS, 8, "correct", reward_fn=lambda i, r: 1.0, **kwargs)
    distinct = collect_warmup_groups(model, PROMPTS, 8, "distinct", reward_fn=lambda i, r: 1.0, **kwargs)
    assert [g.prompt for g in correct] == [g.prompt for g in distinct]
    for c, d in zip(correct, distinct):
        assert len(d.responses) == len({tuple(r) for r in c.responses}) and all(r in c.responses for r in d.responses)

    def repair(index, response):  # "chain" = the first token, right when even; the correct answer is token 9
        ok = response[0] % 2 == 0
        return [response[0], 9, EOS], [ok, True, True], ok

    groups = collect_warmup_groups(model, PROMPTS, 6, "repair", repair_fn=repair, **kwargs)
    assert groups
    for g in groups:
        rights = [m[0] for m in g.loss_masks]
        assert any(rights) and all(r[-2:] == [9, EOS] for r in g.responses)
        for response, mask in zip(g.responses, g.loss_masks):
            assert len(mask) == len(response) and mask[-2:] == [True, True]
            assert all(mask) == (response[0] % 2 == 0)
    with pytest.raises(ValueError, match="repair_fn"):
        collect_warmup_groups(model, PROMPTS, 2, "repair")

    seen = []

    def rank(index, responses):  # keeps the responses whose first token is even, in reverse order
        seen.append(responses)
        return [r for r in reversed(responses) if r[0] % 2 == 0]

    ranked = collect_warmup_groups(model, PROMPTS, 8, "ranked", reward_fn=lambda i, r: 1.0, rank_fn=rank, **kwargs)
    assert len(seen) == len(PROMPTS) and all(len({tuple(r) for r in group}) == len(group) for group in seen)
    kept = [d for d in distinct if any(r[0] % 2 == 0 for r in d.responses)]
    assert [g.responses for g in ranked] == [[r for r in reversed(d.responses) if r[0] % 2 == 0] for d in kept]
    with pytest.raises(ValueError, match="reward_fn and rank_fn"):
        collect_warmup_groups(model, PROMPTS, 2, "ranked", reward_fn=reward_even_first)
    with pytest.raises(ValueError, match="warm-up mode"):
        collect_warmup_groups(model, PROMPTS, 2, "best", reward_fn=reward_even_first)


def test_one_sample_set_builds_the_groups_of_every_mode_as_collect_does():
    """warmup_groups_of over samples drawn once equals collect_warmup_groups (same seed) for each mode, so one
    sample set can feed an independent method's "correct" warm-up and Bridge's "repair" one."""
    from bridge_ops.train import rollout, warmup_groups_of
    from bridge_ops.train.data import TASK_SAMPLING

    model = bridged_model()
    sampling = TASK_SAMPLING.updated(max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD)
    samples = rollout(model, PROMPTS, list(range(len(PROMPTS))), 6, None, (0, 0), sampling=sampling)

    def repair(index, response):
        ok = response[0] % 2 == 0
        return [response[0], 9, EOS], [ok, True, True], ok

    functions = dict(reward_fn=reward_even_first, repair_fn=repair)
    for mode in ("correct", "distinct", "repair"):
        collected = collect_warmup_groups(model, PROMPTS, 6, mode, sampling=sampling, min_correct=1, **functions)
        assert warmup_groups_of(PROMPTS, samples, mode, min_correct=1, **functions) == collected
    with pytest.raises(ValueError, match="repair_fn"):
        warmup_groups_of(PROMPTS, samples, "repair", reward_fn=reward_even_first)


def test_sft_warns_about_identical_rows_and_trains_only_loss_tokens():
    model = bridge_ops.apply_bridge(tiny_model(), d_bridge=16, num_heads=2)
    same = [(PROMPTS[0], [[3, 4, EOS], [3, 4, EOS]])]
    with pytest.warns(UserWarning, match="1 of 1 SFT groups have identical rows"):
        train_sft(
            model,
            same,
            SFTConfig(steps=1, groups_per_step=1, progress=False),
            trainable=select_trainable(model, "bridge"),
        )
    # a loss mask with nothing on the first response token: its logit row gets no gradient
    masked = [bridge_ops.train.Group(PROMPTS[0], [[3, 4, EOS], [5, 6, EOS]], [[False, True, True]] * 2)]
    batch = grouped_batch([masked[0].prompt], [masked[0].responses], PAD, [masked[0].loss_masks])
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["logits"] = out

    hook = model.lm_head.register_forward_hook(keep)
    model.requires_grad_(True)
    bridge_ops.train.sft_loss(token_log_probs(model, batch), batch.loss_mask).backward()
    hook.remove()
    grad = captured["logits"].grad.abs().sum(-1)  # [R, positions from the last prompt token]
    assert grad[:, 0].eq(0).all() and grad[:, 1].gt(0).all()


def test_repair_rows_of_the_scratchpad_task():
    from bridge_ops.charlm import char_tokenizer
    from bridge_ops.tasks import ScratchpadSumTask
    from bridge_ops.train import task_data

    task = ScratchpadSumTask()
    tok = char_tokenizer(task.alphabet)
    data = task_data(task, tok, "test", 2)
    right = data.encode(task.references(data.problems[0])[0])
    ids, mask, ok = data.repair(0, right)
    assert ids == right and all(mask) and ok
    wrong_text = task.references(data.problems[0])[0][:-5] + "9>" + "9" * task.digits  # last sum digit changed
    ids, mask, ok = data.repair(0, data.encode(wrong_text))
    assert not ok and data.text(ids).endswith(">" + data.problems[0].answer)
    assert mask == [False] * (len(ids) - task.digits - 1) + [True] * (task.digits + 1)  # the answer and EOS
    assert data.repair(0, data.encode("123")) is None


def test_added_blocks_get_their_own_learning_rate():
    from bridge_ops.train.trainer import parameter_groups

    model = bridge_ops.apply_bridge(tiny_model(), d_bridge=16, num_heads=2)
    trainable = select_trainable(model, "all")
    groups = parameter_groups(trainable, 1e-3, 10.0)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert all(any(p is q for q in groups[1]["params"]) for n, p in trainable.items() if ".bridge." in n)
    assert len(parameter_groups(select_trainable(model, "bridge"), 1e-3, 10.0)) == 1
    with pytest.raises(ValueError, match="added_lr_mult"):
        parameter_groups(trainable, 1e-3, 0.0)


def test_group_reward_and_several_groups_per_prompt():
    calls = []

    def distinct_first(index, responses):  # rewards a response whose first token no peer shares
        calls.append(len(responses))
        firsts = [r[0] for r in responses]
        return [float(firsts.count(f) == 1) for f in firsts]

    config = _grpo_config(steps=2, groups_per_prompt=2, loss=GRPOLossConfig(), minibatches=1)
    history = train_grpo(
        bridged_model(), PROMPTS, bridge_ops.train.GroupReward(distinct_first), config, eos_token_id=EOS
    )
    assert calls == [3] * (2 * 2 * 2)  # steps x prompts x groups, each scored as one group of width 3
    assert all(0.0 <= h["zero_advantage"] <= 1.0 and math.isfinite(h["loss"]) for h in history)
    with pytest.raises(ValueError, match="rewards for"):
        train_grpo(bridged_model(), PROMPTS, bridge_ops.train.GroupReward(lambda i, r: [1.0]), config, eos_token_id=EOS)


def test_rollout_copies_and_solo_peers():
    from bridge_ops.train import rollout

    model = bridged_model()
    groups = rollout(model, PROMPTS, [0, 2], 3, 4, (5,), copies=2, eos_token_id=EOS, pad_token_id=PAD)
    assert len(groups) == 4 and all(len(g) == 3 for g in groups)
    again = rollout(model, PROMPTS, [2], 3, 4, (5,), copies=2, eos_token_id=EOS, pad_token_id=PAD)
    assert again == groups[2:]  # a prompt's groups do not depend on the batch
    solo = rollout(model, PROMPTS, [0, 2], 3, 4, (5,), peers="solo", eos_token_id=EOS, pad_token_id=PAD)
    assert len(solo) == 2 and all(len(g) == 3 for g in solo)
    with pytest.raises(ValueError, match="peers"):
        rollout(model, PROMPTS, [0], 3, 4, (5,), peers="alone")


# ---- arguments refused before training ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("beta", math.nan, "beta must be a finite number >= 0, got nan"),
        ("beta", -1.0, "beta must be a finite number >= 0, got -1.0"),
        ("clip_high", math.inf, "clip_high must be a finite number >= 0, got inf"),
        ("clip_low", 1.5, "clip_low must be <= 1"),
    ],
)
def test_grpo_loss_coefficients_must_be_finite_and_in_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        GRPOLossConfig(**{field: value})
    with pytest.raises(ValueError, match="loss must be a GRPOLossConfig"):
        GRPOConfig(loss={"beta": 0.1})


def test_sft_refuses_token_ids_outside_the_vocabulary_and_a_missing_pad_token():
    from hf_models import VOCAB

    model = bridged_model()
    config = SFTConfig(steps=1, groups_per_step=1, progress=False)
    with pytest.raises(ValueError, match=f"group 0's response 1 holds token id {VOCAB} at position 1, outside"):
        train_sft(model, [(PROMPTS[0], [[3, 4, EOS], [3, VOCAB, EOS]])], config)
    with pytest.raises(TypeError, match="token 0 of group 0's prompt must be an integer, got 1.5"):
        train_sft(model, [([1.5, 5], [[3, EOS]])], config)
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id is None and the model's config has no pad_token_id"):
        train_sft(model, [(PROMPTS[0], [[3, 4, EOS], [5, EOS]])], config, pad_token_id=None)


def test_the_identical_rows_warning_is_true_for_every_warm_up():
    """Repair groups can have identical rows too (every sample wrote the same chain): the warning states what those
    groups do not train and suggests no warm-up (the run may already use the one it would suggest)."""
    model = bridge_ops.apply_bridge(tiny_model(), d_bridge=16, num_heads=2)
    repair_like = [(PROMPTS[0], [[3, 4, EOS], [3, 4, EOS]]), (PROMPTS[1], [[3, 4, EOS], [5, 4, EOS]])]
    with pytest.warns(UserWarning) as warned:
        train_sft(model, repair_like, SFTConfig(steps=1, groups_per_step=2, progress=False))
    message = str(warned[0].message)
    assert "1 of 2 SFT groups have identical rows" in message and "only groups whose rows differ train them" in message
    assert "'repair'" not in message


@pytest.mark.guarantee
@pytest.mark.parametrize("bad", [NAN, INF, None, "1"], ids=["nan", "inf", "None", "str"])
def test_grpo_refuses_a_reward_that_is_not_a_finite_number(bad):
    from hf_models import EOS, bridged_model

    from bridge_ops.train import GRPOConfig, train_grpo

    model = bridged_model()
    before = named_params(model)
    config = GRPOConfig(steps=1, width=3, prompts_per_step=2, max_new_tokens=2, progress=False)
    chosen = []

    def reward(index, response):
        chosen.append(index)
        return bad if len(chosen) == 5 else 1.0  # the second group's second member

    with pytest.raises(
        ValueError, match=f"reward_fn returned {bad!r} for prompt {{}} \\(response 1\\)".replace("{}", r"\d")
    ):
        train_grpo(model, PROMPTS, reward, config, eos_token_id=EOS)
    assert_same_params(model, before)


@pytest.mark.guarantee
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


@pytest.mark.guarantee
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
        train_grpo(bridged_model(), PROMPTS, lambda i, r: 1.0, config)


@pytest.mark.guarantee
def test_sft_config_set_after_construction_is_checked_when_training_starts():
    from hf_models import bridged_model

    from bridge_ops.train import SFTConfig, train_sft

    config = SFTConfig(progress=False)
    config.steps = 0
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        train_sft(bridged_model(), [(PROMPTS[0], [[3, 2]])], config)
