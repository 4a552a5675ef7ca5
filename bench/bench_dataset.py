"""Dataset throughput: scan + bucketing, loading + resizing every sample, and latent caching with the
tiny VAE (first run encodes, second run reads the disk cache), in images per second.

    python bench/bench_dataset.py [--count 1000] [--resolution 128] [--no-latents]

Generates small random images (96-160 px, PNG and JPEG, half with captions) in a temporary folder.
The reference line is plain Pillow (open, convert, resize) on the same files, to show our overhead.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.config import from_dict  # noqa: E402
from lora_trainer.data import build_dataset, build_report  # noqa: E402


def generate(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (int(v) for v in rng.integers(96, 161, size=2))
        blocks = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize((w, h), Image.BILINEAR)
        folder = root / ("10_subject" if i % 4 == 0 else "plain")
        folder.mkdir(parents=True, exist_ok=True)
        if i % 2:
            image.save(folder / f"{i:05d}.jpg", quality=90)
        else:
            image.save(folder / f"{i:05d}.png")
            (folder / f"{i:05d}.txt").write_text(f"tag{i % 7}, tag{i % 13}, scene")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--no-latents", action="store_true", help="skip the latent-caching measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        _, gen_s = timed(lambda: generate(root, args.count))
        cfg = from_dict(dict(train_data_dir=str(root), resolution=args.resolution, min_bucket_reso=64,
                             max_bucket_reso=512, bucket_reso_steps=32, output_dir=str(Path(tmp) / "out")))
        print(f"generated {args.count} images in {gen_s:.2f} s")

        ds, scan_s = timed(lambda: build_dataset(cfg, log=None))
        n = len(ds.items)
        print(f"scan + bucketing:        {n / scan_s:10.1f} images/s  ({scan_s:.3f} s, {n} images, "
              f"{len(ds.bucket_counts())} buckets)")

        def load_all():
            for i in range(n):
                ds.load_sample(i, 0, 0)
        _, load_s = timed(load_all)
        print(f"load + resize + crop:    {n / load_s:10.1f} images/s  ({load_s:.3f} s)")

        def reference():
            for item in ds.items:
                with Image.open(item.path) as im:
                    im.convert("RGB").resize(item.bucket, Image.LANCZOS)
        _, ref_s = timed(reference)
        print(f"reference (plain PIL):   {n / ref_s:10.1f} images/s  ({ref_s:.3f} s)")

        _, key_s = timed(lambda: [ds.cache_key(i) for i in range(n)])
        print(f"cache keys (sha256):     {n / key_s:10.1f} images/s  ({key_s:.3f} s)")

        _, report_s = timed(lambda: build_report(cfg))
        print(f"check report (dHash):    {n / report_s:10.1f} images/s  ({report_s:.3f} s)")

        if not args.no_latents:
            latent_caching(cfg, Path(tmp) / "cache")


def latent_caching(cfg, cache_dir: Path) -> None:
    """The trainer's own caching step (LatentEncoder.fill) with the tiny model's VAE, twice."""
    import torch

    from lora_trainer.data import LatentCache
    from lora_trainer.models.tiny import build_tiny
    from lora_trainer.train.control import StopFlag
    from lora_trainer.train.distributed import Processes
    from lora_trainer.train.latents import LatentEncoder

    torch.set_num_threads(2)
    model = build_tiny("sd1")
    for run in ("first run (VAE)", "cached run (disk)"):
        ds = build_dataset(cfg, log=None)  # a fresh dataset and cache object, as a new training run has
        encoder = LatentEncoder(model.vae, torch.device("cpu"), cfg.batch_size, Processes.single(), StopFlag(),
                                log=lambda msg: None)
        cache = LatentCache(cache_dir)
        _, s = timed(lambda: encoder.fill(ds, cache))
        n = len(ds.items)
        print(f"latent cache, {run:<17} {n / s:8.1f} images/s  ({s:.3f} s, {len(cache)} latents on disk)")


if __name__ == "__main__":
    main()
