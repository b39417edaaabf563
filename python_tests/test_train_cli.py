"""`bridge-ops train ...` / `bridge-ops eval` end to end at tiny sizes, resume through the CLI, and the experiment
script at its smoke size."""

import csv
import json
import os
import sys

import pytest

from bridge_ops.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--no-progress", "--train-problems", "16"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "base"
    assert (
        main(
            [
                "train",
                "pretrain",
                "--out",
                str(out),
                "--steps",
                "3",
                "--hidden-size",
                "32",
                "--layers",
                "1",
                "--batch",
                "16",
                "--no-progress",
                "--train-problems",
                "64",
            ]
        )
        == 0
    )
    return out


def test_grpo_then_resume_then_eval(base_dir, tmp_path, capsys):
    out = tmp_path / "rl"
    grpo = [
        "train",
        "grpo",
        "--model",
        str(base_dir),
        "--bridge",
        "8",
        "--bridge-heads",
        "2",
        "--width",
        "2",
        "--prompts-per-step",
        "2",
        "--out",
        str(out),
        *TINY,
    ]
    assert main([*grpo, "--steps", "2"]) == 0
    for name in ("model.safetensors", "bridge.safetensors", "tokenizer.json", "checkpoint.pt", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert main([*grpo, "--steps", "3"]) == 0  # the same command with more steps resumes from the checkpoint
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    result = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(out),
                "--widths",
                "1,2",
                "--test-problems",
                "4",
                "--json",
                str(result),
                "--no-progress",
                "--peers",
                "both",
            ]
        )
        == 0
    )
    rows = json.loads(result.read_text())
    assert [(r["width"], r["peers"]) for r in rows] == [(1, "group"), (2, "group"), (1, "solo"), (2, "solo")]
    assert "mean_acc" in capsys.readouterr().out


@pytest.mark.parametrize("warmup, message", [("repair", "chain"), ("ranked", "random draw")])
def test_repair_and_ranked_warmups_need_a_task_that_has_them(base_dir, tmp_path, warmup, message):
    with pytest.raises(SystemExit, match=message):
        main(
            [
                "train",
                "sft",
                "--model",
                str(base_dir),
                "--bridge",
                "8",
                "--warmup",
                warmup,
                "--out",
                str(tmp_path / "warm"),
                "--steps",
                "1",
                *TINY,
            ]
        )


def test_sft_refuses_a_model_without_correct_samples(base_dir, tmp_path):
    with pytest.raises(SystemExit, match="too weak"):
        main(
            [
                "train",
                "sft",
                "--model",
                str(base_dir),
                "--bridge",
                "8",
                "--bridge-heads",
                "2",
                "--width",
                "2",
                "--out",
                str(tmp_path / "warm"),
                "--steps",
                "1",
                *TINY,
            ]
        )


def _bridged_char_model(seed):
    import torch

    import bridge_ops
    from bridge_ops.charlm import char_tokenizer, tiny_causal_lm

    tokenizer = char_tokenizer("0123456789+-=")
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=seed)
    torch.manual_seed(seed)
    return bridge_ops.apply_bridge(model, d_bridge=8, num_heads=2), tokenizer


@pytest.mark.parametrize("trials", [3, pytest.param(30, marks=pytest.mark.slow)])
def test_the_final_save_killed_at_random_points_leaves_the_old_or_the_new_model_and_bridge(tmp_path, trials):
    """The CLI's model + tokenizer + Bridge save: never the new base with the old Bridge (or the reverse)."""
    import argparse

    from helpers import kill_during_saves

    from bridge_ops.train.commands import _load, _save
    from bridge_ops.train.distributed import DistContext

    out = str(tmp_path / "out")
    models = [_bridged_char_model(seed) for seed in (1, 2)]
    saves = [lambda m=m, t=t: _save(m, t, out, DistContext()) for m, t in models]

    def load(directory):
        model, _ = _load(argparse.Namespace(model=directory))
        return {name: t.clone() for name, t in model.state_dict().items()}

    outcomes = kill_during_saves(out, saves, load, trials)
    print(f"CLI model + Bridge save, {trials} kills: {dict(outcomes)}")
    assert outcomes["old"] + outcomes["new"] == trials


def test_a_model_without_bridge_drops_the_bridge_files_of_an_earlier_save(tmp_path):
    import bridge_ops
    from bridge_ops.train.commands import _save
    from bridge_ops.train.distributed import DistContext

    model, tokenizer = _bridged_char_model(1)
    _save(model, tokenizer, str(tmp_path), DistContext())
    _save(bridge_ops.remove_bridge(model), tokenizer, str(tmp_path), DistContext())
    assert not bridge_ops.hf.has_saved_bridge(str(tmp_path))


