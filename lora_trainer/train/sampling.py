"""Images from the in-memory model (with its LoRA) during and after training.

Uses diffusers' pipelines with our own prompt embeddings (models.base.encode_prompts), so the samples
are conditioned exactly as training was (clip skip, long prompts).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from ..models.base import BaseModel, encode_prompts


def load_prompts(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(p) for p in value if str(p).strip()]
    path = Path(str(value))
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.strip().startswith("#")]
    return [str(value)]


SAMPLER = "Euler"  # EulerDiscreteScheduler, what the WebUIs call Euler


def _pipeline(model: BaseModel):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler.from_config(model.noise_scheduler.config)
    if model.family == "sdxl":
        return StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoders[0],
                                         text_encoder_2=model.text_encoders[1], tokenizer=model.tokenizers[0],
                                         tokenizer_2=model.tokenizers[1], unet=model.unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                                   unet=model.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def render(model: BaseModel, prompt: str, *, seed: int, steps: int, cfg_scale: float, width: int, height: int,
           clip_skip: int = 1, negative_prompt: str = "", output_type: str = "pil", stop=None):
    """One image for `prompt`; deterministic for a seed. stop: a StopFlag checked at every denoising step
    (raises StopRequested), so a stop never waits for a long render."""
    device = next(model.unet.parameters()).device
    dtype = next(model.unet.parameters()).dtype
    pipe = _pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    embeds, pooled, _ = encode_prompts(model, [prompt], clip_skip)
    neg, neg_pooled, _ = encode_prompts(model, [negative_prompt], clip_skip)
    if neg.shape[1] != embeds.shape[1]:  # long prompt: repeat the empty chunk to the same length
        reps = embeds.shape[1] // 77
        neg = neg[:, :77].repeat(1, reps, 1)
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs = dict(prompt_embeds=embeds.to(dtype), negative_prompt_embeds=neg.to(dtype), num_inference_steps=steps,
                  guidance_scale=cfg_scale, width=width, height=height, generator=generator,
                  output_type=output_type)
    if stop is not None:
        def check_stop(_pipe, _i, _t, callback_kwargs):
            stop.check()
            return callback_kwargs

        kwargs["callback_on_step_end"] = check_stop
    if model.family == "sdxl":
        kwargs.update(pooled_prompt_embeds=pooled.to(dtype), negative_pooled_prompt_embeds=neg_pooled.to(dtype))
    was_training = model.unet.training
    model.unet.eval()
    try:
        result = pipe(**kwargs).images[0]
    finally:
        model.unet.train(was_training)
    del device
    return result


def save_samples(model: BaseModel, prompts: list[str], folder: Path, tag: str, *, seed: int, steps: int,
                 cfg_scale: float, width: int, height: int, clip_skip: int = 1, stop=None,
                 on_image: Optional[Callable[[int, int], None]] = None, render_fn=None) -> list[Path]:
    """on_image(i, n) is called before image i (1-based) of n is rendered. render_fn: another family's
    `render` (same arguments)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, prompt in enumerate(prompts):
        if on_image is not None:
            on_image(i + 1, len(prompts))
        image = (render_fn or render)(model, prompt, seed=seed + i, steps=steps, cfg_scale=cfg_scale, width=width,
                                      height=height, clip_skip=clip_skip, stop=stop)
        path = folder / f"{tag}_{i:02d}.png"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
        try:
            image.save(tmp)
            tmp.replace(path)
        finally:
            if tmp.exists():
                tmp.unlink()
        paths.append(path)
    return paths


def sample_size(cfg, default: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    w, h = default or cfg.resolution_wh
    return cfg.sample_width or w, cfg.sample_height or h
