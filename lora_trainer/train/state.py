"""Resumable training state: one folder per checkpoint, written atomically.

A checkpoint folder holds what is needed to continue bit-exactly: trainable weights in fp32,
optimizer, scheduler, grad-scaler and RNG states, step/epoch/position in the data order, and the
config. It is written into a temporary folder and renamed, so a crash never leaves half a checkpoint.

Nothing in it is pickled (statefile.py): tensors are .safetensors, the rest JSON/YAML, so resuming from a
folder someone else made cannot run code. Folders of the earlier format (optimizer.pt / rng.pt) are read
with torch's weights-only loader, never with code execution.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import ConfigError, TrainConfig
from ..fsutil import atomic_write_text, write_folder_atomically
from ..safeload import weights_only_load
from .statefile import StateFormatError, load_state, save_state, write_safetensors

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIM_FILES = ("optimizer.json", "optimizer.safetensors")
RNG_FILES = ("rng.json", "rng.safetensors")


def rank_rng_files(rank: int) -> tuple[str, str]:
    """RNG state of process `rank` of a data-parallel run (rank 0's is RNG_FILES)."""
    return RNG_FILES if rank == 0 else (f"rng-rank{rank}.json", f"rng-rank{rank}.safetensors")
LEGACY_OPTIM_FILE = "optimizer.pt"   # written by lora-trainer before the pickle-free format
LEGACY_RNG_FILE = "rng.pt"
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


def set_rng_state(state: Optional[dict[str, Any]], generator: Optional[torch.Generator] = None,
                  fallback_seed: int = 0) -> None:
    """Restores RNG states; None (an old checkpoint whose RNG state could not be read safely) reseeds
    every generator from `fallback_seed` instead, so the continuation is deterministic though not exact."""
    if state is None:
        random.seed(fallback_seed)
        np.random.seed(fallback_seed % 2**32)
        torch.manual_seed(fallback_seed)
        if generator is not None:
            generator.manual_seed(fallback_seed)
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(folder: Path, *, weights: dict[str, torch.Tensor], optimizer, scheduler, scaler=None,
                    generator: Optional[torch.Generator] = None, progress: dict[str, Any], cfg: TrainConfig,
                    extra_files: Optional[dict[str, Any]] = None, rank_rngs: Optional[list] = None) -> Path:
    """extra_files: name -> callable(path) that writes an additional file (e.g. the kohya LoRA).
    rank_rngs: in a data-parallel run, every process's rng_state() (index = rank); the shared generator's
    state is added to each."""
    def write(tmp: Path) -> None:
        write_safetensors({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()},
                          tmp / WEIGHTS_FILE)
        save_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, *(tmp / f for f in OPTIM_FILES))
        save_state(rng_state(generator), *(tmp / f for f in RNG_FILES))
        for rank, state in enumerate(rank_rngs or []):
            if rank and state is not None:
                if generator is not None:
                    state = dict(state, generator=generator.get_state())
                save_state(state, *(tmp / f for f in rank_rng_files(rank)))
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


# Settings that decide the shape or set of the trained weights: a resume with any of them changed cannot load.
SHAPE_KEYS = ("task_type", "network_type", "lora_rank", "conv_lora", "conv_rank", "use_dora", "lokr_factor",
              "decompose_both", "lokr_full_rank", "use_tucker", "target_modules", "train_unet", "train_text_encoder")


def check_resume_compatible(folder: Path, cfg: TrainConfig) -> None:
    """Compares the checkpoint's saved config with this run's before anything loads; names what changed."""
    import yaml

    path = Path(folder) / CONFIG_FILE
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # no readable config: the weights' names and shapes are checked when they load
    if not isinstance(saved, dict):
        return
    changed = []
    for key in SHAPE_KEYS:
        if key not in saved:
            continue
        mine = getattr(cfg, key)
        theirs = saved[key]
        if key == "conv_rank" and not (cfg.trains_convs or saved.get("conv_lora")
                                       or saved.get("network_type", "lora") != "lora"):
            continue
        if key == "conv_rank":
            mine, theirs = cfg.effective_conv_rank, theirs or saved.get("lora_rank")
        if mine != theirs:
            changed.append(f"{key} {theirs!r} -> {mine!r}")
    if changed:
        raise ConfigError(f"resume_from_checkpoint: {folder} was trained with other settings: {'; '.join(changed)}. "
                          f"Set them back to resume, or start a new run (another output_name)")


