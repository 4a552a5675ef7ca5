"""The AUTOMATIC1111 WebUI as a host (facts in docs/hosts.md; checked against A1111 v1.10.1).

Everything from the WebUI (`modules.*`, the built-in Lora extension's `networks`) is imported lazily, inside
the methods, so this file imports anywhere; the pure helpers (`live_state_dict`, `live_to_ldm_state_dict`,
`restore_lora_backups`) are unit-tested with small fake objects.

- The live checkpoint is `shared.sd_model`; its modules' `state_dict()` gives tensors that share storage with
  the WebUI's weights, under the WebUI's live names (`cond_stage_model.wrapped.*`,
  `conditioner.embedders.N.wrapped.*`, `token_embedding.wrapped.weight` where the WebUI wraps the token
  embedding for textual inversion), which are mapped back to the checkpoint's names.
- A1111 merges LoRAs into those weights in place and keeps a CPU backup per module: `clean_weights()`
  puts the backups back (under `torch.no_grad()` and the queue lock) and marks the modules as carrying no
  LoRA, so the WebUI re-applies its LoRAs on the next generation.
- `exclusive_gpu()` holds `modules.call_queue.queue_lock` for the whole run (as the WebUI's own textual
  inversion training did), shows progress through `shared.state` and turns the WebUI's Interrupt button into
  a stop request (a resumable checkpoint is saved).
"""
from __future__ import annotations

import datetime
import importlib
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from ..config import TrainConfig
from .base import CheckpointInfo, Host, HostBusy, HostError, LoadedCheckpoint, lora_prompt

LOCK_WAIT_S = 60.0   # how long a preview / interrogation waits for the WebUI's current generation
STATE_FIELDS = ("job", "job_no", "job_count", "textinfo", "sampling_step", "sampling_steps", "interrupted",
                "skipped", "stopping_generation", "time_start", "job_timestamp", "processing_has_refined_job_count")

_WRAPPED_PREFIX = re.compile(r"^(cond_stage_model|conditioner\.embedders\.\d+)\.wrapped\.")


# ---- pure helpers (no WebUI needed) -----------------------------------------------------------------
def live_state_dict(sd_model) -> dict:
    """The loaded model's weights under its live names: UNet, VAE and text encoder(s), sharing storage."""
    parts = [("model.diffusion_model.", sd_model.model.diffusion_model),
             ("first_stage_model.", sd_model.first_stage_model)]
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None:
        parts.append(("conditioner.", conditioner))
    else:
        parts.append(("cond_stage_model.", sd_model.cond_stage_model))
    out = {}
    for prefix, module in parts:
        out.update(module.state_dict(prefix=prefix))  # detached tensors on the same storage
    return out


def live_to_ldm_state_dict(sd: dict) -> dict:
    """The WebUI's live names -> the checkpoint file's names (same tensor objects, nothing copied).

    `cond_stage_model.wrapped.transformer.*` -> `cond_stage_model.transformer.*` (SD1),
    `cond_stage_model.wrapped.model.*` -> `cond_stage_model.model.*` (SD2),
    `conditioner.embedders.N.wrapped.*` -> `conditioner.embedders.N.*` (SDXL), and the textual-inversion
    wrapper around the token embedding, `token_embedding.wrapped.weight` -> `token_embedding.weight`."""
    out = {}
    for key, value in sd.items():
        new = _WRAPPED_PREFIX.sub(r"\1.", key)
        new = new.replace(".token_embedding.wrapped.", ".token_embedding.")
        if new in out:
            raise HostError(f"two live weights map to {new}; this WebUI version wraps its modules differently "
                            f"than expected")
        out[new] = value
    return out


def restore_lora_backups(root) -> int:
    """Puts A1111's backed-up original weights back into every module that has a LoRA merged in.

    A1111 keeps `network_weights_backup` / `network_bias_backup` (CPU copies of the clean weights) on each
    patched module and `network_current_names` (the LoRAs merged into it now). A module with no LoRA merged
    is left alone (its weights are the clean ones); a restored module gets `network_current_names = ()`, so
    the WebUI merges its LoRAs again on its next generation. Returns how many modules were restored.
    Call under torch.no_grad() and the queue lock."""
    import torch

    restored = 0
    for module in root.modules():
        weights = getattr(module, "network_weights_backup", None)
        bias = getattr(module, "network_bias_backup", None)
        if weights is None and bias is None:
            continue
        if not getattr(module, "network_current_names", ()):
            continue
        if isinstance(module, torch.nn.MultiheadAttention):
            if weights is not None:
                module.in_proj_weight.copy_(weights[0])
                module.out_proj.weight.copy_(weights[1])
            _restore_bias(module.out_proj, bias)
        else:
            if weights is not None:
                module.weight.copy_(weights)
            _restore_bias(module, bias)
        module.network_current_names = ()
        restored += 1
    return restored


