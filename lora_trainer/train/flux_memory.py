"""FLUX.1's part of the memory plan: its frozen weights as the trainer holds them, and one transformer training
step traced on the meta device (memory_plan.py does the counting; this module says what a Flux step runs).

What a Flux run holds on its device (Trainer._place_model, FluxKind):
- the transformer in the training precision (bf16 under mixed precision), or 1 byte a parameter with fp8_base
  (stored in float8, each layer upcast as it runs: the upcast copy is a per-layer temporary, not kept);
- CLIP-L and T5-XXL only while they encode, when they are frozen and the captions can be listed: every caption
  and sample prompt is encoded before training (kinds.encode_all_text), with the transformer still on the CPU,
  and the encoders then leave the device. When the text encoder trains, when shuffle_caption /
  caption_tag_dropout_rate make captions vary, or on a host's model, they stay for the whole run: T5-XXL alone is
  ~9 GiB in bf16; `kept_text_encoders` in the estimate says how much of the weights that is;
- the VAE in fp32 (latent caching runs it before training; without caching, every step).
T5 runs without gradients and before the transformer, so its activations are gone when the transformer's peak
comes; only CLIP runs with gradients, when the text encoder trains.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import TrainConfig
from .memory_plan import CHECKPOINTED_TEXT, _nbytes, _trace

# the blocks diffusers' FluxTransformer2DModel runs through torch.utils.checkpoint when it is on
CHECKPOINTED_FLUX = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
PATCH = 16  # image pixels per packed token side: the VAE's 8x, then 2x2 latent patches


def text_encoders_released(cfg: TrainConfig, resident: bool) -> bool:
    """Whether the run encodes all text up front and moves the encoders off the device (our own load only)."""
    from ..data.captions import CaptionOptions
    from .flux_kind import FluxKind

    return not resident and FluxKind().releases_text_encoders(cfg) and not CaptionOptions.from_config(cfg).rearranges


def flux_weights(model, cfg: TrainConfig, resident: bool = False) -> tuple[int, int]:
    """(bytes of the frozen weights on the device while training, bytes of the text encoders among them). fp8_base
    (when the config has the key) stores the transformer at 1 byte a parameter; the meta transformer is then
    traced in bf16 as it runs. Released text encoders are not counted: they encode before the transformer comes."""
    transformer = model.transformer
    stored_fp8 = next(transformer.parameters()).element_size() == 1  # a host's float8 weights
    if cfg.fp8_base or stored_fp8:
        denoiser = sum(p.numel() for p in transformer.parameters())
    else:
        denoiser = _nbytes(transformer)
    if stored_fp8:
        transformer.to(torch.bfloat16)  # the meta copy computes as the real one does: in bf16, layer by layer
    text = 0 if text_encoders_released(cfg, resident) else _nbytes(*model.text_encoders)
    return denoiser + text + _nbytes(model.vae), text


def image_tokens(cfg: TrainConfig) -> int:
    """Packed latent tokens of one image at the run's resolution: (width / 16) * (height / 16)."""
    w, h = cfg.resolution_wh
    return (w // PATCH) * (h // PATCH)


def trace_flux_training(model, cfg: TrainConfig, autocast: Optional[torch.dtype]) -> tuple[int, int]:
    """(activations, kept weight copies) of one micro-batch: CLIP's pooled output (with gradients when the text
    encoder trains), then the transformer on the image tokens and the T5 sequence."""
    transformer = model.transformer
    clip = model.text_encoders[0]
    config = transformer.config
    b, tokens = cfg.batch_size, image_tokens(cfg)
    text = model.t5_length  # the run's t5xxl_max_token_length (FluxKind.configure) or the variant's default
    dtype = autocast or next(transformer.parameters()).dtype
    checkpointed = []
    if cfg.gradient_checkpointing:
        checkpointed.append(([transformer], CHECKPOINTED_FLUX))
        if cfg.train_text_encoder:
            checkpointed.append(([clip], CHECKPOINTED_TEXT))

    def empty(*shape):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def forward():
        with torch.enable_grad() if cfg.train_text_encoder else torch.no_grad():
            pooled = clip(torch.zeros(b, 77, dtype=torch.long, device="meta")).pooler_output
        kwargs = {"guidance": empty(b)} if config.guidance_embeds else {}
        transformer(hidden_states=empty(b, tokens, config.in_channels),
                    encoder_hidden_states=empty(b, text, config.joint_attention_dim),
                    pooled_projections=pooled.to(dtype), timestep=empty(b), img_ids=empty(tokens, 3),
                    txt_ids=empty(text, 3), return_dict=False, **kwargs)

    return _trace([transformer, *model.text_encoders], checkpointed, autocast, forward)
