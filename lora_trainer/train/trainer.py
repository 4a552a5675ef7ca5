"""The LoRA training loop for image models (SD1, SD2, SDXL, FLUX.1: each a model kind, train/kinds.py).

Public API (used by the CLI and the WebUI tab): `Trainer(cfg, events, stop, model=None).run()`.
Everything the outside sees goes through `events` (design.md); `stop.set()` ends the run at the next
optimizer step with a resumable checkpoint.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, TrainConfig
from ..fsutil import remove_leftovers
from ..models.base import BaseModel
from ..network.kohya_file import new_session_id, save_lora, training_metadata, write_sidecar_json
from ..network.base import create_network
from . import state as ckpt
from .control import StopFlag, StopRequested
from .distributed import Processes, effective_batch_note, requested_engine, resume_note
from .latents import LatentEncoder
from .memory_plan import memory_note
from .run_guards import (disk_space_for_run, failure_message, new_run_name, read_init_lora,
                         set_aside_earlier_run, write_message)
from .errors import TrainingFailed
from .events import EventBus, StepTimer
from .kinds import encode_all_text, kind_for_config, kind_of
from .optim import make_optimizer, make_scheduler
from .sampling import load_prompts, sample_size
from .tblog import ScalarLog

OOM_ADVICE = ("out of memory. Try, in this order: batch_size: 1 with gradient_accumulation_steps to keep the "
              "effective batch; gradient_checkpointing: true; cache_latents: true; a lower resolution; "
              "mixed_precision: bf16 (or fp16); optimizer: adamw8bit; train_text_encoder: false; a lower lora_rank.")


@dataclass
class TrainResult:
    status: str                     # finished | stopped
    lora_path: Optional[Path]       # the final LoRA (None when stopped early)
    checkpoint: Optional[Path]      # the last resumable checkpoint
    global_step: int
    total_steps: int
    losses: list[float]


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig, events: Optional[EventBus] = None, stop: Optional[StopFlag] = None,
                 model: Optional[BaseModel] = None, log=None, keep_network: bool = False,
                 earlier_run: str = "refuse", processes: Optional[Processes] = None):
        """model: a BaseModel to train on (a host's); its LoRA layers are taken out again when the run ends,
        leaving the modules as they were, unless keep_network (tests that inspect the trained network).
        earlier_run: what a new (not resumed) run does with checkpoints of an earlier run in output_dir:
        "refuse" (say how to resume or start over; overwrite: true moves them aside) or "archive" (move them
        aside, the tab's Start).
        processes: the processes of a data-parallel run (distributed.py; the CLI under torchrun / accelerate
        launch); a single process by default, as in a WebUI."""
        self._earlier_run = earlier_run
        if cfg.task_type != "text-to-image":
            raise ConfigError(f"task_type {cfg.task_type!r} is trained by lora_trainer.text, not this trainer")
        self.cfg = cfg
        self.events = events if events is not None else EventBus()
        self.stop = stop if stop is not None else StopFlag()  # a StopFlag is falsy until set
        self.model = model
        self._log = log or (lambda msg: self.events.emit("message", message=msg))
        self.output_dir = Path(cfg.output_dir)
        self.network = None
        self._remove_network = model is not None and not keep_network
        self.procs = processes if processes is not None else Processes.single()
        engine = requested_engine()
        if engine:
            raise ConfigError(f"{engine} (configs/accelerate/{'fsdp' if engine == 'FSDP' else 'zero2/zero3'}.yaml) "
                              f"shards text-generation models; a Stable Diffusion UNet fits one GPU: launch with "
                              f"configs/accelerate/multi_gpu.yaml (data parallel)")
        self.device = self.procs.device if self.procs.distributed else pick_device(cfg.device)

    def log(self, msg: str) -> None:
        self._log(msg)

    # --- set-up -------------------------------------------------------------------------------------
    def phase(self, what: str, step: int = 0, total_steps: int = 0) -> None:
        """What the run is doing between steps (rendering samples, saving): shown beside the progress, not logged."""
        self.events.emit("message", step=step, total_steps=total_steps, data={"phase": what})

    def _precision(self) -> Optional[torch.dtype]:
        mp = self.cfg.mixed_precision
        if mp == "no":
            return None
        if mp == "fp16" and self.device.type == "cpu":
            self.log("mixed_precision fp16 is not supported on the CPU; using bf16 autocast instead")
            return torch.bfloat16
        return torch.float16 if mp == "fp16" else torch.bfloat16

    def _place_model(self, model: BaseModel, owns_model: bool, autocast_dtype: Optional[torch.dtype],
                     denoiser_later: bool = False) -> Optional[torch.dtype]:
        """Moves the frozen modules to the device; returns the autocast dtype.

        A model we loaded ourselves is in the training precision already (frozen weights in fp16/bf16 under
        mixed precision, fp32 otherwise; the VAE fp32, SD VAEs overflow in fp16): the loader converted it tensor
        by tensor, so the casts here change nothing on the CPU, and a move to the GPU goes parameter by
        parameter. A host's model is never cast: that would copy its weights. Half-precision host weights then
        run under autocast. denoiser_later: the UNet / transformer stays on the CPU until the text encoders have
        encoded every caption and left the device (kinds.encode_all_text), so the two never share it.
        """
        if owns_model:
            weights_dtype = autocast_dtype or torch.float32
            if denoiser_later:
                model.unet.to(dtype=weights_dtype)
            else:
                model.unet.to(self.device, dtype=weights_dtype)
            for te in model.text_encoders:
                te.to(self.device, dtype=weights_dtype)
            model.vae.to(self.device, dtype=torch.float32)
            return autocast_dtype
        model.to(self.device)
        host_dtype = getattr(model, "compute_dtype", None) or next(model.unet.parameters()).dtype
        if autocast_dtype is None and host_dtype in (torch.float16, torch.bfloat16):
            self.log(f"the base weights are {str(host_dtype).replace('torch.', '')}: training under autocast in that "
                     f"precision (LoRA weights stay fp32)")
            return host_dtype
        return autocast_dtype

    def _load_model(self, weights_dtype: torch.dtype) -> BaseModel:
        if self.model is None:
            self.cfg.require("base_model")
            self.model = kind_for_config(self.cfg).load(self.cfg, self.log, weights_dtype, self.device)
        self.kind = kind_of(self.model)  # the family-specific parts of the run
        self.kind.configure(self.model, self.cfg)
        return self.model

    # --- the run ------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            return self._run()
        except StopRequested:
            # stopped before the first step could be saved (loading, caching): nothing to resume from
            msg = f"stopped before training began ({self.stop.reason})"
            self.events.emit("stopped", step=0, total_steps=0, message=msg)
            return TrainResult("stopped", None, None, 0, 0, [])
        except TrainingFailed as e:
            self.events.emit("failed", message=str(e))
            raise
        except ConfigError as e:
            self.events.emit("failed", message=str(e))
            raise
        except RuntimeError as e:
            if "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError":
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                msg = f"{self.device}: {OOM_ADVICE}"
                self.events.emit("failed", message=msg)
                raise TrainingFailed(msg) from None
            self.events.emit("failed", message=failure_message(e))
            raise
        except Exception as e:
            self.events.emit("failed", message=failure_message(e))
            raise
        finally:
            if self.network is not None and getattr(self, "_remove_network", False):
                self.network.remove()

    def _run(self) -> TrainResult:
        from ..data import build_dataset, LatentCache

        from .preflight import check_config_paths

        cfg = self.cfg
        # every path is checked before the model loads: a typo costs a second, not a model load and a cache
        check_config_paths(cfg, base_model_given=self.model is not None)
        started_at = time.time()
        torch.manual_seed(cfg.seed)
        resume_from = ckpt.resolve_resume(cfg.resume_from_checkpoint, self.output_dir)
        if resume_from:
            ckpt.check_resume_compatible(resume_from, cfg)
        procs = self.procs
        procs.main_first(lambda: self._tidy_output_dir(resume_from), (ConfigError, OSError))

        owns_model = self.model is None
        autocast_dtype = self._precision()
        model = self._load_model(autocast_dtype or torch.float32)
        self.stop.check()
        model.freeze()
        release_text = owns_model and self.kind.releases_text_encoders(cfg)
        autocast_dtype = self._place_model(model, owns_model, autocast_dtype, denoiser_later=release_text)
        self.latents = LatentEncoder(model.vae, self.device, cfg.batch_size, procs, self.stop, self.log)
        note = memory_note(model, cfg, self.device)
        if note:
            self.log(note)
        init_lora = None
        if cfg.init_lora_weights and not resume_from:  # read before the dataset: a bad file fails in seconds
            init_lora = read_init_lora(cfg.init_lora_weights, model.family)

        network = create_network(model, cfg)
        self.network = network
        network_dtype = torch.float32
        for p in network.parameters():
            p.data = p.data.to(self.device, network_dtype)
        counts = ", ".join(f"{k}: {v}" for k, v in network.num_modules().items())
        self.log(f"{network.describe()} on {len(network.layers)} modules ({counts})")

        if init_lora is not None:
            network.load_state_dict(init_lora, source=f"init_lora_weights {Path(cfg.init_lora_weights).name}")
            self.log(f"starting from {cfg.init_lora_weights} (incremental training)")
        procs.broadcast_parameters(network.parameters())
        self.stop.check()

        ds = build_dataset(cfg, log=self.log)
        ds.set_global_batch(cfg.batch_size * procs.world)
        use_cache = cfg.cache_latents and ds.cacheable
        cache = None
        if use_cache:
            folder = None
            if cfg.cache_latents_to_disk or procs.distributed:
                folder = Path(cfg.cache_dir) if cfg.cache_dir else self.output_dir / "cache"
                if not cfg.cache_latents_to_disk:
                    self.log(f"latents are cached on disk ({folder}) so that the {procs.world} processes share "
                             f"one cache, each encoding its part")
            cache = LatentCache(folder)
            self.latents.fill(ds, cache)
        else:
            ds.verify(self.log)
        prompts = load_prompts(cfg.sample_prompts) if procs.is_main else []
        text_cache: OrderedDict[str, tuple] = OrderedDict()
        if release_text:
            with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                encode_all_text(model, ds.all_captions(), prompts, lambda t: self._text(t, text_cache), self.device,
                                self.stop, self.log, self.phase)
            model.unet.to(self.device)  # in its training precision already (_place_model)

        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for te in model.text_encoders:
                    te.gradient_checkpointing_enable()
        model.unet.train(cfg.gradient_checkpointing)  # diffusers only checkpoints in train mode; dropout is 0
        for te in model.text_encoders:
            te.train(cfg.train_text_encoder and cfg.gradient_checkpointing)

        accum = cfg.gradient_accumulation_steps
        micro_per_epoch = ds.steps_per_epoch
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
        if cfg.max_train_steps:
            total_steps = cfg.max_train_steps
            epochs = math.ceil(total_steps / steps_per_epoch)
        else:
            epochs = cfg.epochs
            total_steps = epochs * steps_per_epoch

        unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
        te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
        optimizer = make_optimizer(cfg, network.param_groups(unet_lr, te_lr))
        scheduler = make_scheduler(cfg, optimizer, total_steps)
        scaler = None
        if autocast_dtype == torch.float16 and self.device.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        generator = torch.Generator("cpu").manual_seed(cfg.seed)

        n_weights = sum(p.numel() for p in network.parameters())
        space = procs.is_main and disk_space_for_run(cfg, self.output_dir, n_weights, total_steps, epochs)
        if space:
            self.log("warning: " + space)
        global_batch = cfg.batch_size * procs.world

        global_step, start_epoch, start_micro = 0, 0, 0
        resumed_progress = None
        if resume_from:
            state = ckpt.load_checkpoint(resume_from, rank=procs.rank)
            network.load_state_dict(state["weights"], source=f"checkpoint {resume_from}")
            optimizer.load_state_dict(state["optim"]["optimizer"])
            scheduler.load_state_dict(state["optim"]["scheduler"])
            if scaler is not None and state["optim"].get("scaler"):
                scaler.load_state_dict(state["optim"]["scaler"])
            progress = resumed_progress = state["progress"]
            global_step, start_epoch, start_micro = progress["global_step"], progress["epoch"], progress["micro_step"]
            ckpt.set_rng_state(state["rng"], generator, fallback_seed=cfg.seed + global_step)
            saved_batch = progress.get("global_batch", cfg.batch_size if "num_processes" not in progress else None)
            note = resume_note(int(progress.get("num_processes", 1)), saved_batch, procs.world, global_batch)
            if note:
                self.log(note)
                if saved_batch and saved_batch != global_batch:  # the same samples seen, in batches of the new size
                    start_micro = min(len(ds.epoch_batches(start_epoch)), start_micro * saved_batch // global_batch)
            for note in state["notes"]:
                self.log(note)
            if progress.get("total_steps") not in (None, total_steps):
                self.log(f"note: the checkpoint was made for {progress['total_steps']} steps; this run has "
                         f"{total_steps} (the schedule continues from step {global_step})")
            self.log(f"resumed from {resume_from} at step {global_step} (epoch {start_epoch + 1}, "
                     f"batch {start_micro})")

        tb_root = Path(cfg.logging_dir) if cfg.logging_dir else self.output_dir / "logs"
        tb_run = (resumed_progress or {}).get("tb_run") or new_run_name(tb_root, cfg.name)
        tb = ScalarLog(tb_root / tb_run if cfg.log_with == "tensorboard" and procs.is_main else None)
        if tb.unavailable:
            self.log(tb.unavailable)
        session_id = new_session_id()
        sw, sh = sample_size(cfg)
        losses: list[float] = []
        last_checkpoint: Optional[Path] = None
        timer = StepTimer()
        timer.tick()
        if procs.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)

        def metadata(epoch: int, step: int) -> dict[str, str]:
            return training_metadata(cfg, model, session_id=session_id, started_at=started_at,
                                     num_images=len(ds.active_indices()), num_samples=ds.num_samples, epoch=epoch,
                                     step=step, max_steps=total_steps, tag_frequency=ds.tag_frequency(),
                                     dataset_dirs=ds.dataset_dirs(), reg_dataset_dirs=ds.dataset_dirs(is_reg=True),
                                     num_epochs=epochs, batches_per_epoch=micro_per_epoch,
                                     bucket_info=ds.bucket_info(), num_processes=procs.world)

        saved_at: dict[str, Optional[int]] = {"step": None}

        def save_checkpoint(epoch: int, micro: int) -> Path:
            folder = self.output_dir / f"checkpoint-{global_step}"
            if saved_at["step"] == global_step:  # a stop right after a scheduled save: it is on disk already
                return folder
            rank_rngs = procs.gather(ckpt.rng_state()) if procs.distributed else None  # every rank's own
            if not procs.is_main:
                saved_at["step"] = global_step
                return folder
            weights = network.state_dict(torch.float32)
            lora_name = f"{cfg.name}-step{global_step:08d}.safetensors"

            def write_lora(path: Path) -> None:
                save_lora(path, weights, metadata(epoch, global_step), cfg.save_precision, overwrite=True)

            try:
                ckpt.save_checkpoint(folder, weights=weights, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                     generator=generator, cfg=cfg, extra_files={lora_name: write_lora},
                                     rank_rngs=rank_rngs,
                                     progress={"global_step": global_step, "epoch": epoch, "micro_step": micro,
                                               "total_steps": total_steps, "session_id": session_id,
                                               "tb_run": tb_run, "num_processes": procs.world,
                                               "global_batch": global_batch})
            except OSError as e:
                where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
                raise TrainingFailed(f"{write_message(folder, e)}{where}. Free some space and resume") from None
            saved_at["step"] = global_step
            removed = ckpt.prune_checkpoints(self.output_dir, cfg.save_last_n_checkpoints)
            self.events.emit("checkpoint_saved", step=global_step, total_steps=total_steps, epoch=epoch,
                             path=str(folder), message=f"checkpoint saved: {folder}",
                             data={"lora": str(folder / lora_name), "removed": [str(p) for p in removed]})
            return folder

        def samples(tag: str) -> None:
            if not prompts or self.stop or not procs.is_main:
                return
            try:
                with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    paths = self.kind.save_samples(
                        model, prompts, self.output_dir / "samples", tag, seed=cfg.sample_seed,
                        steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg_scale, width=sw, height=sh,
                        clip_skip=cfg.clip_skip, stop=self.stop, text=lambda ps: self._text(ps, text_cache),
                        on_image=lambda i, n: self.phase(f"rendering sample {i}/{n}", global_step, total_steps))
            except StopRequested:
                self.log("sample rendering skipped: stop requested")
                return
            except OSError as e:  # a sample is a nicety: a full disk here must not end the run
                self.log(f"sample not saved: {write_message(self.output_dir / 'samples', e)}")
                return
            for p in paths:
                self.events.emit("sample", step=global_step, total_steps=total_steps, path=str(p))

        self.events.emit("started", step=global_step, total_steps=total_steps,
                         message=f"training {model.describe()}: {len(ds.items)} images, {ds.num_samples} samples "
                                 f"per epoch, {steps_per_epoch} steps per epoch, {total_steps} steps, "
                                 f"{effective_batch_note(cfg.batch_size, procs.world, accum)}"
                                 + (f" on {procs.world} processes" if procs.distributed else ""),
                         data={"images": len(ds.items), "steps_per_epoch": steps_per_epoch, "epochs": epochs,
                               "processes": procs.world, "effective_batch": global_batch * accum})

        status = "finished"
        epoch = start_epoch
        params = list(network.parameters())
        network.set_dropouts(True)  # samples and previews run without (no gradients there)
        while epoch < epochs and global_step < total_steps:
            batches = ds.epoch_draws(epoch)
            micro = start_micro if epoch == start_epoch else 0
            accum_loss, accum_count = 0.0, 0
            while micro < len(batches) and global_step < total_steps:
                # micro-batches of one optimizer step: up to `accum`, never across the epoch's end
                group_end = min(len(batches), (micro // accum + 1) * accum)
                n_in_group = group_end - micro
                for m in range(micro, group_end):
                    share = procs.share(len(batches[m]), cfg.batch_size)
                    loss = self._forward(ds, batches[m], share, epoch, cache, generator, text_cache, autocast_dtype)
                    if loss is None:  # this process's slice of a last, small batch is empty
                        continue
                    loss_value = loss.item()  # the one device sync of a micro-step
                    if share.weight != 1.0:  # the slice's part of the global batch mean
                        loss, loss_value = loss * share.weight, loss_value * share.weight
                    scaled = loss / n_in_group
                    (scaler.scale(scaled) if scaler else scaled).backward()
                    accum_loss += loss_value
                micro = group_end
                accum_loss, stops = procs.sum_gradients(params, [accum_loss, 1.0 if self.stop else 0.0])
                accum_count = n_in_group
                if not math.isfinite(accum_loss):
                    where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
                    raise TrainingFailed(f"the loss became {accum_loss} at step {global_step + 1}{where}. "
                                         f"Lower the learning_rate, use mixed_precision: bf16 or no, or set "
                                         f"max_grad_norm: 1.0")
                if stops > 0 and not self.stop:
                    self.stop.set("stop requested by another process")
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = None
                if cfg.max_grad_norm:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    grad_norm = float(grad_norm) if cfg.log_with == "tensorboard" else None
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                step_loss = accum_loss / max(accum_count, 1)
                accum_loss, accum_count = 0.0, 0
                losses.append(step_loss)
                timer.tick()
                lr = scheduler.get_last_lr()[0]
                tb.scalars(global_step, **{"loss/train": step_loss, "lr/unet": lr, "grad_norm": grad_norm})
                self.events.emit("step", step=global_step, total_steps=total_steps, epoch=epoch + 1, loss=step_loss,
                                 lr=lr, it_per_s=timer.rate(), eta_s=timer.eta(total_steps - global_step))
                epoch_done = micro >= len(batches)
                next_pos = (epoch + 1, 0) if epoch_done else (epoch, micro)
                if cfg.save_steps and global_step % cfg.save_steps == 0 and global_step < total_steps:
                    last_checkpoint = save_checkpoint(*next_pos)
                if cfg.sample_every_n_steps and global_step % cfg.sample_every_n_steps == 0 \
                        and global_step < total_steps:
                    samples(f"step{global_step:08d}")
                # every rank decides on the flags summed with this step's gradients; one process on its own flag
                stop_now = stops > 0 if procs.distributed else bool(self.stop)
                if stop_now and global_step < total_steps:
                    last_checkpoint = save_checkpoint(*next_pos)
                    status = "stopped"
                    break
            if status == "stopped":
                break
            epoch += 1
            if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and global_step < total_steps:
                last_checkpoint = save_checkpoint(epoch, 0)

        network.set_dropouts(False)
        tb.close()
        if status == "stopped":
            self.events.emit("stopped", step=global_step, total_steps=total_steps, path=str(last_checkpoint),
                             message=f"stopped at step {global_step}/{total_steps} ({self.stop.reason}); the run "
                                     f"continues from {last_checkpoint}")
            return TrainResult("stopped", None, last_checkpoint, global_step, total_steps, losses)
        if not procs.is_main:
            return TrainResult("finished", None, last_checkpoint, global_step, total_steps, losses)

        self.phase("saving the LoRA", global_step, total_steps)
        try:
            final = save_lora(self.output_dir / f"{cfg.name}.safetensors", network.state_dict(torch.float32),
                              metadata(epoch, global_step), cfg.save_precision, overwrite=cfg.overwrite)
        except OSError as e:
            raise TrainingFailed(self._final_save_failed(e, save_checkpoint, epoch, last_checkpoint)) from None
        if final.stem != cfg.name:
            self.log(f"{cfg.name}.safetensors already exists; saved as {final.name} instead (overwrite: true replaces)")
        trigger = cfg.caption_prefix.strip().strip(",").strip()
        try:
            write_sidecar_json(final, trigger, 1.0, self.kind.card_version(model))
        except OSError as e:  # the card's text only; the LoRA itself is saved
            self.log(f"the LoRA card file was not written: {write_message(final.with_suffix('.json'), e)}")
        samples(f"{final.stem}_final")
        self.events.emit("finished", step=global_step, total_steps=total_steps, path=str(final),
                         message=f"LoRA saved: {final}", data={"name": final.stem})
        return TrainResult("finished", final, last_checkpoint, global_step, total_steps, losses)

    def _tidy_output_dir(self, resume_from) -> None:
        """Before a run writes into output_dir (the main process only, in a data-parallel run)."""
        if not resume_from:
            set_aside_earlier_run(self.cfg, self.output_dir, self._earlier_run == "archive", self.log)
        for leftover in remove_leftovers(self.output_dir):
            self.log(f"removed {leftover.name}, left by an interrupted save")

    def _final_save_failed(self, error: OSError, save_checkpoint, epoch: int, last_checkpoint) -> str:
        """The final LoRA could not be written: keep the trained weights as a resumable checkpoint if the disk
        allows it (resuming it only writes the LoRA), and say where things stand."""
        msg = write_message(self.output_dir / f"{self.cfg.name}.safetensors", error)
        try:
            folder = save_checkpoint(epoch, 0)
        except TrainingFailed:
            where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                     else "no checkpoint could be written either")
            return f"{msg}; {where}. Free some space and resume"
        return (f"{msg}. The trained weights are saved as {folder}: free some space and resume from it (only the "
                f"LoRA file is written then)")

    # --- one micro-batch ----------------------------------------------------------------------------
    def _forward(self, ds, global_draws: list[tuple[int, int]], share, epoch: int, cache, generator, text_cache,
                 autocast_dtype) -> Optional[torch.Tensor]:
        """The loss of this process's share of one global batch (None when the share is empty). Noise and
        timesteps are drawn for the whole global batch from the generator every process holds in the same
        state, and sliced, so a draw gets the same noise whichever process trains it."""
        cfg, model = self.cfg, self.model
        draws = global_draws[share.start:share.end]
        batch = [i for i, _ in draws]
        if not draws:  # the draws still advance the generator, as on the other processes
            shape = self.kind.latent_shape(model, ds.items[global_draws[0][0]].bucket)
            self.kind.draw(model, cfg, (share.total, *shape), generator)
            return None
        if cache is not None:
            latents = torch.stack([cache.get(self.latents.key(ds, i)) for i in batch]).to(self.device)
            meta = [_center_crop_geometry(ds.items[i]) for i in batch]
        else:
            meta = [ds.load_sample(i, epoch, pos) for i, pos in draws]
            latents = self.latents.encode(torch.stack([s["pixels"] for s in meta]))
        captions = [ds.caption_for(i, epoch, pos) for i, pos in draws]
        weights = torch.tensor([ds.items[i].loss_weight for i in batch], dtype=torch.float32)

        part = slice(share.start, share.end)
        noise, timesteps = self.kind.draw(model, cfg, (share.total, *latents.shape[1:]), generator)
        noise = noise[part].to(latents.device, latents.dtype)
        timesteps = timesteps[part].to(self.device)
        autocast = partial(torch.autocast, self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        return self.kind.loss(model, cfg, latents, noise, timesteps, captions, meta, weights,
                              lambda c: self._text(c, text_cache), autocast)

    def _text(self, captions: list[str], text_cache: OrderedDict):
        return self.kind.encode_text(self.model, self.cfg, captions, text_cache, self.log)


def _center_crop_geometry(item) -> dict:
    """SDXL size conditioning of a centre-cropped item without decoding it (cached latents)."""
    from ..data.buckets import cover_size

    bw, bh = item.bucket
    nw, nh = cover_size((item.width, item.height), item.bucket)
    return {"original_size": (item.height, item.width), "crop_top_left": ((nh - bh) // 2, (nw - bw) // 2),
            "target_size": (bh, bw)}
