"""Forge's loaded FLUX.1 as the engine's FluxModel, on Forge's own tensors (checked against Forge main @ dfdcbab).

Forge's `Flux` engine (backend/diffusion_engine/flux.py) keeps:
- the transformer under BFL's names at `forge_objects.unet.model.diffusion_model` (backend/nn/flux.py), its
  storage in `.storage_dtype` (backend/loader.py): bf16/fp16, fp8 (e4m3fn / e5m2: Forge's Linear casts per call),
  'nf4'/'fp4' (bitsandbytes Params4bit weights, backend/operations_bnb.py) or 'gguf';
- the text encoders in a JointTextEncoder at `clip.cond_stage_model`: `clip_l` (IntegratedCLIP, whose
  `.transformer` is a transformers CLIPTextModel built with Forge's layers) and `t5xxl` (IntegratedT5, whose
  `.transformer` is Forge's own T5 with `.shared` and `.encoder`); tokenizers at `clip.tokenizer.{clip_l, t5xxl}`;
- the VAE at `vae.first_stage_model` (IntegratedAutoencoderKL: LDM names, diffusers' config with Flux's
  scaling/shift factors).

The transformer becomes a diffusers one on the same tensors (models/flux/live.py: views; fp8 and nf4 stay as
Forge stores them and are cast / dequantized per layer). The text encoders stay Forge's modules, called the way
Forge's text engines call them: they are frozen (the transformer is what trains), and whatever precision Forge
holds them in (fp8 / nf4 T5 is common) they compute as they do for Forge's own generations. They are not part
of our module tree, so nothing we do moves or re-flags them; Forge's memory manager keeps them where it put them.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from .base import HostError

QUANTIZED_4BIT = ("nf4", "fp4")


def storage_name(diffusion_model) -> str:
    """How Forge stores the transformer: 'bfloat16', 'float8_e4m3fn', 'nf4', 'gguf', ..."""
    return str(getattr(diffusion_model, "storage_dtype", "")).replace("torch.", "")


def flux_problem(diffusion_model) -> Optional[str]:
    """Why Forge's Flux transformer cannot be trained on, or None."""
    storage = storage_name(diffusion_model)
    if storage == "gguf" or any(getattr(p, "gguf_cls", None) is not None for p in diffusion_model.parameters()):
        return ("Forge holds this FLUX.1 model as GGUF, whose blocks this trainer cannot compute through: load the "
                "bf16, fp8 or nf4 version of the model in Forge (or set 'Diffusion in Low Bits' to one of those).")
    return None


class ForgeTextEncoder(torch.nn.Module):
    """Calls one of Forge's text encoders without adopting it: it is kept outside this module's tree, so `.to`,
    `.eval()`, `.requires_grad_()` on the engine's model never reach Forge's module."""

    def __init__(self, forge_module: torch.nn.Module):
        super().__init__()
        self.__dict__["forge"] = forge_module  # not a child module, on purpose

    @property
    def device(self) -> torch.device:
        return next(self.forge.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """What it computes in (FluxPipeline makes its text position ids in this dtype): not fp8 / nf4 storage."""
        from ..models.low_precision import float_dtype

        return float_dtype(self.forge)


class ForgeClipL(ForgeTextEncoder):
    """Forge's CLIP-L (a transformers CLIPTextModel made of Forge's layers): its pooled output, as Forge's
    ClassicTextProcessingEngine takes it for Flux (`outputs.pooler_output`)."""

    @property
    def config(self):
        return self.forge.config

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False):
        return self.forge(input_ids, output_hidden_states=output_hidden_states)

    def meta_copy(self) -> torch.nn.Module:
        """For the memory planner: a transformers CLIPTextModel of this config on the meta device."""
        from transformers import CLIPTextModel

        with torch.device("meta"):
            return CLIPTextModel(self.config).to(self.dtype)


