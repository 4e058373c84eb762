"""Speculative decoding with the MTP layer: acceptance by draft position, and output tokens/s with
and without speculation on the same requests, in one run.

    python -m loadgen.bench_spec [--model DIR] [--preset tiny] [--speculative-tokens 3]
        [--running 1,16,64] [--input-len 128] [--output-len 64] [--dtype fp32] [--out FILE]

Without --model it uses a preset with an MTP layer trained by `streamoe distill-mtp` (created once
under $STREAMOE_HOME/bench/<preset>-mtp). Held-out prompts are random token ids drawn with a seed
that distillation never uses; requests are greedy with EOS ignored.

- Acceptance: every request decoded with N drafts per step; the rate at position k is the share of
  drafts whose first k tokens were all accepted (vLLM's per-position rate). Beside it, the trivial
  drafter "repeat the last token" on the same greedy token streams, so the figure means something.
- Speed: at each batch size B, B requests all at once, with N = 0 and then each N; output tokens/s.
  Beside it, the bytes-read prediction of a decode step: the weights but the routed experts, the
  experts B·(N+1) tokens touch (uniform routing: E·(1 − (1 − K/E)^T) per MoE layer), the MTP layer's
  N forwards, over the tokens a step emits (1 + accepted drafts per request); and from the same
  model, the accepted drafts per step at which speculation would break even.
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
from shared.launcher.cliargs import home
from shared.model.loader import load_model
from shared.model.moe import MoE

HELD_OUT_SEED = 1_000_003  # distillation draws its prompts from other seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a checkpoint with an MTP layer")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="without --model")
    p.add_argument("--distill-steps", type=int, default=None, help="without --model: distill-mtp's --steps")
    p.add_argument("--speculative-tokens", type=int, default=3)
    p.add_argument("--running", default="1,16,64", help="batch sizes of the speed runs")
    p.add_argument("--acceptance-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"])
    p.add_argument("--moe-backend", default=None, help="default: the loader's")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def model_dir(opts) -> Path:
    if opts.model is not None:
        return opts.model
    from shared.model.distill import distill_mtp
    from shared.model.presets import init_model

    path = home() / "bench" / f"{opts.preset}-mtp"
    done = path / "distilled.json"
    if not done.exists():
        print(f"creating {opts.preset} with an MTP layer in {path}, then distilling it ...", flush=True)
        init_model(path, opts.preset, seed=0, dtype="fp32", mtp=True)
        kwargs = {} if opts.distill_steps is None else {"steps": opts.distill_steps}
        report = distill_mtp(path, **kwargs)
        done.write_text(json.dumps(report, indent=2) + "\n")
    return path


def prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def run(model, requests: list[list[int]], output_len: int, n: int) -> tuple[dict[str, list[int]], float, Engine]:
    engine = Engine(model, EngineConfig(kv_cache_bytes=1 << 30, max_num_seqs=len(requests),
                                        max_num_batched_tokens=4096, speculative_tokens=n))
    for i, p in enumerate(requests):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=output_len, ignore_eos=True))
    outputs: dict[str, list[int]] = {}
    start = time.perf_counter()
    while engine.has_unfinished():
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
    return outputs, time.perf_counter() - start, engine


def repeat_last_acceptance(streams: list[list[int]], n: int) -> list[float]:
    """The drafter "repeat the last token" on these token streams: at each position, the share whose
    next k tokens all equal the current one, k = 1..n."""
    hits, total = [0] * n, 0
    for tokens in streams:
        for i in range(len(tokens) - n):
            total += 1
            for k in range(n):
                if tokens[i + k + 1] != tokens[i]:
                    break
                hits[k] += 1
    return [h / max(total, 1) for h in hits]


def expected_experts(num_experts: int, top_k: int, tokens: float) -> float:
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def predicted_bytes(model, batch: int, n: int, accepted: float) -> tuple[float, float]:
    """(bytes read, tokens emitted) of one decode step of `batch` requests with n drafts each and
    `accepted` drafts accepted on average; weights only (the KV reads are the same per token)."""
    args = model.args
    item = model.dtype.itemsize
    expert = 3 * args.hidden_size * args.moe_intermediate_size * item
    main = model.main_layers
    moe = sum(isinstance(block.mlp, MoE) for block in main)
    routed = {id(p) for block in model.model.layers if isinstance(block.mlp, MoE)
              for p in block.mlp.experts.parameters()}
    shared_ids = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}

    def dense(modules) -> int:
        return sum(p.numel() * item for m in modules for p in m.parameters() if id(p) not in routed | shared_ids)

    head = model.lm_head.weight.numel() * item
    tokens = batch * (n + 1)
    nbytes = dense(main) + dense([model.model.norm]) + head + moe * expected_experts(
        args.n_routed_experts, args.num_experts_per_tok, tokens) * expert
    if n:
        mtp_tokens = [batch * (1 + accepted)] + [batch] * (n - 1)  # the catch-up, then one per further draft
        nbytes += sum(dense([model.mtp]) + head + expected_experts(args.n_routed_experts, args.num_experts_per_tok, t)
                      * expert for t in mtp_tokens)
    return nbytes, batch * (1 + accepted)


def break_even(model, batch: int, n: int) -> float | None:
    """The mean accepted drafts per step at which the bytes-read prediction of n drafts equals no
    speculation (None: not reachable even with every draft accepted)."""
    b0, t0 = predicted_bytes(model, batch, 0, 0.0)

    def gain(accepted: float) -> float:
        bk, tk = predicted_bytes(model, batch, n, accepted)
        return (b0 / t0) / (bk / tk) - 1

    if gain(float(n)) < 0:
        return None
    lo, hi = 0.0, float(n)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gain(mid) < 0 else (lo, mid)
    return hi


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    path = model_dir(opts)
    kwargs = {} if opts.moe_backend is None else {"moe_backend": opts.moe_backend}
    model = load_model(path, dtype=opts.dtype, **kwargs)
    if model.mtp is None:
        raise SystemExit(f"{path}: the model has no MTP layer (streamoe init-model --mtp, then distill-mtp)")
    n = opts.speculative_tokens
    vocab = model.args.vocab_size
    result = {"command": "python -m loadgen.bench_spec " + shlex.join(sys.argv[1:] if argv is None else argv),
              "model": str(path), "dtype": opts.dtype, "threads": opts.threads, "speculative_tokens": n}

    held_out = prompts(vocab, opts.acceptance_requests, opts.input_len, HELD_OUT_SEED)
    outputs, _, engine = run(model, held_out, opts.output_len, n)
    s = engine.spec
    result["acceptance"] = {
        "mtp": [a / max(s.num_drafts, 1) for a in s.accepted_per_pos],
        "repeat_last_token": repeat_last_acceptance(list(outputs.values()), n),
        "mean_acceptance_length": 1 + s.num_accepted_tokens / max(s.num_drafts, 1),
        "num_drafts": s.num_drafts}
    print("acceptance by draft position:", json.dumps(result["acceptance"]), flush=True)
    per_draft: dict[int, float] = {}

    speed = []
    for batch in [int(b) for b in opts.running.split(",")]:
        requests = prompts(vocab, batch, opts.input_len, HELD_OUT_SEED + batch)
        row = {"running": batch}
        base, seconds, _ = run(model, requests, opts.output_len, 0)
        row["tok_s"] = {"0": batch * opts.output_len / seconds}
        b0, t0 = predicted_bytes(model, batch, 0, 0.0)
        row["predicted"] = {}
        for k in sorted({1, n}):
            out, seconds, eng = run(model, requests, opts.output_len, k)
            if out != base:
                raise SystemExit(f"running {batch}, N={k}: the tokens differ from those without speculation")
            accepted = eng.spec.num_accepted_tokens / max(eng.spec.num_drafts, 1)
            per_draft[k] = accepted
            row["tok_s"][str(k)] = batch * opts.output_len / seconds
            bk, tk = predicted_bytes(model, batch, k, accepted)
            row["predicted"][str(k)] = (b0 / t0) / (bk / tk)
            row.setdefault("break_even_accepted_per_draft", {})[str(k)] = break_even(model, batch, k)
        row["speedup"] = {k: v / row["tok_s"]["0"] for k, v in row["tok_s"].items() if k != "0"}
        speed.append(row)
        print(json.dumps(row), flush=True)
    result["speed"] = speed
    result["mean_accepted_per_draft"] = {str(k): v for k, v in per_draft.items()}
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
