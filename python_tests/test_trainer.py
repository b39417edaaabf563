"""The training loop's checkpoints: one commit point per checkpoint (kill -9 at any instant leaves the previous
checkpoint or the new one), resume only from the same inputs (training data, initial weights, reward function), and
metrics.jsonl without repeated steps after a resume."""

import json

import pytest
import torch
from helpers import assert_same_params, named_params
from hf_models import EOS, bridged_model

from bridge_ops.train import GRPOConfig, SFTConfig, TrainConfig, Trainer, train_grpo, train_sft

NAN = float("nan")
PROMPTS = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14], [1, 20, 21]]
GROUPS = [(PROMPTS[0], [[3, 4, 2], [3, 5, 2]]), (PROMPTS[1], [[6, 2], [7, 2]])]
OTHER_GROUPS = [(PROMPTS[2], [[3, 4, 2], [3, 5, 2]]), (PROMPTS[3], [[6, 2], [7, 2]])]


def _linear_trainer(out_dir, step_fn=None, **config):
    """A Trainer of a small linear layer (initialized from a fixed seed) that checkpoints to `out_dir`."""
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 32)
    config = TrainConfig(out_dir=str(out_dir), progress=False, **config)
    return Trainer(model, dict(model.named_parameters()), config, step_fn)


@pytest.mark.parametrize("trials", [3, pytest.param(30, marks=pytest.mark.slow)])
def test_a_checkpoint_killed_at_random_points_leaves_the_old_or_the_new_one(tmp_path, trials):
    from helpers import kill_during_saves

    first, second = _linear_trainer(tmp_path), _linear_trainer(tmp_path)
    with torch.no_grad():
        for p in second.trainable.values():
            p.add_(1.0)
    first.step, second.step = 1, 2

    def load(directory):
        resumed = _linear_trainer(directory)
        assert resumed.maybe_resume()
        return resumed.step, {n: p.detach().clone() for n, p in resumed.trainable.items()}

    outcomes = kill_during_saves(tmp_path, [first.save_checkpoint, second.save_checkpoint], load, trials)
    print(f"training checkpoint, {trials} kills: {dict(outcomes)}")
    assert outcomes["old"] + outcomes["new"] == trials


def test_metrics_repeat_no_step_after_a_resume(tmp_path):
    """A run killed after it logged step 3 but before its next checkpoint (step 4) resumes from step 2."""

    def step_fn(step, optimizer_step):
        if step == 4 and not resumed:
            raise KeyboardInterrupt  # the crash
        loss = trainer.model.weight.square().sum()
        loss.backward()
        optimizer_step(loss)
        return {"loss": loss.item()}

    resumed = False
    trainer = _linear_trainer(tmp_path, step_fn, steps=4, checkpoint_every=2, lr=1e-3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # and a line the crash cut short
    resumed = True
    trainer = _linear_trainer(tmp_path, step_fn, steps=4, checkpoint_every=2, lr=1e-3)
    assert [h["step"] for h in trainer.train()] == [3, 4]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def _sft(model, out_dir, groups=GROUPS, **config):
    settings = {**dict(steps=2, lr=1e-2, groups_per_step=2, progress=False, out_dir=str(out_dir)), **config}
    return train_sft(model, groups, SFTConfig(**settings))


def test_resume_refuses_other_training_data_or_initial_weights_unless_allowed(tmp_path):
    _sft(bridged_model(), tmp_path)
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    assert set(manifest["fingerprints"]) == {"training_data", "initial_weights"}
    with pytest.raises(ValueError, match=r"another configuration: training_data '[0-9a-f]+' \(checkpoint\) vs"):
        _sft(bridged_model(), tmp_path, groups=OTHER_GROUPS, steps=3)
    with pytest.raises(ValueError, match=r"another configuration: initial_weights '[0-9a-f]+' \(checkpoint\) vs"):
        _sft(bridged_model(seed=5), tmp_path, steps=3)
    history = _sft(bridged_model(), tmp_path, groups=OTHER_GROUPS, steps=3, allow_resume_changes=("training_data",))
    assert [h["step"] for h in history] == [3]


def test_grpo_resume_refuses_another_reward_function(tmp_path):
    def reward(index, response):
        return 1.0

    def other_reward(index, response):
        return 0.5

    def grpo(reward_fn, steps, **changes):
        config = GRPOConfig(
            steps=steps, width=2, prompts_per_step=2, max_new_tokens=2, progress=False, out_dir=str(tmp_path), **changes
        )
        return train_grpo(bridged_model(), PROMPTS, reward_fn, config, eos_token_id=EOS)

    grpo(reward, 1)
    with pytest.raises(ValueError, match=r"reward_fn '.*\.reward' \(checkpoint\) vs '.*\.other_reward' \(now\)"):
        grpo(other_reward, 2)
    assert [h["step"] for h in grpo(other_reward, 2, allow_resume_changes=("reward_fn",))] == [2]


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


@pytest.mark.guarantee
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


@pytest.mark.guarantee
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
    before = named_params(model)
    with pytest.raises(ValueError, match=message):
        _sft(model, run_dir, steps=3)
    assert_same_params(model, before)


@pytest.mark.guarantee
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


@pytest.mark.guarantee
def test_grpo_refuses_the_output_directory_of_an_sft_run(run_dir):
    from hf_models import EOS, bridged_model

    from bridge_ops.train import GRPOConfig, train_grpo

    model = bridged_model()
    before = named_params(model)
    config = GRPOConfig(steps=3, width=2, prompts_per_step=2, max_new_tokens=2, progress=False, out_dir=str(run_dir))
    with pytest.raises(ValueError, match=r"holds the checkpoint of a sft \(SFTConfig\) run, not of this grpo"):
        train_grpo(model, PROMPTS, lambda i, r: 1.0, config, eos_token_id=EOS)
    assert_same_params(model, before)


@pytest.mark.guarantee
def test_resume_into_another_d_bridge_changes_nothing(run_dir):
    from hf_models import bridged_model

    model = bridged_model(d_bridge=16)
    before = named_params(model)
    with pytest.raises(
        ValueError,
        match="q_proj.weight is torch.float32 \\[32, 64\\] in the checkpoint, torch.float32 \\[16, 64\\] in the model",
    ):  # other initial weights are allowed here, so the tensors themselves are checked
        _sft(model, run_dir, steps=3, allow_resume_changes=("initial_weights",))
    assert_same_params(model, before)


@pytest.mark.guarantee
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
