"""Writing files and folders so that a crash never leaves half of one, and nothing is silently replaced."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable


class WriteError(OSError):
    """A file could not be written (disk full, permissions, ...): says where, why and how much space is free."""


def describe_write_error(path: Path, error: OSError) -> str:
    free = free_space(Path(path).parent)
    reason = error.strerror or type(error).__name__
    where = f"; {human_size(free)} free there" if free is not None else ""
    return f"could not write {path}: {reason}{where}"


def free_space(folder: Path):
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human_size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes through a hidden temporary file and renames it; on any failure the temporary file is removed,
    the previous file (if any) is untouched and a WriteError says where and why."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        if isinstance(e, WriteError):
            raise
        raise WriteError(e.errno, describe_write_error(path, e)) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WriteError):
            raise
        raise WriteError(e.errno, describe_write_error(target, e)) from None
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


_LEFTOVER = re.compile(r"^\..+\.(tmp|old)(\d+)(\.png)?$")


def remove_leftovers(folder: Path) -> list[Path]:
    """Removes the hidden temporary files and folders that a killed writer (ours) left in `folder`.

    Only our own pattern (`.NAME.tmpPID`, `.NAME.oldPID`) is touched, and only when PID is this process (a
    run in this process has ended) or no longer running (a killed run)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _LEFTOVER.match(entry.name)
        if not m:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            _unlink_quietly(entry)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there; assume another process's files are live
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
