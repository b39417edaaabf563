"""BridgeGRPOTrainer with the real TRL: whole groups in every forward (rollout, old/reference log-probs, loss,
gradient-checkpointing recompute, two ranks), rollout equal to training (on-policy), TRL's log-probs equal to
`bridge_ops.train.token_log_probs`, gradients within groups only, KL 0 at the first step, saving, refusals.

One instrumented run serves most tests: 8 prompts x 4 samples, per-device batch 8 (two groups per micro-batch),
gradient accumulation 2, steps_per_generation 4, num_iterations 2 (so TRL computes old log-probs), beta 0.1,
gradient checkpointing on (TRL's default), 4 optimizer steps, then an evaluation on 2 other prompts.
"""

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl", reason="bridge_ops[trl] is not installed")

from trl_worker import PROMPTS, WIDTH, bridged_tiny_model, grpo_config, make_trainer, reward  # noqa: E402

import bridge_ops  # noqa: E402
from bridge_ops.integrations.trl import BridgeGRPOTrainer, shuffle_groups  # noqa: E402
from bridge_ops.train import grouped_batch, token_log_probs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("trl"))
    trainer = make_trainer(
        directory,
        eval_prompts=["8+1=", "2+9="],
        per_device_train_batch_size=2 * WIDTH,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        num_iterations=2,
        max_steps=4,
        beta=0.1,
        save_strategy="steps",
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        per_device_eval_batch_size=2 * WIDTH,
    )
    initial = [p.detach().clone() for p in bridge_ops.bridge_parameters(trainer.model)]
    trainer.train()
    trainer.initial_bridge = initial
    return trainer


