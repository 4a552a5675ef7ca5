"""Run by torchrun in tests/test_distributed.py: `python -m lora_trainer ...`, except that the process of rank
LT_TEST_STOP_RANK asks for a stop (as its Ctrl-C / Stop button would) when step LT_TEST_STOP_STEP is done, so
the test knows the stop comes from a process that is not the one that writes; and the process of rank
LT_TEST_CRASH_RANK fails (as an out-of-memory error would) in its LT_TEST_CRASH_FORWARD-th forward pass.
Without those variables it trains as `python -m lora_trainer` does. On the way out each process says whether it left the process group."""
import atexit
import os
import sys

import torch.distributed as dist

from lora_trainer.train import trainer as trainer_module

_init = trainer_module.Trainer.__init__


def _init_with_stop(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if "LT_TEST_STOP_RANK" not in os.environ:
        return
    rank, step = int(os.environ["LT_TEST_STOP_RANK"]), int(os.environ["LT_TEST_STOP_STEP"])
    if self.procs.rank == rank:
        self.events.subscribe(lambda e: self.stop.set("test stop") if e.kind == "step" and e.step == step else None)


_forward = trainer_module.Trainer._forward
_forwards = [0]


def _forward_or_crash(self, *args, **kwargs):
    _forwards[0] += 1
    if str(self.procs.rank) == os.environ.get("LT_TEST_CRASH_RANK") and \
            _forwards[0] == int(os.environ["LT_TEST_CRASH_FORWARD"]):
        raise RuntimeError("out of memory (injected by the test)")
    return _forward(self, *args, **kwargs)


trainer_module.Trainer.__init__ = _init_with_stop
trainer_module.Trainer._forward = _forward_or_crash

if __name__ == "__main__":
    rank = os.environ.get("RANK", "?")
    atexit.register(lambda: print(f"[rank {rank}] process group still open at exit: {dist.is_initialized()}",
                                  flush=True))
    from lora_trainer.cli import main

    sys.exit(main(sys.argv[1:]))
