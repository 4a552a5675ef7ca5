"""Stable Diffusion WebUI Forge as a host (facts in docs/hosts.md; checked against Forge main @ dfdcbab).

Forge keeps A1111's `modules.*` surface (shared, call_queue, processing, paths, the `networks` module of its
built-in LoRA extension), so this adapter is the A1111 one with the model side replaced:

- The model is lazy: `modules.sd_models.forge_model_reload()` loads it (a `FakeInitialModel` stands in
  until then). Its parts are `forge_objects_original.{unet, clip, vae}`: the UNet under LDM names at
  `unet.model.diffusion_model`, the text encoders as transformers CLIP models at
  `clip.cond_stage_model.{clip_l, clip_h, clip_g}.transformer` (OpenCLIP ones already split into q/k/v),
  the VAE under LDM names at `vae.first_stage_model`. `forge_live_state_dict` maps them onto the checkpoint
  layout our loader reads, without copying.
- Forge loads weights under `torch.inference_mode()`; autograd cannot save inference tensors for backward.
  `make_trainable` swaps each one for an ordinary tensor in Forge's own module, one tensor at a time (so
  the peak is one tensor, not a second model) - Forge then generates with those same tensors.
- LoRAs are applied by Forge's ModelPatcher, which swaps patched weights in and keeps the originals;
  refreshing the *original* patchers (which carry no LoRA) puts the clean weights back.
- Forge's layers are its own operations (not nn.Linear) and its UNet refuses gradient checkpointing; we
  never train Forge's modules: the engine builds diffusers modules on the same tensors.
- Forge skips a LoRA whose keys it cannot match with only a console line, so `preview` checks that the
  file really was applied (Forge's patchers list the files they patched with) and says so if not.
- FLUX.1 (Forge's `Flux` engine) is handed to the trainer as a ready FluxModel: hosts/forge_flux.py.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from .a1111 import LOCK_WAIT_S, A1111Host, live_to_ldm_state_dict
from ..config import ConfigError, TrainConfig
from .base import CheckpointInfo, HostError, LoadedCheckpoint

_QUANTIZED = ("float8", "nf4", "fp4", "gguf")
# Forge's text-encoder slots -> where the checkpoint layout (as our loader reads it) keeps them.
_TE_PREFIX = {
    "sd1": {"clip_l": "cond_stage_model.transformer."},
    "sd2": {"clip_h": "cond_stage_model.transformer."},   # transformers layout; the loader tells it by width
    "sdxl": {"clip_l": "conditioner.embedders.0.transformer.", "clip_g": "conditioner.embedders.1.transformer."},
}


# ---- pure helpers (tested without Forge) ------------------------------------------------------------
def forge_live_state_dict(unet, text_encoders: dict, vae, family: str) -> dict:
    """Forge's live modules -> one original-layout state dict (the same tensor objects, nothing copied).

    unet: the LDM-named diffusion model; text_encoders: {"clip_l"|"clip_h"|"clip_g": IntegratedCLIP} whose
    `.transformer` is a transformers CLIPTextModel; vae: the LDM-named first-stage model."""
    if family not in _TE_PREFIX:
        raise HostError(f"unknown model family {family!r}")
    out = dict(unet.state_dict(prefix="model.diffusion_model."))
    out.update(vae.state_dict(prefix="first_stage_model."))
    for slot, prefix in _TE_PREFIX[family].items():
        encoder = text_encoders.get(slot)
        if encoder is None:
            raise HostError(f"Forge's {family.upper()} model has no {slot} text encoder; this Forge version lays out "
                            f"its models differently than this extension knows")
        for key, value in getattr(encoder, "transformer", encoder).state_dict().items():
            if key.endswith("position_ids"):
                continue
            if key == "text_projection.weight" and slot == "clip_l":
                continue  # Forge adds an unused projection to CLIP-L; the checkpoint has none
            if not key.startswith(("text_model.", "text_projection.")):
                key = "text_model." + key  # transformers 5 dropped the text_model level
            out[prefix + key] = value
    # Forge's textual-inversion wrapper registers the token embedding twice (`token_embedding.weight` and
    # `token_embedding.wrapped.weight`, one tensor): keep one name.
    for key in [k for k in out if ".token_embedding.wrapped." in k]:
        twin = out.get(key.replace(".token_embedding.wrapped.", ".token_embedding."))
        if twin is not None and twin.data_ptr() == out[key].data_ptr() and twin.shape == out[key].shape:
            del out[key]
    # Forge wraps the token embedding for textual inversion as A1111 does (token_embedding.wrapped.weight)
    return live_to_ldm_state_dict(out)


def make_trainable(*modules) -> int:
    """Replaces every inference-mode tensor of `modules` (parameters and buffers) with an ordinary copy, in
    place in its module, one at a time; returns how many were replaced.

    Must run outside `torch.inference_mode()`. The old tensor is freed as soon as nothing else holds it, so
    memory grows by at most the largest tensor."""
    import torch

    from ..models.low_precision import is_4bit

    if torch.is_inference_mode_enabled():
        raise HostError("make_trainable was called under torch.inference_mode()")
    swapped: dict[int, torch.Tensor] = {}  # a tensor registered twice (Forge's TI wrapper) stays one tensor
    with torch.no_grad():
        for root in modules:
            for module in root.modules():
                for store in (module._parameters, module._buffers):
                    for name, tensor in list(store.items()):
                        if tensor is None:
                            continue
                        if id(tensor) in swapped:
                            store[name] = swapped[id(tensor)]
                            continue
                        if not tensor.is_inference() or hasattr(tensor, "bnb_quantized") or is_4bit(tensor):
                            continue  # packed 4-bit data would lose its quant state (it is dequantized per call)
                        fresh = tensor.clone()
                        if isinstance(tensor, torch.nn.Parameter):
                            fresh = torch.nn.Parameter(fresh, requires_grad=False)
                        store[name] = fresh
                        swapped[id(tensor)] = fresh
    return len(swapped)


def lora_patch_counts(patchers, filename: str) -> int:
    """How many weights Forge's patchers patch with the LoRA file `filename` (0: Forge skipped it)."""
    target = str(Path(filename).resolve())
    count = 0
    for patcher in patchers:
        for key, patches in getattr(patcher, "lora_patches", {}).items():
            source = key[0] if isinstance(key, tuple) and key else key
            try:
                same = str(Path(str(source)).resolve()) == target
            except OSError:
                same = False
            if same:
                count += len(patches)
    return count


