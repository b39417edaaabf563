"""The `bridge-ops` console script.

    bridge-ops info                                        versions, build, backends
    bridge-ops tiny-model DIR [--bridge D]                 a tiny character-level model built locally (for trying out)
    bridge-ops generate --model DIR --prompt TEXT ... --width N
                                                           N interdependent responses per prompt from a local HF model
                                                           (its saved Bridge weights are used when DIR has them)
    bridge-ops train pretrain|sft|grpo ...                 train on a generated task (see bridge_ops/train/commands.py)
    bridge-ops eval --model DIR --widths 1,2,4,8,16        accuracy at several widths

A bad argument is an argparse error; an error of the run itself (a bad model directory, a corrupted file, a checkpoint
of another run, training that diverged) prints one line and exits with status 2. `bridge-ops --debug ...` shows the
traceback instead.
"""

import argparse
import sys
from typing import List, Optional

from .argtypes import USER_ERRORS, non_negative_int, positive_int


def _info(args) -> int:
    from .info import report

    print(report())
    return 0


def _tiny_model(args) -> int:
    from .charlm import save_tiny_model
    from .hf import apply_bridge, parameter_share, save_bridge

    model, _ = save_tiny_model(
        args.directory, model_type=args.model_type, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed
    )
    print(
        f"saved a {args.model_type} model ({sum(p.numel() for p in model.parameters()):,} parameters) and a "
        f"character tokenizer to {args.directory}"
    )
    if args.bridge:
        apply_bridge(model, d_bridge=args.bridge)
        save_bridge(model, args.directory)
        print(
            f"added Bridge (d_bridge={args.bridge}, {parameter_share(model)['share']:.1%} of the parameters, "
            "zero output projection) and saved its weights beside the model"
        )
    return 0


def _generate(args) -> int:
    import torch

    from .generation import generate
    from .hf import has_saved_bridge, load_bridge
    from .train.commands import load_pretrained

    model, tokenizer = load_pretrained(args.model)
    model.eval()
    bridge_dir = args.bridge or (args.model if has_saved_bridge(args.model) else None)
    if bridge_dir and not args.no_bridge:
        load_bridge(model, bridge_dir)
        print(f"Bridge weights from {bridge_dir}")
    else:
        print("no Bridge weights: the responses are independent samples")
    torch.manual_seed(args.seed)
    result = generate(
        model,
        args.prompt,
        args.width,
        args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        tokenizer=tokenizer,
        progress=args.progress,
    )
    for prompt, responses in zip(args.prompt, result.texts(tokenizer)):
        print(f"\n=== {prompt!r}")
        for i, text in enumerate(responses):
            print(f"  [{i}] {text!r}")
    print(f"\n{result.num_tokens} tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .hf import SUPPORTED_MODEL_TYPES
    from .train.commands import add_commands

    parser = argparse.ArgumentParser(prog="bridge-ops", description="Bridge: interdependent parallel generation")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, build and backends").set_defaults(run=_info)

    tiny = commands.add_parser("tiny-model", help="save a tiny character-level model built locally")
    tiny.add_argument("directory")
    tiny.add_argument("--model-type", default="llama", choices=list(SUPPORTED_MODEL_TYPES))
    tiny.add_argument("--hidden-size", type=positive_int, default=128)
    tiny.add_argument("--layers", type=positive_int, default=4)
    tiny.add_argument(
        "--bridge", type=non_negative_int, default=0, metavar="D_BRIDGE", help="also add and save Bridge blocks"
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_model)

    gen = commands.add_parser("generate", help="N interdependent responses per prompt")
    gen.add_argument("--model", required=True, help="a local HF model directory")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    gen.add_argument("--width", type=positive_int, default=4, help="responses per prompt")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=non_negative_int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--bridge", default=None, help="directory with Bridge weights (default: --model, if it has them)")
    gen.add_argument("--no-bridge", action="store_true", help="ignore saved Bridge weights")
    gen.add_argument("--progress", action="store_true")
    gen.set_defaults(run=_generate)

    add_commands(commands)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(
            f"bridge-ops: error: {str(e).removeprefix('bridge_ops: ')} (--debug shows the traceback)", file=sys.stderr
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
