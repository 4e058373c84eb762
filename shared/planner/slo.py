"""The one SLO syntax, for `python -m loadgen --slo`, `streamoe plan --slo` and `streamoe up --slo`.

    ttft:2000 itl:100        (space- or comma-separated; milliseconds)

Metrics: `ttft` (time to first token), `itl` (inter-token latency), `tpot` (time per output token
after the first), `e2el` (end-to-end latency). Each at most once; at least one. Without `--slo`,
DEFAULT_SLO holds.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

METRICS = ("ttft", "itl", "tpot", "e2el")
DEFAULT_SLO = "ttft:2000 itl:100"


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    itl_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def items(self) -> dict[str, float]:
        """{"ttft": 2000.0, ...}: the metrics set, in METRICS order."""
        return {f.name.removesuffix("_ms"): getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    def __str__(self) -> str:
        return " ".join(f"{name}:{ms:g}" for name, ms in self.items().items())


def parse_slo(text: str | list[str] | tuple[str, ...] | None) -> SLO:
    """`"ttft:2000 itl:100"` (or `"ttft:2000,itl:100"`, or the items as a list) -> SLO; None or
    empty: DEFAULT_SLO. A bad item raises ValueError naming it."""
    if text is None:
        text = DEFAULT_SLO
    if not isinstance(text, str):
        text = " ".join(text)
    items = [i for i in re.split(r"[\s,]+", text.strip()) if i]
    if not items:
        items = DEFAULT_SLO.split()
    values: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        try:
            ms = float(value) if sep else math.nan
        except ValueError:
            ms = math.nan
        if name not in METRICS or not ms > 0 or math.isinf(ms):
            raise ValueError(f"SLO item {item!r}: expected METRIC:MS, METRIC one of {', '.join(METRICS)} and MS a "
                             f"positive number of milliseconds (e.g. {DEFAULT_SLO!r})")
        if name in values:
            raise ValueError(f"SLO item {item!r}: {name} is given twice")
        values[name] = ms
    return SLO(**{f"{k}_ms": v for k, v in values.items()})