def checkpoint_step(folder: Path) -> int:
    try:
        return int(Path(folder).name.split("-", 1)[1])
    except (IndexError, ValueError):
        return int(read_progress(folder).get("global_step", 0))


def read_progress(folder: Path) -> dict:
    data = json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a progress record")
    return data


def saved_config(folder: Path) -> TrainConfig:
    """The config a checkpoint was trained with (its config.yaml), for a one-click resume."""
    from ..config import load_yaml

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {CONFIG_FILE}; resume it with its settings entered by hand")
    return load_yaml(path)


def load_checkpoint(folder: Path, rank: int = 0) -> dict[str, Any]:
    """weights, optim, rng (None when an old-format RNG state could not be read safely), progress, notes.
    rank: the process of a data-parallel run whose RNG state is wanted (rank 0's when it has none saved)."""
    folder = Path(folder)
    notes: list[str] = []
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise ConfigError(f"resume_from_checkpoint: {folder / WEIGHTS_FILE} is damaged ({type(e).__name__}); "
                          f"resume from an earlier checkpoint-* folder") from None
    try:
        progress = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(progress, dict) or not isinstance(progress.get("global_step"), int):
            raise ValueError("no global_step")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"resume_from_checkpoint: {folder / STATE_FILE} is damaged ({type(e).__name__}); resume "
                          f"from an earlier checkpoint-* folder") from None
    if all((folder / f).is_file() for f in OPTIM_FILES):
        try:
            optim = load_state(*(folder / f for f in OPTIM_FILES))
            own = rank_rng_files(rank)
            rng = load_state(*(folder / f for f in (own if (folder / own[0]).is_file() else RNG_FILES)))
        except StateFormatError as e:
            raise ConfigError(f"resume_from_checkpoint: {folder}: {e}; resume from an earlier checkpoint-* "
                              f"folder") from None
    elif (folder / LEGACY_OPTIM_FILE).is_file():
        optim, rng = _load_legacy(folder, notes)
    else:
        raise ConfigError(f"resume_from_checkpoint: {folder} has no optimizer state ({OPTIM_FILES[0]}); it is "
                          f"incomplete, resume from another checkpoint-* folder")
    if not isinstance(optim, dict) or "optimizer" not in optim or "scheduler" not in optim:
        raise ConfigError(f"resume_from_checkpoint: {folder}: the optimizer state is incomplete")
    return {"weights": weights, "optim": optim, "rng": rng, "progress": progress, "notes": notes}


def _load_legacy(folder: Path, notes: list[str]):
    try:
        optim = weights_only_load(folder / LEGACY_OPTIM_FILE)
    except Exception as e:  # any unpickling refusal: the file holds more than tensors and plain values
        raise ConfigError(f"resume_from_checkpoint: {folder / LEGACY_OPTIM_FILE} is in the old pickle format and "
                          f"holds something other than tensors ({type(e).__name__}), so it is not loaded. Start "
                          f"the run again, or continue the LoRA with init_lora_weights: "
                          f"{folder}/<name>-step*.safetensors") from None
    rng = None
    try:
        rng = weights_only_load(folder / LEGACY_RNG_FILE)
    except Exception:
        notes.append(f"{folder.name} was written by an earlier lora-trainer whose RNG state cannot be read without "
                     f"unpickling code; the random generators are reseeded, so this continuation is not bit-exact")
    if rng is not None and not (isinstance(rng, dict) and "torch" in rng and "python" in rng):
        rng = None
    notes.append(f"{folder.name} is in the old checkpoint format; new checkpoints are written without pickle")
    return optim, rng


def archive_checkpoints(output_dir: Path, name: Optional[str] = None) -> Path:
    """Moves an earlier run's checkpoint-* folders (and, given its name, its final LoRA files) into
    output_dir/previous-<time>/: nothing is deleted, and the new run's files get the plain names."""
    import time

    output_dir = Path(output_dir)
    target = output_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    n = 2
    while target.exists():
        target = output_dir / f"{target.name.split('_')[0]}_{n}"
        n += 1
    target.mkdir(parents=True)
    for p in output_dir.glob("checkpoint-*"):
        if p.is_dir():
            os.replace(p, target / p.name)
    if name:
        for p in list(output_dir.glob(f"{name}.*")) + list(output_dir.glob(f"{name}_*.*")):
            if p.is_file() and p.suffix in (".safetensors", ".json", ".png"):
                os.replace(p, target / p.name)
    return target


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
