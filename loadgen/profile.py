"""`python -m loadgen.profile`: measure what one rank of a running system serves, as the profile
`streamoe plan --profile` reads (shared/planner/README.md; `shared/planner/plan.py: load_profile`).

    python -m loadgen.profile --url URL --out profile.json [--input-lens 64,256,1024]
        [--prefill-concurrency 8] [--running 1,2,4,8] [--decode-input-len 256] [--decode-output-len 64]
        [--max-seconds 120] [--prefill-ranks N --decode-ranks M]

A short, bounded sweep (loadgen/README.md, "Profiles"):
- prefill, per input length: `--prefill-concurrency` unique random prompts sent at once with
  max_tokens=1; input tok/s = their prompt tokens / (the last first token − the first send); TTFT
  is their p90;
- decode, per running count: that many streams of `--decode-input-len` prompt tokens and
  `--decode-output-len` output tokens (EOS ignored); output tok/s over the window in which every
  stream is past its first token and none has finished; ITL is the p90 of the gaps between token
  chunks in that window; context_len = input + output / 2.
Per-rank figures divide by the live ranks of the role, counted from the gateway's `/services`
(or given by `--prefill-ranks`/`--decode-ranks`).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

from .__main__ import _number
from .client import Client, Result, base_url, first_model, headers, make_session
from .workloads import FIRST_TOKEN_ID, Request, make_prompt

LATENCY_PERCENTILE = 90  # ttft_ms and itl_ms are p90s: the planner holds them against SLO bounds
WARMUP_OUTPUT_LEN = 2


class Refused(Exception):
    """The server refused a point's requests as invalid (a 4xx other than 408/429: a prompt beyond
    the model's context, a token id outside its vocabulary): longer points of the role would be too."""


