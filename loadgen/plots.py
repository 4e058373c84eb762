"""`--plot DIR`: latency CDFs (TTFT, TPOT, ITL, E2E) and output throughput over time, as PNGs."""
from __future__ import annotations

import math
from pathlib import Path

from .client import Result
from .report import METRICS, latencies

LATENCY_CDF_PNG = "latency_cdf.png"  # one figure, four panels: TTFT, TPOT, ITL, E2E
THROUGHPUT_PNG = "throughput_over_time.png"  # output tokens/s in 1 s bins


def write_plots(results: list[Result], duration_s: float, directory: Path, title: str = "") -> list[Path]:
    """Write both PNGs into `directory` (made if missing); their paths."""
    import matplotlib

    matplotlib.use("Agg")  # NOTE: no display: render to files only
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / LATENCY_CDF_PNG, directory / THROUGHPUT_PNG]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, latencies(results).items()):
        ms = sorted(v * 1000.0 for v in values)
        if ms:
            ax.step(ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post")
            ax.set_xlim(left=0)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{name.upper()}: {METRICS[name]}", xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency CDFs {title}".strip())
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    bins = max(1, math.ceil(duration_s))
    tokens = [0] * bins
    for result in results:
        for t, n in result.token_times_s:
            tokens[min(bins - 1, max(0, int(t)))] += n
    widths = [1.0] * (bins - 1) + [max(1e-3, duration_s - (bins - 1))]  # NOTE: the last bin may be partial
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(bins), [n / w for n, w in zip(tokens, widths)], width=widths, align="edge", edgecolor="black",
           linewidth=0.3)
    ax.set(title=f"Output throughput over time {title}".strip(), xlabel="seconds since the start",
           ylabel="output tokens/s (1 s bins)", xlim=(0, max(duration_s, 1e-3)))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
