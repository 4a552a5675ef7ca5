"""`lora_trainer check` for task_type: text-generation: the text dataset as `train` reads it.

Files and samples per file, every skipped line with its reason, token lengths with the tokenizer of base_model
(loaded the way training loads it) and how many samples max_seq_length truncates, the training units and steps,
and the first sample as the prompt template renders it, with the part that is trained marked.
"""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from .data import FORMATS_HELP
from .dataset import no_samples_message, read_dataset, steps_per_epoch
from .templates import Renderer, SampleError, template_note

MAX_LISTED = 30           # issues listed one by one; the rest are counted
MAX_RENDER_CHARS = 1500   # of the first sample's rendering
KIND_NAMES = {"text": "plain text", "completion": "prompt/completion", "chat": "conversation"}


@dataclass
class TextReport:
    where: str
    error: Optional[str] = None
    files: list[tuple[str, int]] = field(default_factory=list)   # (file, samples read)
    ignored_files: list[str] = field(default_factory=list)
    kinds: dict = field(default_factory=dict)                     # kind -> samples read
    n_read: int = 0
    n_usable: int = 0
    skipped: list[str] = field(default_factory=list)             # "file line N: reason; skipped"
    truncated: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    max_seq_length: int = 0
    template: str = "none"
    n_train: int = 0
    n_val: int = 0
    packing: bool = False
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    steps_per_epoch: int = 0
    epochs: int = 0
    total_steps: int = 0
    first_where: str = ""
    first_rendered: str = ""
    first_trained: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.error is None

    @property
    def n_over(self) -> int:
        return sum(1 for n in self.lengths if n > self.max_seq_length)

    def format(self) -> str:
        lines = [f"Text dataset check: {self.where}"]
        if self.files or self.ignored_files or self.n_read:
            lines.append(f"  files: {len(self.files)} .txt/.jsonl file(s)" + (
                f"; {len(self.ignored_files)} other file(s) ignored ({', '.join(_exts(self.ignored_files))})"
                if self.ignored_files else ""))
            lines += [f"    {f}: {n} sample(s) read" for f, n in self.files]
            kinds = ", ".join(f"{KIND_NAMES.get(k, k)} {n}" for k, n in sorted(self.kinds.items()))
            lines.append(f"  samples: {self.n_read} read" + (f" ({kinds})" if kinds else "")
                         + (f"; {self.n_usable} usable for training" if self.lengths or self.n_usable else ""))
        if self.lengths:
            lengths = sorted(self.lengths)
            lines.append(f"  token lengths (tokenizer of base_model, prompt_template {self.template}): min "
                         f"{lengths[0]}, median {statistics.median(lengths):g}, max {lengths[-1]}")
            over = self.n_over
            lines.append(f"    {over} of {len(lengths)} longer than max_seq_length {self.max_seq_length}"
                         + (": truncated to it (or skipped when no answer token is left)" if over else ""))
        if self.n_usable:
            units = "packed sequence(s)" if self.packing else "sample(s)"
            lines.append(f"  training: {self.n_train} {units}, {self.n_val} validation {units}")
            lines.append(f"  steps per epoch: {self.steps_per_epoch} optimizer step(s) (batch_size {self.batch_size}, "
                         f"gradient_accumulation_steps {self.gradient_accumulation_steps})")
            lines.append(f"  training length: {self.total_steps} optimizer steps"
                         + (f" ({self.epochs} epochs)" if self.epochs else " (max_train_steps)"))
        for title, entries in ((f"skipped ({len(self.skipped)})", self.skipped),
                               (f"truncated to max_seq_length ({len(self.truncated)})", self.truncated),
                               ("notes", self.notes)):
            if entries:
                lines += ["", title + ":"] + [f"  - {e}" for e in entries[:MAX_LISTED]]
                if len(entries) > MAX_LISTED:
                    lines.append(f"  ... and {len(entries) - MAX_LISTED} more")
        if self.first_rendered:
            text = self.first_rendered
            if len(text) > MAX_RENDER_CHARS:
                text = text[:MAX_RENDER_CHARS] + f" ... ({len(self.first_rendered)} characters)"
            lines += ["", f"first sample ({self.first_where}) as prompt_template {self.template} renders it:"]
            lines += ["  | " + ln for ln in text.split("\n")]
            lines.append("trained on (the rest is context, its labels are -100):")
            for part in self.first_trained:
                lines += ["  | " + ln for ln in part.split("\n")]
        lines.append("")
        lines.append("UNUSABLE: " + self.error if self.error else "OK: the dataset is usable")
        return "\n".join(lines)


