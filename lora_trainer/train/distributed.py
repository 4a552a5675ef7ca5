"""Data parallelism for runs started by `torchrun` or `accelerate launch`: who does what, and the few
collective operations the training loops need.

The launcher starts the processes and sets RANK / WORLD_SIZE / LOCAL_RANK; accelerate's PartialState joins
them into a process group (NCCL on GPUs, gloo on CPUs) and names each process's device; accelerate's
operations (reduce, broadcast, gather) do the communication. This module adds only the training semantics:

- every process draws the same global batch (batch_size x processes, one bucket) and takes its own slice
  of it, so each rank sees a disjoint shard of the epoch in the one seeded order;
- the loss of a slice is weighted by its share of the global batch and the gradients are summed over the
  processes once per optimizer step (as DDP does with no_sync during accumulation): N processes x batch b
  give the same update as 1 process x batch N*b, also for a last, smaller batch of a bucket;
- the step's loss, a stop asked for on any rank (Ctrl-C, Stop, a NaN) travel in that same reduction, so all
  ranks stop at the same step.

A run inside a WebUI never gets here: `Processes.single()` is the default and imports nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK")


def launched_world_size() -> int:
    """How many processes a launcher (torchrun, accelerate launch) started; 1 without one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def requested_engine() -> str:
    """"FSDP" or "DeepSpeed" when the accelerate config of this launch asks for one, else ""."""
    for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(var, "").lower() in ("true", "1"):
            return name
    return ""


def lost_peer(error: BaseException) -> bool:
    """True when a collective operation failed because another process of the run is gone (it failed and
    exited); gloo and NCCL say so as a RuntimeError / DistBackendError about the closed connection."""
    return type(error).__name__ == "DistBackendError" or (
        isinstance(error, RuntimeError) and "by peer" in str(error))


PEER_FAILED = ("another process of this run failed (its error is printed above, with its rank); this process "
               "stops with it")


@dataclass
class Share:
    """One process's part of a global batch: draws[start:end] of `total` draws."""
    start: int
    end: int
    total: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def weight(self) -> float:
        """The slice's share of the global batch mean (1.0 in a single process)."""
        return self.size / self.total if self.total else 0.0


class Processes:
    """The processes of one run. A single process has rank 0 of 1 and every operation is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: Optional[torch.device] = None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device

    @classmethod
    def single(cls) -> "Processes":
        return cls()

    @classmethod
    def from_environment(cls, device_name: str = "auto") -> "Processes":
        """Joins the process group when a launcher started several processes; a single process otherwise."""
        if launched_world_size() <= 1:
            return cls.single()
        from accelerate import PartialState

        cpu = device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available())
        state = PartialState(cpu=cpu)
        device = torch.device(state.device)
        if device.type == "cpu":
            device = torch.device("cpu")
        return cls(state.process_index, state.num_processes, state.local_process_index, device)

    # ---- who ----------------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"{self.world} processes" if self.distributed else "1 process"

    # ---- data -----------------------------------------------------------------------------------------
    def share(self, total: int, per_process: int) -> Share:
        """This rank's contiguous slice of a global batch of `total` draws (at most per_process each; a last,
        smaller batch leaves the higher ranks fewer or none)."""
        start = min(total, self.rank * per_process)
        return Share(start, min(total, start + per_process), total)

    def split(self, items: Sequence) -> list:
        """Round-robin part of a work list (latents to encode)."""
        return list(items[self.rank::self.world])

    # ---- communication ------------------------------------------------------------------------------
    def sum_gradients(self, params: Sequence[torch.nn.Parameter], values: Sequence[float]) -> list[float]:
        """Sums the gradients of `params` and the numbers in `values` over all processes, in one reduction.
        A parameter without a gradient (a rank whose slice was empty) counts as zeros."""
        if not self.distributed:
            return [float(v) for v in values]
        from accelerate.utils import reduce

        params = list(params)
        device = params[0].device if params else (self.device or torch.device("cpu"))
        parts = [p.grad.detach().reshape(-1).float() if p.grad is not None
                 else torch.zeros(p.numel(), device=p.device) for p in params]
        flat = torch.cat([t.to(device) for t in parts] + [torch.tensor(list(values), dtype=torch.float32,
                                                                       device=device)])
        flat = reduce(flat, reduction="sum")
        offset = 0
        for p in params:
            n = p.numel()
            grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
            offset += n
        return [float(v) for v in flat[offset:].cpu()]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any."""
        return self.sum_gradients([], [1.0 if flag else 0.0])[0] > 0

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Every rank starts from the main process's weights (as DDP does when it wraps a model)."""
        if not self.distributed:
            return
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in params:
                p.data.copy_(broadcast(p.data.clone(), from_process=0))

    def gather(self, obj: Any) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small Python values: RNG states, lists)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            from accelerate.utils import wait_for_everyone

            wait_for_everyone()

    def barrier_quietly(self) -> None:
        """A barrier on the way out: when another process has died the group is gone, and that is no news."""
        try:
            self.barrier()
        except Exception:
            pass

    def close(self, wait_for_others: bool = True) -> None:
        """Leaves the process group on the way out (after the others, when asked): a group left to the
        interpreter's exit tears its communication threads down in no set order, which aborted a finished
        process now and then ("terminate called without an active exception")."""
        if not self.distributed:
            return
        if wait_for_others:
            self.barrier_quietly()
        import torch.distributed as dist

        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass

    def main_first(self, fn: Callable[[], Any], error_types: tuple = (Exception,)) -> Any:
        """Runs fn on the main process only (moving files, writing); every rank then returns its result or
        raises its error, so no rank waits for a main process that has failed."""
        if not self.distributed:
            return fn()
        outcome: list = [None, None]
        if self.is_main:
            try:
                outcome = [fn(), None]
            except error_types as e:
                outcome = [None, (type(e), str(e))]
        outcome = self.broadcast_object(outcome)
        if outcome[1] is not None:
            kind, message = outcome[1]
            raise kind(message)
        return outcome[0]

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]


def effective_batch_note(batch_size: int, processes: int, accumulation: int) -> str:
    total = batch_size * processes * accumulation
    return (f"effective batch {total} (batch_size {batch_size} per device x {processes} "
            f"process{'es' if processes != 1 else ''} x gradient_accumulation_steps {accumulation})")


def resume_note(saved_processes: int, saved_global_batch: Optional[int], processes: int, global_batch: int) -> str:
    """What a resume with another number of processes changes (empty when nothing does)."""
    if saved_processes == processes:
        return ""
    head = f"note: the checkpoint was made with {saved_processes} process(es), this run has {processes}"
    if saved_global_batch in (None, global_batch):
        return (f"{head}; the global batch ({global_batch}) and the data order stay the same; each process's own "
                f"random state (dropout) starts anew, so the continuation is not bit-exact")
    return (f"{head}: the global batch changes from {saved_global_batch} to {global_batch}, so the steps per epoch "
            f"and the order of the rest of this epoch change (the schedule continues at the saved step); resume "
            f"with {saved_processes} process(es) to continue exactly")
