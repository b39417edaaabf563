"""`python -m bridge_ops.demo`: the whole Bridge pipeline on this CPU in a few minutes, nothing downloaded.

1. pretrain a tiny character-level Llama from scratch on generated arithmetic ("7+3-5=" -> "5");
2. add Bridge blocks (zero output projection: the model is unchanged);
3. SFT warm-up of the Bridge parameters on groups of the model's own correct samples;
4. a few GRPO steps at width 4 (a sample's loss reaches its peers through Bridge);
5. generate N interdependent answers per held-out problem, majority-vote them, and report accuracy at widths 1..8.
"""

import argparse
import time

import torch

import bridge_ops
from bridge_ops.charlm import char_tokenizer
from bridge_ops.dispatch import backend_for
from bridge_ops.tasks import ArithmeticTask
from bridge_ops.train import evaluate_widths, task_data
from bridge_ops.train.recipes import BaseSpec, MethodSpec, pretrain_base, train_method


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=700)
    parser.add_argument("--warmup-steps", type=int, default=150)
    parser.add_argument("--grpo-steps", type=int, default=50)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=4, help="answers per problem in the shown examples")
    parser.add_argument("--test-problems", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    task = ArithmeticTask(max_operand=9)
    tokenizer = char_tokenizer(task.alphabet)
    train, test = task_data(task, tokenizer, "train", 3000), task_data(task, tokenizer, "test", args.test_problems)
    print(f"bridge_ops {bridge_ops.__version__} (CPU kernels: {backend_for('cpu').name}); task: {len(train.problems)} "
          f"train / {len(test.problems)} test problems like {test.problems[0].prompt}{test.problems[0].answer}")

    # 1. a base model trained from scratch
    spec = BaseSpec(hidden_size=args.hidden_size, num_layers=args.layers, steps=args.pretrain_steps, seed=args.seed)
    base = pretrain_base(train, spec)

    def accuracy(model, widths):
        rows = evaluate_widths(model, test.prompts, test.reward, test.extract_answer, test.answers, widths,
                               max_new_tokens=6, seed=args.seed, eos_token_id=tokenizer.eos_token_id)
        return {r["width"]: r for r in rows}

    base_acc = accuracy(base, (1,))[1]["mean_accuracy"]
    print(f"base model: {sum(p.numel() for p in base.parameters()):,} parameters, accuracy {base_acc:.1%}")

    # 2-4. Bridge, warm-up, GRPO
    method = MethodSpec(seed=args.seed)
    method.warmup.steps, method.grpo.steps = args.warmup_steps, args.grpo_steps
    model, log = train_method(base, "bridge", train, method)
    share = log["share"][0]
    print(f"Bridge: {share['bridge_parameters']:,} parameters ({share['share']:.1%} of the model); warm-up on "
          f"{log['warmup_groups'][0]['groups']} groups of correct samples; GRPO reward "
          f"{log['grpo'][0]['reward']:.2f} -> {log['grpo'][-1]['reward']:.2f}")

    # 5. interdependent answers, voted
    torch.manual_seed(args.seed)
    shown = test.problems[:4]
    result = bridge_ops.generate(model, [p.prompt for p in shown], args.width, 6, tokenizer=tokenizer)
    for problem, texts in zip(shown, result.texts(tokenizer)):
        vote = bridge_ops.majority_vote(task.extract_answer(t) for t in texts)
        print(f"  {problem.prompt:<10} answers {texts} -> vote {vote} ({'right' if vote == problem.answer else 'wrong'})")
    table = accuracy(model, (1, 2, 4, 8))
    print("width  mean accuracy  majority vote  all correct")
    for width, row in table.items():
        print(f"{width:>5}  {row['mean_accuracy']:13.1%}  {row['majority_accuracy']:13.1%}  {row['all_correct']:11.1%}")
    print(f"done in {time.perf_counter() - start:.0f} s (the full comparison: python experiments/width_experiment.py)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
