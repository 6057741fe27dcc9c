"""A streaming safetensors writer: the header first (all names, dtypes, shapes known up front),
then each tensor's bytes appended in header order, so writing a file never holds more than one
tensor in memory. The result is an ordinary safetensors file (the official library reads it).
The file appears under its final name only on `close()`; `abort()` removes the partial file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

_DTYPES = {torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2), torch.float16: ("F16", 2),
           torch.int64: ("I64", 8), torch.int32: ("I32", 4), torch.uint8: ("U8", 1)}


class StreamingWriter:
    """`StreamingWriter(path, [(name, dtype, shape), ...]).write(name, tensor)...close()`."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        self._order: list[tuple[str, torch.dtype, tuple]] = []
        offset = 0
        for name, dtype, shape in entries:
            if name in header:
                raise ValueError(f"{name}: listed twice")
            if dtype not in _DTYPES:
                raise ValueError(f"{name}: unsupported dtype {dtype}")
            code, size = _DTYPES[dtype]
            nbytes = math.prod(shape) * size
            header[name] = {"dtype": code, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._order.append((name, dtype, tuple(shape)))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"{name}: more tensors written than declared")
        want, dtype, shape = self._order[self._next]
        if name != want:
            raise ValueError(f"expected tensor {want} next, got {name}")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: declared {shape} {dtype}, "
                             f"got {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            missing = [n for n, _, _ in self._order[self._next:]][:5]
            self.abort()
            raise ValueError(f"{self.path}: tensors never written: {', '.join(missing)}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)
