"""Training speed and memory: our Trainer vs a minimal diffusers + peft loop on the same model.

    python bench/bench_train.py            # tiny SD1 at 64 px, then a full-size SD 1.5 UNet at 256 px (CPU)
    python bench/bench_train.py --quick    # the tiny model only (a minute)
    python bench/bench_train.py --gpu      # also SD 1.5 at 512 px fp16/bf16 and SDXL at 1024 px bf16 on CUDA
    python bench/bench_train.py --variant sd15:64:1:bf16:cpu   # any MODEL:RES:BATCH:PRECISION:DEVICE as well

Every model is built in code with random weights (nothing is downloaded): the tiny models come from
lora_trainer.models.tiny; the full-size ones are a UNet of the shipped SD 1.5 / SDXL config with a tiny
VAE (latents are cached, so it only runs before training) and 2-layer text encoders of the real widths
(768 / 768+1280, frozen: encoded once). Eight square images at the resolution are generated in a
temporary folder.

Each measurement runs in its own subprocess (so memory peaks do not mix), with torch.set_num_threads(2)
(--threads) and OMP_WAIT_POLICY=PASSIVE unless set (on a machine shared with other jobs, spinning OpenMP
threads made every small op several times slower and the numbers erratic):
  ours       lora_trainer.train.Trainer(cfg, events, model=...).run(): cache_latents, frozen text encoder,
             rank 16 (alpha 16), AdamW, max_grad_norm 1.0, no checkpoints / samples / logs.
  reference  the standard diffusers + peft loop (as in diffusers' train_text_to_image_lora.py):
             unet.add_adapter(LoraConfig) on the same modules (to_q/to_k/to_v/to_out.0, proj_in/proj_out,
             ff.net.0.proj/ff.net.2), precomputed latents and text embeddings, DDPMScheduler.add_noise,
             MSE on epsilon, backward, clip_grad_norm_(1.0), AdamW step, zero_grad, loss.item().
             In fp16/bf16 runs the frozen weights are cast to that dtype and the LoRA kept in fp32, as
             diffusers' scripts do (with a GradScaler for fp16 on CUDA).

steps/s: timed from the end of the last warm-up step to the end of the last step (ours: the "step"
events' arrival; reference: after each optimizer step), so set-up, latent caching and saving are
excluded; --repeat N alternates the order and keeps each side's median run. Also printed: the ratio of
median step times and of CPU seconds per step, which other jobs on the machine disturb less.
Peak memory: CPU: the process's peak RSS (VmHWM, reset after the model is built; a sampling thread where
the reset is not allowed), shown as the absolute peak and, in brackets, the rise above the built model;
CUDA: torch.cuda.max_memory_allocated (the model starts on the CPU in both, so it is the whole training
footprint).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THREADS = 2
RANK = 16
SEED = 0
# The UNet modules kohya (and our trainer) put a LoRA on, as peft target_modules suffixes.
REF_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CAPTIONS = ["a red square, simple background", "a green circle on grey", "blue stripes, pattern",
            "a yellow triangle, flat colour", "photo of a cat, soft light", "a landscape, mountains, dusk",
            "portrait of a woman, oil painting", "a city street at night, neon"]


@dataclass
class Variant:
    model: str        # tiny-sd1 | tiny-sdxl | sd15 | sdxl
    resolution: int
    batch: int
    precision: str    # no | fp16 | bf16
    device: str       # cpu | cuda
    warmup: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.model}@{self.resolution} {self.device} {'fp32' if self.precision == 'no' else self.precision}"


# --- models with random weights ---------------------------------------------------------------------
def _clip(hidden: int, projection: bool, openclip: bool, seed: int, layers: int = 2):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, max_position_embeddings=77,
                         hidden_act="gelu" if openclip else "quick_gelu", projection_dim=hidden,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_model(name: str):
    """Our BaseModel with random weights; the same seed gives the same weights in every process."""
    import torch

    from lora_trainer.models.tiny import build_tiny

    if name in ("tiny-sd1", "tiny-sdxl"):
        return build_tiny(name.split("-")[1], seed=SEED)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lora_trainer.models.base import BaseModel
    from lora_trainer.models.loader import _config, _noise_scheduler, _vae_config
    from lora_trainer.models.tiny import tiny_original_config
    from lora_trainer.models.tokenizer import clip_tokenizer

    family = {"sd15": "sd1", "sdxl": "sdxl"}[name]
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**_config(f"{family}_unet.json"))  # full size: the part that matters
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(**_vae_config(family, tiny_original_config(family), {}))  # 8x downsampling, 4 channels
    if family == "sd1":
        encoders = [_clip(768, False, False, SEED + 2)]
        tokenizers = [clip_tokenizer(None)]
    else:
        encoders = [_clip(768, False, False, SEED + 2), _clip(1280, True, True, SEED + 3)]
        tokenizers = [clip_tokenizer(None), clip_tokenizer(None, pad_token="!")]
    model = BaseModel(family=family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                      noise_scheduler=_noise_scheduler(False), v_prediction=False, name=f"random-{name}",
                      source="state-dict")
    model.freeze()
    return model


def make_images(folder: Path, resolution: int, n: int = 8) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((resolution, resolution), Image.BILINEAR).save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return folder


# --- memory -----------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class CpuPeak:
    """Peak RSS from `start()` on: VmHWM after resetting it, else a 5 ms sampling thread."""

    def start(self) -> None:
        gc.collect()
        self.baseline = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.sampled = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, _status_kib("VmRSS") * 1024)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        peak = max(self.sampled, _status_kib("VmHWM") * 1024 if self.hwm_reset else 0)
        return {"peak_bytes": peak, "baseline_bytes": self.baseline,
                "method": "VmHWM" if self.hwm_reset else "sampled VmRSS"}


class CudaPeak:
    def start(self) -> None:
        import torch

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()

    def stop(self) -> dict:
        import torch

        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "baseline_bytes": self.baseline,
                "method": "max_memory_allocated"}


# --- the two implementations --------------------------------------------------------------------------
def run_ours(v: Variant, model, data: Path, out: Path, meter) -> dict:
    from lora_trainer.config import from_dict
    from lora_trainer.train.events import EventBus
    from lora_trainer.train.trainer import Trainer

    cfg = from_dict({
        "train_data_dir": str(data), "output_dir": str(out), "output_name": "bench", "resolution": v.resolution,
        "min_bucket_reso": min(64, v.resolution), "max_bucket_reso": max(1024, v.resolution),
        "batch_size": v.batch, "max_train_steps": v.warmup + v.steps, "lora_rank": RANK, "optimizer": "adamw",
        "learning_rate": 1e-4, "cache_latents": True, "train_text_encoder": False,
        "mixed_precision": v.precision, "device": v.device, "log_with": "none", "seed": SEED,
    })
    stamps: list[float] = []
    cpu: list[float] = []
    info: dict = {}
    events = EventBus()

    def listen(event) -> None:
        if event.kind == "step":
            if v.device == "cuda":
                import torch
                torch.cuda.synchronize()  # the loop already syncs on loss.item(); this only makes sure
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
        elif event.kind == "message" and event.message.startswith("LoRA rank"):
            info["lora"] = event.message

    events.subscribe(listen)
    meter.start()
    t0 = time.perf_counter()
    result = Trainer(cfg, events, model=model).run()
    total = time.perf_counter() - t0
    mem = meter.stop()
    assert result.global_step == v.warmup + v.steps, result
    return {"stamps": stamps, "cpu": cpu, "t0": t0, "losses": result.losses, "total_s": total, "mem": mem, **info}


def reference_dtype(v: Variant):
    """The frozen weights' dtype in the reference loops."""
    import torch

    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[v.precision]
    if v.device == "cpu" and weight_dtype == torch.float16:
        weight_dtype = torch.bfloat16  # as our trainer does: no fp16 autocast on the CPU
    return weight_dtype


