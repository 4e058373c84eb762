"""A zero-copy reader of safetensors files, built on mmap.

The safetensors library writes our checkpoints; reading goes through this small reader because
loading must keep peak memory near the weights' size: a tensor whose dtype the model uses as is
stays a view of the mapped file (no copy at all), and after a tensor is converted, the file pages
it came from are released with `madvise(MADV_DONTNEED)` so they do not count twice.
Never pickle: the header is JSON and the payload raw little-endian bytes.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file."""


class SafetensorsFile:
    """An open safetensors file: `names`, `shape(name)`, `dtype(name)`, `get(name)`, `release(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            size = self.path.stat().st_size
            if header_len > size - 8:
                raise SafetensorsError(f"{self.path}: header length {header_len} exceeds the file size {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
            # MAP_PRIVATE: the tensors are writable views, yet the file is never modified.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize or self._data_start + end > size:
                raise SafetensorsError(f"{self.path}: tensor {name!r} byte range {begin}..{end} does not fit "
                                       f"shape {list(shape)} of {entry['dtype']} within the file")
            self._entries[name] = (dtype, shape, self._data_start + begin, self._data_start + end)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        """A view of the tensor's bytes in the mapped file (no copy)."""
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, offset=begin, count=end - begin)
        return flat.view(dtype).view(shape)

    def release(self, name: str) -> None:
        """Drop the file pages under a tensor that was copied out (the page cache keeps them)."""
        _, _, begin, end = self._entries[name]
        page = mmap.PAGESIZE
        first, last = -(-begin // page) * page, (end // page) * page
        if self._map is not None and last > first and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
