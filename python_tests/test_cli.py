"""The bridge-ops console script, the character-level model builder and the demo, end to end."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import bridge_ops  # noqa: E402
from bridge_ops.charlm import char_tokenizer, tiny_causal_lm  # noqa: E402


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bridge_ops.cli", *args], capture_output=True, text=True)


def test_char_tokenizer_round_trips_and_left_pads():
    tok = char_tokenizer()
    ids = tok("12+7=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "12+7="
    batch = tok(["a", "abc"], padding=True)["input_ids"]
    assert batch[0][:2] == [tok.pad_token_id, tok.pad_token_id]


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_tiny_causal_lm_matches_the_tokenizer(model_type):
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, model_type=model_type, hidden_size=32, num_layers=1)
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    with torch.no_grad():
        assert model(torch.tensor([tok("hi")["input_ids"]])).logits.shape == (1, 3, len(tok))


def test_info_command():
    result = run_cli("info")
    assert result.returncode == 0 and "backends" in result.stdout


def test_tiny_model_then_generate_with_and_without_bridge(tmp_path):
    made = run_cli("tiny-model", str(tmp_path / "m"), "--hidden-size", "32", "--layers", "2", "--bridge", "16")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "m" / "bridge.safetensors").exists()
    args = [
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "1+2=",
        "--prompt",
        "hello",
        "--width",
        "3",
        "--max-new-tokens",
        "5",
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "Bridge weights from" in result.stdout and "tokens/s" in result.stdout
    assert result.stdout.count("  [") == 6  # 2 prompts x 3 responses
    plain = run_cli(*args, "--no-bridge", "--greedy")
    assert plain.returncode == 0 and "independent samples" in plain.stdout


def test_generate_command_fails_clearly_without_a_model(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert result.returncode != 0


def test_an_empty_weights_file_and_an_absurd_width_are_one_line_errors(tmp_path, capsys):
    import shutil

    from bridge_ops.cli import main

    model = str(tmp_path / "m")
    assert main(["tiny-model", model, "--hidden-size", "32", "--layers", "1", "--bridge", "8"]) == 0
    empty = shutil.copytree(model, tmp_path / "empty")
    (empty / "model.safetensors").write_bytes(b"")
    capsys.readouterr()
    for args, message in (
        (["--model", str(empty)], f"cannot read the model weights in {empty}"),
        (["--model", model, "--width", "1000000000"], "1000000000 sequences (width x prompts)"),
    ):
        assert main(["generate", *args, "--prompt", "1+2="]) == 2
        err = capsys.readouterr().err  # transformers' loading progress, then the error in one line
        assert err.strip().splitlines()[-1].startswith("bridge-ops: error: ") and "Traceback" not in err
        assert message in err.strip().splitlines()[-1]


def test_demo_runs():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge_ops.demo",
            "--hidden-size",
            "32",
            "--layers",
            "1",
            "--pretrain-steps",
            "3",
            "--warmup-steps",
            "1",
            "--grpo-steps",
            "1",
            "--test-problems",
            "8",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "GRPO: accuracy at N=4" in result.stdout and "majority vote" in result.stdout
    assert "with peers" in result.stdout and "each alone" in result.stdout


def test_package_exports():
    for name in (
        "apply_bridge",
        "remove_bridge",
        "save_bridge",
        "load_bridge",
        "groups",
        "generate",
        "bridge_block_decode",
        "majority_vote",
        "best_of_n",
        "parameter_share",
    ):
        assert callable(getattr(bridge_ops, name)), name


@pytest.mark.guarantee
def test_cli_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    from bridge_ops.cli import main

    args = ["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]
    assert main(args) == 2  # the exit status of `bridge-ops` (sys.exit(main()))
    err = capsys.readouterr().err
    assert err.startswith("bridge-ops: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(OSError):
        main(["--debug", *args])


@pytest.mark.guarantee
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
