"""The interdependence diagnostics: peers vs solo, attention statistics, Q/K gradients of identical rows, the
independence bound and the paired bootstrap, each against a hand computation or a case whose answer is known."""

import itertools
import math

import pytest
import torch
from hf_models import EOS, PAD, bridged_model, tiny_model

import bridge_ops
from bridge_ops.train import (
    answer_loss,
    attention_stats,
    bridge_gradient_norms,
    grouped_batch,
    independence_bound,
    paired_bootstrap,
    peer_kl,
    rollout,
    token_log_probs,
)

PROMPTS = [[1, 5, 6, 7], [1, 9, 10]]
RESPONSES = [[[3, 4, 5, EOS], [6, 7, EOS], [8, 9, 10, 11]], [[12, 13, EOS], [14, EOS]]]


def test_independence_bound_by_hand_and_by_enumeration():
    # 4 samples: a, a, b, x (x not counted: not a correct answer); width 2 -> C(4,2) = 6 pairs
    # a is missed by C(2,2) = 1 pair, b by C(3,2) = 3 pairs: 5/6 + 3/6 = 4/3
    assert independence_bound({"a": 2, "b": 1}, samples=4, width=2) == pytest.approx(4 / 3)
    samples = ["a", "a", "b", "x"]
    subsets = list(itertools.combinations(samples, 2))
    mean = sum(len({s for s in subset if s in ("a", "b")}) for subset in subsets) / len(subsets)
    assert mean == pytest.approx(4 / 3)
    # many samples: the estimate approaches sum_k 1 - (1 - p_k)^N
    assert independence_bound({"a": 5000, "b": 2500}, samples=10000, width=4) == pytest.approx(
        (1 - 0.5**4) + (1 - 0.75**4), abs=1e-3
    )
    assert independence_bound({"a": 3}, samples=3, width=3) == 1.0
    with pytest.raises(ValueError, match="needs at least"):
        independence_bound({"a": 1}, samples=2, width=4)


def test_paired_bootstrap():
    constant = paired_bootstrap([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert constant["mean"] == pytest.approx(0.5) and constant["low"] == pytest.approx(0.5)
    assert constant["high"] == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(400, generator=gen).tolist()
    ci = paired_bootstrap(noise, [0.0] * 400)
    assert ci["low"] < ci["mean"] < ci["high"] and ci["high"] - ci["low"] == pytest.approx(2 * 1.96 / 20, rel=0.25)
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0], [])


def test_solo_equals_each_row_alone_and_a_fresh_bridge_has_no_peer_effect():
    batch = grouped_batch(PROMPTS, RESPONSES, PAD)
    trained = bridged_model()
    with torch.no_grad():
        solo = token_log_probs(trained, batch.solo())
        together = token_log_probs(trained, batch)
        rows = [(PROMPTS[g], r) for g, group in enumerate(RESPONSES) for r in group]
        for i, (prompt, response) in enumerate(rows):  # a row alone in its own batch (left padding aside)
            alone = token_log_probs(trained, grouped_batch([prompt], [[response]], PAD))[0, : len(response)]
            torch.testing.assert_close(solo[i, : len(response)], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(solo, together)
    kl = peer_kl(trained, batch)
    assert kl["kl"] > 1e-4 and kl["tokens"] == sum(len(r) - 1 for _, r in rows)
    fresh = bridge_ops.apply_bridge(tiny_model(), d_bridge=32, num_heads=2)  # zero output projection
    assert peer_kl(fresh, batch) == {"kl": 0.0, "argmax_changed": 0.0, "tokens": kl["tokens"]}
    losses = answer_loss(fresh, batch)
    assert losses["with_peers"] == losses["solo"]


def test_solo_rollout_on_a_fresh_bridge_equals_width_one_samples():
    """Solo rows are drawn exactly as width-1 groups would be (same generators); on a fresh Bridge the peers change
    nothing, so the with-peers samples of a group of one equal them too."""
    fresh = bridge_ops.apply_bridge(tiny_model(), d_bridge=32, num_heads=2)
    solo = rollout(fresh, PROMPTS, [0, 1], 3, 5, (2,), peers="solo", eos_token_id=EOS, pad_token_id=PAD)
    for p, group in enumerate(solo):
        for m, sample in enumerate(group):
            generator = torch.Generator().manual_seed(bridge_ops.train.trainer.seed_of(2, p, "solo", m))
            alone = bridge_ops.generate(
                fresh, [PROMPTS[p]], 1, 5, generators=[generator], eos_token_id=EOS, pad_token_id=PAD
            )
            assert alone.sequences[0][0] == sample


def test_attention_stats_uniform_without_queries_and_peaked_with_large_ones():
    batch = grouped_batch(PROMPTS, RESPONSES, PAD)
    model = bridged_model()
    with torch.no_grad():
        for block in bridge_ops.hf.bridge_blocks(model):
            block.q_proj.weight.zero_()
    stats = attention_stats(model, batch)
    assert stats["entropy_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert stats["self_weight_ratio"] == pytest.approx(1.0, abs=1e-5)
    # (row, response position) pairs where the row sees >= 2 keys: group 0 (lengths 4, 3, 4) 3 + 3 + 3 + 2 (at the
    # last position row 1 has ended), group 1 (lengths 3, 2) 2 + 2 (then row 0 is alone)
    assert stats["queries"] == 3 + 3 + 3 + 2 + 2 + 2
    with torch.no_grad():
        for block in bridge_ops.hf.bridge_blocks(model):
            block.q_proj.weight.copy_(block.k_proj.weight * 50)  # q = 50 k: each row mostly attends to itself
    peaked = attention_stats(model, batch)
    assert peaked["entropy_ratio"] < 0.5 and peaked["self_weight_ratio"] > 1.2


def test_identical_rows_give_bridge_queries_and_keys_no_gradient():
    """The audit's finding: Bridge over identical rows returns v whatever the scores, so Q and K learn nothing."""
    model = bridged_model()
    same = grouped_batch(PROMPTS[:1], [[[3, 4, 5, EOS]] * 4], PAD)
    different = grouped_batch(PROMPTS[:1], [[[3, 4, 5, EOS], [6, 7, 8, EOS], [3, 9, 5, EOS], [10, 4, 5, EOS]]], PAD)
    flat, varied = bridge_gradient_norms(model, same), bridge_gradient_norms(model, different)
    assert flat["v"] > 1e-3 and flat["o"] > 1e-3
    assert flat["q"] < 1e-6 * flat["v"] and flat["k"] < 1e-6 * flat["v"]
    assert varied["q"] > 1e-3 * varied["v"] and varied["k"] > 1e-3 * varied["v"]
    assert math.isfinite(sum(varied.values()))
