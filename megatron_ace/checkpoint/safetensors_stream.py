"""Streaming safetensors writer and lazy reader.

`StreamingWriter` writes the header (every name, shape, dtype and byte range, known up front)
first, then appends tensor bytes one at a time in the declared order, so peak memory is one
tensor rather than the whole file. The files are ordinary safetensors files (readable by the
official library). `LazyReader` opens a file, or a directory of (possibly sharded, with
`model.safetensors.index.json`) files, and loads one tensor at a time via `safetensors.safe_open`.
It does not cast, and does not support big-endian hosts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
INDEX_NAME = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorEntry:
    name: str
    """Tensor name in the file."""
    shape: tuple[int, ...]
    """Tensor shape."""
    dtype: torch.dtype
    """Tensor dtype (written as is, never cast)."""

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


class StreamingWriter:
    """Write a safetensors file whose header is fixed up front; tensors come one at a time."""

    def __init__(self, path: str | Path, entries: list[TensorEntry],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._entries = list(entries)
        names = [e.name for e in self._entries]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path}: duplicate tensor names in the header")
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for e in self._entries:
            if e.dtype not in _DTYPES:
                raise ValueError(f"{e.name}: dtype {e.dtype} not supported by safetensors")
            header[e.name] = {"dtype": _DTYPES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.num_bytes]}
            offset += e.num_bytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the official writer aligns the data to 8 bytes
        self._file = open(self.path, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the next declared entry, same shape and dtype."""
        if self._next >= len(self._entries):
            raise ValueError(f"{self.path}: {name}: all declared tensors already written")
        e = self._entries[self._next]
        if name != e.name:
            raise ValueError(f"{self.path}: expected tensor {e.name} next, got {name}")
        if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
            raise ValueError(f"{name}: declared {e.shape} {e.dtype}, "
                             f"got {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        """Flush and fsync; every declared tensor must have been written."""
        if self._file.closed:
            return
        missing = [e.name for e in self._entries[self._next:]]
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if missing:
            self.path.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: tensors never written: {', '.join(missing[:5])}")

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def dtype_from_name(name: str) -> torch.dtype:
    for dt, short in _DTYPES.items():
        if short == name:
            return dt
    raise ValueError(f"unsupported safetensors dtype {name}")


class LazyReader:
    """Tensors by name from one .safetensors file or a directory of them, loaded on demand."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            index = path / INDEX_NAME
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            else:
                files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {path}")
            paths = [path / f for f in files]
        else:
            paths = [path]
        self._handles = {}
        self._where: dict[str, object] = {}
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: listed in {INDEX_NAME} but missing")
            handle = safe_open(str(p), framework="pt")
            self._handles[p] = handle
            for name in handle.keys():
                if name in self._where:
                    raise ValueError(f"{name}: present in more than one file ({p})")
                self._where[name] = handle

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return dtype_from_name(self._where[name].get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{name}: not in the checkpoint")
        return self._where[name].get_tensor(name)
