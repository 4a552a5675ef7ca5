"""LatentCache: stores one tensor per key, in memory or as small safetensors files in a folder.

The trainer encodes with the VAE and stores; this only stores. The safetensors format (8-byte header
length, JSON header, raw little-endian data) is written here directly, because the data layer may only
depend on torch, PIL and numpy.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Optional, Union

import torch

from ..config import atomic_write_bytes
from .scan import CACHE_MARKER  # scans skip folders holding this file

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TENSOR_NAME = "latent"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


def encode_safetensors(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> bytes:
    header: dict = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot store dtype {t.dtype} in safetensors")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned, as the format recommends
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


def decode_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size].decode("utf-8"))
    base = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _TORCH_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = [int(s) for s in info["shape"]]
        if end == start:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        if base + end > len(data):
            raise ValueError("file is shorter than its header says")
        buffer = bytearray(data[base + start:base + end])
        out[name] = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)
    return out


class LatentCache:
    """get / put / `in` / len over string keys (Dataset.cache_key). folder=None keeps everything in memory."""

    def __init__(self, folder: Optional[Union[str, Path]] = None):
        self.folder = Path(folder).expanduser() if folder is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            marker = self.folder / CACHE_MARKER
            if not marker.exists():
                atomic_write_bytes(marker, b"latent cache written by lora-trainer; safe to delete\n")

    def _file(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"cache key {key!r} must be 1-128 letters, digits, '.', '_' or '-'")
        return self.folder / f"{key}.safetensors"  # type: ignore[operator]

    def get(self, key: str) -> Optional[torch.Tensor]:
        if self.folder is None:
            return self._memory.get(key)
        path = self._file(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_safetensors(data)[_TENSOR_NAME]
        except Exception:  # a damaged entry (disk full, killed mid-write by another tool): recompute it
            return None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if self.folder is None:
            # A copy: a view would keep the trainer's whole batch alive and follow its in-place changes.
            self._memory[key] = tensor.detach().clone()
            return
        atomic_write_bytes(self._file(key), encode_safetensors({_TENSOR_NAME: tensor}, {"format": "pt"}))

    def __contains__(self, key: str) -> bool:
        if self.folder is None:
            return key in self._memory
        return self._file(key).is_file()

    def __len__(self) -> int:
        if self.folder is None:
            return len(self._memory)
        return sum(1 for p in self.folder.glob("*.safetensors") if not p.name.startswith("."))

    def __repr__(self) -> str:
        return f"LatentCache({str(self.folder) if self.folder else 'memory'}, {len(self)} entries)"


def latent_cache_for(cfg, namespace: str = "") -> Optional[LatentCache]:
    """The cache the config asks for: None when cache_latents is off or flip_aug / random_crop make every
    draw different; on disk when cache_latents_to_disk, else in memory.

    namespace: put latents of different VAEs apart (e.g. the VAE's hash); keys only cover the image side.
    """
    if not cfg.cache_latents or cfg.flip_aug or cfg.random_crop:
        return None
    if not cfg.cache_latents_to_disk:
        return LatentCache(None)
    folder = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"
    folder = folder / "latents"
    return LatentCache(folder / namespace if namespace else folder)
