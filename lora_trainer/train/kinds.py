"""Model kinds: what the trainer asks of a model family (design.md, "model kind").

The trainer's loop, data, network, checkpoints and events are the same for every family; a kind supplies the
rest: loading, the latent shape, prompt conditioning, the noise / timestep draw, the objective (noising, target,
the model call, the loss), samples and the LoRA card's version name. `SDKind` is the Stable Diffusion UNet
families (sd1, sd2, sdxl); FLUX.1 is train/flux_kind.py.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from ..models.base import encode_prompts, sdxl_time_ids
from .loss import diffusion_loss, diffusion_target, sample_noise, sample_timesteps


TEXT_CACHE_SIZE = 4096
TEXT_CHUNK = 8  # captions per text-encoder call when a run encodes them all up front


def cached_text(captions: list[str], text_cache: OrderedDict, encode) -> list[tuple]:
    """Frozen text encoders: each distinct caption is encoded once (an LRU of a few thousand entries).
    encode(missing) -> (sequence embeddings, pooled or None) for those captions; returns (seq, pooled) slices of
    one caption each, in the order of `captions`."""
    missing = [c for c in dict.fromkeys(captions) if c not in text_cache]
    if missing:
        with torch.no_grad():
            seq, pooled = encode(missing)
        for j, c in enumerate(missing):
            text_cache[c] = (seq[j:j + 1], None if pooled is None else pooled[j:j + 1])
            if len(text_cache) > TEXT_CACHE_SIZE:
                text_cache.popitem(last=False)
    return [text_cache[c] for c in captions]


def encode_all_text(model, captions: Optional[list[str]], prompts: list[str], text, device: torch.device, stop,
                    log, phase) -> bool:
    """For a kind that releases its frozen text encoders: every caption the draws can give (the dataset's
    all_captions(); None when shuffling makes them too many) and every sample prompt goes through text() (the
    run's cache) now, then the encoders move to the CPU for the rest of the run. Returns whether they did."""
    texts = None if captions is None else list(dict.fromkeys(captions + prompts))
    if texts is None or len(texts) > TEXT_CACHE_SIZE:
        why = ("captions change from draw to draw (shuffle_caption / caption_tag_dropout_rate)" if texts is None
               else f"{len(texts)} distinct captions are more than the cache holds ({TEXT_CACHE_SIZE})")
        log(f"the text encoders stay on the {device.type} for the whole run: {why}")
        return False
    phase(f"encoding {len(texts)} captions and sample prompts")
    for start in range(0, len(texts), TEXT_CHUNK):
        stop.check()
        text(texts[start:start + TEXT_CHUNK])
    size = sum(p.numel() * p.element_size() for te in model.text_encoders for p in te.parameters())
    for te in model.text_encoders:
        te.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"{len(texts)} captions and sample prompts encoded; the text encoders ({size / 2 ** 30:.1f} GiB) moved to "
        f"the CPU for the rest of the run")
    return True


class SDKind:
    """SD1, SD2, SDXL: epsilon / v objective on a discrete DDPM schedule, CLIP conditioning in 75-token chunks."""

    name = "sd"
    card_versions = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}

    def load(self, cfg, log, dtype: Optional[torch.dtype], device: Optional[torch.device] = None):
        from ..config import FLUX_OWN_LOAD, ConfigError
        from ..models.loader import load_base_model

        for key, off in FLUX_OWN_LOAD.items():
            if getattr(cfg, key):
                raise ConfigError(f"{key} is for a FLUX.1 transformer; this is a Stable Diffusion model: set {key}: "
                                  f"{str(off).lower()} (or train a FLUX.1 model)")
        return load_base_model(cfg.base_model, cfg.model_family, cfg.v_parameterization, cfg.vae, log_fn=log,
                               dtype=dtype)

    def card_version(self, model) -> str:
        return self.card_versions[model.family]

    def releases_text_encoders(self, cfg) -> bool:
        """SD's text encoders stay (they are small, and samples encode their negative prompts)."""
        return False

    def configure(self, model, cfg) -> None:
        """Settings of the run that the loaded model carries (none for SD)."""

    def latent_shape(self, model, bucket) -> tuple[int, int, int]:
        factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        return model.unet.config.in_channels, bucket[1] // factor, bucket[0] // factor

    def draw(self, model, cfg, shape: tuple, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise of `shape` and one timestep per sample, from the CPU generator (noise first: resumable runs
        depend on the order)."""
        noise = sample_noise(shape, generator, cfg.noise_offset)
        timesteps = sample_timesteps(shape[0], model.noise_scheduler.config.num_train_timesteps, generator, "cpu")
        return noise, timesteps

    def loss(self, model, cfg, latents, noise, timesteps, captions, meta, weights, text, autocast) -> torch.Tensor:
        """The batch's loss. text(captions): the conditioning (through the trainer's cache); autocast(): the
        run's mixed-precision context, around the text encoders and the model call."""
        device = latents.device
        noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(model.noise_scheduler, latents, noise, timesteps)
        with autocast():
            embeds, pooled = text(captions)
            kwargs = {}
            if model.family == "sdxl":
                time_ids = torch.cat([sdxl_time_ids(m["original_size"], m["crop_top_left"], m["target_size"],
                                                    device, torch.float32) for m in meta])
                kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
            pred = model.unet(noisy, timesteps, encoder_hidden_states=embeds, **kwargs).sample
        return diffusion_loss(pred, target, timesteps, model.noise_scheduler, cfg.min_snr_gamma, weights)

    def encode_text(self, model, cfg, captions: list[str], text_cache: OrderedDict, log):
        if cfg.train_text_encoder:
            embeds, pooled, _ = encode_prompts(model, captions, cfg.clip_skip, cfg.max_token_length)
            return embeds, pooled
        def encode(missing):
            embeds, pooled, truncated = encode_prompts(model, missing, cfg.clip_skip, cfg.max_token_length)
            if truncated:
                log(f"{truncated} caption(s) longer than {cfg.max_token_length} tokens were truncated")
            return embeds, pooled

        parts = cached_text(captions, text_cache, encode)
        width = max(p[0].shape[1] for p in parts)
        if any(p[0].shape[1] != width for p in parts):
            # captions of different lengths in one batch: fill with empty chunks, as encode_prompts does
            empty = self.encode_text(model, cfg, [""], text_cache, log)[0][:, :77]
            parts = [(torch.cat([p[0]] + [empty] * ((width - p[0].shape[1]) // 77), dim=1), p[1]) for p in parts]
        embeds = torch.cat([p[0] for p in parts])
        pooled = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return embeds, pooled

    def save_samples(self, model, prompts, folder, tag, text=None, **kwargs):
        from .sampling import save_samples

        return save_samples(model, prompts, folder, tag, **kwargs)  # SD samples encode their own prompts


def kind_of(model) -> "SDKind":
    """The kind of a loaded model (or bundle a host gave)."""
    if getattr(model, "family", None) == "flux":
        from .flux_kind import FluxKind

        return FluxKind()
    return SDKind()


def kind_for_config(cfg) -> "SDKind":
    """The kind that loads cfg.base_model: FLUX.1 when asked for or when the weights are Flux's."""
    from ..models.flux.loader import detect_flux

    if cfg.model_family == "flux" or (cfg.model_family == "auto" and cfg.base_model
                                      and detect_flux(Path(cfg.base_model).expanduser())):
        from .flux_kind import FluxKind

        return FluxKind()
    return SDKind()