def add_reference_lora(denoiser, targets: list[str], device, weight_dtype):
    """diffusers' set-up: the frozen model in weight_dtype, add_adapter(LoraConfig) on `targets`, the LoRA in
    fp32, AdamW; a GradScaler for fp16 on CUDA. -> (params, optimizer, scaler, number of LoRA layers)."""
    import torch
    from peft import LoraConfig

    denoiser.to(device, dtype=weight_dtype)
    denoiser.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=True, target_modules=targets))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # cast_training_params: the LoRA trains in fp32
    n_layers = sum(1 for n, _ in denoiser.named_modules() if n.endswith(".lora_A"))
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    denoiser.train()
    # fp16 needs loss scaling (accelerate's GradScaler in diffusers' scripts); bf16 and fp32 do not
    cuda_fp16 = weight_dtype == torch.float16 and torch.device(device).type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda_fp16 else None
    return params, optimizer, scaler, n_layers


def reference_loop(v: Variant, batch_loss, params, optimizer, scaler, meter, t0: float, n_layers: int) -> dict:
    """The reference's training steps: batch_loss() (the forward pass), backward, clip_grad_norm_(1.0), the
    optimizer step, zero_grad; each step's end is stamped. -> run_reference's result."""
    import torch

    stamps, cpu, losses = [], [], []
    for _ in range(v.warmup + v.steps):
        loss = batch_loss()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a host sync, as every real loop logs its loss
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
    total = time.perf_counter() - t0
    mem = meter.stop()
    return {"stamps": stamps, "cpu": cpu, "t0": t0, "losses": losses, "total_s": total, "mem": mem,
            "lora": f"LoRA rank {RANK} on {n_layers} modules"}


