"""LoRA / LoCon / DoRA on a BaseModel through peft, exchanged in kohya's key format.

peft does the injection and the forward math (scale = alpha / rank, as in kohya); this module only
decides the targets and moves weights between peft's layers and kohya keys
(`<stem>.lora_down.weight`, `<stem>.lora_up.weight`, `<stem>.alpha`, `<stem>.dora_scale`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from ..config import ConfigError, TrainConfig
from .targets import Target, all_targets

ADAPTER = "default"
# Names of 3x3 convolutions (LoCon) for peft's rank/alpha patterns; they match in every peft version.
_CONV3X3_PATTERNS = ("conv1", "conv2", "conv")


class LoraNetwork:
    def __init__(self, model, cfg: TrainConfig):
        from peft import LoraConfig, inject_adapter_in_model

        self.model = model
        self.rank = cfg.lora_rank
        self.alpha = cfg.effective_alpha
        self.conv_rank = cfg.effective_conv_rank
        self.conv_alpha = cfg.effective_conv_alpha
        self.use_dora = cfg.use_dora
        self.targets: dict[str, list[Target]] = all_targets(model, cfg.train_unet, cfg.train_text_encoder,
                                                            cfg.conv_lora, cfg.clip_skip)
        self.layers: dict[str, torch.nn.Module] = {}  # kohya stem -> peft layer
        self._components: dict[str, torch.nn.Module] = {}
        for component, targets in self.targets.items():
            if not targets:
                continue
            module = self._component_module(component)
            rank_pattern, alpha_pattern = {}, {}
            if any(t.conv3x3 for t in targets):
                rank_pattern = {p: self.conv_rank for p in _CONV3X3_PATTERNS}
                alpha_pattern = {p: self.conv_alpha for p in _CONV3X3_PATTERNS}
            config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=cfg.lora_dropout,
                                target_modules=[t.module for t in targets], rank_pattern=rank_pattern,
                                alpha_pattern=alpha_pattern, use_dora=cfg.use_dora, init_lora_weights=True)
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
            named = dict(module.named_modules())
            for t in targets:
                self.layers[t.kohya] = named[t.module]
            self._components[component] = module
        if not self.layers:
            raise ConfigError("no modules to train: check train_unet / train_text_encoder / target_modules")
        for p in self.parameters():
            p.requires_grad_(True)

    def _component_module(self, component: str) -> torch.nn.Module:
        if component == "unet":
            return self.model.unet
        index = 0 if component in ("te", "te1") else 1
        return self.model.text_encoders[index]

    # --- parameters -------------------------------------------------------------------------------
    def parameters(self, component: Optional[str] = None) -> list[torch.nn.Parameter]:
        params = []
        for comp, targets in self.targets.items():
            if component is not None and comp != component and not (component == "te" and comp.startswith("te")):
                continue
            for t in targets:
                layer = self.layers[t.kohya]
                params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
                if self.use_dora:
                    params += list(layer.lora_magnitude_vector[ADAPTER].parameters())
        return params

    def param_groups(self, unet_lr: float, te_lr: float) -> list[dict]:
        groups = []
        unet = self.parameters("unet") if "unet" in self.targets else []
        te = self.parameters("te")
        if unet:
            groups.append({"params": unet, "lr": unet_lr, "name": "unet"})
        if te:
            groups.append({"params": te, "lr": te_lr, "name": "text_encoder"})
        return groups

    def num_modules(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.targets.items()}

    # --- kohya format -----------------------------------------------------------------------------
    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for stem, layer in self.layers.items():
            down = layer.lora_A[ADAPTER].weight
            up = layer.lora_B[ADAPTER].weight
            alpha = float(layer.lora_alpha[ADAPTER]) if hasattr(layer, "lora_alpha") else self.alpha
            out[f"{stem}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
            out[f"{stem}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
            out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
            if self.use_dora:
                mag = layer.lora_magnitude_vector[ADAPTER].weight.detach()
                # peft keeps one magnitude per output channel: stored as [out, 1, ...] so readers that
                # decompose along the output axis (they detect it from the shape) apply it correctly.
                base = layer.get_base_layer().weight
                out[f"{stem}.dora_scale"] = mag.reshape(base.shape[0], *[1] * (base.dim() - 1)).to("cpu", dtype)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor], source: str = "LoRA file") -> None:
        """Loads kohya-format weights; refuses files that do not fit this network (family, rank, targets)."""
        stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
        ours = set(self.layers)
        unknown = sorted(stems - ours)
        if unknown and not (stems & ours):
            hint = _family_hint(stems)
            raise ConfigError(f"{source} does not fit this model: none of its {len(stems)} modules exist here "
                              f"(e.g. {unknown[0]}){hint}")
        if unknown:
            raise ConfigError(f"{source} has {len(unknown)} modules this network does not train (e.g. "
                              f"{unknown[0]}); enable the same options it was trained with (train_text_encoder, "
                              f"conv_lora)")
        missing = sorted(ours - stems)
        if missing:
            raise ConfigError(f"{source} lacks {len(missing)} modules this network trains (e.g. {missing[0]}); "
                              f"disable train_text_encoder / conv_lora to match it")
        with torch.no_grad():
            for stem, layer in self.layers.items():
                down = sd[f"{stem}.lora_down.weight"]
                a = layer.lora_A[ADAPTER].weight
                if down.shape != a.shape:
                    raise ConfigError(f"{source}: rank {down.shape[0]} at {stem} but this run trains rank "
                                      f"{a.shape[0]} (set lora_rank / conv_rank to the file's rank)")
                a.copy_(down)
                layer.lora_B[ADAPTER].weight.copy_(sd[f"{stem}.lora_up.weight"])
                if f"{stem}.alpha" in sd:
                    file_alpha = float(sd[f"{stem}.alpha"])
                    if abs(file_alpha - float(layer.lora_alpha[ADAPTER])) > 1e-6:
                        raise ConfigError(f"{source}: alpha {file_alpha:g} at {stem} but this run uses "
                                          f"{float(layer.lora_alpha[ADAPTER]):g} (set lora_alpha / conv_alpha)")
                if self.use_dora:
                    key = f"{stem}.dora_scale"
                    if key not in sd:
                        raise ConfigError(f"{source} has no DoRA magnitudes; set use_dora: false")
                    mag = layer.lora_magnitude_vector[ADAPTER].weight
                    mag.copy_(sd[key].reshape(mag.shape))

    # --- inference helpers ------------------------------------------------------------------------
    @contextmanager
    def multiplier(self, weight: float) -> Iterator[None]:
        """Temporarily scales every LoRA's contribution (0 = base model), for samples and tests."""
        saved = {}
        for stem, layer in self.layers.items():
            saved[stem] = layer.scaling[ADAPTER]
            layer.scaling[ADAPTER] = saved[stem] * weight
        try:
            yield
        finally:
            for stem, layer in self.layers.items():
                layer.scaling[ADAPTER] = saved[stem]

    def remove(self) -> None:
        """Takes the LoRA layers out again, leaving the base modules exactly as they were."""
        for module in self._components.values():
            _unwrap(module)
        self.layers.clear()
        self._components.clear()


def _unwrap(root: torch.nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    for name, module in list(root.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, module.get_base_layer())
    if hasattr(root, "peft_config"):
        try:
            del root.peft_config
        except AttributeError:
            pass


def _family_hint(stems: set[str]) -> str:
    if any(s.startswith(("lora_te1_", "lora_te2_")) or "_input_blocks_" in s for s in stems):
        return " — it looks like an SDXL LoRA"
    if any(s.startswith("lora_unet_down_blocks_") for s in stems):
        return " — it looks like an SD1/SD2 LoRA"
    return ""


def file_family(metadata: dict[str, str], stems: set[str]) -> Optional[str]:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2"):
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    if any(s.startswith(("lora_te1_", "lora_te2_")) or "_input_blocks_" in s for s in stems):
        return "sdxl"
    return None