def trl_log_probs(trainer, batch):
    """TRL's per-token log-probs of a micro-batch, as its loss computes them (inside the trainer's groups)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad(), trainer._whole_groups(WIDTH):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, batch["completion_ids"].shape[1]
        )
    return logps


def test_every_forward_holds_whole_groups_of_one_prompt(run):
    policy, reference = run.recorders
    seen = policy.check_whole_groups(WIDTH, layers=2)
    assert seen["rollout_forwards"] > 1 and seen["training_forwards"] == 8  # 4 steps x 2 micro-batches
    assert seen["recomputed_forwards"] == 8  # each loss forward's layers ran again in the backward
    assert reference.check_whole_groups(WIDTH, layers=2)["forwards"] == 4 + 1  # 32 rows in chunks of 8, eval's 8
    assert len(run.generation_batches) == 2 and len(run.micro_batches) == 8 + 1  # training, then evaluation
    order = [policy.prompt_of(row) for row in run.generation_batches[0]["prompt_ids"].tolist()]
    shuffled = [policy.prompt_of(row) for batch in run.micro_batches[:4] for row in batch["prompt_ids"].tolist()]
    assert shuffled != order and sorted(shuffled) == sorted(order)  # whole groups moved, rows did not


def test_rollout_log_probs_equal_the_training_forward(run):
    """On-policy: the log-probs of the sampled tokens under the rollout's logits equal TRL's old log-probs (a
    training-style forward over the finished completions), also after a peer's EOS."""
    batch = run.generation_batches[0]
    steps = torch.stack(run.recorders[0].rollout_logits[0], dim=1)  # [B, steps, vocab]
    tokens, mask = batch["completion_ids"], batch["completion_mask"].bool()
    rollout = torch.log_softmax(steps[:, : tokens.shape[1]], dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    lengths = mask.sum(1).view(-1, WIDTH)
    assert ((lengths.min(1).values < lengths.max(1).values) & (lengths.min(1).values < 10)).any()  # peers finish early
    error = (rollout - batch["old_per_token_logps"])[mask].abs().max().item()
    assert error < 1e-5, error


def test_trl_log_probs_equal_token_log_probs_and_stay_within_groups(run):
    batch = run.micro_batches[0]
    logps = trl_log_probs(run, batch)
    pad = run.processing_class.pad_token_id
    prompts = [
        [t for t, m in zip(ids, mask) if m]
        for ids, mask in zip(batch["prompt_ids"][::WIDTH].tolist(), batch["prompt_mask"][::WIDTH].tolist())
    ]
    completions = [
        [t for t, m in zip(ids, mask) if m]
        for ids, mask in zip(batch["completion_ids"].tolist(), batch["completion_mask"].tolist())
    ]
    grouped = grouped_batch(prompts, [completions[g : g + WIDTH] for g in range(0, len(completions), WIDTH)], pad)
    with torch.no_grad():
        ours = token_log_probs(run.model, grouped, temperature=run.temperature)
    mask = batch["completion_mask"][:, : ours.shape[1]].bool()
    error = (ours - logps[:, : ours.shape[1]])[mask].abs().max().item()
    assert error < 1e-5, error

    edited = dict(batch, completion_ids=batch["completion_ids"].clone())
    edited["completion_ids"][0, 0] = (edited["completion_ids"][0, 0] + 1) % len(run.processing_class)
    changed = (trl_log_probs(run, edited) - logps).abs().amax(dim=1)
    assert changed[1:WIDTH].min() > 1e-4  # every peer of the edited row reads it through Bridge
    assert torch.equal(changed[WIDTH:], torch.zeros(len(changed) - WIDTH))  # the other group does not


def test_every_bridge_parameter_gets_a_gradient_and_kl_starts_at_zero(run):
    assert len(run.first_gradients) == 2 * 5 and min(run.first_gradients.values()) > 0, run.first_gradients
    history = [entry for entry in run.state.log_history if "kl" in entry]
    assert len(history) == 4 and history[0]["kl"] < 1e-6 and history[-1]["kl"] > 1e-4, history
    assert any("eval_loss" in entry and "eval_reward" in entry for entry in run.state.log_history)
    moved = [(p - q).abs().max().item() for p, q in zip(bridge_ops.bridge_parameters(run.model), run.initial_bridge)]
    assert min(moved) > 0


def test_saved_model_and_checkpoint_keep_the_bridge(run, tmp_path):
    from transformers import AutoModelForCausalLM

    run.save_model(str(tmp_path / "final"))
    trained = bridge_ops.bridge_parameters(run.model)
    for directory in (tmp_path / "final", os.path.join(run.args.output_dir, "checkpoint-4")):
        restored = bridge_ops.load_bridge(AutoModelForCausalLM.from_pretrained(directory), str(directory))
        assert all(torch.equal(a, b) for a, b in zip(bridge_ops.bridge_parameters(restored), trained))


def test_a_generation_batch_that_splits_a_group_is_refused(run):
    rows = [{"prompt": PROMPTS[0]}] * 3 + [{"prompt": PROMPTS[1]}] * 5
    with pytest.raises(RuntimeError, match="not made of whole groups of 4"):
        run._generate_and_score_completions(rows)
    batch = {"x": torch.arange(12), "y": [str(i) for i in range(12)], "n": torch.tensor(5), "z": None}
    torch.manual_seed(0)
    shuffled = shuffle_groups(batch, 3)
    assert shuffled["n"] is batch["n"] and shuffled["z"] is None
    assert shuffled["y"] == [str(i) for i in shuffled["x"].tolist()]
    assert all(
        shuffled["x"][g : g + 3].tolist() == list(range(shuffled["x"][g], shuffled["x"][g] + 3))
        for g in range(0, 12, 3)
    )


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(use_vllm=True), "use_vllm=True: vLLM has no Bridge layer"),
        (dict(use_transformers_continuous_batching=True), "packed \\[1, T\\] forwards"),
        (
            dict(per_device_train_batch_size=6, steps_per_generation=2),  # TRL accepts: 12 rows per generation batch
            "per_device_train_batch_size=6 is not a multiple of num_generations=4",
        ),
        (dict(mask_truncated_completions=True), "mask_truncated_completions=True"),
        (dict(generation_kwargs={"use_cache": False}), "use_cache=False"),
        (dict(generation_kwargs={"num_beams": 2}), "beam search"),
    ],
)
def test_unsupported_settings_are_refused(tmp_path, setting, message):
    model, tokenizer = bridged_tiny_model(str(tmp_path))
    args = grpo_config(str(tmp_path), **{"per_device_train_batch_size": WIDTH, **setting})
    with pytest.raises(ValueError, match=message):
        BridgeGRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer)


def test_unsupported_arguments_and_models_are_refused(tmp_path):
    model, tokenizer = bridged_tiny_model(str(tmp_path))
    args = grpo_config(str(tmp_path), per_device_train_batch_size=WIDTH, per_device_eval_batch_size=6)
    for kwargs, message in [
        (dict(tools=[len]), "tool-call loop"),
        (dict(rollout_func=len), "rollout_func"),
        (dict(environment_factory=dict), "environment_factory"),
        (dict(eval_dataset=[]), "per_device_eval_batch_size=6 is not a multiple"),
    ]:
        with pytest.raises(ValueError, match=message):
            BridgeGRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer, **kwargs)
    with pytest.raises(TypeError, match="peft_config must be a peft.PeftConfig"):
        BridgeGRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer, peft_config=1)
    bridge_ops.remove_bridge(model)
    for unbridged in (model, str(tmp_path)):
        with pytest.raises(ValueError, match="a model instance with Bridge blocks"):
            BridgeGRPOTrainer(model=unbridged, reward_funcs=reward, args=args, processing_class=tokenizer)


