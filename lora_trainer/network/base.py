"""What every network type shares: its targets, parameter groups, the file checks, the `ss_network_*` metadata.

`create_network(model, cfg)` picks the implementation: peft for plain LoRA / LoCon, `AdaptedNetwork`
(network/lycoris.py) for LoHa, LoKr, DoRA and the LyCORIS dropouts. The trainer, the previews and the hosts
only see this interface (parameters, param_groups, state_dict, load_state_dict, multiplier, remove).
"""
from __future__ import annotations

import json
from typing import Optional

import torch

from ..config import ConfigError, TrainConfig
from .fused import layout_of
from .targets import Target, all_targets

TYPE_NAMES = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr"}


def file_network_type(sd: dict) -> Optional[str]:
    """lora, locon, loha or lokr from a file's keys (None: no adapter keys); LoCon: a LoRA with 3x3 convolutions."""
    suffixes = {k.split(".", 1)[1] if "." in k else k for k in sd}
    if any(s.startswith("hada_") for s in suffixes):
        return "loha"
    if any(s.startswith("lokr_") for s in suffixes):
        return "lokr"
    downs = [v for k, v in sd.items() if k.endswith(".lora_down.weight")]
    if downs:
        return "locon" if any(v.dim() == 4 and tuple(v.shape[2:]) != (1, 1) for v in downs) else "lora"
    return None


def network_metadata(cfg: TrainConfig) -> tuple[str, dict[str, str]]:
    """ss_network_module and ss_network_args as kohya (networks.lora) or LyCORIS (lycoris.kohya) write them."""
    kind = cfg.adapter_type
    conv = {"conv_dim": str(cfg.effective_conv_rank), "conv_alpha": str(cfg.effective_conv_alpha)}
    lycoris = kind in ("loha", "lokr") or cfg.use_dora or cfg.rank_dropout or cfg.module_dropout
    if not lycoris:
        return "networks.lora", (conv if kind == "locon" else {})
    args = {"algo": kind, **conv} if kind != "lora" else {"algo": "lora"}
    if kind == "lokr":
        args.update(factor=str(cfg.lokr_factor), decompose_both=str(cfg.decompose_both),
                    full_matrix=str(cfg.lokr_full_rank))
    if kind in ("loha", "lokr"):
        args["use_tucker"] = str(cfg.use_tucker)
    if cfg.use_dora:
        args["dora_wd"] = "True"
    for key in ("rank_dropout", "module_dropout"):
        if getattr(cfg, key):
            args[key] = str(getattr(cfg, key))
    if cfg.lora_dropout:
        args["dropout"] = str(cfg.lora_dropout)
    return "lycoris.kohya", args


