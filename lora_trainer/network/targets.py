"""Which modules get a LoRA (kohya's defaults) and the kohya key name of each.

UNet: every Linear and 1x1 Conv inside the transformer blocks (proj_in/out, attn1/attn2 q/k/v/out,
ff). LoCon adds the ResNet blocks' layers and the down/up-sampler convolutions. Text encoders: the
attention projections and MLP of every layer that contributes to the conditioning.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..models.ldm_names import canonical_clip_name, unet_name_mapper

_UNET_ATTN = re.compile(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\."
                        r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|"
                        r"ff\.net\.0\.proj|ff\.net\.2))$")
_UNET_CONV = re.compile(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(resnets\.\d+\.(conv1|conv2|conv_shortcut|"
                        r"time_emb_proj)|downsamplers\.0\.conv|upsamplers\.0\.conv)$")
_TE = re.compile(r"(text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


@dataclass(frozen=True)
class Target:
    component: str   # "unet", "te", "te1", "te2"
    module: str      # module path in our (diffusers / transformers) model
    kohya: str       # kohya key stem, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    conv3x3: bool    # gets conv_rank / conv_alpha
    fused: str = ""  # the file's stem when this module is one part of a fused module there (network/fused.py)


def _is_lora_able(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.Linear) or isinstance(m, torch.nn.Conv2d)


def unet_targets(unet, family: str, conv_lora: bool) -> list[Target]:
    to_ldm = unet_name_mapper(unet.config) if family == "sdxl" else None
    out = []
    for name, module in unet.named_modules():
        if not _is_lora_able(module):
            continue
        is_attn = bool(_UNET_ATTN.search(name))
        is_conv = bool(_UNET_CONV.search(name))
        if not (is_attn or (conv_lora and is_conv)):
            continue
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and not (is_attn or is_conv):
            continue
        kohya_path = to_ldm(name) if to_ldm else name  # SDXL keys use the original layout's names
        conv3x3 = isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)
        out.append(Target("unet", name, "lora_unet_" + kohya_path.replace(".", "_"), conv3x3))
    return out


def text_encoder_targets(text_encoder, prefix: str, component: str, used_layers: int) -> list[Target]:
    """used_layers: how many leading layers feed the conditioning (later ones get no gradient)."""
    out = []
    for name, module in text_encoder.named_modules():
        m = _TE.search(name)
        if not m or not isinstance(module, torch.nn.Linear):
            continue
        if int(m[2]) >= used_layers:
            continue
        # kohya names are those of transformers 4.x CLIPTextModel (text_model.encoder...)
        canonical = canonical_clip_name(name)
        out.append(Target(component, name, f"{prefix}_" + canonical.replace(".", "_"), False))
    return out


def used_text_layers(model, index: int, clip_skip: int) -> int:
    """Layers of text encoder `index` whose output reaches the UNet (see models.base.encode_prompts)."""
    te = model.text_encoders[index]
    n = te.config.num_hidden_layers
    if model.family == "sdxl":
        if index == 1:
            return n  # the pooled output comes from the last layer
        return n - clip_skip
    return n - (clip_skip - 1)


def all_targets(model, train_unet: bool, train_text_encoder: bool, conv_lora: bool, clip_skip: int = 1
                ) -> dict[str, list[Target]]:
    kind_targets = _kind_targets().get(model.family)
    if kind_targets is not None:
        return kind_targets(model, train_unet, train_text_encoder, conv_lora, clip_skip)
    targets: dict[str, list[Target]] = {}
    if train_unet:
        targets["unet"] = unet_targets(model.unet, model.family, conv_lora)
    if train_text_encoder:
        prefixes = model.te_prefixes
        for i, te in enumerate(model.text_encoders):
            component = "te" if len(prefixes) == 1 else f"te{i + 1}"
            targets[component] = text_encoder_targets(te, prefixes[i], component, used_text_layers(model, i, clip_skip))
    return targets


def _kind_targets() -> dict:
    """Families with targets of their own (each in its module, imported when used)."""
    from .flux_targets import flux_targets

    return {"flux": flux_targets}
