"""Dataset: the scanned items plus everything the trainer asks per epoch and per draw.

Every random choice is derived from (cfg.seed, epoch, index, position), never from global RNG state, so
a resumed run reproduces the same batches, crops, flips and captions.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter, OrderedDict
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from .buckets import Bucketer, cover_size, format_bucket_table, resize_and_crop
from .captions import CaptionOptions, caption_forms, process_caption, split_tags
from .errors import DatasetError, ImageLoadError
from .fingerprint import file_digest
from .images import failure_reason, load_image, parse_background
from .rng import derive_rng
from .scan import ImageItem, no_images_message, scan_dataset

# Part of every cache key: bump it when loading or resizing starts producing different pixels.
PIXEL_PIPELINE_VERSION = "pixels-1"
_FLIP = getattr(Image, "Transpose", Image).FLIP_LEFT_RIGHT
_MAX_LISTED = 20
Log = Callable[[str], None]


def bullet_lines(lines: list[str], limit: int = _MAX_LISTED) -> list[str]:
    out = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        out.append(f"  ... and {len(lines) - limit} more")
    return out


class Dataset:
    def __init__(self, cfg, items: list[ImageItem], problems=(), notes=()):
        self.cfg = cfg
        self.items = list(items)
        self.problems: list[str] = list(problems)
        self.notes: list[str] = list(notes)
        self.bucketer = Bucketer.from_config(cfg)
        self.caption_options = CaptionOptions.from_config(cfg)
        self.background = parse_background(cfg.alpha_background)
        for item in self.items:
            item.bucket = self.bucketer.assign(item.width, item.height)
        self._excluded: set[int] = set()
        self.batch_size = int(cfg.batch_size)  # the global batch: batch_size x processes (set_global_batch)
        self._batches: OrderedDict[int, list[list[int]]] = OrderedDict()
        self._digests: dict[tuple, str] = {}

    # ---- sizes ------------------------------------------------------------------------------------
    def active_indices(self) -> list[int]:
        return [i for i in range(len(self.items)) if i not in self._excluded]

    @property
    def num_samples(self) -> int:
        return sum(self.items[i].repeats for i in self.active_indices())

    @property
    def steps_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    @property
    def cacheable(self) -> bool:
        return not (self.cfg.flip_aug or self.cfg.random_crop)

    # ---- epochs -----------------------------------------------------------------------------------
    def set_global_batch(self, size: int) -> None:
        """Batches of `size` draws (batch_size x processes in a data-parallel run; each process takes its slice)."""
        if int(size) != self.batch_size:
            self.batch_size = int(size)
            self._batches.clear()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Batches of item indices for one epoch; each item appears `repeats` times, each batch holds one
        bucket only, and the order is a pure function of (seed, epoch)."""
        if epoch not in self._batches:
            rng = derive_rng(self.cfg.seed, "batches", epoch)
            per_bucket: dict[tuple[int, int], list[int]] = {}
            for i in self.active_indices():
                per_bucket.setdefault(self.items[i].bucket, []).extend([i] * self.items[i].repeats)
            size = self.batch_size
            batches: list[list[int]] = []
            for bucket in sorted(per_bucket):
                draws = per_bucket[bucket]
                rng.shuffle(draws)
                batches.extend(draws[k:k + size] for k in range(0, len(draws), size))
            rng.shuffle(batches)
            self._batches[epoch] = batches
            while len(self._batches) > 4:  # the trainer only ever looks at the current and next epoch
                self._batches.popitem(last=False)
        return [list(b) for b in self._batches[epoch]]

    def epoch_draws(self, epoch: int) -> list[list[tuple[int, int]]]:
        """epoch_batches with each draw's position in the epoch: [[(index, position), ...], ...]."""
        position = 0
        out = []
        for batch in self.epoch_batches(epoch):
            out.append([(index, position + k) for k, index in enumerate(batch)])
            position += len(batch)
        return out

    # ---- one draw ---------------------------------------------------------------------------------
    def load_sample(self, index: int, epoch: int = 0, position: int = 0) -> dict:
        """Pixels of one draw, resized and cropped into the item's bucket, in [-1, 1], plus SDXL size info."""
        item = self.items[index]
        rng = derive_rng(self.cfg.seed, "pixels", epoch, index, position)
        source = (item.width, item.height)
        image = load_image(item.path, self.background, draft_size=cover_size(source, item.bucket))
        if image.size != source and not _is_draft_of(image.size, source):
            raise ImageLoadError(item.path, f"changed since the dataset was scanned (was {source[0]}x{source[1]}, "
                                            f"now {image.size[0]}x{image.size[1]}); start again to rescan")
        image, info = resize_and_crop(image, item.bucket, rng if self.cfg.random_crop else None, source_size=source)
        top, left = info.crop_top_left
        if self.cfg.flip_aug and rng.random() < 0.5:
            image = image.transpose(_FLIP)
            left = info.resized_size[1] - info.target_size[1] - left  # the crop as seen in the mirrored image
        # numpy, not torch ops: on small CPU tensors torch's per-op overhead dominates the whole load.
        array = np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1))
        array /= 127.5
        array -= 1.0
        pixels = torch.from_numpy(array)
        return {"pixels": pixels, "original_size": info.original_size, "crop_top_left": (top, left),
                "target_size": info.target_size}

    def caption_for(self, index: int, epoch: int = 0, position: int = 0) -> str:
        rng = derive_rng(self.cfg.seed, "caption", epoch, index, position)
        return process_caption(self.items[index].caption, self.caption_options, rng)

    def all_captions(self) -> Optional[list[str]]:
        """The distinct texts the run's draws can give (encodable once, up front); None when shuffling or tag
        dropout makes them too many."""
        if self.caption_options.rearranges:
            return None
        return list(dict.fromkeys(form for item in self.items
                                  for form in caption_forms(item.caption, self.caption_options)))

    # ---- caching ----------------------------------------------------------------------------------
    def file_digest(self, index: int) -> str:
        """sha256 of the item's file, remembered per (path, size, mtime) so an edited file is hashed again."""
        path = self.items[index].path
        try:
            st = os.stat(path)
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key not in self._digests:
                self._digests[key] = file_digest(path)
        except OSError as e:
            raise ImageLoadError(path, failure_reason(e)) from None
        return self._digests[key]

    def cache_key(self, index: int) -> str:
        """Same key => same pixels => same latent: the file's bytes, its bucket and the crop/background
        settings (the path is left out, so moving the dataset keeps the cache). The VAE is not part of it;
        keep caches of different VAEs apart (latent_cache_for's namespace)."""
        item = self.items[index]
        parts = [PIXEL_PIPELINE_VERSION, self.file_digest(index), f"{item.bucket[0]}x{item.bucket[1]}",
                 "random-crop" if self.cfg.random_crop else "center-crop",
                 "flip" if self.cfg.flip_aug else "no-flip", "%02x%02x%02x" % self.background]
        return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()[:40]

    # ---- damaged files found after the scan --------------------------------------------------------
    def exclude(self, index: int, reason: str) -> None:
        """Takes an item out of every later epoch (e.g. its file failed to decode while caching latents).
        Call it before computing the schedule: it changes num_samples and steps_per_epoch."""
        if index not in self._excluded:
            self._excluded.add(index)
            self.problems.append(f"{self.items[index].path}: {reason}")
            self._batches.clear()
        if not any(not self.items[i].is_reg for i in self.active_indices()):
            raise DatasetError("every training image failed to load:\n" + "\n".join(bullet_lines(self.problems)))

    def verify(self, log: Optional[Log] = print) -> int:
        """Decodes every image once (the scan only reads headers); damaged ones are excluded and reported.
        Returns how many were excluded. Not needed when latents are cached: caching decodes everything."""
        bad = 0
        for i in self.active_indices():
            item = self.items[i]
            try:
                load_image(item.path, self.background, draft_size=cover_size((item.width, item.height), item.bucket))
            except ImageLoadError as e:
                bad += 1
                if log:
                    log(f"skipped {e}")
                self.exclude(i, e.reason)
        return bad

    # ---- descriptions -----------------------------------------------------------------------------
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{source folder: {tag: images with it}} over the training (not regularization) captions, as kohya's
        ss_tag_frequency has it."""
        freq: dict[str, Counter] = {}
        for i in self.active_indices():
            item = self.items[i]
            if item.is_reg:
                continue
            freq.setdefault(item.source_dir, Counter()).update(set(split_tags(item.caption)))
        return {d: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for d, c in freq.items()}

    def dataset_dirs(self, is_reg: bool = False) -> dict[str, dict[str, int]]:
        """{source folder: {"n_repeats": r, "img_count": n}} (kohya's ss_dataset_dirs / ss_reg_dataset_dirs)."""
        out: dict[str, dict[str, int]] = {}
        for i in self.active_indices():
            item = self.items[i]
            if item.is_reg == is_reg:
                entry = out.setdefault(item.source_dir, {"n_repeats": item.repeats, "img_count": 0})
                entry["img_count"] += 1
        return out

    def bucket_counts(self) -> dict[tuple[int, int], tuple[int, int]]:
        """{(w, h): (images, samples per epoch)}"""
        counts: dict[tuple[int, int], list[int]] = {}
        for i in self.active_indices():
            entry = counts.setdefault(self.items[i].bucket, [0, 0])
            entry[0] += 1
            entry[1] += self.items[i].repeats
        return {b: (c[0], c[1]) for b, c in counts.items()}

    def bucket_info(self) -> dict:
        """Buckets as kohya's scripts write `ss_bucket_info` (the WebUIs' metadata dialogs read this shape):
        {"buckets": {"0": {"resolution": [w, h], "count": samples}, ...}, "mean_img_ar_error": mean |bucket ar -
        image ar|}."""
        counts = self.bucket_counts()
        buckets = {str(i): {"resolution": [int(w), int(h)], "count": int(samples)}
                   for i, ((w, h), (_images, samples)) in enumerate(sorted(counts.items()))}
        errors = [abs(self.items[i].bucket[0] / self.items[i].bucket[1] - self.items[i].width / self.items[i].height)
                  for i in self.active_indices() if self.items[i].width and self.items[i].height]
        return {"buckets": buckets, "mean_img_ar_error": float(sum(errors) / len(errors)) if errors else 0.0}

    def bucket_table(self) -> str:
        return format_bucket_table((b, n, s) for b, (n, s) in self.bucket_counts().items())

    def summary(self) -> list[str]:
        train = [self.items[i] for i in self.active_indices() if not self.items[i].is_reg]
        reg = [self.items[i] for i in self.active_indices() if self.items[i].is_reg]
        head = f"dataset: {len(train)} training image(s)"
        if reg:
            head += f" + {len(reg)} regularization image(s) (loss weight {self.cfg.reg_weight:g})"
        lines = [head + f", {self.num_samples} samples per epoch, {self.steps_per_epoch} steps per epoch at "
                        f"batch size {self.cfg.batch_size}"]
        for is_reg in (False, True):
            for folder, info in sorted(self.dataset_dirs(is_reg).items()):
                kind = "regularization " if is_reg else ""
                lines.append(f"  {kind}{folder}: {info['img_count']} image(s) x {info['n_repeats']} repeat(s)")
        return lines

    def log_summary(self, log: Log) -> None:
        for line in self.summary():
            log(line)
        if self.problems:
            log(f"skipped or questionable ({len(self.problems)}):")
            for line in bullet_lines(self.problems):
                log(line)
        for note in self.notes:
            log(f"note: {note}")
        uncaptioned = [self.items[i].path.name for i in self.active_indices()
                       if not self.items[i].caption and not self.items[i].is_reg]
        if uncaptioned:
            shown = ", ".join(uncaptioned[:5]) + (f" and {len(uncaptioned) - 5} more" if len(uncaptioned) > 5 else "")
            trigger = (f"they train with the caption {self.caption_options.prefix!r}" if self.caption_options.prefix
                       else "set caption_prefix to give them a trigger word")
            log(f"no caption for {len(uncaptioned)} image(s): {shown} ({trigger})")
        log(self.bucket_table())
        if not self.cacheable:
            which = " and ".join(k for k in ("flip_aug", "random_crop") if getattr(self.cfg, k))
            suffix = ", so latents are not cached" if self.cfg.cache_latents else ""
            log(f"note: {which} make every draw of an image different{suffix}")


def _is_draft_of(size: tuple[int, int], source: tuple[int, int]) -> bool:
    """True when `size` is `source` decoded at JPEG draft scale 1/2, 1/4 or 1/8."""
    return any(size == (-(-source[0] // f), -(-source[1] // f)) for f in (2, 4, 8))


def build_dataset(cfg, log: Optional[Log] = print) -> Dataset:
    """Scans the configured folders and returns the Dataset; logs problems, notes and the bucket table.
    Raises DatasetError when there is nothing to train on."""
    result = scan_dataset(cfg)
    if not result.train_items:
        raise DatasetError(no_images_message(cfg, result))
    dataset = Dataset(cfg, result.items, result.problems, result.notes)
    if log is not None:
        dataset.log_summary(log)
    return dataset
