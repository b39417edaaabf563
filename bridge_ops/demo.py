"""`python -m bridge_ops.demo`: interdependent generation with a small model built on this machine.

Builds a character-level Llama (random weights: nothing is downloaded, nothing is trained yet, so the text is
noise), adds Bridge blocks, and generates N responses per prompt for several prompts of different lengths and
widths: prompts prefilled once per group, KV cache shared out to the members, finished members masked, finished
groups dropped from the batch. Prints the responses, tokens/s with and without Bridge, and what Bridge adds.
"""

import argparse

import torch

import bridge_ops
from bridge_ops.charlm import char_tokenizer, tiny_causal_lm
from bridge_ops.dispatch import backend_for

PROMPTS = ["12+7=", "what is 3*4? ", "the cat sat on the"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="4,2,8", help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-bridge", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    if len(widths) != len(PROMPTS):
        parser.error(f"--widths needs {len(PROMPTS)} values")

    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed)
    print(f"bridge_ops {bridge_ops.__version__} (CPU kernels: {backend_for('cpu').name}); a random character-level "
          f"llama, hidden {args.hidden_size}, {args.layers} layers, {sum(p.numel() for p in model.parameters()):,} "
          "parameters")

    def run(label):
        torch.manual_seed(args.seed)
        result = bridge_ops.generate(model, PROMPTS, widths, args.max_new_tokens, tokenizer=tokenizer, top_k=0)
        print(f"{label}: {result.num_tokens} tokens in {result.seconds:.2f} s = {result.tokens_per_second:.0f} tokens/s")
        return result

    run("without Bridge (independent samples)")
    bridge_ops.apply_bridge(model, d_bridge=args.d_bridge)
    # An untrained Bridge has a zero output projection and changes nothing; give it a random one so the members
    # visibly influence each other (training them is the next step of the project).
    for block in bridge_ops.hf.bridge_blocks(model):
        torch.nn.init.normal_(block.o_proj.weight, std=0.05)
    share = bridge_ops.parameter_share(model)
    print(f"Bridge added: d_bridge={args.d_bridge}, {share['bridge_parameters']:,} parameters "
          f"({share['share']:.1%} of the model)")
    result = run("with Bridge (interdependent samples)")
    for prompt, responses in zip(PROMPTS, result.texts(tokenizer)):
        print(f"\n{prompt!r} x {len(responses)}")
        for i, text in enumerate(responses):
            print(f"  [{i}] {text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
