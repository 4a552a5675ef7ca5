"""Resumable training state: one folder per checkpoint, written atomically.

A checkpoint folder holds what is needed to continue bit-exactly: trainable weights in fp32,
optimizer, scheduler, grad-scaler and RNG states, step/epoch/position in the data order, and the
config. It is written into a temporary folder and renamed, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError, TrainConfig
from ..fsutil import atomic_write_text, write_folder_atomically

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIM_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
CONFIG_FILE = "config.yaml"


def rng_state(generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: Optional[torch.Generator] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(folder: Path, *, weights: dict[str, torch.Tensor], optimizer, scheduler, scaler=None,
                    generator: Optional[torch.Generator] = None, progress: dict[str, Any], cfg: TrainConfig,
                    extra_files: Optional[dict[str, Any]] = None) -> Path:
    """extra_files: name -> callable(path) that writes an additional file (e.g. the kohya LoRA)."""
    def write(tmp: Path) -> None:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()},
                  str(tmp / WEIGHTS_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / OPTIM_FILE)
        torch.save(rng_state(generator), tmp / RNG_FILE)
        atomic_write_text(tmp / STATE_FILE, json.dumps(progress, indent=2))
        cfg.save_yaml(tmp / CONFIG_FILE)
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)

    return write_folder_atomically(Path(folder), write, replace=True)


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_FILE).is_file() and (Path(folder) / WEIGHTS_FILE).is_file()


def find_latest_checkpoint(output_dir: Path) -> Optional[Path]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for p in output_dir.glob("checkpoint-*"):
        if p.is_dir() and is_checkpoint(p):
            try:
                found.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                continue
    return max(found)[1] if found else None


def resolve_resume(value: Optional[str], output_dir: Path) -> Optional[Path]:
    if not value:
        return None
    if value == "latest":
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            raise ConfigError(f"resume_from_checkpoint: 'latest' but {output_dir} holds no checkpoint-* folder")
        return latest
    path = Path(value)
    if not is_checkpoint(path):
        latest = find_latest_checkpoint(path)  # a run's output_dir is accepted too
        if latest is not None:
            return latest
        raise ConfigError(f"resume_from_checkpoint: {value} is not a checkpoint folder (expected {STATE_FILE} and "
                          f"{WEIGHTS_FILE} inside, as written every save_steps)")
    return path


def load_checkpoint(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    return {
        "weights": load_file(str(folder / WEIGHTS_FILE)),
        "optim": torch.load(folder / OPTIM_FILE, map_location="cpu", weights_only=False),
        "rng": torch.load(folder / RNG_FILE, map_location="cpu", weights_only=False),
        "progress": json.loads((folder / STATE_FILE).read_text()),
    }


def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    if keep <= 0:
        return []
    found = sorted((int(p.name.split("-", 1)[1]), p) for p in Path(output_dir).glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-", 1)[1].isdigit())
    removed = []
    for _, p in found[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