def _restore_bias(module, backup) -> None:
    if backup is not None:
        module.bias.copy_(backup)
    elif getattr(module, "bias", None) is not None:
        module.bias = None  # the module had no bias until a LoRA with one was merged


def with_prompt(infotext: str, prompt: str) -> str:
    """The WebUI's infotext with `prompt` as its prompt: the WebUI writes the prompt with its <lora:...> tags taken
    out (they are parsed off before sampling), so pasting it into txt2img would generate without the LoRA."""
    lines = infotext.split("\n")
    end = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), len(lines) - 1)
    return "\n".join([prompt] + lines[end:])


class _QueueLock:
    """The WebUI's queue lock (not re-entrant), taken once per thread by this adapter."""

    def __init__(self, lock):
        self.lock = lock
        self.owner: Optional[int] = None

    def held_here(self) -> bool:
        return self.owner == threading.get_ident()

    @contextmanager
    def hold(self, wait_s: Optional[float], busy: str, stop=None) -> Iterator[None]:
        if self.held_here():
            yield
            return
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while not self.lock.acquire(False):  # polled, so a stop request can end the wait
            if stop is not None and stop:
                raise HostBusy("stopped while waiting for the WebUI to finish its current job")
            if deadline is not None and time.monotonic() > deadline:
                raise HostBusy(busy)
            time.sleep(0.2)
        self.owner = threading.get_ident()
        try:
            yield
        finally:
            self.owner = None
            self.lock.release()


