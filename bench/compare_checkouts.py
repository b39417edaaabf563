"""Toy-model generation timed with two checkouts of bridge_ops (each with its extension built in place), in
alternated fresh processes, so a change can be checked for "no slower" on the same machine in the same run.

    python bench/compare_checkouts.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 4]

Each process imports bridge_ops from its checkout, builds test_bench_generation.py's random Llama (`build_models`:
hidden 1024, 8 layers, 155M parameters, float32; seeded, so both checkouts get the same weights) with and without
Bridge, and times `bridge_ops.generate` at 4 prompts x width 4, 32 new tokens, best of 3 after a warm-up call, with
the expanded and the shared-prefix cache. Prints a table of medians over rounds and the median per-round ratio
new / old for each case.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = [(bridged, cache) for bridged in (False, True) for cache in ("expanded", "shared-prefix")]

CHILD = """
import json, sys, time, torch
sys.path.insert(0, {bench!r})
import bridge_ops
from test_bench_generation import PROMPT_LEN, PROMPTS, NEW_TOKENS, WIDTH, build_models, prompts
models = build_models()
ids = prompts(PROMPTS, PROMPT_LEN)
times = {{}}
for with_bridge, cache in {cases!r}:
    model = models["bridged" if with_bridge else "unbridged"]
    seconds = []
    for _ in range(4):
        start = time.perf_counter()
        bridge_ops.generate(model, ids, WIDTH, NEW_TOKENS, eos_token_id=[], top_k=0, cache=cache)
        seconds.append(time.perf_counter() - start)
    times[f"{{'bridged' if with_bridge else 'unbridged'}} {{cache}}"] = min(seconds[1:])  # the first call warms up
print(json.dumps(dict(file=bridge_ops.__file__, times=times)))
"""


def run(checkout: str) -> dict:
    code = CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), cases=CASES)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(os.path.abspath(checkout)), result["file"]
    return result["times"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    rounds = []
    for i in range(args.rounds):
        old, new = run(args.old), run(args.new)
        rounds.append((old, new))
        print(f"round {i + 1}: " + ", ".join(f"{k} {new[k] / old[k]:.3f}" for k in old), flush=True)
    print("\n| toy generation, 4 prompts x width 4, 32 new tokens | old | new | new / old (median of rounds) |")
    print("|---|---|---|---|")
    for key in rounds[0][0]:
        old = statistics.median(r[0][key] for r in rounds)
        new = statistics.median(r[1][key] for r in rounds)
        ratio = statistics.median(r[1][key] / r[0][key] for r in rounds)
        print(f"| {key} | {old * 1e3:.0f} ms | {new * 1e3:.0f} ms | **{ratio:.3f}** |")


if __name__ == "__main__":
    main()
