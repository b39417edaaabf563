"""The "before": why the project's first recipe could not teach Bridge to read its peers, measured.

    python experiments/audit.py            # a few minutes on a 2-core CPU; writes OUT/audit.json and OUT/audit.md

The first recipe (the width experiment of the previous README): ArithmeticTask(max_operand=9) (answers of 1-3
tokens), a 0.79M-parameter base, Bridge (d_bridge 16, 2 heads) initialized with std 0.02, warmed up on groups of the
base's correct samples, then GRPO at one learning rate for every parameter (1e-4, 150 steps). Measured here:
  1. the warm-up groups whose rows are all the same string, and the gradient that Q, K, V get from them;
  2. Bridge attention after training: entropy / log n and n x the weight a row puts on itself (1.0 = uniform);
  3. how much peers matter: KL(with peers || solo) per token after the first, and the argmax tokens that change;
  4. the output projection's norm after GRPO without a warm-up (how far one small learning rate moves it);
  5. where errors fall: one-token answers, and the errors already made at the first answer token (sampled while all
     rows of a group are identical, so peers cannot change it);
  6. the attention entropy at initialization with std 0.02 and with the new default std hidden^-1/2.
"""

import argparse
import copy
import json
import os
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--size", choices=["smoke", "default"], default="default")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import bridge_ops
    from bridge_ops.charlm import char_tokenizer
    from bridge_ops.tasks import ArithmeticTask
    from bridge_ops.train import (
        attention_stats,
        bridge_gradient_norms,
        collect_warmup_groups,
        grouped_batch,
        peer_kl,
        rollout,
        task_data,
    )
    from bridge_ops.train.recipes import BaseSpec, MethodSpec, add_block, output_norm, pretrain_base, train_method

    smoke = args.size == "smoke"
    started, progress = time.perf_counter(), not args.no_progress
    task = ArithmeticTask(max_operand=9)
    tok = char_tokenizer(task.alphabet)
    train = task_data(task, tok, "train", 64 if smoke else 3000)
    test = task_data(task, tok, "test", 16 if smoke else 500)
    base = pretrain_base(
        train,
        BaseSpec(
            hidden_size=32 if smoke else 128,
            num_layers=2 if smoke else 4,
            steps=3 if smoke else 700,
            schedule="constant",
        ),
        progress=progress,
    )
    spec = MethodSpec(init_std=0.02)  # the first recipe's fixed initialization
    spec.warmup.lr, spec.grpo.lr = 1e-3, 1e-4  # and its learning rates
    spec.warmup_prompts = 16 if smoke else 1024
    spec.warmup.steps = spec.grpo.steps = 2 if smoke else 150
    spec.grpo.prompts_per_step = 4 if smoke else 16
    eos, pad = tok.eos_token_id, tok.pad_token_id
    result = {}

    # 1. the warm-up data and the gradient it gives Q, K, V
    groups = collect_warmup_groups(
        base,
        train.prompts[: spec.warmup_prompts],
        8,
        "correct",
        reward_fn=train.reward,
        max_new_tokens=6,
        eos_token_id=eos,
    )
    identical = sum(1 for g in groups if all(r == g.responses[0] for r in g.responses))
    result["warmup_groups"], result["identical_groups"] = len(groups), identical
    fresh = bridge_ops.apply_bridge(copy.deepcopy(base), d_bridge=16, num_heads=2, init_std=0.02)
    with torch.no_grad():  # a trained-looking output projection, so that Q and K could receive a gradient at all
        for block in bridge_ops.hf.bridge_blocks(fresh):
            block.o_proj.weight.normal_(std=0.02, generator=torch.Generator().manual_seed(0))
    if groups:
        batch = grouped_batch([g.prompt for g in groups[:32]], [g.responses for g in groups[:32]], pad)
        result["warmup_gradient"] = bridge_gradient_norms(fresh, batch)

    # 6. attention entropy at initialization: std 0.02 vs hidden^-1/2, on N=8 samples of test problems
    samples = rollout(base, test.prompts, range(len(test.prompts)), 8, 6, (0, "audit"), eos_token_id=eos)
    sample_batch = grouped_batch(test.prompts, samples, pad)
    for name, std in (("init_0.02", 0.02), ("init_hidden^-1/2", None)):
        model = copy.deepcopy(base)
        add_block(model, "bridge", MethodSpec(init_std=std))
        result[f"attention_{name}"] = attention_stats(model, sample_batch)

    # 2-4. the trained first recipe, and Bridge trained by GRPO alone
    for method in ("bridge-correct", "bridge"):
        model, log = train_method(base, method, train, spec, progress=progress)
        entry = {"output_norm": output_norm(model)}
        if method == "bridge-correct":
            samples = rollout(model, test.prompts, range(len(test.prompts)), 8, 6, (1, "audit"), eos_token_id=eos)
            batch = grouped_batch(test.prompts, samples, pad)
            entry.update(attention_stats(model, batch))
            entry.update(peer_kl(model, batch))
        result[method] = entry

    # 5. where errors fall (the base, one sample per test problem)
    samples = rollout(base, test.prompts, range(len(test.prompts)), 1, 6, (2, "audit"), eos_token_id=eos)
    first_wrong = errors = one_token = 0
    for i, (group, problem) in enumerate(zip(samples, test.problems)):
        answer = tok(problem.answer, add_special_tokens=False)["input_ids"]
        one_token += len(answer) == 1
        if test.reward(i, group[0]) == 0:
            errors += 1
            first_wrong += not group[0] or group[0][0] != answer[0]
    result.update(
        test_problems=len(test.problems),
        one_token_answers=one_token,
        errors=errors,
        errors_at_first_token=first_wrong,
        seconds=time.perf_counter() - started,
    )

    os.makedirs(args.out, exist_ok=True)
    json.dump(result, open(os.path.join(args.out, "audit.json"), "w"), indent=1)
    with open(os.path.join(args.out, "audit.md"), "w") as f:
        f.write(report(result))
    print(report(result))
    return 0


