"""Peak memory (RSS) of loading a single-file checkpoint and training its first step, on the CPU.

    python bench/bench_load_memory.py --size sd15                    # SD 1.5-size fp16 file (2.0 GiB)
    python bench/bench_load_memory.py --size sdxl                    # SDXL-size fp16 file (6.5 GiB; 9 GB RAM)
    python bench/bench_load_memory.py --size sd15 --reference-code /tmp/lt-old   # side by side with other code

The checkpoint is written in code with random weights, in the original (LDM/SGM) layout at full size: the
shipped SD 1.5 / SDXL UNet and VAE configs and CLIP ViT-L (+ OpenCLIP bigG for SDXL) text encoders. It is
streamed to disk tensor by tensor and kept in --workdir for the next run. Two small images are the dataset.

Each measurement is its own process (so peaks do not mix): `python -m lora_trainer train`'s Trainer with
base_model = that file, mixed_precision (default bf16: weights fp16 in the file, bf16 in training, as in the
issue's report), cache_latents, rank 16, batch 1, one step at --resolution (default 256, to keep a full-size
CPU step short), nothing saved but the final LoRA. Printed per side:
  after imports   RSS before anything is loaded (torch, diffusers, transformers);
  load peak       the peak RSS (VmHWM) when training starts: model loaded, cast, latents cached;
  step peak       the peak RSS after the first optimizer step;
  rise/weights    (peak - after imports) / the weights' size in the training precision.
Reference columns: the file's size and the weights' size in the training precision (UNet and text encoders in
that dtype, the VAE in fp32), i.e. one copy. --reference-code DIR runs the same worker with the lora_trainer
package found in DIR (e.g. an older commit: `git archive COMMIT lora_trainer | tar -x -C DIR`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}


# --- a full-size checkpoint with random weights, written tensor by tensor ----------------------------------
def _text_encoder_config(hidden: int, layers: int, openclip: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, max_position_embeddings=77, projection_dim=hidden,
                          hidden_act="gelu" if openclip else "quick_gelu",
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def checkpoint_shapes(size: str) -> dict:
    """{original-format key: shape} of a full-size model, from modules built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.models.loader import _config
    from lora_trainer.models.tiny import ldm_state_dict_of

    family = {"sd15": "sd1", "sdxl": "sdxl"}[size]
    with init_empty_weights():
        unet = UNet2DConditionModel(**_config(f"{family}_unet.json"))
        vae = AutoencoderKL(**_config("sdxl_vae.json" if family == "sdxl" else "sd_vae.json"))
        encoders = [CLIPTextModel(_text_encoder_config(768, 12, False))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(_text_encoder_config(1280, 32, True)))
    return {k: list(v.shape) for k, v in ldm_state_dict_of(family, unet, vae, encoders).items()}


def write_checkpoint(path: Path, shapes: dict, dtype: str) -> None:
    """A .safetensors file streamed tensor by tensor (the writer never holds the model)."""
    import torch

    torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    item = torch.finfo(torch_dtype).bits // 8
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = math.prod(shape) * item
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for key, shape in shapes.items():
            t = torch.randn(shape, generator=gen) * 0.02
            if len(shape) == 1 and key.endswith(".weight") and ("norm" in key or ".ln_" in key):
                t = t + 1.0  # layer / group norm scales near 1, as trained models have them
            fh.write(t.to(torch_dtype).contiguous().view(torch.uint8).numpy().tobytes())
    tmp.replace(path)


def weights_bytes(shapes: dict, precision: str) -> int:
    """One copy of the model in the training precision: UNet and text encoders in it, the VAE in fp32."""
    item = {"bf16": 2, "fp16": 2, "no": 4}[precision]
    return sum(math.prod(s) * (4 if k.startswith("first_stage_model.") else item) for k, s in shapes.items())


