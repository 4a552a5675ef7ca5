"""`lora_trainer check`: everything worth knowing about a dataset before spending GPU time on it."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from .buckets import format_bucket_table
from .dataset import Dataset, bullet_lines
from .errors import DatasetError, ImageLoadError
from .fingerprint import difference_hash, near_pairs
from .images import load_image
from .scan import no_images_message, scan_dataset

NEAR_DUPLICATE_DISTANCE = 5   # of 64 dHash bits; unrelated pictures differ in about 32
TOO_SMALL_AREA_FRACTION = 0.25
TOP_TAGS = 30


@dataclass
class SubsetLine:
    folder: str
    subset: str
    images: int
    repeats: int
    is_reg: bool


@dataclass
class DatasetReport:
    where: str
    error: Optional[str] = None              # set when the dataset is unusable
    num_images: int = 0                      # training images (regularization counted apart)
    num_reg_images: int = 0
    subsets: list[SubsetLine] = field(default_factory=list)
    samples_per_epoch: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    steps_per_epoch: int = 0                 # micro-batches
    optimizer_steps_per_epoch: int = 0
    epochs: int = 0
    total_optimizer_steps: int = 0
    buckets: list[tuple[tuple[int, int], int, int]] = field(default_factory=list)  # ((w, h), images, samples)
    no_caption: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)     # "path: reason" (and other scan problems)
    notes: list[str] = field(default_factory=list)
    exact_duplicates: list[list[str]] = field(default_factory=list)
    near_duplicates: list[tuple[str, str, int]] = field(default_factory=list)  # (a, b, dHash distance)
    too_small: list[tuple[str, int, int]] = field(default_factory=list)      # (path, width, height)
    top_tags: list[tuple[str, int]] = field(default_factory=list)
    cacheable: bool = True

    @property
    def usable(self) -> bool:
        return self.error is None

    def format(self) -> str:
        lines = [f"Dataset check: {self.where}"]
        if self.error:
            lines += ["", "UNUSABLE: " + self.error]
            if self.unreadable:
                lines += ["", "unreadable or skipped:"] + bullet_lines(self.unreadable)
            return "\n".join(lines)
        images = f"{self.num_images} training image(s)"
        if self.num_reg_images:
            images += f" + {self.num_reg_images} regularization image(s)"
        lines.append(f"  images: {images}")
        for s in self.subsets:
            kind = "regularization " if s.is_reg else ""
            lines.append(f"    {kind}{s.folder} (subset {s.subset!r}): {s.images} x {s.repeats} repeat(s) "
                         f"= {s.images * s.repeats} samples")
        lines.append(f"  samples per epoch: {self.samples_per_epoch}")
        lines.append(f"  steps per epoch: {self.steps_per_epoch} batch(es) of up to {self.batch_size} = "
                     f"{self.optimizer_steps_per_epoch} optimizer step(s) with gradient accumulation "
                     f"{self.gradient_accumulation_steps}")
        lines.append(f"  training length: {self.total_optimizer_steps} optimizer steps"
                     + (f" ({self.epochs} epochs)" if self.epochs else " (max_train_steps)"))
        lines += ["", "buckets:"] + ["  " + r for r in format_bucket_table(self.buckets).splitlines()]
        sections = [
            (f"images without a caption ({len(self.no_caption)})", self.no_caption),
            (f"unreadable or skipped files ({len(self.unreadable)})", self.unreadable),
            (f"exact duplicates ({len(self.exact_duplicates)} group(s) of identical files)",
             [" = ".join(g) for g in self.exact_duplicates]),
            (f"near-duplicates ({len(self.near_duplicates)} pair(s), dHash distance <= {NEAR_DUPLICATE_DISTANCE})",
             [f"{a} ~ {b} (distance {d})" for a, b, d in self.near_duplicates]),
            (f"too small ({len(self.too_small)}): below min_bucket_reso or under a quarter of the training "
             f"area, they come out blurry or in tiny buckets", [f"{p} ({w}x{h})" for p, w, h in self.too_small]),
            ("notes", self.notes),
        ]
        for title, entries in sections:
            if entries:
                lines += ["", title + ":"] + bullet_lines(entries)
        if not self.cacheable:
            lines += ["", "flip_aug or random_crop is on: latents are encoded on every step, not cached"]
        if self.top_tags:
            lines += ["", f"top tags (images per tag, {len(self.top_tags)} shown):"]
            width = max(len(t) for t, _ in self.top_tags)
            lines += [f"  {t:<{width}}  {n}" for t, n in self.top_tags]
        lines += ["", "OK: the dataset is usable"]
        return "\n".join(lines)


def build_report(cfg, near_distance: int = NEAR_DUPLICATE_DISTANCE) -> DatasetReport:
    """Scans, decodes every image once (finding damage the header-only scan cannot see) and fingerprints it."""
    where = str(cfg.train_data_dir or cfg.metadata_path or "(train_data_dir not set)")
    try:
        result = scan_dataset(cfg)
    except DatasetError as e:
        return DatasetReport(where=where, error=str(e))
    if not result.train_items:
        return DatasetReport(where=where, error=no_images_message(cfg, result), unreadable=list(result.problems))
    try:
        ds = Dataset(cfg, result.items, result.problems, result.notes)
    except (DatasetError, ValueError) as e:
        return DatasetReport(where=where, error=str(e), unreadable=list(result.problems))

    digests: dict[int, str] = {}
    hashes: dict[int, int] = {}
    for i in ds.active_indices():
        item = ds.items[i]
        try:
            image = load_image(item.path, ds.background, draft_size=(64, 64))
            hashes[i] = difference_hash(image)
            digests[i] = ds.file_digest(i)
        except ImageLoadError as e:
            try:
                ds.exclude(i, e.reason)
            except DatasetError as fatal:
                return DatasetReport(where=where, error=str(fatal), unreadable=list(ds.problems))
        except OSError as e:
            ds.exclude(i, f"cannot read ({e.strerror or e})")

    report = DatasetReport(where=where)
    active = ds.active_indices()
    report.num_images = sum(1 for i in active if not ds.items[i].is_reg)
    report.num_reg_images = len(active) - report.num_images
    for is_reg in (False, True):
        subsets = {}
        for i in active:
            item = ds.items[i]
            if item.is_reg == is_reg:
                subsets.setdefault(item.source_dir, [item.subset, 0, item.repeats])[1] += 1
        report.subsets += [SubsetLine(folder=f, subset=s, images=n, repeats=r, is_reg=is_reg)
                           for f, (s, n, r) in sorted(subsets.items())]
    report.samples_per_epoch = ds.num_samples
    report.batch_size = int(cfg.batch_size)
    report.gradient_accumulation_steps = int(cfg.gradient_accumulation_steps)
    report.steps_per_epoch = ds.steps_per_epoch
    report.optimizer_steps_per_epoch = math.ceil(report.steps_per_epoch / report.gradient_accumulation_steps)
    if cfg.max_train_steps:
        report.total_optimizer_steps = int(cfg.max_train_steps)
    else:
        report.epochs = int(cfg.epochs)
        report.total_optimizer_steps = report.epochs * report.optimizer_steps_per_epoch
    report.buckets = [(b, n, s) for b, (n, s) in ds.bucket_counts().items()]
    report.no_caption = [str(ds.items[i].path) for i in active if not ds.items[i].caption]
    report.unreadable = list(ds.problems)
    report.notes = list(ds.notes)
    report.cacheable = ds.cacheable

    groups: dict[str, list[int]] = {}
    for i, digest in digests.items():
        groups.setdefault(digest, []).append(i)
    identical = [g for g in groups.values() if len(g) > 1]
    report.exact_duplicates = [[str(ds.items[i].path) for i in g] for g in identical]
    same_bytes = {frozenset((a, b)) for g in identical for a in g for b in g if a != b}
    order = sorted(hashes)
    for a, b, d in near_pairs([hashes[i] for i in order], near_distance):
        ia, ib = order[a], order[b]
        if frozenset((ia, ib)) not in same_bytes:
            report.near_duplicates.append((str(ds.items[ia].path), str(ds.items[ib].path), d))

    min_side = int(cfg.min_bucket_reso)
    area = ds.bucketer.spec.max_area
    for i in active:
        item = ds.items[i]
        if min(item.width, item.height) < min_side or item.width * item.height < TOO_SMALL_AREA_FRACTION * area:
            report.too_small.append((str(item.path), item.width, item.height))

    tags: Counter = Counter()
    for per_folder in ds.tag_frequency().values():
        tags.update(per_folder)
    report.top_tags = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]
    return report


def dataset_report(cfg) -> str:
    return build_report(cfg).format()


def run_check(cfg) -> int:
    """Prints the report; 0 when the dataset is usable, 1 when not."""
    report = build_report(cfg)
    print(report.format())
    return 0 if report.usable else 1
