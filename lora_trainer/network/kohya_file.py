"""Writing and reading kohya-style LoRA files: tensors, `ss_*` / `modelspec.*` metadata, hashes.

Files are written to a temporary name and renamed (never half a file), and an existing file is never
replaced unless asked: the next free numbered name is used instead, and the caller is told which.
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import TrainConfig
from ..fsutil import atomic_write_bytes, free_path  # noqa: F401  (free_path re-exported)
from ..models.base import BaseModel
from .base import network_metadata

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def tensor_data_hash(blob: bytes) -> str:
    """sshs_model_hash: SHA-256 of the tensor data only (after the 8-byte length and the JSON header)."""
    n = struct.unpack("<Q", blob[:8])[0]
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def file_tensor_hash(path: Path) -> str:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        fh.seek(8 + n)
        h = hashlib.sha256()
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def modelspec_arch(family: str, v_prediction: bool) -> str:
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base/lora"
    if family == "sd2":
        return "stable-diffusion-v2-768-v/lora" if v_prediction else "stable-diffusion-v2-512/lora"
    return "stable-diffusion-v1/lora"


def training_metadata(cfg: TrainConfig, model: BaseModel, *, session_id: str, started_at: float,
                      num_images: int, num_samples: int, epoch: int, step: int, max_steps: int,
                      tag_frequency: Optional[dict] = None, dataset_dirs: Optional[dict] = None,
                      reg_dataset_dirs: Optional[dict] = None, bucket_info: Optional[dict] = None,
                      num_epochs: Optional[int] = None, batches_per_epoch: Optional[int] = None,
                      num_processes: int = 1) -> dict[str, str]:
    """Every value a string (safetensors metadata); names as kohya writes them."""
    w, h = cfg.resolution_wh
    network_module, network_args = network_metadata(cfg)
    meta: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": time.time(),
        "ss_output_name": cfg.name,
        "ss_base_model_version": model.base_model_version,
        "ss_v2": model.family == "sd2",
        "ss_sd_model_name": Path(model.path).name if model.path else model.name,  # kohya: the file's name
        "ss_sd_model_hash": (model.model_hash or "")[:8] if model.model_hash else "",
        "ss_new_sd_model_hash": model.model_hash or "",
        "ss_network_module": network_module,
        "ss_network_dim": cfg.lora_rank,
        "ss_network_alpha": cfg.effective_alpha,
        "ss_network_dropout": cfg.lora_dropout,
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate,
        "ss_text_encoder_lr": (cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate)
        if cfg.train_text_encoder else 0,
        "ss_num_train_images": num_samples,
        "ss_num_reg_images": sum(d.get("img_count", 0) for d in (reg_dataset_dirs or {}).values()),
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": num_epochs if num_epochs is not None else cfg.epochs,
        "ss_epoch": epoch,
        "ss_steps": step,
        "ss_max_train_steps": max_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_optimizer": cfg.optimizer,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": False,
        "ss_fp8_base": str(getattr(model, "base_storage", "")).startswith("float8"),  # kohya's key
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_total_batch_size": cfg.batch_size * num_processes * cfg.gradient_accumulation_steps,
        "ss_num_processes": num_processes,
        "ss_resolution": f"({w}, {h})",
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_bucket_info": json.dumps(bucket_info) if bucket_info else None,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_noise_offset": cfg.noise_offset or None,
        "ss_clip_skip": cfg.clip_skip,
        "ss_seed": cfg.seed,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_flip_aug": cfg.flip_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_cache_latents": cfg.cache_latents,
        "ss_prior_loss_weight": cfg.reg_weight,
        "ss_training_comment": "trained with lora-trainer",
        "ss_tag_frequency": json.dumps(tag_frequency) if tag_frequency else None,
        "ss_dataset_dirs": json.dumps(dataset_dirs) if dataset_dirs else None,
        "ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs) if reg_dataset_dirs else None,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": getattr(model, "modelspec_architecture", None)
        or modelspec_arch(model.family, model.v_prediction),
        "modelspec.implementation": getattr(model, "modelspec_implementation", None)
        or "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": cfg.name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": getattr(model, "modelspec_prediction_type", None)
        or ("v" if model.v_prediction else "epsilon"),
    }
    if hasattr(model, "extra_metadata"):  # a family's own settings (FLUX.1: T5 length, guidance, timesteps)
        meta.update(model.extra_metadata(cfg))
    return {k: ("True" if v is True else "False" if v is False else str(v)) for k, v in meta.items() if v is not None}


def new_session_id() -> str:
    return str(uuid.uuid4().int % (2 ** 31))


def save_lora(path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str], precision: str = "fp16",
              overwrite: bool = False) -> Path:
    """Writes the LoRA file atomically and returns where it went (a numbered name if `path` was taken)."""
    from safetensors.torch import save

    dtype = DTYPES[precision]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sorted(weights.items())}
    # The tensor bytes do not depend on the metadata, so hash a metadata-free serialisation first.
    data_hash = tensor_data_hash(save(tensors))
    meta = dict(metadata, sshs_model_hash=data_hash)
    blob = save(tensors, metadata=meta)
    target = free_path(Path(path), overwrite)
    atomic_write_bytes(target, blob)
    return target


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    return load_file(str(path)), metadata


def write_sidecar_json(lora_path: Path, activation_text: str, preferred_weight: float, sd_version: str) -> Path:
    """`<name>.json` beside the LoRA, read by the WebUIs' LoRA card."""
    path = Path(lora_path).with_suffix(".json")
    data = {"description": "", "activation text": activation_text, "preferred weight": preferred_weight,
            "sd version": sd_version, "notes": "trained with lora-trainer"}
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())
    return path