def make_images(folder: Path, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red square, simple background", "a cat, soft light"]):
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((resolution, resolution), Image.BILINEAR).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(caption)
    return folder


# --- the measured process -----------------------------------------------------------------------------
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(args) -> None:
    sys.path.insert(0, args.code)
    import torch

    torch.set_num_threads(args.threads)
    import diffusers  # noqa: F401  (imports counted in the baseline)
    import transformers  # noqa: F401

    from lora_trainer.config import from_dict
    from lora_trainer.train.events import EventBus
    from lora_trainer.train.trainer import Trainer

    after_imports = _status_bytes("VmRSS")
    marks: dict = {}
    t0 = time.perf_counter()

    def on_event(event) -> None:
        if event.kind == "started" and "load_peak" not in marks:
            marks["load_peak"], marks["load_s"] = _status_bytes("VmHWM"), time.perf_counter() - t0
        if event.kind == "step" and "step_peak" not in marks:
            marks["step_peak"], marks["step_s"] = _status_bytes("VmHWM"), time.perf_counter() - t0
        if event.kind == "failed":
            marks["failed"] = event.message

    events = EventBus()
    events.subscribe(on_event)
    cfg = from_dict({"base_model": args.file, "train_data_dir": args.data, "output_dir": args.out,
                     "output_name": "bench", "resolution": args.resolution, "batch_size": 1, "max_train_steps": 1,
                     "mixed_precision": args.precision, "cache_latents": True, "lora_rank": 16, "lora_alpha": 16,
                     "log_with": "none", "device": "cpu", "seed": 0, "overwrite": True,
                     "enable_bucket": False}, source="bench")
    result = Trainer(cfg, events).run()
    marks.update(after_imports=after_imports, end_peak=_status_bytes("VmHWM"), status=result.status,
                 code=str(Path(sys.modules["lora_trainer"].__file__).parent))
    print("RESULT " + json.dumps(marks), flush=True)


def measure(code: str, file: Path, data: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--worker", "--code", code, "--file", str(file), "--data", str(data),
               "--out", out, "--precision", args.precision, "--resolution", str(args.resolution),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--file-dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the checkpoint file")
    parser.add_argument("--precision", choices=["bf16", "fp16", "no"], default="bf16", help="mixed_precision")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lt-bench-load"))
    parser.add_argument("--reference-code", default=None,
                        help="a folder holding another lora_trainer package to measure side by side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--code", "--file", "--data", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(ROOT))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint_shapes(args.size)
    file = work / f"random-{args.size}-{args.file_dtype}.safetensors"
    if not file.is_file():
        t = time.perf_counter()
        write_checkpoint(file, shapes, DTYPES[args.file_dtype])
        print(f"wrote {file} ({file.stat().st_size / GiB:.2f} GiB) in {time.perf_counter() - t:.0f} s")
    data = make_images(work / f"images-{args.resolution}", args.resolution)
    one_copy = weights_bytes(shapes, args.precision)
    params = sum(math.prod(s) for s in shapes.values())

    print(f"\n{args.size}: {params / 1e9:.2f} B parameters; file {file.stat().st_size / GiB:.2f} GiB "
          f"({args.file_dtype}); one copy in the training precision ({args.precision}, VAE fp32): "
          f"{one_copy / GiB:.2f} GiB; first step at {args.resolution} px, {args.threads} threads")
    with open(file, "rb") as fh:  # the file in the page cache for every side alike (else the first reads the disk)
        while fh.read(64 * 2 ** 20):
            pass
    sides = [("this checkout", str(ROOT))]
    if args.reference_code:
        sides.append(("reference", str(Path(args.reference_code).resolve())))
    rows = []
    for label, code in sides:
        r = measure(code, file, data, args)
        rows.append((label, r))
        if "error" in r:
            print(f"{label}: failed: {r['error']}")
            continue
    print(f"\n{'code':<16}{'after imports':>15}{'load peak':>12}{'step peak':>12}{'rise/weights':>14}"
          f"{'load s':>9}{'step s':>9}")
    for label, r in rows:
        if "error" in r:
            continue
        base = r["after_imports"]
        step_peak = r.get("step_peak", r["end_peak"])
        print(f"{label:<16}{base / GiB:>13.2f} G{r.get('load_peak', 0) / GiB:>10.2f} G{step_peak / GiB:>10.2f} G"
              f"{(step_peak - base) / one_copy:>13.2f}x{r.get('load_s', 0):>9.0f}{r.get('step_s', 0):>9.0f}"
              + (f"   ({r['status']}{': ' + r['failed'][:80] if r.get('failed') else ''})"
                 if r["status"] != "finished" else ""))
    print(f"\none copy of the weights: {one_copy / GiB:.2f} GiB; the file: {file.stat().st_size / GiB:.2f} GiB")


if __name__ == "__main__":
    main()
