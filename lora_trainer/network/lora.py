"""Plain LoRA / LoCon on a BaseModel through peft, exchanged in kohya's key format.

peft does the injection and the forward math (scale = alpha / rank, as in kohya); this module only
decides the targets and moves weights between peft's layers and kohya keys
(`<stem>.lora_down.weight`, `<stem>.lora_up.weight`, `<stem>.alpha`). DoRA, LoHa and LoKr: network/lycoris.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from ..config import ConfigError, TrainConfig
from ..models.low_precision import keep_adapters_fp32
from .base import NetworkBase, _family_hint

ADAPTER = "default"
# Names of 3x3 convolutions (LoCon) for peft's rank/alpha patterns; they match in every peft version.
_CONV3X3_PATTERNS = ("conv1", "conv2", "conv")


class LoraNetwork(NetworkBase):
    def __init__(self, model, cfg: TrainConfig):
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__(model, cfg)
        if self.use_dora:
            raise ConfigError("DoRA is trained by AdaptedNetwork (network.base.create_network picks it)")
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
                                alpha_pattern=alpha_pattern, init_lora_weights=True)
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
            named = dict(module.named_modules())
            for t in targets:
                self.layers[t.kohya] = named[t.module]
            self._components[component] = module
        self._check_not_empty()
        keep_adapters_fp32(self.layers.values())  # on an fp8 / nf4 base
        for p in self.parameters():
            p.requires_grad_(True)

    def _layer_parameters(self, layer) -> list[torch.nn.Parameter]:
        return [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]

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
        return self.file_layout.to_file(out)

    def load_state_dict(self, sd: dict[str, torch.Tensor], source: str = "LoRA file") -> None:
        """Loads kohya-format weights; refuses files that do not fit this network (family, type, rank, targets)."""
        sd = self.file_layout.from_file(sd, source)
        self.check_file(sd, source)
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

    def deltas(self) -> dict[str, torch.Tensor]:
        """Each module's weight update at multiplier 1 (float32), as a host computes it from the file."""
        out = {}
        for stem, layer in self.layers.items():
            base = layer.get_base_layer().weight
            a, b = layer.lora_A[ADAPTER].weight.float(), layer.lora_B[ADAPTER].weight.float()
            out[stem] = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(base.shape) \
                * float(layer.scaling[ADAPTER])
        return out

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


def file_family(metadata: dict[str, str], stems: set[str]) -> Optional[str]:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("flux") or any(s.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))
                                         for s in stems):
        return "flux"
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2"):
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    if any(s.startswith(("lora_te1_", "lora_te2_")) or "_input_blocks_" in s for s in stems):
        return "sdxl"
    return None
