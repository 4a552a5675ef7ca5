"""Names in the original (LDM/SGM) checkpoint layout for diffusers modules.

Needed in three places: SDXL LoRA keys use the original UNet names (kohya-format.md), original-format
single files are written for tests and the demo, and OpenCLIP text encoders (SD2, SDXL's second) are
mapped onto transformers' CLIPTextModel without copying. The layout facts come from the SD/SGM
checkpoints; the code is ours. `tests/test_ldm_names.py` checks it against diffusers' own converter.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
# The OpenCLIP encoders already in transformers' layout (separate q/k/v), as Forge holds them in memory:
# SD2's under the SD1 prefix (told apart by its width), SDXL's second beside the first.
SDXL_TE2_HF_PREFIX = "conditioner.embedders.1.transformer."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_module_to_ldm(name: str, layers_per_block: int, up_block_has_attention: list[bool]) -> str:
    """diffusers UNet2DConditionModel module path -> original UNet module path (without prefix)."""
    L = layers_per_block
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if name in fixed:
        return fixed[name]

    def resnet_tail(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return _UNET_RESNET.get(head, head) + (("." + tail) if tail else "")

    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = f"input_blocks.{1 + i * (L + 1) + j}"
        if kind == "resnets":
            return f"{base}.0" + ("." + resnet_tail(rest) if rest else "")
        return f"{base}.1" + ("." + rest if rest else "")
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", name)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * j}" + ("." + resnet_tail(rest) if rest else "")
        return "middle_block.1" + ("." + rest if rest else "")
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = f"output_blocks.{i * (L + 1) + j}"
        if kind == "resnets":
            return f"{base}.0" + ("." + resnet_tail(rest) if rest else "")
        return f"{base}.1" + ("." + rest if rest else "")
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", name)
    if m:
        i = int(m[1])
        return f"output_blocks.{i * (L + 1) + L}.{2 if up_block_has_attention[i] else 1}.conv"
    raise KeyError(f"no original-layout name for UNet module {name!r}")


def unet_name_mapper(unet_config) -> "callable":
    layers = unet_config["layers_per_block"] if isinstance(unet_config, dict) else unet_config.layers_per_block
    ups = unet_config["up_block_types"] if isinstance(unet_config, dict) else unet_config.up_block_types
    has_attn = ["CrossAttn" in t for t in ups]
    if not isinstance(layers, int):
        raise ValueError("per-block layers_per_block is not supported")
    return lambda name: unet_module_to_ldm(name, layers, has_attn)


def vae_module_to_ldm(name: str, num_blocks: int) -> str:
    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    def attn(rest: str) -> str:
        for k, v in _VAE_ATTN.items():
            if rest == k or rest.startswith(k + "."):
                return v + rest[len(k):]
        return rest

    for part in ("encoder", "decoder"):
        if not name.startswith(part + "."):
            continue
        rest = name[len(part) + 1:]
        if rest == "conv_norm_out":
            return f"{part}.norm_out"
        if rest in ("conv_in", "conv_out"):
            return f"{part}.{rest}"
        m = re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)(?:\.(.*))?$", rest)
        if m:
            i = int(m[2]) if m[1] == "down" else num_blocks - 1 - int(m[2])
            return f"{part}.{m[1]}.{i}.block.{m[3]}" + ("." + resnet(m[4]) if m[4] else "")
        m = re.match(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv$", rest)
        if m:
            i = int(m[2]) if m[1] == "down" else num_blocks - 1 - int(m[2])
            return f"{part}.{m[1]}.{i}.{m[3]}sample.conv"
        m = re.match(r"mid_block\.resnets\.(\d+)(?:\.(.*))?$", rest)
        if m:
            return f"{part}.mid.block_{int(m[1]) + 1}" + ("." + resnet(m[2]) if m[2] else "")
        m = re.match(r"mid_block\.attentions\.0(?:\.(.*))?$", rest)
        if m:
            return f"{part}.mid.attn_1" + ("." + attn(m[1]) if m[1] else "")
    if name in ("quant_conv", "post_quant_conv"):
        return name
    raise KeyError(f"no original-layout name for VAE module {name!r}")


def _param_key(module_mapper, key: str) -> str:
    module, _, param = key.rpartition(".")
    return module_mapper(module) + "." + param


def unet_to_ldm_state_dict(unet) -> dict[str, torch.Tensor]:
    mapper = unet_name_mapper(unet.config)
    return {UNET_PREFIX + _param_key(mapper, k): v for k, v in unet.state_dict().items()}


def vae_to_ldm_state_dict(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        new = _param_key(lambda m: vae_module_to_ldm(m, n), k)
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[VAE_PREFIX + new] = v
    return out


# --- OpenCLIP text encoder <-> transformers CLIPTextModel -----------------------------------------
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openclip_to_hf(sd: dict[str, torch.Tensor], prefix: str, num_layers: Optional[int] = None
                   ) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (fused in_proj) -> CLIPTextModel(WithProjection) keys, as views of `sd`.

    Only layers below `num_layers` are mapped (SD2 drops the last layer, see models/loader.py).
    """
    out: dict[str, torch.Tensor] = {}
    simple = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "ln_final.weight": "text_model.final_layer_norm.weight",
              "ln_final.bias": "text_model.final_layer_norm.bias"}
    for src, dst in simple.items():
        if prefix + src in sd:
            out[dst] = sd[prefix + src]
    if prefix + "text_projection" in sd:
        out["text_projection.weight"] = sd[prefix + "text_projection"].t()  # a transposed view, not a copy
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$")
    for key, value in sd.items():
        m = pattern.match(key)
        if not m:
            continue
        layer, rest = int(m[1]), m[2]
        if num_layers is not None and layer >= num_layers:
            continue
        base = f"text_model.encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            q, k, v = value.chunk(3, dim=0)  # chunk returns views
            out[base + f"self_attn.q_proj.{kind}"] = q
            out[base + f"self_attn.k_proj.{kind}"] = k
            out[base + f"self_attn.v_proj.{kind}"] = v
            continue
        module, _, param = rest.rpartition(".")
        if module in _OPENCLIP_LAYER:
            out[base + _OPENCLIP_LAYER[module] + "." + param] = value
    return out


def hf_to_openclip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Inverse of openclip_to_hf (used to write original-format files)."""
    inverse_simple = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                      "text_model.embeddings.position_embedding.weight": "positional_embedding",
                      "text_model.final_layer_norm.weight": "ln_final.weight",
                      "text_model.final_layer_norm.bias": "ln_final.bias"}
    inverse_layer = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in inverse_simple:
            out[prefix + inverse_simple[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.t().contiguous()
        else:
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
            if not m:
                continue
            layer, module, param = int(m[1]), m[2], m[3]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((layer, param), {})[module[-6]] = value
            else:
                out[prefix + f"transformer.resblocks.{layer}.{inverse_layer[module]}.{param}"] = value
    for (layer, param), parts in fused.items():
        out[prefix + f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# --- transformers 4.x names CLIPTextModel's weights text_model.*; 5.x drops that level ---------------
_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def canonical_clip_name(name: str) -> str:
    """A CLIPTextModel key or module path in the 4.x form (text_model.encoder...), whatever the version."""
    return "text_model." + name if name.startswith(_CLIP_ROOTS) else name


def canonical_clip_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {canonical_clip_name(k): v for k, v in sd.items()}


def clip_keys_for(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical keys renamed to what this transformers version's `model` expects."""
    expected = set(model.state_dict().keys())
    if any(k.startswith("text_model.") for k in expected):
        return sd
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}


def clip_final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm
