"""What an HTTP request may touch: the rules that keep a training request inside the host's folders.

A request (unlike the person at the tab or a YAML on their own machine) comes from anywhere the server is
reachable, so its config is held to the host's roots (`Host.request_roots()`):
- everything it writes (run folder, logs, cache) goes under the host's run folder (`work_dir`); the finished
  LoRA is installed into the host's LoRA folder by the job, never by a path in the request;
- the base model and VAE are only among the host's models (a WebUI trains on the checkpoint it has loaded);
- a LoRA to continue from or a checkpoint to resume from is only in the run folder or the LoRA folder;
- sample prompts are given as text, never as a file to read.
Datasets are read where the request says (that is what training needs), and no message quotes their content.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..config import ConfigError, TrainConfig, field_meta

DEFAULT_OUTPUT_DIR = field_meta()["output_dir"]["default"]


class RequestRefused(ConfigError):
    """A request asked for a path outside what the host allows (HTTP 403)."""


def _resolved(value: str) -> Path:
    return Path(value).expanduser().resolve()


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    for root in roots:
        root = Path(root).expanduser().resolve()
        if path == root or root in path.parents:
            return True
    return False


def confine(cfg: TrainConfig, host) -> TrainConfig:
    roots = host.request_roots()
    work = Path(roots["work"]).expanduser().resolve()
    changes: dict = {}

    if cfg.output_dir in (None, "", DEFAULT_OUTPUT_DIR):
        changes["output_dir"] = str(work)
    elif not _inside(_resolved(cfg.output_dir), [work]):
        raise RequestRefused(f"output_dir: a request may only write under {work}; leave output_dir out (runs go "
                             f"to {work}/<output_name>)")
    for key in ("logging_dir", "cache_dir"):
        value = getattr(cfg, key)
        if value and not _inside(_resolved(value), [work]):
            raise RequestRefused(f"{key}: a request may only write under {work}; leave {key} out")

    if cfg.base_model and not host.allows_base_model(cfg.base_model):
        raise RequestRefused(f"base_model: not one of this server's models. {host.base_model_rule()}")
    if cfg.vae and not _inside(_resolved(cfg.vae), roots.get("models", [])):
        raise RequestRefused("vae: a request may only name a VAE among this server's models")

    readable = [work, Path(roots["lora"])]
    if cfg.init_lora_weights and not _inside(_resolved(cfg.init_lora_weights), readable):
        raise RequestRefused(f"init_lora_weights: a request may only continue a LoRA from {roots['lora']} or a run "
                             f"in {work}")
    if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint != "latest" and \
            not _inside(_resolved(cfg.resume_from_checkpoint), [work]):
        raise RequestRefused(f"resume_from_checkpoint: a request may only resume a run in {work} (or say 'latest')")

    prompts = cfg.sample_prompts
    if isinstance(prompts, str) and _is_file(prompts):
        raise RequestRefused("sample_prompts: give the prompts as a list of strings; a request cannot name a file")
    return cfg.replace(**changes) if changes else cfg


def _is_file(value: str) -> bool:
    try:
        return Path(value).expanduser().is_file()
    except (OSError, ValueError):
        return False


__all__ = ["RequestRefused", "confine"]
