"""Errors of the data layer. Both are ValueErrors: they describe input a person has to fix."""
from __future__ import annotations

from pathlib import Path
from typing import Union


class DatasetError(ValueError):
    """The dataset as a whole is unusable (nothing found, folder missing, unreadable metadata.csv)."""


class ImageLoadError(DatasetError):
    """One image file cannot be read; `path` and `reason` say which and why."""

    def __init__(self, path: Union[str, Path], reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keeps the two-argument constructor working across worker processes
        return (type(self), (self.path, self.reason))
