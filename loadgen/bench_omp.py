"""Decode steps with one OpenMP team per process against two: why a worker computes on one thread.

    python -m loadgen.bench_omp [--model DIR] [--rows 32] [--input-len 16] [--output-len 60]
        [--rounds 2] [--dtype auto] [--moe-backend auto] [--threads N] [--out FILE]

The same decode workload (`--rows` requests of `--input-len` random tokens, `--output-len` greedy
tokens each, EOS ignored, all at once) runs through the engine in three layouts, each in a fresh
process (a thread's OpenMP team lives as long as the thread), alternated `--rounds` times:
- `main`: the steps on the main thread (the in-process engine, `streamoe generate`);
- `compute`: the steps on a compute thread, every other thread serial (a worker: the model loaded
  and every step computed on its compute thread; shared/runtime/omp.py);
- `two-teams`: the steps on a compute thread after the main thread ran parallel regions of its
  own (a worker whose main thread, or an `asyncio.to_thread` helper, touched big tensors: libgomp
  then holds more threads than cores and cuts every waiting thread's spin short).
It reports each layout's median step time over the steps with every request running.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

LAYOUTS = ("main", "compute", "two-teams")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a checkpoint (default: the small preset's)")
    p.add_argument("--rows", type=int, default=32, help="requests decoded together")
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2, help="each layout this many times, alternated")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--moe-backend", default="auto", help="MoE backend or plan; auto: calibrated")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--layout", choices=LAYOUTS, default=None, help=argparse.SUPPRESS)  # one child's
    return p.parse_args(argv)


def one_layout(opts: argparse.Namespace) -> dict:
    """In this (fresh) process: load, warm up and decode in `opts.layout`; the step times."""
    from shared.engine.engine import Engine, EngineConfig
    from shared.engine.sequence import SamplingParams
    from shared.model.config import ModelArgs
    from shared.model.loader import load_model
    from shared.runtime.engine_service import compute_pool
    from shared.runtime.omp import serial_thread

    from .bench_model import model_dir, resolve_numerics

    path = model_dir(opts.model)
    args = ModelArgs.from_file(path / "config.json")
    compute = compute_pool(opts.threads)

    def run(fn, *fn_args):
        return fn(*fn_args) if opts.layout == "main" else compute.submit(fn, *fn_args).result()

    if opts.layout == "main":
        torch.set_num_threads(opts.threads)
    else:
        serial_thread()
    dtype, plan, _ = run(resolve_numerics, argparse.Namespace(**{**vars(opts), "device": "cpu"}), args)
    engine = run(lambda: Engine(load_model(path, dtype=dtype, moe_backend=plan), EngineConfig()))
    if opts.layout == "two-teams":  # the main thread's own team, as a worker's loop thread could start one
        torch.set_num_threads(opts.threads)  # the main thread's count back (serial_thread set it to 1)
        float((torch.ones(4096, 4096) * 2).sum())
    generator = torch.Generator().manual_seed(opts.seed)

    def decode(tag: str, output_len: int) -> list[tuple[float, int]]:
        for i in range(opts.rows):
            prompt = torch.randint(0, args.vocab_size, (opts.input_len,), generator=generator).tolist()
            engine.add_request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=output_len, ignore_eos=True))
        steps = []
        while engine.has_unfinished():
            running = len(engine.scheduler.running)  # 0 before the prefill step
            start = time.perf_counter()
            run(engine.step)
            steps.append((time.perf_counter() - start, running))
        return steps

    decode("warm", 4)
    full = [s for s, running in decode("run", opts.output_len) if running == opts.rows]  # the decode steps
    return {"layout": opts.layout, "steps": len(full), "median_step_ms": statistics.median(full) * 1e3,
            "dtype": str(dtype).removeprefix("torch."), "moe_backend": plan.text, "threads": opts.threads,
            "process_threads": len(os.listdir("/proc/self/task"))}


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    if opts.layout is not None:
        print(json.dumps(one_layout(opts)))
        return {}
    argv = list(sys.argv[1:] if argv is None else argv)
    runs = {layout: [] for layout in LAYOUTS}
    for _ in range(opts.rounds):
        for layout in LAYOUTS:
            done = subprocess.run([sys.executable, "-m", "loadgen.bench_omp", *argv, "--layout", layout],
                                  capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            runs[layout].append(r)
            print(f"{layout:10} median step {r['median_step_ms']:6.1f} ms over {r['steps']} steps of {opts.rows} rows "
                  f"({r['dtype']}, {r['moe_backend']}, {r['threads']} threads; {r['process_threads']} threads in "
                  "the process)", flush=True)
    medians = {layout: statistics.median(r["median_step_ms"] for r in rs) for layout, rs in runs.items()}
    result = {"command": "python -m loadgen.bench_omp " + " ".join(argv), "cpus": os.cpu_count(), "runs": runs,
              "median_step_ms": medians, "two_teams_over_compute": medians["two-teams"] / medians["compute"],
              "compute_over_main": medians["compute"] / medians["main"]}
    print(f"two-teams / compute {result['two_teams_over_compute']:.2f}x; compute / main "
          f"{result['compute_over_main']:.2f}x")
    if opts.out:
        opts.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
