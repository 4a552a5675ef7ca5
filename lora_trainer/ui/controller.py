"""What the tab's buttons do, without Gradio: plain values in, plain values out.

`tab.py` binds these methods to widgets; tests call them directly. Long work (training) goes to the
JobRunner; previews and autotag run in the handler (they are short) but refuse while a run holds the GPU.
"""
from __future__ import annotations

import datetime
import io
import threading
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, TrainConfig, atomic_write_text, from_dict, load_yaml
from ..hosts.base import HostError
from . import dataset_tools as dt
from .form import config_to_form, field_specs, form_to_config
from .jobs import TERMINAL, JobError, JobRunner, list_runs
from .plot import loss_curve
from .presets import TYPE_PRESETS, preset

SWEEP_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
INSTALLED = "installed LoRA (below)"
THUMB = 256


class UIError(ValueError):
    """A message for the person using the tab."""


class TabController:
    _memory_warned: Optional[str] = None  # the settings whose "will not fit" was shown once

    def __init__(self, host, runner: JobRunner):
        self.host = host
        self.runner = runner
        self.specs = field_specs()
        self.keys = [s.key for s in self.specs]
        self._taggers: dict[tuple, Any] = {}
        self._tag_lock = threading.Lock()

    # ---- base model --------------------------------------------------------------------------------
    def base_model_text(self) -> str:
        try:
            return self.host.checkpoint_info().describe()
        except Exception as e:  # the tab must still open when the host has trouble
            return f"cannot read the host's checkpoint: {type(e).__name__}: {e}"

    def family(self) -> Optional[str]:
        try:
            return self.host.checkpoint_info().family
        except Exception:
            return None

    def starting_tier(self) -> str:
        """The preset tier that fits this machine (a CPU-only WebUI must not open on a 16 GB GPU preset)."""
        from .presets import tier_for

        try:
            return tier_for(*self.host.device_memory())
        except Exception:
            return "16 GB"

    def set_base_model(self, path: str) -> str:
        setter = getattr(self.host, "set_base_model", None)
        if setter is None:
            return "the WebUI's loaded checkpoint is used: switch it in the checkpoint list at the top"
        try:
            return setter(path).describe()
        except HostError as e:
            return str(e)

    # ---- dataset -----------------------------------------------------------------------------------
    def load_dataset(self, folder: str, extension: str = ".txt") -> tuple[list, list[str], str]:
        """(gallery items [(thumbnail, caption)], image choices (relative paths), message)."""
        try:
            items = dt.list_dataset(folder, extension)
        except dt.DatasetToolError as e:
            return [], [], str(e)
        root = Path(folder.strip()).expanduser()
        gallery = [(_thumbnail(i.path), _short(i.caption) or "(no caption)") for i in items]
        choices = [i.path.relative_to(root).as_posix() for i in items]
        captioned = sum(1 for i in items if i.caption)
        msg = f"{len(items)} image(s), {captioned} with a caption" if items else \
            f"no images in {root} (supported: png, jpg, webp, bmp...)"
        return gallery, choices, msg

    def import_uploads(self, files, name: str) -> tuple[str, str]:
        """Copies uploads into a managed dataset folder; returns (folder, message)."""
        if not files:
            return "", "choose image files to upload first"
        target = Path(self.host.work_dir()) / "datasets" / dt.safe_name(name or "dataset")
        folder, n, skipped = dt.import_uploads(files, target)
        msg = f"copied {n} image(s) into {folder}"
        if skipped:
            msg += "; skipped: " + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        return str(folder), msg

    def caption_of(self, folder: str, rel: str, extension: str = ".txt") -> str:
        path = dt.resolve_image(folder, rel)
        if path is None:
            return ""
        store = dt.caption_store(Path(folder), extension)
        try:
            return store.existing(path) or ""
        except ValueError as e:
            return f"(unreadable caption: {e})"

    def save_caption(self, folder: str, rel: str, caption: str, extension: str = ".txt") -> str:
        path = dt.resolve_image(folder, rel)
        if path is None:
            return "select an image first"
        try:
            text = dt.save_caption(folder, path, caption, extension)
        except (dt.DatasetToolError, ValueError) as e:
            return str(e)
        return f"saved the caption of {rel}: {text}"

    def bulk_edit(self, folder: str, action: str, tag: str, replacement: str, position: str,
                  extension: str = ".txt") -> str:
        try:
            n = dt.bulk_edit(folder, action, tag, replacement, extension, position)
        except (dt.DatasetToolError, ValueError) as e:
            return str(e)
        return f"{action}: {n} caption(s) changed"

    def check_dataset(self, values: dict, folder: str) -> str:
        from ..data import dataset_report

        try:
            cfg = self.config(values, folder)
        except ConfigError as e:
            return f"config error: {e}"
        return dataset_report(cfg)

    def taggers(self) -> list[str]:
        try:
            from ..caption import available_taggers

            return [t.name for t in available_taggers(self.host)]
        except Exception:
            return []

    def autotag(self, folder: str, tagger: str, model: str, threshold: float, trigger: str, mode: str,
                policy: str, extension: str = ".txt") -> str:
        if self.runner.running:
            return "a training run is using the GPU; autotag when it has finished"
        try:
            folder_path = dt.dataset_folder(folder)
        except dt.DatasetToolError as e:
            return str(e)
        try:
            from ..caption import TaggerUnavailable, autotag_folder, make_tagger
        except ImportError as e:
            return f"autotag is unavailable here: {e}"
        key = (tagger or "clip", (model or "").strip())
        try:
            with self._tag_lock:
                tg = self._taggers.get(key)
                if tg is None:
                    tg = make_tagger(key[0], host=self.host, model=key[1] or None)
                    self._taggers[key] = tg
                lines: list[str] = []
                result = autotag_folder(folder_path, tagger=tg, threshold=float(threshold), prefix=trigger or "",
                                        mode=mode or "tags", policy=policy or "keep", caption_extension=extension,
                                        log=lines.append)
        except TaggerUnavailable as e:
            return f"the tagger cannot run: {e}"
        except (ValueError, FileNotFoundError) as e:
            return str(e)
        return "autotag: " + result.summary() + ("\n" + "\n".join(lines[:10]) if lines else "")

    # ---- parameters ----------------------------------------------------------------------------------
    def config(self, values: dict, folder: Optional[str] = None) -> TrainConfig:
        extra = {"train_data_dir": (folder or "").strip() or None}
        info = None
        try:
            info = self.host.checkpoint_info()
        except Exception:
            pass
        if info is not None and info.path:
            extra["base_model"] = info.path
        return form_to_config(values, extra)

    def preset_values(self, tier: str, goal: str, network_type: str = "lora") -> dict[str, Any]:
        cfg_values = preset(tier, goal, self.family(), network_type if network_type in TYPE_PRESETS else "lora")
        return {k: v for k, v in config_to_form(cfg_values).items()}

    def save_yaml(self, values: dict, folder: str, path: str) -> str:
        if not path or not path.strip():
            return "enter a file path for the YAML file"
        try:
            cfg = self.config(values, folder)
        except ConfigError as e:
            return f"config error: {e}"
        target = Path(path.strip()).expanduser()
        if target.suffix.lower() not in (".yaml", ".yml"):
            target = target.with_suffix(".yaml")
        atomic_write_text(target, cfg.to_yaml())
        return f"saved {target} (Load YAML reads it back; the lora-trainer CLI trains from the same file)"

    def load_yaml(self, path: str = "", data: Optional[bytes] = None) -> tuple[Optional[dict], Optional[str], str]:
        """(form values, dataset folder, message) from a YAML path or uploaded bytes."""
        try:
            if data is not None:
                import yaml

                loaded = yaml.safe_load(io.BytesIO(data).read().decode("utf-8")) or {}
                if not isinstance(loaded, dict):
                    raise ConfigError("the top level must be a mapping of key: value")
                cfg = from_dict(loaded, source="uploaded YAML")
                where = "the uploaded file"
            else:
                if not path or not path.strip():
                    return None, None, "enter the path of a YAML config (or upload one)"
                cfg = load_yaml(Path(path.strip()).expanduser())
                where = path.strip()
        except ConfigError as e:
            return None, None, f"config error: {e}"
        except (UnicodeDecodeError, ValueError) as e:
            return None, None, f"cannot read the YAML: {e}"
        note = ""
        if cfg.task_type != "text-to-image":
            note = " (note: task_type text-generation is trained with the CLI, not this tab)"
        return config_to_form(cfg), cfg.train_data_dir, f"loaded {where}{note}"

    # ---- memory ------------------------------------------------------------------------------------------
    def memory_plan(self, cfg: TrainConfig):
        """The run's estimated peak memory on this host's device (the loaded checkpoint counts as resident)."""
        from ..train.memory_plan import plan_memory

        cfg, _notes = self.host.prepare_config(cfg)
        return plan_memory(self.host.loaded_checkpoint(), cfg, self.host.device(), resident=True)

    def memory(self, values: dict, folder: str) -> str:
        try:
            return self.memory_plan(self.config(values, folder)).describe()
        except (ConfigError, HostError) as e:
            return f"no estimate: {e}"
        except Exception as e:  # the estimate is advice: it never keeps anyone from training
            return f"no estimate ({type(e).__name__}: {_short(str(e))})"

    # ---- run ---------------------------------------------------------------------------------------------
    def start(self, values: dict, folder: str, resume: bool = False) -> tuple[str, str]:
        """(run message, memory message). A run whose estimate does not fit is started only when Start is pressed
        a second time with the same settings: the estimate may be wrong, the person decides."""
        memory = ""
        try:
            cfg = self.config(values, folder)
            if not resume and not cfg.resume_from_checkpoint:
                try:
                    plan = self.memory_plan(cfg)
                    memory = plan.describe()
                    if plan.fits is False and self._memory_warned != cfg.to_yaml():
                        self._memory_warned = cfg.to_yaml()
                        return ("not started: the estimate says this run will not fit in memory (see Memory). Change "
                                "the settings, or press Start again to train anyway."), memory
                except (ConfigError, HostError):
                    raise
                except Exception as e:
                    memory = f"no estimate ({type(e).__name__}: {_short(str(e))})"
            self._memory_warned = None
            job = self.runner.start(cfg, self.host, resume=resume)
        except (ConfigError, JobError, HostError) as e:
            return f"not started: {e}", memory
        what = "resuming" if resume or job.cfg.resume_from_checkpoint else "started"
        return f"{what} {job.name} (run folder {job.run_dir})", memory

    # ---- runs that can be resumed, and what a reloaded page shows ------------------------------------------
    def runs(self) -> list[dict]:
        try:
            return list_runs(self.host.work_dir())
        except OSError:
            return []

    def run_choices(self) -> list[str]:
        """Stopped runs, newest first; the run going on now is not one of them."""
        job = self.runner.job
        busy = Path(job.run_dir).resolve() if job is not None and not job.done else None
        return [_run_label(r) for r in self.runs() if Path(r["run_dir"]).resolve() != busy]

    def resume_run(self, label: str) -> tuple[Optional[dict], Optional[str], str]:
        """Resumes the chosen run with its own saved config: (form values, dataset folder, message)."""
        from ..train.state import saved_config

        run = next((r for r in self.runs() if _run_label(r) == label), None)
        if run is None:
            runs = self.runs()
            if label or not runs:
                return None, None, ("not resumed: choose a run to resume (press Refresh runs)" if runs else
                                    "not resumed: no stopped run with a checkpoint in " + str(self.host.work_dir()))
            run = runs[0]  # none chosen: the newest
        try:
            cfg = saved_config(run["checkpoint"]).replace(output_dir=str(Path(run["run_dir"]).parent),
                                                           resume_from_checkpoint=None)
            job = self.runner.start(cfg, self.host, resume=True)
        except (ConfigError, JobError, HostError) as e:
            return None, None, f"not resumed: {e}"
        return config_to_form(cfg), cfg.train_data_dir, (f"resuming {job.name} from {Path(run['checkpoint']).name} "
                                                         f"with its saved settings")

    def restore(self) -> dict[str, Any]:
        """What a freshly loaded page shows: the current or last run as it is, and that run's settings."""
        view = self.run_view()
        job = self.runner.job
        values, folder = None, None
        if job is not None:  # a resumed run's "resume: latest" is its own; Start on that form is a new run
            values = config_to_form(job.cfg.replace(output_dir=str(Path(job.run_dir).parent),
                                                    resume_from_checkpoint=None))
            folder = job.cfg.train_data_dir
        return {"values": values, "folder": folder, "view": view}

    def stop(self) -> str:
        if self.runner.stop():
            return "stopping: a resumable checkpoint is saved at the next step (Resume continues from it)"
        return "nothing is running"

    def run_view(self) -> dict[str, Any]:
        """Everything the Run section shows, from the job's status and events."""
        st = self.runner.status()
        events, _ = self.runner.events_since(0)
        lines = []
        for e in events:
            if e["kind"] == "step":
                continue
            text = e["message"] or e.get("path") or ""
            if e["kind"] == "sample":
                text = f"sample: {e['path']}"
            if text:
                stamp = datetime.datetime.fromtimestamp(e["time"]).strftime("%H:%M:%S")
                label = f"{e['kind']}: " if e["kind"] in ("failed", "stopped") else ""
                lines.append(f"{stamp} {label}{text}")
        job = self.runner.job
        image = loss_curve(job.losses, job.total_steps) if job is not None else None
        return {"status": format_status(st), "state": st["state"], "run": run_line(st),
                "log": "\n".join(lines[-300:]), "loss": image,
                "checkpoints": self.checkpoint_choices(st), "lora": Path(st["lora_path"]).stem
                if st.get("lora_path") else None, "done": (st["state"] in TERMINAL and not st.get("phase")) or st["state"] == "idle"}

    def checkpoint_choices(self, st: Optional[dict] = None) -> list[str]:
        st = st or self.runner.status()
        out = [INSTALLED]
        for c in st.get("checkpoints") or []:
            if c.get("lora") and Path(c["lora"]).is_file():
                out.append(f"step {c['step']}")
        return out

    # ---- preview -----------------------------------------------------------------------------------
    def lora_choices(self) -> list[str]:
        try:
            return self.host.list_loras()
        except Exception:
            return []

    def default_prompt(self, folder: str, trigger: str) -> str:
        return dt.default_prompt(folder, trigger)

    def _lora_for(self, lora_name: str, checkpoint: str):
        """(name the host's prompt uses, the staged preview copy to remove afterwards or None)."""
        if checkpoint and checkpoint != INSTALLED:
            st = self.runner.status()
            step = checkpoint.replace("step", "").strip()
            for c in st.get("checkpoints") or []:
                if str(c["step"]) == step and c.get("lora"):
                    staged = self.host.stage_lora(Path(c["lora"]), f"{st['name']}-step{int(c['step']):06d}")
                    return staged.name, staged
            raise UIError(f"checkpoint {checkpoint} is gone (pruned or from an earlier session)")
        if not lora_name:
            raise UIError("choose a LoRA (train one first, or press Refresh)")
        return lora_name, None

    def generate(self, prompt: str, lora_name: str, checkpoint: str, weight: float, seed, steps, size):
        """(PIL image or None, message, generation parameters for the host's Send buttons)."""
        if self.runner.running:
            return None, "a training run is using the GPU; preview when it has finished (or stop it)", ""
        staged = None
        try:
            name, staged = self._lora_for(lora_name, checkpoint)
            image = self.host.preview(prompt or "", name, float(weight), int(seed), int(steps), _size(size))
        except (UIError, HostError) as e:
            return None, str(e), ""
        except Exception as e:  # the host's own failure (NaNs, interrupted...): a message, not a traceback
            return None, f"the preview failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", ""
        finally:
            if staged is not None:
                self.host.unstage_lora(staged)
        params = (image.info or {}).get("parameters", "") if hasattr(image, "info") else ""
        settings = params.splitlines()[-1] if params else f"Seed: {int(seed)}, Steps: {int(steps)}"
        note = (" (a checkpoint's preview copy is removed after use: Send reproduces it only for the installed LoRA)"
                if staged is not None else "")
        return image, f"<lora:{name}:{float(weight):g}> {settings}{note}", params

    def sweep(self, prompt: str, lora_name: str, checkpoint: str, seed, steps, size):
        """([(PIL image, label)], message) for the weights 0, 0.25, 0.5, 0.75, 1."""
        if self.runner.running:
            return [], "a training run is using the GPU; preview when it has finished (or stop it)"
        staged = None
        try:
            name, staged = self._lora_for(lora_name, checkpoint)
            images = [(self.host.preview(prompt or "", name, w, int(seed), int(steps), _size(size)), f"weight {w:g}")
                      for w in SWEEP_WEIGHTS]
        except (UIError, HostError) as e:
            return [], str(e)
        except Exception as e:
            return [], f"the preview failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            if staged is not None:
                self.host.unstage_lora(staged)
        return images, f"{name}: weights {', '.join(f'{w:g}' for w in SWEEP_WEIGHTS)}, seed {int(seed)}"