def test_bad_numbers_and_impossible_sizes_are_refused_at_once(base_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "grpo", "--model", str(base_dir), "--out", str(tmp_path / "rl"), "--beta", "nan"])
    assert exit_info.value.code == 2
    assert "argument --beta: must be a finite number >= 0, got nan" in capsys.readouterr().err
    sft = ["train", "sft", "--model", str(base_dir), "--bridge", "8", "--out", str(tmp_path / "warm"), "--no-progress"]
    assert main([*sft, "--task", "subset-sum", "--train-problems", "1000000"]) == 2
    err = capsys.readouterr().err  # transformers' loading progress, then the error in one line
    assert "has 74641 distinct problems, fewer than the 1000000 asked for" in err.strip().splitlines()[-1]


def _experiment(name):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_interdependence_experiment_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    assert _experiment("interdependence").main(["--size", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "consensus" / "results.csv")))
    methods = {"grpo", "pmatch-correct", "pmatch-repair", "bridge-repair"}
    assert {r["method"] for r in rows} == methods
    assert {(r["method"], r["peers"]) for r in rows if r["method"] == "bridge-repair"} == {
        ("bridge-repair", "group"),
        ("bridge-repair", "solo"),
    }
    assert all(0.0 <= float(r["mean_accuracy"]) <= 1.0 for r in rows)
    assert (tmp_path / "consensus" / "accuracy_vs_width.png").stat().st_size > 10_000
    assert (tmp_path / "coordination" / "distinct_vs_bound.png").stat().st_size > 10_000
    summary = (tmp_path / "summary.md").read_text()
    assert "with peers vs the same checkpoint solo" in summary and "independence bound" in summary
    coordination = list(csv.DictReader(open(tmp_path / "coordination" / "results.csv")))
    assert {r["method"] for r in coordination} == {"base", "grpo", "pmatch-ranked", "bridge-ranked"}


def test_audit_smoke(tmp_path):
    assert _experiment("audit").main(["--size", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "audit.json").read_text())
    assert result["attention_init_0.02"]["entropy_ratio"] > result["attention_init_hidden^-1/2"]["entropy_ratio"]
    assert "rows are all the same string" in (tmp_path / "audit.md").read_text()


def test_fair_consensus_experiment_smoke(tmp_path):
    """The round-2 experiment end to end at smoke size: every method and the base on the test set, for each seed."""
    pytest.importorskip("matplotlib")
    assert _experiment("fair_consensus").main(["--size", "smoke", "--out", str(tmp_path), "--jobs", "1"]) == 0
    out = tmp_path / "fair_consensus"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["method"], r["seed"]) for r in rows} == {
        (m, s) for m in ("base", "grpo", "grpo-correct", "pmatch", "bridge") for s in ("0", "1")
    }
    assert {r["peers"] for r in rows if r["method"] == "bridge"} == {"group", "solo"}
    import gzip

    problems = list(csv.DictReader(gzip.open(out / "problems.csv.gz", "rt")))
    assert len(problems) == sum(8 for _ in rows)  # 8 test problems per evaluation
    grid = list(csv.DictReader(open(out / "grid.csv")))
    assert sorted(r["method"] for r in grid) == ["bridge", "grpo", "grpo-correct", "pmatch", "pmatch"]
    summary = (out / "summary.md").read_text()
    assert all(f"- G{k}," in summary for k in range(1, 5))
    assert (out / "accuracy_vs_width.png").stat().st_size > 10_000


def test_fair_coordination_experiment_smoke(tmp_path):
    """Part B of round 2 end to end at smoke size: the grid from one warm-up per method, every method and the base on
    the test set for each seed, the three yardsticks per problem, the report and the goals."""
    pytest.importorskip("matplotlib")
    assert _experiment("fair_coordination").main(["--size", "smoke", "--out", str(tmp_path), "--jobs", "1"]) == 0
    out = tmp_path / "fair_coordination"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["method"], r["seed"]) for r in rows} == {
        (m, s) for m in ("base", "grpo", "pmatch-ranked", "bridge-ranked") for s in ("0", "1")
    }
    import gzip

    problems = list(csv.DictReader(gzip.open(out / "problems.csv.gz", "rt")))
    assert len(problems) == 8 * len(rows)  # 8 test problems per evaluation
    for p in problems:  # every yardstick is a count of answers in [0, N]; the ideal needs the problem's solutions
        assert int(p["solutions"]) >= 2
        assert all(0.0 <= float(p[k]) <= 2.0 for k in ("distinct", "marginal_bound", "bound", "ideal"))
    grid = list(csv.DictReader(open(out / "grid.csv")))
    assert sorted((r["method"], float(r["lr"])) for r in grid) == sorted(
        (m, lr) for m in ("grpo", "pmatch-ranked", "bridge-ranked") for lr in (3e-5, 1e-4)
    )
    summary = (out / "summary.md").read_text()
    assert all(f"- B{k}:" in summary for k in range(1, 4))
    assert (out / "distinct_vs_yardsticks.png").stat().st_size > 10_000


