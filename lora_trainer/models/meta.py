"""Shape-only copies of a base model on the meta device: the memory planner traces them (no weights, no memory,
a forward pass in well under a second even for SDXL)."""
from __future__ import annotations

from typing import Optional

import torch

from .base import BaseModel


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def meta_model(source, dtype: Optional[torch.dtype] = None) -> BaseModel:
    """A BaseModel (or FluxModel) with the architecture of `source` (a BaseModel, a FluxModel, or a host's
    LoadedCheckpoint) whose parameters live on the meta device. Each module keeps its own precision unless `dtype`
    is given."""
    if getattr(source, "family", None) == "flux":
        model = _meta_flux(source)
    elif isinstance(source, BaseModel):
        with torch.device("meta"):
            unet = type(source.unet).from_config(source.unet.config)
            vae = type(source.vae).from_config(source.vae.config)
            encoders = [type(te)(te.config) for te in source.text_encoders]
        unet.to(_dtype_of(source.unet))
        vae.to(_dtype_of(source.vae))
        for meta_te, te in zip(encoders, source.text_encoders):
            meta_te.to(_dtype_of(te))
        model = BaseModel(family=source.family, unet=unet, vae=vae, text_encoders=encoders,
                          tokenizers=source.tokenizers, noise_scheduler=source.noise_scheduler,
                          v_prediction=source.v_prediction, name=source.name, path=source.path, source=source.source)
    else:
        from .loader import build_from_ldm_state_dict

        shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta")
                  for k, v in source.state_dict.items() if isinstance(v, torch.Tensor)}
        model = build_from_ldm_state_dict(
            shapes, family=source.family,
            v_parameterization=source.v_prediction if source.v_prediction is not None else "auto",
            original_config=source.original_config, name=source.title, path=source.path, log_fn=lambda *_: None)
    if dtype is not None:
        model.unet.to(dtype)
        for te in model.text_encoders:
            te.to(dtype)
    model.freeze()
    return model


def _meta_flux(source):
    """A FluxModel's modules rebuilt from their configs on the meta device, each in the precision it computes in
    (an fp8 / nf4 transformer's storage is the model's base_storage, which the planner reads)."""
    import dataclasses

    from .low_precision import float_dtype

    with torch.device("meta"):
        transformer = type(source.transformer).from_config(source.transformer.config)
        vae = type(source.vae).from_config(source.vae.config)
    transformer.to(source.compute_dtype or float_dtype(source.transformer))
    vae.to(float_dtype(source.vae))
    encoders = [_meta_text_encoder(te) for te in source.text_encoders]
    return dataclasses.replace(source, transformer=transformer, vae=vae, text_encoders=encoders)


def _meta_text_encoder(te: torch.nn.Module) -> torch.nn.Module:
    """A transformers text encoder rebuilt from its config; a host's wrapper gives its own stand-in (meta_copy)."""
    if hasattr(te, "meta_copy"):
        return te.meta_copy()
    with torch.device("meta"):
        meta = type(te)(te.config)
    return meta.to(_dtype_of(te))
