"""A finished job gives its memory back to the OS (a WebUI runs many jobs in one process)."""
from __future__ import annotations

import sys

import pytest

FRAGMENTED = """
import ctypes, json, torch
from lora_trainer.train import memory_return
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 64 * 2 ** 20)  # M_MMAP_THRESHOLD: 1 MiB blocks come from the heap, as after a run's churn
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
chunks = [torch.ones(2 ** 20 // 4) for _ in range(600)]
del chunks[::2]  # 300 MiB freed in holes between live blocks: the heap cannot shrink from its top
before = rss()
memory_return.hand_back()
print(json.dumps({"before": before, "after": rss(), "live": len(chunks)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS and malloc_trim are read the Linux way")
def test_freed_heap_goes_back_to_the_os():
    """Freed memory in holes of the heap stays in the process until it is handed back (its own process: the
    allocator settings it needs must not change the test session's)."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    assert numbers["live"] == 300
    assert numbers["before"] - numbers["after"] > 200 * 2 ** 20, numbers


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
