"""FLUX.1 as a model kind: rectified-flow objective on packed latents, T5 + CLIP conditioning, FluxPipeline samples."""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Optional

import torch

from ..config import ConfigError
from ..models.flux import objective as flow
from ..models.flux.model import encode_flux_prompts
from .kinds import cached_text
from .loss import diffusion_loss, sample_noise


class FluxKind:
    name = "flux"

    def load(self, cfg, log, dtype: Optional[torch.dtype], device: Optional[torch.device] = None):
        from ..models.flux.loader import load_flux

        if cfg.min_snr_gamma:
            raise ConfigError("min_snr_gamma weights a DDPM schedule; FLUX.1 trains on a flow schedule: set "
                              "min_snr_gamma: 0 (timestep_sampling shapes which noise levels are trained)")
        if cfg.nf4_base:
            check_nf4(device)  # before minutes of loading
        model = load_flux(cfg.base_model, cfg.flux_components, dtype, log)
        store_frozen_transformer(model, cfg, dtype or torch.float32, device, log)
        return model

    def configure(self, model, cfg) -> None:
        """T5 length: every caption and sample prompt is encoded to t5xxl_max_token_length tokens (the model's
        default, by variant, when unset), our own load or a host's model alike."""
        if cfg.t5xxl_max_token_length:
            model.t5_max_length = cfg.t5xxl_max_token_length

    def releases_text_encoders(self, cfg) -> bool:
        """Frozen, T5-XXL and CLIP-L are needed only for captions and sample prompts: encoded once before
        training, they leave the device (T5-XXL alone is ~9 GiB in bf16)."""
        return not cfg.train_text_encoder

    def card_version(self, model) -> str:
        return "Flux"  # Forge's LoRA card knows Flux; A1111 reads an unknown value as "guess from the file"

    def latent_shape(self, model, bucket) -> tuple[int, int, int]:
        factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        return model.vae.config.latent_channels, bucket[1] // factor, bucket[0] // factor

    def draw(self, model, cfg, shape: tuple, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and one sigma in (0, 1) per sample (the transformer's timestep input)."""
        noise = sample_noise(shape, generator, cfg.noise_offset)
        tokens = (shape[2] // 2) * (shape[3] // 2)
        sigmas = flow.sample_sigmas(shape[0], cfg.timestep_sampling, generator=generator,
                                    sigmoid_scale=cfg.sigmoid_scale, shift=cfg.discrete_flow_shift,
                                    image_seq_len=tokens)
        return noise, sigmas

    def loss(self, model, cfg, latents, noise, sigmas, captions, meta, weights, text, autocast) -> torch.Tensor:
        with autocast():
            seq, pooled = text(captions)
            pred, target = flow.predict(model.transformer, latents, noise, sigmas, seq, pooled,
                                        guidance=cfg.guidance_scale)
        return diffusion_loss(pred, target, sigmas, None, None, weights)  # plain MSE on the velocity

    def encode_text(self, model, cfg, captions: list[str], text_cache: OrderedDict, log):
        if cfg.train_text_encoder:
            return encode_flux_prompts(model, captions)
        parts = cached_text(captions, text_cache, lambda missing: encode_flux_prompts(model, missing))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def save_samples(self, model, prompts, folder, tag, text=None, **kwargs):
        """text(prompts) -> (T5 sequence, CLIP pooled): the run's cache (the encoders may have left the device)."""
        from functools import partial

        from .sampling import save_samples

        return save_samples(model, prompts, folder, tag, render_fn=partial(render_flux, text=text), **kwargs)


def check_nf4(device: Optional[torch.device]) -> None:
    """nf4_base needs bitsandbytes, and one that quantizes on this device: said before the model loads."""
    from ..models.low_precision import dequantize_nf4, quantize_nf4

    try:
        dequantize_nf4(quantize_nf4(torch.ones(64, 64), device))
    except RuntimeError as exc:
        raise ConfigError(f"nf4_base: {exc}") from None


def store_frozen_transformer(model, cfg, compute: torch.dtype, device: Optional[torch.device], log) -> None:
    """The frozen transformer as the config asks: fp8 or nf4 storage (each Linear cast / dequantized per call),
    then the last blocks_to_swap blocks' weights kept in CPU memory."""
    from ..models import low_precision as lp

    transformer = model.transformer
    if cfg.fp8_base or cfg.nf4_base:
        storage = "float8_e4m3fn" if cfg.fp8_base else "nf4"
        started = time.perf_counter()
        if cfg.fp8_base:
            count = lp.to_fp8(transformer, torch.float8_e4m3fn)
        else:  # quantized on the GPU when there is one: the CPU takes minutes for 12B weights
            count = lp.to_nf4(transformer, device if device is not None and device.type == "cuda" else None)
        model.compute_dtype, model.base_storage = compute, storage
        log(f"{'fp8_base' if cfg.fp8_base else 'nf4_base'}: {count} frozen transformer layers stored in {storage}, "
            f"computed in {str(compute).replace('torch.', '')} ({time.perf_counter() - started:.0f} s)")
    if cfg.blocks_to_swap:
        from ..models.flux.block_swap import swap_blocks

        blocks, size = swap_blocks(transformer, cfg.blocks_to_swap)
        log(f"blocks_to_swap: {cfg.blocks_to_swap}: the frozen weights of {blocks} transformer blocks "
            f"({size / 2 ** 30:.2f} GiB) stay in CPU memory and are copied to the GPU layer by layer as they run")


@torch.no_grad()
def render_flux(model, prompt: str, *, seed: int, steps: int, cfg_scale: float, width: int, height: int,
                stop=None, output_type: str = "pil", text=None, **_):
    """One image with FluxPipeline and our prompt embeddings (text([prompt]) when given); cfg_scale is dev's
    distilled guidance."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(transformer=model.transformer, vae=model.vae, text_encoder=model.text_encoders[0],
                        tokenizer=model.tokenizers[0], text_encoder_2=model.text_encoders[1],
                        tokenizer_2=model.tokenizers[1], scheduler=model.noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    seq, pooled = text([prompt]) if text is not None else encode_flux_prompts(model, [prompt])
    kwargs = {}
    if stop is not None:
        def check_stop(_pipe, _i, _t, callback_kwargs):
            stop.check()
            return callback_kwargs

        kwargs["callback_on_step_end"] = check_stop
    was_training = model.transformer.training
    model.transformer.eval()
    try:
        return pipe(prompt_embeds=seq, pooled_prompt_embeds=pooled, num_inference_steps=steps,
                    guidance_scale=cfg_scale, width=width, height=height, output_type=output_type,
                    generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]
    finally:
        model.transformer.train(was_training)
