"""TensorBoard scalars (loss, lr, grad norm) when log_with: tensorboard."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


class ScalarLog:
    def __init__(self, log_dir: Optional[Path]):
        self._writer = None
        self.unavailable = ""  # why no log is written although one was asked for
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # e.g. a WebUI venv without tensorboard: train anyway, say so
                self.unavailable = ("log_with: tensorboard, but the tensorboard package is not installed (pip install "
                                    "tensorboard); training goes on without TensorBoard logs")
                return
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, **values) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self._writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
