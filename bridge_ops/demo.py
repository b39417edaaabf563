"""`python -m bridge_ops.demo`: the whole Bridge pipeline on this CPU in a few minutes, nothing downloaded.

1. pretrain a tiny character-level Llama from scratch on running sums ("3+7+2+9=" -> "10,12,21>21"), from chains
   that contain slips, so its samples make independent slips;
2. add Bridge blocks (zero output projection: the model is unchanged);
3. warm them up on repair data: each of the base's samples keeps its own chain and gets the correct answer, the loss
   on the answer alone where the chain went wrong, so a row learns to take the answer from its peers;
4. GRPO at width 4 (two Bridge groups per problem; a sample's loss reaches its peers through Bridge), with the
   accuracy on a fixed evaluation set before and after;
5. N = 8 interdependent answers per held-out problem, with peers and with every sample alone (the same checkpoint).
"""

import argparse
import time

import torch

import bridge_ops
from bridge_ops.charlm import char_tokenizer
from bridge_ops.dispatch import backend_for
from bridge_ops.tasks import ScratchpadSumTask
from bridge_ops.train import evaluate_widths, task_data
from bridge_ops.train.recipes import BaseSpec, MethodSpec, pretrain_base, train_method

TASK = ScratchpadSumTask(terms=4, min_operand=1, max_operand=9, slip_rate=0.15)
MAX_NEW_TOKENS = 16
DEMO_SPLIT_SEED = 2  # the demo's own stream of held-out problems: the experiments' test sets are not shown here


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--hidden-size", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=8, help="answers per problem in the comparison")
    parser.add_argument("--test-problems", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    tokenizer = char_tokenizer(TASK.alphabet)
    train = task_data(TASK, tokenizer, "train", 5000)
    test = task_data(TASK, tokenizer, "test", args.test_problems, seed=DEMO_SPLIT_SEED)
    example = test.problems[0]
    print(
        f"bridge_ops {bridge_ops.__version__} (CPU kernels: {backend_for('cpu').name}); task: {len(train.problems)} "
        f"train / {len(test.problems)} test problems like {example.prompt} -> {TASK.references(example)[0]}"
    )

    def accuracy(model, width, peers="group"):
        return evaluate_widths(
            model,
            test.prompts,
            test.reward,
            test.extract_answer,
            test.answers,
            (width,),
            peers=peers,
            max_new_tokens=MAX_NEW_TOKENS,
            seed=args.seed,
            eos_token_id=tokenizer.eos_token_id,
        )[0]

    # 1. a base model trained from scratch
    spec = BaseSpec(
        hidden_size=args.hidden_size, num_layers=args.layers, steps=args.pretrain_steps, batch=64, seed=args.seed
    )
    base = pretrain_base(train, spec)
    base_eval = accuracy(base, args.width)
    print(
        f"base model: {sum(p.numel() for p in base.parameters()):,} parameters; "
        f"accuracy {base_eval['mean_accuracy']:.1%}, majority vote of {args.width} independent samples "
        f"{base_eval['majority_accuracy']:.1%}"
    )

    # 2-4. Bridge, repair warm-up, GRPO (accuracy at width 4 on the test problems before and after GRPO)
    method = MethodSpec(seed=args.seed)
    method.warmup.steps, method.warmup_prompts = args.warmup_steps, 768
    method.grpo.steps, method.grpo.max_new_tokens, method.grpo.added_lr_mult = args.grpo_steps, MAX_NEW_TOKENS, 10.0
    method.grpo.groups_per_prompt = 2
    before = {}
    model, log = train_method(
        base, "bridge-repair", train, method, on_stage=lambda stage, m: before.update(accuracy(m, 4))
    )
    share = log["share"][0]
    after = accuracy(model, 4)
    print(
        f"Bridge: {share['bridge_parameters']:,} parameters ({share['share']:.1%} of the model); repair warm-up on "
        f"{log['warmup_groups'][0]['groups']} groups; GRPO: accuracy at N=4 on the test problems "
        f"{before['mean_accuracy']:.1%} -> {after['mean_accuracy']:.1%}"
    )

    # 5. the same checkpoint with peers and with every sample alone
    torch.manual_seed(args.seed)
    shown = test.problems[:3]
    result = bridge_ops.generate(model, [p.prompt for p in shown], args.width, MAX_NEW_TOKENS, tokenizer=tokenizer)
    for problem, texts in zip(shown, result.texts(tokenizer)):
        print(f"  {problem.prompt:<10} (answer {problem.answer}) {' '.join(texts)}")
    peers, solo = accuracy(model, args.width), accuracy(model, args.width, peers="solo")
    print(f"N={args.width}            each sample's accuracy   majority vote")
    print(f"  with peers     {peers['mean_accuracy']:22.1%}   {peers['majority_accuracy']:13.1%}")
    print(f"  each alone     {solo['mean_accuracy']:22.1%}   {solo['majority_accuracy']:13.1%}")
    print(f"done in {time.perf_counter() - start:.0f} s (the measured comparison, 5 seeds: experiments/README.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
