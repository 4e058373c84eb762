"""Prefill and decode throughput of our DeepseekV3 against transformers' DeepseekV3ForCausalLM.

    python -m loadgen.bench_model [--model DIR] [--batch 16] [--input-len 256] [--output-len 32]
                                  [--dtype bf16] [--threads N] [--out FILE.json]

Both models run in this one process, on the same checkpoint (the `small` preset unless --model
is given) and the same seeded random prompts. Ours packs the batch without padding, prefills on
the expanded attention path into a LatentKVPool and decodes on the absorbed path reading it, as
in serving; the reference runs [batch, len] tensors with its own KV cache. Each side is warmed up
once, then repeats alternate ours/reference (so machine noise hits both) and the best is kept.
The decode step is also compared with its weight-read bound: parameter bytes / measured memory
bandwidth.
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

from shared.model.attention import AttentionBatch
from shared.model.kv_cache import LatentKVPool
from shared.model.config import ModelArgs
from shared.model.loader import load_model, resolve_dtype
from shared.model.presets import init_model

DEFAULT_DIR = Path.home() / ".cache" / "streamoe" / "models" / "small-bench"
REPEATS = 2  # best of REPEATS, interleaved


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help=f"HF checkpoint dir (default: small preset in {DEFAULT_DIR})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32, help="decode steps after the prefill token")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute dtype; auto: bf16 where the CPU has native bf16 units (AMX/AVX512-BF16), else fp32")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the numbers here as JSON")
    return p.parse_args(argv)


def model_dir(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    if not (DEFAULT_DIR / "model.safetensors").exists():  # created once, reused by later runs
        print(f"creating the small preset checkpoint in {DEFAULT_DIR} ...", flush=True)
        init_model(DEFAULT_DIR, preset="small", seed=0, dtype="bf16")
    return DEFAULT_DIR


# -- ours -----------------------------------------------------------------------------------------
def run_ours(model, prompts: torch.Tensor, steps: int) -> tuple[float, float, torch.Tensor]:
    """Prefill all prompts in one packed forward, then `steps` batched decode steps.
    Returns (prefill seconds, decode seconds, greedy tokens [B, steps + 1])."""
    args = model.args
    b, n = prompts.shape
    span = n + steps  # each sequence owns a contiguous run of slots (no block manager here)
    pool = LatentKVPool(args, b * span, model.dtype, model.device)  # allocated outside the timing
    slots = torch.arange(b * span).view(b, span)

    t0 = time.perf_counter()
    batch = AttentionBatch(query_lens=[n] * b, context_lens=[n] * b, absorbed=[False] * b,
                           slot_mapping=slots[:, :n].reshape(-1), context_slots=[slots[i, :n] for i in range(b)])
    hidden = model(prompts.reshape(-1), torch.arange(n).repeat(b), batch, pool)  # [B*n, D]
    # Only each sequence's last position needs logits (as logits_to_keep=1 for the reference).
    token = model.logits(hidden.view(b, n, -1)[:, -1]).argmax(-1)  # [B]
    t1 = time.perf_counter()

    tokens = [token]
    for step in range(steps):
        pos = n + step  # position (and slot offset) of the token being fed
        batch = AttentionBatch(query_lens=[1] * b, context_lens=[pos + 1] * b, absorbed=[True] * b,
                               slot_mapping=slots[:, pos], context_slots=[slots[i, :pos + 1] for i in range(b)])
        batch.group_single_tokens()  # one padded attention over all sequences, as the engine runs it
        hidden = model(token, torch.full((b,), pos), batch, pool)  # [B, D]
        token = model.logits(hidden).argmax(-1)
        tokens.append(token)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.stack(tokens, dim=1)


# -- reference ------------------------------------------------------------------------------------
def run_reference(ref, prompts: torch.Tensor, steps: int) -> tuple[float, float, torch.Tensor]:
    """The same work through transformers. Decode is a hand-written loop of single-token forwards
    from the prefill's cache rather than generate(): it times exactly the `steps` forwards we time
    for ours, without generate's logits processors / stopping criteria, and needs no subtraction
    of a separately measured prefill (which would add the noise of two measurements)."""
    t0 = time.perf_counter()
    out = ref(input_ids=prompts, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].float().argmax(-1)  # [B]
    cache = out.cache
    t1 = time.perf_counter()

    tokens = [token]
    for _ in range(steps):
        out = ref(input_ids=token[:, None], cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        token = out.logits[:, -1].float().argmax(-1)
        tokens.append(token)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.stack(tokens, dim=1)


# -- memory bandwidth -----------------------------------------------------------------------------
def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """GB/s of streaming reads (sum of a ~1 GiB tensor: what a decode step does to its weights)
    and of a copy (read + write, counted as 2x the bytes). Best of `repeats`."""
    src = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    best_sum = best_copy = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        t1 = time.perf_counter()
        dst.copy_(src)
        t2 = time.perf_counter()
        best_sum, best_copy = min(best_sum, t1 - t0), min(best_copy, t2 - t1)
    return {"read_gbps": nbytes / best_sum / 1e9, "copy_gbps": 2 * nbytes / best_copy / 1e9}


def leading_agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading positions of two 1-D token sequences are equal."""
    diff = (a != b).nonzero()
    return int(diff[0]) if diff.numel() else a.numel()


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)  # explicit: both models share this pool
    path = model_dir(opts.model)
    dtype = resolve_dtype(opts.dtype, ModelArgs.from_file(path / "config.json"))
    opts.dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "loadgen.bench_model", *sys.argv[1:]])
    b, n, steps = opts.batch, opts.input_len, opts.output_len

    from transformers import DeepseekV3ForCausalLM  # imported late: slow, and only this tool needs it
    ours = load_model(path, dtype=opts.dtype)
    ref = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    vocab = ours.args.vocab_size
    if n + steps > ours.args.max_position_embeddings:
        raise SystemExit(f"--input-len + --output-len = {n + steps} exceeds the model's context")
    gen = torch.Generator().manual_seed(opts.seed)
    prompts = torch.randint(3, vocab, (b, n), generator=gen)  # ids 0..2 are the special tokens

    with torch.inference_mode():
        bandwidth = memory_bandwidth()
        # Warm-up: a short run of each (allocator, oneDNN kernels, lazy init) before any timing.
        warm = prompts[:, : min(n, 16)]
        run_ours(ours, warm, 2)
        run_reference(ref, warm, 2)

        times: dict[str, list[tuple[float, float]]] = {"ours": [], "ref": []}
        for _ in range(REPEATS):  # interleaved so a noisy moment hits both sides alike
            *t, our_tokens = run_ours(ours, prompts, steps)
            times["ours"].append(tuple(t))
            *t, ref_tokens = run_reference(ref, prompts, steps)
            times["ref"].append(tuple(t))

    best = {k: (min(t[0] for t in v), min(t[1] for t in v)) for k, v in times.items()}
    results = {}
    for k, (prefill_s, decode_s) in best.items():
        results[k] = {"prefill_s": prefill_s, "prefill_tok_s": b * n / prefill_s,
                      "decode_s": decode_s, "decode_tok_s": b * steps / decode_s,
                      "decode_step_ms": 1e3 * decode_s / max(steps, 1)}

    # Weight-read bound: every parameter read once per decode step, at streaming-read speed. This
    # slightly overstates the bytes (only B embedding rows are read; with B*K picks of E experts a
    # few experts may be untouched), so "step / bound" is a conservative (low) ratio.
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bound_ms = 1e3 * weight_bytes / (bandwidth["read_gbps"] * 1e9)
    agree = leading_agreement(our_tokens[0], ref_tokens[0])
    first_all = int((our_tokens[:, 0] == ref_tokens[:, 0]).sum())
    report = {
        "command": command, "model": str(path), "batch": b, "input_len": n, "output_len": steps,
        "dtype": opts.dtype, "threads": opts.threads, "repeats": REPEATS,
        "reference": {"transformers": __import__("transformers").__version__,
                      "attn_implementation": ref.config._attn_implementation,
                      "experts_implementation": getattr(ref.config, "_experts_implementation", None)},
        "ours": results["ours"], "ref": results["ref"],
        "ratio_prefill_tok_s": results["ours"]["prefill_tok_s"] / results["ref"]["prefill_tok_s"],
        "ratio_decode_tok_s": results["ours"]["decode_tok_s"] / results["ref"]["decode_tok_s"],
        "memory_bandwidth": bandwidth, "weight_bytes": weight_bytes, "decode_bound_ms": bound_ms,
        "decode_step_over_bound": results["ours"]["decode_step_ms"] / bound_ms,
        "loadavg_1min": os.getloadavg()[0],  # other processes on the box make the numbers noisy
        "greedy_agree_seq0": agree, "greedy_tokens_seq0": steps + 1,
        "first_token_agree_sequences": first_all,
    }
    print_report(report)
    if opts.out is not None:
        opts.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {opts.out}")
    return report


