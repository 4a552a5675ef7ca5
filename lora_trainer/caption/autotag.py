"""Autotag a folder in one call: find images, tag them in batches, write captions by a policy.

Policies for an image that already has a (non-empty) caption:
    keep       leave it exactly as it is (the image is not even tagged)
    overwrite  replace it with prefix + new tags
    append     prefix + existing tags + new tags that are not already there
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from .images import CaptionImageError, list_images, load_image
from .scoring import select
from .taggers import TagFailed, Tagger
from .text import compose, sentence
from .writers import CsvWriter, SidecarWriter, UnreadableCaption

POLICIES = ("keep", "overwrite", "append")
MODES = ("tags", "caption")
DESTINATIONS = ("sidecar", "csv")


@dataclass
class FileResult:
    path: Path
    status: str  # written | kept | skipped | failed
    caption: str = ""  # what the image's caption is now (written or kept); "" for skipped/failed
    error: str = ""  # why it failed, or why it was skipped


@dataclass
class AutotagResult:
    files: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0
    destination: str = ""
    tagged: int = 0  # images that went through the tagger

    def _count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def written(self) -> int:
        return self._count("written")

    @property
    def kept(self) -> int:
        return self._count("kept")

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def failed(self) -> int:
        return self._count("failed")

    @property
    def failures(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "failed"]

    @property
    def captions(self) -> dict[str, str]:
        """image path -> its caption after the run (written, kept, or an existing one left as it was)."""
        return {str(f.path): f.caption for f in self.files if f.caption}

    @property
    def images_per_second(self) -> float:
        return self.tagged / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        text = (f"{self.written} written, {self.kept} kept, {self.skipped} skipped, {self.failed} failed "
                f"({self.tagged} images tagged in {self.seconds:.1f} s, {self.images_per_second:.2f} images/s) "
                f"-> {self.destination}")
        reasons: dict[str, int] = {}
        for f in self.failures:
            reasons[f.error] = reasons.get(f.error, 0) + 1
        for reason, n in list(reasons.items())[:3]:  # what to do about it, once per distinct reason
            text += f"\nfailed ({n}): {reason}"
        return text


def _check_choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def format_caption(scored, *, tagger: Tagger, mode: str, threshold: float, top_k: Optional[int] = None) -> list[str]:
    """The new caption pieces for one image from its scored tags."""
    if mode == "caption" and getattr(tagger, "category_of", None):
        return [sentence(scored, tagger.category_of, threshold)]
    return [tag for tag, _ in select(scored, threshold, top_k)]


def autotag_folder(folder: Union[str, Path], *, tagger: Tagger, threshold: float = 0.3, prefix: str = "",
                   mode: str = "tags", destination: str = "sidecar", policy: str = "keep",
                   progress: Optional[Callable[[int, int], None]] = None, top_k: Optional[int] = None,
                   batch_size: int = 8, csv_path: Optional[Union[str, Path]] = None,
                   caption_extension: str = ".txt", should_stop: Optional[Callable[[], bool]] = None,
                   background: str = "white", log: Optional[Callable[[str], None]] = None) -> AutotagResult:
    """Tags every image under `folder` and writes captions.

    destination: "sidecar" (`<image>.txt`) or "csv" (`csv_path`, default `folder/metadata.csv`).
    policy: keep | overwrite | append for images that already have a caption (see the module docstring).
    mode: "tags" (tags >= threshold, best first, at most top_k) or "caption" (a short sentence; host
    captioners give theirs as is). prefix: trigger word(s), always first.
    progress(done, total): called after every batch, over the images that need tagging.
    should_stop(): checked between batches; when true the run ends early (what was done is written).
    log(message): where a broken image is reported (default: stderr).
    Broken images are reported by path and counted as failed; the others are still captioned.
    """
    _check_choice("mode", mode, MODES)
    _check_choice("destination", destination, DESTINATIONS)
    _check_choice("policy", policy, POLICIES)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1; got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    log = log or (lambda message: print(message, file=sys.stderr))
    if destination == "csv":
        writer: Union[CsvWriter, SidecarWriter] = CsvWriter(Path(csv_path) if csv_path else folder / "metadata.csv",
                                                            folder)
    else:
        writer = SidecarWriter(caption_extension)
    result = AutotagResult(destination=writer.describe())
    started = time.perf_counter()

    todo: list[tuple[Path, Optional[str]]] = []
    for path in list_images(folder):
        try:
            existing = writer.existing(path) or None  # an empty caption file counts as no caption
        except UnreadableCaption as e:
            if policy == "keep":
                result.files.append(FileResult(path, "kept"))
            elif policy == "overwrite":
                todo.append((path, None))
            else:  # appending would garble it: leave it to the person
                log(f"skipped {e}")
                result.files.append(FileResult(path, "failed", error=f"{e.path.name} {e.reason}"))
            continue
        if existing is not None and policy == "keep":
            result.files.append(FileResult(path, "kept", existing))
        else:
            todo.append((path, existing if policy == "append" else None))

    min_side = getattr(tagger, "input_size", None)  # lets large JPEGs decode at a reduced scale
    done = 0
    try:
        for start in range(0, len(todo), batch_size):
            if should_stop is not None and should_stop():
                break
            batch = todo[start:start + batch_size]
            loaded, images = [], []
            for path, existing in batch:
                try:
                    images.append(load_image(path, background=background, min_side=min_side))
                    loaded.append((path, existing))
                except CaptionImageError as e:
                    log(f"skipped broken image {e}")
                    result.files.append(FileResult(path, "failed", error=e.reason))
            scored_batch = tagger.tag(images) if images else []
            result.tagged += len(images)
            for (path, existing), scored in zip(loaded, scored_batch):
                if isinstance(scored, TagFailed):
                    result.files.append(FileResult(path, "failed", existing or "", error=scored.reason))
                    continue
                new = format_caption(scored, tagger=tagger, mode=mode, threshold=threshold, top_k=top_k)
                caption = compose(new, prefix, existing)
                if not caption or caption == existing:
                    reason = "no tag reached the threshold" if not caption else "nothing new to append"
                    result.files.append(FileResult(path, "skipped", existing or "", error=reason))
                    continue
                writer.write(path, caption)
                result.files.append(FileResult(path, "written", caption))
            done += len(batch)
            if progress is not None:
                progress(done, len(todo))
    finally:
        writer.flush()
        result.files.sort(key=lambda f: f.path)
        result.seconds = time.perf_counter() - started
    return result
