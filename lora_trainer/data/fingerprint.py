"""File and picture fingerprints: exact content digests and a 64-bit difference hash for near-duplicates."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from ..fsutil import file_sha256

_BOX = getattr(Image, "Resampling", Image).BOX
_BIT_COUNTS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def file_digest(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """sha256 of the file's bytes (hex)."""
    return file_sha256(Path(path), chunk)


def difference_hash(image: Image.Image) -> int:
    """64-bit dHash: shrink to 9x8 grey, one bit per horizontal neighbour pair (left darker than right).

    Resizing, re-encoding and small colour shifts keep most bits; different pictures differ in about half.
    """
    small = np.asarray(image.convert("L").resize((9, 8), _BOX), dtype=np.int16)
    bits = (small[:, :-1] < small[:, 1:]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def near_pairs(hashes: list[int], max_distance: int) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming distance <= max_distance."""
    if len(hashes) < 2:
        return []
    values = np.array(hashes, dtype=np.uint64)
    pairs = []
    for i in range(len(values) - 1):
        diff = (values[i + 1:] ^ values[i]).view(np.uint8).reshape(-1, 8)
        distance = _BIT_COUNTS[diff].sum(axis=1, dtype=np.int32)
        for j in np.nonzero(distance <= max_distance)[0]:
            pairs.append((i, i + 1 + int(j), int(distance[j])))
    return pairs
