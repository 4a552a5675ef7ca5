"""Does a long-lived host process get its memory back after each training job? Several jobs in one process.

    python bench/bench_memory_return.py                  # SD 1.5-size fp16 checkpoint, 4 jobs at 256 px, CPU
    python bench/bench_memory_return.py --size tiny      # the tiny model (quick)
    python bench/bench_memory_return.py --jobs 6 --resolution 128

The process is what the tab runs in: a host with its checkpoint loaded (the standalone host, the same JobRunner the
WebUI tab uses), one preview rendered before the first job (the host's own pipeline warmed up), then N jobs of the
same config one after the other, each with its LoRA-card preview. RSS is read before the first job and after each
job. Two processes side by side: `ours` (the runner hands memory back after a job: gc, CUDA cache, glibc's
malloc_trim) and `kept` (the same with the hand-back turned off: what the OS sees when freed memory stays in the
allocator). `rise` is RSS after the job minus RSS before the first; `per job` is the growth since the job before.
On CUDA the same is printed for torch.cuda.memory_reserved.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: F401  (first: offline hubs, passive OpenMP, this checkout importable)


def _rss() -> int:
    from bench_load_memory import _status_bytes

    return _status_bytes("VmRSS")


def checkpoint(size: str, workdir: Path) -> Path:
    if size == "tiny":
        from lora_trainer.models.tiny import ensure_tiny_model

        return ensure_tiny_model(workdir, "sd1")
    from bench_load_memory import checkpoint_shapes, write_checkpoint

    path = workdir / "random-sd15-fp16.safetensors"
    if not path.is_file():
        write_checkpoint(path, checkpoint_shapes("sd15"), "F16")
    return path


def worker(args, out: str, hand_back: bool) -> None:
    import torch

    torch.set_num_threads(2)
    import lora_trainer.ui.jobs as jobs
    from bench_load_memory import make_images
    from lora_trainer.config import TrainConfig
    from lora_trainer.hosts.standalone import StandaloneHost

    if not hand_back:
        jobs.hand_back = lambda: None
    work = Path(tempfile.mkdtemp(prefix="bench-memreturn-"))
    data = make_images(work / "data", args.resolution)
    host = StandaloneHost(str(checkpoint(args.size, Path(args.workdir))), work / "Lora", work_dir=work / "runs",
                          log=lambda *_: None)
    host.checkpoint_info()  # loads the model, as a WebUI has it loaded
    host.preview("a red square", None, 1.0, 1, 4, args.resolution)
    cuda = torch.cuda.is_available()
    rows = [{"job": 0, "rss": _rss(), "reserved": torch.cuda.memory_reserved() if cuda else 0}]
    runner = jobs.JobRunner()
    for i in range(1, args.jobs + 1):
        cfg = TrainConfig(train_data_dir=str(data), output_dir=str(work / "runs"), output_name=f"job{i}",
                          resolution=args.resolution, batch_size=1, lora_rank=16, max_train_steps=args.steps,
                          mixed_precision="no", cache_latents=True, enable_bucket=False, log_with="none",
                          sample_steps=4)
        runner.start(cfg, host)
        runner.wait()
        st = runner.status()
        if st["state"] != "finished":
            raise SystemExit(f"job {i} ended {st['state']}: {st.get('error')}")
        time.sleep(0.5)
        rows.append({"job": i, "rss": _rss(), "reserved": torch.cuda.memory_reserved() if cuda else 0})
    Path(out).write_text(json.dumps({"rows": rows, "cuda": cuda}))


def run(args, hand_back: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--size", args.size, "--jobs", str(args.jobs), "--resolution",
           str(args.resolution), "--steps", str(args.steps), "--workdir", args.workdir,
           "--worker", out, "1" if hand_back else "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if proc.returncode:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "sd15"], default="sd15")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lora-trainer-bench"))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args, args.worker[0], args.worker[1] == "1")
        return
    checkpoint(args.size, Path(args.workdir))  # written once, outside the measured processes
    ours, kept = run(args, True), run(args, False)
    mib = 2 ** 20
    print(f"{args.size}, {args.jobs} jobs of {args.steps} steps at {args.resolution} px, one process each side")
    print(f"{'':>6} | {'ours: RSS MiB':>13} {'rise':>7} {'per job':>8} | {'kept: RSS MiB':>13} {'rise':>7} {'per job':>8}")
    for a, b in zip(ours["rows"], kept["rows"]):
        cells = []
        for side, row in ((ours, a), (kept, b)):
            first, prev = side["rows"][0], side["rows"][max(0, row["job"] - 1)]
            cells.append(f"{row['rss'] / mib:13.0f} {(row['rss'] - first['rss']) / mib:+7.0f} "
                         f"{(row['rss'] - prev['rss']) / mib:+8.0f}")
        label = "before" if a["job"] == 0 else f"job {a['job']}"
        print(f"{label:>6} | {cells[0]} | {cells[1]}")
    if ours["cuda"]:
        print("CUDA reserved MiB (ours / kept):",
              ", ".join(f"{a['reserved'] / mib:.0f}/{b['reserved'] / mib:.0f}" for a, b in zip(ours["rows"], kept["rows"])))


if __name__ == "__main__":
    main()