class NetworkBase:
    """Targets and bookkeeping; subclasses inject their layers into `self.layers` (kohya stem -> layer)."""

    def __init__(self, model, cfg: TrainConfig):
        self.model = model
        self.cfg = cfg
        self.network_type = cfg.adapter_type
        self.rank = cfg.lora_rank
        self.alpha = cfg.effective_alpha
        self.conv_rank = cfg.effective_conv_rank
        self.conv_alpha = cfg.effective_conv_alpha
        self.use_dora = cfg.use_dora
        self.targets: dict[str, list[Target]] = all_targets(model, cfg.train_unet, cfg.train_text_encoder,
                                                            cfg.trains_convs, cfg.clip_skip)
        self.layers: dict[str, torch.nn.Module] = {}
        self._components: dict[str, torch.nn.Module] = {}
        # how our modules map to the file's (identity unless the file fuses modules we train apart)
        self.file_layout = layout_of(self.targets, self._component_module)

    def _component_module(self, component: str) -> torch.nn.Module:
        if component == "unet":
            return self.model.unet
        index = 0 if component in ("te", "te1") else 1
        return self.model.text_encoders[index]

    def _check_not_empty(self) -> None:
        if not self.layers:
            raise ConfigError("no modules to train: check train_unet / train_text_encoder / target_modules")

    def parameters(self, component: Optional[str] = None) -> list[torch.nn.Parameter]:
        params = []
        for comp, targets in self.targets.items():
            if component is not None and comp != component and not (component == "te" and comp.startswith("te")):
                continue
            for t in targets:
                params += self._layer_parameters(self.layers[t.kohya])
        return params

    def _layer_parameters(self, layer) -> list[torch.nn.Parameter]:
        raise NotImplementedError

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

    def set_dropouts(self, on: bool) -> None:
        """Dropouts act only while training (the trainer switches them on, samples and previews run without)."""

    def describe(self) -> str:
        kind = TYPE_NAMES[self.network_type]
        text = f"{kind} rank {self.rank} alpha {self.alpha:g}"
        if self.network_type != "lora":
            text += f", convolutions rank {self.conv_rank} alpha {self.conv_alpha:g}"
        return text + (", DoRA" if self.use_dora else "")

    def check_file(self, sd: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
        """The file's tensors per kohya stem, after checking that it fits this network (modules, type, DoRA)."""
        per_stem: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in sd.items():
            stem, _, suffix = key.partition(".")
            per_stem.setdefault(stem, {})[suffix] = value
        stems, ours = set(per_stem), set(self.layers)
        unknown = sorted(stems - ours)
        if unknown and not (stems & ours):
            raise ConfigError(f"{source} does not fit this model: none of its {len(stems)} modules exist here "
                              f"(e.g. {unknown[0]}){_family_hint(stems)}")
        kind = file_network_type(sd)
        mine = self.network_type
        if kind is not None and {kind, mine} - {"lora", "locon"} and kind != mine:
            raise ConfigError(f"{source} is a {TYPE_NAMES[kind]} file but this run trains {TYPE_NAMES[mine]}; set "
                              f"network_type: {kind} to continue it (or start from scratch)")
        if unknown:
            raise ConfigError(f"{source} has {len(unknown)} modules this network does not train (e.g. "
                              f"{unknown[0]}); enable the same options it was trained with (train_text_encoder, "
                              f"network_type: locon)")
        missing = sorted(ours - stems)
        if missing:
            raise ConfigError(f"{source} lacks {len(missing)} modules this network trains (e.g. {missing[0]}); "
                              f"disable train_text_encoder / use network_type: lora to match it")
        has_dora = any("dora_scale" in w for w in per_stem.values())
        if has_dora != self.use_dora:
            raise ConfigError(f"{source} {'has' if has_dora else 'has no'} DoRA magnitudes (dora_scale); set "
                              f"use_dora: {'true' if has_dora else 'false'} to match it")
        return per_stem


def _family_hint(stems: set[str]) -> str:
    if any(s.startswith(("lora_te1_", "lora_te2_")) or "_input_blocks_" in s for s in stems):
        return " — it looks like an SDXL LoRA"
    if any(s.startswith("lora_unet_down_blocks_") for s in stems):
        return " — it looks like an SD1/SD2 LoRA"
    return ""


def uses_peft(cfg: TrainConfig) -> bool:
    return cfg.adapter_type in ("lora", "locon") and not (cfg.use_dora or cfg.rank_dropout or cfg.module_dropout)


def create_network(model, cfg: TrainConfig):
    if uses_peft(cfg):
        from .lora import LoraNetwork

        return LoraNetwork(model, cfg)
    from ..models.low_precision import low_precision_layers
    from .lycoris import AdaptedNetwork

    if low_precision_layers(model.unet):
        raise ConfigError(f"network_type {cfg.network_type}{' (DoRA)' if cfg.use_dora else ''} needs the base "
                          f"weights in full on the device: this base is stored in fp8 / nf4 or streamed from CPU "
                          f"memory. Train a plain LoRA (network_type: lora, use_dora: false), or a bf16 / fp16 base "
                          f"kept on the device (fp8_base: false, nf4_base: false, blocks_to_swap: 0)")
    return AdaptedNetwork(model, cfg)