# ---- the adapter ------------------------------------------------------------------------------------
class ForgeHost(A1111Host):
    kind = "forge"
    display_name = "Forge"

    @staticmethod
    def _backend(name: str):
        return importlib.import_module(f"backend.{name}")

    def _sd_model(self):
        """The loaded model without loading one (None while Forge has only its placeholder)."""
        try:
            model = self._m("sd_models").model_data.sd_model
        except (ImportError, AttributeError):
            return None
        return model if getattr(model, "forge_objects_original", None) is not None else None

    def _load(self):
        """Forge loads the selected checkpoint on first use; the tab needs it now."""
        model = self._sd_model()
        if model is not None:
            return model
        with self._lock().hold(LOCK_WAIT_S, "Forge is busy; try again when its current job has finished"):
            try:
                model, _ = self._m("sd_models").forge_model_reload()
            except KeyError as exc:  # no forge_loading_parameters yet
                raise HostError("No checkpoint is selected in Forge: pick one in the Checkpoint list at the top.") \
                    from exc
            except Exception as exc:  # Forge raises plain ValueError/AssertionError for a missing or odd file
                raise HostError(f"Forge could not load its checkpoint: {exc}") from exc
        return self._sd_model()

    # -- checkpoint ---------------------------------------------------------------------------------
    def checkpoint_info(self) -> CheckpointInfo:
        """What Forge has loaded; before its first use, what it will load (nothing is loaded here: the tab
        asks on every page load, and loading an SDXL checkpoint takes a while)."""
        sd_model = self._sd_model()
        if sd_model is None:
            try:
                params = self._m("sd_models").model_data.forge_loading_parameters or {}
            except (ImportError, AttributeError):
                params = {}
            selected = params.get("checkpoint_info")
            if selected is None:
                return CheckpointInfo(None, "", supported=False,
                                      message="No checkpoint is selected in Forge: pick one in the Checkpoint list at "
                                              "the top.")
            title = getattr(selected, "title", None) or getattr(selected, "name", None) or "checkpoint"
            return CheckpointInfo(None, title, getattr(selected, "filename", None), getattr(selected, "sha256", None),
                                  supported=True, message=f"{title}: Forge loads it on first use (a generation, or "
                                                          f"when training starts); its family is checked then.")
        info = getattr(sd_model, "sd_checkpoint_info", None)
        title = getattr(info, "title", None) or getattr(info, "name", None) or "checkpoint"
        path = getattr(info, "filename", None)
        digest = getattr(info, "sha256", None)
        family, problem = self._family(sd_model)
        if problem:
            return CheckpointInfo(family, title, path, digest, supported=False, message=problem)
        if family == "flux":
            from .forge_flux import storage_name

            storage = storage_name(self._unet(sd_model))
            return CheckpointInfo(family, title, path, digest, supported=True,
                                  message=f"transformer held by Forge in {storage}" if storage else "")
        v = self._v_prediction(sd_model)
        return CheckpointInfo(family, title, path, digest, supported=True, message="v-prediction" if v else "")

    @staticmethod
    def _family(sd_model) -> tuple[Optional[str], Optional[str]]:
        kind = type(sd_model).__name__
        if kind == "Flux":
            from .forge_flux import flux_problem

            return "flux", flux_problem(sd_model.forge_objects_original.unet.model.diffusion_model)
        if kind in ("Chroma", "StableDiffusion3") or getattr(sd_model, "is_sd3", False):
            return None, (f"{kind} models cannot be trained here yet (SD1, SD2, SDXL and FLUX.1 can): load one of "
                          f"those in Forge.")
        if kind == "StableDiffusionXLRefiner":
            return None, "the SDXL refiner cannot be trained here: load an SDXL base, SD1 or SD2 checkpoint."
        if getattr(sd_model, "is_sdxl", False):
            family = "sdxl"
        elif getattr(sd_model, "is_sd2", False):
            family = "sd2"
        elif getattr(sd_model, "is_sd1", False):
            family = "sd1"
        else:
            return None, f"Forge loaded a {kind} model, which this trainer does not know."
        if getattr(sd_model, "is_inpaint", False):
            return family, "this is an inpainting checkpoint: load a regular one to train on."
        kmodel = sd_model.forge_objects_original.unet.model
        storage = str(getattr(kmodel, "storage_dtype", getattr(kmodel.diffusion_model, "storage_dtype", "")))
        if any(q in storage.lower() for q in _QUANTIZED):
            return family, (f"Forge holds this UNet in {storage.replace('torch.', '')} (quantized), which cannot be "
                            f"trained: set 'Diffusion in Low Bits' to Automatic and use an fp16/bf16/fp32 checkpoint.")
        return family, None

    @staticmethod
    def _v_prediction(sd_model) -> bool:
        predictor = getattr(sd_model.forge_objects_original.unet.model, "predictor", None)
        return getattr(predictor, "prediction_type", "epsilon") == "v_prediction"

    def _memory_problem(self, sd_model) -> Optional[str]:
        return None  # Forge accepts --lowvram but manages memory itself; exclusive_gpu() loads everything fully

    def _parts(self, sd_model):
        objs = sd_model.forge_objects_original
        encoders = dict(objs.clip.cond_stage_model.named_children())  # Forge's JointTextEncoder: clip_l, clip_g...
        return objs.unet.model.diffusion_model, encoders, objs.vae.first_stage_model

    def _original_config(self, sd_model) -> Optional[dict]:
        """A same-named .yaml beside the checkpoint (non-standard architectures), as the loader reads it."""
        from ..models.loader import _read_yaml_beside

        info = getattr(sd_model, "sd_checkpoint_info", None)
        path = getattr(info, "filename", None)
        return _read_yaml_beside(Path(path)) if path else None

    def loaded_checkpoint(self):
        """SD families: the LoadedCheckpoint the loader builds on; FLUX.1: the ready FluxModel."""
        self._load()
        info = self.checkpoint_info()
        sd_model = self._sd_model()
        if sd_model is None or not info.supported:
            raise HostError(info.message)
        if info.family == "flux":
            from .forge_flux import forge_flux_model

            return forge_flux_model(sd_model, info.title, info.path, info.hash, make_trainable, self._log)
        unet, encoders, vae = self._parts(sd_model)
        replaced = make_trainable(unet, vae, *encoders.values())
        if replaced:
            self._log(f"made {replaced} of Forge's inference-mode tensors trainable (in place, no second copy)")
        return LoadedCheckpoint(state_dict=forge_live_state_dict(unet, encoders, vae, info.family),
                                family=info.family, title=info.title, path=info.path, hash=info.hash,
                                v_prediction=self._v_prediction(sd_model),
                                original_config=self._original_config(sd_model))

    def _device(self):
        return self._backend("memory_management").get_torch_device()

    def _flux_model(self):
        sd_model = self._sd_model()
        return sd_model if sd_model is not None and type(sd_model).__name__ == "Flux" else None

    def own_load_note(self, key: str) -> str:
        """On Forge's FLUX.1 the note names the Forge setting that does the same."""
        sd_model = self._flux_model()
        if sd_model is None:
            return super().own_load_note(key)
        if key == "blocks_to_swap":
            return ("blocks_to_swap: Forge moves the model between GPU and CPU memory itself (its 'GPU Weights' "
                    "setting); the run keeps the transformer where Forge put it")
        from .forge_flux import storage_name

        storage = storage_name(self._unet(sd_model)) or "its precision"
        return (f"{key}: the LoRA trains on the transformer as Forge holds it ({storage}); set 'Diffusion in Low "
                f"Bits' in Forge to choose that")

    def prepare_config(self, cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
        cfg, notes = super().prepare_config(cfg)
        sd_model = self._flux_model()
        if sd_model is None:
            return cfg, notes
        import torch

        self._check_flux_config(cfg)
        compute = getattr(self._unet(sd_model), "computation_dtype", None)
        if cfg.mixed_precision == "no" and compute in (torch.float16, torch.bfloat16):
            mixed = "fp16" if compute == torch.float16 else "bf16"
            cfg = cfg.replace(mixed_precision=mixed)
            notes.append(f"Forge computes this FLUX.1 model in {str(compute).replace('torch.', '')}: training with "
                         f"mixed_precision {mixed} (the LoRA itself stays float32)")
        return cfg, notes

    @staticmethod
    def _check_flux_config(cfg: TrainConfig) -> None:
        if cfg.model_family not in ("auto", "flux"):
            raise ConfigError(f"model_family is {cfg.model_family!r} but Forge has a FLUX.1 model loaded; set "
                              f"model_family: auto or load a {cfg.model_family.upper()} checkpoint in Forge")
        if cfg.train_text_encoder:
            raise ConfigError("train_text_encoder: on Forge, FLUX.1's text encoders run in Forge's own layers and stay "
                              "frozen; train the transformer only (train_text_encoder: false)")

    def model_for(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        sd_model = self._sd_model()
        if sd_model is not None and type(sd_model).__name__ == "Flux":
            self._check_flux_config(cfg)
        return super().model_for(cfg, log)

    @staticmethod
    def _unet(sd_model):
        return sd_model.forge_objects_original.unet.model.diffusion_model

    # -- contexts -----------------------------------------------------------------------------------
    def _original_patchers(self, sd_model) -> list:
        objs = sd_model.forge_objects_original
        return [objs.unet, objs.clip.patcher, objs.vae.patcher]

    @contextmanager
    def clean_weights(self) -> Iterator[None]:
        sd_model = self._load()
        with self._lock().hold(LOCK_WAIT_S, "Forge is busy; try again when its current job has finished"):
            if sd_model is not None:
                # The original patchers carry no LoRA: refreshing them swaps the backed-up clean weights in.
                for patcher in self._original_patchers(sd_model):
                    patcher.refresh_loras()
                sd_model.current_lora_hash = str([])  # so Forge re-applies its LoRAs on its next generation
        yield

    def _model_to_training_device(self):
        sd_model = self._load()
        if sd_model is not None:
            # Fully on the training device, clean, and first in Forge's list; nothing else runs while we hold
            # the queue lock (exclusive_gpu), so its memory manager has no reason to move them.
            self._backend("memory_management").load_models_gpu(self._original_patchers(sd_model))
        return lambda: None

    # -- previews -----------------------------------------------------------------------------------
    def preview(self, prompt: str, lora_name: Optional[str], weight: float, seed: int, steps: int,
                size: Union[int, tuple[int, int]], negative_prompt: str = "", cfg_scale: float = 7.0):
        image = super().preview(prompt, lora_name, weight, seed, steps, size, negative_prompt, cfg_scale)
        if lora_name and float(weight) != 0.0:
            path = self.find_lora(lora_name)
            sd_model = self._sd_model()
            if path is not None and sd_model is not None:
                objs = sd_model.forge_objects_after_applying_lora
                if lora_patch_counts([objs.unet, objs.clip.patcher], str(path)) == 0:
                    raise HostError(f"Forge did not apply {path.name} (its console says why, e.g. unmatched keys): "
                                    f"the preview would show the base model, so none is shown")
        return image


__all__ = ["ForgeHost", "forge_live_state_dict", "make_trainable", "lora_patch_counts"]