def _int_list(text: str) -> list[int]:
    """`64,256,1024` -> [64, 256, 1024], sorted, without repeats; each an integer >= 1."""
    items = [i for i in text.replace(" ", ",").split(",") if i]
    values = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not an integer >= 1")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one integer >= 1, comma-separated")
    return sorted(set(values))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.profile",
                                description="Measure what one rank of a running system serves: the profile "
                                            "`streamoe plan --profile` reads (loadgen/README.md, \"Profiles\").")
    positive_int, positive_float = _number(int, 1, low_open=False), _number(float, 0)
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", type=Path, required=True, help="write the profile JSON here")
    p.add_argument("--input-lens", type=_int_list, default=[64, 256, 1024], metavar="N,N,...",
                   help="prefill points: prompt tokens (default: 64,256,1024)")
    p.add_argument("--prefill-concurrency", type=positive_int, default=8,
                   help="prefill: requests sent at once (default: 8)")
    p.add_argument("--running", type=_int_list, default=[1, 2, 4, 8], metavar="N,N,...",
                   help="decode points: concurrent streams (default: 1,2,4,8)")
    p.add_argument("--decode-input-len", type=positive_int, default=256, help="decode: prompt tokens (default: 256)")
    p.add_argument("--decode-output-len", type=_number(int, 2, low_open=False), default=64,
                   help="decode: output tokens, EOS ignored (default: 64)")
    p.add_argument("--max-seconds", type=positive_float, default=120.0,
                   help="seconds for the whole sweep (default: 120); prefill may use until half of it, decode "
                        "the rest")
    p.add_argument("--prefill-ranks", type=positive_int, help="prefill ranks (default: counted at /services)")
    p.add_argument("--decode-ranks", type=positive_int, help="decode ranks (default: counted at /services)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="send one untimed request first (default: on)")
    p.add_argument("--vocab-size", type=_number(int, FIRST_TOKEN_ID + 1, low_open=False), default=1024,
                   help=f"prompt token ids are drawn from [{FIRST_TOKEN_ID}, N) (default: 1024)")
    p.add_argument("--seed", type=int, help="prompt randomness (default: a random seed, recorded in meta)")
    p.add_argument("--model", help="the model name to send (default: the first id of GET /v1/models)")
    # NOTE: STREAMOE_API_KEY is read after parsing: a default would show the key in --help
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (also to /services; default: "
                   "$STREAMOE_API_KEY)")
    return p


def percentile_ms(values_s: list[float], q: float = LATENCY_PERCENTILE) -> float:
    return float(np.percentile(values_s, q)) * 1000.0


def prefill_figures(results: list[Result]) -> dict:
    """Input tok/s, cache hit rate and TTFTs of one batch of max_tokens=1 requests (all ok)."""
    start = min(r.start_s for r in results)
    done = max(r.start_s + r.ttft_s for r in results)
    prompt = sum(r.prompt_tokens for r in results)
    ttfts = [r.ttft_s for r in results]
    return {"input_tok_s": prompt / (done - start), "cache_hit_rate": sum(r.cached_tokens for r in results) / prompt,
            "ttft_ms": percentile_ms(ttfts), "median_ttft_ms": percentile_ms(ttfts, 50),
            "requests": len(results), "prompt_tokens": prompt, "wall_s": done - start}


def decode_figures(results: list[Result]) -> dict:
    """Output tok/s and ITL of concurrent streams (all ok), from their token chunks' times.

    The window runs from the latest first token to the earliest last one: every stream running.
    NOTE: when that window holds fewer chunks than streams (staggered starts, a short output), it
    falls back to every token after its stream's first over [earliest first, latest last], which
    counts the ramp-up and ramp-down at fewer streams and so reads low."""
    firsts, lasts = [r.token_times_s[0][0] for r in results], [r.token_times_s[-1][0] for r in results]
    start, end = max(firsts), min(lasts)
    chunks = [(t, n) for r in results for t, n in r.token_times_s[1:] if start < t <= end]
    gaps = [t - before for r in results for (before, _), (t, _) in zip(r.token_times_s, r.token_times_s[1:])
            if start < t <= end]
    window = "every stream running"
    if end <= start or len(chunks) < len(results):
        start, end, window = min(firsts), max(lasts), "whole"
        chunks = [(t, n) for r in results for t, n in r.token_times_s[1:]]
        gaps = [g for r in results for g in r.itl_s]
    tokens = sum(n for _, n in chunks)
    if end <= start or not gaps:
        raise ValueError("the streams sent no token after their first: raise --decode-output-len")
    return {"output_tok_s": tokens / (end - start), "itl_ms": percentile_ms(gaps),
            "median_itl_ms": percentile_ms(gaps, 50), "ttft_ms": percentile_ms([r.ttft_s for r in results]),
            "window": window, "window_s": end - start, "window_tokens": tokens, "requests": len(results)}


async def count_ranks(session: aiohttp.ClientSession, url: str, api_key: str | None) -> dict[str, int] | None:
    """Live services by name from the gateway's /services (draining ones left out); None if it has none."""
    try:
        async with session.get(f"{url}/services", headers=headers(api_key)) as r:
            if r.status != 200:
                return None
            services = (await r.json(content_type=None))["services"]
        counts: dict[str, int] = {}
        for s in services:
            if not s.get("draining"):
                counts[s["name"]] = counts.get(s["name"], 0) + 1
        return counts
    except (aiohttp.ClientError, OSError, ValueError, KeyError, TypeError):
        return None


class Profiler:
    def __init__(self, opts: argparse.Namespace, client: Client):
        self.opts, self.client = opts, client
        self.rng = np.random.default_rng(opts.seed)

    def prompt(self, n: int) -> list[int]:
        return make_prompt(self.rng, n, "ids", self.opts.vocab_size)

    async def batch(self, input_len: int, output_len: int, n: int) -> list[Result]:
        """n requests sent at once; raises Refused, or RuntimeError naming the first failure."""
        requests = [Request(output_len, self.prompt(input_len)) for _ in range(n)]
        results = [Result(output_len, 0.0) for _ in range(n)]
        await asyncio.gather(*(self._send(q, r) for q, r in zip(requests, results)))
        failed = [r for r in results if not r.ok]
        if failed:
            first = failed[0]
            if first.error.isdigit() and first.error.startswith("4") and first.error not in ("408", "429"):
                raise Refused(f"HTTP {first.error}: {first.message}")
            raise RuntimeError(f"{len(failed)} of {n} requests failed (first: {first.error}: {first.message})")
        for q, r in zip(requests, results):
            r.prompt_tokens = r.prompt_tokens or len(q.prompt)  # NOTE: a server without usage: what was sent
        return results

    async def _send(self, request: Request, result: Result) -> None:
        try:
            await self.client.send(request, result)
        except Exception as e:  # a reply the client could not make sense of: the point fails, not the sweep
            result.error, result.message = "client", f"{type(e).__name__}: {e}"


async def _within(coro, deadline: float):
    """`coro`'s value, or TimeoutError once the monotonic `deadline` passes (the coroutine is cancelled)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        coro.close()
        raise TimeoutError
    return await asyncio.wait_for(coro, remaining)


async def sweep(opts: argparse.Namespace) -> dict:
    """Every point the budget allows -> the profile dict (its lists may be empty)."""
    started = time.monotonic()
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()
             if k != "api_key"}  # NOTE: never write a secret to a file
    prefill_deadline, deadline = started + opts.max_seconds / 2, started + opts.max_seconds
    url = base_url(opts.url)
    # NOTE: no per-request timeout: the budget cancels whatever is still running at its deadline.
    async with make_session(None) as session:
        opts.model = opts.model or await _within(first_model(session, url, opts.api_key), deadline)
        counted = None
        if opts.prefill_ranks is None or opts.decode_ranks is None:
            counted = await _within(count_ranks(session, url, opts.api_key), deadline) or {}
            for role in ("prefill", "decode"):
                if getattr(opts, f"{role}_ranks") is None:
                    if not counted.get(role):
                        raise RuntimeError(f"GET {url}/services lists no live {role} rank (is this a streamoe "
                                           f"gateway?): pass --{role}-ranks N")
                    setattr(opts, f"{role}_ranks", counted[role])
        client = Client(session, url, opts.model, api_key=opts.api_key, temperature=0.0, ignore_eos=True)
        profiler = Profiler(opts, client)
        stopped: list[str] = []

        def stop(reason: str) -> None:
            stopped.append(reason)
            print(f"stopped: {reason}")

        if opts.warmup:
            try:
                await _within(profiler.batch(min(opts.input_lens[0], opts.decode_input_len), WARMUP_OUTPUT_LEN, 1),
                              prefill_deadline)
            except (Refused, RuntimeError) as e:
                print(f"warmup failed (the sweep goes on): {e}")
            except TimeoutError:
                stop(f"the warmup ran past half of --max-seconds {opts.max_seconds:g}")

        prefill, prefill_details = [], []
        for input_len in opts.input_lens:
            if stopped:
                break
            try:
                results = await _within(profiler.batch(input_len, 1, opts.prefill_concurrency), prefill_deadline)
            except TimeoutError:
                stop(f"prefill: half of --max-seconds {opts.max_seconds:g} passed before input_len {input_len} "
                     "was done")
                break
            except Refused as e:
                stop(f"prefill: input_len {input_len} refused, longer ones skipped: {e}")
                break
            except RuntimeError as e:
                print(f"prefill input_len={input_len}: skipped: {e}")
                continue
            f = prefill_figures(results)
            prefill.append({"input_len": input_len, "input_tok_s": f["input_tok_s"] / opts.prefill_ranks,
                            "cache_hit_rate": f["cache_hit_rate"], "ttft_ms": f["ttft_ms"]})
            prefill_details.append({"input_len": input_len, **f})
            print(f"prefill input_len={input_len}: {prefill[-1]['input_tok_s']:,.1f} input tok/s per rank "
                  f"({opts.prefill_ranks} ranks), TTFT p{LATENCY_PERCENTILE} {f['ttft_ms']:.1f} ms, cache hit rate "
                  f"{f['cache_hit_rate']:.2f} ({f['requests']} requests in {f['wall_s']:.3f} s)")

        decode, decode_details = [], []
        context_len = opts.decode_input_len + opts.decode_output_len / 2
        for running in opts.running:
            try:
                results = await _within(profiler.batch(opts.decode_input_len, opts.decode_output_len, running),
                                        deadline)
                f = decode_figures(results)
            except TimeoutError:
                stop(f"decode: --max-seconds {opts.max_seconds:g} passed before running {running} was done")
                break
            except Refused as e:
                stop(f"decode: running {running} refused, larger ones skipped: {e}")
                break
            except (RuntimeError, ValueError) as e:
                print(f"decode running={running}: skipped: {e}")
                continue
            # NOTE: `running` is per rank, as output_tok_s: the balancer spreads the streams over the ranks.
            decode.append({"running": running / opts.decode_ranks, "context_len": context_len,
                           "output_tok_s": f["output_tok_s"] / opts.decode_ranks, "itl_ms": f["itl_ms"]})
            decode_details.append({"streams": running, **f})
            print(f"decode running={running} context_len={context_len:g}: {decode[-1]['output_tok_s']:,.1f} output "
                  f"tok/s per rank ({opts.decode_ranks} ranks), ITL p{LATENCY_PERCENTILE} {f['itl_ms']:.1f} ms "
                  f"({f['window_tokens']} tokens in {f['window_s']:.3f} s, window: {f['window']})")
    return {"prefill": prefill, "decode": decode, "details": {"prefill": prefill_details, "decode": decode_details},
            "meta": {"url": url, "model": opts.model, "date": datetime.datetime.now().astimezone().isoformat(),
                     "prefill_ranks": opts.prefill_ranks, "decode_ranks": opts.decode_ranks,
                     "ranks_counted": counted, "latency_percentile": LATENCY_PERCENTILE,
                     "duration_s": time.monotonic() - started, "stopped": stopped,
                     "flags": flags}}


def command(argv: list[str]) -> str:
    masked = ["***" if before == "--api-key" else a.split("=")[0] + "=***" if a.startswith("--api-key=") else a
              for before, a in zip(["", *argv], argv)]
    return shlex.join(["python", "-m", "loadgen.profile", *masked])


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    opts.api_key = opts.api_key or os.environ.get("STREAMOE_API_KEY") or None
    if opts.seed is None:
        opts.seed = secrets.randbits(32)  # NOTE: a fixed default would resend last run's prompts: cache hits
    try:
        profile = asyncio.run(sweep(opts))
    except RuntimeError as e:
        print(f"python -m loadgen.profile: error: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"python -m loadgen.profile: error: --url {opts.url}: no answer to GET /v1/models or /services within "
              f"--max-seconds {opts.max_seconds:g}", file=sys.stderr)
        return 1
    except (OSError, aiohttp.ClientError) as e:
        print(f"python -m loadgen.profile: error: --url {opts.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    missing = [role for role in ("prefill", "decode") if not profile[role]]
    if missing:
        why = "; ".join(profile["meta"]["stopped"]) or "every point failed"
        print(f"python -m loadgen.profile: error: no {' and no '.join(missing)} point measured ({why}); "
              f"{opts.out} not written", file=sys.stderr)
        return 1
    profile["meta"]["command"] = command(sys.argv[1:] if argv is None else argv)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(profile, indent=2) + "\n")
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
