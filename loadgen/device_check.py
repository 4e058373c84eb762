"""Issue #15's checks on an accelerator, in one command that keeps to a time budget.

    python -m loadgen.device_check [--device cuda] [--out DIR] [--budget-s 420] [--quick] [--only STEPS]

A lent GPU machine is short-lived and its time is counted from its start, so the checks run as one
prepared script, in this order, each a subprocess given what is left of `--budget-s` (at most its
own cap), its output appended to DIR/device-check.log:

1. the environment: Python, torch, the device's name and memory;
2. `pytest -m cuda tests/test_cuda.py`: from a step's inputs on the device to its sampled ids, no
   host synchronisation (bf16, EP size 1, the grouped MoE backend); grouped and loop agree;
3. `loadgen.bench_engine` on the device, `small`, 16 requests, bf16, `grouped`: output tokens/s
   against transformers' `generate` on the same device and requests, greedy agreement, `grouped`
   against `loop`, each full-batch decode step against its roofline;
4. `loadgen.bench_moe` on the device: one routed MoE layer at 1, 4, 16 and 64 tokens, every backend
   the device runs, effective GB/s of the touched experts' weights over the measured read rate;
5. `loadgen.bench_model --no-reference` on the device: decode steps at 1, 16 and 64 requests
   against their roofline.

DIR/device-check.json holds each step's command, exit status and seconds, the benchmarks' results
(also in DIR/bench-*.json), and the headline figures, which are printed at the end. A step that
fails or runs out of time is recorded and the next one still runs.

`--quick` runs the same steps at toy sizes on the `tiny` preset: a dry run on the CPU
(`--device cpu --quick`, the CUDA tests then skip) before device time is spent on it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAPS_S = {"environment": 60, "tests": 150, "engine": 180, "moe": 90, "model": 120}
ENVIRONMENT = """
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
print(json.dumps(info))
"""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.device_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("device-check"), help="the log, the benchmarks' JSON and the "
                   "summary go here")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for every step together")
    p.add_argument("--quick", action="store_true", help="toy sizes on the tiny preset (a dry run on the CPU)")
    p.add_argument("--only", default=",".join(CAPS_S), help=f"the steps to run, comma-separated ({', '.join(CAPS_S)})")
    return p.parse_args(argv)


def steps(args: argparse.Namespace, model: Path | None) -> list[tuple[str, list[str], Path | None]]:
    """(name, argv, the JSON it writes) of every step, in order."""
    py, out, dev = sys.executable, args.out, args.device
    model_arg = [] if model is None else ["--model", str(model)]
    engine = ["--num-requests", "4", "--input-len", "24", "--output-len", "6", "--reference-requests", "4",
              "--reference-batch", "4"] if args.quick else ["--num-requests", "16", "--reference-requests", "16"]
    moe = ["--preset", "tiny", "--batches", "1,4"] if args.quick else ["--preset", "small"]
    roof = ["--roofline-batches", "1,3", "--roofline-steps", "1", "--input-len", "16"] if args.quick \
        else ["--roofline-steps", "8"]
    return [
        ("environment", [py, "-c", ENVIRONMENT], None),
        ("tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"], None),
        ("engine", [py, "-m", "loadgen.bench_engine", *model_arg, "--device", dev, "--dtype", "bf16", "--moe-backend",
                    "grouped", *engine, "--out", str(out / "bench-engine.json")], out / "bench-engine.json"),
        ("moe", [py, "-m", "loadgen.bench_moe", "--device", dev, "--dtype", "bf16", "--moe-backend", "grouped", *moe,
                 "--out", str(out / "bench-moe.json")], out / "bench-moe.json"),
        ("model", [py, "-m", "loadgen.bench_model", *model_arg, "--device", dev, "--dtype", "bf16", "--moe-backend",
                   "grouped", "--no-reference", *roof, "--out", str(out / "bench-model.json")],
         out / "bench-model.json"),
    ]


def run_step(name: str, argv: list[str], left_s: float, log) -> dict:
    """One step as a subprocess (its output into the log), killed past min(its cap, what is left)."""
    limit = max(1.0, min(CAPS_S[name], left_s))
    log.write(f"\n==== {name}: {' '.join(argv)} (limit {limit:.0f} s)\n")
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        rc = None
    log.write(output)
    log.flush()
    return {"command": " ".join(argv), "rc": rc, "timed_out": rc is None, "seconds": time.monotonic() - start,
            "tail": output[-1500:]}


def headlines(results: dict) -> dict:
    """The figures the README takes from a device run."""
    h: dict = {}
    env = results.get("environment", {})
    if env.get("rc") == 0:
        try:
            h["environment"] = json.loads(env["tail"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
    if "tests" in results:
        h["tests"] = results["tests"]["tail"].strip().splitlines()[-1] if results["tests"]["tail"].strip() else ""
    engine = results.get("engine", {}).get("result")
    if engine:
        h["engine"] = {k: engine.get(k) for k in ("ratio_subset", "ratio_all_vs_reference", "ratio_chosen_vs_loop",
                                                  "greedy_equal_chosen_vs_loop", "greedy_agreement_first_tokens")}
        h["engine"]["output_tok_s"] = engine["ours_all"]["output_tok_s"]
        h["engine"]["over_bound_at_full_batch"] = engine["ours_all"]["median_over_bound_at_full_batch"]
    moe = results.get("moe", {}).get("result")
    if moe:
        h["moe"] = [{"tokens": r["tokens"], "chosen": r["chosen"], "of_bandwidth": r["of_bandwidth"][r["chosen"]],
                     "vs_loop": r["chosen_over_loop_speed"]} for r in moe["rows"]]
    model = results.get("model", {}).get("result")
    if model:
        h["model"] = [{"running": r["batch"], "step_ms": r["step_ms"], "over_bound": r["over_bound"],
                       "over_parts_bound": r["over_parts_bound"]} for r in model.get("roofline", [])]
    return h


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    wanted = args.only.split(",")
    if unknown := [w for w in wanted if w not in CAPS_S]:
        raise SystemExit(f"--only={args.only}: no step {', '.join(unknown)} (steps: {', '.join(CAPS_S)})")
    args.out.mkdir(parents=True, exist_ok=True)
    model = None
    if args.quick:  # the tiny preset, written here once
        from shared.model.presets import init_model

        model = init_model(Path(tempfile.mkdtemp(prefix="device-check-")), "tiny", seed=0, dtype="bf16")
    deadline = time.monotonic() + args.budget_s
    results: dict = {}
    with open(args.out / "device-check.log", "a") as log:
        for name, step_argv, written in steps(args, model):
            if name not in wanted:
                continue
            left = deadline - time.monotonic()
            if left < 5:
                results[name] = {"command": " ".join(step_argv), "rc": None, "skipped": "no time left"}
                continue
            results[name] = run_step(name, step_argv, left, log)
            if written is not None and results[name]["rc"] == 0 and written.exists():
                results[name]["result"] = json.loads(written.read_text())
            print(f"{name}: rc {results[name]['rc']}, {results[name]['seconds']:.0f} s", flush=True)
    summary = {"device": args.device, "quick": args.quick, "budget_s": args.budget_s,
               "steps": {k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in results.items()},
               "headlines": headlines(results)}
    (args.out / "device-check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary["headlines"], indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
