"""One layer's single-token decode attention (MLA, absorbed path), torch's way against the native
kernels', side by side in one run.

    python -m loadgen.bench_attention [--model DIR | --preset small] [--seqs 1,16,64] [--context 256]
        [--threads N] [--repeats 9] [--out FILE]

The layer has the model's shapes (random weights; only the config is read) and runs in bf16 on the
CPU. S sequences decode one token each against `--context` cached rows. Both paths go through
`MLA.attend`, as a decode step does:
- torch: each bucket's contexts gathered from the cache, the W_UK product (`bmm`), one SDPA call,
  the W_UV product (`bmm`) (MLA._decode);
- native: the W_UK and W_UV products per head and the attention reading each context's rows in
  place by slot (MLA._decode_in_place; shared/model/native.py).
The output projection is left out (a dense linear; `bench_model` times whole decode steps).
The cache rows are cold: the runs rotate over copies of the layer's cache that together exceed
COLD_BYTES. The two paths alternate call by call; each figure is the median of `--repeats` calls.
FLOPs per sequence: 2·H·(N·C + L·(C+R) + L·C + C·V) (the absorbed products, scores, weighted sum).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from shared.model import native
from shared.model.attention import MLA, AttentionBatch
from shared.model.config import ModelArgs
from shared.model.experts import MoEPlan
from shared.model.kv_cache import LatentKVPool
from shared.model.presets import PRESETS

from .bench_moe import model_args

COLD_BYTES = 256 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="a checkpoint directory (its config.json)")
    source.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--seqs", default="1,16,64", help="decoding sequences per call")
    p.add_argument("--context", type=int, default=256, help="cached rows per sequence")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def flops(args: ModelArgs, seqs: int, length: int) -> int:
    h, c, r = args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim
    n, v = args.qk_nope_head_dim, args.v_head_dim
    return 2 * seqs * h * (n * c + length * (c + r) + length * c + c * v)


def run(args: ModelArgs, seqs: int, context: int, repeats: int, gen: torch.Generator) -> dict:
    mla = MLA(args, 0).to(torch.bfloat16)
    for p in mla.parameters():
        p.data.normal_(0, 0.02, generator=gen)
    mla.o_proj = torch.nn.Identity()  # a dense linear like the others (bench_model times the whole step)
    length = context + 1  # the cached rows and the new token's
    width = args.kv_lora_rank + args.qk_rope_head_dim
    copies = max(2, -(-COLD_BYTES // (seqs * length * width * 2)))
    # the engine's pool, with `copies` layers of random rows; the MLA module's `layer` picks the copy
    cache = LatentKVPool(dataclasses.replace(args, num_hidden_layers=copies, num_nextn_predict_layers=0), seqs * length,
                         torch.bfloat16)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=gen))
    slots = torch.arange(seqs * length).view(seqs, length)
    batch = AttentionBatch([1] * seqs, [length] * seqs, [True] * seqs, slot_mapping=slots[:, -1],
                           context_slots=list(slots))
    h = args.num_attention_heads
    q_nope = torch.randn(seqs, h, args.qk_nope_head_dim, generator=gen).to(torch.bfloat16)
    q_pe = torch.randn(seqs, h, args.qk_rope_head_dim, generator=gen).to(torch.bfloat16)
    kv = cache.kv[0, slots[:, -1]]
    paths = {"torch": None, "native": MoEPlan.single("native")}
    times: dict[str, list[float]] = {name: [] for name in paths}
    outputs = {}
    with torch.inference_mode():
        for name, plan in paths.items():  # warm-up, and the two results compared
            mla.native_plan = plan
            outputs[name] = mla.attend(q_nope, q_pe, kv, batch, cache).float()
        for i in range(repeats):
            for name, plan in paths.items():
                mla.native_plan = plan
                mla.layer = (2 * i + (name == "native")) % copies
                start = time.perf_counter()
                mla.attend(q_nope, q_pe, kv, batch, cache)
                times[name].append(time.perf_counter() - start)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    work = flops(args, seqs, length)
    diff = float((outputs["native"] - outputs["torch"]).abs().max() / outputs["torch"].abs().max())
    return {"seqs": seqs, "context": length, "flops": work, "cold_copies": copies, "max_diff_of_max": diff,
            "ms": {name: 1e3 * s for name, s in median.items()},
            "gflop_s": {name: work / s / 1e9 for name, s in median.items()},
            "native_speedup": median["torch"] / median["native"]}


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    why = native.unavailable()
    if why is not None:
        raise SystemExit(f"bench_attention: the native kernels are unavailable here: {why}")
    args = model_args(opts)
    gen = torch.Generator().manual_seed(opts.seed)
    rows = [run(args, int(s), opts.context, opts.repeats, gen) for s in opts.seqs.split(",")]
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "loadgen.bench_attention", *sys.argv[1:]])
    result = {"command": command, "threads": opts.threads, "kernels": native.kind(),
              "shape": {"heads": args.num_attention_heads, "latent": args.kv_lora_rank,
                        "rope": args.qk_rope_head_dim, "nope": args.qk_nope_head_dim, "v": args.v_head_dim},
              "rows": rows}
    report(result)
    if opts.out is not None:
        opts.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(r: dict) -> None:
    print(f"\ncommand: {r['command']}")
    s = r["shape"]
    print(f"one layer's decode attention: {s['heads']} heads, latent {s['latent']} + rope {s['rope']}; "
          f"bf16 on the CPU, {r['threads']} threads; native kernels: {r['kernels']}")
    print(f"{'seqs':>5} {'context':>8} {'torch':>18} {'native':>18} {'native faster':>14} {'max diff':>9}")
    for row in r["rows"]:
        cells = " ".join(f"{row['ms'][p]:7.3f}ms {row['gflop_s'][p]:5.0f}GF/s" for p in ("torch", "native"))
        print(f"{row['seqs']:5d} {row['context']:8d} {cells} {row['native_speedup']:13.2f}x "
              f"{row['max_diff_of_max']:9.4f}")
    print("(median ms per layer; GF/s = GFLOP/s of the absorbed products, scores and weighted sum; max diff = the "
          "largest difference of the two outputs over the largest output)")


if __name__ == "__main__":
    main()
