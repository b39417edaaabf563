"""`bridge-ops train pretrain|sft|grpo` and `bridge-ops eval`: the trainers on a generated task, from the shell.

    bridge-ops train pretrain --task arithmetic --out base/            a tiny base model trained from scratch
    bridge-ops train sft  --model base/ --task arithmetic --bridge 16 --width 8 --out warm/
                                                                      Bridge warm-up on the model's own samples
                                                                      (--warmup correct|distinct|repair)
    bridge-ops train grpo --model warm/ --task arithmetic --width 4 --out rl/
    bridge-ops eval --model rl/ --task arithmetic --widths 1,2,4,8,16

Every training command checks that --out is writable before it starts, then writes the whole model (`save_pretrained`,
plus `bridge.safetensors` when bridged) and the tokenizer to --out as one save with one commit point (a crash leaves
the previous model and Bridge or the new ones, never a mix), with metrics.jsonl, checkpoint.pt and its manifest;
running the same command again resumes from the checkpoint (pretraining included). Under
`torchrun --nproc_per_node K` the trainers run data-parallel (whole groups per rank).
"""

import json

from ..argtypes import int_list, non_negative_float, non_negative_int, positive_float, positive_int
from ..tasks import TASKS
from .sft import WARMUP_MODES

# the sizes of the README and the experiments (single-digit operands; scratchpad chains pretrained with slips)
TASK_DEFAULTS = {
    "arithmetic": {"max_operand": 9},
    "scratchpad-sum": {"min_operand": 1, "max_operand": 9, "slip_rate": 0.15},
    "subset-sum": {"draw_length": 2},
}


def _task(args):
    from ..tasks import get_task

    return get_task(args.task, **TASK_DEFAULTS.get(args.task, {}))


