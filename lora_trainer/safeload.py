"""Reading torch's pickle-based files (.ckpt, .bin, old checkpoints) without ever running code from them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union


def weights_only_load(path: Union[str, Path]) -> Any:
    """torch's weights-only unpickler: tensors and plain containers, no code. Called through
    torch.serialization because AUTOMATIC1111 replaces torch.load with a wrapper that returns None for the
    zip entries current torch writes."""
    import torch

    return torch.serialization.load(str(path), map_location="cpu", weights_only=True)
