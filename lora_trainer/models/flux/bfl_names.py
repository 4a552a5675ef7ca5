"""Black Forest Labs' (original) FLUX.1 transformer layout <-> diffusers' FluxTransformer2DModel, as one table.

BFL fuses some projections that diffusers keeps apart: a double block's `img_attn.qkv` is diffusers' to_q, to_k,
to_v stacked along the output dimension, a single block's `linear1` is to_q, to_k, to_v and proj_mlp. The same
table serves the checkpoint conversion (both directions) and the LoRA file names (kohya's Flux keys are BFL's
module paths), so the two can never disagree. Sizes come from the tensors, not from Flux's real width, so tiny
test models convert too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fused:
    bfl: str               # BFL module path, e.g. double_blocks.0.img_attn.qkv
    parts: tuple[str, ...]  # diffusers module paths whose outputs it stacks (one entry: a plain rename)
    swap_halves: bool = False  # final_layer.adaLN_modulation: BFL orders (shift, scale), diffusers (scale, shift)


_DOUBLE = [("img_mod.lin", ("norm1.linear",)), ("txt_mod.lin", ("norm1_context.linear",)),
           ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
           ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
           ("img_attn.proj", ("attn.to_out.0",)), ("txt_attn.proj", ("attn.to_add_out",)),
           ("img_mlp.0", ("ff.net.0.proj",)), ("img_mlp.2", ("ff.net.2",)),
           ("txt_mlp.0", ("ff_context.net.0.proj",)), ("txt_mlp.2", ("ff_context.net.2",))]
_DOUBLE_NORMS = [("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                 ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                 ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                 ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight")]
_SINGLE = [("modulation.lin", ("norm.linear",)),
           ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), ("linear2", ("proj_out",))]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]
_GLOBAL = [("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
           ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
           ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
           ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
           ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
           ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
           ("txt_in", ("context_embedder",)), ("img_in", ("x_embedder",)), ("final_layer.linear", ("proj_out",))]

BFL_PREFIX = "model.diffusion_model."  # how full-model BFL/ComfyUI checkpoints prefix the transformer


def block_modules(num_double: int, num_single: int) -> list[Fused]:
    """The Linear modules of the double and single blocks (what LoRA trains), BFL path -> diffusers parts."""
    out = []
    for i in range(num_double):
        out += [Fused(f"double_blocks.{i}.{b}", tuple(f"transformer_blocks.{i}.{p}" for p in ps)) for b, ps in _DOUBLE]
    for i in range(num_single):
        out += [Fused(f"single_blocks.{i}.{b}", tuple(f"single_transformer_blocks.{i}.{p}" for p in ps))
                for b, ps in _SINGLE]
    return out


def all_linear_modules(num_double: int, num_single: int, guidance: bool) -> list[Fused]:
    glob = [Fused(b, ps) for b, ps in _GLOBAL if guidance or not b.startswith("guidance_in")]
    glob.append(Fused("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True))
    return glob + block_modules(num_double, num_single)


def norm_params(num_double: int, num_single: int) -> list[tuple[str, str]]:
    out = [(f"double_blocks.{i}.{b}", f"transformer_blocks.{i}.{d}") for i in range(num_double) for b, d in _DOUBLE_NORMS]
    out += [(f"single_blocks.{i}.{b}", f"single_transformer_blocks.{i}.{d}") for i in range(num_single)
            for b, d in _SINGLE_NORMS]
    return out


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def is_bfl_flux(keys) -> bool:
    """A FLUX.1 transformer in BFL's layout (bare or under model.diffusion_model.)."""
    return any(k.startswith(("double_blocks.", BFL_PREFIX + "double_blocks.")) for k in keys)


def bfl_shape(sd: dict) -> tuple[int, int, bool]:
    """(double blocks, single blocks, has guidance embedder) of a BFL state dict."""
    def count(prefix):
        found = {int(m[1]) for k in sd for m in [re.match(prefix + r"\.(\d+)\.", k)] if m}
        return max(found) + 1 if found else 0
    return count("double_blocks"), count("single_blocks"), any(k.startswith("guidance_in.") for k in sd)


def strip_prefix(sd: dict) -> dict:
    if any(k.startswith(BFL_PREFIX) for k in sd):
        return {k[len(BFL_PREFIX):]: v for k, v in sd.items() if k.startswith(BFL_PREFIX)}
    return dict(sd)


def diffusers_to_bfl(sd: dict, num_double: int, num_single: int, guidance: bool) -> dict:
    """diffusers transformer state dict -> BFL keys (fused projections concatenated)."""
    out = {}
    for m in all_linear_modules(num_double, num_single, guidance):
        for suffix in ("weight", "bias"):
            t = torch.cat([sd[f"{p}.{suffix}"] for p in m.parts], dim=0)
            out[f"{m.bfl}.{suffix}"] = _swap(t) if m.swap_halves else t
    for bfl, diff in norm_params(num_double, num_single):
        out[bfl] = sd[diff]
    return out


def bfl_to_diffusers(sd: dict, part_sizes: dict[str, int]) -> dict:
    """BFL keys -> diffusers keys. part_sizes: output features of every diffusers module (from the model
    being loaded into), which says where a fused tensor splits."""
    sd = strip_prefix(sd)
    num_double, num_single, guidance = bfl_shape(sd)
    out = {}
    for m in all_linear_modules(num_double, num_single, guidance):
        for suffix in ("weight", "bias"):
            t = sd.pop(f"{m.bfl}.{suffix}")
            t = _swap(t) if m.swap_halves else t
            for p, piece in zip(m.parts, torch.split(t, [part_sizes[p] for p in m.parts], dim=0)):
                out[f"{p}.{suffix}"] = piece
    for bfl, diff in norm_params(num_double, num_single):
        out[diff] = sd.pop(bfl)
    if sd:
        raise ValueError(f"{len(sd)} keys of the FLUX.1 checkpoint are not part of the transformer's layout "
                         f"(e.g. {sorted(sd)[0]})")
    return out


def out_features(model: torch.nn.Module) -> dict[str, int]:
    return {name: m.out_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
