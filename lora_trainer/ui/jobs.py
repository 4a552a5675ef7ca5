"""Background training jobs for the tab and the HTTP API: start / stop / status / events.

The tab never trains in a Gradio handler (that would block the UI); it starts a job here and polls. A job
runs the engine's `Trainer` in a thread, inside the host's `exclusive_gpu()` and `clean_weights()` contexts,
on the host's own weights (`host.base_model()`), then installs the LoRA into `host.lora_dir()` (never
replacing an existing file), refreshes the host and renders a preview `<name>.png` beside it with the host.

No training loop lives here (design.md): this only wires host, config and trainer together.
"""
from __future__ import annotations

import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, TrainConfig, atomic_write_bytes
from ..train.control import StopFlag
from ..train.events import EventBus
from ..train.memory_return import hand_back

TERMINAL = ("finished", "stopped", "failed")
_ids = itertools.count(1)


class JobError(RuntimeError):
    """A job cannot be started or controlled as asked (one is already running, ...)."""


@dataclass
class Job:
    id: int
    cfg: TrainConfig
    host: Any
    events: EventBus
    stop_flag: StopFlag
    name: str
    run_dir: Path
    preview_after: bool = True
    state: str = "waiting"              # waiting | running | finishing | finished | stopped | failed
    phase: str = ""                     # what it does between steps: "rendering sample 3/8", "installing ..."
    error: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: Optional[float] = None
    it_per_s: Optional[float] = None
    eta_s: Optional[float] = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)   # {"step", "folder", "lora"}
    samples: list[str] = field(default_factory=list)
    trained_path: Optional[str] = None     # the LoRA in the run folder
    lora_path: Optional[str] = None        # the LoRA installed in the host's folder
    preview_path: Optional[str] = None
    last_checkpoint: Optional[str] = None
    started_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None
    thread: Optional[threading.Thread] = None

    # -- event bookkeeping (called from the training thread) ---------------------------------------
    def on_event(self, e) -> None:
        if e.total_steps:
            self.total_steps = e.total_steps
        if e.data and "phase" in e.data:
            self.phase = e.data["phase"]
        elif e.kind in ("step", "finished", "stopped", "failed"):
            self.phase = ""
        if e.kind == "step":
            self.step, self.epoch, self.loss = e.step, e.epoch, e.loss
            self.it_per_s, self.eta_s = e.it_per_s, e.eta_s
            if e.loss is not None:
                self.losses.append((e.step, float(e.loss)))
        elif e.kind == "started":
            self.step = e.step
        elif e.kind == "checkpoint_saved":
            self.last_checkpoint = e.path
            write_loss_history(self.run_dir, self.losses)
            self.checkpoints.append({"step": e.step, "folder": e.path, "lora": (e.data or {}).get("lora")})
            removed = set((e.data or {}).get("removed") or [])
            if removed:
                self.checkpoints = [c for c in self.checkpoints if c["folder"] not in removed]
        elif e.kind == "sample" and e.path:
            self.samples.append(e.path)
        elif e.kind == "stopped" and e.path and e.path != "None":
            self.last_checkpoint = e.path

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "phase": self.phase, "name": self.name, "step": self.step,
            "total_steps": self.total_steps, "epoch": self.epoch, "loss": self.loss, "it_per_s": self.it_per_s,
            "eta_s": self.eta_s, "error": self.error, "notes": list(self.notes), "run_dir": str(self.run_dir),
            "trained_path": self.trained_path, "lora_path": self.lora_path, "preview_path": self.preview_path,
            "last_checkpoint": self.last_checkpoint, "checkpoints": list(self.checkpoints),
            "samples": list(self.samples), "started_at": self.started_at, "finished_at": self.finished_at,
            "events": self.events.since(0)[1],
        }


LOSS_FILE = "loss_history.json"


def _waiting_message(host) -> str:
    """Said while the job waits for the host: "the GPU" only where there is one."""
    if host.kind == "standalone":
        return "loading the base model"
    try:
        on_gpu = host.device().type == "cuda"
    except Exception:
        on_gpu = False
    return ("waiting for the GPU: the WebUI finishes its current generation first" if on_gpu else
            "waiting for the WebUI to finish its current generation")


def write_loss_history(run_dir: Path, losses: list) -> None:
    """The run's whole loss curve (across stops and resumes), so a reloaded page or a resumed run shows it all."""
    import json

    if not losses or not Path(run_dir).is_dir():
        return
    try:
        atomic_write_bytes(Path(run_dir) / LOSS_FILE, json.dumps([[int(s), float(v)] for s, v in losses]).encode())
    except OSError:
        pass  # the curve is a nicety; a full disk is reported by the checkpoint writer


