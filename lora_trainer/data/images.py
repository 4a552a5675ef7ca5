"""Turning any image file a person is likely to drop into a dataset into a plain RGB picture.

Handles EXIF orientation, transparency (composited on a chosen background), palette, grayscale,
16-bit, CMYK and ICC-tagged files, and animated files (first frame). Every failure becomes an
ImageLoadError that names the file and says why.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageColor, UnidentifiedImageError

from ..config import ConfigError
from .errors import ImageLoadError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

_EXIF_ORIENTATION = 0x0112
_Transpose = getattr(Image, "Transpose", Image)  # Pillow < 9.1 keeps the constants on Image
# EXIF orientation value -> the transpose that shows the picture upright.
_UPRIGHT = {
    2: _Transpose.FLIP_LEFT_RIGHT,
    3: _Transpose.ROTATE_180,
    4: _Transpose.FLIP_TOP_BOTTOM,
    5: _Transpose.TRANSPOSE,
    6: _Transpose.ROTATE_270,
    7: _Transpose.TRANSVERSE,
    8: _Transpose.ROTATE_90,
}
_SIDE_SWAPPING = (5, 6, 7, 8)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

RGB = tuple[int, int, int]


def parse_background(value: Union[str, Sequence[int], None]) -> RGB:
    """'white', 'black', '#rrggbb' (or any colour name Pillow knows) -> (r, g, b)."""
    if value is None or value == "":
        return (255, 255, 255)
    if isinstance(value, (list, tuple)) and len(value) == 3:
        if all(isinstance(v, int) and 0 <= v <= 255 for v in value):
            return (int(value[0]), int(value[1]), int(value[2]))
    elif isinstance(value, str):
        try:
            rgb = ImageColor.getrgb(value.strip())
            return (rgb[0], rgb[1], rgb[2])
        except ValueError:
            pass
    raise ConfigError(f"alpha_background: {value!r} is not a colour; use white, black or #rrggbb")


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from the header. Not im.getexif(): for PNG that decodes the whole image."""
    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(bytes(raw))
        value = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # damaged EXIF must not make a good picture unusable
        return 1
    return value if value in _UPRIGHT else 1


def failure_reason(error: BaseException) -> str:
    """A short, human explanation of why Pillow could not read a file."""
    text = str(error)
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, UnidentifiedImageError):
        return "not a readable image (unknown format or damaged header)"
    if isinstance(error, Image.DecompressionBombError):
        return f"too large to decode safely ({text})"
    if "truncated" in text.lower() or isinstance(error, EOFError):
        return "file is truncated (an incomplete download or copy?)"
    return f"cannot decode: {text}" if text else f"cannot decode ({type(error).__name__})"


def _looks_complete(path: Path, fmt: Optional[str]) -> bool:
    """Cheap end-of-file checks, so truncated files are caught without decoding every image."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(16)
        fh.seek(max(0, size - 64))
        tail = fh.read()
    if fmt == "JPEG":
        # Entropy-coded data never contains FF D9 (FF is always stuffed), so a missing end marker means truncation.
        return b"\xff\xd9" in tail
    if fmt == "PNG":
        return b"IEND" in tail
    if fmt == "WEBP" and head[:4] == b"RIFF":
        return size >= int.from_bytes(head[4:8], "little") + 8
    if fmt == "BMP" and head[:2] == b"BM":
        declared = int.from_bytes(head[2:6], "little")
        return declared == 0 or size >= declared
    return True


def probe_image(path: Union[str, Path]) -> tuple[int, int]:
    """(width, height) as the picture is shown (EXIF orientation applied), reading only the header.

    A file whose ending looks cut off is decoded once to confirm, so a harmless trailer never costs a
    good image. Raises ImageLoadError.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            fmt = im.format
            orientation = _orientation(im)
        complete = _looks_complete(path, fmt)
    except Exception as e:
        raise ImageLoadError(path, failure_reason(e)) from None
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"has an empty size {width}x{height}")
    if not complete:
        load_image(path)  # raises with the decoder's own reason when the file is really damaged
    if orientation in _SIDE_SWAPPING:
        width, height = height, width
    return width, height


def load_image(path: Union[str, Path], background: Union[str, Sequence[int]] = "white",
               draft_size: Optional[tuple[int, int]] = None) -> Image.Image:
    """Loads `path` as an upright RGB image.

    draft_size: (width, height) the caller will shrink the image to at least; JPEGs are then decoded at a
    reduced scale that still covers it (much faster for large photos). Raises ImageLoadError.
    """
    path = Path(path)
    bg = parse_background(background)
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # animated files: the first frame
            orientation = _orientation(im)
            if draft_size and im.format == "JPEG":
                dw, dh = draft_size
                if orientation in _SIDE_SWAPPING:
                    dw, dh = dh, dw
                im.draft(None, (max(1, int(dw)), max(1, int(dh))))
            im.load()
            rgb = _to_rgb(im, bg)
    except ImageLoadError:
        raise
    except Exception as e:
        raise ImageLoadError(path, failure_reason(e)) from None
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    return rgb


def _has_alpha(im: Image.Image) -> bool:
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return True
    palette = getattr(im, "palette", None)
    return im.mode == "P" and palette is not None and getattr(palette, "mode", "") == "RGBA"


def _to_rgb(im: Image.Image, bg: RGB) -> Image.Image:
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips instead of scaling; 16-bit PNGs load as I;16 or I.
        values = np.asarray(im).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)).convert("RGB")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, bg)
        canvas.paste(rgba, mask=rgba.getchannel("A"))  # with an opaque canvas this equals alpha compositing
        return canvas
    if mode in ("RGB", "CMYK"):
        converted = _icc_to_srgb(im)
        if converted is not None:
            return converted
    return im if mode == "RGB" else im.convert("RGB")


_icc_transforms: dict = {}


def _icc_to_srgb(im: Image.Image) -> Optional[Image.Image]:
    """Colour-manages RGB/CMYK images whose embedded profile is not sRGB; None when not needed or not possible."""
    icc = im.info.get("icc_profile")
    if not icc:
        return None
    key = (hash(icc), len(icc), im.mode)
    try:
        transform = _icc_transforms.get(key)
        if transform is None:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            if "srgb" in ImageCms.getProfileDescription(source).lower().replace(" ", ""):
                transform = False
            else:
                transform = ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), im.mode, "RGB")
            if len(_icc_transforms) > 32:
                _icc_transforms.clear()
            _icc_transforms[key] = transform
        if transform is False:
            return None
        from PIL import ImageCms

        return ImageCms.applyTransform(im, transform)
    except Exception:  # a damaged or exotic profile: fall back to Pillow's plain conversion
        return None
