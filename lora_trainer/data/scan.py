"""Finding the training images in a folder and pairing each with its caption and repeat count.

Layouts understood (they can be mixed):
  flat folder                 images, optionally with sidecar caption files (a.png + a.txt)
  metadata.csv                file_name,caption rows (header optional), relative to train_data_dir or absolute
  kohya repeat folders        10_mychar/ = 10 repeats of subset "mychar" (direct sub-folders of the root)
  nested folders              any depth; the top-level folder decides repeats and subset
  regularization folder       reg_data_dir, same rules, items flagged is_reg with loss_weight = reg_weight
Caption priority: metadata.csv row > sidecar file > none.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .captions import normalize_caption
from .errors import DatasetError, ImageLoadError
from .images import IMAGE_EXTENSIONS, probe_image
from .metadata_csv import MetadataRow, find_metadata_csv, path_key, read_metadata_csv, shown_name

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
# LatentCache writes this file into its folders, so a cache kept inside the dataset is never scanned.
CACHE_MARKER = ".lora_trainer_cache"
# Picture types people drop into datasets that we do not read; mentioned so they are not silently lost.
UNSUPPORTED_PICTURES = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".psd", ".tga", ".ico")
SUSPICIOUS_REPEATS = 1000  # "2024_trip" is more likely a date than 2024 repeats


@dataclass
class ImageItem:
    path: Path
    caption: str
    repeats: int
    is_reg: bool
    loss_weight: float
    subset: str
    width: int                       # upright size (EXIF orientation applied)
    height: int
    bucket: tuple[int, int] = (0, 0)  # (w, h), set by the dataset
    caption_source: str = "none"      # "metadata", "sidecar" or "none"
    source_dir: str = ""              # top-level folder it came from ("10_mychar"), or the root's name


@dataclass
class ScanResult:
    items: list[ImageItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "path: reason" for everything skipped or suspicious
    notes: list[str] = field(default_factory=list)     # worth saying, nothing wrong
    metadata_csv: Optional[Path] = None

    @property
    def train_items(self) -> list[ImageItem]:
        return [i for i in self.items if not i.is_reg]


def caption_extension(cfg) -> str:
    ext = (cfg.caption_extension or ".txt").strip()
    return ext if ext.startswith(".") else "." + ext


def _resolved(path) -> Optional[Path]:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return None


def _folders_to_skip(cfg, scanning_reg: bool) -> set[Path]:
    """Our own output and cache folders, and the other image root when one is inside the other."""
    candidates = [cfg.cache_dir, cfg.output_dir, Path(cfg.output_dir or ".") / "cache"]
    candidates.append(cfg.train_data_dir if scanning_reg else cfg.reg_data_dir)
    return {p for p in (_resolved(c) for c in candidates if c) if p is not None}


def _walk_images(root: Path, skip: set[Path], unsupported: Counter, problems: list[str]) -> Iterator[Path]:
    """Image files under root in a stable order; hidden entries and our own folders are left out."""
    seen: set[Path] = set()

    def unreadable(error: OSError) -> None:
        problems.append(f"{error.filename}: cannot list this folder ({error.strerror or error})")

    for folder, dirs, files in os.walk(root, followlinks=True, onerror=unreadable):
        here = _resolved(folder)
        if here in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and _resolved(Path(folder) / d) not in skip
                         and not (Path(folder) / d / CACHE_MARKER).exists())
        for name in sorted(files):
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_EXTENSIONS:
                yield Path(folder) / name
            elif suffix in UNSUPPORTED_PICTURES:
                unsupported[suffix] += 1


def read_sidecar(image: Path, extension: str, problems: list[str]) -> Optional[str]:
    """Caption from a.txt (or a.png.txt) next to a.png; None when there is no such file."""
    for candidate in (image.with_suffix(extension), image.with_name(image.name + extension)):
        if candidate.is_file():
            try:
                raw = candidate.read_bytes()
            except OSError as e:
                problems.append(f"{candidate}: cannot read this caption ({e.strerror or e})")
                return None
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                problems.append(f"{candidate}: not UTF-8 text; undecodable characters were replaced")
                text = raw.decode("utf-8", errors="replace")
            return normalize_caption(text)
    return None


def _subset_of(path: Path, root: Path, root_name: str, default_repeats: int) -> tuple[str, int, str]:
    """(subset, repeats, source_dir) from the top-level folder of `path` under `root`."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:  # a metadata.csv entry outside the root
        return path.parent.name, default_repeats, path.parent.name
    if len(parts) < 2:
        return root_name, default_repeats, root_name
    top = parts[0]
    match = REPEAT_FOLDER.match(top)
    if match:
        return match.group(2), int(match.group(1)), top
    return top, default_repeats, top


