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
    assert main(["train", "pretrain", "--out", str(out), "--steps", "3", "--hidden-size", "32", "--layers", "1",
                 "--batch", "16", "--no-progress", "--train-problems", "64"]) == 0
    return out


def test_grpo_then_resume_then_eval(base_dir, tmp_path, capsys):
    out = tmp_path / "rl"
    grpo = ["train", "grpo", "--model", str(base_dir), "--bridge", "8", "--bridge-heads", "2", "--width", "2",
            "--prompts-per-step", "2", "--out", str(out), *TINY]
    assert main([*grpo, "--steps", "2"]) == 0
    for name in ("model.safetensors", "bridge.safetensors", "tokenizer.json", "checkpoint.pt", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert main([*grpo, "--steps", "3"]) == 0  # the same command with more steps resumes from the checkpoint
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--widths", "1,2", "--test-problems", "4", "--json", str(result),
                 "--no-progress"]) == 0
    rows = json.loads(result.read_text())
    assert [r["width"] for r in rows] == [1, 2]
    assert "mean_acc" in capsys.readouterr().out


def test_sft_refuses_a_model_without_correct_samples(base_dir, tmp_path):
    with pytest.raises(SystemExit, match="too weak"):
        main(["train", "sft", "--model", str(base_dir), "--bridge", "8", "--bridge-heads", "2", "--width", "2",
              "--out", str(tmp_path / "warm"), "--steps", "1", *TINY])


def test_experiment_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        import width_experiment
    finally:
        sys.path.pop(0)
    assert width_experiment.main(["--size", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    methods = {"base", "grpo", "pmatch", "bridge", "pmatch-warmup", "bridge-nowarmup"}
    assert {r["method"] for r in rows} == methods and len(rows) == len(methods) * 2  # 1 seed x widths 1, 2
    assert all(0.0 <= float(r["mean_accuracy"]) <= 1.0 for r in rows)
    assert (tmp_path / "accuracy_vs_width.png").stat().st_size > 10_000
    assert "| bridge |" in (tmp_path / "summary.md").read_text()