def load_pretrained(directory: str):
    """(model, tokenizer) of the local HF model directory `directory` (a save a crash interrupted is completed
    first); a ValueError naming the directory if a weights file cannot be read."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..files import recover

    recover(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    tokenizer.padding_side = "left"
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    except SafetensorError as e:
        raise ValueError(
            f"bridge_ops: cannot read the model weights in {directory} (truncated or empty?): {e}"
        ) from None
    return model, tokenizer


def _load(args, bridge: int = 0):
    """(model, tokenizer) from --model; Bridge weights it holds are loaded; `bridge` > 0 adds fresh blocks."""
    import torch

    from ..hf import apply_bridge, has_saved_bridge, is_bridged, load_bridge

    model, tokenizer = load_pretrained(args.model)
    if has_saved_bridge(args.model):
        load_bridge(model, args.model)
    if bridge and not is_bridged(model):
        with torch.random.fork_rng():  # fresh blocks initialized from --seed
            torch.manual_seed(args.seed)
            apply_bridge(model, d_bridge=bridge, num_heads=args.bridge_heads, init_std=args.bridge_init_std)
    return model.eval(), tokenizer


def _save(model, tokenizer, out: str, dist) -> None:
    """The base weights in model.safetensors, the tokenizer, and the Bridge weights in bridge.safetensors (loaded by
    load_bridge): one save with one commit point. A model without Bridge drops the Bridge files of an earlier save."""
    from ..files import publish
    from ..hf import BRIDGE_FILES, base_state_dict, bridge_writer, is_bridged

    if not dist.is_main:
        return
    write_bridge = bridge_writer(model) if is_bridged(model) else None

    def write(directory: str) -> None:
        model.save_pretrained(directory, state_dict=base_state_dict(model))
        tokenizer.save_pretrained(directory)
        if write_bridge is not None:
            write_bridge(directory)

    publish(out, write, replaces=BRIDGE_FILES)
    print(f"saved the model to {out}")


def _pretrain(args, dist) -> int:
    from ..charlm import char_tokenizer
    from .recipes import BaseSpec, pretrain_base
    from .task_data import task_data

    task = _task(args)
    tokenizer = char_tokenizer(task.alphabet)
    train = task_data(task, tokenizer, "train", args.train_problems, args.data_seed)
    spec = BaseSpec(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        steps=args.steps,
        lr=args.lr,
        batch=args.batch,
        seed=args.seed,
    )
    model = pretrain_base(
        train, spec, progress=not args.no_progress, out_dir=args.out, checkpoint_every=args.checkpoint_every
    )
    _save(model, tokenizer, args.out, dist)
    return 0


def _sft(args, dist) -> int:
    from .sft import SFTConfig, collect_warmup_groups, train_sft
    from .task_data import task_data
    from .trainer import select_trainable

    model, tokenizer = _load(args, args.bridge)
    train = task_data(_task(args), tokenizer, "train", args.train_problems, args.data_seed)
    if args.warmup == "repair" and not hasattr(train.task, "repair"):
        raise SystemExit(
            f"bridge-ops: the repair warm-up needs a task with a reasoning chain to keep; {args.task} "
            "has none (use --task scratchpad-sum, or --warmup correct|distinct)"
        )
    if args.warmup == "ranked" and not hasattr(train.task, "rank"):
        raise SystemExit(
            f"bridge-ops: the ranked warm-up needs a task whose responses start with a random draw; {args.task} "
            "has none (use --task subset-sum)"
        )
    groups = collect_warmup_groups(
        model,
        train.prompts,
        args.width,
        args.warmup,
        reward_fn=train.reward,
        repair_fn=train.repair,
        rank_fn=train.rank,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
    )
    if not groups:
        raise SystemExit(
            f"bridge-ops: no prompt got >= 2 correct answers in {args.width} samples; the model is too "
            "weak for a warm-up (pretrain longer, or raise --width / --train-problems)"
        )
    if dist.is_main:
        print(
            f"warm-up data ({args.warmup}): {len(groups)} prompts with >= 2 correct of {args.width} samples "
            f"({sum(len(g[1]) for g in groups)} responses)"
        )
    config = SFTConfig(
        steps=args.steps,
        lr=args.lr,
        groups_per_step=args.groups_per_step,
        seed=args.seed,
        out_dir=args.out,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        added_lr_mult=args.added_lr_mult,
    )
    train_sft(model, groups, config, trainable=select_trainable(model, args.trainable), dist=dist)
    _save(model, tokenizer, args.out, dist)
    return 0


def _grpo(args, dist) -> int:
    from .grpo import GRPOConfig, train_grpo
    from .losses import GRPOLossConfig
    from .task_data import task_data
    from .trainer import select_trainable

    model, tokenizer = _load(args, args.bridge)
    train = task_data(_task(args), tokenizer, "train", args.train_problems, args.data_seed)
    config = GRPOConfig(
        steps=args.steps,
        lr=args.lr,
        width=args.width,
        prompts_per_step=args.prompts_per_step,
        groups_per_prompt=args.groups_per_prompt,
        added_lr_mult=args.added_lr_mult,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        minibatches=args.minibatches,
        loss=GRPOLossConfig(beta=args.beta),
        seed=args.seed,
        out_dir=args.out,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    train_grpo(
        model,
        train.prompts,
        train.reward,
        config,
        trainable=select_trainable(model, args.trainable),
        eos_token_id=tokenizer.eos_token_id,
        dist=dist,
    )
    _save(model, tokenizer, args.out, dist)
    return 0


def run_train(args) -> int:
    from ..files import ensure_writable_dir
    from .distributed import init_distributed

    dist = init_distributed()
    if dist.is_main:  # before any work: a run must not train for hours and then fail to save
        ensure_writable_dir(args.out)
    status = {"pretrain": _pretrain, "sft": _sft, "grpo": _grpo}[args.stage](args, dist)
    dist.finish()
    return status


def run_eval(args) -> int:
    from .evaluate import evaluate_widths
    from .task_data import task_data

    model, tokenizer = _load(args)
    test = task_data(_task(args), tokenizer, "test", args.test_problems, args.data_seed)
    results = []
    for peers in ("group", "solo") if args.peers == "both" else (args.peers,):
        results += evaluate_widths(
            model,
            test.prompts,
            test.reward,
            test.extract_answer,
            test.answers,
            args.widths,
            peers=peers,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            eos_token_id=tokenizer.eos_token_id,
            progress=not args.no_progress,
        )
    print("width  peers  mean_acc  majority  all_correct  any_correct")
    for r in results:
        print(
            f"{r['width']:>5}  {r['peers']:>5}  {r['mean_accuracy']:8.3f}  {r['majority_accuracy']:8.3f}  "
            f"{r['all_correct']:11.3f}  {r['any_correct']:11.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _common(parser, model: bool = True) -> None:
    if model:
        parser.add_argument("--model", required=True, help="a local HF model directory (with its tokenizer)")
    parser.add_argument("--task", default="arithmetic", choices=sorted(TASKS))
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated problems")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and data order")
    parser.add_argument("--max-new-tokens", type=positive_int, default=6)
    parser.add_argument("--no-progress", action="store_true")


def _training(parser, steps: int, lr: float) -> None:
    parser.add_argument("--out", required=True, help="output directory (resumes from its checkpoint.pt)")
    parser.add_argument("--steps", type=positive_int, default=steps)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--train-problems", type=positive_int, default=3000)
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=0)


def add_commands(commands) -> None:
    """Adds `train` (pretrain / sft / grpo) and `eval` to the `bridge-ops` subcommands."""
    train = commands.add_parser("train", help="pretrain a tiny base, Bridge SFT warm-up, GRPO (torchrun-ready)")
    stages = train.add_subparsers(dest="stage", required=True)

    pre = stages.add_parser("pretrain", help="a tiny base model trained from scratch on the task")
    _common(pre, model=False)
    _training(pre, steps=700, lr=3e-3)
    pre.add_argument("--hidden-size", type=positive_int, default=128)
    pre.add_argument("--layers", type=positive_int, default=4)
    pre.add_argument("--batch", type=positive_int, default=128)

    for name, steps, lr, trainable, width in (("sft", 150, 1e-3, "bridge", 8), ("grpo", 150, 1e-4, "all", 4)):
        stage = stages.add_parser(
            name,
            help={
                "sft": "SFT warm-up on groups of the model's own correct samples",
                "grpo": "GRPO with rollouts at width N",
            }[name],
        )
        _common(stage)
        _training(stage, steps, lr)
        stage.add_argument("--width", type=positive_int, default=width, help="samples per prompt")
        stage.add_argument(
            "--bridge",
            type=non_negative_int,
            default=0,
            metavar="D_BRIDGE",
            help="add fresh Bridge blocks of this inner width (when the model has none)",
        )
        stage.add_argument("--bridge-heads", type=positive_int, default=None)
        stage.add_argument(
            "--bridge-init-std",
            type=positive_float,
            default=None,
            help="std of the fresh blocks' Q/K/V projections (default hidden_size ** -0.5)",
        )
        stage.add_argument("--trainable", default=trainable, choices=["all", "bridge"])
        stage.add_argument(
            "--added-lr-mult",
            type=positive_float,
            default=1.0,
            help="learning-rate multiplier of the Bridge parameters when other parameters train too",
        )
    sft = stages.choices["sft"]
    sft.add_argument("--groups-per-step", type=positive_int, default=16)
    sft.add_argument(
        "--warmup",
        default="correct",
        choices=list(WARMUP_MODES),
        help="warm-up data: correct samples (the paper), distinct correct samples, each sample's own chain with "
        "the correct answer (repair: teaches a row to take the answer from its peers), or distinct answers assigned "
        "by the rows' random draws (ranked, subset-sum: teaches rows to split the answers between them)",
    )
    grpo = stages.choices["grpo"]
    grpo.add_argument("--prompts-per-step", type=positive_int, default=16)
    grpo.add_argument(
        "--groups-per-prompt",
        type=positive_int,
        default=1,
        help="Bridge groups per prompt; advantages over all their responses",
    )
    grpo.add_argument("--temperature", type=float, default=1.0)
    grpo.add_argument("--minibatches", type=positive_int, default=1)
    grpo.add_argument("--beta", type=non_negative_float, default=0.0, help="KL weight to the starting model")
    train.set_defaults(run=run_train)

    ev = commands.add_parser("eval", help="accuracy, majority vote and all-correct rate at several widths")
    _common(ev)
    ev.add_argument("--widths", type=int_list, default=[1, 2, 4, 8, 16], help="comma-separated, e.g. 1,2,4")
    ev.add_argument("--test-problems", type=positive_int, default=300)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument(
        "--peers",
        default="group",
        choices=["group", "solo", "both"],
        help="samples read each other (group), each sample alone (solo: the same checkpoint without "
        "interdependence), or both",
    )
    ev.add_argument("--json", default=None, help="also write the results to this file")
    ev.set_defaults(run=run_eval)
