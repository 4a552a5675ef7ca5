"""Reading metadata.csv: `file_name,caption` rows, with or without a header row.

Accepts the Hugging Face imagefolder layout (file_name,text), quoted captions with commas, and unquoted
captions with commas (everything after the file name is the caption when caption is the last column).

A broken file (a quote that is never closed, a row with fewer fields than the header) is an error that names
the line: reading on would silently turn the rest of the file into one caption. Messages never quote a cell
unless it looks like an image file name, so pointing metadata_path at some other file does not reveal it.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .captions import normalize_caption
from .errors import DatasetError

FILE_COLUMNS = ("file_name", "filename", "file", "image", "image_path", "path", "name")
CAPTION_COLUMNS = ("caption", "text", "prompt", "tags", "description")


@dataclass
class MetadataRow:
    path: Path         # where the file was found, or where it was looked for first
    caption: str
    line: int
    exists: bool
    csv: Path          # the metadata file it came from, for messages


def path_key(path) -> str:
    """How two spellings of the same file are matched (relative/absolute, case on Windows)."""
    return os.path.normcase(os.path.abspath(path))


def _looks_like_image_name(cell: str, extensions) -> bool:
    return cell.strip().lower().endswith(tuple(extensions))


def shown_name(name: str, extensions=None) -> str:
    """A CSV cell as it may appear in a message: quoted when it looks like an image file name, else not at all."""
    from .images import IMAGE_EXTENSIONS

    name = str(name).strip()
    if len(name) <= 200 and name.isprintable() and _looks_like_image_name(name, extensions or IMAGE_EXTENSIONS):
        return repr(name)
    return "an entry that is not an image file name"


def _parse_rows(text: str, csv_path: Path) -> list[tuple[int, list[str]]]:
    """(first line of the row, cells) for each non-empty row; DatasetError naming the line of a broken one."""
    reader = csv.reader(io.StringIO(text), strict=True)
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error:
            raise DatasetError(f"{csv_path} line {start}: a quote opened in this row is never closed (or a quote "
                               f"stands inside an unquoted field). Put captions with commas in double quotes and "
                               f"write a quote inside them as two (\"\")") from None
        end = reader.line_num
        if end - start >= 1 and any(_swallows_rows(cell) for cell in row):
            raise DatasetError(f"{csv_path} line {start}: a quoted field runs on to line {end}, over what look like "
                               f"rows of their own: a quote in line {start} is not closed where it should be")
        if any(cell.strip() for cell in row):
            rows.append((start, row))


def _swallows_rows(cell: str) -> bool:
    from .images import IMAGE_EXTENSIONS

    return any(_looks_like_image_name(line.split(",", 1)[0], IMAGE_EXTENSIONS) and "," in line
               for line in cell.splitlines()[1:])


def read_metadata_csv(csv_path: Path, base_dirs: list[Path], extensions) -> tuple[dict[str, MetadataRow], list[str]]:
    """Returns ({path_key: row}, problems). Relative file names are looked up in base_dirs in order.

    Raises DatasetError when the file itself cannot be read or is not well-formed CSV.
    """
    try:
        text = Path(csv_path).read_text(encoding="utf-8-sig")  # -sig: Excel writes a byte-order mark
    except UnicodeDecodeError as e:
        raise DatasetError(f"{csv_path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 CSV") from None
    except OSError as e:
        raise DatasetError(f"{csv_path}: cannot read it ({e.strerror or type(e).__name__})") from None
    rows = _parse_rows(text, Path(csv_path))
    problems: list[str] = []
    if not rows:
        problems.append(f"{csv_path}: empty, no captions read from it")
        return {}, problems

    file_col, caption_col = 0, 1
    first = [c.strip().lower() for c in rows[0][1]]
    if not _looks_like_image_name(first[0], extensions):
        # A header row. Unknown column names fall back to file first, caption second.
        file_col = next((i for i, c in enumerate(first) if c in FILE_COLUMNS), 0)
        caption_col = next((i for i, c in enumerate(first) if c in CAPTION_COLUMNS), 1 if file_col != 1 else 0)
        header_width = len(first)
        if header_width < 2:
            raise DatasetError(f"{csv_path} line {rows[0][0]}: one column; a metadata CSV has file_name,caption "
                               f"columns (is metadata_path the right file?)")
        rows = rows[1:]
    else:
        header_width = 2
    caption_is_last = caption_col == header_width - 1

    found: dict[str, MetadataRow] = {}
    for line, row in rows:
        if len(row) < header_width or (len(row) > header_width and not caption_is_last):
            raise DatasetError(f"{csv_path} line {line}: {len(row)} field(s) where the header has {header_width}; "
                               f"every row needs a file name and a caption (quote captions that contain commas)")
        name = row[file_col].strip() if file_col < len(row) else ""
        if not name:
            problems.append(f"{csv_path} line {line}: no file name")
            continue
        if caption_is_last:
            caption = ",".join(row[caption_col:])  # an unquoted caption with commas spills into extra cells
        else:
            caption = row[caption_col]
        if os.sep == "/":
            name = name.replace("\\", "/")  # a CSV written on Windows
        rel = Path(name).expanduser()
        candidates = [rel] if rel.is_absolute() else [Path(b) / rel for b in base_dirs]
        path = next((c for c in candidates if c.is_file()), candidates[0])
        key = path_key(path)
        if key in found:
            problems.append(f"{csv_path} line {line}: {shown_name(name, extensions)} is listed again (first on line "
                            f"{found[key].line}); using line {line}")
        found[key] = MetadataRow(path=path, caption=normalize_caption(caption), line=line, exists=path.is_file(),
                                 csv=Path(csv_path))
    return found, problems


def find_metadata_csv(root: Optional[Path], configured: Optional[str]) -> Optional[Path]:
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise DatasetError(f"metadata_path: {path} does not exist; point it at a file_name,caption CSV or "
                               f"remove the key")
        return path
    if root is not None and (root / "metadata.csv").is_file():
        return root / "metadata.csv"
    return None