class ForgeT5(ForgeTextEncoder):
    """Forge's T5 (backend/nn/t5.py): token embedding in fp32 (Forge's T5 engine turns `shared` into fp32 before
    every prompt; we look the rows up in fp32 instead of changing Forge's module), then its encoder stack."""

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False):
        t5 = self.forge
        x = torch.nn.functional.embedding(input_ids, t5.shared.weight).float()
        return (t5.encoder(torch.nan_to_num(x)),)

    def meta_copy(self) -> torch.nn.Module:
        """For the memory planner: nothing to trace (T5 runs without gradients, before the transformer) and
        nothing to count (its weights are Forge's, resident like this wrapper's zero parameters say)."""
        return torch.nn.Module()


def vae_from_forge(first_stage_model):
    """A diffusers AutoencoderKL holding Forge's VAE tensors (LDM names -> diffusers, views)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ..models.loader import _assign

    accepted = inspect.signature(AutoencoderKL.__init__).parameters
    config = {k: v for k, v in dict(first_stage_model.config).items() if k in accepted}
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    return _assign(vae, convert_ldm_vae_checkpoint(first_stage_model.state_dict(), vae.config), "Forge's FLUX.1 VAE")


def flux_scheduler(dev: bool):
    """The flow-matching schedule Forge samples Flux with (its PredictionFlux settings), for our samples."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dev:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0)


def forge_flux_parts(sd_model) -> tuple:
    """(transformer, clip_l, t5, vae) of Forge's loaded Flux: the modules at the places Forge keeps them."""
    objs = sd_model.forge_objects_original
    encoders = dict(objs.clip.cond_stage_model.named_children())
    missing = [slot for slot in ("clip_l", "t5xxl") if slot not in encoders]
    if missing:
        raise HostError(f"Forge's FLUX.1 model has no {' / '.join(missing)} text encoder; this Forge version lays out "
                        f"its models differently than this extension knows")
    return (objs.unet.model.diffusion_model, encoders["clip_l"].transformer, encoders["t5xxl"].transformer,
            objs.vae.first_stage_model)


def forge_flux_model(sd_model, name: str, path: Optional[str], digest: Optional[str],
                     make_trainable: Callable, log: Callable[[str], None]):
    """The engine's FluxModel on Forge's loaded Flux (call inside clean_weights, with the model on the device)."""
    from ..models.flux.live import transformer_from_live
    from ..models.flux.model import FluxModel

    diffusion_model, clip_l, t5, first_stage = forge_flux_parts(sd_model)
    problem = flux_problem(diffusion_model)
    if problem:
        raise HostError(problem)
    # autograd saves the float weights it multiplies by as they are, so those must not be inference tensors;
    # make_trainable leaves packed 4-bit data alone (a clone would lose its quant state; it is dequantized per call)
    replaced = make_trainable(diffusion_model, first_stage)
    if replaced:
        log(f"made {replaced} of Forge's inference-mode tensors trainable (in place, no second copy)")
    compute = getattr(diffusion_model, "computation_dtype", None)
    compute = compute if isinstance(compute, torch.dtype) else torch.bfloat16
    transformer = transformer_from_live(diffusion_model, compute)
    tokenizers = sd_model.forge_objects_original.clip.tokenizer
    model = FluxModel(transformer=transformer, vae=vae_from_forge(first_stage),
                      text_encoders=[ForgeClipL(clip_l), ForgeT5(t5)],
                      tokenizers=[tokenizers.clip_l, tokenizers.t5xxl],
                      noise_scheduler=flux_scheduler(transformer.config.guidance_embeds), name=name, path=path,
                      source="forge", model_hash=digest, compute_dtype=compute,
                      base_storage=storage_name(diffusion_model))
    model.freeze()
    log(f"base model: {model.describe()}, transformer held by Forge in {storage_name(diffusion_model) or 'its dtype'}"
        f" (computing in {str(compute).replace('torch.', '')})")
    return model


__all__ = ["forge_flux_model", "flux_problem", "storage_name", "ForgeClipL", "ForgeT5", "vae_from_forge"]
