"""Images to VAE latents for a run: encoding, the cache key, and filling the latent cache once before training
(split over the processes of a data-parallel run)."""
from __future__ import annotations

import hashlib
import time
from typing import Callable

import torch

from .control import StopFlag
from .distributed import Processes
from .memory_plan import vae_chunk


def vae_fingerprint(vae) -> str:
    """Which VAE made a latent: a hash of its first weights and its config, part of every cache key."""
    w = next(vae.parameters())
    h = hashlib.sha256(w.detach().float().cpu().numpy().tobytes()[:65536])
    # private keys left out: diffusers' _use_default_values is a set, in another order in every process
    config = {k: v for k, v in dict(vae.config).items() if not str(k).startswith("_")}
    h.update(repr(sorted(config.items())).encode())
    return h.hexdigest()[:16]


class LatentEncoder:
    """Encodes a dataset's images with the model's VAE, as the diffusion model sees them (scaled, and shifted
    where the VAE has a shift factor)."""

    def __init__(self, vae, device: torch.device, batch_size: int, procs: Processes, stop: StopFlag,
                 log: Callable[[str], None]):
        self.vae, self.device, self.batch_size = vae, device, batch_size
        self.procs, self.stop, self.log = procs, stop, log
        self.fingerprint = vae_fingerprint(vae)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(self.device, dtype)).latent_dist
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((dist.mean - shift) * self.vae.config.scaling_factor).float()

    def key(self, ds, i: int) -> str:
        return f"{ds.cache_key(i)}-{self.fingerprint}"

    def fill(self, ds, cache) -> None:
        """Puts every active image's latent into the cache; an image that fails to decode leaves the run."""
        todo = [i for i in ds.active_indices() if self.key(ds, i) not in cache]
        if not todo:
            self.log(f"latents: all {len(ds.items)} cached")
            return
        procs = self.procs
        if procs.distributed:  # each process encodes its part into the shared disk cache
            failed = self._encode_into(ds, cache, procs.split(todo), stoppable=False)
            for part in procs.gather(failed):  # every process leaves out the same damaged images
                for i, reason in part:
                    ds.exclude(i, reason)
            procs.barrier()
            self.log(f"latents: {len(todo)} images encoded by {procs.world} processes, "
                     f"{len(ds.items) - len(todo)} from cache")
            return
        started = time.perf_counter()
        for i, reason in self._encode_into(ds, cache, todo):
            ds.exclude(i, reason)
        rate = len(todo) / max(time.perf_counter() - started, 1e-9)
        self.log(f"latents: encoded {len(todo)} images ({rate:.1f} images/s), {len(ds.items) - len(todo)} from cache")

    def _encode_into(self, ds, cache, todo: list[int], stoppable: bool = True) -> list[tuple[int, str]]:
        """Encodes the images `todo` into the cache; returns those that failed to decode, with the reason."""
        from ..data import ImageLoadError

        failed: list[tuple[int, str]] = []
        # Images of one bucket share a shape, so they are encoded together (much faster on a GPU).
        by_bucket: dict[tuple, list[int]] = {}
        for i in todo:
            by_bucket.setdefault(tuple(ds.items[i].bucket), []).append(i)
        for bucket, indices in by_bucket.items():
            chunk = vae_chunk(self.batch_size, bucket[0] * bucket[1])
            for start in range(0, len(indices), chunk):
                loaded, pixels = [], []
                for i in indices[start:start + chunk]:
                    try:
                        pixels.append(ds.load_sample(i, 0, 0)["pixels"])
                        loaded.append(i)
                    except ImageLoadError as e:  # the scan reads headers only; some damage shows when decoding
                        self.log(f"skipped {e}")
                        failed.append((i, e.reason))
                if loaded:
                    latents = self.encode(torch.stack(pixels)).cpu()
                    for i, latent in zip(loaded, latents):
                        cache.put(self.key(ds, i), latent.clone())
                if stoppable:  # a data-parallel run stops at its first step instead, all processes together
                    self.stop.check()
        return failed
