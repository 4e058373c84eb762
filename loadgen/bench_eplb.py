"""Rank load balance (max/mean) of the EPLB placement against the identity placement.

    python -m loadgen.bench_eplb [--preset small] [--ep 4] [--nodes 2] [--redundant 16]
                                 [--tokens 8192] [--zipf 1.2] [--seed 0]

The MoE shape comes from the preset (small: 64 routed experts in 8 groups, top-6, 7 MoE layers).
Each layer has a Zipf(s) expert popularity over a random permutation of its experts (so the hot
experts differ by layer); each token picks top-k distinct experts, drawn without replacement in
proportion to popularity (group-limited routing is not modelled). The placement is computed on
window 1 and evaluated on window 2, fresh tokens from the same distribution, beside the identity
placement without redundancy (experts in order, E/EP per rank). Rank load = tokens an EP rank
receives, each expert's tokens split evenly over its replicas. The in-sample column evaluates
the placement on the window it was computed from.
"""
from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np

from shared.ep.eplb import balance, identity_placement, rank_loads, rebalance_experts
from shared.model.presets import PRESETS

GOAL = 1.10  # max/mean rank load the project aims for with EPLB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--ep", type=int, default=4, help="EP ranks (GPUs)")
    p.add_argument("--nodes", type=int, default=2, help="nodes the EP group spans")
    p.add_argument("--redundant", type=int, default=16, help="redundant expert slots per layer")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per window")
    p.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of expert popularity")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sample_window(rng: np.random.Generator, popularity: np.ndarray, num_tokens: int, top_k: int) -> np.ndarray:
    """Token counts [L, E]: per layer, each token takes top_k distinct experts drawn without
    replacement by popularity [L, E] (Gumbel top-k: the k largest log p + Gumbel noise)."""
    counts = np.zeros(popularity.shape, dtype=np.int64)
    for layer, p in enumerate(popularity):
        scores = np.log(p) + rng.gumbel(size=(num_tokens, p.size))  # [T, E]
        chosen = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]  # [T, K]
        counts[layer] = np.bincount(chosen.ravel(), minlength=p.size)
    return counts


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    shape = PRESETS[opts.preset]
    num_experts, num_groups, top_k = shape["n_routed_experts"], shape["n_group"], shape["num_experts_per_tok"]
    num_layers = shape["num_hidden_layers"] - shape["first_k_dense_replace"]
    num_replicas = num_experts + opts.redundant
    rng = np.random.default_rng(opts.seed)
    zipf = 1.0 / np.arange(1, num_experts + 1) ** opts.zipf
    popularity = np.stack([zipf[rng.permutation(num_experts)] for _ in range(num_layers)])
    popularity /= popularity.sum(axis=1, keepdims=True)
    window1 = sample_window(rng, popularity, opts.tokens, top_k)
    window2 = sample_window(rng, popularity, opts.tokens, top_k)

    placement = rebalance_experts(window1, num_replicas, num_groups, opts.nodes, opts.ep)
    policy = "hierarchical" if num_groups % opts.nodes == 0 else "global"
    identity = identity_placement(num_experts, num_experts, opts.ep, num_layers)
    before, before_mean = balance(rank_loads(window2, identity, opts.ep))
    after, after_mean = balance(rank_loads(window2, placement, opts.ep))
    in_sample, in_sample_mean = balance(rank_loads(window1, placement, opts.ep))

    print(f"EPLB on preset {opts.preset}: {num_experts} experts in {num_groups} groups, top-{top_k}, "
          f"{num_layers} MoE layers; EP{opts.ep} over {opts.nodes} nodes; {policy} policy")
    print(f"{opts.tokens} tokens per window, Zipf({opts.zipf}) popularity; placement from window 1, "
          f"evaluated on window 2")
    print(f"max/mean rank load (1.00 = perfect; goal <= {GOAL:.2f} with EPLB)\n")
    print(f"{'layer':>5}  {'identity ' + str(num_experts) + ' slots':>18}  "
          f"{'EPLB ' + str(num_replicas) + ' slots':>14}  {'EPLB in-sample':>14}")
    for layer in range(num_layers):
        print(f"{layer:>5}  {before[layer]:>18.3f}  {after[layer]:>14.3f}  {in_sample[layer]:>14.3f}")
    print(f"{'mean':>5}  {before_mean:>18.3f}  {after_mean:>14.3f}  {in_sample_mean:>14.3f}")
    print(f"{'worst':>5}  {before.max():>18.3f}  {after.max():>14.3f}  {in_sample.max():>14.3f}")
    verdict = "meets" if after_mean <= GOAL else "misses"
    print(f"\nEPLB mean {after_mean:.3f} vs identity {before_mean:.3f} (x{before_mean / after_mean:.2f} better); "
          f"{verdict} the {GOAL:.2f} goal")
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "loadgen.bench_eplb", *sys.argv[1:]])
    print(f"command: {command}")
    return {"command": command, "identity": before.tolist(), "eplb": after.tolist(),
            "eplb_in_sample": in_sample.tolist(), "identity_mean": before_mean, "eplb_mean": after_mean}


if __name__ == "__main__":
    main()
