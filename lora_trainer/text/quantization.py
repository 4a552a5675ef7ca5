"""QLoRA: the base model loaded in 4 bits (nf4, double quantization, bf16 compute) or 8 bits through
bitsandbytes, the LoRA weights trained in fp32 on top (load_in_4bit / load_in_8bit, text-generation only).

bitsandbytes quantizes on CUDA GPUs. Everything that can fail is checked by `check_quantization` before the
tokenizer or the model loads, with a message that says what to do instead.
"""
from __future__ import annotations

import importlib.util
import inspect

import torch

from ..config import ConfigError, TrainConfig


def quantization_bits(cfg: TrainConfig) -> int:
    return 4 if cfg.load_in_4bit else 8 if cfg.load_in_8bit else 0


def check_quantization(cfg: TrainConfig, device: torch.device) -> None:
    bits = quantization_bits(cfg)
    if not bits:
        return
    key = f"load_in_{bits}bit"
    if device.type != "cuda" or not torch.cuda.is_available():
        where = "torch sees no CUDA GPU here" if not torch.cuda.is_available() else f"this run is on {device}"
        raise ConfigError(f"{key}: quantized (QLoRA) training needs a CUDA GPU and {where}. Remove {key} to train "
                          f"the unquantized model (on this device it needs the full model's memory), or run on a "
                          f"machine with an NVIDIA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        from ..keep_torch import CONSTRAINTS_FILE, MAKE_CONSTRAINTS

        raise ConfigError(f"{key}: the bitsandbytes package is not installed; install it with your torch kept as "
                          f"it is: `{MAKE_CONSTRAINTS} && pip install -c {CONSTRAINTS_FILE} bitsandbytes` (CUDA "
                          f"builds for Linux and Windows), or remove {key}")


def bnb_options(cfg: TrainConfig) -> dict:
    """The BitsAndBytesConfig arguments: QLoRA's recipe for 4 bits (nf4, double quantization, bf16 compute)."""
    if cfg.load_in_4bit:
        return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": torch.bfloat16}
    if cfg.load_in_8bit:
        return {"load_in_8bit": True}
    return {}


def quantization_kwargs(cfg: TrainConfig, device: torch.device) -> dict:
    """from_pretrained keyword arguments for a quantized load (empty without quantization): the config, and the
    whole model on this process's GPU (each process of a data-parallel run holds its own quantized copy)."""
    options = bnb_options(cfg)
    if not options:
        return {}
    from transformers import BitsAndBytesConfig

    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"quantization_config": BitsAndBytesConfig(**options), "device_map": {"": index}}


def prepare_quantized(model, cfg: TrainConfig) -> None:
    """peft's preparation for k-bit training: frozen base, layer norms and head in fp32, inputs that carry
    gradients, and gradient checkpointing (non-reentrant where the versions allow) when asked for."""
    from peft import prepare_model_for_kbit_training

    kwargs = {"use_gradient_checkpointing": bool(cfg.gradient_checkpointing)}
    # non-reentrant only where both peft and transformers take the setting (transformers 4.30 does not: there
    # the reentrant kind needs inputs that carry gradients, which peft then arranges)
    if cfg.gradient_checkpointing and all("gradient_checkpointing_kwargs" in inspect.signature(f).parameters
                                          for f in (prepare_model_for_kbit_training,
                                                    model.gradient_checkpointing_enable)):
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    prepare_model_for_kbit_training(model, **kwargs)


def quantization_note(cfg: TrainConfig) -> str:
    if cfg.load_in_4bit:
        return ("QLoRA: base model in 4 bits (nf4, double quantization, bf16 compute); the adapter is a standard peft "
                "folder that loads on the unquantized base")
    return "base model in 8 bits (bitsandbytes); the adapter is a standard peft folder"
