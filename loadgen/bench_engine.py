"""Output tokens/s of our batched engine against transformers `generate`, same checkpoint, one run.

    python -m loadgen.bench_engine [--model DIR] [--num-requests 64] [--input-len 288 --output-len 144
        --range-ratio 0.78] [--reference-requests 16] [--reference-batch 16] [--dtype auto] [--out FILE]

The workload is the one in loadgen/README.md ("Engine: ours vs transformers `generate`"): input
lengths uniform in 64..512, output lengths uniform in 32..256 (len·(1±R) as `vllm bench serve`),
all requests submitted at once, greedy, EOS ignored.
Ours runs every request through the engine (continuous batching, paged latent KV, chunked
prefill). The reference runs `generate(do_sample=False)` on padded batches (left padding) of
`--reference-batch`; each batch decodes until its longest request is done, and only the tokens
the requests asked for are counted. transformers re-expands its whole latent cache through
kv_b_proj at every step, so it is slow on long outputs: by default it runs the first
`--reference-requests` requests, and ours is also timed on exactly those, so the headline
ratio compares the same work.
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

from shared.engine.engine import Engine, EngineConfig
from shared.engine.sequence import SamplingParams
from shared.model.config import ModelArgs
from shared.model.kv_cache import LatentKVPool
from shared.model.loader import load_model
from shared.model.moe import MoE

from .bench_model import matmul_rate, memory_bandwidth, model_dir, resolve_numerics, step_cost, touched_experts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=288)
    p.add_argument("--output-len", type=int, default=144)
    p.add_argument("--range-ratio", type=float, default=0.78)  # 288·(1±0.78) = 64..512; 144 -> 32..256
    p.add_argument("--reference-requests", type=int, default=16, help="0: skip the reference")
    p.add_argument("--reference-batch", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-mib", type=int, default=1024)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--moe-backend", default="auto", help="MoE backend or plan; auto: calibrated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compare-loop", action=argparse.BooleanOptionalAction, default=True,
                   help="also run every request with the `loop` MoE backend (the engine before stacking)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def workload(opts, vocab: int) -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(opts.seed)

    def lengths(mean: int) -> list[int]:
        low, high = int(mean * (1 - opts.range_ratio)), int(mean * (1 + opts.range_ratio))
        return torch.randint(low, high + 1, (opts.num_requests,), generator=gen).tolist()

    ins, outs = lengths(opts.input_len), lengths(opts.output_len)
    return [(torch.randint(3, vocab, (n,), generator=gen).tolist(), m) for n, m in zip(ins, outs)]


def run_ours(model, requests, opts, roof: tuple[float, float] | None = None) -> dict:
    """Every request through the engine; `roof` (read B/s, FLOP/s): each full-batch decode step is
    also compared with its roofline (bench_model.step_cost)."""
    engine = Engine(model, EngineConfig(kv_cache_bytes=opts.kv_cache_mib << 20, max_num_seqs=len(requests),
                                        max_num_batched_tokens=opts.max_num_batched_tokens))
    for i, (prompt, n) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    outputs: dict[str, list[int]] = {}
    decode_steps: list[float] = []
    over_bound: list[tuple[int, float]] = []  # (running requests, step / roofline)
    loads = [block.mlp.expert_load for block in model.model.layers if isinstance(block.mlp, MoE)]
    start = time.perf_counter()
    while engine.has_unfinished():
        running = engine.scheduler.running
        pure_decode = not engine.scheduler.waiting and len(running) > 1 and all(s.num_uncomputed == 1 for s in running)
        contexts = [s.num_computed + 1 for s in running]
        t = time.perf_counter()
        deltas = engine.step()
        if pure_decode:
            decode_steps.append(time.perf_counter() - t)
            if roof is not None and None not in loads:
                touched, loads = touched_experts(model, loads)
                nbytes, flops, _, _ = step_cost(model, contexts, touched)
                over_bound.append((len(contexts), decode_steps[-1] / max(nbytes / roof[0], flops / roof[1])))
        if roof is not None:
            loads = [block.mlp.expert_load.clone() for block in model.model.layers if isinstance(block.mlp, MoE)]
        for d in deltas:
            outputs.setdefault(d.request_id, []).extend(d.token_ids)
    elapsed = time.perf_counter() - start
    tokens = sum(len(v) for v in outputs.values())
    assert tokens == sum(n for _, n in requests)
    return {"seconds": elapsed, "output_tokens": tokens, "output_tok_s": tokens / elapsed,
            "median_decode_step_ms": 1e3 * sorted(decode_steps)[len(decode_steps) // 2] if decode_steps else None,
            "median_over_bound_at_full_batch": _median([r for n, r in over_bound if n == len(requests)]),
            "preemptions": engine.scheduler.num_preemptions,
            "tokens": [outputs[f"r{i}"] for i in range(len(requests))]}


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def run_reference(ref, requests, batch_size: int, device: str = "cpu") -> dict:
    tokens, outputs = 0, []
    start = time.perf_counter()
    for b in range(0, len(requests), batch_size):
        chunk = requests[b:b + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (p, _) in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)  # left padding, as generate wants
            mask[row, width - len(p):] = 1
        longest = max(n for _, n in chunk)
        out = ref.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                           min_new_tokens=longest,
                           do_sample=False, pad_token_id=0)
        for row, (_, n) in enumerate(chunk):
            outputs.append(out[row, width:width + n].tolist())
            tokens += n
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": tokens, "output_tok_s": tokens / elapsed, "tokens": outputs}


def reference_kv_bytes_per_token(ref, vocab: int, n: int = 128, device: str = "cpu") -> float:
    """Bytes transformers' own cache holds per token of one unpadded sequence."""
    out = ref(input_ids=torch.randint(3, vocab, (1, n)).to(device), use_cache=True, logits_to_keep=1)
    layers = out.cache.layers
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)) / n


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    path = model_dir(opts.model)
    args = ModelArgs.from_file(path / "config.json")
    dtype, plan, source = resolve_numerics(opts, args)
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "loadgen.bench_engine", *sys.argv[1:]])
    model = load_model(path, dtype=dtype, device=opts.device, moe_backend=plan)
    requests = workload(opts, args.vocab_size)
    # warm-up: a short request through every path once
    run_ours(model, [(requests[0][0][:32], 4)], opts)
    bandwidth = memory_bandwidth(device=opts.device)["read_gbps"]
    rate = matmul_rate(dtype, opts.device)
    result = {"command": command, "dtype": str(dtype).removeprefix("torch."), "moe_backend": plan.text,
              "numerics_source": source, "device": opts.device, "threads": opts.threads,
              "num_requests": len(requests), "memory_read_gb_s": bandwidth, "matmul_flop_s": rate,
              "input_tokens": sum(len(p) for p, _ in requests), "requested_output_tokens": sum(n for _, n in requests)}
    result["ours_all"] = run_ours(model, requests, opts, (bandwidth * 1e9, rate))
    if opts.compare_loop:
        model.set_moe_backend("loop")
        result["ours_all_loop"] = run_ours(model, requests, opts, (bandwidth * 1e9, rate))
        model.set_moe_backend(plan)
        result["ratio_chosen_vs_loop"] = result["ours_all"]["output_tok_s"] / result["ours_all_loop"]["output_tok_s"]
        result["greedy_equal_chosen_vs_loop"] = sum(a == b for a, b in zip(result["ours_all"]["tokens"],
                                                                           result["ours_all_loop"]["tokens"]))
    sub = requests[:opts.reference_requests]
    if sub:
        from transformers import DeepseekV3ForCausalLM

        ref = DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=dtype).to(opts.device).eval()
        with torch.inference_mode():  # on the same device as ours
            result["reference"] = run_reference(ref, sub, opts.reference_batch, opts.device)
            result["reference_kv_bytes_per_token"] = reference_kv_bytes_per_token(ref, args.vocab_size,
                                                                                   device=opts.device)
        result["ours_subset"] = run_ours(model, sub, opts)
        agree = [next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                 for x, y in zip(result["ours_subset"]["tokens"], result["reference"]["tokens"])]
        result["greedy_agreement_first_tokens"] = agree
        result["ratio_subset"] = result["ours_subset"]["output_tok_s"] / result["reference"]["output_tok_s"]
        result["ratio_all_vs_reference"] = result["ours_all"]["output_tok_s"] / result["reference"]["output_tok_s"]
    result["kv_bytes_per_token"] = LatentKVPool.bytes_per_token(args, dtype)
    report(result)
    if opts.out:
        slim = {k: ({kk: vv for kk, vv in v.items() if kk != "tokens"} if isinstance(v, dict) else v)
                for k, v in result.items()}
        opts.out.write_text(json.dumps(slim, indent=2) + "\n")
    return result


