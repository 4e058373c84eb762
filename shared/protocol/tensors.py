"""Tensors <-> TensorBlob (raw little-endian bytes with dtype and shape; never pickled)."""
from __future__ import annotations

import torch
import xxhash

from shared.protocol.wire import TensorBlob, WireError


def to_blob(t: torch.Tensor) -> TensorBlob:
    t = t.detach().contiguous().cpu()
    return TensorBlob(str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes())


def from_blob(blob: TensorBlob) -> torch.Tensor:
    dtype = getattr(torch, blob.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise WireError(f"tensor dtype {blob.dtype!r} is unknown")
    numel = 1
    for d in blob.shape:
        numel *= d
    if numel * dtype.itemsize != len(blob.data):
        raise WireError(f"tensor of shape {blob.shape} and {blob.dtype} needs {numel * dtype.itemsize} bytes, "
                        f"got {len(blob.data)}")
    if not blob.data:
        return torch.empty(blob.shape, dtype=dtype)
    return torch.frombuffer(bytearray(blob.data), dtype=torch.uint8).view(dtype).reshape(blob.shape)


def checksum(data: bytes) -> str:
    """XXH3-128 of the bytes (hex): catches corruption on the way at ~60 GB/s, where blake2b's
    ~1 GB/s cost a KV handoff a third of its throughput (loadgen/README.md, "Redis")."""
    return xxhash.xxh3_128_hexdigest(data)
