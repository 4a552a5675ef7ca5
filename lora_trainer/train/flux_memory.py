"""FLUX.1's part of the memory plan: its frozen weights as the trainer holds them, and one transformer training
step traced on the meta device (memory_plan.py does the counting; this module says what a Flux step runs).

What a Flux run holds on its device (Trainer._place_model, FluxKind):
- the transformer in the training precision (bf16 under mixed precision), or its Linear weights at 1 byte each
  with fp8_base, ~0.52 with nf4_base (each layer upcast / dequantized as it runs: a per-layer temporary, not
  kept), less the blocks blocks_to_swap keeps in CPU memory (streamed in a layer at a time);
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


# bytes a frozen Linear weight takes in each storage the transformer can have (nf4: 4 bits plus, with double
# quantization, an 8-bit absmax per 64 weights and their fp32 scales per 256 absmax)
STORED_BYTES = {"float8_e4m3fn": 1.0, "float8_e5m2": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "fp4": 0.5 + 1 / 64}


def linear_weight_bytes(module, rate: Optional[float]) -> int:
    """Bytes of `module`'s Linear weights stored at `rate` bytes each (None: as they are)."""
    weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if rate is None:
        return sum(w.numel() * w.element_size() for w in weights)
    return int(sum(w.numel() for w in weights) * rate)


def flux_weights(model, cfg: TrainConfig, resident: bool = False) -> tuple[int, int]:
    """(bytes of the frozen weights on the device while training, bytes of the text encoders among them).

    The meta transformer is in its compute precision. Its Linear weights are counted as stored: fp8_base / nf4_base
    (our load), or a host's storage (model.base_storage); blocks_to_swap's blocks not at all (they stay in CPU
    memory, one layer at a time is copied in). Released text encoders are not counted: they encode before the
    transformer comes."""
    from ..models.flux.block_swap import swapped_blocks

    transformer = model.transformer
    storage = "float8_e4m3fn" if cfg.fp8_base else "nf4" if cfg.nf4_base else model.base_storage
    rate = STORED_BYTES.get(storage)
    denoiser = _nbytes(transformer) - linear_weight_bytes(transformer, None) + linear_weight_bytes(transformer, rate)
    swapped = swapped_blocks(transformer, cfg.blocks_to_swap)
    if swapped:  # off the device, but for the one layer being copied in at a time
        denoiser -= sum(linear_weight_bytes(block, rate) for block in swapped)
        denoiser += max(linear_weight_bytes(m, rate) for block in swapped for m in block.modules()
                        if isinstance(m, torch.nn.Linear))
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
