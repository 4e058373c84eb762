"""The prefix cache, measured through the whole system (`streamoe up`, cache on).

    python -m loadgen.bench_cache [--preset small] [--prompt-len 2048] [--cached 1984]
                                  [--conversations 4] [--turns 4]

1. TTFT of a `--prompt-len`-token prompt never seen (uncached) vs one whose first `--cached`
   tokens another request already brought into the cache (same length, same moment of the run).
2. `python -m loadgen --workload multi-turn`: cache_hit_rate against cache_hit_rate_max.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from .system import running_system


def ttft(url: str, model: str, prompt: list[int]) -> tuple[float, int]:
    """(seconds to the first streamed token, cached prompt tokens)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start, first, cached = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and first is None:
                first = time.perf_counter() - start
            if event.get("usage"):
                cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
    return first, cached


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_cache")
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--cached", type=int, default=1984)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--port", type=int, default=8161)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    with running_system("--preset", args.preset, "--port", str(args.port), "--run-dir", str(tmp / "run"),
                        "--cache-dir", str(tmp / "blocks")) as url:
        vocab = 8192 if args.preset == "small" else 1024
        rng = np.random.default_rng(0)
        ttft(url, args.preset, rng.integers(6, vocab, 64).tolist())  # warm-up
        base = rng.integers(6, vocab, args.prompt_len).tolist()
        miss, miss_cached = ttft(url, args.preset, base)
        time.sleep(2)  # the prompt's blocks are written off the request's path
        variant = base[:args.cached] + rng.integers(6, vocab, args.prompt_len - args.cached).tolist()
        hit, hit_cached = ttft(url, args.preset, variant)
        out = tmp / "multi-turn.json"
        loadgen = ["--url", url, "--workload", "multi-turn", "--num-requests", str(args.conversations * args.turns),
                   "--num-turns", str(args.turns), "--input-len", "200", "--output-len", "48", "--range-ratio", "0.3",
                   "--max-concurrency", str(args.conversations), "--no-progress", "--out", str(out)]
        subprocess.run([sys.executable, "-m", "loadgen", *loadgen], check=True, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    print(f"{args.preset}: TTFT of a {args.prompt_len}-token prompt: uncached {miss * 1000:.0f} ms "
          f"({miss_cached} cached tokens), with {hit_cached} tokens cached {hit * 1000:.0f} ms: "
          f"{hit / miss:.3f}x")
    rate, best = result["cache_hit_rate"], result["cache_hit_rate_max"]
    print(f"multi-turn ({args.conversations} conversations x {args.turns} turns, {result['completed']} completed): "
          f"cache_hit_rate {rate:.4f} of cache_hit_rate_max {best:.4f}: {rate / best:.3f} of the maximum")
    print("loadgen: python -m loadgen " + " ".join(loadgen[:1] + ["URL"] + loadgen[2:-2]))
    print("command: python -m loadgen.bench_cache " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