def report(r: dict) -> str:
    grad = r.get("warmup_gradient", {"q": float("nan"), "k": float("nan"), "v": float("nan")})
    trained = r["bridge-correct"]
    rows = [
        ("warm-up groups whose rows are all the same string", f"{r['identical_groups']} of {r['warmup_groups']}"),
        ("|grad| of Bridge Q / K / V on those groups", f"{grad['q']:.1e} / {grad['k']:.1e} / {grad['v']:.1e}"),
        (
            "attention entropy / log n at init, std 0.02 (1 = uniform)",
            f"{r['attention_init_0.02']['entropy_ratio']:.4f}",
        ),
        (
            "attention entropy / log n at init, std hidden^-1/2",
            f"{r['attention_init_hidden^-1/2']['entropy_ratio']:.4f}",
        ),
        (
            "after warm-up + GRPO: entropy / log n, n x self weight",
            f"{trained['entropy_ratio']:.4f}, {trained['self_weight_ratio']:.3f}",
        ),
        (
            "KL(with peers || solo) per token after the first; argmax changed",
            f"{trained['kl']:.1e}; {100 * trained['argmax_changed']:.1f}%",
        ),
        (
            "output-projection norm after warm-up + GRPO / after GRPO alone",
            f"{trained['output_norm']:.2f} / {r['bridge']['output_norm']:.2f}",
        ),
        ("one-token answers among the test problems", f"{r['one_token_answers']} of {r['test_problems']}"),
        (
            "base errors already wrong at the first answer token",
            f"{r['errors_at_first_token']} of {r['errors']} "
            f"({100 * r['errors_at_first_token'] / max(1, r['errors']):.0f}%)",
        ),
    ]
    lines = ["| measurement (first recipe, arithmetic task) | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + f"\n\n({r['seconds'] / 60:.1f} min)\n"


if __name__ == "__main__":
    sys.exit(main())