def run_line(st: dict) -> str:
    """The Run box's one line, always about the run as it is now (never a stale "stopping ...")."""
    state, name = st.get("state", "idle"), st.get("name")
    if state == "idle":
        return "no run in this session yet: Start trains, Resume continues a stopped run"
    if state in ("waiting", "running", "finishing"):
        return f"{state}: {name} (Stop saves a checkpoint)"
    if state == "stopped":
        return f"stopped: {name}" + (" - Resume continues it" if st.get("last_checkpoint") else "")
    if state == "finished":
        return f"finished: {name}" + (f" - <lora:{Path(st['lora_path']).stem}:1>" if st.get("lora_path") else "")
    return f"failed: {name} - see Progress"


def _run_label(run: dict) -> str:
    when = datetime.datetime.fromtimestamp(run["time"]).strftime("%Y-%m-%d %H:%M")
    total = f"/{run['total_steps']}" if run.get("total_steps") else ""
    return f"{run['name']} - step {run['step']}{total} ({when})"


def format_status(st: dict) -> str:
    state = st.get("state", "idle")
    if state == "idle":
        return "idle: no training run in this session"
    parts = [f"{state}: {st.get('name')}"]
    total, step = st.get("total_steps") or 0, st.get("step") or 0
    if total:
        parts.append(f"step {step}/{total} ({100 * step // max(total, 1)}%)")
    if st.get("epoch"):
        parts.append(f"epoch {st['epoch']}")
    if st.get("loss") is not None:
        parts.append(f"loss {st['loss']:.4f}")
    if st.get("it_per_s"):
        parts.append(f"{st['it_per_s']:.2f} it/s")
    if st.get("eta_s") is not None and state == "running":
        parts.append(f"ETA {datetime.timedelta(seconds=int(st['eta_s']))}")
    text = ", ".join(parts)
    if st.get("phase"):
        text += f" - {st['phase']}"
    if state == "finished" and st.get("lora_path"):
        text += f"\nLoRA: {st['lora_path']}"
    if state == "stopped" and st.get("last_checkpoint"):
        text += f"\ncheckpoint: {st['last_checkpoint']} (Resume continues from it)"
    if state == "failed" and st.get("error"):
        text += f"\nerror: {st['error']}"
    return text


def _size(value) -> tuple[int, int]:
    if isinstance(value, (int, float)):
        v = int(value)
        return v, v
    text = str(value or "").replace("x", ",")
    parts = [p for p in text.split(",") if p.strip()]
    try:
        if len(parts) == 1:
            v = int(float(parts[0]))
            return v, v
        if len(parts) == 2:
            return int(float(parts[0])), int(float(parts[1]))
    except ValueError:
        pass
    raise UIError(f"size {value!r}: use 512 or width,height")


def _short(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


_thumbs: dict = {}
_thumbs_lock = threading.Lock()


def _thumbnail(path: Path):
    """A small RGB copy for the gallery, cached by (path, mtime, size): reloading the gallery after every
    caption edit must not decode a folder of large photos again."""
    from PIL import Image

    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    with _thumbs_lock:
        if key in _thumbs:
            return _thumbs[key]
    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB, THUMB))
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            thumb = im.copy()
    except Exception:
        return Image.new("RGB", (THUMB, THUMB), (200, 60, 60))  # unreadable: a red tile (the check says why)
    if key is not None:
        with _thumbs_lock:
            if len(_thumbs) > 4000:
                _thumbs.clear()
            _thumbs[key] = thumb
    return thumb
