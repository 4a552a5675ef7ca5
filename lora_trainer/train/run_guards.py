"""What keeps a run from losing work or starting blind: an earlier run's checkpoints set aside, the LoRA to
continue from read before the dataset, free space judged before training, write errors and failures said in
one line. The loop in trainer.py calls these; none of them trains.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from ..config import ConfigError, TrainConfig
from ..fsutil import WriteError, describe_write_error
from ..network.kohya_file import read_lora
from ..network.lora import file_family
from . import state as ckpt
from .preflight import disk_space_note

# optimizer state kept per trained weight, in fp32 tensors
OPTIMIZER_SLOTS = {"adamw": 2, "adamw8bit": 1, "prodigy": 4, "lion": 1, "adafactor": 1}


def set_aside_earlier_run(cfg: TrainConfig, output_dir: Path, archive: bool, log: Callable[[str], None]) -> None:
    """A new run never writes into an earlier run's checkpoints (same numbers, mixed states): they are moved
    to previous-<time>/ (overwrite: true, or the tab's Start), or the run stops and says how to go on."""
    earlier = ckpt.find_latest_checkpoint(output_dir)
    if earlier is None:
        return
    if cfg.overwrite or archive:
        moved = ckpt.archive_checkpoints(output_dir, cfg.name)
        log(f"{output_dir} held an earlier run's checkpoints; moved them to {moved}")
        return
    raise ConfigError(f"output_dir: {output_dir} holds checkpoints of an earlier run (the latest is "
                      f"{earlier.name}). Continue it with resume_from_checkpoint: latest, start over with "
                      f"overwrite: true (its checkpoints are moved to a previous-* folder, not deleted), or "
                      f"choose another output_dir")


def read_init_lora(value: str, family: str) -> dict:
    """The LoRA to continue from, read and checked against the base model's family."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"init_lora_weights: {path} is a folder; point it at a LoRA .safetensors file")
    try:
        sd, meta = read_lora(path)
    except FileNotFoundError:
        raise ConfigError(f"init_lora_weights: {path} does not exist") from None
    except Exception as e:
        raise ConfigError(f"init_lora_weights: {path} is not a readable LoRA .safetensors file "
                          f"({type(e).__name__}); choose another file") from None
    fam = file_family(meta, {k.split(".")[0] for k in sd})
    if fam and fam != family:
        raise ConfigError(f"init_lora_weights: {path} was trained on {fam.upper()} but the base model is "
                          f"{family.upper()}")
    return sd


def disk_space_for_run(cfg: TrainConfig, output_dir: Path, num_params: int, total_steps: int,
                       epochs: int) -> Optional[str]:
    """A warning when the planned checkpoints and the LoRA may not fit on the disk."""
    saves = 0
    if cfg.save_steps:
        saves += max(0, (total_steps - 1) // cfg.save_steps)
    if cfg.save_every_n_epochs:
        saves += max(0, (epochs - 1) // cfg.save_every_n_epochs)
    if cfg.save_last_n_checkpoints:
        saves = min(saves, cfg.save_last_n_checkpoints + 1)  # the newest is written before the oldest goes
    saves = max(saves, 1)  # Stop always writes one
    return disk_space_note(output_dir, num_params, saves, optimizer_slots=OPTIMIZER_SLOTS.get(cfg.optimizer, 2),
                           save_bytes_per_param=4 if cfg.save_precision == "fp32" else 2)


def new_run_name(root: Path, name: str) -> str:
    """<name>-<time>, unique under root (two runs may start within one second)."""
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base, 2
    while (root / candidate).exists():
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def failure_message(e: BaseException) -> str:
    """Our own errors already read as a sentence; a library's needs its type to make sense."""
    from .distributed import PEER_FAILED, lost_peer

    if lost_peer(e):
        return PEER_FAILED
    if type(e).__name__ in ("ModelLoadError", "ArchitectureMismatch", "DatasetError", "ImageLoadError"):
        return str(e)
    return f"{type(e).__name__}: {e}"


def write_message(path: Path, error: OSError) -> str:
    return str(error) if isinstance(error, WriteError) else describe_write_error(path, error)
