"""FLUX.1 starting points per GPU memory tier and goal (presets.preset(..., family="flux")).

What the Flux LoRA community starts from (kohya's flux_train_network examples, the common character/style
guides): rank 16 with alpha 16, learning rate 1e-4 with (8-bit) AdamW, batch 1, gradient checkpointing always
(without it the 12B transformer's activations alone are 20+ GiB at 512 px: bench/bench_flux_memory.py), only the
transformer trained (T5 cannot be, CLIP rarely is), dev trained at guidance 1.0 with logit-normal (sigmoid)
timesteps, samples at guidance 3.5 over 20 steps. The transformer is stored in fp8 (fp8_base) on every GPU tier:
in bf16 it is 22 GiB, and kohya notes that bf16 + checkpointing at 1024 px needs more than 26 GB even with the
text encoders' outputs cached. 1024 px from 24 GB, 512 px below; below 16 GB the last transformer blocks' weights
stay in CPU memory (blocks_to_swap, kohya's way for 12 GB and less: slower steps, the same LoRA). The counts are
the planner's (bench/bench_flux_memory.py): 10 GB and 6 GB cards keep at least half a GiB free (18 is also
kohya's own default when swapping). nf4_base is the other way
down (a quarter of bf16, no swapping, slightly less faithful weights); the planner names it when swapping is
not enough.
"""
from __future__ import annotations

from typing import Any


STEPS = {"style": 2000, "character": 1500, "concept": 1000}

# resolution, optimizer and fp8 storage of the transformer per tier (the rest is the same on every tier)
TIERS = {
    "6-8 GB": dict(resolution=512, fp8_base=True, blocks_to_swap=30, cache_latents_to_disk=True),
    "10-12 GB": dict(resolution=512, fp8_base=True, blocks_to_swap=18, cache_latents_to_disk=True),
    "16 GB": dict(resolution=512, fp8_base=True, cache_latents_to_disk=True),
    "24 GB+": dict(resolution=1024, fp8_base=True),
    "CPU / test": dict(resolution=256, fp8_base=False, mixed_precision="no", optimizer="adamw", max_train_steps=50),
}


def flux_preset(tier: str, goal: str) -> dict[str, Any]:
    from .presets import bucket_range

    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    values: dict[str, Any] = dict(
        lora_rank=16, lora_alpha=16, learning_rate=1e-4, max_train_steps=STEPS[goal], optimizer="adamw8bit",
        batch_size=1, gradient_accumulation_steps=1, gradient_checkpointing=True, mixed_precision="bf16",
        train_text_encoder=False, cache_latents=True, cache_latents_to_disk=False,
        guidance_scale=1.0, timestep_sampling="sigmoid", sigmoid_scale=1.0, min_snr_gamma=None, noise_offset=0.0,
        shuffle_caption=False, keep_tokens=0, caption_dropout_rate=0.0,  # T5 reads sentences: keep them whole
        sample_cfg_scale=3.5, sample_steps=20)
    values.update(TIERS[tier])
    values.update(bucket_range(values["resolution"]))
    return values
