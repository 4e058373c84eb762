"""What `appendfsync always` costs against `everysec`: the same workload through `streamoe up`, its
embedded Redis fsyncing its append-only file before every reply, or once a second.

    python -m loadgen.bench_fsync [--preset tiny] [--rounds 2] [--num-requests 64] [--input-len 96]
                                  [--output-len 32] [--out FILE]

Each round starts `streamoe up --redis-appendfsync everysec`, then `always` (a fresh run directory
each time), sends the `random` workload with every request at once (streamed, greedy, EOS
ignored) after a warm-up, and stops the system. Rounds alternate the two settings, so that drift
of a shared machine falls on both. Prints output tokens/s, request throughput and latency
percentiles per setting (medians over the rounds), and always / everysec.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import tempfile
from pathlib import Path

from .bench_e2e import _vocab, run_loadgen
from .system import running_system

SETTINGS = ("everysec", "always")
KEYS = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_e2el_ms", "p99_e2el_ms")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_fsync", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--port", type=int, default=8131)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def one_run(args: argparse.Namespace, fsync: str, run_dir: Path) -> dict:
    vocab = _vocab(args.preset)
    with running_system("--preset", args.preset, "--dtype", args.dtype, "--port", str(args.port), "--run-dir",
                        str(run_dir), "--redis-appendfsync", fsync) as url:
        run_loadgen(["--url", url, "--workload", "random", "--num-requests", "4", "--input-len", "32",
                     "--output-len", "4", "--vocab-size", str(vocab), "--seed", "99", "--no-progress",
                     "--out", str(run_dir / "warmup.json")])
        argv = ["--url", url, "--workload", "random", "--num-requests", str(args.num_requests), "--input-len",
                str(args.input_len), "--output-len", str(args.output_len), "--vocab-size", str(vocab), "--seed", "0",
                "--rate", "inf", "--no-progress",
                "--out", str(run_dir / "loadgen.json")]
        result = run_loadgen(argv)
    result["loadgen_command"] = "python -m loadgen " + shlex.join(argv)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-fsync-"))
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for fsync in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
            result = one_run(args, fsync, root / f"{r}-{fsync}")
            assert result["completed"] == args.num_requests, result
            runs[fsync].append({k: result[k] for k in KEYS})
    median = {s: {k: statistics.median(run[k] for run in runs[s]) for k in KEYS} for s in SETTINGS}
    print(f"{args.preset}, {args.num_requests} requests at once, input {args.input_len}, output {args.output_len} "
          f"tokens; {args.rounds} rounds, medians")
    print(f"{'appendfsync':12} " + " ".join(f"{k:>18}" for k in KEYS))
    for s in SETTINGS:
        print(f"{s:12} " + " ".join(f"{median[s][k]:>18.2f}" for k in KEYS))
    ratios = {k: median["always"][k] / median["everysec"][k] for k in KEYS}
    print(f"{'always/every':12} " + " ".join(f"{ratios[k]:>17.3f}x" for k in KEYS))
    command = "python -m loadgen.bench_fsync " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    print(command)
    if args.out:
        args.out.write_text(json.dumps({"command": command, "runs": runs, "median": median, "always_over_everysec":
                                        ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