def vae_latents(vae, data: Path, device):
    """(VAE samples of the folder's images [N, C, h, w], their captions), with the VAE on `device`."""
    import numpy as np
    import torch
    from PIL import Image

    vae.to(device)
    latents = []
    images = sorted(data.glob("*.png"))
    with torch.no_grad():
        for path in images:
            arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            px = torch.from_numpy(arr).permute(2, 0, 1)[None].to(device)
            latents.append(vae.encode(px).latent_dist.sample())
    return torch.cat(latents), [p.with_suffix(".txt").read_text() for p in images]


def run_reference(v: Variant, model, data: Path, meter) -> dict:
    """The minimal standard loop (diffusers' train_text_to_image_lora.py without accelerate)."""
    import torch
    import torch.nn.functional as F

    device = torch.device(v.device)
    weight_dtype = reference_dtype(v)
    unet, vae = model.unet, model.vae
    scheduler = model.noise_scheduler  # DDPMScheduler, epsilon
    meter.start()
    t0 = time.perf_counter()
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    for te in model.text_encoders:
        te.requires_grad_(False)

    # Precompute: latents with the VAE, text embeddings with the frozen encoder(s).
    latents, captions = vae_latents(vae, data, device)
    latents = latents * vae.config.scaling_factor
    with torch.no_grad():
        hidden, pooled = [], None
        for i, (te, tok) in enumerate(zip(model.text_encoders, model.tokenizers)):
            te.to(device)
            ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = te(ids.to(device), output_hidden_states=True)
            if model.family == "sdxl":
                hidden.append(out.hidden_states[-2])
                if i == 1:
                    pooled = out.text_embeds
            else:
                hidden.append(out.last_hidden_state)
        text = torch.cat(hidden, dim=-1)
    model.vae.to("cpu")
    for te in model.text_encoders:
        te.to("cpu")

    params, optimizer, scaler, n_layers = add_reference_lora(unet, REF_TARGETS, device, weight_dtype)
    autocast = weight_dtype != torch.float32
    gen = torch.Generator("cpu").manual_seed(SEED)
    T = scheduler.config.num_train_timesteps
    h = w = v.resolution

    def batch_loss():
        idx = torch.randint(0, len(latents), (v.batch,), generator=gen).to(device)
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, T, (v.batch,), device=device).long()
        noisy = scheduler.add_noise(x0, noise, timesteps)
        kwargs = {}
        if model.family == "sdxl":
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=torch.float32).repeat(v.batch, 1)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled[idx], "time_ids": time_ids}
        with torch.autocast(device.type, dtype=weight_dtype, enabled=autocast):
            pred = unet(noisy, timesteps, text[idx], return_dict=False, **kwargs)[0]
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")

    return reference_loop(v, batch_loss, params, optimizer, scaler, meter, t0, n_layers)