# ---- the adapter ------------------------------------------------------------------------------------
class A1111Host(Host):
    kind = "a1111"
    display_name = "the WebUI"

    def __init__(self, log: Callable[[str], None] = print):
        self._log = log
        self._queue: Optional[_QueueLock] = None

    # -- WebUI modules ------------------------------------------------------------------------------
    @staticmethod
    def _m(name: str):
        return importlib.import_module(f"modules.{name}")

    def _lock(self) -> _QueueLock:
        if self._queue is None:
            self._queue = _QueueLock(self._m("call_queue").queue_lock)
        return self._queue

    def _sd_model(self):
        """The loaded model without triggering a load (None when none is loaded)."""
        try:
            model = self._m("sd_models").model_data.sd_model
        except (ImportError, AttributeError):
            model = getattr(self._m("shared"), "sd_model", None)
        return model

    @staticmethod
    def _networks():
        """The built-in Lora extension's `networks` module (None when that extension is disabled)."""
        return sys.modules.get("networks")

    # -- checkpoint ---------------------------------------------------------------------------------
    def checkpoint_info(self) -> CheckpointInfo:
        sd_model = self._sd_model()
        if sd_model is None:
            return CheckpointInfo(None, "", supported=False,
                                  message="No checkpoint is loaded in the WebUI: pick one in the Stable Diffusion "
                                          "checkpoint list at the top.")
        info = getattr(sd_model, "sd_checkpoint_info", None)
        title = getattr(info, "title", None) or getattr(info, "name", None) or "checkpoint"
        path = getattr(info, "filename", None)
        digest = getattr(info, "sha256", None)
        family, problem = self._family(sd_model)
        if problem is None:
            problem = self._memory_problem(sd_model)
        if problem:
            return CheckpointInfo(family, title, path, digest, supported=False, message=problem)
        v = getattr(sd_model, "parameterization", "eps") == "v"
        return CheckpointInfo(family, title, path, digest, supported=True,
                              message="v-prediction" if v else "")

    @staticmethod
    def _family(sd_model) -> tuple[Optional[str], Optional[str]]:
        if getattr(sd_model, "is_sd3", False):
            return None, "SD3 checkpoints cannot be trained here yet (SD1, SD2 and SDXL can): load another checkpoint."
        if getattr(sd_model, "is_ssd", False):
            return None, "SSD-1B (distilled SDXL) cannot be trained here: load an SD1, SD2 or SDXL checkpoint."
        if getattr(sd_model, "is_sdxl", False):
            family = "sdxl"
        elif getattr(sd_model, "is_sd2", False):
            family = "sd2"
        elif getattr(sd_model, "is_sd1", False) or hasattr(sd_model, "cond_stage_model"):
            family = "sd1"
        else:
            return None, "the loaded checkpoint is of a kind this trainer does not know"
        unet = sd_model.model.diffusion_model
        first = next((p for p in unet.parameters()), None)
        try:
            channels = int(unet.input_blocks[0][0].in_channels)
        except (AttributeError, IndexError, TypeError, KeyError):
            channels = 4
        if channels != 4 or getattr(sd_model, "is_sdxl_inpaint", False):
            return family, "this is an inpainting (or other non-standard) checkpoint: load a regular one to train on."
        if first is not None and "float8" in str(first.dtype):
            return family, ("the WebUI stores this model's weights in FP8 (Settings > Optimizations > FP8 weight); "
                            "turn that off and reload the checkpoint to train.")
        return family, None

    def _memory_problem(self, sd_model) -> Optional[str]:
        opts = getattr(self._m("shared"), "cmd_opts", None)
        if getattr(opts, "lowvram", False):
            return ("the WebUI runs with --lowvram, which streams the model through the GPU piece by piece; "
                    "training needs all of it there. Restart without --lowvram (--medvram works).")
        return None

    def _original_config(self, sd_model) -> Optional[dict]:
        path = getattr(sd_model, "used_config", None)
        if not path or not Path(str(path)).is_file():
            return None
        import yaml

        try:
            return yaml.safe_load(Path(str(path)).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None

    def loaded_checkpoint(self) -> LoadedCheckpoint:
        sd_model = self._sd_model()
        info = self.checkpoint_info()
        if sd_model is None or not info.supported:
            raise HostError(info.message)
        return LoadedCheckpoint(state_dict=live_to_ldm_state_dict(live_state_dict(sd_model)), family=info.family,
                                title=info.title, path=info.path, hash=info.hash,
                                v_prediction=getattr(sd_model, "parameterization", "eps") == "v",
                                original_config=self._original_config(sd_model))

    def prepare_config(self, cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
        import torch

        cfg, notes = super().prepare_config(cfg)
        changes = {}
        if cfg.device == "auto":
            changes["device"] = str(self._device())
        sd_model = self._sd_model()
        if sd_model is not None:
            dtype = next(self._unet(sd_model).parameters()).dtype
            if dtype in (torch.float16, torch.bfloat16) and cfg.mixed_precision == "no":
                changes["mixed_precision"] = "fp16" if dtype == torch.float16 else "bf16"
                notes.append(f"{self.display_name} keeps the model in {str(dtype).replace('torch.', '')}: training with "
                             f"mixed_precision {changes['mixed_precision']} (the LoRA itself stays float32)")
            info = getattr(sd_model, "sd_checkpoint_info", None)
            if not cfg.base_model and getattr(info, "filename", None):
                changes["base_model"] = str(info.filename)
        return (cfg.replace(**changes) if changes else cfg), notes

    def _device(self):
        return self._m("devices").device

    def device(self):
        return self._device()

    @staticmethod
    def _unet(sd_model):
        return sd_model.model.diffusion_model

    # -- contexts -----------------------------------------------------------------------------------
    @contextmanager
    def clean_weights(self) -> Iterator[None]:
        import torch

        sd_model = self._sd_model()
        with self._lock().hold(LOCK_WAIT_S, "the WebUI is busy; try again when its current job has finished"):
            with torch.no_grad():
                networks = self._networks()
                if networks is not None and hasattr(networks, "load_networks"):
                    networks.load_networks([])
                restored = restore_lora_backups(sd_model) if sd_model is not None else 0
        if restored:
            self._log(f"restored the original weights of {restored} module(s) that had a LoRA merged in")
        yield

    @contextmanager
    def exclusive_gpu(self, stop=None, events=None) -> Iterator[None]:
        shared = self._m("shared")
        problem = self._memory_problem(self._sd_model())
        if problem:
            raise HostError(problem)
        with self._lock().hold(None, "", stop=stop):
            undo = self._model_to_training_device()
            tracker = _StateTracker(shared.state, stop)
            if events is not None:
                events.subscribe(tracker.on_event)
            tracker.begin()
            try:
                yield
            finally:
                tracker.end()
                undo()

    def _model_to_training_device(self) -> Callable[[], None]:
        """Puts the whole model on the training device (called under the queue lock); returns the undo."""
        moved = self._to_device_for_medvram(self._sd_model())
        return (lambda: self._back_to_cpu(moved)) if moved else (lambda: None)

    def _to_device_for_medvram(self, sd_model) -> list:
        """--medvram keeps only one of UNet / VAE / text encoder on the GPU at a time; training needs them all
        there (and the state dict must be taken after the move, so it shares the GPU tensors)."""
        if sd_model is None or not getattr(sd_model, "lowvram", False):
            return []
        devices, lowvram = self._m("devices"), self._m("lowvram")
        lowvram.send_everything_to_cpu()
        parts = [sd_model.model.diffusion_model, sd_model.first_stage_model,
                 getattr(sd_model, "conditioner", None) or sd_model.cond_stage_model]
        for m in parts:
            m.to(devices.device)
        self._log("--medvram: the whole model is on the GPU while training")
        return parts

    def _back_to_cpu(self, parts: list) -> None:
        devices = self._m("devices")
        for m in parts:
            m.to(devices.cpu)
        if hasattr(devices, "torch_gc"):
            devices.torch_gc()

    # -- LoRA folder --------------------------------------------------------------------------------
    def lora_dir(self) -> Path:
        shared = self._m("shared")
        configured = getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)
        if configured:
            return Path(configured)
        return Path(self._m("paths").models_path) / "Lora"

    def work_dir(self) -> Path:
        try:
            return Path(self._m("paths").data_path) / "outputs" / "lora-trainer"
        except (ImportError, AttributeError):
            return super().work_dir()

    # -- the HTTP API -------------------------------------------------------------------------------
    def api_access(self, app) -> Optional[list]:
        """Served only when the WebUI serves its API (--api, --nowebui), behind its --api-auth: the very
        dependency its own /sdapi/v1 routes carry when one is found, else the same check on the same flag."""
        opts = getattr(self._m("shared"), "cmd_opts", None)
        if not (getattr(opts, "api", False) or getattr(opts, "nowebui", False)):
            return None
        credentials = getattr(opts, "api_auth", None)
        if not credentials:
            return []
        for route in getattr(app, "routes", []):
            deps = getattr(route, "dependencies", None)
            if str(getattr(route, "path", "")).startswith("/sdapi/v1/") and deps:
                return list(deps)
        from ..ui.api import basic_auth_dependency

        return [basic_auth_dependency(credentials)]

    def request_roots(self) -> dict:
        roots = super().request_roots()
        opts = getattr(self._m("shared"), "cmd_opts", None)
        try:
            models = Path(self._m("paths").models_path)
        except (ImportError, AttributeError):
            models = None
        folders = [getattr(opts, "ckpt_dir", None) or (models / "Stable-diffusion" if models else None),
                   getattr(opts, "vae_dir", None) or (models / "VAE" if models else None)]
        roots["models"] = [Path(f) for f in folders if f]
        return roots

    def refresh_loras(self) -> None:
        networks = self._networks()
        if networks is not None and hasattr(networks, "list_available_networks"):
            networks.list_available_networks()
        try:  # cached text conditioning would keep a re-saved LoRA's old text-encoder effect
            processing = self._m("processing")
            base = processing.StableDiffusionProcessing
            for cache in (base.cached_c, base.cached_uc):
                cache[0] = None
                cache[1] = None
        except (ImportError, AttributeError, TypeError, IndexError):
            pass

    # -- previews and captioners --------------------------------------------------------------------
    def preview(self, prompt: str, lora_name: Optional[str], weight: float, seed: int, steps: int,
                size: Union[int, tuple[int, int]], negative_prompt: str = "", cfg_scale: float = 7.0):
        if self._networks() is None and lora_name:
            raise HostError("the WebUI's built-in Lora extension is disabled, so it cannot load LoRAs: enable it in "
                            "Extensions")
        width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        shared, processing = self._m("shared"), self._m("processing")
        full_prompt = lora_prompt(prompt, lora_name, weight) if lora_name else prompt
        with self._lock().hold(LOCK_WAIT_S, "the WebUI is busy (generating or training); preview when it is done"):
            saved = {k: getattr(shared.state, k) for k in STATE_FIELDS if hasattr(shared.state, k)}
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=shared.sd_model, prompt=full_prompt, negative_prompt=negative_prompt, steps=int(steps),
                width=width, height=height, seed=int(seed), cfg_scale=float(cfg_scale), sampler_name="Euler",
                batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True)
            try:
                shared.state.begin(job="lora_trainer_preview")
                processed = processing.process_images(p)
                shared.state.end()
            finally:
                p.close()
                for k, v in saved.items():
                    setattr(shared.state, k, v)
        if not processed.images:
            raise HostError("the WebUI returned no image (interrupted?)")
        image = processed.images[0]
        texts = getattr(processed, "infotexts", None) or []
        if texts:  # sampler, steps, CFG, seed, size as the WebUI writes them
            image.info["parameters"] = with_prompt(texts[0], full_prompt)
        return image

    def send_buttons(self, image, text) -> bool:
        try:
            paste = self._m("infotext_utils")
        except ImportError:  # WebUIs before 1.8 named it so
            paste = self._m("generation_parameters_copypaste")
        buttons = paste.create_buttons(["txt2img", "img2img"])
        for tabname, button in buttons.items():
            paste.register_paste_params_button(paste.ParamBinding(
                paste_button=button, tabname=tabname, source_text_component=text, source_image_component=image))
        return True

    def interrogators(self) -> dict[str, Callable]:
        found: dict[str, Callable] = {}
        shared = self._m("shared")
        lock = self._lock()

        def locked(fn):
            def run(image):
                with lock.hold(LOCK_WAIT_S, "the WebUI is busy; caption when its current job has finished"):
                    return fn(image)
            return run

        if getattr(shared, "interrogator", None) is not None:
            found["clip-interrogator (WebUI)"] = locked(lambda im: shared.interrogator.interrogate(im.convert("RGB")))
        try:
            deepbooru = self._m("deepbooru")
            found["deepbooru (WebUI)"] = locked(lambda im: deepbooru.model.tag(im))
        except ImportError:
            pass
        return found


