"""streamoe's own CPU kernels for bf16 at a few rows, and the routed experts in fp32 (issue #15):
`native/smallgemm.c`.

At a few rows a matmul is a read of its weights, and on some CPUs torch's bf16 paths at these sizes
read them at a fraction of the bandwidth (loadgen/README.md). The C loops take each weight row
while it streams by into every input row, accumulating in fp32, and round each output to bf16
once: with AVX512-BF16 as bf16 pair products (`vdpbf16ps`), else with AVX-512 widened to fp32,
else in plain C (`kind()`). The entry points:
- `linear(x, weight)`: x [M, K] @ weightᵀ for M <= LINEAR_ROWS (nn.Linear without bias): up to 15
  rows the weights read once, the rows met 8 at a time; from 16 rows (AVX512-BF16, K even) outer
  products, the rows packed by channel pairs and each weight pair broadcast against 16 rows at once;
  in fp32 up to F32_LINEAR_ROWS rows on the fp32 experts' loops (below);
- `experts(xs, counts, w13, w2)`: a whole MoE layer's routed experts in one call (the `native`
  MoE backend, experts.py): each slot's pairs, 8 at a time, through gate/up, silu·mul and down;
  the intermediate silu·mul is rounded to bf16 where the dot products take bf16 (as torch's bf16
  path rounds it), else kept in fp32. fp32 rows and stacks take the fp32 loops (AVX2 with FMA,
  else plain C): a slot's pairs 24 at a time, met by blocks of weight rows in groups of up to 5
  while the block is in L1, the next block prefetched; where a model computes in fp32 these and
  `linear` up to F32_LINEAR_ROWS rows are the native kernels it runs (its norms, attention and
  larger linears stay torch's);
- `decode_attention(q, rows, slots, lengths, latent, scale)`: single-token decodes on the absorbed
  path, each sequence's context read in place from the cache rows by slot (nothing gathered),
  scores and softmax in fp32, the weighted sum in fp32 (with AVX512-BF16 of the probabilities
  rounded to bf16, as torch's fused attention rounds them) (MLA._decode_in_place);
- `moe(x, ids, weights, w13, w2, load)`: the layer from its routing (MoE.forward): the pairs
  sorted by slot, `experts`, and experts.combine's fp32 sum in slot order, bit for bit (bf16 or
  fp32), the slots' pair counts added to `load`;
- `gate(x, weight, bias, ...)`: moe.Gate's choice (fp32 scores, group-limited top-k) in one call;
- `heads(x, pack_heads(weight), n)`: per-head products against weights packed in input pairs (no
  sum across vector lanes, so short dot products run at full rate), the absorbed attention's W_UK
  and W_UV (MLA._decode_in_place);
- `rms_norm(x, weight, eps)`: norm.RMSNorm of a few rows in one call; `add_rms_norm(x, r, weight, eps)`:
  the residual sum x + r and its norm in one call (DecoderLayer's sum after attention);
- `mlp(x, gate, up, down, add)`: experts.MLP (the dense layers, the shared expert) in one call, each
  step rounded as torch's bf16 operators round it, plus the MoE layer's routed sum where given;
- `store_rows(pool, slots, rows)`: the new cache rows into their slots (LatentKVPool.store), every
  destination line asked for at once;
- `mla_decode(...)`: MLA.forward for a step of single-token decodes, from the normed input to o_proj,
  in one call of the same kernels in the same order (the same bits; a dozen calls fewer per layer);
- `moe_block(...)`: a MoE layer's gate, experts, shared expert and residual sum in one call (the same
  kernels in the same order: the same bits);
- `decode_layers(...)`: every decoder layer of such a step in one call (its norms, `mla_decode`,
  `add_rms_norm`, `moe_block` or the dense `mlp`, in the modules' order: the same bits, no return to
  Python between layers), from weights described once (`LayerWeights`);
- `rope(x, cos, sin, interleave)`, `kv_rows(kv, weight, eps, cos, sin, interleave)`: the rotary
  embedding, and MLA.project_kv's norm, rotation and concatenation, bit for bit as torch's operators.

The source is compiled on first use with the C compiler (`$CC`, else `cc`) as
`-O3 -march=native -fopenmp -ffp-contract=off` into $STREAMOE_HOME/kernels/, keyed by the source,
the compiler and the CPU (model and flags: a library built for one CPU never runs on another), written under a
temporary name and renamed, so workers starting together never load a half-written file. Its OpenMP
is the runtime torch has loaded (the same soname), and each call runs on torch.get_num_threads()
threads. Without a compiler the kernels are unavailable (`unavailable()` says why): the `native`
backend is then refused, and the calibration never measures it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.launcher.cliargs import home

SOURCE = Path(__file__).with_name("native") / "smallgemm.c"
MAX_ROWS = 8  # rows per kernel pass (the C file's MAX_ROWS)
LINEAR_ROWS = 64  # the most rows `linear` takes (at 64 1.1-1.4x torch's GEMM per call; at 512 torch's is faster)
F32_LINEAR_ROWS = 32  # in fp32 (AVX2 EPYC, cold weights: 1.4-4x torch's at 1-16 rows, 1.1-2.5x at 32, 0.8-1.2x at 64)
NORM_ROWS = 64  # the most rows norm.RMSNorm gives `rms_norm` (a decode batch, not a prefill)
FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off")  # no fused multiply-adds but the written ones
_INT, _PTR = ctypes.c_int64, ctypes.c_void_p


def cpu_id() -> str:
    """The CPU a build or a measurement holds for: `model|flags` (the first processor's), or the
    architecture alone where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    first: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            first.setdefault(name.strip(), value.strip())
    return f"{first.get('model name', '?')}|{first.get('flags', first.get('Features', ''))}"


class NativeUnavailable(RuntimeError):
    """The kernels cannot be built or loaded here; the message says why."""


def library() -> ctypes.CDLL:
    """The kernels built for this CPU (compiled on the first call of the process; reused from disk after that)."""
    return build("native")


@functools.cache
def build(march: str) -> ctypes.CDLL:
    """The kernels built with `-march=MARCH` (the tests build the older instruction sets' paths too)."""
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise NativeUnavailable(f"no C compiler: {compiler} --version failed ({e}); set $CC or install gcc") from e
    source = SOURCE.read_bytes()
    flags = [*FLAGS, f"-march={march}"]
    key = hashlib.blake2b(b"\0".join([source, version.encode(), cpu_id().encode(), " ".join(flags).encode()]),
                          digest_size=12).hexdigest()
    target = home() / "kernels" / f"smallgemm-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
        os.close(fd)
        try:
            built = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
            if built.returncode != 0:
                raise NativeUnavailable(f"{compiler} could not build {SOURCE.name}: {built.stderr.strip()[-400:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    lib.streamoe_linear_bf16.argtypes = [_PTR, _INT, _PTR, _INT, _INT, _INT, _INT, _PTR, _INT, ctypes.c_int]
    lib.streamoe_experts_bf16.argtypes = [_PTR, _PTR, _INT, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _PTR, ctypes.c_int]
    lib.streamoe_linear_f32.argtypes = [_PTR, _INT, _PTR, _INT, _INT, _INT, _INT, _PTR, _INT, ctypes.c_int]
    lib.streamoe_experts_f32.argtypes = [_PTR, _PTR, _INT, _PTR, _PTR, _INT, _INT, _PTR, ctypes.c_int]
    lib.streamoe_moe_f32.argtypes = [_PTR, _INT, _INT, _PTR, _PTR, _INT, _INT, _PTR, _PTR, _INT, _PTR, _PTR,
                                     ctypes.c_int]
    lib.streamoe_decode_attention_bf16.argtypes = [_PTR, _INT, _INT, _INT, _PTR, _PTR, _INT, _PTR, _INT,
                                                   ctypes.c_float, _PTR, ctypes.c_int]
    lib.streamoe_heads_bf16.argtypes = [_PTR, _INT, _INT, _INT, _INT, _INT, _PTR, _INT, _INT, _PTR, _INT, _INT,
                                        ctypes.c_int]
    lib.streamoe_rms_norm_bf16.argtypes = [_PTR, _INT, _INT, _INT, _PTR, ctypes.c_float, _PTR, _INT]
    lib.streamoe_moe_bf16.argtypes = [_PTR, _INT, _INT, _PTR, _PTR, _INT, _INT, _PTR, _PTR, _PTR, _PTR, _INT, _PTR,
                                      _PTR, ctypes.c_int]
    lib.streamoe_add_rms_norm_bf16.argtypes = [_PTR, _INT, _PTR, _INT, _INT, _INT, _PTR, ctypes.c_float, _PTR, _INT,
                                               _PTR, _INT]
    lib.streamoe_mlp_bf16.argtypes = [_PTR, _INT, _INT, _INT, _PTR, _PTR, _INT, _PTR, _PTR, _PTR, ctypes.c_int]
    lib.streamoe_store_rows_bf16.argtypes = [_PTR, _INT, _INT, _INT, _PTR, _INT, _PTR]
    lib.streamoe_mla_decode_bf16.argtypes = [_PTR, _INT, _INT, _INT, _PTR, _INT, _PTR, ctypes.c_float, _PTR, _INT, _INT,
                                             _INT, _PTR, _INT, _PTR, ctypes.c_float, _PTR, _PTR, ctypes.c_int, _PTR,
                                             _INT, _PTR, _PTR, _INT, _PTR, _INT, _INT, _PTR, _INT, _PTR,
                                             ctypes.c_float, _PTR, _PTR, ctypes.c_int]
    lib.streamoe_moe_block_bf16.argtypes = [_PTR, _PTR, _INT, _INT, _PTR, _PTR, _INT, _INT, _INT, _INT, ctypes.c_int,
                                            ctypes.c_float, _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _PTR, _PTR, _PTR, _INT,
                                            _PTR, ctypes.c_int]
    lib.streamoe_rope_bf16.argtypes = [_PTR, _INT, _INT, _INT, _INT, _INT, _PTR, _PTR, ctypes.c_int, _PTR, _INT, _INT]
    lib.streamoe_gate_bf16.argtypes = [_PTR, _INT, _INT, _INT, _PTR, _PTR, _INT, _INT, _INT, _INT, ctypes.c_int,
                                       ctypes.c_float, _PTR, _PTR, ctypes.c_int]
    lib.streamoe_decode_layers_bf16.argtypes = [ctypes.POINTER(LayerWeights), _INT, _PTR, _INT, _INT, _INT, _INT, _INT,
                                                _INT, _INT, ctypes.c_int, ctypes.c_double, _PTR, _PTR, _PTR, _PTR, _INT,
                                                _PTR, _PTR, _PTR, _PTR, ctypes.c_double, _PTR, ctypes.c_int]
    for fn in (lib.streamoe_decode_layers_bf16, lib.streamoe_rope_bf16, lib.streamoe_gate_bf16,
               lib.streamoe_add_rms_norm_bf16, lib.streamoe_mlp_bf16,
               lib.streamoe_store_rows_bf16, lib.streamoe_mla_decode_bf16, lib.streamoe_moe_block_bf16,
               lib.streamoe_linear_bf16, lib.streamoe_experts_bf16, lib.streamoe_decode_attention_bf16,
               lib.streamoe_heads_bf16, lib.streamoe_rms_norm_bf16, lib.streamoe_moe_bf16, lib.streamoe_native_avx512,
               lib.streamoe_experts_f32, lib.streamoe_moe_f32, lib.streamoe_linear_f32, lib.streamoe_native_avx2):
        fn.restype = ctypes.c_int
    return lib


def kind(lib: ctypes.CDLL | None = None) -> str:
    """How the built loops multiply: `avx512-bf16`, `avx512` or `c`."""
    return {2: "avx512-bf16", 1: "avx512"}.get((lib or library()).streamoe_native_avx512(), "c")


def f32_kind(lib: ctypes.CDLL | None = None) -> str:
    """How the fp32 loops multiply: `avx2` (with FMA) or `c`."""
    return "avx2" if (lib or library()).streamoe_native_avx2() else "c"


def unavailable() -> str | None:
    """None when the kernels run here, else why not."""
    try:
        library()
    except (NativeUnavailable, OSError) as e:
        return str(e)
    return None


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes these: CPU bf16 of 1..LINEAR_ROWS rows or fp32 of 1..F32_LINEAR_ROWS,
    weight rows contiguous."""
    rows = LINEAR_ROWS if x.dtype == torch.bfloat16 else F32_LINEAR_ROWS if x.dtype == torch.float32 else 0
    return (x.dim() == 2 and 0 < x.shape[0] <= rows and x.dtype == weight.dtype and x.device.type == "cpu"
            and weight.device.type == "cpu" and weight.stride(1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]ᵀ -> [M, N], accumulated in fp32: bf16 (M <= LINEAR_ROWS; each output
    rounded once) or fp32 (M <= F32_LINEAR_ROWS)."""
    if not supports(x, weight):
        raise ValueError(f"native.linear: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}: "
                         f"needs CPU bf16 of 1..{LINEAR_ROWS} rows or fp32 of 1..{F32_LINEAR_ROWS}, "
                         "contiguous weight rows")
    return _linear(x, weight, lib or library())


def _linear(x: torch.Tensor, weight: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    """`linear` on inputs already checked (native.Linear's decode path: a few µs of checks per call
    add up over the ~60 linears of a step)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    fn = lib.streamoe_linear_f32 if x.dtype == torch.float32 else lib.streamoe_linear_bf16
    rc = fn(weight.data_ptr(), weight.stride(0), x.data_ptr(), x.stride(0), m, k, n, y.data_ptr(), n,
            torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native.linear failed on x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return y


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, add: torch.Tensor | None = None,
        lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """experts.MLP in one call: x [M, D] bf16 (M <= LINEAR_ROWS) -> down(silu(gate x) * up x) [M, D] bf16,
    each step rounded to bf16 as through `linear` and torch's bf16 silu and mul; plus `add` [M, D] (as
    torch adds bf16) where given. gate, up [I, D] and down [D, I] contiguous."""
    inter = gate.shape[0]
    if not (supports(x, gate) and x.stride(1) == 1 and gate.shape == up.shape == (inter, x.shape[1])
            and down.shape == (x.shape[1], inter) and up.dtype == down.dtype == torch.bfloat16
            and gate.is_contiguous() and up.is_contiguous() and down.is_contiguous() and up.is_cpu and down.is_cpu
            and (add is None or (add.shape == x.shape and add.dtype == torch.bfloat16 and add.is_cpu
                                 and add.is_contiguous()))):
        raise ValueError(f"native.mlp: x {tuple(x.shape)} {x.dtype}, gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                         f"down {tuple(down.shape)}, add {None if add is None else tuple(add.shape)}: needs CPU bf16, "
                         f"1..{LINEAR_ROWS} rows, contiguous weights of matching shapes")
    return _mlp(x, gate, up, down, add, lib or library())


def _mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, add: torch.Tensor | None,
         lib: ctypes.CDLL) -> torch.Tensor:
    """`mlp` on inputs already checked (experts.MLP's decode path)."""
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    rc = lib.streamoe_mlp_bf16(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], gate.data_ptr(), up.data_ptr(),
                               gate.shape[0], down.data_ptr(), None if add is None else add.data_ptr(), y.data_ptr(),
                               torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native.mlp failed on x {tuple(x.shape)}, gate {tuple(gate.shape)}")
    return y


TILE = 64  # output columns per tile of `pack_experts` (the C file's TILE)


def pack_experts(w13: torch.Tensor, w2: torch.Tensor,
                 lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stacks w13 [S, 2I, D] and w2 [S, D, I] (bf16) copied into the tiles the loops read with
    AVX512-BF16 (`experts`, `moe`): each matrix by tiles of 64 output columns, each tile [ceil(K/2)][64][2]
    (a column's two weights of each input pair side by side), zeros past the edges; w13's tiles hold 32
    gate then the same 32 up columns. None where the loops read the stacks as they are (another
    instruction set, or an odd D)."""
    if kind(lib) != "avx512-bf16" or w13.dtype != torch.bfloat16 or w13.device.type != "cpu":
        return None
    slots, dim, inter = w2.shape
    if dim % 2:
        return None
    with torch.no_grad():
        tiles13 = -(-inter // 32)
        rows = torch.zeros(slots, 2, tiles13 * 32, dim, dtype=torch.bfloat16)  # [S, gate|up, I padded, D]
        rows[:, :, :inter] = w13.view(slots, 2, inter, dim)
        tiles = rows.view(slots, 2, tiles13, 32, dim).transpose(1, 2).reshape(slots, tiles13, TILE, dim // 2, 2)
        w13p = tiles.transpose(2, 3).contiguous()
        tiles2, pairs = -(-dim // TILE), -(-inter // 2)
        down = torch.zeros(slots, tiles2 * TILE, 2 * pairs, dtype=torch.bfloat16)
        down[:, :dim, :inter] = w2
        w2p = down.view(slots, tiles2, TILE, pairs, 2).transpose(2, 3).contiguous()
    return w13p, w2p


def experts(xs: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
            lib: ctypes.CDLL | None = None,
            packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """xs [P, D] sorted by slot, counts [S] pairs per slot (int64), w13 [S, 2I, D], w2 [S, D, I]
    (contiguous, CPU; bf16, or fp32 throughout) -> ys [P, D] of xs's dtype: each pair through its
    slot's expert; read from `packed` (`pack_experts` of the same bf16 stacks) where given."""
    xs, counts = xs.contiguous(), counts.contiguous()
    if not (xs.dtype == w13.dtype == w2.dtype and xs.dtype in (torch.bfloat16, torch.float32)
            and counts.dtype == torch.int64 and w13.is_contiguous() and w2.is_contiguous()
            and xs.device.type == counts.device.type == w13.device.type == "cpu"):
        raise ValueError(f"native.experts: xs {xs.dtype}, w13 {w13.dtype}, w2 {w2.dtype}, counts {counts.dtype}: "
                         "needs CPU contiguous stacks of the rows' dtype (bf16 or fp32) and int64 counts")
    slots, dim, inter = w2.shape
    if (w13.shape != (slots, 2 * inter, dim) or xs.dim() != 2 or xs.shape[1] != dim or counts.shape != (slots,)
            or int(counts.sum()) != xs.shape[0]):
        raise ValueError(f"native.experts: xs {tuple(xs.shape)}, counts {tuple(counts.shape)} summing to "
                         f"{int(counts.sum())}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} do not fit together")
    lib = lib or library()
    ys = torch.empty_like(xs)
    if xs.dtype == torch.float32:
        rc = lib.streamoe_experts_f32(xs.data_ptr(), counts.data_ptr(), slots, w13.data_ptr(), w2.data_ptr(), dim,
                                      inter, ys.data_ptr(), torch.get_num_threads())
    else:
        w13p, w2p = _packed_pointers(packed, slots, dim, inter)
        rc = lib.streamoe_experts_bf16(xs.data_ptr(), counts.data_ptr(), slots, w13.data_ptr(), w2.data_ptr(), w13p,
                                       w2p, dim, inter, ys.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native.experts failed on {xs.shape[0]} pairs over {w13.shape[0]} slots")
    return ys


def _packed_pointers(packed: tuple[torch.Tensor, torch.Tensor] | None, slots: int, dim: int,
                     inter: int) -> tuple[int | None, int | None]:
    """The packed tiles' addresses, checked against the stacks' shapes (None, None without them)."""
    if packed is None:
        return None, None
    w13p, w2p = packed
    if not (w13p.shape == (slots, -(-inter // 32), dim // 2, TILE, 2) and w2p.shape == (slots, -(-dim // TILE),
            -(-inter // 2), TILE, 2) and w13p.dtype == w2p.dtype == torch.bfloat16 and w13p.is_contiguous()
            and w2p.is_contiguous() and dim % 2 == 0):
        raise ValueError(f"native experts: packed {tuple(w13p.shape)}, {tuple(w2p.shape)} are not pack_experts of "
                         f"stacks of {slots} slots, D {dim}, I {inter}")
    return w13p.data_ptr(), w2p.data_ptr()


def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        load: torch.Tensor | None = None, lib: ctypes.CDLL | None = None,
        packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """A routed MoE layer from its routing in one call: x [T, D] (bf16, or fp32 with fp32 stacks), ids
    [T, K] int64 (each token's distinct slots), weights [T, K] fp32, the stacks w13 [S, 2I, D] and w2
    [S, D, I] -> [T, D] of x's dtype: the pairs sorted by slot, `experts`, then experts.combine's fp32
    sum in slot order (in bf16, rounded once: the same numbers as those three steps in torch, bit for
    bit). Each slot's pairs are added to `load` [S] int64 where given (MoE.expert_load). The bf16
    experts are read from `packed` where given (`pack_experts` of the same stacks)."""
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    slots, dim, inter = w2.shape
    if not (x.dtype == w13.dtype == w2.dtype and x.dtype in (torch.bfloat16, torch.float32)
            and ids.dtype == torch.int64
            and weights.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == dim and ids.dim() == 2
            and ids.shape[0] == x.shape[0] > 0 and weights.shape == ids.shape and 0 < ids.shape[1] <= 64
            and w13.shape == (slots, 2 * inter, dim) and w13.is_contiguous() and w2.is_contiguous()
            and x.device.type == ids.device.type == weights.device.type == w13.device.type == "cpu"):
        raise ValueError(f"native.moe: x {tuple(x.shape)} {x.dtype}, ids {tuple(ids.shape)} {ids.dtype}, weights "
                         f"{tuple(weights.shape)} {weights.dtype}, w13 {tuple(w13.shape)} {w13.dtype}, w2 "
                         f"{tuple(w2.shape)}: needs CPU rows and stacks of one dtype (bf16 or fp32), int64 ids and "
                         "fp32 weights of one [T, K <= 64] shape")
    if load is not None and not (load.dtype == torch.int64 and load.shape == (slots,) and load.is_contiguous()
                                 and load.device.type == "cpu"):
        raise ValueError(f"native.moe: load {tuple(load.shape)} {load.dtype}: needs a CPU int64 [{slots}]")
    lib = lib or library()
    out = torch.empty_like(x)
    load_ptr = None if load is None else load.data_ptr()
    if x.dtype == torch.float32:
        rc = lib.streamoe_moe_f32(x.data_ptr(), x.shape[0], dim, ids.data_ptr(), weights.data_ptr(), ids.shape[1],
                                  slots, w13.data_ptr(), w2.data_ptr(), inter, out.data_ptr(), load_ptr,
                                  torch.get_num_threads())
    else:
        w13p, w2p = _packed_pointers(packed, slots, dim, inter)
        rc = lib.streamoe_moe_bf16(x.data_ptr(), x.shape[0], dim, ids.data_ptr(), weights.data_ptr(), ids.shape[1],
                                   slots, w13.data_ptr(), w2.data_ptr(), w13p, w2p, inter, out.data_ptr(), load_ptr,
                                   torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native.moe failed on {ids.shape[0]} tokens x {ids.shape[1]} experts over {slots} slots "
                           "(an id out of range?)")
    return out


def gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, topk_group: int, top_k: int,
         normalize: bool, scale: float, lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.Gate in one call: x [T, D] bf16, the fp32 gate rows weight [E, D] and correction bias [E] ->
    weights [T, K] fp32, ids [T, K] int64 (each token's experts in ascending order; the same choice
    as the Gate's, ties to the lower index; its scores' fp32 sums in another order)."""
    if not (x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1 and x.shape[0] > 0
            and weight.dtype == bias.dtype == torch.float32 and weight.dim() == 2 and weight.shape[1] == x.shape[1]
            and weight.is_contiguous() and bias.shape == (weight.shape[0],) and bias.is_contiguous()
            and x.device.type == weight.device.type == bias.device.type == "cpu"):
        raise ValueError(f"native.gate: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, "
                         f"bias {tuple(bias.shape)} {bias.dtype}: needs CPU bf16 rows and fp32 gate rows of their "
                         "width")
    tokens, experts = x.shape[0], weight.shape[0]
    ids = torch.empty(tokens, top_k, dtype=torch.int64)
    weights = torch.empty(tokens, top_k, dtype=torch.float32)
    rc = (lib or library()).streamoe_gate_bf16(x.data_ptr(), x.stride(0), tokens, x.shape[1], weight.data_ptr(),
                                               bias.data_ptr(), experts, groups, topk_group, top_k, int(normalize),
                                               scale, ids.data_ptr(), weights.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native.gate failed: {experts} experts in {groups} groups, top {topk_group} groups, "
                           f"top {top_k} experts (needs equal groups and K <= 64 of the kept groups' experts)")
    return weights, ids


def decode_attention(q: torch.Tensor, kv: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, latent: int,
                     scale: float, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Single-token absorbed decode attention read in place from the cache rows: q [S, H, W] bf16 (latent
    then rotary channels), kv [rows, W] bf16, slots [S, L] int64 (each sequence's context rows,
    `lengths` [S] of them real) -> [S, H, latent] bf16: softmax(scale * q·k) over the context applied
    to the rows' first `latent` channels, in fp32."""
    q, slots, lengths = q.contiguous(), slots.contiguous(), lengths.contiguous()
    s, h, w = q.shape
    if not (q.dtype == kv.dtype == torch.bfloat16 and kv.is_contiguous() and kv.dim() == 2 and kv.shape[1] == w
            and slots.dtype == lengths.dtype == torch.int64 and slots.dim() == 2 and slots.shape[0] == s
            and lengths.shape == (s,) and 0 < latent <= w and q.device.type == kv.device.type == "cpu"):
        raise ValueError(f"native.decode_attention: q {tuple(q.shape)} {q.dtype}, kv {tuple(kv.shape)} {kv.dtype}, "
                         f"slots {tuple(slots.shape)}, lengths {tuple(lengths.shape)}, latent {latent}: "
                         "needs CPU bf16 queries and rows of one width, int64 slots and lengths")
    out = torch.empty(s, h, latent, dtype=torch.bfloat16)
    rc = (lib or library()).streamoe_decode_attention_bf16(q.data_ptr(), s, h, w, kv.data_ptr(), slots.data_ptr(),
                                                           slots.shape[1], lengths.data_ptr(), latent, scale,
                                                           out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native.decode_attention failed on {s} sequences of up to {slots.shape[1]} rows "
                           f"(lengths {lengths.tolist()[:8]})")
    return out


def pack_heads(weight: torch.Tensor) -> torch.Tensor:
    """weight [H, N, K] (any strides) -> the layout `heads` reads: [H, ceil(K/2), Np, 2] bf16, contiguous,
    holding for each pair of inputs the N outputs' two weights (Np = N rounded up to 16, zeros beyond)."""
    h, n, k = weight.shape
    pairs, rows = -(-k // 2), -(-n // 16) * 16
    padded = torch.zeros(h, rows, 2 * pairs, dtype=torch.bfloat16, device=weight.device)
    padded[:, :n, :k] = weight
    return padded.view(h, rows, pairs, 2).transpose(1, 2).contiguous()


def heads(x: torch.Tensor, packed: torch.Tensor, n: int, out: torch.Tensor | None = None,
          lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Per-head products: x [M, H, K] bf16 @ weight[h] [n, K]ᵀ for each head h -> [M, H, n] bf16, the
    weight given as `pack_heads(weight)` (written into `out` where given, any strides with its last
    dim contiguous), accumulated in fp32 and rounded once, like a bf16 bmm."""
    m, h, k = x.shape
    if out is None:
        out = torch.empty(m, h, n, dtype=torch.bfloat16)
    if not (x.dtype == packed.dtype == out.dtype == torch.bfloat16 and packed.is_contiguous()
            and packed.shape[0] == h and packed.shape[1] == -(-k // 2) and packed.shape[3] == 2
            and n <= packed.shape[2] and packed.shape[2] % 16 == 0 and out.shape == (m, h, n) and m > 0
            and x.stride(2) == out.stride(2) == 1 and x.device.type == packed.device.type == out.device.type == "cpu"):
        raise ValueError(f"native.heads: x {tuple(x.shape)} {x.dtype}, packed {tuple(packed.shape)} {packed.dtype}, "
                         f"n {n}, out {tuple(out.shape)}: needs CPU bf16 [M, H, K] and pack_heads of an [H, n, K] "
                         "weight")
    rc = (lib or library()).streamoe_heads_bf16(x.data_ptr(), x.stride(0), x.stride(1), m, h, k, packed.data_ptr(),
                                                packed.shape[2], n, out.data_ptr(), out.stride(0), out.stride(1),
                                                torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native.heads failed on x {tuple(x.shape)}, packed {tuple(packed.shape)}")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """RMSNorm of x [M, K] bf16 (rows contiguous) by weight [K] bf16, computed as norm.RMSNorm does -> [M, K] bf16."""
    if not (x.dim() == 2 and x.dtype == weight.dtype == torch.bfloat16 and weight.shape == (x.shape[1],)
            and x.stride(1) == 1 and weight.is_contiguous() and x.shape[0] > 0
            and x.device.type == weight.device.type == "cpu"):
        raise ValueError(f"native.rms_norm: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}: "
                         "needs CPU bf16 rows and a weight of their width")
    return _rms_norm(x, weight, eps, lib or library())


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, lib: ctypes.CDLL) -> torch.Tensor:
    """`rms_norm` on inputs already checked (norm.RMSNorm's decode path)."""
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    rc = lib.streamoe_rms_norm_bf16(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], weight.data_ptr(), eps,
                                    y.data_ptr(), y.stride(0))
    if rc != 0:
        raise RuntimeError(f"native.rms_norm failed on x {tuple(x.shape)}")
    return y


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float,
                 lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum and its norm in one call: x, r [M, K] bf16 (rows contiguous) -> (x + r as torch
    adds bf16, rms_norm of that sum)."""
    if not (x.dim() == 2 and x.shape == r.shape and x.dtype == r.dtype == weight.dtype == torch.bfloat16
            and weight.shape == (x.shape[1],) and x.stride(1) == r.stride(1) == 1 and weight.is_contiguous()
            and x.shape[0] > 0 and x.device.type == r.device.type == weight.device.type == "cpu"):
        raise ValueError(f"native.add_rms_norm: x {tuple(x.shape)} {x.dtype}, r {tuple(r.shape)} {r.dtype}, "
                         f"weight {tuple(weight.shape)} {weight.dtype}: needs CPU bf16 rows of one shape and a weight "
                         "of their width")
    return _add_rms_norm(x, r, weight, eps, lib or library())


def _add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float,
                  lib: ctypes.CDLL) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm` on inputs already checked (norm.RMSNorm.add_forward's decode path)."""
    s = torch.empty(x.shape, dtype=torch.bfloat16)
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    rc = lib.streamoe_add_rms_norm_bf16(x.data_ptr(), x.stride(0), r.data_ptr(), r.stride(0), x.shape[0], x.shape[1],
                                        weight.data_ptr(), eps, s.data_ptr(), s.stride(0), y.data_ptr(), y.stride(0))
    if rc != 0:
        raise RuntimeError(f"native.add_rms_norm failed on x {tuple(x.shape)}")
    return s, y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool, out: torch.Tensor | None = None,
         lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """rope.apply_rotary of x [T, n, R] bf16 (any strides, channels contiguous) by cos/sin [T, R/2] bf16, bit
    for bit, in one call (into `out` [T, n, R] where given, channels contiguous)."""
    t, n, r = x.shape
    if out is None:
        out = torch.empty(t, n, r, dtype=torch.bfloat16)
    cos, sin = cos.contiguous(), sin.contiguous()
    if not (x.dtype == cos.dtype == sin.dtype == out.dtype == torch.bfloat16 and x.stride(2) == out.stride(2) == 1
            and cos.shape == sin.shape == (t, r // 2) and out.shape == x.shape and r % 2 == 0 and t > 0
            and x.device.type == cos.device.type == out.device.type == "cpu"):
        raise ValueError(f"native.rope: x {tuple(x.shape)} {x.dtype}, cos {tuple(cos.shape)} {cos.dtype}, out "
                         f"{tuple(out.shape)}: needs CPU bf16 [T, n, R] rows (R even) and [T, R/2] angles")
    rc = (lib or library()).streamoe_rope_bf16(x.data_ptr(), x.stride(0), x.stride(1), t, n, r, cos.data_ptr(),
                                               sin.data_ptr(), int(interleave), out.data_ptr(), out.stride(0),
                                               out.stride(1))
    if rc != 0:
        raise RuntimeError(f"native.rope failed on x {tuple(x.shape)}")
    return out


def kv_rows(kv: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
            interleave: bool, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """MLA.project_kv after its projection: kv [T, C+R] bf16 (rows contiguous) -> the cache rows [T, C+R]:
    the latent RMS-normalised by weight [C] (as rms_norm), the rotary key rotated (as rope)."""
    c = weight.shape[0]
    if not (kv.dim() == 2 and kv.dtype == weight.dtype == torch.bfloat16 and kv.stride(1) == 1
            and 0 < c < kv.shape[1] and weight.is_contiguous() and kv.shape[0] > 0
            and kv.device.type == weight.device.type == "cpu"):
        raise ValueError(f"native.kv_rows: kv {tuple(kv.shape)} {kv.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}: needs CPU bf16 rows wider than the norm")
    lib = lib or library()
    out = torch.empty(kv.shape, dtype=torch.bfloat16)
    if lib.streamoe_rms_norm_bf16(kv.data_ptr(), kv.stride(0), kv.shape[0], c, weight.data_ptr(), eps,
                                  out.data_ptr(), out.stride(0)) != 0:
        raise RuntimeError(f"native.kv_rows failed on kv {tuple(kv.shape)}")
    rope(kv[:, None, c:], cos, sin, interleave, out[:, None, c:], lib)
    return out


def slot_indices(slots: torch.Tensor) -> torch.Tensor:
    """Cache slots as the kernels index with them: int64, contiguous (the tensor itself where it is)."""
    return slots if slots.dtype == torch.int64 and slots.is_contiguous() else slots.to(torch.int64).contiguous()


def store_rows(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, lib: ctypes.CDLL | None = None) -> None:
    """pool[slots] = rows for a cache layer pool [N, W] bf16 (contiguous), slots [T] int64, rows [T, W] bf16
    (rows contiguous): LatentKVPool.store's index_copy_, with every destination line asked for at once."""
    slots = slot_indices(slots)
    if not (pool.dim() == rows.dim() == 2 and pool.dtype == rows.dtype == torch.bfloat16 and pool.is_contiguous()
            and rows.shape[1] == pool.shape[1] and rows.stride(1) == 1 and slots.shape == (rows.shape[0],)
            and pool.device.type == rows.device.type == slots.device.type == "cpu"):
        raise ValueError(f"native.store_rows: pool {tuple(pool.shape)} {pool.dtype}, slots {tuple(slots.shape)} "
                         f"{slots.dtype}, rows {tuple(rows.shape)} {rows.dtype}: needs CPU bf16 rows of the pool's "
                         "width and a slot for each")
    if (lib or library()).streamoe_store_rows_bf16(rows.data_ptr(), rows.stride(0), rows.shape[0], rows.shape[1],
                                                   slots.data_ptr(), pool.shape[0], pool.data_ptr()) != 0:
        raise ValueError(f"native.store_rows: a slot outside 0..{pool.shape[0] - 1}")


def mla_decode(x: torch.Tensor, qa: torch.Tensor | None, qa_norm: torch.Tensor | None, q_eps: float, qb: torch.Tensor,
               heads: int, nope: int, rope_dim: int, kva: torch.Tensor, kv_norm: torch.Tensor, kv_eps: float,
               cos: torch.Tensor, sin: torch.Tensor, interleave: bool, pool: torch.Tensor, slot_mapping: torch.Tensor,
               w_uk: torch.Tensor, w_uv: torch.Tensor, v_dim: int, context: torch.Tensor, lengths: torch.Tensor,
               scale: float, o: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    """MLA.forward on a step whose T rows are all single-token decodes (MLA._decode_native checks the
    conditions): x [T, D] bf16 (rows contiguous) -> [T, D], the new cache rows stored at `slot_mapping`
    of the layer `pool`, each row attending to its `context` [T, L] slots (`lengths` real). The
    weights as the module holds them (qa None: q_proj in `qb`), W_UK and W_UV packed by `pack_heads`."""
    t, d = x.shape
    latent = kv_norm.shape[0]
    out = torch.empty(t, d, dtype=torch.bfloat16)
    rc = lib.streamoe_mla_decode_bf16(
        x.data_ptr(), x.stride(0), t, d, None if qa is None else qa.data_ptr(), 0 if qa is None else qa.shape[0],
        None if qa_norm is None else qa_norm.data_ptr(), q_eps, qb.data_ptr(), heads, nope, rope_dim, kva.data_ptr(),
        latent, kv_norm.data_ptr(), kv_eps, cos.data_ptr(), sin.data_ptr(), int(interleave), pool.data_ptr(),
        pool.shape[0], slot_mapping.data_ptr(), w_uk.data_ptr(), w_uk.shape[2], w_uv.data_ptr(), w_uv.shape[2],
        v_dim, context.data_ptr(), context.shape[1], lengths.data_ptr(), scale, o.data_ptr(), out.data_ptr(),
        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native.mla_decode failed on {t} rows (a slot outside the pool's {pool.shape[0]}?)")
    return out


def moe_block(x: torch.Tensor, h: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, groups: int,
              topk_group: int, top_k: int, normalize: bool, scale: float, w13: torch.Tensor, w2: torch.Tensor,
              packed: tuple[torch.Tensor, torch.Tensor] | None, load: torch.Tensor,
              shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, lib: ctypes.CDLL) -> torch.Tensor:
    """h + MoE(x) for x, h [T, D] bf16 (contiguous) in one call: `gate`, `moe` (the pairs added to `load`),
    the shared expert's `mlp` (gate, up, down; None: none) with the routed sum added, then the residual;
    the module's calls in the same order (MoE.forward_residual checks the conditions)."""
    t, d = x.shape
    w13p, w2p = _packed_pointers(packed, w2.shape[0], d, w2.shape[2])
    out = torch.empty(t, d, dtype=torch.bfloat16)
    sg, su, sd = shared if shared is not None else (None, None, None)
    rc = lib.streamoe_moe_block_bf16(
        x.data_ptr(), h.data_ptr(), t, d, gate_weight.data_ptr(), bias.data_ptr(), gate_weight.shape[0], groups,
        topk_group, top_k, int(normalize), scale, w13.data_ptr(), w2.data_ptr(), w13p, w2p, w2.shape[2],
        load.data_ptr(), None if sg is None else sg.data_ptr(), None if su is None else su.data_ptr(),
        None if sd is None else sd.data_ptr(), 0 if sg is None else sg.shape[0], out.data_ptr(),
        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native.moe_block failed on {t} tokens: {gate_weight.shape[0]} experts in {groups} "
                           f"groups, top {top_k}")
    return out


class LayerWeights(ctypes.Structure):
    """One decoder layer's weights for `decode_layers` (the C file's streamoe_layer, field for field; each
    8 bytes wide): the norms, the attention as `mla_decode` takes it, and the MoE layer as `moe_block` takes
    it (gw set) or the dense MLP (sg, su, sd)."""

    _fields_ = [("in_norm", _PTR), ("in_eps", ctypes.c_double), ("qa", _PTR), ("Q", _INT), ("qa_norm", _PTR),
                ("q_eps", ctypes.c_double), ("qb", _PTR), ("kva", _PTR), ("kv_norm", _PTR), ("kv_eps", ctypes.c_double),
                ("uk", _PTR), ("Np_uk", _INT), ("uv", _PTR), ("Np_uv", _INT), ("o", _PTR), ("post_norm", _PTR),
                ("post_eps", ctypes.c_double), ("gw", _PTR), ("bias", _PTR), ("E", _INT), ("G", _INT),
                ("topk_group", _INT), ("K", _INT), ("normalize", _INT), ("scale", ctypes.c_double), ("w13", _PTR),
                ("w2", _PTR), ("w13p", _PTR), ("w2p", _PTR), ("I", _INT), ("load", _PTR), ("sg", _PTR), ("su", _PTR),
                ("sd", _PTR), ("Is", _INT)]


def decode_layers(layers: ctypes.Array, h: torch.Tensor, heads: int, nope: int, rope_dim: int, latent: int,
                  v_dim: int, interleave: bool, scale: float, cos: torch.Tensor, sin: torch.Tensor,
                  slot_mapping: torch.Tensor, context: torch.Tensor, lengths: torch.Tensor, pools: ctypes.Array,
                  nslots: ctypes.Array, final_norm: torch.Tensor, final_eps: float, lib: ctypes.CDLL) -> torch.Tensor:
    """The decoder layers of a step whose T rows are all single-token decodes, in one call: for each of
    `layers` (LayerWeights), h = h + attention(norm(h)) as `mla_decode` (its cache rows into `pools[l]`,
    of `nslots[l]` rows), then h = h + the MoE layer as `moe_block` (or the dense `mlp`), on h [T, D] bf16
    (contiguous) in place; returns the final norm of h (`final_norm`, as `rms_norm`): the modules' calls in
    their order, the same bits, without returning to Python between them (DeepseekV3._decode_layers checks
    the conditions)."""
    t, d = h.shape
    normed = torch.empty(t, d, dtype=torch.bfloat16)
    rc = lib.streamoe_decode_layers_bf16(layers, len(layers), h.data_ptr(), t, d, heads, nope, rope_dim, latent, v_dim,
                                         int(interleave), scale, cos.data_ptr(), sin.data_ptr(),
                                         slot_mapping.data_ptr(), context.data_ptr(), context.shape[1],
                                         lengths.data_ptr(), pools, nslots, final_norm.data_ptr(), final_eps,
                                         normed.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native.decode_layers failed in layer {-rc - 1} on {t} rows (a slot outside the pool?)")
    return normed


class Linear(nn.Linear):
    """nn.Linear that runs the row counts in `native_rows` through `linear` (the model sets them
    from its MoE plan: the token counts whose backend is `native`); any other input through torch."""

    native_rows: frozenset[int] = frozenset()

    def runs_native(self, x: torch.Tensor) -> bool:
        """`supports`, with the row count checked against native_rows (1..LINEAR_ROWS at most; in fp32
        1..F32_LINEAR_ROWS)."""
        w = self.weight
        return (x.dim() == 2 and x.shape[0] in self.native_rows and x.dtype == w.dtype and x.is_cpu and w.is_cpu
                and w.stride(1) == 1 and (x.dtype == torch.bfloat16 or (x.dtype == torch.float32
                                                                        and x.shape[0] <= F32_LINEAR_ROWS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_native(x):
            y = _linear(x, self.weight, library())
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)
