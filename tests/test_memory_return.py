"""A finished job gives its memory back to the OS (a WebUI runs many jobs in one process)."""
from __future__ import annotations

import sys

import pytest
import torch

from lora_trainer.train import memory_return


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS and malloc_trim are read the Linux way")
def test_freed_heap_goes_back_to_the_os():
    big = torch.empty(8 * 2 ** 20, dtype=torch.uint8)  # freeing an mmapped block raises glibc's mmap threshold,
    del big                                            # so the chunks below come from the heap, as in training
    chunks = [torch.ones(2 ** 20 // 4) for _ in range(300)]  # 300 MiB in 1 MiB tensors
    held = _rss()
    del chunks
    before = _rss()
    memory_return.hand_back()
    after = _rss()
    assert before - after > 200 * 2 ** 20, (held, before, after)  # freed, yet held until handed back


def test_the_runner_hands_memory_back_after_every_job(tiny_files, tmp_path, monkeypatch):
    from conftest import base_config, make_images

    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui import jobs

    calls = []
    monkeypatch.setattr(jobs, "hand_back", lambda: calls.append(jobs.JobRunner))
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "Lora", work_dir=tmp_path / "runs", log=lambda *_: None)
    runner = jobs.JobRunner()
    data = make_images(tmp_path / "data", n=2)
    for name in ("one", "two"):
        runner.start(base_config(train_data_dir=str(data), output_dir=str(host.work_dir()), output_name=name,
                                 max_train_steps=1), host, preview_after=False)
        assert runner.wait(300)
        assert runner.status()["state"] == "finished"
    assert len(calls) == 2
