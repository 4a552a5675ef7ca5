"""Run by torchrun in tests/test_distributed.py: `python -m lora_trainer ...`, except that the process of rank
LT_TEST_STOP_RANK asks for a stop (as its Ctrl-C / Stop button would) when step LT_TEST_STOP_STEP is done, so
the test knows the stop comes from a process that is not the one that writes."""
import os
import sys

from lora_trainer.train import trainer as trainer_module

_init = trainer_module.Trainer.__init__


def _init_with_stop(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    rank, step = int(os.environ["LT_TEST_STOP_RANK"]), int(os.environ["LT_TEST_STOP_STEP"])
    if self.procs.rank == rank:
        self.events.subscribe(lambda e: self.stop.set("test stop") if e.kind == "step" and e.step == step else None)


trainer_module.Trainer.__init__ = _init_with_stop

if __name__ == "__main__":
    from lora_trainer.cli import main

    sys.exit(main(sys.argv[1:]))
