"""Checks of a config's paths that run before anything expensive (model load, latent caching).

Each problem is one line that names the key, the file and what to do, so a run never trains for an hour
and then fails at the final save, or dumps a thousand-line traceback for a truncated download.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Optional

from ..config import ConfigError, TrainConfig
from ..fsutil import free_space, human_size

SAFETENSORS_KEYS = ("base_model", "vae", "init_lora_weights")


def check_config_paths(cfg: TrainConfig, *, base_model_given: bool = False) -> None:
    """Raises ConfigError for the first path that cannot work. base_model_given: the model comes from a host,
    so cfg.base_model is not read."""
    if cfg.task_type == "text-to-image":
        check_data_dir(cfg.train_data_dir, "train_data_dir", required=not cfg.metadata_path)
    elif cfg.train_data_dir and not Path(cfg.train_data_dir).expanduser().exists():
        raise ConfigError(f"train_data_dir: {cfg.train_data_dir} does not exist{_did_you_mean(cfg.train_data_dir)}")
    if cfg.metadata_path and not Path(cfg.metadata_path).expanduser().is_file():
        raise ConfigError(f"metadata_path: {cfg.metadata_path} is not a file{_did_you_mean(cfg.metadata_path)}")
    if cfg.reg_data_dir:
        check_data_dir(cfg.reg_data_dir, "reg_data_dir", required=True)
    check_output_dir(cfg.output_dir)
    for key in ("logging_dir", "cache_dir"):
        if getattr(cfg, key):
            check_output_dir(getattr(cfg, key), key)
    for key in SAFETENSORS_KEYS:
        value = getattr(cfg, key)
        if not value or (key == "base_model" and base_model_given):
            continue
        path = Path(value).expanduser()
        if path.is_file():
            check_weights_file(path, key)
        elif path.is_dir():
            continue  # diffusers folder / peft adapter folder: their loaders name what is missing
        elif key != "base_model" or _looks_like_path(value):
            raise ConfigError(f"{key}: {value} does not exist{_did_you_mean(value)}")


def check_data_dir(value: Optional[str], key: str, required: bool) -> None:
    if not value:
        if required:
            raise ConfigError(f"{key} is required: a folder of images (with .txt captions, a metadata.csv or N_name "
                              f"repeat folders)")
        return
    path = Path(value).expanduser()
    if path.is_file():
        raise ConfigError(f"{key}: {value} is a file; point it at the folder that holds the images")
    if not path.is_dir():
        raise ConfigError(f"{key}: {value} does not exist{_did_you_mean(value)}")


def check_output_dir(value: str, key: str = "output_dir") -> None:
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {value} is a file, not a folder; choose a folder (it is created if missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is a file, so {value} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {existing} is not writable; choose a folder you can write to")


def check_weights_file(path: Path, key: str) -> None:
    """A .safetensors file whose header is readable and complete (no tensor data is loaded)."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}: {path} is empty (an interrupted download?); download or copy it again")
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                if not list(fh.keys()):
                    raise ConfigError(f"{key}: {path} holds no tensors")
        except ConfigError:
            raise
        except Exception:
            raise ConfigError(f"{key}: {path} is not a complete .safetensors file (truncated or damaged); download "
                              f"or copy it again") from None
    elif suffix in (".ckpt", ".pt", ".pth", ".bin"):
        import zipfile

        if not zipfile.is_zipfile(path):
            raise ConfigError(f"{key}: {path} is not a complete checkpoint (not a zip archive, truncated or "
                              f"damaged); download it again, or use its .safetensors version")
    elif key != "vae":
        raise ConfigError(f"{key}: {path} is a {suffix or 'extension-less'} file; use a .safetensors file")


def _looks_like_path(value: str) -> bool:
    """base_model may also be a hub id (user/model)."""
    return not (value.count("/") == 1 and not value.startswith((".", "/", "~")) and "\\" not in value)


def _did_you_mean(value: str) -> str:
    path = Path(value).expanduser()
    parent = path.parent
    if not parent.is_dir():
        return f" ({parent} does not exist either)"
    try:
        names = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"; did you mean {parent / close[0]}?" if close else ""


# --- disk space ------------------------------------------------------------------------------------------
def disk_space_note(folder: Path, num_params: int, planned_checkpoints: int, optimizer_slots: int = 2,
                    save_bytes_per_param: int = 2) -> Optional[str]:
    """A warning when the free space under `folder` is below what the planned checkpoints and the LoRA need.

    A checkpoint holds the fp32 weights, the optimizer's moments (`optimizer_slots` fp32 tensors per weight)
    and a copy of the LoRA in the save precision."""
    per_checkpoint = num_params * (4 + 4 * optimizer_slots + save_bytes_per_param)
    need = per_checkpoint * planned_checkpoints + num_params * save_bytes_per_param
    free = free_space(folder)
    if free is None or free >= need * 1.1:
        return None
    return (f"only {human_size(free)} free under {folder}, but {planned_checkpoints} checkpoint(s) of {human_size(per_checkpoint)} "
            f"and the LoRA need about {human_size(need)}: free some space, lower save_steps or set "
            f"save_last_n_checkpoints, or the run may stop at a save")
