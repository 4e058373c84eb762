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
from collections.abc import Callable
from pathlib import Path

import torch

from shared.ep.moe import EPMoE
from shared.model.attention import AttentionBatch
from shared.model.config import ModelArgs
from shared.model.experts import MoEPlan
from shared.model.kv_cache import LatentKVPool
from shared.model.loader import load_model
from shared.model.moe import MoE
from shared.model.presets import init_model

DEFAULT_DIR = Path.home() / ".cache" / "streamoe" / "models" / "small-bench"
REPEATS = 2  # best of REPEATS, interleaved


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None,
                   help=f"HF checkpoint dir (default: small preset in {DEFAULT_DIR})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32, help="decode steps after the prefill token")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute dtype; auto: calibrated, as the services resolve it (shared/runtime/numerics.py)")
    p.add_argument("--moe-backend", default="auto", help="MoE backend or plan; auto: calibrated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--roofline-batches", default="1,16,64", help="running requests of the roofline steps ('' : skip)")
    p.add_argument("--roofline-steps", type=int, default=4, help="decode steps timed per backend and batch")
    p.add_argument("--roofline-baseline", default="loop",
                   help="the MoE backend or plan the roofline steps alternate with (default loop: the engine "
                        "before stacking; e.g. a plan without native, for native on vs off)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="compare with transformers (--no-reference: the roofline only)")
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
    span = -(-(n + steps) // 64) * 64  # each sequence owns a contiguous run of whole 64-slot blocks
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
def memory_bandwidth(gib: float = 1.0, repeats: int = 5, device: str = "cpu") -> dict[str, float]:
    """GB/s of streaming reads (sum of a ~1 GiB tensor: what a decode step does to its weights),
    of a copy (read + write, counted as 2x the bytes), and of cold reads the size of a weight matrix
    (`chunk_read_gbps`: the same tensor summed CHUNK_BYTES at a time, the chunks in a shuffled
    order, so each starts cold as a layer's matrices do). Best of `repeats`."""
    probe = read_probe(device, gib)
    dst = torch.empty_like(probe.src)
    best = {"read_gbps": 0.0, "chunk_read_gbps": 0.0}
    best_copy = float("inf")
    for _ in range(repeats):
        rates = probe()
        best = {k: max(v, rates[k]) for k, v in best.items()}
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(probe.src)
        _sync(device)
        best_copy = min(best_copy, time.perf_counter() - t0)
    return {**best, "copy_gbps": 2 * probe.src.numel() * 4 / best_copy / 1e9, "chunk_bytes": CHUNK_BYTES}


CHUNK_BYTES = 3 << 19  # 1.5 MiB: one routed expert of `small` in bf16 (its three matrices)


def read_probe(device: str = "cpu", gib: float = 0.25) -> Callable[[], dict[str, float]]:
    """A read-rate probe (memory_bandwidth's reads; bench_model also calls it between decode steps):
    one streaming sum of a `gib` tensor and one shuffled pass over it in CHUNK_BYTES pieces (the
    tensor allocated once, as `probe.src`) -> GB/s of each."""
    src = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    chunks = src[:src.numel() // (CHUNK_BYTES // 4) * (CHUNK_BYTES // 4)].view(-1, CHUNK_BYTES // 4)
    order = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(0)).tolist()

    def probe() -> dict[str, float]:
        _sync(device)
        t0 = time.perf_counter()
        src.sum()
        _sync(device)
        t1 = time.perf_counter()
        for i in order:
            chunks[i].sum()
        _sync(device)
        t2 = time.perf_counter()
        return {"read_gbps": src.numel() * 4 / (t1 - t0) / 1e9, "chunk_read_gbps": chunks.numel() * 4 / (t2 - t1) / 1e9}

    probe.src = src
    return probe


def matmul_rate(dtype: torch.dtype, device: str = "cpu", size: int = 2048, repeats: int = 3,
                slow_s: float = 0.1) -> float:
    """FLOP/s of a square matmul in `dtype` (the compute roof of the roofline), best of `repeats`: at
    `size`, or at the largest power of two from 256 up whose product took over `slow_s` (where the
    dtype crawls, as bf16 on a CPU without AVX512-BF16 or AMX: a 2048³ product there takes ~25 s,
    and the rate is what a smaller one shows)."""
    n = min(256, size)
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        _sync(device)
        t0 = time.perf_counter()
        a @ b  # the warm-up, timed only to decide whether to go larger
        _sync(device)
        if n >= size or time.perf_counter() - t0 > slow_s:
            break
        n *= 2
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def resolve_numerics(opts: argparse.Namespace, args: ModelArgs) -> tuple[torch.dtype, MoEPlan, str]:
    """--dtype and --moe-backend as a service resolves them (auto: calibrated, or the cached
    calibration of this machine): (compute dtype, MoE plan, source)."""
    from shared.runtime.numerics import Shapes, resolve

    numerics = resolve(Shapes.of(args), opts.device, opts.threads, opts.dtype, opts.moe_backend)
    print(f"numerics: dtype {numerics.dtype}, moe backend {numerics.moe_backend} ({numerics.source})", flush=True)
    return numerics.torch_dtype, MoEPlan.parse(numerics.moe_backend), numerics.source


# -- roofline -------------------------------------------------------------------------------------
def step_cost(model, contexts: list[int], touched: int) -> tuple[float, float, float, float]:
    """(bytes read, FLOPs, the routed experts' bytes, their FLOPs) of one decode step of
    len(contexts) sequences: every weight but the routed experts and the embedding table, the
    `touched` experts (summed over MoE layers) the step's tokens chose, one embedding row per
    token, and each sequence's latent KV; FLOPs are 2 per weight per token it multiplies plus the
    absorbed attention over each context."""
    args = model.args
    b = len(contexts)
    routed = {id(p) for block in model.model.layers if isinstance(block.mlp, (MoE, EPMoE))
              for p in block.mlp.experts.parameters()}
    embed = model.model.embed_tokens.weight
    others = [p for p in model.parameters() if id(p) not in routed and p is not embed]
    expert_params = 3 * args.hidden_size * args.moe_intermediate_size
    num_moe = sum(isinstance(block.mlp, (MoE, EPMoE)) for block in model.model.layers)
    item = model.dtype.itemsize
    expert_bytes = touched * expert_params * item
    nbytes = (sum(p.numel() * p.element_size() for p in others) + b * args.hidden_size * embed.element_size()
              + expert_bytes + sum(contexts) * args.num_hidden_layers * args.kv_cache_dim * item)
    h, c, r = args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim
    attention = sum(2 * h * (args.qk_nope_head_dim * c + c * args.v_head_dim + (2 * c + r) * n) for n in contexts)
    expert_flops = 2 * b * args.num_experts_per_tok * num_moe * expert_params
    flops = 2 * b * sum(p.numel() for p in others if p.dim() == 2) + expert_flops + args.num_hidden_layers * attention
    return nbytes, flops, expert_bytes, expert_flops


def touched_experts(model, before: list[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
    """Distinct experts the last step routed to, summed over MoE layers (from the load counters)."""
    now = [block.mlp.expert_load.clone() for block in model.model.layers if isinstance(block.mlp, MoE)]
    return sum(int(((a - b) > 0).sum()) for a, b in zip(now, before)), now


def run_roofline(model, plan: MoEPlan, batch: int, input_len: int, steps: int, gen: torch.Generator,
                 baseline: MoEPlan, probe: Callable[[], dict[str, float]], matmul: Callable[[], float]) -> dict:
    """Prefill `batch` prompts, then time `steps` decode steps with the chosen plan and with `baseline`
    (a backend or plan) alternately; the median step of each against the step's roofline. This host's
    read rate moves from minute to minute, so the bound's is the median of `probe()` before the steps
    and after each pair of them; the matmul rate (steadier) is the better of `matmul()` before and after."""
    args = model.args
    span = -(-(input_len + 2 * steps + 1) // 64) * 64  # each sequence on whole 64-slot blocks, as the engine's
    pool = LatentKVPool(args, batch * span, model.dtype, model.device)
    slots = torch.arange(batch * span).view(batch, span)
    prompts = torch.randint(3, args.vocab_size, (batch, input_len), generator=gen)
    for first in range(0, batch, 16):  # prefill 16 prompts at a time
        part = prompts[first:first + 16]
        n = part.shape[0]
        prefill = AttentionBatch([input_len] * n, [input_len] * n, [False] * n,
                                 slot_mapping=slots[first:first + n, :input_len].reshape(-1),
                                 context_slots=[slots[first + i, :input_len] for i in range(n)])
        model(part.reshape(-1), torch.arange(input_len).repeat(n), prefill, pool)
    token = torch.randint(3, args.vocab_size, (batch,), generator=gen)
    loads = [block.mlp.expert_load.clone() for block in model.model.layers if isinstance(block.mlp, MoE)]
    times: dict[str, list[float]] = {"chosen": [], "baseline": []}
    costs = []
    reads, rates = [probe()], [matmul()]
    for step in range(2 * steps):
        which = "chosen" if step % 2 == 0 else "baseline"
        model.set_moe_backend(plan if which == "chosen" else baseline)
        pos = input_len + step
        decode = AttentionBatch([1] * batch, [pos + 1] * batch, [True] * batch, slot_mapping=slots[:, pos],
                                context_slots=[slots[i, :pos + 1] for i in range(batch)])
        start = time.perf_counter()
        token = model.logits(model(token, torch.full((batch,), pos), decode, pool)).argmax(-1)
        times[which].append(time.perf_counter() - start)
        touched, loads = touched_experts(model, loads)
        costs.append(step_cost(model, [pos + 1] * batch, touched))
        if which == "baseline":
            reads.append(probe())
    model.set_moe_backend(plan)
    rates.append(matmul())
    bandwidth = sorted(r["read_gbps"] for r in reads)[len(reads) // 2]
    chunk_bandwidth = sorted(r["chunk_read_gbps"] for r in reads)[len(reads) // 2]
    rate = max(rates)
    nbytes, flops, expert_bytes, expert_flops = (sorted(c[i] for c in costs)[len(costs) // 2] for i in range(4))

    def roof(b: float, f: float, read_gbps: float = bandwidth) -> float:  # seconds
        return max(b / (read_gbps * 1e9), f / rate)

    bound = roof(nbytes, flops)
    # the routed experts and the rest of the step each at its own bound, one after the other: a
    # layer's experts wait for its attention, so the step cannot read the experts' weights while it
    # computes the rest (at 64 rows the experts are bound by their bytes, the rest by its FLOPs)
    parts = roof(expert_bytes, expert_flops) + roof(nbytes - expert_bytes, flops - expert_flops)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    # the same bound with the bytes at the cold-chunk read rate (what reading matrix-sized pieces achieves)
    chunk_bound = roof(nbytes, flops, chunk_bandwidth)
    return {"batch": batch, "context": input_len, "read_probes": reads, "matmul_probes": rates,
            "read_gbps": bandwidth, "chunk_read_gbps": chunk_bandwidth, "matmul_flop_s": rate,
            "step_ms": 1e3 * median["chosen"],
            "chunk_bound_ms": 1e3 * chunk_bound, "over_chunk_bound": median["chosen"] / chunk_bound,
            "baseline": baseline.text, "baseline_step_ms": 1e3 * median["baseline"], "bytes": nbytes, "flops": flops,
            "bytes_ms": 1e3 * nbytes / (bandwidth * 1e9), "flops_ms": 1e3 * flops / rate,
            "bound_ms": 1e3 * bound, "over_bound": median["chosen"] / bound,
            "expert_bytes": expert_bytes, "expert_flops": expert_flops,
            "parts_bound_ms": 1e3 * parts, "over_parts_bound": median["chosen"] / parts,
            "baseline_over_bound": median["baseline"] / bound}


def leading_agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading positions of two 1-D token sequences are equal."""
    diff = (a != b).nonzero()
    return int(diff[0]) if diff.numel() else a.numel()


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)  # explicit: both models share this pool
    path = model_dir(opts.model)
    dtype, plan, source = resolve_numerics(opts, ModelArgs.from_file(path / "config.json"))
    opts.dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "loadgen.bench_model", *sys.argv[1:]])
    b, n, steps = opts.batch, opts.input_len, opts.output_len
    ours = load_model(path, dtype=dtype, device=opts.device, moe_backend=plan)
    if n + steps > ours.args.max_position_embeddings:
        raise SystemExit(f"--input-len + --output-len = {n + steps} exceeds the model's context")
    gen = torch.Generator().manual_seed(opts.seed)
    report = {"command": command, "model": str(path), "batch": b, "input_len": n, "output_len": steps,
              "dtype": opts.dtype, "moe_backend": plan.text, "numerics_source": source, "threads": opts.threads,
              "device": opts.device, "repeats": REPEATS}
    with torch.inference_mode():
        bandwidth = memory_bandwidth(device=opts.device)
        report["memory_bandwidth"] = bandwidth
        if opts.reference:
            report.update(compare_reference(ours, path, dtype, gen, opts))
        if opts.roofline_batches:
            baseline = MoEPlan.parse(opts.roofline_baseline)
            probe = read_probe(opts.device)
            report["roofline"] = [run_roofline(ours, plan, int(batch), n, opts.roofline_steps, gen, baseline, probe,
                                               lambda: matmul_rate(dtype, opts.device))
                                  for batch in opts.roofline_batches.split(",")]
    report["loadavg_1min"] = os.getloadavg()[0]  # other processes on the box make the numbers noisy
    print_report(report)
    if opts.out is not None:
        opts.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {opts.out}")
    return report


def compare_reference(ours, path: Path, dtype: torch.dtype, gen: torch.Generator, opts) -> dict:
    """Ours against transformers on the same prompts: prefill and decode throughput, best of REPEATS."""
    from transformers import DeepseekV3ForCausalLM  # imported late: slow, and only this needs it

    b, n, steps = opts.batch, opts.input_len, opts.output_len
    ref = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    prompts = torch.randint(3, ours.args.vocab_size, (b, n), generator=gen)  # ids 0..2 are the special tokens
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
    return {
        "reference": {"transformers": __import__("transformers").__version__,
                      "attn_implementation": ref.config._attn_implementation,
                      "experts_implementation": getattr(ref.config, "_experts_implementation", None)},
        "ours": results["ours"], "ref": results["ref"],
        "ratio_prefill_tok_s": results["ours"]["prefill_tok_s"] / results["ref"]["prefill_tok_s"],
        "ratio_decode_tok_s": results["ours"]["decode_tok_s"] / results["ref"]["decode_tok_s"],
        "greedy_agree_seq0": leading_agreement(our_tokens[0], ref_tokens[0]), "greedy_tokens_seq0": steps + 1,
        "first_token_agree_sequences": int((our_tokens[:, 0] == ref_tokens[:, 0]).sum()),
    }


def print_report(r: dict) -> None:
    print(f"\ncommand: {r['command']}")
    print(f"model {r['model']}  dtype={r['dtype']} moe_backend={r['moe_backend']} ({r['numerics_source']}) "
          f"device={r['device']} threads={r['threads']}")
    bw = r["memory_bandwidth"]
    print(f"memory bandwidth at the start: read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s, cold "
          f"{bw['chunk_bytes'] / 2**20:.1f} MiB pieces read {bw['chunk_read_gbps']:.1f} GB/s")
    if "ours" in r:
        ref = r["reference"]
        print(f"\nbatch={r['batch']} input_len={r['input_len']} output_len={r['output_len']}, best of "
              f"{r['repeats']}; reference: transformers {ref['transformers']} attn={ref['attn_implementation']} "
              f"experts={ref['experts_implementation']}")
        print(f"{'':14}{'prefill s':>11}{'prefill tok/s':>15}{'decode s':>10}{'decode tok/s':>14}{'ms/step':>10}")
        for name in ("ours", "ref"):
            x = r[name]
            print(f"{name:14}{x['prefill_s']:11.3f}{x['prefill_tok_s']:15.1f}{x['decode_s']:10.3f}"
                  f"{x['decode_tok_s']:14.1f}{x['decode_step_ms']:10.1f}")
        print(f"ours/ref prefill tok/s: {r['ratio_prefill_tok_s']:.2f}x   decode tok/s: {r['ratio_decode_tok_s']:.2f}x")
        print(f"greedy agreement, sequence 0: first {r['greedy_agree_seq0']} of {r['greedy_tokens_seq0']} tokens; "
              f"first token equal in {r['first_token_agree_sequences']} of {r['batch']} sequences")
    if "roofline" in r:
        print(f"\ndecode step against its roofline in {r['dtype']}, context {r['input_len']} (each row's read rates: "
              f"the median of probes before its steps and after each pair; matmul: the better of before and after):")
        print(f"{'running':>8}{'GB/s':>7}{'GFLOP/s':>9}{'MB read':>9}{'GFLOP':>8}{'bytes ms':>10}{'flops ms':>10}"
              f"{'bound ms':>10}{'step ms':>9}{'÷ bound':>9}{'baseline':>9}{'÷ bound':>9}{'÷ pieces':>10}"
              f"{'÷ parts':>9}"
              f"   baseline: {r['roofline'][0]['baseline']}")
        for x in r["roofline"]:
            print(f"{x['batch']:8d}{x['read_gbps']:7.1f}{x['matmul_flop_s'] / 1e9:9.0f}{x['bytes'] / 1e6:9.0f}"
                  f"{x['flops'] / 1e9:8.2f}{x['bytes_ms']:10.1f}{x['flops_ms']:10.1f}{x['bound_ms']:10.1f}"
                  f"{x['step_ms']:9.1f}{x['over_bound']:8.2f}x{x['baseline_step_ms']:9.1f}"
                  f"{x['baseline_over_bound']:8.2f}x{x['over_chunk_bound']:9.2f}x{x['over_parts_bound']:8.2f}x")
        print("(÷ pieces: the step over the same bound with its bytes read at the cold-pieces rate, "
              "measured with the others; ÷ parts: over the sum of two bounds, the routed experts' and the "
              "rest's, each the larger of its bytes and FLOPs)")
    print(f"1-min load average at the end: {r['loadavg_1min']:.2f} (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
