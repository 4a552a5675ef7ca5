"""Aspect-ratio buckets: which training size each image gets, and cutting the image to it.

Buckets all have about the same pixel area as the training resolution (so memory per step is about the
same) and sides that are multiples of bucket_reso_steps (the VAE and UNet need multiples of 8/64).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Optional

from PIL import Image

from .errors import DatasetError

Size = tuple[int, int]  # (width, height)

_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS


def _floor_to(value: float, step: int) -> int:
    return int(value // step) * step


@dataclass(frozen=True)
class BucketSpec:
    resolution: Size
    enable: bool = True
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64
    no_upscale: bool = True

    @classmethod
    def from_config(cls, cfg) -> "BucketSpec":
        return cls(resolution=tuple(cfg.resolution_wh), enable=bool(cfg.enable_bucket),
                   min_reso=int(cfg.min_bucket_reso), max_reso=int(cfg.max_bucket_reso),
                   step=int(cfg.bucket_reso_steps), no_upscale=bool(cfg.bucket_no_upscale))

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


def make_buckets(spec: BucketSpec) -> list[Size]:
    """Every (w, h) with sides in [min, max], multiples of the step and w*h <= the resolution's area."""
    step = spec.step
    res_w, res_h = spec.resolution
    if step > min(res_w, res_h):
        raise DatasetError(f"bucket_reso_steps ({step}) is larger than the shorter side of resolution "
                           f"{res_w}x{res_h}; lower bucket_reso_steps")
    # A resolution below min_bucket_reso (or above max) wins over the bucket limits.
    lo = max(step, min(spec.min_reso, _floor_to(min(res_w, res_h), step)))
    hi = max(spec.max_reso, _floor_to(max(res_w, res_h), step))
    lo = -(-lo // step) * step
    found = {(_floor_to(res_w, step), _floor_to(res_h, step))}
    for w in range(lo, hi + 1, step):
        h = min(_floor_to(spec.max_area / w, step), _floor_to(hi, step))
        if h >= lo:
            found.add((w, h))
            found.add((h, w))
    return sorted(found)


class Bucketer:
    """Assigns an image size to a bucket according to a BucketSpec."""

    def __init__(self, spec: BucketSpec):
        self.spec = spec
        if spec.enable:
            self.buckets = make_buckets(spec)
        else:
            self.buckets = [spec.resolution]
        self._log_ratios = [math.log(w / h) for w, h in self.buckets]

    @classmethod
    def from_config(cls, cfg) -> "Bucketer":
        return cls(BucketSpec.from_config(cfg))

    def nearest(self, width: int, height: int) -> Size:
        """The predefined bucket whose aspect ratio is closest (in log space, so 2:1 and 1:2 are symmetric)."""
        target = math.log(width / height)
        best = min(range(len(self.buckets)),
                   key=lambda i: (abs(self._log_ratios[i] - target),
                                  -self.buckets[i][0] * self.buckets[i][1], self.buckets[i]))
        return self.buckets[best]

    def own_bucket(self, width: int, height: int) -> Size:
        """The image's own size, shrunk to fit the area and max side, floored to the step (never enlarged)."""
        spec = self.spec
        limit = max(spec.max_reso, max(spec.resolution))
        scale = min(1.0, math.sqrt(spec.max_area / (width * height)), limit / max(width, height))
        return (max(spec.step, _floor_to(width * scale, spec.step)),
                max(spec.step, _floor_to(height * scale, spec.step)))

    def assign(self, width: int, height: int) -> Size:
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width}x{height} is empty")
        if not self.spec.enable:
            return self.spec.resolution
        if self.spec.no_upscale:
            if width * height <= self.spec.max_area:
                return self.own_bucket(width, height)
            bucket = self.nearest(width, height)
            if bucket[0] > width or bucket[1] > height:  # would need enlarging along one side
                return self.own_bucket(width, height)
            return bucket
        return self.nearest(width, height)


@dataclass(frozen=True)
class CropInfo:
    original_size: Size      # (height, width) of the upright source image, as SDXL conditioning wants it
    resized_size: Size       # (height, width) after the covering resize
    crop_top_left: Size      # (top, left) in the resized image
    target_size: Size        # (height, width) of the bucket


def cover_size(source: Size, bucket: Size) -> Size:
    """(w, h) of `source` scaled so it just covers `bucket`."""
    w, h = source
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def resize_and_crop(image: Image.Image, bucket: Size, rng: Optional[random.Random] = None,
                    source_size: Optional[Size] = None) -> tuple[Image.Image, CropInfo]:
    """Resizes `image` to cover `bucket` (w, h) and crops it: centred, or at a random spot drawn from `rng`.

    source_size: the file's real (w, h) when `image` was decoded at a reduced scale (JPEG draft); the
    geometry is computed from it so a draft decode gives the same crop as a full one.
    """
    source = source_size or image.size
    bw, bh = bucket
    nw, nh = cover_size(source, bucket)
    if image.size != (nw, nh):
        image = image.resize((nw, nh), _LANCZOS, reducing_gap=3.0)
    if rng is None:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    else:
        left, top = rng.randint(0, nw - bw), rng.randint(0, nh - bh)
    if (nw, nh) != (bw, bh):
        image = image.crop((left, top, left + bw, top + bh))
    info = CropInfo(original_size=(source[1], source[0]), resized_size=(nh, nw), crop_top_left=(top, left),
                    target_size=(bh, bw))
    return image, info


def format_bucket_table(rows: Iterable[tuple[Size, int, int]]) -> str:
    """rows of ((w, h), images, samples) -> an aligned text table."""
    rows = sorted(rows, key=lambda r: (r[0][0] * r[0][1], r[0]))
    if not rows:
        return "buckets: none"
    lines = [f"{'bucket (w x h)':>16}  {'aspect':>6}  {'images':>7}  {'samples':>8}"]
    for (w, h), images, samples in rows:
        lines.append(f"{f'{w} x {h}':>16}  {w / h:>6.2f}  {images:>7}  {samples:>8}")
    lines.append(f"{'total':>16}  {'':>6}  {sum(r[1] for r in rows):>7}  {sum(r[2] for r in rows):>8}")
    return "\n".join(lines)
