"""Finding and opening the images to caption.

Both go through the data layer (`lora_trainer.data.images`: the same extensions the dataset scan trains
on, EXIF orientation, transparency on a background, damaged-file reasons). The small fallback below is
only used when that module cannot be imported.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Union

_FALLBACK_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@functools.lru_cache(maxsize=1)
def _data_images():
    """The data layer's image module, imported on first use (it brings torch, which the CLI's argument
    parsing should not wait for); None when it cannot be imported."""
    try:
        from ..data import images
    except ImportError:  # pragma: no cover - the data layer ships with the package
        return None
    return images


def image_extensions() -> tuple[str, ...]:
    """What the dataset scan trains on, so autotag captions exactly those files."""
    return tuple(getattr(_data_images(), "IMAGE_EXTENSIONS", _FALLBACK_EXTENSIONS))


class CaptionImageError(ValueError):
    def __init__(self, path: Union[str, Path], reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def list_images(folder: Union[str, Path], recursive: bool = True) -> list[Path]:
    """Image files under `folder` (repeat folders such as `10_name/` included), sorted; hidden files and
    folders are skipped."""
    folder = Path(folder)
    extensions = image_extensions()
    found = []
    for path in (folder.rglob("*") if recursive else folder.glob("*")):
        if any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in extensions and path.is_file():
            found.append(path)
    return sorted(found)


def _fallback_load(path: Path, background: str):
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            canvas = Image.new("RGBA", im.size, background)
            canvas.alpha_composite(im)
            return canvas.convert("RGB")
        return im.convert("RGB")


def load_image(path: Union[str, Path], background: str = "white", min_side: Optional[int] = None):
    """PIL RGB image; raises CaptionImageError (path and reason) for anything unreadable.

    min_side: the smallest side the caller needs; large JPEGs are then decoded at a reduced scale."""
    path = Path(path)
    data_images = _data_images()
    if data_images is not None:
        from ..data.errors import ImageLoadError

        try:
            return data_images.load_image(path, background=background,
                                           draft_size=(min_side, min_side) if min_side else None)
        except ImageLoadError as e:
            raise CaptionImageError(path, e.reason) from None
    try:
        return _fallback_load(path, background)
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise CaptionImageError(path, f"cannot read image ({type(e).__name__}: {e})") from None