def scan_root(root: Path, cfg, *, is_reg: bool, result: ScanResult,
              metadata: Optional[dict[str, MetadataRow]] = None, walk: bool = True) -> None:
    """Adds the images under `root` (and metadata rows outside it) to `result`.

    walk=False: only the files listed in `metadata` (a metadata_path without train_data_dir).
    """
    metadata = metadata or {}
    ext = caption_extension(cfg)
    unsupported: Counter = Counter()
    zero_repeat_dirs: set[str] = set()
    suspicious_dirs: set[str] = set()
    weight = float(cfg.reg_weight) if is_reg else 1.0

    paths = list(_walk_images(root, _folders_to_skip(cfg, is_reg), unsupported, result.problems)) if walk else []
    seen = {path_key(p) for p in paths}
    for key, row in sorted(metadata.items(), key=lambda kv: kv[1].line):
        if key in seen:
            continue
        if row.path.suffix.lower() not in IMAGE_EXTENSIONS:
            result.problems.append(f"{row.csv} line {row.line}: {shown_name(row.path.name)}, not a supported "
                                   f"image type ({', '.join(IMAGE_EXTENSIONS)})")
        elif not row.exists:
            result.problems.append(f"{row.csv} line {row.line}: {shown_name(row.path.name)} not found")
        else:
            paths.append(row.path)  # listed explicitly, e.g. by absolute path outside the folder

    root_name = (_resolved(root) or root).name or str(root)  # "." has no name of its own
    for path in paths:
        subset, repeats, source_dir = _subset_of(path, root, root_name, int(cfg.num_repeats))
        if repeats == 0:
            zero_repeat_dirs.add(source_dir)
            continue
        if repeats >= SUSPICIOUS_REPEATS:
            suspicious_dirs.add(source_dir)
        try:
            width, height = probe_image(path)
        except ImageLoadError as e:
            result.problems.append(str(e))
            continue
        row = metadata.get(path_key(path))
        caption, source = "", "none"
        if row is not None and row.caption:
            caption, source = row.caption, "metadata"
        else:
            sidecar = read_sidecar(path, ext, result.problems)
            if sidecar:
                caption, source = sidecar, "sidecar"
        result.items.append(ImageItem(path=path, caption=caption, repeats=repeats, is_reg=is_reg,
                                      loss_weight=weight, subset=subset, width=width, height=height,
                                      caption_source=source, source_dir=source_dir))

    for d in sorted(zero_repeat_dirs):
        result.problems.append(f"{root / d}: the folder name starts with 0_, so its images get 0 repeats and "
                               f"are not used")
    for d in sorted(suspicious_dirs):
        result.notes.append(f"{root / d}: read as {REPEAT_FOLDER.match(d).group(1)} repeats of "
                            f"{REPEAT_FOLDER.match(d).group(2)!r}; rename the folder if that is not meant")
    if unsupported:
        kinds = ", ".join(f"{n} {s}" for s, n in sorted(unsupported.items()))
        result.notes.append(f"{root}: ignored {kinds} file(s); convert them to {', '.join(IMAGE_EXTENSIONS)}")


def scan_dataset(cfg) -> ScanResult:
    """Scans train_data_dir (and reg_data_dir). Raises DatasetError only when a configured path is unusable;
    an empty result is for the caller to judge (see no_images_message)."""
    result = ScanResult()
    if not cfg.train_data_dir and not cfg.metadata_path:
        raise DatasetError("train_data_dir is not set: point it at a folder of images (with .txt captions, a "
                           "metadata.csv or N_name repeat folders)")
    root = Path(cfg.train_data_dir).expanduser() if cfg.train_data_dir else None
    if root is not None and not root.is_dir():
        raise DatasetError(f"train_data_dir: {root} does not exist or is not a folder")
    csv_path = find_metadata_csv(root, cfg.metadata_path)
    result.metadata_csv = csv_path
    metadata: dict[str, MetadataRow] = {}
    if csv_path is not None:
        bases = [root, csv_path.parent] if root is not None else [csv_path.parent]
        metadata, csv_problems = read_metadata_csv(csv_path, bases, IMAGE_EXTENSIONS)
        result.problems.extend(csv_problems)
    if root is None:  # only a metadata.csv: its rows are the dataset, relative to its own folder
        root = csv_path.parent
        scan_root(root, cfg, is_reg=False, result=result, metadata=metadata, walk=False)
    else:
        scan_root(root, cfg, is_reg=False, result=result, metadata=metadata)

    if cfg.reg_data_dir:
        reg_root = Path(cfg.reg_data_dir).expanduser()
        if not reg_root.is_dir():
            raise DatasetError(f"reg_data_dir: {reg_root} does not exist or is not a folder")
        reg_meta: dict[str, MetadataRow] = {}
        if (reg_root / "metadata.csv").is_file():
            reg_meta, problems = read_metadata_csv(reg_root / "metadata.csv", [reg_root], IMAGE_EXTENSIONS)
            result.problems.extend(problems)
        scan_root(reg_root, cfg, is_reg=True, result=result, metadata=reg_meta)
    return result


def no_images_message(cfg, result: ScanResult) -> str:
    """Why nothing usable was found: what was looked for, where, and what was skipped."""
    where = cfg.train_data_dir or (str(result.metadata_csv) if result.metadata_csv else "?")
    csv_text = str(result.metadata_csv) if result.metadata_csv else "a metadata.csv (none found)"
    lines = [f"no usable training images in {where}: looked for {', '.join(IMAGE_EXTENSIONS)} files (any case) "
             f"in the folder and its sub-folders (N_name folders set repeats; hidden files are skipped), with "
             f"captions from {csv_text} and sidecar *{caption_extension(cfg)} files."]
    if any(i.is_reg for i in result.items):
        lines.append(f"Only regularization images were found (in {cfg.reg_data_dir}); the training folder needs "
                     f"images too.")
    if result.problems:
        lines.append(f"{len(result.problems)} problem(s):")
        lines += [f"  {p}" for p in result.problems[:10]]
        if len(result.problems) > 10:
            lines.append(f"  ... and {len(result.problems) - 10} more")
    else:
        lines.append("The folder contains no image files of those types.")
    lines += result.notes
    return "\n".join(lines)