def read_loss_history(run_dir: Path) -> list[tuple[int, float]]:
    import json

    try:
        data = json.loads((Path(run_dir) / LOSS_FILE).read_text(encoding="utf-8"))
        return [(int(s), float(v)) for s, v in data]
    except (OSError, ValueError, TypeError):
        return []


def list_runs(work_dir: Path) -> list[dict]:
    """Run folders under work_dir that can be resumed, newest checkpoint first:
    {"name", "run_dir", "checkpoint", "step", "total_steps", "time"}."""
    from ..train import state as ckpt

    runs = []
    root = Path(work_dir)
    if not root.is_dir():
        return runs
    for run_dir in root.iterdir():
        latest = ckpt.find_latest_checkpoint(run_dir) if run_dir.is_dir() else None
        if latest is None:
            continue
        try:
            progress = ckpt.read_progress(latest)
        except Exception:
            continue
        final = run_dir / f"{run_dir.name}.safetensors"
        if final.is_file() and final.stat().st_mtime >= latest.stat().st_mtime:
            continue  # it finished after its last checkpoint: nothing to resume
        runs.append({"name": run_dir.name, "run_dir": run_dir, "checkpoint": latest,
                     "step": progress.get("global_step", 0), "total_steps": progress.get("total_steps"),
                     "time": latest.stat().st_mtime})
    return sorted(runs, key=lambda r: -r["time"])


def run_folder(cfg: TrainConfig) -> Path:
    """Each LoRA name trains in its own folder under output_dir, so runs never mix their checkpoints."""
    return Path(cfg.output_dir).expanduser() / cfg.name


