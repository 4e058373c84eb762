"""One routed MoE layer against the memory it must read: effective GB/s of expert weights over the
measured read bandwidth, `loop` (one expert at a time: the engine before stacking) against the
chosen backend and every other backend, side by side in one run.

    python -m loadgen.bench_moe [--model DIR | --preset small] [--dtype auto|bf16|fp32]
        [--moe-backend auto|...] [--device cpu|cuda] [--batches 1,4,16,64] [--threads N] [--out FILE]

The layer has the model's shapes (random weights; only the config is read). B tokens each pick
top-K distinct experts uniformly at random; the (token, expert) pairs are sorted by expert and run
through `run_experts`. The weights are cold: the run rotates over copies of the layer that
together exceed 1 GiB, so no call finds its experts in the caches. Effective bandwidth = bytes of
the experts the B tokens touched / time; the ratio to the streaming-read bandwidth says how close
the layer is to its memory roofline (1.0 = every byte read once at full speed).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from shared.model.config import ModelArgs
from shared.model.experts import BACKENDS, ExpertStack, MoEPlan, check_supported, expert_counts, run_experts
from shared.model.presets import PRESETS

from .bench_model import memory_bandwidth, resolve_numerics

COLD_BYTES = 1 << 30
REPEATS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="a checkpoint directory (its config.json)")
    source.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--moe-backend", default="auto", help="the chosen backend or plan (auto: calibrated)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def model_args(opts: argparse.Namespace) -> ModelArgs:
    if opts.model is not None:
        return ModelArgs.from_file(opts.model / "config.json")
    from shared.model.presets import preset_config

    return ModelArgs.from_dict(preset_config(opts.preset))


def cold_stacks(args: ModelArgs, dtype: torch.dtype, device: str, gen: torch.Generator) -> list[ExpertStack]:
    e, d, i = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
    layer_bytes = 3 * e * d * i * dtype.itemsize
    copies = max(2, -(-COLD_BYTES // layer_bytes))
    return [ExpertStack(torch.randn(e, 2 * i, d, generator=gen).mul_(0.02).to(dtype=dtype, device=device),
                        torch.randn(e, d, i, generator=gen).mul_(0.02).to(dtype=dtype, device=device))
            for _ in range(copies)]


def time_backend(backend: str, xs: torch.Tensor, counts: torch.Tensor, stacks: list[ExpertStack]) -> float:
    """Best seconds per layer over REPEATS passes across every cold copy."""
    sync = torch.cuda.synchronize if xs.device.type == "cuda" else (lambda: None)
    run_experts(backend, xs, counts, stacks[0])  # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(REPEATS):
        sync()
        start = time.perf_counter()
        for stack in stacks:
            run_experts(backend, xs, counts, stack)
        sync()
        best = min(best, (time.perf_counter() - start) / len(stacks))
    return best


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    args = model_args(opts)
    dtype, plan, source = resolve_numerics(opts, args)
    gen = torch.Generator().manual_seed(opts.seed)
    stacks = cold_stacks(args, dtype, opts.device, gen)
    expert_bytes = 3 * args.hidden_size * args.moe_intermediate_size * dtype.itemsize
    measured = memory_bandwidth(device=opts.device)
    bandwidth, pieces = measured["read_gbps"], measured["chunk_read_gbps"]
    backends = [b for b in BACKENDS if b != "reference" and _supported(b, opts.device, dtype)]
    rows = []
    for num_tokens in [int(b) for b in opts.batches.split(",")]:
        e, k = args.n_routed_experts, args.num_experts_per_tok
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(num_tokens)])
        order = ids.flatten().argsort(stable=True)
        counts = expert_counts(ids, e).to(opts.device)
        xs = torch.randn(num_tokens, args.hidden_size, generator=gen).to(dtype)[order // k].to(opts.device)
        touched = int((counts > 0).sum())
        seconds = {b: time_backend(b, xs, counts, stacks) for b in backends}
        chosen = plan.choose(num_tokens)
        gbps = {b: touched * expert_bytes / s / 1e9 for b, s in seconds.items()}
        rows.append({"tokens": num_tokens, "experts_touched": touched, "chosen": chosen,
                     "ms": {b: 1e3 * s for b, s in seconds.items()}, "gb_s": gbps,
                     "of_bandwidth": {b: g / bandwidth for b, g in gbps.items()},
                     "of_piece_bandwidth": {b: g / pieces for b, g in gbps.items()},
                     "chosen_over_loop_speed": seconds["loop"] / seconds[chosen]})
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "loadgen.bench_moe", *sys.argv[1:]])
    result = {"command": command, "device": opts.device, "dtype": str(dtype).removeprefix("torch."),
              "moe_backend": plan.text, "numerics_source": source, "threads": opts.threads,
              "shape": {"experts": args.n_routed_experts, "top_k": args.num_experts_per_tok,
                        "hidden": args.hidden_size, "moe_inter": args.moe_intermediate_size},
              "read_gb_s": bandwidth, "piece_read_gb_s": pieces, "piece_bytes": measured["chunk_bytes"],
              "cold_copies": len(stacks), "rows": rows}
    report(result, backends)
    if opts.out is not None:
        opts.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _supported(backend: str, device: str, dtype: torch.dtype) -> bool:
    try:
        check_supported(MoEPlan.single(backend), device, dtype)
        return True
    except ValueError:
        return False


def report(r: dict, backends: list[str]) -> None:
    print(f"\ncommand: {r['command']}")
    s = r["shape"]
    print(f"one routed MoE layer: {s['experts']} experts, top-{s['top_k']}, hidden {s['hidden']}, moe_inter "
          f"{s['moe_inter']}; {r['dtype']} on {r['device']}, {r['threads']} threads; backend {r['moe_backend']} "
          f"({r['numerics_source']}); read bandwidth {r['read_gb_s']:.1f} GB/s "
          f"(cold {r['piece_bytes'] / 2**20:.1f} MiB pieces {r['piece_read_gb_s']:.1f} GB/s); "
          f"{r['cold_copies']} cold copies")
    print(f"{'B':>4} {'experts':>8} " + " ".join(f"{b:>18}" for b in backends) + f" {'chosen':>13} {'vs loop':>8}"
          f" {'pieces':>7}")
    for row in r["rows"]:
        cells = " ".join(f"{row['ms'][b]:7.2f}ms {row['of_bandwidth'][b]:5.2f}bw" for b in backends)
        print(f"{row['tokens']:4d} {row['experts_touched']:8d} {cells} {row['chosen']:>13} "
              f"{row['chosen_over_loop_speed']:7.2f}x {row['of_piece_bandwidth'][row['chosen']]:6.2f}")
    print("(ms per layer; bw = effective GB/s of the touched experts' weights / read bandwidth; pieces = the chosen "
          "backend's GB/s / the cold-pieces read rate)")


if __name__ == "__main__":
    main()
