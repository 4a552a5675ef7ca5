"""FLUX.1 LoRA targets and their kohya names (BFL's module paths: lora_unet_double_blocks_0_img_attn_qkv, ...).

The transformer is trained in diffusers' layout. Modules that BFL fuses (q, k, v; a single block's q, k, v and
MLP input) get one LoRA each, named after the diffusers module, and carry the fused file stem they are written
under (network/fused.py). Text encoder: CLIP-L only, as `lora_te1_...` (T5 is not trained, as in kohya).
"""
from __future__ import annotations

from ..models.flux.bfl_names import block_modules
from .targets import Target, text_encoder_targets


def _stem(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def flux_transformer_targets(transformer) -> list[Target]:
    cfg = transformer.config
    out = []
    for m in block_modules(cfg.num_layers, cfg.num_single_layers):
        if len(m.parts) == 1:
            out.append(Target("unet", m.parts[0], _stem(m.bfl), False))
        else:
            out += [Target("unet", p, _stem(p), False, fused=_stem(m.bfl)) for p in m.parts]
    return out


def flux_targets(model, train_unet: bool, train_text_encoder: bool, conv_lora: bool, clip_skip: int = 1
                 ) -> dict[str, list[Target]]:
    targets: dict[str, list[Target]] = {}
    if train_unet:
        targets["unet"] = flux_transformer_targets(model.transformer)
    if train_text_encoder:
        clip = model.text_encoders[0]
        # the pooled output comes from the last layer: every layer reaches the transformer
        targets["te1"] = text_encoder_targets(clip, "lora_te1", "te1", clip.config.num_hidden_layers)
    return targets