def test_real_model_experiment_smoke(tmp_path, smollm2_checkpoint):
    """Part C end to end at smoke size on SmolLM2-135M-Instruct: format fine-tuning, the three methods, the base and
    every evaluation, the report and the per-problem CSV."""
    pytest.importorskip("matplotlib")
    cache = os.path.dirname(smollm2_checkpoint)
    argv = ["--size", "smoke", "--out", str(tmp_path), "--cache-dir", cache, "--device", "cpu", "--no-progress"]
    assert _experiment("real_model").main(argv) == 0
    out = tmp_path / "real_model"
    rows = list(csv.DictReader(open(out / "results.csv")))
    methods = {"base", "grpo-correct", "pmatch-correct", "bridge-correct"}
    assert {r["method"] for r in rows} == methods
    assert {(r["width"], r["peers"]) for r in rows if r["method"] == "bridge-correct"} == {
        (w, p) for w in ("1", "2", "4") for p in ("group", "solo")
    }
    assert all(0.0 <= float(r["mean_accuracy"]) <= 1.0 for r in rows)
    import gzip

    problems = list(csv.DictReader(gzip.open(out / "problems.csv.gz", "rt")))
    assert len(problems) == 3 * len(rows)  # 3 test problems per evaluation
    summary = (out / "summary.md").read_text()
    assert "bridge with peers - bridge alone" in summary and "Relative gain" in summary
    assert (out / "accuracy_vs_width.png").stat().st_size > 10_000


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


@pytest.mark.guarantee
def test_pretrain_checks_its_output_directory_before_training(tmp_path, capsys):
    from bridge_ops.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*PRETRAIN, "--out", str(blocker / "out"), "--steps", "1000"]) == 2  # fails at once, trains nothing
    assert f"cannot write to the output directory {blocker / 'out'}" in capsys.readouterr().err


@pytest.mark.guarantee
def test_pretrain_checkpoints_and_resumes(tmp_path):
    import json

    from bridge_ops.cli import main

    out = tmp_path / "base"
    assert main([*PRETRAIN, "--out", str(out), "--steps", "2"]) == 0
    assert (out / "checkpoint.pt").exists() and (out / "checkpoint.json").exists()
    assert main([*PRETRAIN, "--out", str(out), "--steps", "3"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_real_model_tuned_experiment_smoke(tmp_path, smollm2_checkpoint):
    """Part C's tuned run end to end at smoke size: the warm-up grid on validation, the three methods on the test set,
    the goals; a second invocation reuses every finished stage and writes the same results."""
    pytest.importorskip("matplotlib")
    cache = os.path.dirname(smollm2_checkpoint)
    argv = ["--size", "smoke", "--out", str(tmp_path), "--cache-dir", cache, "--device", "cpu", "--no-progress"]
    argv += ["--work-dir", str(tmp_path / "stages")]
    assert _experiment("real_model_tuned").main(argv) == 0
    out = tmp_path / "real_model_tuned"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} == {"base", "grpo-correct", "pmatch-repair", "bridge-repair"}
    grid = list(csv.DictReader(open(out / "grid.csv")))
    assert sorted((r["method"], float(r["warmup_lr"])) for r in grid) == sorted(
        (m, lr) for m in ("pmatch-repair", "bridge-repair") for lr in (1e-4, 1e-3)
    )
    summary = (out / "summary.md").read_text()
    assert all(f"- Goal {k}," in summary for k in range(1, 5)) and "Relative gain" in summary
    stages = sorted(p.name for p in (tmp_path / "stages").iterdir())
    assert "test-bridge-repair.json" in stages and "warmup-samples.json" in stages and len(stages) == 10
    first_results = (out / "results.csv").read_text()
    assert _experiment("real_model_tuned").main(argv) == 0
    assert (out / "results.csv").read_text() == first_results
