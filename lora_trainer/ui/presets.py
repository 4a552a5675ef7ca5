"""Starting points for the Parameters section: a GPU memory tier and a goal fill the config fields.

Values are the usual community starting points (rank, learning rate, steps), adjusted for memory: smaller
tiers trade speed for memory (gradient checkpointing, 8-bit AdamW on CUDA, batch 1 with accumulation).
Every key is a TrainConfig key; the tab only fills the form, the person can change anything after.
"""
from __future__ import annotations

from typing import Any, Optional

TIERS = ("6-8 GB", "10-12 GB", "16 GB", "24 GB+", "CPU / test")
GOALS = ("style", "character", "concept")

# resolution per family (the size the base model was trained at)
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}

_GOAL = {
    # style: many varied images, moderate rank, the text encoder frozen (the look, not a word, is learned)
    "style": dict(lora_rank=32, lora_alpha=16, learning_rate=1e-4, max_train_steps=2000, train_text_encoder=False,
                  shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.05, min_snr_gamma=5.0,
                  noise_offset=0.05),
    # character: a trigger word tied to a subject; the text encoder helps it bind
    "character": dict(lora_rank=16, lora_alpha=8, learning_rate=1e-4, text_encoder_lr=5e-5, max_train_steps=1500,
                      train_text_encoder=True, shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.0,
                      min_snr_gamma=5.0, noise_offset=0.0),
    # concept / object: few images, lower rank, fewer steps to avoid overfitting
    "concept": dict(lora_rank=8, lora_alpha=8, learning_rate=1e-4, max_train_steps=1000, train_text_encoder=False,
                    shuffle_caption=False, keep_tokens=0, caption_dropout_rate=0.0, min_snr_gamma=5.0,
                    noise_offset=0.0),
}


# Typical dimensions of each network type (kept small where the type multiplies ranks: LoHa's update has rank
# up to rank^2, LoKr's large factor is full by default); the goal's learning rate and steps stay.
TYPE_PRESETS = {
    "lora": dict(conv_lora=False),
    "locon": dict(conv_lora=False, conv_rank=8, conv_alpha=4),
    "loha": dict(conv_lora=False, lora_rank=8, lora_alpha=4, conv_rank=4, conv_alpha=2, use_tucker=False),
    "lokr": dict(conv_lora=False, lora_rank=16, lora_alpha=16, lokr_factor=8, lokr_full_rank=True,
                 decompose_both=False, conv_rank=16, conv_alpha=16),
}


def tier_for(device_type: str, total_bytes: Optional[int]) -> str:
    """The tier a machine starts on: its device and how much memory that device has."""
    if device_type != "cuda" or not total_bytes:
        return "CPU / test" if device_type == "cpu" else "16 GB"  # mps / unknown: the middle ground
    gib = total_bytes / 2**30
    if gib < 9.5:
        return "6-8 GB"
    if gib < 14:
        return "10-12 GB"
    if gib < 20:
        return "16 GB"
    return "24 GB+"


def _tier(tier: str, family: str) -> dict[str, Any]:
    sdxl = family == "sdxl"
    if tier == "6-8 GB":
        return dict(batch_size=1, gradient_accumulation_steps=2, gradient_checkpointing=True, mixed_precision="fp16",
                    optimizer="adamw8bit", cache_latents=True, cache_latents_to_disk=True,
                    train_text_encoder_cap=not sdxl, resolution_cap=768 if sdxl else 512)
    if tier == "10-12 GB":
        return dict(batch_size=1 if sdxl else 2, gradient_accumulation_steps=2 if sdxl else 1,
                    gradient_checkpointing=True, mixed_precision="fp16", optimizer="adamw8bit", cache_latents=True,
                    cache_latents_to_disk=True, train_text_encoder_cap=not sdxl)
    if tier == "16 GB":
        return dict(batch_size=2 if sdxl else 4, gradient_accumulation_steps=1, gradient_checkpointing=sdxl,
                    mixed_precision="bf16", optimizer="adamw", cache_latents=True)
    if tier == "24 GB+":
        return dict(batch_size=4 if sdxl else 8, gradient_accumulation_steps=1, gradient_checkpointing=False,
                    mixed_precision="bf16", optimizer="adamw", cache_latents=True)
    if tier == "CPU / test":
        return dict(batch_size=1, gradient_accumulation_steps=1, gradient_checkpointing=False, mixed_precision="no",
                    optimizer="adamw", cache_latents=True, resolution_cap=256, steps_cap=50)
    raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")


def preset(tier: str, goal: str, family: Optional[str] = "sd1", network_type: str = "lora") -> dict[str, Any]:
    """Config values for a memory tier and a goal on a model family (sd1 / sd2 / sdxl / flux), with the typical
    dimensions of the network type."""
    if goal not in _GOAL:
        raise ValueError(f"unknown goal {goal!r}; choose one of {', '.join(GOALS)}")
    if network_type not in TYPE_PRESETS:
        raise ValueError(f"unknown network type {network_type!r}; choose one of {', '.join(TYPE_PRESETS)}")
    if family == "flux":
        from .flux_presets import flux_preset

        values = flux_preset(tier, goal)
        network_type = "lora"  # FLUX.1 trains plain LoRA only (README)
    else:
        values = _sd_preset(tier, goal, family if family in NATIVE_RESOLUTION else "sd1")
    if values.get("optimizer") == "adamw8bit" and not _has_bitsandbytes():
        values["optimizer"] = "adamw"  # 8-bit AdamW needs bitsandbytes (CUDA); plain AdamW still fits with the rest
    values.setdefault("text_encoder_lr", None)
    values.update(TYPE_PRESETS[network_type], network_type=network_type)
    return values


def _sd_preset(tier: str, goal: str, family: str) -> dict[str, Any]:
    values = dict(_GOAL[goal])
    t = _tier(tier, family)
    resolution = NATIVE_RESOLUTION[family]
    cap = t.pop("resolution_cap", None)
    if cap:
        resolution = min(resolution, cap)
    te_allowed = t.pop("train_text_encoder_cap", True)
    steps_cap = t.pop("steps_cap", None)
    values.update(t)
    if not te_allowed and values.get("train_text_encoder"):
        values["train_text_encoder"] = False
        values.pop("text_encoder_lr", None)
    if steps_cap:
        values["max_train_steps"] = min(values["max_train_steps"], steps_cap)
    values.update(bucket_range(resolution))
    return values


def bucket_range(resolution: int) -> dict[str, Any]:
    """Aspect-ratio buckets around a training resolution: sides from half to twice it."""
    values = dict(resolution=resolution, enable_bucket=True, min_bucket_reso=max(64, resolution // 2),
                  max_bucket_reso=resolution * 2, bucket_reso_steps=64 if resolution >= 256 else 32)
    values["min_bucket_reso"] = min(values["min_bucket_reso"], values["max_bucket_reso"])
    return values


def _has_bitsandbytes() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        return False
