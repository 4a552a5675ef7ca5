"""Pickle-free storage of nested training state (optimizer, scheduler, grad scaler, RNG states).

Tensors (and numpy arrays) go into one `.safetensors` file, everything else into JSON that refers to
them by key. Loading reads only those two formats, so a checkpoint folder someone hands you can carry
no code: there is no pickle anywhere on this path.

JSON cannot say "tuple" or "dict with int keys", and optimizers need both back exactly, so those are
tagged: {"$tuple": [...]}, {"$items": [[key, value], ...]}, {"$tensor": "k"}, {"$ndarray": "k", "dtype": ...}.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

FORMAT = "lora-trainer-state/1"
_TAGS = ("$tensor", "$ndarray", "$tuple", "$items", "$float")


class StateFormatError(ValueError):
    """The state files are damaged or not ours."""


def pack(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able document, tensors by key) for a nested state."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().to("cpu").contiguous().clone()  # own storage: safetensors refuses shared
            return {"$tensor": key}
        if isinstance(x, np.ndarray):
            key = str(len(tensors))
            # int64 holds every numpy integer state exactly (MT19937 keys are uint32); floats stay float64
            arr = x.astype(np.int64) if x.dtype.kind in "iub" else x.astype(np.float64)
            tensors[key] = torch.from_numpy(np.ascontiguousarray(arr)).clone()
            return {"$ndarray": key, "dtype": x.dtype.str, "shape": list(x.shape)}
        if isinstance(x, (bool, str)) or x is None:
            return x
        if isinstance(x, (int, np.integer)):
            return int(x)
        if isinstance(x, (float, np.floating)):
            x = float(x)
            return x if math.isfinite(x) else {"$float": repr(x)}
        if isinstance(x, tuple):
            return {"$tuple": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in x):
                return {k: enc(v) for k, v in x.items()}
            return {"$items": [[enc(k), enc(v)] for k, v in x.items()]}
        raise TypeError(f"cannot store a {type(x).__name__} in the training state")

    return enc(obj), tensors


def unpack(doc: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "$tensor" in x:
            return _tensor(tensors, x["$tensor"])
        if "$ndarray" in x:
            t = _tensor(tensors, x["$ndarray"])
            try:
                return t.numpy().astype(np.dtype(str(x["dtype"]))).reshape(x["shape"])
            except (TypeError, ValueError) as e:
                raise StateFormatError(f"bad array entry ({e})") from None
        if "$tuple" in x:
            return tuple(dec(v) for v in x["$tuple"])
        if "$items" in x:
            return {_hashable(dec(k)): dec(v) for k, v in x["$items"]}
        if "$float" in x:
            if x["$float"] not in ("inf", "-inf", "nan"):
                raise StateFormatError("bad float entry")
            return float(x["$float"])
        return {k: dec(v) for k, v in x.items()}

    return dec(doc)


def _tensor(tensors: dict[str, torch.Tensor], key: Any) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise StateFormatError(f"refers to a tensor {key!r} that the tensor file does not hold")
    return tensors[key]


def _hashable(k: Any) -> Any:
    if isinstance(k, list):
        return tuple(k)
    return k


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    """Serialises in memory, then writes with Python's file API, so a full disk is an OSError (ENOSPC) that says
    so, not a library error."""
    data = save(tensors, metadata=metadata)
    with open(path, "wb") as fh:
        fh.write(data)


def save_state(obj: Any, json_path: Path, tensors_path: Path) -> None:
    """Writes `obj` as JSON + safetensors (into a folder that is itself written atomically)."""
    doc, tensors = pack(obj)
    write_safetensors(tensors, tensors_path, metadata={"format": FORMAT})
    Path(json_path).write_text(json.dumps({"format": FORMAT, "state": doc}), encoding="utf-8")


def load_state(json_path: Path, tensors_path: Path) -> Any:
    try:
        head = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFormatError(f"{Path(json_path).name} cannot be read ({type(e).__name__})") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise StateFormatError(f"{Path(json_path).name} is not a lora-trainer state file")
    try:
        tensors = load_file(str(tensors_path))
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise StateFormatError(f"{Path(tensors_path).name} is not a readable .safetensors file "
                               f"({type(e).__name__})") from None
    return unpack(head.get("state"), tensors)