def print_report(r: dict) -> None:
    print(f"\ncommand: {r['command']}")
    ref = r["reference"]
    print(f"model {r['model']}  batch={r['batch']} input_len={r['input_len']} output_len={r['output_len']} "
          f"dtype={r['dtype']} threads={r['threads']}  best of {r['repeats']}")
    print(f"reference: transformers {ref['transformers']} attn={ref['attn_implementation']} "
          f"experts={ref['experts_implementation']}\n")
    print(f"{'':14}{'prefill s':>11}{'prefill tok/s':>15}{'decode s':>10}{'decode tok/s':>14}{'ms/step':>10}")
    for name in ("ours", "ref"):
        x = r[name]
        print(f"{name:14}{x['prefill_s']:11.3f}{x['prefill_tok_s']:15.1f}{x['decode_s']:10.3f}"
              f"{x['decode_tok_s']:14.1f}{x['decode_step_ms']:10.1f}")
    print(f"\nours/ref prefill tok/s: {r['ratio_prefill_tok_s']:.2f}x   decode tok/s: {r['ratio_decode_tok_s']:.2f}x")
    print(f"1-min load average at the end: {r['loadavg_1min']:.2f} (on {os.cpu_count()} cores)")
    bw = r["memory_bandwidth"]
    print(f"memory bandwidth: read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s")
    print(f"weights {r['weight_bytes'] / 1e6:.0f} MB -> decode weight-read bound {r['decode_bound_ms']:.1f} ms/step; "
          f"ours {r['ours']['decode_step_ms']:.1f} ms/step = {r['decode_step_over_bound']:.1f}x the bound")
    print(f"greedy agreement, sequence 0: first {r['greedy_agree_seq0']} of {r['greedy_tokens_seq0']} tokens; "
          f"first token equal in {r['first_token_agree_sequences']} of {r['batch']} sequences")


if __name__ == "__main__":
    main()
