"""Dataset chores behind the tab (no Gradio here): listing images with captions, editing captions (atomic
writes, sidecar files or metadata.csv, whichever the dataset uses), bulk tag edits, importing uploads."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

from ..caption.images import list_images
from ..caption.text import dedupe, split_tags
from ..caption.writers import CsvWriter, SidecarWriter

BULK_ACTIONS = ("add", "remove", "replace")


class DatasetToolError(ValueError):
    pass


@dataclass
class DatasetImage:
    path: Path
    caption: str


def dataset_folder(path: Union[str, Path, None]) -> Path:
    if not path or not str(path).strip():
        raise DatasetToolError("enter a dataset folder (or upload images)")
    folder = Path(str(path).strip()).expanduser()
    if not folder.is_dir():
        raise DatasetToolError(f"{folder} is not a folder")
    return folder


def caption_store(folder: Path, extension: str = ".txt"):
    """The dataset's caption store: its metadata.csv when it has one (training reads that first), else
    sidecar files."""
    csv_path = folder / "metadata.csv"
    if csv_path.is_file():
        return CsvWriter(csv_path, folder)
    return SidecarWriter(extension or ".txt")


def list_dataset(folder: Union[str, Path], extension: str = ".txt") -> list[DatasetImage]:
    folder = dataset_folder(folder)
    store = caption_store(folder, extension)
    out = []
    for path in list_images(folder):
        try:
            caption = store.existing(path) or ""
        except ValueError as e:  # an unreadable caption file: show why instead of hiding the image
            caption = f"(unreadable caption: {e})"
        out.append(DatasetImage(path, caption))
    return out


def _inside(folder: Path, image: Union[str, Path]) -> Path:
    image = Path(image)
    try:
        image.resolve().relative_to(folder.resolve())
    except ValueError:
        raise DatasetToolError(f"{image} is not inside the dataset folder {folder}") from None
    if not image.is_file():
        raise DatasetToolError(f"{image} does not exist")
    return image


def save_caption(folder: Union[str, Path], image: Union[str, Path], caption: str, extension: str = ".txt") -> str:
    """Writes one image's caption (atomically); returns the caption as stored."""
    folder = dataset_folder(folder)
    image = _inside(folder, image)
    text = " ".join(caption.replace("\r", " ").replace("\n", " ").split())
    store = caption_store(folder, extension)
    store.write(image, text)
    store.flush()
    return text


def _tag_key(tag: str) -> str:
    return " ".join(tag.replace("_", " ").lower().split())


def bulk_edit(folder: Union[str, Path], action: str, tag: str, replacement: str = "", extension: str = ".txt",
              position: str = "end") -> int:
    """add / remove / replace a tag in every caption of the dataset; returns how many captions changed.

    Tags compare case- and underscore-insensitively ("Long_hair" is "long hair"). add puts the tag first
    (position "start", for trigger words) or last; replace keeps the tag's place."""
    if action not in BULK_ACTIONS:
        raise DatasetToolError(f"action must be one of {', '.join(BULK_ACTIONS)}")
    tags_in = split_tags(tag or "")
    if not tags_in:
        raise DatasetToolError("enter the tag to " + action)
    if action == "replace" and not split_tags(replacement or ""):
        raise DatasetToolError("enter the replacement tag")
    folder = dataset_folder(folder)
    store = caption_store(folder, extension)
    keys = {_tag_key(t) for t in tags_in}
    changed = 0
    for image in list_images(folder):
        try:
            old = store.existing(image) or ""
        except ValueError:
            continue  # unreadable caption files are left for the person to fix
        tags = split_tags(old)
        if action == "add":
            present = {_tag_key(t) for t in tags}
            missing = [t for t in tags_in if _tag_key(t) not in present]
            new_tags = (missing + tags) if position == "start" else (tags + missing)
        elif action == "remove":
            new_tags = [t for t in tags if _tag_key(t) not in keys]
        else:
            repl = split_tags(replacement)
            new_tags = []
            for t in tags:
                new_tags.extend(repl if _tag_key(t) in keys else [t])
            new_tags = dedupe(new_tags)
        new = ", ".join(new_tags)
        if new != old:
            store.write(image, new)
            changed += 1
    store.flush()
    return changed


def default_prompt(folder: Union[str, Path, None], trigger: str = "", extension: str = ".txt") -> str:
    """A preview prompt: the trigger word plus the first caption of the dataset (without the trigger twice)."""
    caption = ""
    try:
        items = list_dataset(folder, extension) if folder else []
    except (DatasetToolError, OSError):
        items = []
    for item in items:
        if item.caption and not item.caption.startswith("(unreadable"):
            caption = item.caption
            break
    trigger_tags = split_tags(trigger or "")
    return ", ".join(dedupe(trigger_tags + split_tags(caption))) or "a picture"


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, fallback: str = "dataset") -> str:
    cleaned = _SAFE.sub("_", (text or "").strip()).strip("._")
    return cleaned or fallback


def import_uploads(files: Iterable, target: Union[str, Path]) -> tuple[Path, int, list[str]]:
    """Copies uploaded files (paths, or objects with a `.name` path: Gradio 3 tempfiles, Gradio 4 paths)
    into `target`. Images and their .txt captions are kept; an existing file is never replaced (a numbered
    name is used, and a caption follows its image's new name). Returns (folder, images copied, skipped)."""
    from ..caption.images import image_extensions

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    exts = image_extensions()
    paths = []
    for f in files or []:
        p = getattr(f, "name", f)
        if p:
            paths.append(Path(str(p)))
    renamed: dict[str, str] = {}
    images = 0
    skipped = []
    for p in sorted(paths, key=lambda q: (q.suffix.lower() == ".txt", q.name)):
        original = _original_name(p)
        suffix = Path(original).suffix.lower()
        if suffix in exts:
            if p.stat().st_size == 0:  # seen from Gradio 3 when Upload was pressed while the browser still sent
                skipped.append(f"{original}: the file arrived empty (its upload had not finished); choose it again")
                renamed[Path(original).stem] = ""
                continue
            dest = _free(target / original)
            renamed[Path(original).stem] = dest.stem
            _copy(p, dest)
            images += 1
        elif suffix == ".txt":
            stem = renamed.get(Path(original).stem, Path(original).stem)
            if not stem:
                skipped.append(f"{original}: its image arrived empty")
                continue
            dest = target / f"{stem}.txt"
            if dest.exists():
                skipped.append(f"{original}: a caption {dest.name} already exists")
                continue
            _copy(p, dest)
        else:
            skipped.append(f"{original}: not an image ({', '.join(sorted(set(exts)))}) or .txt caption")
    return target, images, skipped


def _original_name(p: Path) -> str:
    return safe_name(p.name, "file")


def _free(path: Path) -> Path:
    if not path.exists():
        return path
    n = 2
    while True:
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        if not candidate.exists():
            return candidate
        n += 1


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def resolve_image(folder: Optional[str], name: str) -> Optional[Path]:
    if not folder or not name:
        return None
    p = Path(name)
    if not p.is_absolute():
        p = Path(folder) / name
    return p if p.is_file() else None
