"""Training speed and memory of each network type against plain LoRA at the same rank, in one table.

    python bench/bench_network_types.py                 # full-size SD 1.5 UNet at 256 px, batch 1, CPU
    python bench/bench_network_types.py --model tiny-sd1 --resolution 64 --steps 3   # a quick look
    python bench/bench_network_types.py --device cuda --precision bf16 --resolution 512

The model is bench_train.py's (random weights, built in code: the shipped SD 1.5 UNet config with a tiny VAE
and a 2-layer text encoder of the real width, frozen). Each type trains in its own subprocess through
`Trainer(cfg, events, model=...).run()` with the same data, seed, rank (16, alpha 16), AdamW and
max_grad_norm 1.0; torch.set_num_threads(--threads) and OMP_WAIT_POLICY=PASSIVE as in bench_train.py.

s/step: the median time between "step" events after the warm-up steps; cpu s/step: the same in process CPU
seconds (less disturbed by other jobs on a shared machine). Peak memory: CPU: the process's peak RSS from
just before training (the rise above the built model in brackets); CUDA: torch.cuda.max_memory_allocated.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_train import SEED, CpuPeak, CudaPeak, build_model, make_images  # noqa: E402

RANK = 16
TYPES = {  # label -> network options (every type at rank 16; the convolutions at rank 16 too)
    "lora": {"network_type": "lora"},
    "locon": {"network_type": "locon"},
    "loha": {"network_type": "loha"},
    "lokr": {"network_type": "lokr", "lokr_factor": 8},
    "lora + dora": {"network_type": "lora", "use_dora": True},
    "loha + dora": {"network_type": "loha", "use_dora": True},
}


def worker(spec: dict, result_path: Path) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from lora_trainer.config import from_dict
    from lora_trainer.train.events import EventBus
    from lora_trainer.train.trainer import Trainer

    model = build_model(spec["model"])
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "data", spec["resolution"])
        cfg = from_dict({
            "train_data_dir": str(data), "output_dir": str(Path(tmp) / "out"), "output_name": "bench",
            "resolution": spec["resolution"], "min_bucket_reso": min(64, spec["resolution"]),
            "max_bucket_reso": max(1024, spec["resolution"]), "batch_size": 1,
            "max_train_steps": spec["warmup"] + spec["steps"], "lora_rank": RANK, "lora_alpha": RANK,
            "optimizer": "adamw", "learning_rate": 1e-4, "cache_latents": True, "train_text_encoder": False,
            "mixed_precision": spec["precision"], "device": spec["device"], "log_with": "none", "seed": SEED,
            **TYPES[spec["type"]]})
        stamps, cpu, info = [], [], {}
        events = EventBus()

        def listen(event) -> None:
            if event.kind == "step":
                if spec["device"] == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
                cpu.append(time.process_time())
            elif event.kind == "message" and " modules (" in (event.message or ""):
                info["network"] = event.message

        events.subscribe(listen)
        meter = CudaPeak() if spec["device"] == "cuda" else CpuPeak()
        meter.start()
        trainer = Trainer(cfg, events, model=model, keep_network=True)
        result = trainer.run()
        mem = meter.stop()
        params = sum(p.numel() for p in trainer.network.parameters())
        modules = len(trainer.network.layers)
    w = spec["warmup"]
    steps = [b - a for a, b in zip(stamps[w:], stamps[w + 1:])] or [stamps[-1] - stamps[0]]
    cpus = [b - a for a, b in zip(cpu[w:], cpu[w + 1:])] or [cpu[-1] - cpu[0]]
    result_path.write_text(json.dumps({"s_step": statistics.median(steps), "cpu_step": statistics.median(cpus),
                                       "mem": mem, "params": params, "modules": modules,
                                       "steps": result.global_step, **info}))


def run_one(spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec), str(out)], env=env,
                              timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
        return json.loads(out.read_text())


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "tiny-sd1", "tiny-sdxl"])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated labels of: " + ", ".join(TYPES))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), Path(args.worker[1]))
        return
    labels = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in labels if t not in TYPES]
    if unknown:
        ap.error(f"unknown type {unknown[0]!r}; choose from {', '.join(TYPES)}")
    print(f"{args.model} @ {args.resolution} px, batch 1, {args.device} "
          f"{'fp32' if args.precision == 'no' else args.precision}, rank {RANK}, {args.warmup} warm-up + "
          f"{args.steps} timed steps, {args.threads} threads")
    rows = []
    for label in labels:
        spec = {"type": label, "model": args.model, "resolution": args.resolution, "device": args.device,
                "precision": args.precision, "warmup": args.warmup, "steps": args.steps, "threads": args.threads}
        rows.append((label, run_one(spec, args.timeout)))
    base = next((r for label, r in rows if label == "lora" and "error" not in r), None)
    print(f"{'type':12} {'modules':>7} {'params':>11} {'s/step':>8} {'x lora':>7} {'cpu s/step':>10} "
          f"{'peak memory (rise)':>26}")
    for label, r in rows:
        if "error" in r:
            print(f"{label:12} failed: {r['error'][0]}")
            continue
        ratio = f"{r['s_step'] / base['s_step']:.2f}" if base else "-"
        mem = r["mem"]
        print(f"{label:12} {r['modules']:>7} {r['params']:>11,} {r['s_step']:8.2f} {ratio:>7} {r['cpu_step']:10.2f} "
              f"{_mib(mem['peak_bytes']):>12} ({_mib(mem['peak_bytes'] - mem['baseline_bytes'])})")


if __name__ == "__main__":
    main()