def worker(spec: dict, impl: str, result_path: Path, threads: int = THREADS, build=None, reference=None) -> None:
    """One measurement in this process. build(name) -> model and reference(v, model, data, meter) -> result:
    another benchmark's model and plain loop (bench_flux.py); default: this file's."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32" on unet.to(dtype)
    torch.set_num_threads(threads)
    v = Variant(**spec)
    if v.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    t0 = time.perf_counter()
    model = (build or build_model)(v.model)
    build_s = time.perf_counter() - t0
    meter = CudaPeak() if v.device == "cuda" else CpuPeak()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = make_images(Path(tmp) / "data", v.resolution)
        if impl == "ours":
            res = run_ours(v, model, data, Path(tmp) / "out", meter)
        else:
            res = (reference or run_reference)(v, model, data, meter)
    stamps, cpu = res.pop("stamps"), res.pop("cpu")
    first = max(v.warmup - 1, 0)
    timed = stamps[first:]
    intervals = [b - a for a, b in zip(timed, timed[1:])]
    res.update(build_s=build_s, steps=len(intervals),
               steps_per_s=len(intervals) / (timed[-1] - timed[0]) if len(intervals) else None,
               median_step_s=statistics.median(intervals) if intervals else None,
               # CPU seconds of the process per step: less disturbed by other jobs than wall time
               cpu_step_s=(cpu[-1] - cpu[first]) / len(intervals) if intervals else None,
               first_step_s=stamps[0] - res.pop("t0"),  # set-up (caching, injection) plus the first step
               device_name=torch.cuda.get_device_name() if v.device == "cuda" else f"cpu, {threads} threads")
    res["losses"] = [round(x, 5) for x in res["losses"]]
    result_path.write_text(json.dumps(res))


# --- the driver ---------------------------------------------------------------------------------------
def run_one(v: Variant, impl: str, timeout: float, threads: int = THREADS, script: Path | None = None) -> dict:
    """One measurement in a subprocess: `script`'s --_worker (default: this file)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = Path(fh.name)
    cmd = [sys.executable, str(Path(script or __file__).resolve()), "--_worker", json.dumps(asdict(v)), "--_impl", impl,
           "--_result", str(path), "--threads", str(threads)]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see main(): waiting OpenMP threads sleep instead of spinning
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            return {"error": f"exit {proc.returncode}: " + "\n".join(tail)}
        res = json.loads(path.read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        path.unlink(missing_ok=True)
    res["wall_s"] = time.perf_counter() - started
    return res


def _mib(n) -> str:
    return f"{n / 2**20:,.0f}"


def _mem(res: dict, device: str) -> str:
    if "mem" not in res:
        return "-"
    m = res["mem"]
    if device == "cuda":
        return f"{_mib(m['peak_bytes'])}"
    return f"{_mib(m['peak_bytes'])} (+{_mib(m['peak_bytes'] - m['baseline_bytes'])})"


def _rate(res: dict, per_step: bool = False) -> str:
    if not res.get("steps_per_s"):
        return "-"
    return f"{1 / res['steps_per_s']:.3f}" if per_step else f"{res['steps_per_s']:.3f}"


def print_table(rows: list[tuple[Variant, dict, dict]], per_step: bool = False) -> None:
    """per_step: seconds per step instead of steps per second (the ratios are the same: > 1, ours is faster)."""
    unit = "s/step" if per_step else "it/s"
    head = ["variant", "model", "res", "batch", f"ours {unit}", f"ref {unit}", "ours/ref", "(median)", "(cpu)",
            "ours peak MiB", "ref peak MiB"]
    lines = []
    for v, ours, ref in rows:
        ok = ours.get("steps_per_s") and ref.get("steps_per_s")
        ratio = f"{ours['steps_per_s'] / ref['steps_per_s']:.2f}" if ok else "-"
        # the ratio of median step times: robust to a few steps slowed down by other jobs on the machine
        median = f"({ref['median_step_s'] / ours['median_step_s']:.2f})" if ok else "-"
        # the ratio of CPU seconds per step (process time): what the work costs, whoever else uses the cores
        cpu = f"({ref['cpu_step_s'] / ours['cpu_step_s']:.2f})" if ok and v.device == "cpu" else "-"
        prec = "fp32" if v.precision == "no" else v.precision
        lines.append([f"{v.device} {prec}", v.model, str(v.resolution), str(v.batch), _rate(ours, per_step),
                      _rate(ref, per_step),
                      ratio, median, cpu, _mem(ours, v.device), _mem(ref, v.device)])
    widths = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for r in lines:
        print("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"\n{unit}: from the timed steps' wall time (no warm-up, set-up, latent caching or saving). ours/ref > 1: "
          "ours is faster;\n(median), (cpu): the same ratio from median step times and from CPU seconds per step.\n"
          "Peak memory: CPU: process peak RSS, in brackets its rise above the built model; CUDA: "
          "torch.cuda.max_memory_allocated.")


def parse_variant(spec: str, warmup: int, steps: int) -> Variant:
    """MODEL:RES:BATCH:PREC:DEVICE, e.g. tiny-sdxl:64:2:bf16:cpu."""
    model, reso, batch, prec, device = spec.split(":")
    return Variant(model, int(reso), int(batch), prec, device, warmup, steps)


def gpu_variants(args, sizes: list[tuple[str, int, str]]) -> list[Variant]:
    """--gpu: (model, resolution, precision) at batch 1 on CUDA, where CUDA is available."""
    if not args.gpu:
        return []
    import torch

    if not torch.cuda.is_available():
        print("--gpu: CUDA is not available here; the GPU sizes are skipped\n")
        return []
    return [Variant(m, reso, 1, prec, "cuda", args.warmup or 3, args.steps or 20) for m, reso, prec in sizes]


def variants(args) -> list[Variant]:
    out = [Variant("tiny-sd1", 64, 2, "no", "cpu", args.warmup or 5, args.steps or 40)]
    if not args.quick:
        out.append(Variant("sd15", args.resolution, args.batch, "no", "cpu", args.warmup or 1, args.steps or 3))
    out += gpu_variants(args, [("sd15", 512, "fp16"), ("sd15", 512, "bf16"), ("sdxl", 1024, "bf16")])
    out += [parse_variant(spec, args.warmup or 3, args.steps or 10) for spec in args.variant or []]
    return out


def run_parser(doc: str, quick_help: str, gpu_help: str, large_run: str, steps_help: str, warmup_help: str,
               variant_example: str) -> argparse.ArgumentParser:
    """The options of a side-by-side benchmark (this one and bench_flux.py); large_run names the CPU run that
    --resolution and --batch set."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--gpu", action="store_true", help=gpu_help)
    parser.add_argument("--resolution", type=int, default=256, help=f"of the {large_run} run")
    parser.add_argument("--batch", type=int, default=1, help=f"of the {large_run} run")
    parser.add_argument("--steps", type=int, default=0, help=f"timed steps (default: {steps_help})")
    parser.add_argument("--warmup", type=int, default=0, help=f"untimed steps first (default: {warmup_help})")
    parser.add_argument("--repeat", type=int, default=1, help="run each pair N times (alternating), keep the median")
    parser.add_argument("--variant", action="append", metavar="MODEL:RES:BATCH:PREC:DEVICE",
                        help=f"an extra run, e.g. {variant_example} (repeatable)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads in every run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_impl", help=argparse.SUPPRESS)
    parser.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    return parser


def compare(runs_of: list[Variant], args, script: Path | None = None, per_step: bool = False) -> None:
    """Runs ours and the reference for each variant (each in its own process, `script`'s worker), prints a line
    per run and the table."""
    import torch

    torch.set_num_threads(args.threads)
    # On a machine shared with other jobs, OpenMP threads that spin at every barrier while their partner is
    # descheduled make small ops several times slower and the numbers erratic; sleeping waits keep both
    # implementations' numbers steady. Set OMP_WAIT_POLICY=ACTIVE to measure the default behaviour.
    wait = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={wait}; each run in its own process\n")
    rows, dump = [], []
    for v in runs_of:
        runs = {"ours": [], "ref": []}
        for r in range(args.repeat):
            for impl in (("ours", "ref") if r % 2 == 0 else ("ref", "ours")):
                res = run_one(v, impl, args.timeout, args.threads, script)
                runs[impl].append(res)
                if "error" in res:
                    print(f"{v.label} {impl}: FAILED {res['error']}")
                else:
                    print(f"{v.label} {impl:4s}: {res['steps_per_s']:.3f} it/s over {res['steps']} steps (median step "
                          f"{res['median_step_s'] * 1000:.0f} ms, {res['cpu_step_s'] * 1000:.0f} CPU-ms/step); model "
                          f"built in {res['build_s']:.1f} s, run {res['total_s']:.1f} s, first step after "
                          f"{res['first_step_s']:.1f} s; peak {_mem(res, v.device)} MiB; {res.get('lora', '')}",
                          flush=True)
        picked = {}
        for impl, results in runs.items():
            ok = [x for x in results if "error" not in x]
            picked[impl] = sorted(ok, key=lambda x: x["steps_per_s"])[len(ok) // 2] if ok else results[-1]
        rows.append((v, picked["ours"], picked["ref"]))
        dump.append({"variant": asdict(v), "ours": runs["ours"], "reference": runs["ref"]})
    print()
    print_table(rows, per_step)
    if args.json:
        args.json.write_text(json.dumps(dump, indent=1))


def main() -> None:
    args = run_parser(__doc__, "the tiny model only", "also SD 1.5 512 px fp16/bf16 and SDXL 1024 px bf16 on CUDA",
                      "full-size SD 1.5 CPU", "40 tiny, 3 full-size CPU, 20 GPU", "5 tiny, 1 full-size CPU, 3 GPU",
                      "tiny-sdxl:64:2:bf16:cpu or sdxl:1024:1:bf16:cuda").parse_args()

    if args._worker:
        worker(json.loads(args._worker), args._impl, args._result, args.threads)
        return
    compare(variants(args), args)


if __name__ == "__main__":
    main()