class JobRunner:
    """One training job at a time per process (the GPU is one); the tab and the API share a runner."""

    def __init__(self):
        self._lock = threading.Lock()
        self._job: Optional[Job] = None

    # -- control --------------------------------------------------------------------------------------
    @property
    def job(self) -> Optional[Job]:
        return self._job

    @property
    def running(self) -> bool:
        job = self._job
        return job is not None and not job.done

    def start(self, cfg: TrainConfig, host, *, preview_after: bool = True, resume: bool = False) -> Job:
        """Starts training in the background; returns at once. Problems that can be seen before the run
        (a job already running, a config that cannot work, nothing to resume) raise here."""
        from ..train import state as ckpt
        from ..train.preflight import check_config_paths

        with self._lock:
            if self.running:
                raise JobError(f"a training run ({self._job.name}) is already running; stop it or wait for it")
            cfg, notes = host.prepare_config(cfg)
            if not cfg.output_name:
                raise ConfigError("output_name is required: the name of the LoRA (its file name)")
            check_config_paths(cfg, base_model_given=True)  # the host's model is used, not cfg.base_model
            run_dir = run_folder(cfg)
            if resume and not cfg.resume_from_checkpoint:
                cfg = cfg.replace(resume_from_checkpoint="latest")
            earlier_losses: list = []
            if cfg.resume_from_checkpoint:
                folder = ckpt.resolve_resume(cfg.resume_from_checkpoint, run_dir)  # ConfigError when there is none
                ckpt.check_resume_compatible(folder, cfg)  # a changed rank is named now, not after loading
                step = ckpt.checkpoint_step(folder)
                earlier_losses = [(s_, l_) for s_, l_ in read_loss_history(run_dir) if s_ <= step]
            cfg = cfg.replace(output_dir=str(run_dir))
            events = EventBus()
            job = Job(id=next(_ids), cfg=cfg, host=host, events=events, stop_flag=StopFlag(), name=cfg.name,
                      run_dir=run_dir, preview_after=preview_after, notes=notes, losses=earlier_losses)
            events.subscribe(job.on_event)
            for note in notes:
                events.emit("message", message=note)
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"lora-trainer-job-{job.id}",
                                          daemon=True)
            self._job = job
            job.thread.start()
            return job

    def stop(self, reason: str = "stop requested from the UI: saving a resumable checkpoint") -> bool:
        """Asks the running job to save a resumable checkpoint and end; False when nothing runs."""
        job = self._job
        if job is None or job.done:
            return False
        job.stop_flag.set(reason)
        return True

    def wait(self, timeout: Optional[float] = None) -> bool:
        job = self._job
        if job is None or job.thread is None:
            return True
        job.thread.join(timeout)
        return not job.thread.is_alive()

    # -- observation ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        job = self._job
        if job is None:
            return {"id": None, "state": "idle"}
        return job.status()

    def events_since(self, index: int = 0) -> tuple[list[dict], int]:
        job = self._job
        if job is None:
            return [], 0
        events, new_index = job.events.since(index)
        return [e.to_dict() for e in events], new_index

    # -- the job thread -------------------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        from ..train.trainer import Trainer, TrainingFailed
        from ..hosts.base import HostBusy, HostError

        host, events = job.host, job.events
        log = lambda msg: events.emit("message", message=msg)  # noqa: E731
        result = None
        try:
            events.emit("message", message=_waiting_message(host))
            with host.exclusive_gpu(stop=job.stop_flag, events=events):
                job.state = "running"
                with host.clean_weights():
                    model = host.model_for(job.cfg, log=log)
                    # Start in the tab means a new run: an earlier run's checkpoints under this name are moved
                    # aside (kept), never overwritten step by step; Resume continues them instead.
                    trainer = Trainer(job.cfg, events, job.stop_flag, model=model, earlier_run="archive")
                    try:
                        result = trainer.run()
                    finally:
                        # The trainer leaves its LoRA layers in the model; the model is the host's, so take
                        # them out (previews and the next run start from the clean base model).
                        if trainer.network is not None and trainer.network.layers:
                            trainer.network.remove()
                        # drop every reference to the modules built on the host's tensors before the host
                        # gets its GPU back (with --medvram those tensors are the GPU copies)
                        trainer.network = None
                        trainer.model = None
                        del model, trainer
            if result.status != "finished":
                job.state = "stopped"
                return
            job.state, job.phase = "finishing", f"installing into {host.lora_dir()}"
            job.trained_path = str(result.lora_path)
            installed = host.install_lora(result.lora_path, overwrite=job.cfg.overwrite, name=job.name)
            job.lora_path = str(installed)
            host.refresh_loras()
            if installed.stem != job.name:
                log(f"{job.name} already exists in {host.lora_dir()}; installed as {installed.name} "
                    f"(overwrite: true replaces)")
            log(f"installed {installed} — prompt with <lora:{installed.stem}:1>")
            # finished as soon as the LoRA can be used; the card's picture follows (the thread ends after it)
            job.state, job.phase = "finished", ("rendering the LoRA card's preview" if job.preview_after else "")
            if job.preview_after:
                try:
                    self._preview_beside(job, installed, log)
                finally:
                    job.phase = ""
        except HostBusy as e:
            if job.stop_flag and result is None:  # stopped before the GPU was ours: nothing to save
                job.state = "stopped"
                job.events.emit("stopped", message=f"stopped before training began: {e}")
            else:
                self._fail(job, str(e))
        except (ConfigError, TrainingFailed, HostError) as e:
            self._fail(job, str(e))
        except Exception as e:  # anything else: the person sees the message, the console the traceback
            traceback.print_exc()
            self._fail(job, f"{type(e).__name__}: {e}")
        finally:
            job.finished_at = time.time()
            if job.state not in TERMINAL:
                job.state = "failed"
            write_loss_history(job.run_dir, job.losses)
            result = None
            hand_back()  # the WebUI's process lives on: give the run's memory back to the OS / the driver

    @staticmethod
    def _fail(job: Job, message: str) -> None:
        job.error = message
        job.state = "failed"
        last = job.events.last
        if last is None or last.kind != "failed":
            job.events.emit("failed", step=job.step, total_steps=job.total_steps, message=message)

    @staticmethod
    def _preview_beside(job: Job, installed: Path, log) -> None:
        """`<name>.png` beside the LoRA, generated by the host with the installed file (the WebUIs show it
        on the LoRA card)."""
        from .dataset_tools import default_prompt

        cfg = job.cfg
        prompt = default_prompt(cfg.train_data_dir, cfg.caption_prefix, cfg.caption_extension)
        w, h = cfg.sample_width or cfg.resolution_wh[0], cfg.sample_height or cfg.resolution_wh[1]
        try:
            image = job.host.preview(prompt, installed.stem, 1.0, cfg.sample_seed, min(cfg.sample_steps, 20), (w, h),
                                     cfg_scale=cfg.sample_cfg_scale)
        except Exception as e:  # the LoRA is saved; a failed preview must not turn the run into a failure
            log(f"could not render the preview image: {type(e).__name__}: {e}")
            return
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        path = installed.with_suffix(".png")
        atomic_write_bytes(path, buf.getvalue())
        job.preview_path = str(path)
        log(f"preview saved: {path}")


_default: Optional[JobRunner] = None
_default_lock = threading.Lock()


def default_runner() -> JobRunner:
    """The process-wide runner, shared by the tab (also across WebUI "Reload UI") and the HTTP API."""
    global _default
    with _default_lock:
        if _default is None:
            _default = JobRunner()
        return _default
