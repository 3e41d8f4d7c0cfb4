"""A small GGUF reader: metadata, tensor index and dequantization, fast enough for load time.

``gguf.GGUFReader`` parses every array element as its own numpy object (about 9 s for SmolLM2's 49k
tokens); reading the header with ``struct`` and memory-mapping the tensor data takes a fraction of that.
The common block formats (Q4_0, Q4_1, Q8_0) are dequantized here with numpy record views;
others fall back to ``gguf.quants``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvsched.engine.weights.errors import ModelLoadError, ModelNotFoundError

_MAGIC = b"GGUF"
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NP = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


@dataclass(slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (numpy/torch) order: GGUF's dims reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _NP:
                arr = np.frombuffer(self.buf, dtype=_NP[etype], count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ModelLoadError(f"unknown GGUF value type {vtype}")
        return self.scalar(_SCALARS[vtype])


class GGUFFile:
    """Metadata dict, tensor index, and per-tensor float32 access over a read-only memory map."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {self.path}")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({exc})") from exc

    def _parse(self) -> None:
        import gguf

        cur = _Cursor(memoryview(self._map))
        if bytes(self._map[:4]) != _MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.scalar("<I")
        if version < 2:
            raise ModelLoadError(f"{self.path}: GGUF version {version} is not supported")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.scalar("<Q") for _ in range(cur.scalar("<I")))
            raw.append((name, dims[::-1], cur.scalar("<I"), cur.scalar("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, gtype, off in raw:
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(gtype)]
            except (ValueError, KeyError) as exc:
                raise ModelLoadError(f"{self.path}: tensor {name!r} has unknown type {gtype}") from exc
            nbytes = int(np.prod(shape)) // block * type_size
            start = data_start + off
            if start + nbytes > self._map.shape[0]:
                raise ModelLoadError(f"{self.path}: tensor {name!r} runs past the end of the file")
            self.tensors[name] = TensorInfo(name, shape, gtype, start, nbytes)

    def raw_bytes(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return self._map[info.offset : info.offset + info.nbytes]

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as float32, shape ``info.shape`` (for a matrix: ``[out, in]``)."""
        info = self.tensors[name]
        data = self.raw_bytes(name)
        if info.ggml_type == F32:
            return torch.from_numpy(data.view(np.float32).reshape(info.shape).copy())
        if info.ggml_type == F16:
            return torch.from_numpy(data.view(np.float16).reshape(info.shape).astype(np.float32))
        if info.ggml_type == BF16:
            t = torch.from_numpy(data.copy()).view(torch.bfloat16)
            return t.float().reshape(info.shape)
        fast = _DEQUANT.get(info.ggml_type)
        if fast is not None:
            return torch.from_numpy(fast(data).reshape(info.shape))
        from gguf import quants

        rows = data.reshape(*info.shape[:-1], -1)
        return torch.from_numpy(np.ascontiguousarray(quants.dequantize(rows, info.ggml_type), np.float32))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=1).astype(np.float32)


# Block layouts (numpy is used: its strided copies of these 18..34-byte records are much faster than torch's).
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])


def _q8_0(raw: np.ndarray) -> np.ndarray:
    b = raw.view(_Q8_0)
    return b["d"].astype(np.float32)[:, None] * b["qs"].astype(np.float32)


def _q4_0(raw: np.ndarray) -> np.ndarray:
    b = raw.view(_Q4_0)
    return b["d"].astype(np.float32)[:, None] * (_nibbles(b["qs"]) - 8.0)


def _q4_1(raw: np.ndarray) -> np.ndarray:
    b = raw.view(_Q4_1)
    return b["d"].astype(np.float32)[:, None] * _nibbles(b["qs"]) + b["m"].astype(np.float32)[:, None]


_DEQUANT = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_1: _q4_1}
