"""Writing files and folders so that a crash never leaves half of one, and nothing is silently replaced."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_folder_atomically(target: Path, writer: Callable[[Path], None], replace: bool = True) -> Path:
    """writer(tmp) fills a temporary sibling folder, which is then renamed to `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{target} already exists")
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def free_path(path: Path, overwrite: bool = False) -> Path:
    """`path` itself if free (or overwrite is allowed), else name_2, name_3, ... beside it.

    Files keep their extension (style_2.safetensors); folders get the number at the end (adapter_2).
    """
    path = Path(path)
    if overwrite or not path.exists():
        return path
    stem, suffix = (path.stem, path.suffix) if path.suffix and not path.is_dir() else (path.name, "")
    n = 2
    while path.with_name(f"{stem}_{n}{suffix}").exists():
        n += 1
    return path.with_name(f"{stem}_{n}{suffix}")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex), read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