def run_worker(script: str, args: list, ranks: int = 0) -> None:
    """Runs python_tests/<script> in a fresh process (under torch.distributed.run with `ranks` ranks, if > 0)."""
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks else []
    command = [sys.executable, *launcher, os.path.join(HERE, script), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_keep_groups_whole(tmp_path):
    path = str(tmp_path / "summary")
    run_worker("trl_worker.py", [path], ranks=2)
    ranks = []
    for rank in range(2):
        with open(f"{path}.rank{rank}.json") as f:
            ranks.append(json.load(f))
    for summary in ranks:  # each rank asserted its own forwards; here: it trained, on whole groups of its own
        assert summary["world_size"] == 2 and summary["training_forwards"] == 2 and summary["rollout_forwards"] > 1
        assert len(summary["prompts"]) == 2 * WIDTH
    assert not set(ranks[0]["prompts"]) & set(ranks[1]["prompts"])  # each prompt's group lives on one rank


def test_example_runs(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(sys, "argv", ["trl_grpo.py", "--out", str(tmp_path), "--steps", "1"])
    runpy.run_path(os.path.join(HERE, "..", "examples", "trl_grpo.py"), run_name="__main__")
    trained = bridge_ops.load_bridge(AutoModelForCausalLM.from_pretrained(tmp_path), str(tmp_path))
    assert bridge_ops.parameter_share(trained)["bridge_parameters"] > 0


def test_peft_configs_that_would_adapt_the_bridge_or_the_cache_are_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from bridge_ops.integrations.trl import bridge_peft_config

    model, tokenizer = bridged_tiny_model(str(tmp_path))
    args = grpo_config(str(tmp_path), per_device_train_batch_size=WIDTH)
    for config, message in [
        (peft.LoraConfig(target_modules=["q_proj", "bridge.q_proj"]), "targets Bridge modules"),
        (peft.LoraConfig(target_modules=r".*\.bridge\.(q|v)_proj"), "targets Bridge modules"),
        (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prompt-learning"),
    ]:
        with pytest.raises(ValueError, match=message):
            BridgeGRPOTrainer(
                model=model, reward_funcs=reward, args=args, processing_class=tokenizer, peft_config=config
            )
    # the user's config is not changed; the trainer's copy trains the blocks as modules_to_save
    user = peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert bridge_peft_config(user).modules_to_save == ["lm_head", "bridge"] and user.modules_to_save == ["lm_head"]
    # a PEFT model made without them freezes the Bridge blocks: refused
    frozen = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="does not train its Bridge blocks"):
        BridgeGRPOTrainer(model=frozen, reward_funcs=reward, args=args, processing_class=tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_fsdp2_on_two_ranks_trains_what_one_process_trains(tmp_path, beta):
    """FSDP2 (accelerate, gloo): decoder layers sharded, Bridge included; with beta > 0 the reference model got the
    policy's Bridge blocks before it was sharded (KL exactly 0 at step 1); one SGD step on 2 ranks gives one process's
    weights up to float rounding (measured: at most 1 ulp of a weight, against a step of 1e-3); save_model keeps the
    trained Bridge."""
    run_worker("fsdp_worker.py", ["plain", str(tmp_path / "plain.pt"), str(beta)])
    run_worker("fsdp_worker.py", ["fsdp", str(tmp_path / "fsdp.pt"), str(beta)], ranks=2)
    plain, fsdp = (torch.load(tmp_path / f"{name}.pt", weights_only=False) for name in ("plain", "fsdp"))
    assert (plain["world"], plain["fsdp"], plain["all_sharded"]) == (1, False, False)
    assert (fsdp["world"], fsdp["fsdp"], fsdp["all_sharded"]) == (2, True, True)
    assert plain["reference_bridged"] == fsdp["reference_bridged"] == (beta > 0)
    assert plain["kl"] == fsdp["kl"] == ([0.0] if beta else [])  # TRL logs KL only with a reference
    assert all(torch.equal(plain["before"][k], fsdp["before"][k]) for k in plain["before"])
    step = max((plain["after"][k] - plain["before"][k]).abs().max().item() for k in plain["after"])
    bridge_step = max(
        (plain["after"][k] - plain["before"][k]).abs().max().item() for k in plain["after"] if "bridge" in k
    )
    # The two runs sum the same gradients in another order (two ranks' halves, then an all-reduce): each weight may
    # round differently, by an ulp or so of its own magnitude (of the step's, for weights near 0); a lost or doubled
    # batch would be off by about the step (1e-3), four orders above that.
    ulps = max(
        ((fsdp["after"][k] - a).abs() / (torch.finfo(a.dtype).eps * a.abs().clamp_min(step))).max().item()
        for k, a in plain["after"].items()
    )
    assert bridge_step > 1e-5 and ulps <= 2, (ulps, step)
    for run in (plain, fsdp):
        assert all(torch.equal(tensor, run["after"][k]) for k, tensor in run["restored_bridge"].items())
