"""Random generators derived from explicit inputs, never from global state.

The trainer resumes exactly from a checkpoint, so every random choice (crop, flip, caption shuffle,
batch order) must be a pure function of (seed, epoch, index, position, purpose). Python's hash() is
salted per process, so a stable digest is used instead.
"""
from __future__ import annotations

import hashlib
import random


def derive_seed(*parts) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def derive_rng(*parts) -> random.Random:
    return random.Random(derive_seed(*parts))
