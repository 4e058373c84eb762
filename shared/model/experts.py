"""Routed experts stacked per MoE layer, and the backends that run them in one grouped pass.

Legend: S = expert slots in a stack (E for a whole layer; an EP rank's local slots), D = hidden,
I = moe_intermediate_size, P = (token, expert) pairs sorted by slot, T = tokens, K = experts per
token, C = the most pairs any slot got (padded backends).

A stack holds `w13 [S, 2I, D]` (each expert's gate rows, then its up rows) and `w2 [S, D, I]`,
contiguous. Each slot is also an `MLP` module whose weights are views of the stack, so the
checkpoint's per-expert names, the reference paths and the tests keep working without a second
copy of the weights.

Backends (`--moe-backend`), all on pairs already sorted by slot with per-slot counts on the device:
- `reference`: one (token, expert) pair at a time (MoE.routed_loop; tests only);
- `loop`: one expert at a time through its three projections (the engine before stacking; the
  "before" of every benchmark ratio); reads the counts on the host;
- `sparse`: the experts that got pairs only, one fused gate/up GEMM and one down GEMM each over
  the stack (reads the counts on the host; on a CPU the cheapest for a few tokens, where the
  grouped op still visits every expert);
- `grouped`: `torch._grouped_mm` over the stack with the offsets on the device, silu·mul between
  the two GEMMs; no host synchronisation;
- `bmm`: every slot's pairs padded to C rows, then batched `x @ Wᵀ` (reads C on the host);
- `weight-major`: the same padding, batched as `W @ xᵀ` (the weights as the left operand);
- `native`: the whole layer in one call of streamoe's own C loops (native.py; CPU, bf16 or fp32):
  the experts that got pairs only, 8 pairs at a time (fp32: up to 24, in groups of 5), gate/up,
  silu·mul and down with fp32 in between (MoE.forward hands it the routing: `native.moe` sorts the
  pairs, combines them and counts the load too); in bf16, where a plan picks it for a token count, the step's linears,
  norms, gate choices, rotary embeddings and cache rows of up to 64 rows take its loops too
  (`native.Linear`, `RMSNorm`, `native.gate`, `native.rope`, `native.kv_rows`), and its
  single-token decodes read the cache in place (`MLA._decode_in_place`).
A plan may pick a backend per token count (`1:loop,16:weight-major`): `auto` is resolved into
such a plan by calibration (shared/runtime/numerics.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.model import native

BACKENDS = ("reference", "loop", "sparse", "grouped", "bmm", "weight-major", "native")


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers, experts and shared experts alike."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = native.Linear(dim, inter_dim, bias=False)
        self.up_proj = native.Linear(dim, inter_dim, bias=False)
        self.down_proj = native.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, D] -> [M, D]; plus `add` [M, D] where given (the MoE layer's routed sum)."""
        gate, up, down = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        if (x.dtype == torch.bfloat16 and self.gate_proj.runs_native(x) and x.stride(1) == 1  # (fp32: each linear)
                and gate.is_contiguous() and up.is_contiguous() and down.is_contiguous()
                and (add is None or (add.dtype == x.dtype and add.is_contiguous()))):
            return native._mlp(x, gate, up, down, add, native.library())  # the same steps in one call
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if add is None else add + y


class ExpertStack:
    """The stacked weights of some expert slots, and one MLP per slot viewing them."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w13, self.w2 = w13, w2  # [S, 2I, D], [S, D, I]
        inter = w2.shape[2]
        self.modules = nn.ModuleList(_view_mlp(w13[s, :inter], w13[s, inter:], w2[s]) for s in range(w13.shape[0]))

    @classmethod
    def empty(cls, num_slots: int, dim: int, inter: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> ExpertStack:
        """Uninitialised; the loader copies each expert's tensors into its slot's views."""
        return cls(torch.empty(num_slots, 2 * inter, dim, dtype=dtype, device=device),
                   torch.empty(num_slots, dim, inter, dtype=dtype, device=device))

    @classmethod
    def from_experts(cls, experts: Sequence[MLP]) -> ExpertStack:
        """A new stack holding a copy of each expert, in order (a slot may repeat an expert: a
        redundant copy is a real copy, as on a GPU)."""
        with torch.no_grad():  # weights, never trained here
            w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])
            w2 = torch.stack([e.down_proj.weight for e in experts])
        return cls(w13, w2)

    def __len__(self) -> int:
        return self.w13.shape[0]

    def packed_for_native(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This stack as the native loops read it fastest (native.pack_experts: a second copy, in tiles),
        made once and again only when a weight changes; None where they read the stack itself."""
        key = (self.w13.data_ptr(), self.w13._version, self.w2.data_ptr(), self.w2._version)
        if getattr(self, "_packed_key", None) != key:
            self._packed = native.pack_experts(self.w13, self.w2)
            self._packed_key = key
        return self._packed