class _StateTracker:
    """Keeps `shared.state` honest while we train (the WebUI's progress bar and API show our steps) and prints
    a progress line to the WebUI's console every 10 % or 30 s, like the host's own jobs.

    The WebUI's Interrupt is a global flag: pressed on a generation that waits for us, it is meant for that
    generation, not for the training run. So it never stops training; the tab's Stop (or the API) does, and
    javascript/lora_trainer.js asks before turning an Interrupt during training into a Stop."""

    def __init__(self, state, stop, print_fn=print, every_s: float = 30.0):
        self.state = state
        self.stop = stop
        self.active = False
        self._print = print_fn
        self._every_s = every_s
        self._last_print = 0.0

    def begin(self) -> None:
        st = self.state
        if hasattr(st, "begin"):
            st.begin(job="lora_trainer")
        st.job_count = 0
        st.job_no = 0
        st.textinfo = "Training LoRA: preparing"
        self.active = True

    def on_event(self, event) -> None:
        if not self.active:
            return
        st = self.state
        if event.total_steps:
            st.job_count = event.total_steps
        if event.kind == "step":
            st.job_no = event.step
            st.textinfo = f"Training LoRA: step {event.step}/{event.total_steps}, loss {event.loss:.4f}"
            self._console(event)
        elif event.message:
            st.textinfo = "Training LoRA: " + event.message.splitlines()[0][:200]

    def _console(self, event) -> None:
        now = time.monotonic()
        every = max(1, (event.total_steps or 0) // 10)
        if event.step % every and event.step != event.total_steps and now - self._last_print < self._every_s:
            return
        self._last_print = now
        eta = f", ETA {datetime.timedelta(seconds=int(event.eta_s))}" if event.eta_s is not None else ""
        rate = f", {event.it_per_s:.2f} it/s" if event.it_per_s else ""
        try:
            self._print(f"[lora-trainer] step {event.step}/{event.total_steps}, loss {event.loss:.4f}{rate}{eta}")
        except Exception:  # a closed console must not end the run
            pass

    def end(self) -> None:
        self.active = False
        if hasattr(self.state, "end"):
            try:
                self.state.end()
            except Exception:  # state.end() needs begin()'s time_start; never let it hide the run's result
                pass
        self.state.textinfo = None
