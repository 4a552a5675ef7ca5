"""Where captions go: a sidecar text file per image, or one metadata.csv (file_name,caption).

Both read the caption an image already has (`existing`) so that autotag can keep, overwrite or append,
and both write atomically (a crash never leaves a half-written caption file or CSV).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional, Union

from ..config import atomic_write_text
from .images import image_extensions

CSV_HEADER = ("file_name", "caption")


class UnreadableCaption(ValueError):
    """An existing caption that cannot be read as text; it is never rewritten by append."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class SidecarWriter:
    """`photo.png` -> `photo.txt` beside it (extension configurable)."""

    def __init__(self, extension: str = ".txt"):
        self.extension = extension if extension.startswith(".") else "." + extension

    def path_for(self, image: Path) -> Path:
        return image.with_suffix(self.extension)

    def existing(self, image: Path) -> Optional[str]:
        path = self.path_for(image)
        if not path.is_file():
            return None
        try:
            return path.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError:
            raise UnreadableCaption(path, "is not UTF-8 text; save it as UTF-8 (or use overwrite to replace it)") \
                from None

    def write(self, image: Path, caption: str) -> None:
        atomic_write_text(self.path_for(image), caption + "\n")

    def flush(self) -> None:
        pass

    def describe(self) -> str:
        return f"sidecar {self.extension} files"


class CsvWriter:
    """One CSV of `file_name,caption` rows, read the way the dataset scan reads it (`data/metadata_csv.py`):
    a header row is recognised because its first cell is not an image name, its file and caption columns
    by name (file_name/filename/..., caption/text/...), and a relative file name is looked up under
    `root` first, then beside the CSV. New rows get the image's path relative to `root` (forward slashes).
    Rows of images not captioned in this run, extra columns and column names are preserved; a header row
    is always written. Call `flush()` to save (atomically)."""

    def __init__(self, csv_path: Union[str, Path], root: Union[str, Path]):
        from ..data import metadata_csv  # imported here: the data package brings torch

        self._columns = (metadata_csv.FILE_COLUMNS, metadata_csv.CAPTION_COLUMNS)
        self._path_key = metadata_csv.path_key  # how the dataset scan matches a row to an image
        self.csv_path = Path(csv_path)
        self.root = Path(root)
        self.fieldnames: list[str] = list(CSV_HEADER)
        self.file_column, self.caption_column = CSV_HEADER
        self.rows: list[dict[str, str]] = []
        self.index: dict[str, dict[str, str]] = {}  # path key -> row
        self.dirty = False
        if self.csv_path.is_file():
            self._read()

    def _read(self) -> None:
        try:
            text = self.csv_path.read_text(encoding="utf-8-sig")
            rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
        except (UnicodeDecodeError, csv.Error) as e:
            raise UnreadableCaption(self.csv_path, f"cannot be read as a UTF-8 CSV ({e}); fix or move it, or "
                                                   "write to another file") from None
        if not rows:
            return
        if not rows[0][0].strip().lower().endswith(image_extensions()):  # a header row
            self.fieldnames = [c.strip() or f"column{i + 1}" for i, c in enumerate(rows[0])]
            lowered = [c.lower() for c in self.fieldnames]
            file_columns, caption_columns = self._columns
            file_i = next((i for i, c in enumerate(lowered) if c in file_columns), 0)
            caption_i = next((i for i, c in enumerate(lowered) if c in caption_columns), 1 if file_i != 1 else 0)
            if len(self.fieldnames) < 2:
                self.fieldnames.append("caption")
                caption_i = 1
            self.file_column, self.caption_column = self.fieldnames[file_i], self.fieldnames[caption_i]
            rows = rows[1:]
        width = len(self.fieldnames)
        for row in rows:
            record = {k: (row[i] if i < len(row) else "") for i, k in enumerate(self.fieldnames)}
            if len(row) > width and self.fieldnames[-1] == self.caption_column:
                # an unquoted comma inside the caption (hand-written CSV): the rest of the row is the caption
                record[self.caption_column] = ",".join(row[width - 1:])
            self.rows.append(record)
            name = record[self.file_column].strip()
            if name:
                self.index[self._key(name)] = record  # a name listed twice: the later row wins, as in training

    def _key(self, name: str) -> str:
        rel = Path(name.replace("\\", "/")).expanduser()
        candidates = [rel] if rel.is_absolute() else [self.root / rel, self.csv_path.parent / rel]
        return self._path_key(next((c for c in candidates if c.is_file()), candidates[0]))

    def file_name(self, image: Path) -> str:
        try:
            return image.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return image.resolve().as_posix()

    def existing(self, image: Path) -> Optional[str]:
        row = self.index.get(self._path_key(image))
        return None if row is None else row[self.caption_column].strip()

    def write(self, image: Path, caption: str) -> None:
        key = self._path_key(image)
        row = self.index.get(key)
        if row is None:
            row = {k: "" for k in self.fieldnames}
            row[self.file_column] = self.file_name(image)
            self.rows.append(row)
            self.index[key] = row
        row[self.caption_column] = caption
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.fieldnames, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, out.getvalue())
        self.dirty = False

    def describe(self) -> str:
        return str(self.csv_path)
