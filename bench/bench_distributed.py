"""Data-parallel training: 1 process vs N processes at the same global batch, on the tiny SD1 model.

    python bench/bench_distributed.py                 # CPU: 1 x batch 2 vs 2 processes (gloo) x batch 1
    python bench/bench_distributed.py --steps 30 --resolution 64
    python bench/bench_distributed.py --gpu           # CUDA: 1 GPU vs every GPU of the machine (NCCL)

Each side is started by torchrun (`python -m torch.distributed.run --standalone`) as a user would, running the
Trainer with the launcher's processes (lora_trainer.train.distributed). The main process records when each
"step" event arrives; s/step is the median interval after the warm-up steps (start-up, model load and latent
caching excluded). Both sides train the same global batch in the same data order, so their final LoRAs must be
equal to float tolerance: the largest absolute difference is printed, next to the difference between two
1-process runs with different thread counts (float rounding alone).

On a 2-core machine scaling means nothing (two processes share the two cores that one process used); the
numbers say what the synchronisation costs and that the result does not change.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_images(folder: Path, n: int, size: int) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (30 * i % 255, 90, 160))
        ImageDraw.Draw(img).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(220, 40 * i % 255, 20))
        img.save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(f"ball {i}, simple background")
    return folder


def worker(config_path: str, out_path: str) -> int:
    """Runs inside each launched process."""
    import torch

    from lora_trainer.config import load_yaml
    from lora_trainer.train.distributed import Processes
    from lora_trainer.train.events import EventBus
    from lora_trainer.train.trainer import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_yaml(config_path)
    procs = Processes.from_environment(cfg.device)
    events, times = EventBus(), []
    events.subscribe(lambda e: times.append(time.perf_counter()) if e.kind == "step" else None)
    result = Trainer(cfg, events, processes=procs).run()
    if procs.is_main:
        Path(out_path).write_text(json.dumps({"times": times, "lora": str(result.lora_path),
                                              "processes": procs.world}))
    return 0


def launch(n: int, config: Path, out: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", str(config), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{n} process(es) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--global-batch", type=int, default=2)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--gpu", action="store_true", help="1 GPU vs all GPUs of this machine")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)

    import torch
    import yaml

    from lora_trainer.models.tiny import write_tiny_single_file
    from lora_trainer.network.kohya_file import read_lora

    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu: torch sees no CUDA GPU; nothing to measure")
            return 1
        many, device = torch.cuda.device_count(), "cuda"
    else:
        many, device = 2, "cpu"
    if args.global_batch % many:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of {many}")
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        tmp = Path(tmp)
        base = write_tiny_single_file(tmp / "tiny-sd1.safetensors", "sd1")
        data = make_images(tmp / "data", args.images, args.resolution)
        rows = []
        cores = os.cpu_count() or 2
        # (processes, threads per process): the last run repeats the first with other threads, the noise floor
        plan = [(1, cores), (many, max(1, cores // many)), (1, max(1, cores // 2))] if device == "cpu" else \
            [(1, cores), (many, max(1, cores // many))]
        for run_index, (n, threads) in enumerate(plan):
            keys = dict(base_model=str(base), train_data_dir=str(data), output_dir=str(tmp / f"out{run_index}"),
                        output_name=f"p{run_index}", resolution=args.resolution, min_bucket_reso=64, bucket_reso_steps=32,
                        batch_size=args.global_batch // n, max_train_steps=args.warmup + args.steps, lora_rank=8,
                        learning_rate=1e-3, log_with="none", save_precision="fp32", seed=5, device=device,
                        mixed_precision="bf16" if device == "cuda" else "no")
            config = tmp / f"p{run_index}.yaml"
            config.write_text(yaml.safe_dump(keys))
            started = time.perf_counter()
            run = launch(n, config, tmp / f"p{run_index}.json", threads=threads)
            wall = time.perf_counter() - started
            gaps = [b - a for a, b in zip(run["times"][args.warmup:], run["times"][args.warmup + 1:])]
            rows.append((n, threads, args.global_batch // n, statistics.median(gaps), wall, Path(run["lora"])))

        def max_diff(x: Path, y: Path) -> float:
            a, _ = read_lora(x)
            b, _ = read_lora(y)
            return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

        lora, _ = read_lora(rows[0][5])
        moved = max(v.abs().max().item() for k, v in lora.items() if "lora_up" in k)  # lora_up starts at zero
        diff = max_diff(rows[0][5], rows[1][5])
        floor = max_diff(rows[0][5], rows[2][5]) if len(rows) > 2 else None
    print(f"tiny SD1 LoRA at {args.resolution} px, global batch {args.global_batch}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, on {device} ({cores} CPU cores)")
    print(f"{'processes':>9}  {'threads':>7}  {'batch/proc':>10}  {'s/step':>8}  {'steps/s':>8}  "
          f"{'wall s (incl. start)':>20}")
    for n, threads, per, s_step, wall, _ in rows:
        print(f"{n:>9}  {threads:>7}  {per:>10}  {s_step:>8.4f}  {1 / s_step:>8.2f}  {wall:>20.1f}")
    tolerance = max(1e-4, 5 * floor) if floor is not None else 1e-4
    print(f"{rows[1][0]} processes vs 1: {rows[0][3] / rows[1][3]:.2f}x the steps/s; final LoRAs differ by at most "
          f"{diff:.2e} (lora_up weights moved up to {moved:.2e} from zero)"
          + (f"; the same 1-process run with {rows[2][1]} instead of {rows[0][1]} threads differs by {floor:.2e} "
             f"(float rounding alone)" if floor is not None else ""))
    print("equal to float tolerance" if diff <= tolerance else f"DIFFERENT (more than {tolerance:.1e})")
    return 0 if diff <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
