"""From text samples to tokenized training units: templates, truncation, validation split, packing,
deterministic batch order and padding."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

from ..config import ConfigError, TrainConfig
from .data import FORMATS_HELP, DataIssue, TextSample, read_text_samples
from .templates import IGNORE_INDEX, Renderer, SampleError, Tokenized, render_and_tokenize


@dataclass
class TextDataset:
    train: list  # list[Tokenized], packed when cfg.packing
    val: list
    issues: list = field(default_factory=list)  # list[DataIssue]
    n_samples: int = 0  # samples read and kept (before packing)
    n_files: int = 0
    ignored_files: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # list[TextSample]: every sample read, kept or not
    lengths: list = field(default_factory=list)  # token length of every sample the template rendered, untruncated


def tokenize_samples(samples: list[TextSample], tokenizer, template: str, max_seq_length: int,
                     issues: list, lengths: Optional[list] = None) -> list[Tokenized]:
    """Renders and tokenizes; over-long samples are truncated to max_seq_length (with an issue naming the file and
    line); samples that have no trained token left, or that the template rejects, are skipped. `lengths`, when
    given, receives the untruncated token length of every sample the template rendered."""
    renderer = Renderer(template, tokenizer)
    out = []
    for s in samples:
        try:
            tok = render_and_tokenize(s, renderer, tokenizer)
        except SampleError as e:
            issues.append(DataIssue(s.file, s.line, f"{e}; skipped"))
            continue
        n = len(tok.input_ids)
        if lengths is not None:
            lengths.append(n)
        if n > max_seq_length:
            tok.input_ids, tok.labels = tok.input_ids[:max_seq_length], tok.labels[:max_seq_length]
            if tok.n_targets == 0:
                issues.append(DataIssue(s.file, s.line, f"{n} tokens; after truncation to max_seq_length "
                                                        f"{max_seq_length} no answer token is left; skipped"))
                continue
            issues.append(DataIssue(s.file, s.line, f"{n} tokens, truncated to max_seq_length {max_seq_length}",
                                    skipped=False))
        if tok.n_targets == 0:
            issues.append(DataIssue(s.file, s.line, "no token to learn after tokenization; skipped"))
            continue
        out.append(tok)
    return out


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split: (train, val). At least one sample is held out when fraction > 0."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    idx = list(range(len(items)))
    random.Random(f"val-split-{seed}").shuffle(idx)
    val_idx = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


def pack(items: list[Tokenized], max_seq_length: int) -> list[Tokenized]:
    """Greedy packing in data order: samples are concatenated (each keeps its own bos/eos) until the next one
    would not fit into max_seq_length. Samples are never split."""
    packs: list[Tokenized] = []
    cur: Optional[Tokenized] = None
    for t in items:
        if cur is not None and len(cur.input_ids) + len(t.input_ids) <= max_seq_length:
            cur.input_ids = cur.input_ids + t.input_ids
            cur.labels = cur.labels + t.labels
        else:
            cur = Tokenized(list(t.input_ids), list(t.labels), t.file, t.line)
            packs.append(cur)
    return packs


def read_dataset(cfg: TrainConfig, tokenizer) -> TextDataset:
    """The dataset as training sees it (read, rendered, tokenized, truncated, split, packed), also when no sample
    is usable: `check` reports it, `build_dataset` refuses it."""
    cfg.require("train_data_dir")
    samples, issues, ignored = read_text_samples(cfg.train_data_dir)
    n_files = len({s.file for s in samples})
    lengths: list[int] = []
    toks = tokenize_samples(samples, tokenizer, cfg.prompt_template, cfg.max_seq_length, issues, lengths)
    train, val = split_validation(toks, cfg.validation_split, cfg.seed)
    if cfg.packing:
        train, val = pack(train, cfg.max_seq_length), pack(val, cfg.max_seq_length)
    return TextDataset(train=train, val=val, issues=issues, n_samples=len(toks), n_files=n_files,
                       ignored_files=ignored, samples=samples, lengths=lengths)


def no_samples_message(cfg: TrainConfig, issues: list) -> str:
    why = f" ({len(issues)} problems were reported: first: {issues[0]})" if issues else ""
    return f"train_data_dir: no usable training samples in {cfg.train_data_dir}{why}; accepted formats: {FORMATS_HELP}"


def build_dataset(cfg: TrainConfig, tokenizer) -> TextDataset:
    data = read_dataset(cfg, tokenizer)
    if not data.n_samples:
        raise ConfigError(no_samples_message(cfg, data.issues))
    return data


# ---- order and batches ------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the training units in an epoch depends only on seed and epoch (exact resume)."""
    idx = list(range(n))
    random.Random(f"text-order-{seed}-{epoch}").shuffle(idx)
    return idx


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = epoch_order(n, seed, epoch)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def micro_batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def steps_per_epoch(n: int, batch_size: int, accumulation: int) -> int:
    return math.ceil(micro_batches_per_epoch(n, batch_size) / accumulation)


def collate(items: list[Tokenized], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(t.labels, dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
