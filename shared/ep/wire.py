"""What crosses the wire at an MoE layer of an EP group (shared/ep/README.md, "The wire").

Dispatch carries, per destination rank, each token routed there once (not once per expert) plus
the (token, local slot) pairs; combine carries one output row per pair, in the pairs' order.
- `fp8`: dispatch hidden states as float8 e4m3 with one float32 scale per 128 channels (per
  token), as DeepEP's low-latency dispatch; combine in bf16.
- `exact`: the compute dtype both ways, so every EP size computes what EP 1 computes.
Payloads are msgpack maps of raw little-endian bytes; nothing is pickled.
"""
from __future__ import annotations

import msgpack
import torch

WIRES = ("fp8", "exact")
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
CHANNELS_PER_SCALE = 128

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float8_e4m3fn": torch.float8_e4m3fn, "int32": torch.int32}


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _tensor(raw: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=_DTYPES[dtype])
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(_DTYPES[dtype]).view(shape)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (q [N, D] e4m3, scales [N, ceil(D/128)] fp32): one scale per token per 128 channels."""
    n, d = x.shape
    blocks = -(-d // CHANNELS_PER_SCALE)
    if n == 0:
        return torch.empty(0, d, dtype=torch.float8_e4m3fn), torch.empty(0, blocks)
    padded = torch.zeros(n, blocks * CHANNELS_PER_SCALE, dtype=torch.float32)
    padded[:, :d] = x.float()
    tiles = padded.view(n, blocks, CHANNELS_PER_SCALE)
    scales = tiles.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX  # [N, B]
    q = (tiles / scales[..., None]).to(torch.float8_e4m3fn).view(n, -1)[:, :d]
    return q, scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, d = q.shape
    blocks = scales.shape[1]
    if n == 0:
        return torch.empty(0, d, dtype=dtype)
    padded = torch.zeros(n, blocks * CHANNELS_PER_SCALE, dtype=torch.float32)
    padded[:, :d] = q.float()
    return (padded.view(n, blocks, CHANNELS_PER_SCALE) * scales[..., None]).view(n, -1)[:, :d].to(dtype)


def encode_dispatch(x: torch.Tensor, pair_token: torch.Tensor, pair_slot: torch.Tensor, wire: str) -> bytes:
    """x [N, D] the tokens sent to one rank; pair_token/pair_slot [P] int32: which of them goes to
    which of that rank's local expert slots."""
    body = {"n": x.shape[0], "d": x.shape[1], "tok": _raw(pair_token.to(torch.int32)),
            "slot": _raw(pair_slot.to(torch.int32)), "p": int(pair_token.numel())}
    if wire == "fp8":
        q, scales = quantize_fp8(x)
        body.update(dt="float8_e4m3fn", x=_raw(q), s=_raw(scales), sb=scales.shape[1])
    else:
        body.update(dt=str(x.dtype).removeprefix("torch."), x=_raw(x))
    return msgpack.packb(body, use_bin_type=True)


def decode_dispatch(raw: bytes, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> x [N, D] in `dtype`, pair_token [P] int64, pair_slot [P] int64."""
    body = msgpack.unpackb(raw, raw=False)
    n, d, p = body["n"], body["d"], body["p"]
    if body["dt"] == "float8_e4m3fn":
        x = dequantize_fp8(_tensor(body["x"], "float8_e4m3fn", [n, d]), _tensor(body["s"], "float32", [n, body["sb"]]),
                           dtype)
    else:
        x = _tensor(body["x"], body["dt"], [n, d]).to(dtype)
    return x, _tensor(body["tok"], "int32", [p]).long(), _tensor(body["slot"], "int32", [p]).long()


def encode_combine(y: torch.Tensor, wire: str) -> bytes:
    """y [P, D]: one expert output per received pair, in the pairs' order."""
    if wire == "fp8":
        y = y.to(torch.bfloat16)  # combine travels in bf16 (DeepSeek's precision split)
    return msgpack.packb({"p": y.shape[0], "d": y.shape[1], "dt": str(y.dtype).removeprefix("torch."), "y": _raw(y)},
                         use_bin_type=True)


def decode_combine(raw: bytes) -> torch.Tensor:
    body = msgpack.unpackb(raw, raw=False)
    return _tensor(body["y"], body["dt"], [body["p"], body["d"]])


def dispatch_bytes_per_token(hidden: int, wire: str, dtype: torch.dtype) -> float:
    """Hidden-state bytes one token costs a destination rank on the dispatch wire."""
    if wire == "fp8":
        return hidden + 4 * -(-hidden // CHANNELS_PER_SCALE)
    return hidden * torch.empty(0, dtype=dtype).element_size()
