"""LoHa, LoKr, and LoRA/LoCon with DoRA or the LyCORIS dropouts: `AdaptedLayer`s put in place of the targets.

The file is what LyCORIS writes and the hosts read: `<stem>.<factor name>`, `<stem>.alpha` and, with DoRA,
`<stem>.dora_scale` of shape [1, in, 1, 1] (the per-input-channel magnitude A1111 and Forge apply).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..config import ConfigError, TrainConfig
from .adapters import FACTORS, AdaptedLayer
from .base import TYPE_NAMES, NetworkBase

_FACTOR_OPTIONS = ("lokr_factor", "decompose_both", "lokr_full_rank", "use_tucker")


class AdaptedNetwork(NetworkBase):
    def __init__(self, model, cfg: TrainConfig):
        super().__init__(model, cfg)
        if self.file_layout.groups:
            raise ConfigError(f"{TYPE_NAMES[self.network_type]}{' with DoRA' if self.use_dora else ''} cannot be "
                              f"written for this model's fused modules (e.g. {self.file_layout.groups[0].stem}); "
                              f"use network_type: lora without DoRA or dropouts")
        factor_cls = FACTORS[self.network_type]
        options = {k: getattr(cfg, k) for k in _FACTOR_OPTIONS}
        for component, targets in self.targets.items():
            if not targets:
                continue
            root = self._component_module(component)
            for t in targets:
                parent_name, _, child = t.module.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                base = getattr(parent, child)
                rank, alpha = (self.conv_rank, self.conv_alpha) if t.conv3x3 else (self.rank, self.alpha)
                factors = factor_cls(base.weight.shape, rank, alpha, **options)
                layer = AdaptedLayer(base, factors, use_dora=self.use_dora, dropout=cfg.lora_dropout,
                                     rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout)
                layer.to(base.weight.device)
                setattr(parent, child, layer)
                self.layers[t.kohya] = layer
            self._components[component] = root
        self._check_not_empty()
        for p in self.parameters():
            p.requires_grad_(True)

    def _layer_parameters(self, layer: AdaptedLayer) -> list[torch.nn.Parameter]:
        params = list(layer.factors.parameters())
        if layer.dora_scale is not None:
            params.append(layer.dora_scale)
        return params

    def set_dropouts(self, on: bool) -> None:
        for layer in self.layers.values():
            layer.dropouts_on = on

    # --- file format ------------------------------------------------------------------------------
    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for stem, layer in self.layers.items():
            tensors = dict(layer.factors.file_tensors())
            if layer.dora_scale is not None:
                tensors["dora_scale"] = layer.dora_scale
            for suffix, value in tensors.items():
                out[f"{stem}.{suffix}"] = value.detach().to("cpu", dtype).contiguous()
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor], source: str = "LoRA file") -> None:
        """Loads a file of this type and layout; refuses others with what to set."""
        per_stem = self.check_file(sd, source)
        with torch.no_grad():
            for stem, layer in self.layers.items():
                tensors = per_stem[stem]
                layer.factors.load_file_tensors(tensors, f"{source} at {stem}")
                if layer.dora_scale is not None:
                    value = tensors["dora_scale"]
                    if value.numel() != layer.dora_scale.numel() or value.shape[0] != 1:
                        raise ConfigError(f"{source} at {stem}: dora_scale has shape {list(value.shape)}, not the "
                                          f"per-input-channel layout {list(layer.dora_scale.shape)} the WebUIs "
                                          f"apply; it cannot be continued here")
                    layer.dora_scale.copy_(value.reshape(layer.dora_scale.shape))

    def deltas(self) -> dict[str, torch.Tensor]:
        """Each module's weight update at multiplier 1 (float32), as a host computes it from the file."""
        with torch.no_grad():
            return {stem: layer.effective_delta() for stem, layer in self.layers.items()}

    # --- inference helpers ------------------------------------------------------------------------
    @contextmanager
    def multiplier(self, weight: float) -> Iterator[None]:
        """Temporarily scales every module's update (0 = base model), as a host's LoRA weight does."""
        saved = {stem: layer.multiplier for stem, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.multiplier = layer.multiplier * weight
        try:
            yield
        finally:
            for stem, layer in self.layers.items():
                layer.multiplier = saved[stem]

    def remove(self) -> None:
        """Puts the base modules back, exactly as they were."""
        for root in self._components.values():
            for name, module in list(root.named_modules()):
                if isinstance(module, AdaptedLayer):
                    parent_name, _, child = name.rpartition(".")
                    parent = root.get_submodule(parent_name) if parent_name else root
                    setattr(parent, child, module.base_layer)
        self.layers.clear()
        self._components.clear()