def report(r: dict) -> None:
    print(f"\ncommand: {r['command']}")
    print(f"{r['num_requests']} requests, {r['input_tokens']} input tokens, {r['requested_output_tokens']} output "
          f"tokens, dtype={r['dtype']}, moe_backend={r['moe_backend']} ({r['numerics_source']}), "
          f"device={r['device']}, threads={r['threads']}")
    rows = [(f"ours ({r['moe_backend']}), all", r["ours_all"])]
    if "ours_all_loop" in r:
        rows.append(("ours (loop), all", r["ours_all_loop"]))
    if "reference" in r:
        n = len(r["reference"]["tokens"])
        rows += [(f"ours, first {n}", r["ours_subset"]), (f"transformers, first {n}", r["reference"])]
    print(f"{'':36s} {'seconds':>9s} {'out tokens':>11s} {'out tok/s':>10s} {'step@full':>10s} {'÷ bound':>8s}")
    for name, row in rows:
        step, over = row.get("median_decode_step_ms"), row.get("median_over_bound_at_full_batch")
        print(f"{name:36s} {row['seconds']:9.1f} {row['output_tokens']:11d} {row['output_tok_s']:10.1f} "
              + (f"{step:8.1f}ms" if step else f"{'':10s}") + (f" {over:7.2f}x" if over else ""))
    if "ratio_chosen_vs_loop" in r:
        print(f"chosen backend vs loop on the same {r['num_requests']} requests: {r['ratio_chosen_vs_loop']:.2f}x "
              f"output tok/s; greedy outputs identical for {r['greedy_equal_chosen_vs_loop']} of {r['num_requests']}")
    if "reference" in r:
        print(f"ours/transformers output tok/s on the same {len(r['reference']['tokens'])} requests: "
              f"{r['ratio_subset']:.2f}x; ours on all {r['num_requests']} vs that reference: "
              f"{r['ratio_all_vs_reference']:.2f}x")
        print(f"greedy tokens equal to the reference before the first difference: {r['greedy_agreement_first_tokens']}")
    print(f"roofline: read {r['memory_read_gb_s']:.1f} GB/s, matmul {r['matmul_flop_s'] / 1e9:.0f} GFLOP/s; "
          "step@full = median decode step with every request running, ÷ bound = that step over "
          "max(bytes / bandwidth, FLOPs / rate) (loadgen/bench_model.py: step_cost)")
    ref_kv = r.get("reference_kv_bytes_per_token")
    print(f"KV bytes per token: ours {r['kv_bytes_per_token']} (latent only)"
          + (f", transformers {ref_kv:.0f} (unpadded; a padded batch also holds its padding)" if ref_kv else "")
          + f"; preemptions: {r['ours_all']['preemptions']}")


if __name__ == "__main__":
    main()
