"""Optimizer and learning-rate schedule from the config, shared by the image and text trainers."""
from __future__ import annotations

import importlib
from typing import Iterable

import torch

from ..config import ConfigError, TrainConfig

_OPTIONAL = {
    "adamw8bit": ("bitsandbytes", "pip install bitsandbytes (needs a CUDA GPU)"),
    "prodigy": ("prodigyopt", "pip install prodigyopt"),
    "lion": ("lion_pytorch", "pip install lion-pytorch"),
}


def _import_optional(name: str):
    module, how = _OPTIONAL[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"optimizer: {name!r} needs the package {module!r}, which is not installed; {how}, "
                          f"or use optimizer: adamw") from None


def make_optimizer(cfg: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """param_groups: [{"params": [...], "lr": ...}, ...] (already split by UNet / text encoder)."""
    args = dict(cfg.optimizer_args or {})
    args.setdefault("weight_decay", cfg.weight_decay)
    lr = cfg.learning_rate
    name = cfg.optimizer
    try:
        if name == "adamw":
            return torch.optim.AdamW(param_groups, lr=lr, **args)
        if name == "adamw8bit":
            bnb = _import_optional(name)
            return bnb.optim.AdamW8bit(param_groups, lr=lr, **args)
        if name == "prodigy":
            mod = _import_optional(name)
            return mod.Prodigy(param_groups, lr=lr, **args)
        if name == "lion":
            mod = _import_optional(name)
            return mod.Lion(param_groups, lr=lr, **args)
        if name == "adafactor":
            from transformers.optimization import Adafactor
            args.setdefault("relative_step", False)
            args.setdefault("scale_parameter", False)
            args.setdefault("warmup_init", False)
            return Adafactor(param_groups, lr=lr, **args)
    except TypeError as e:
        raise ConfigError(f"optimizer_args: {cfg.optimizer_args!r} do not fit optimizer {name!r}: {e}") from None
    raise ConfigError(f"optimizer: {name!r} is not supported")


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=max(total_steps, 1),
        num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power,
    )


def trainable(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.requires_grad]
