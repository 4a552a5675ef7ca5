"""Loading FLUX.1: a diffusers folder, or BFL's single transformer file with the other components beside it.

A BFL file holds only the transformer (flux1-dev.safetensors, or a full checkpoint under model.diffusion_model.);
its architecture is read from the tensors (depth, width, heads, text widths, guidance), so no config has to be
downloaded. The VAE, text encoders, tokenizers and scheduler come from a diffusers-layout folder: given, or a
folder of the same name beside the file, or the file's own folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..loader import ModelLoadError, read_checkpoint, transformers_dtype_kwarg
from .bfl_names import bfl_shape, bfl_to_diffusers, is_bfl_flux, out_features, strip_prefix
from .model import FluxModel
from .tiny import rope_axes

COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


def is_flux_folder(folder: Path) -> bool:
    index = Path(folder) / "model_index.json"
    return index.is_file() and ((Path(folder) / "transformer").is_dir() and "Flux" in index.read_text())


def detect_flux(path: Path) -> bool:
    """Whether `path` is a FLUX.1 model: a diffusers folder of a Flux pipeline, or a file with BFL's
    double_blocks.* keys (read from the safetensors header only)."""
    path = Path(path)
    if path.is_dir():
        return is_flux_folder(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return is_bfl_flux(fh.keys())
    except Exception:
        return False  # not readable as safetensors: the SD loader reports it


def transformer_config_from_bfl(sd: dict) -> dict:
    """FluxTransformer2DModel arguments that reproduce a BFL state dict (prefix already stripped)."""
    num_double, num_single, guidance = bfl_shape(sd)
    width, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0] if num_double else \
        sd["single_blocks.0.norm.query_norm.scale"].shape[0]
    return {"patch_size": 1, "in_channels": in_channels, "num_layers": num_double, "num_single_layers": num_single,
            "attention_head_dim": head_dim, "num_attention_heads": width // head_dim,
            "joint_attention_dim": sd["txt_in.weight"].shape[1],
            "pooled_projection_dim": sd["vector_in.in_layer.weight"].shape[1], "guidance_embeds": guidance,
            "axes_dims_rope": rope_axes(head_dim)}


def transformer_from_bfl(sd: dict, dtype: Optional[torch.dtype] = None):
    """A FluxTransformer2DModel holding the BFL state dict's tensors (split views for the fused projections)."""
    from diffusers import FluxTransformer2DModel

    sd = strip_prefix(sd)
    config = transformer_config_from_bfl(sd)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    converted = bfl_to_diffusers(sd, out_features(model))
    if dtype is not None:
        converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in converted.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(f"FLUX.1 transformer weights do not fit: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}")
    return model


def components_folder(path: Path, components: Optional[Path]) -> Path:
    """Where the VAE, text encoders and tokenizers of a single-file transformer are."""
    candidates = [Path(components)] if components else [path.with_suffix(""), path.parent]
    for folder in candidates:
        if all((folder / c).is_dir() for c in COMPONENTS):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise ModelLoadError(
        f"{path.name} holds only the FLUX.1 transformer; the VAE, text encoders and tokenizers must be on disk in "
        f"diffusers layout: a folder with {', '.join(c + '/' for c in COMPONENTS)} (e.g. a copy of the "
        f"FLUX.1-dev repository without transformer/). Looked in: {looked}. Set flux_components to that folder.")


def _load_parts(folder: Path, dtype: Optional[torch.dtype]) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    te_kwargs = {transformers_dtype_kwarg(): dtype} if dtype else {}
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{folder} is not a complete FLUX.1 diffusers folder: missing {', '.join(missing)}")
    return {"vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),  # the VAE stays fp32
            "text_encoders": [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **te_kwargs),
                              T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", **te_kwargs)],
            "tokenizers": [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
                           T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True)],
            "noise_scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")}


def load_flux_folder(folder: Path, dtype: Optional[torch.dtype] = None, log_fn=print) -> FluxModel:
    from diffusers import FluxTransformer2DModel

    folder = Path(folder)
    if not (folder / "transformer").is_dir():
        raise ModelLoadError(f"{folder} has no transformer/ subfolder: not a FLUX.1 diffusers folder")
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer",
                                                         **({"torch_dtype": dtype} if dtype else {}))
    model = FluxModel(transformer=transformer, **_load_parts(folder, dtype), name=folder.name, path=str(folder),
                      source="diffusers")
    model.freeze()
    log_fn(f"base model: {model.describe()}")
    return model


def load_flux_single_file(path: Path, components: Optional[Path] = None, dtype: Optional[torch.dtype] = None,
                          log_fn=print) -> FluxModel:
    path = Path(path)
    folder = components_folder(path, components)  # checked first: fail before reading gigabytes
    sd = read_checkpoint(path)
    if not is_bfl_flux(sd):
        raise ModelLoadError(f"{path.name} is not a FLUX.1 transformer (no double_blocks.* weights)")
    model = FluxModel(transformer=transformer_from_bfl(sd, dtype), **_load_parts(folder, dtype), name=path.stem,
                      path=str(path), source="single-file")
    model.freeze()
    log_fn(f"base model: {model.describe()} (VAE and text encoders from {folder})")
    return model


def load_flux(base_model: str, components: Optional[str] = None, dtype: Optional[torch.dtype] = None,
              log_fn=print) -> FluxModel:
    path = Path(base_model).expanduser()
    if path.is_dir():
        return load_flux_folder(path, dtype, log_fn)
    if path.is_file():
        return load_flux_single_file(path, Path(components) if components else None, dtype, log_fn)
    raise ModelLoadError(f"base_model: {base_model} does not exist (expected a FLUX.1 diffusers folder or a "
                         f"BFL-format transformer .safetensors)")