def _view_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> MLP:
    with torch.device("meta"):
        mlp = MLP(gate.shape[1], gate.shape[0])
    mlp.gate_proj.weight = nn.Parameter(gate, requires_grad=False)
    mlp.up_proj.weight = nn.Parameter(up, requires_grad=False)
    mlp.down_proj.weight = nn.Parameter(down, requires_grad=False)
    return mlp


@dataclass(frozen=True)
class MoEPlan:
    """Which backend runs a layer's experts, by the number of tokens in the batch: `steps` are
    (from this many tokens on, backend), ascending, the first from 1."""

    steps: tuple[tuple[int, str], ...]

    @classmethod
    def single(cls, backend: str) -> MoEPlan:
        return cls(((1, backend),))

    @classmethod
    def parse(cls, text: str) -> MoEPlan:
        """`grouped`, or `1:loop,16:weight-major` (from 1 token loop, from 16 weight-major)."""
        text = text.strip()
        if text in BACKENDS:
            return cls.single(text)
        steps = []
        for part in text.split(","):
            tokens, sep, name = part.strip().partition(":")
            if not sep or not tokens.strip().isdigit() or name.strip() not in BACKENDS:
                raise ValueError(f"--moe-backend={text!r}: expected auto, one of {', '.join(BACKENDS)}, or "
                                 f"TOKENS:BACKEND,... from 1 token up (e.g. 1:loop,16:weight-major)")
            steps.append((int(tokens), name.strip()))
        if steps[0][0] != 1 or any(a[0] >= b[0] for a, b in zip(steps, steps[1:])):
            raise ValueError(f"--moe-backend={text!r}: token counts must start at 1 and increase")
        return cls(tuple(steps))

    @property
    def text(self) -> str:
        if len(self.steps) == 1:
            return self.steps[0][1]
        return ",".join(f"{n}:{b}" for n, b in self.steps)

    @property
    def backends(self) -> set[str]:
        return {b for _, b in self.steps}

    def choose(self, num_tokens: int) -> str:
        chosen = self.steps[0][1]
        for start, backend in self.steps:
            if num_tokens >= start:
                chosen = backend
        return chosen


