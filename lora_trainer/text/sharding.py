"""FSDP for a text-generation LoRA whose base model is too large for one device: the frozen base weights (and the
LoRA weights, gradients and optimizer state) are sharded across the processes, one transformer block per unit,
with torch's FSDP2 (`fully_shard`) on the process group accelerate set up.

Chosen by the accelerate config (`distributed_type: FSDP`, configs/accelerate/fsdp.yaml), which `accelerate
launch` passes on as ACCELERATE_USE_FSDP / FSDP_TRANSFORMER_CLS_TO_WRAP. Everything that leaves the run (the
adapter folder, checkpoints) holds whole tensors, gathered here, so it is the same peft folder and the same
checkpoint format as a single-process run's, and a checkpoint resumes on any number of processes.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..config import ConfigError
from ..train.distributed import requested_engine

WRAP_ENV = "FSDP_TRANSFORMER_CLS_TO_WRAP"


def fsdp_requested() -> bool:
    return requested_engine() == "FSDP"


def block_classes(model) -> set[str]:
    """Class names of the blocks to shard one by one: the accelerate config's, else the model's own list of
    modules that must not be split (transformers' _no_split_modules)."""
    named = [c.strip() for c in os.environ.get(WRAP_ENV, "").split(",") if c.strip()]
    if named:
        return set(named)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(inner, "_no_split_modules", None) or [])


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise ConfigError(f"FSDP needs torch 2.4 or newer (FSDP2, fully_shard); this is torch "
                              f"{torch.__version__}") from None
    return fully_shard


class ShardedModel:
    """A peft model sharded in place; gathers and scatters its trainable weights and optimizer state whole."""

    def __init__(self, model, procs):
        if not procs.distributed:
            raise ConfigError("FSDP (accelerate config distributed_type: FSDP) needs several processes; launch "
                              "with accelerate launch --config_file configs/accelerate/fsdp.yaml")
        from torch.distributed.device_mesh import init_device_mesh

        fully_shard = _fully_shard()
        classes = block_classes(model)
        blocks = [m for m in model.modules() if type(m).__name__ in classes]
        if not blocks:
            raise ConfigError(f"FSDP: no module of class {', '.join(sorted(classes)) or '(none named)'} in this "
                              f"model; set fsdp_transformer_layer_cls_to_wrap in the accelerate config to its "
                              f"transformer block class (e.g. LlamaDecoderLayer)")
        mesh = init_device_mesh(procs.device.type, (procs.world,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.blocks = len(blocks)
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    def params(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def full_trainable(self) -> dict[str, torch.Tensor]:
        """The trainable (LoRA) weights, whole, in fp32 on the CPU, on every process: only they are gathered,
        never the base. Every process must call it."""
        named = dict(self.model.named_parameters())
        return {n: _whole(named[n].detach()).float() for n in self.trainable}

    def load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        """Whole weights (every process holds them) into this process's shards."""
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n in self.trainable:
                named[n].copy_(_shard_like(weights[n], named[n]))

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer state with whole tensors, in the layout of an unsharded run's optimizer.state_dict()
        (parameters numbered in the same order), so the checkpoints are alike. Every process must call it."""
        state = optimizer.state_dict()
        return {"state": {i: {k: _whole(v) for k, v in s.items()} for i, s in state["state"].items()},
                "param_groups": state["param_groups"]}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        params = self.params()
        optimizer.load_state_dict({
            "state": {i: {k: _shard_like(v, params[int(i)]) for k, v in s.items()} for i, s in state["state"].items()},
            "param_groups": state["param_groups"]})


def _dtensor():
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:
        from torch.distributed._tensor import DTensor, distribute_tensor
    return DTensor, distribute_tensor


def _whole(t):
    DTensor, _ = _dtensor()
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu") if isinstance(t, torch.Tensor) else t


def _shard_like(value, param):
    """`value` (a whole tensor of the parameter's shape) cut the way `param` is sharded; anything else as it is."""
    DTensor, distribute_tensor = _dtensor()
    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device, param.dtype if value.is_floating_point() else value.dtype),
                                 param.device_mesh, param.placements)
    return value


class SavedState:
    """Stands in for an optimizer in state.save_checkpoint when its state was gathered already."""

    def __init__(self, state: Optional[dict]):
        self._state = state

    def state_dict(self) -> Optional[dict]:
        return self._state
