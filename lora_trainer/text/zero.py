"""DeepSpeed ZeRO (stage 2 or 3) for a text-generation LoRA, chosen by the accelerate config (`distributed_type:
DEEPSPEED`, configs/accelerate/zero2.yaml / zero3.yaml), which `accelerate launch` passes on as
ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, ACCELERATE_DEEPSPEED_OFFLOAD_*_DEVICE and
ACCELERATE_DEEPSPEED_CONFIG_FILE.

DeepSpeed's engine does what it is made for: the backward with the gradients reduced and partitioned over the
processes, gradient clipping, the optimizer step on this process's partition, and with ZeRO-3 the frozen base
weights partitioned too and gathered layer by layer. The run keeps the rest as in every other run: the data shards
and loss normalisation, the learning-rate schedule (on the same parameter groups), NaN and stop handling, and the
checkpoints. Those hold whole tensors, gathered with DeepSpeed's safe_get_full_* functions, in the layout of a
single-process run's optimizer.state_dict(): the same adapter folder and checkpoint format, resumable on any
number of processes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from ..train.distributed import requested_engine

STAGE_ENV = "ACCELERATE_DEEPSPEED_ZERO_STAGE"
CONFIG_FILE_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
OFFLOAD_ENV = {"offload_optimizer": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
               "offload_param": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"}
# what a DeepSpeed config file may decide; batch sizes, optimizer, scheduler and precision come from ours
ZERO_KEYS = ("zero_optimization",)


def deepspeed_requested() -> bool:
    return requested_engine() == "DeepSpeed"


def zero_config(batch_size: int, accumulation: int, max_grad_norm: float) -> dict:
    """The DeepSpeed config of this launch: ZeRO settings from accelerate's variables (or its deepspeed_config_file),
    everything else from the lora-trainer config."""
    zero: dict = {}
    path = os.environ.get(CONFIG_FILE_ENV, "").strip()
    if path and path.lower() != "none":
        try:
            given = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"deepspeed_config_file {path}: cannot be read as JSON ({type(e).__name__})") from None
        zero = dict(given.get("zero_optimization") or {})
    stage = os.environ.get(STAGE_ENV, "").strip()
    if stage:
        zero["stage"] = int(stage)
    zero.setdefault("stage", 2)
    if zero["stage"] not in (2, 3):
        raise ConfigError(f"DeepSpeed ZeRO stage {zero['stage']}: lora-trainer trains with stage 2 (gradients and "
                          f"optimizer state partitioned) or 3 (the base weights too); set zero_stage: 2 or 3")
    for key, var in OFFLOAD_ENV.items():
        device = os.environ.get(var, "").strip().lower()
        if device in ("cpu", "nvme"):
            zero[key] = {"device": device}
    return {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": accumulation,
            "gradient_clipping": float(max_grad_norm or 0.0), "zero_optimization": zero,
            # the run owns the accumulation window (its last one in an epoch may be shorter): step() ends it
            "managed_gradient_accumulation": False,
            # our own torch optimizer, also where the optimizer state is offloaded to the CPU
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


class ZeroModel:
    """A peft model inside a DeepSpeed engine. Same interface as sharding.ShardedModel (whole weights and optimizer
    state in and out, every process calling), plus the backward and the step, which the engine does."""

    def __init__(self, model, optimizer, cfg, procs):
        if not procs.distributed:
            raise ConfigError("DeepSpeed (accelerate config distributed_type: DEEPSPEED) needs several processes; "
                              "launch with accelerate launch --config_file configs/accelerate/zero2.yaml")
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("this launch asks for DeepSpeed, which is not installed: pip install deepspeed, or "
                              "launch with configs/accelerate/fsdp.yaml (FSDP, part of torch)") from None
        if cfg.mixed_precision == "fp16":
            raise ConfigError("DeepSpeed: mixed_precision fp16 needs a loss scale this run does not keep; use bf16 "
                              "(or no)")
        self.config = zero_config(cfg.batch_size, cfg.gradient_accumulation_steps, cfg.max_grad_norm)
        self.stage = self.config["zero_optimization"]["stage"]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        # a resumed run loaded its state into the torch optimizer, keyed by these parameters: carried over below
        carried = optimizer.state_dict() if optimizer.state else None
        optimizer.state.clear()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 model_parameters=params, config=self.config,
                                                                 dist_init_required=False)
        if not hasattr(self.engine, "managed_gradient_accumulation"):
            raise ConfigError(f"DeepSpeed {deepspeed.__version__} cannot leave the accumulation window to the run; "
                              f"pip install -U deepspeed (0.18 or newer), or use configs/accelerate/fsdp.yaml")
        self.model = model
        self.torch_optimizer = optimizer
        if carried is not None:
            self.load_optimizer_state(optimizer, carried)

    def describe(self) -> str:
        what = "gradients and optimizer state" if self.stage == 2 else "base weights, gradients and optimizer state"
        offload = [k.split("_")[1] for k in OFFLOAD_ENV if k in self.config["zero_optimization"]]
        return (f"DeepSpeed ZeRO-{self.stage}: {what} partitioned over the processes"
                + (f" ({' and '.join(offload)} offloaded to the CPU)" if offload else ""))

    def _named(self) -> dict:
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self.names}

    # ---- the step ---------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward, accumulated until step(). DeepSpeed averages over the processes, so the
        caller's loss is scaled by the number of processes to sum."""
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is normalised over the window already

    def step(self) -> Optional[float]:
        """The optimizer step of the window (clipped by the engine); the gradient norm when clipping measured it."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if self.config["gradient_clipping"] > 0 else None
        return None if norm is None else float(norm)

    # ---- whole tensors in and out -----------------------------------------------------------------------------
    def full_trainable(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().to("cpu", torch.float32).clone()
                for n, p in self._named().items()}

    def load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        """Into the engine's fp32 master weights (the LoRA the next step starts from, and what is saved)."""
        from deepspeed.utils import safe_set_full_fp32_param

        for n, p in self._named().items():
            safe_set_full_fp32_param(p, weights[n].to(torch.float32))

    def optimizer_state(self, optimizer) -> dict:
        """In the layout of a single-process run's optimizer.state_dict(). Every process must call it."""
        from deepspeed.utils import safe_get_full_optimizer_state

        inner = self._flat_state()
        tensor_keys = [k for k, v in inner.items() if _per_element(v)]
        scalars = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in inner.items()
                   if k not in tensor_keys}
        state = {}
        for i, p in enumerate(self._named().values()):
            entry = dict((k, v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items())
            for key in tensor_keys:
                entry[key] = safe_get_full_optimizer_state(p, key).detach().to("cpu").clone()
            state[i] = entry
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(self.names)))}
                  for g in self.torch_optimizer.param_groups[:1]]
        return {"state": state if inner else {}, "param_groups": groups}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        saved = state.get("state") or {}
        for group, given in zip(self.torch_optimizer.param_groups, state.get("param_groups") or []):
            group.update({k: v for k, v in given.items() if k != "params"})
        if not saved:
            return
        first = saved.get(0, saved.get("0"))
        tensor_keys = [k for k, v in first.items() if _per_element(v)]  # moments; the rest (step) are scalars
        # the torch optimizer creates its state at its first step: make it now, on DeepSpeed's flat partitions
        for flat in self._flat_params():
            self.torch_optimizer.state[flat] = {
                k: (torch.zeros_like(flat) if k in tensor_keys else
                    (v.clone() if torch.is_tensor(v) else v)) for k, v in first.items()}
        for i, p in enumerate(self._named().values()):
            entry = saved.get(i, saved.get(str(i)))
            for key in tensor_keys:
                safe_set_full_optimizer_state(p, entry[key].to(torch.float32), key)

    def _flat_params(self) -> list:
        """DeepSpeed's fp32 partitions that its wrapped torch optimizer steps (ZeRO-2 keeps them in
        single_partition_of_fp32_groups, ZeRO-3 in fp32_partitioned_groups_flat)."""
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            flat = getattr(self.optimizer, attr, None)
            if flat:
                return list(flat)
        raise ConfigError(f"this DeepSpeed version ({type(self.optimizer).__name__}) keeps its partitions where "
                          f"lora-trainer does not look; use FSDP (configs/accelerate/fsdp.yaml)")

    def _flat_state(self) -> dict:
        for flat in self._flat_params():
            if flat in self.torch_optimizer.state:
                return self.torch_optimizer.state[flat]
        return {}


def _per_element(value) -> bool:
    """An optimizer-state entry with one value per weight (Adam's moments), not a scalar such as its step."""
    return torch.is_tensor(value) and value.dim() > 0 and value.numel() > 1