def _exts(paths: list[str]) -> list[str]:
    return sorted({Path(p).suffix or Path(p).name for p in paths})


def build_text_report(cfg, tokenizer=None) -> TextReport:
    """The report; `tokenizer` defaults to the one of base_model, loaded as training loads it."""
    report = TextReport(where=str(cfg.train_data_dir or "(train_data_dir not set)"), template=cfg.prompt_template,
                        max_seq_length=int(cfg.max_seq_length), packing=bool(cfg.packing),
                        batch_size=int(cfg.batch_size),
                        gradient_accumulation_steps=int(cfg.gradient_accumulation_steps))
    if not cfg.train_data_dir:
        report.error = f"train_data_dir is not set (a folder or one file of {FORMATS_HELP})"
        return report
    if tokenizer is None:
        if not cfg.base_model:
            return _files_only(cfg, report, "base_model is not set: token lengths and the template's "
                                                   "rendering need its tokenizer")
        from .model import load_tokenizer

        try:
            tokenizer = load_tokenizer(cfg.base_model)
        except ConfigError as e:
            return _files_only(cfg, report, str(e))
    try:
        data = read_dataset(cfg, tokenizer)
    except ConfigError as e:  # a missing folder, an unknown template, chat data with prompt_template none
        return _files_only(cfg, report, str(e))

    per_file = Counter(s.file for s in data.samples)
    files = set(per_file) | {i.file for i in data.issues}
    report.files = sorted(((f, per_file.get(f, 0)) for f in files))
    report.ignored_files = [str(p) for p in data.ignored_files]
    report.kinds = dict(Counter(s.kind for s in data.samples))
    report.n_read = len(data.samples)
    report.n_usable = data.n_samples
    report.skipped = [str(i) for i in data.issues if i.skipped]
    report.truncated = [str(i) for i in data.issues if not i.skipped]
    report.lengths = list(data.lengths)
    report.n_train, report.n_val = len(data.train), len(data.val)
    report.steps_per_epoch = steps_per_epoch(len(data.train), cfg.batch_size, cfg.gradient_accumulation_steps) \
        if data.train else 0
    if cfg.max_train_steps:
        report.total_steps = int(cfg.max_train_steps)
    else:
        report.epochs = int(cfg.epochs)
        report.total_steps = report.epochs * report.steps_per_epoch
    note = template_note(cfg.prompt_template, tokenizer)
    if note:
        report.notes.append(note)
    _first_rendering(report, data.samples, Renderer(cfg.prompt_template, tokenizer))
    if not data.n_samples:
        report.error = no_samples_message(cfg, data.issues)
    return report


def _files_only(cfg, report: TextReport, why: str) -> TextReport:
    """What can be said from the files alone, and why the rest cannot (`why`, unless the files cannot be read)."""
    from .data import read_text_samples

    try:
        samples, issues, ignored = read_text_samples(cfg.train_data_dir)
    except ConfigError as e:
        report.error = str(e)
        return report
    per_file = Counter(s.file for s in samples)
    report.files = sorted((f, per_file.get(f, 0)) for f in set(per_file) | {i.file for i in issues})
    report.ignored_files = [str(p) for p in ignored]
    report.kinds = dict(Counter(s.kind for s in samples))
    report.n_read = len(samples)
    report.skipped = [str(i) for i in issues]
    report.error = why
    return report


def _first_rendering(report: TextReport, samples: list, renderer: Renderer) -> None:
    for sample in samples:
        try:
            rendered = renderer(sample)
        except (SampleError, ConfigError):
            continue
        report.first_where = sample.where
        report.first_rendered = rendered.text
        report.first_trained = [rendered.text[a:b] for a, b in rendered.spans]
        return


def run_text_check(cfg) -> int:
    """Prints the report; 0 when the dataset is usable, 1 when not."""
    report = build_text_report(cfg)
    print(report.format())
    return 0 if report.usable else 1