def check_supported(plan: MoEPlan, device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse a backend this device and dtype cannot run, naming both."""
    device = torch.device(device)
    where = f"device={device.type}, dtype={str(dtype).removeprefix('torch.')}"
    if "native" in plan.backends:
        if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"--moe-backend=native: streamoe's native kernels take bf16 or fp32 on the CPU only "
                             f"({where}); use sparse, grouped or weight-major")
        why = native.unavailable()
        if why is not None:
            raise ValueError(f"--moe-backend=native: the native kernels are unavailable here ({where}): {why}")
    if "grouped" not in plan.backends:
        return
    if not hasattr(torch, "_grouped_mm"):
        raise ValueError(f"--moe-backend=grouped: torch {torch.__version__} has no grouped matmul ({where}); "
                         "use bmm, weight-major or loop")
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise ValueError(f"--moe-backend=grouped: the CUDA grouped matmul takes bf16 only ({where}); "
                             "use bmm or weight-major, or --dtype bf16")
        if torch.cuda.get_device_capability(device) < (8, 0):
            raise ValueError(f"--moe-backend=grouped: the CUDA grouped matmul needs compute capability 8.0+ "
                             f"({where}, capability {torch.cuda.get_device_capability(device)})")
    elif device.type != "cpu":
        raise ValueError(f"--moe-backend=grouped: not available on this device ({where})")


def default_plan(device: torch.device | str, dtype: torch.dtype) -> MoEPlan:
    """Before any calibration: the grouped op where it runs, else padded weight-major."""
    try:
        plan = MoEPlan.single("grouped")
        check_supported(plan, device, dtype)
        return plan
    except ValueError:
        return MoEPlan.single("weight-major")


def expert_counts(ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """ids [...] -> pairs per slot [S] (int64), on the device without a host sync (bincount
    reads the largest id on the host)."""
    flat = ids.flatten()
    return torch.zeros(num_slots, dtype=torch.int64, device=ids.device).index_add_(
        0, flat, torch.ones_like(flat))


def run_experts(backend: str, xs: torch.Tensor, counts: torch.Tensor, stack: ExpertStack) -> torch.Tensor:
    """xs [P, D] sorted by slot, counts [S] pairs per slot -> each pair through its slot's expert [P, D]."""
    if xs.shape[0] == 0:
        return torch.empty_like(xs)
    if backend == "loop":
        return _loop(xs, counts, stack)
    if backend == "sparse":
        return _sparse(xs, counts, stack)
    if backend == "grouped":
        return _grouped(xs, counts, stack)
    if backend in ("bmm", "weight-major"):
        return _padded(xs, counts, stack, weight_major=backend == "weight-major")
    if backend == "native":
        return native.experts(xs, counts, stack.w13, stack.w2, packed=stack.packed_for_native())
    raise ValueError(f"moe backend {backend!r}: expected one of {', '.join(BACKENDS[1:])} here")


def _silu_mul(h: torch.Tensor, inter: int, dim: int) -> torch.Tensor:
    gate, up = h.split(inter, dim=dim)
    return F.silu(gate).mul_(up)


def _loop(xs: torch.Tensor, counts: torch.Tensor, stack: ExpertStack) -> torch.Tensor:
    ys = torch.empty_like(xs)
    start = 0
    for slot, n in enumerate(counts.tolist()):
        if n:
            ys[start:start + n] = stack.modules[slot](xs[start:start + n])
            start += n
    return ys


def _sparse(xs: torch.Tensor, counts: torch.Tensor, stack: ExpertStack) -> torch.Tensor:
    ys = torch.empty_like(xs)
    inter, start = stack.w2.shape[2], 0
    # Measured on an AMX CPU (bench_moe, 2 threads): one row goes through torch.mv, and bf16 rows as
    # W @ xᵀ, which read the weights ~1.3-1.4x faster than x @ Wᵀ; fp32 from 2 rows is faster as x @ Wᵀ.
    weight_left = xs.dtype != torch.float32
    for slot, n in enumerate(counts.tolist()):
        if not n:
            continue
        x, y = xs[start:start + n], ys[start:start + n]
        if n == 1:
            torch.mv(stack.w2[slot], _silu_mul(torch.mv(stack.w13[slot], x[0]), inter, 0), out=y[0])
        elif weight_left:
            y.copy_(torch.mm(stack.w2[slot], _silu_mul(torch.mm(stack.w13[slot], x.t()), inter, 0)).t())
        else:
            torch.mm(_silu_mul(F.linear(x, stack.w13[slot]), inter, 1), stack.w2[slot].t(), out=y)
        start += n
    return ys


def _grouped(xs: torch.Tensor, counts: torch.Tensor, stack: ExpertStack) -> torch.Tensor:
    offsets = counts.cumsum(0).to(torch.int32)  # [S] end of each slot's rows, on the device
    h = torch._grouped_mm(xs, stack.w13.transpose(1, 2), offs=offsets)  # [P, 2I]
    return torch._grouped_mm(_silu_mul(h, stack.w2.shape[2], 1), stack.w2.transpose(1, 2), offs=offsets)


def _padded(xs: torch.Tensor, counts: torch.Tensor, stack: ExpertStack, weight_major: bool) -> torch.Tensor:
    num_slots, inter = len(stack), stack.w2.shape[2]
    width = int(counts.max())  # C
    slot = torch.repeat_interleave(torch.arange(num_slots, device=xs.device), counts)  # [P]
    row = torch.arange(xs.shape[0], device=xs.device) - (counts.cumsum(0) - counts)[slot]  # [P] row within its slot
    if weight_major:  # (W @ xᵀ)ᵀ
        xp = xs.new_zeros(num_slots, xs.shape[1], width)  # [S, D, C]
        xp[slot, :, row] = xs
        act = _silu_mul(torch.bmm(stack.w13, xp), inter, 1)  # [S, I, C]
        return torch.bmm(stack.w2, act)[slot, :, row]  # [P, D]
    xp = xs.new_zeros(num_slots, width, xs.shape[1])  # [S, C, D]
    xp[slot, row] = xs
    act = _silu_mul(torch.bmm(xp, stack.w13.transpose(1, 2)), inter, 2)  # [S, C, I]
    return torch.bmm(act, stack.w2.transpose(1, 2))[slot, row]


def combine(ys: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The routed output [T, D] in fp32 from the pair outputs ys [P, D]: rows [T, K] is the row of
    ys holding pair (t, k), ids [T, K] its expert, weights [T, K] its weight.

    NOTE: each token's pairs are summed in expert-id order, one pair at a time, with no atomics, so
    the sum does not depend on how the pairs were batched: with the exact wire every EP size and
    every backend adds the same numbers in the same order as EP 1 (on CPU and CUDA alike)."""
    by_id = ids.argsort(dim=1)  # [T, K] (a token's experts are distinct)
    picked = ys.index_select(0, rows.gather(1, by_id).flatten()).view(*ids.shape, ys.shape[1])  # [T, K, D]
    w = weights.float().gather(1, by_id)  # [T, K]
    out = picked[:, 0].float() * w[:, :1]
    for k in range(1, ids.shape[1]):
        out = out + picked[:, k].float() * w[:, k:k + 1]
    return out
