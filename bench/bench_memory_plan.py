"""The memory planner's estimate next to the memory a run really takes, on the CPU (RSS) or CUDA (allocator).

    python bench/bench_memory_plan.py            # tiny SD1 and a full-size SD 1.5 UNet at 256 px, CPU
    python bench/bench_memory_plan.py --quick    # the tiny model only
    python bench/bench_memory_plan.py --gpu      # on CUDA: SD 1.5 at 512 and SDXL at 1024, fp16 / bf16
    python bench/bench_memory_plan.py --flux     # FLUX.1: the tiny Flux and a full-width 2-block transformer

Each case is its own process. The model is built first (random weights; `bench_train.build_model`: the shipped
full-size UNet config, with a full-size VAE here so that latent caching is real) and counts as loaded already, as
a WebUI's checkpoint does; then `estimate_memory(..., resident=True)` is printed, the peak is reset
(`/proc/self/clear_refs`, or `torch.cuda.reset_peak_memory_stats`), the real Trainer runs two steps with latent
caching, and the measured rise is the peak minus the memory in use before the run. `error` = estimate/measured - 1
(positive: the planner asks for more than the run took).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_env  # noqa: F401  (first: offline hubs, passive OpenMP, this checkout importable)

# model, resolution, batch, gradient checkpointing, train text encoder, mixed precision, device
CPU_CASES = [
    ("tiny-sd1", 64, 1, False, False, "no", "cpu"),
    ("tiny-sd1", 128, 4, False, True, "no", "cpu"),
    ("tiny-sd1", 128, 4, True, False, "no", "cpu"),
    ("sd15", 256, 1, False, False, "no", "cpu"),
    ("sd15", 256, 1, True, False, "no", "cpu"),
    ("sd15", 256, 2, False, True, "no", "cpu"),
    ("sd15", 256, 1, False, False, "bf16", "cpu"),
]
FLUX_CASES = [  # bench_flux.build_model's models (T5 at 512 tokens); with --gpu, the CUDA ones
    ("tiny-flux", 64, 2, False, False, "no", "cpu"),
    ("tiny-flux", 128, 2, True, False, "no", "cpu"),
    ("flux-wide", 256, 1, False, False, "no", "cpu"),
    ("flux-wide", 256, 1, True, False, "no", "cpu"),
]
FLUX_GPU_CASES = [
    ("flux-wide", 1024, 1, False, False, "bf16", "cuda"),
    ("flux-wide", 1024, 1, True, False, "bf16", "cuda"),
]
GPU_CASES = [
    ("sd15", 512, 1, False, False, "fp16", "cuda"),
    ("sd15", 512, 4, True, False, "fp16", "cuda"),
    ("sd15", 512, 2, False, True, "bf16", "cuda"),
    ("sdxl", 1024, 1, True, False, "bf16", "cuda"),
    ("sdxl", 1024, 1, False, False, "bf16", "cuda"),
]


def worker(case: list, out: str) -> None:
    import torch

    torch.set_num_threads(2)
    from bench_load_memory import _status_bytes
    from bench_train import build_model, make_images
    from lora_trainer.config import TrainConfig
    from lora_trainer.train.memory_plan import estimate_memory
    from lora_trainer.train.trainer import Trainer

    name, res, batch, gc, te, mp, device = case
    if "flux" in name:
        from bench_flux import build_model as build_flux

        model = build_flux(name)
    else:
        model = build_model(name)
    if name in ("sd15", "sdxl"):
        from diffusers import AutoencoderKL
        from lora_trainer.models.loader import _config

        model.vae = AutoencoderKL(**_config("sdxl_vae.json" if name == "sdxl" else "sd_vae.json"))
        model.vae.requires_grad_(False)
    if device == "cuda":
        model.to("cuda")
    work = Path(tempfile.mkdtemp(prefix="bench-memplan-"))
    data = make_images(work / "data", res, n=max(4, batch * 2))
    cfg = TrainConfig(train_data_dir=str(data), output_dir=str(work / "out"), output_name="m", resolution=res,
                      batch_size=batch, gradient_checkpointing=gc, train_text_encoder=te, mixed_precision=mp,
                      lora_rank=16, max_train_steps=2, cache_latents=True, enable_bucket=False, log_with="none",
                      device=device)
    estimate = estimate_memory(model, cfg, device, resident=True)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    Trainer(cfg, model=model).run()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM")
    Path(out).write_text(json.dumps({"estimate": estimate.extra, "training": estimate.training,
                                     "caching": estimate.caching, "measured": peak - before}))


def run_case(case: tuple) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--worker", json.dumps(list(case)), out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny model only")
    ap.add_argument("--gpu", action="store_true", help="the CUDA cases (needs a GPU)")
    ap.add_argument("--flux", action="store_true", help="the FLUX.1 cases instead of the SD ones")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), args.worker[1])
        return
    if args.flux:
        cases = FLUX_GPU_CASES if args.gpu else FLUX_CASES
    else:
        cases = GPU_CASES if args.gpu else CPU_CASES
    cases = [c for c in cases if not (args.quick and not c[0].startswith("tiny"))]
    mib = 2 ** 20
    print(f"{'model':9} {'res':>4} {'batch':>5} {'ckpt':>4} {'TE':>3} {'prec':>4} {'dev':>4} | "
          f"{'estimate MiB':>12} {'measured MiB':>12} {'error':>7}")
    for case in cases:
        r = run_case(case)
        name, res, batch, gc, te, mp, device = case
        head = f"{name:9} {res:>4} {batch:>5} {'yes' if gc else 'no':>4} {'yes' if te else 'no':>3} {mp:>4} {device:>4} | "
        if "error" in r:
            print(head + "failed: " + r["error"])
            continue
        err = r["estimate"] / r["measured"] - 1
        print(head + f"{r['estimate'] / mib:12.0f} {r['measured'] / mib:12.0f} {err:+7.0%}", flush=True)


if __name__ == "__main__":
    main()
