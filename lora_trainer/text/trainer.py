"""The training loop for task_type: text-generation (causal LM + peft LoRA).

Same config, events, optimizers, checkpoints and TensorBoard log as the image trainer; see README_section.md.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import yaml

from ..config import ConfigError, TrainConfig
from ..train.control import StopFlag
from ..train.events import EventBus, StepTimer
from ..train.optim import make_optimizer, make_scheduler
from ..train.distributed import effective_batch_note, resume_note
from ..train.state import (CONFIG_FILE, find_latest_checkpoint, load_checkpoint, prune_checkpoints, resolve_resume,
                           rng_state, save_checkpoint, set_rng_state)
from ..train.tblog import ScalarLog
from ..train.errors import TrainingFailed
from .dataset import build_dataset, collate, epoch_batches, steps_per_epoch
from ..fsutil import free_path, write_folder_atomically
from .model import SAVE_DTYPES, add_lora, load_causal_lm, load_tokenizer, save_adapter_files, trainable_state
from .quantization import check_quantization, prepare_quantized, quantization_kwargs, quantization_note
from .sharding import SavedState, ShardedModel, fsdp_requested
from .zero import ZeroModel, deepspeed_requested
from .templates import IGNORE_INDEX, template_note

MAX_ISSUE_MESSAGES = 20
BEST_FILE = "best_lora.safetensors"
# Config keys that change the data order or the network: a resume with other values is not exact.
RESUME_KEYS = ("base_model", "train_data_dir", "batch_size", "gradient_accumulation_steps", "seed", "max_seq_length",
               "prompt_template", "packing", "validation_split", "lora_rank", "lora_alpha", "target_modules")


OOM_ADVICE = ("out of GPU memory. Try, in this order: batch_size: 1 with a larger gradient_accumulation_steps, "
              "gradient_checkpointing: true, a smaller max_seq_length, mixed_precision: bf16 (or fp16), a smaller "
              "lora_rank or fewer target_modules")


class TextTrainingError(TrainingFailed):
    """Training could not go on (e.g. the loss became NaN); the message says what to do."""


def train_text(cfg: TrainConfig, events: EventBus, stop: Optional[StopFlag] = None, processes=None) -> Path:
    """Trains a LoRA adapter for a causal LM. Returns the adapter folder (output_dir/output_name), or the
    checkpoint folder when the stop flag ended the run early. Emits `failed` and re-raises on any error.
    processes: a data-parallel run's Processes (train/distributed.py); a single process by default."""
    try:
        return _TextRun(cfg, events, stop if stop is not None else StopFlag(), processes).run()
    except (ConfigError, TextTrainingError) as e:
        if not getattr(e, "_reported", False):
            events.emit("failed", message=str(e))
        raise
    except torch.cuda.OutOfMemoryError:
        msg = OOM_ADVICE
        events.emit("failed", message=msg)
        raise TextTrainingError(msg) from None
    except Exception as e:
        from ..train.run_guards import failure_message

        events.emit("failed", message=failure_message(e))
        raise


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device; use auto, cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} but torch sees no CUDA GPU; use device: cpu or auto")
    return dev


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (labels are shifted here)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _n_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class _TextRun:
    def __init__(self, cfg: TrainConfig, events: EventBus, stop: StopFlag, processes=None):
        from ..train.distributed import Processes

        self.cfg, self.events, self.stop = cfg, events, stop
        self.procs = processes if processes is not None else Processes.single()
        self.stop_synced = False
        self.out_dir = Path(cfg.output_dir)
        self.last_checkpoint: Optional[Path] = None
        self.best_weights: Optional[dict] = None
        self.p = {"global_step": 0, "epoch": 0, "micro": 0, "epoch_done": False, "best_val": None, "best_step": None,
                  "best_epoch": None, "bad_validations": 0, "early_stopped": False, "last_val_step": None}

    def msg(self, text: str, **kw) -> None:
        self.events.emit("message", message=text, step=self.p["global_step"], **kw)

    # ---- set-up -------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        cfg.require("base_model", "train_data_dir")
        if cfg.task_type != "text-generation":
            self.msg(f"task_type is {cfg.task_type!r}; training a text-generation LoRA anyway")
        self.device = self.procs.device if self.procs.distributed else resolve_device(cfg.device)
        check_quantization(cfg, self.device)  # before anything loads: a missing GPU costs a second, not a model load
        self._precision()
        resume = resolve_resume(cfg.resume_from_checkpoint, self.out_dir)
        if resume is None and find_latest_checkpoint(self.out_dir) is not None:
            self.msg(f"{self.out_dir} holds checkpoints of an earlier run; those with the same step numbers will be "
                     f"replaced (resume_from_checkpoint: latest continues that run instead)")

        self.tokenizer = load_tokenizer(cfg.base_model)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.data = build_dataset(cfg, tok)
        self._report_data()
        note = template_note(cfg.prompt_template, tok)
        if note:
            self.msg(note)

        torch.manual_seed(cfg.seed)  # the LoRA initialisation
        quantization = quantization_kwargs(cfg, self.device)
        model = load_causal_lm(cfg.base_model, dtype=self.model_dtype, **quantization)
        model.config.use_cache = False
        if quantization:
            prepare_quantized(model, cfg)
            self.msg(quantization_note(cfg))
        elif cfg.gradient_checkpointing:
            # transformers 5 renamed it activation_checkpointing_enable; 4.30 takes no arguments
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                enable()
            model.enable_input_require_grads()
        model, self.targets = add_lora(cfg, model, self.msg)
        base_path = Path(cfg.base_model).expanduser()
        if base_path.is_dir():  # so that merge finds the base model from anywhere
            model.peft_config["default"].base_model_name_or_path = str(base_path.resolve())
        self.model = model if quantization else model.to(self.device)  # a quantized model is placed as it loads
        self.procs.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
        self.sharded = None
        if fsdp_requested():
            self.sharded = ShardedModel(model, self.procs)
            self.msg(f"FSDP: the model is sharded over {self.procs.world} processes ({self.sharded.blocks} blocks)")
        self.params = [p for p in model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in self.params)

        self.global_batch = cfg.batch_size * self.procs.world
        self.spe = steps_per_epoch(len(self.data.train), self.global_batch, cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_train_steps or cfg.epochs * self.spe
        self.optimizer = make_optimizer(cfg, [{"params": self.params, "lr": cfg.learning_rate}])
        self.scheduler = make_scheduler(cfg, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.use_scaler else None
        if resume is not None:
            self._resume(resume)
        self.zero = None
        if deepspeed_requested():  # after the resume: the engine takes the weights and optimizer state as loaded
            self.zero = self.sharded = ZeroModel(model, self.optimizer, cfg, self.procs)
            self.msg(self.zero.describe())
        self.log = ScalarLog(Path(cfg.logging_dir or self.out_dir / "logs")
                             if cfg.log_with == "tensorboard" and self.procs.is_main else None)
        batch_note = effective_batch_note(cfg.batch_size, self.procs.world, cfg.gradient_accumulation_steps)
        self.events.emit("started", step=self.p["global_step"], total_steps=self.total_steps,
                         epoch=self.p["epoch"] + 1,
                         message=f"text-generation LoRA on {cfg.base_model}: rank {cfg.lora_rank}, targets "
                                 f"{', '.join(self.targets)}, {n_train:,} trainable parameters, {self.total_steps} "
                                 f"steps on {self.device}, {batch_note}"
                                 + (f" on {self.procs.world} processes" if self.procs.distributed else "")
                                 + (f", resumed from {resume}" if resume else ""),
                         data={"targets": self.targets, "trainable_params": n_train, "processes": self.procs.world})
        try:
            result = self._loop()
        finally:
            self.log.close()
        return result

    def _precision(self) -> None:
        mp, dev = self.cfg.mixed_precision, self.device
        self.model_dtype, self.autocast_dtype, self.use_scaler = torch.float32, None, False
        if mp == "no":
            return
        if dev.type == "cuda":
            if mp == "bf16" and not torch.cuda.is_bf16_supported():
                raise ConfigError("mixed_precision: bf16 is not supported by this GPU; use fp16")
            self.model_dtype = self.autocast_dtype = torch.bfloat16 if mp == "bf16" else torch.float16
            self.use_scaler = mp == "fp16"
        elif dev.type == "cpu" and mp == "bf16":
            self.autocast_dtype = torch.bfloat16  # weights stay fp32, matmuls in bf16
        else:
            self.msg(f"mixed_precision: {mp} is not used on {dev.type}; training in fp32")

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _report_data(self) -> None:
        d = self.data
        for issue in d.issues[:MAX_ISSUE_MESSAGES]:
            self.msg(str(issue), data={"file": issue.file, "line": issue.line})
        if len(d.issues) > MAX_ISSUE_MESSAGES:
            self.msg(f"... and {len(d.issues) - MAX_ISSUE_MESSAGES} more data problems (each skipped or truncated "
                     f"as above)")
        if d.ignored_files:
            exts = sorted({p.suffix or p.name for p in d.ignored_files})
            self.msg(f"ignored {len(d.ignored_files)} file(s) that are not .txt or .jsonl ({', '.join(exts)})")
        units = "packed sequences" if self.cfg.packing else "samples"
        self.msg(f"text data: {d.n_samples} samples from {d.n_files} file{'s' if d.n_files != 1 else ''} -> "
                 f"{len(d.train)} training "
                 f"{units}, {len(d.val)} validation {units}"
                 + (f"; {len(d.issues)} data problems reported" if d.issues else ""),
                 data={"samples": d.n_samples, "train": len(d.train), "val": len(d.val), "issues": len(d.issues)})

    def _resume(self, folder: Path) -> None:
        cfg = self.cfg
        saved_cfg = {}
        if (folder / CONFIG_FILE).is_file():
            saved_cfg = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        changed = [k for k in RESUME_KEYS if k in saved_cfg and saved_cfg[k] != getattr(cfg, k)]
        ck = load_checkpoint(folder, rank=self.procs.rank)
        weights = ck["weights"]
        own = trainable_state(self.model)
        if set(weights) != set(own):
            raise ConfigError(f"resume_from_checkpoint: {folder} holds other LoRA weights than this run creates "
                              f"(lora_rank, target_modules or base_model differ: "
                              f"{', '.join(k for k in changed) or 'see config.yaml there'})")
        for name, p in own.items():
            if weights[name].shape != p.shape:
                raise ConfigError(f"resume_from_checkpoint: {folder}: {name} has shape "
                                  f"{tuple(weights[name].shape)}, this run {tuple(p.shape)} (lora_rank differs?)")
        self._set_weights(weights)
        if self.sharded is not None:
            self.sharded.load_optimizer_state(self.optimizer, ck["optim"]["optimizer"])
        else:
            self.optimizer.load_state_dict(ck["optim"]["optimizer"])
        self.scheduler.load_state_dict(ck["optim"]["scheduler"])
        if self.scaler is not None and ck["optim"].get("scaler"):
            self.scaler.load_state_dict(ck["optim"]["scaler"])
        self.p.update({k: v for k, v in ck["progress"].items() if k in self.p})
        set_rng_state(ck["rng"], fallback_seed=self.cfg.seed + int(self.p.get("global_step", 0)))
        for note in ck["notes"]:
            self.msg(note)
        saved_units = ck["progress"].get("train_units")
        if saved_units is not None and saved_units != len(self.data.train) and "train_data_dir" not in changed:
            changed.append(f"training data ({saved_units} -> {len(self.data.train)} training units)")
        if (folder / BEST_FILE).is_file():
            from safetensors.torch import load_file

            self.best_weights = load_file(str(folder / BEST_FILE))
        self.last_checkpoint = folder
        saved_batch = ck["progress"].get("global_batch")
        note = resume_note(int(ck["progress"].get("num_processes", 1)), saved_batch, self.procs.world,
                           self.global_batch)
        if note:
            self.msg(note)
            if saved_batch and saved_batch != self.global_batch:  # the same samples seen, in the new batches
                self.p["micro"] = self.p["micro"] * saved_batch // self.global_batch
        if changed:
            self.msg(f"resuming with changed {', '.join(changed)}: the continuation is not exact")
        self.msg(f"resumed from {folder} at step {self.p['global_step']}")

    # ---- the loop -------------------------------------------------------------------------------------
    def _loop(self) -> Path:
        cfg, p = self.cfg, self.p
        timer = StepTimer()
        n_train = len(self.data.train)
        accum = cfg.gradient_accumulation_steps
        self.model.train()
        while not p["early_stopped"] and p["global_step"] < self.total_steps:
            if cfg.max_train_steps is None and p["epoch"] >= cfg.epochs:
                break
            batches = epoch_batches(n_train, self.global_batch, cfg.seed, p["epoch"])
            for w0 in range(0, len(batches), accum):
                w1 = min(w0 + accum, len(batches))
                if w1 <= p["micro"]:
                    continue  # consumed before the checkpoint this run resumed from
                loss, lr, grad_norm = self._step([batches[i] for i in range(w0, w1)])
                p["global_step"] += 1
                p["micro"] = w1
                timer.tick()
                step = p["global_step"]
                self.events.emit("step", step=step, total_steps=self.total_steps, epoch=p["epoch"] + 1, loss=loss,
                                 lr=lr, it_per_s=timer.rate(), eta_s=timer.eta(self.total_steps - step))
                self.log.scalars(step, **{"loss/train": loss, "lr": lr, "grad_norm": grad_norm})
                saved = False
                if cfg.save_steps and step % cfg.save_steps == 0:
                    self._checkpoint()
                    saved = True
                if (self.stop_synced if self.procs.distributed else self.stop.is_set()):
                    folder = self.last_checkpoint if saved else self._checkpoint()
                    self.events.emit("stopped", step=step, total_steps=self.total_steps, epoch=p["epoch"] + 1,
                                     path=str(folder),
                                     message=f"{self.stop.reason or 'stop requested'}: saved {folder}; continue "
                                             f"with resume_from_checkpoint: {folder}")
                    return folder
                if step >= self.total_steps:
                    break
            if p["micro"] < len(batches):
                break  # max_train_steps ended the run inside this epoch
            if not p["epoch_done"]:
                self._epoch_end()
            p["epoch"] += 1
            p["micro"] = 0
            p["epoch_done"] = False
        if self.data.val and p["last_val_step"] != p["global_step"]:
            self._validate(early_stopping=False)
        return self._finish()

    def _step(self, window: list[list[int]]) -> tuple[float, float, Optional[float]]:
        """One optimizer step over a window of global micro-batches; this process trains its share of each, and
        the loss is normalised by the target tokens of the whole window on every process."""
        cfg, procs = self.cfg, self.procs
        n_tokens = sum(self.data.train[i].n_targets for mb in window for i in mb)
        lr = float(self.optimizer.param_groups[0]["lr"])
        total = 0.0
        sharded, zero = self.sharded is not None, self.zero
        for mb in window:
            share = procs.share(len(mb), cfg.batch_size)
            if not share.size and not sharded:
                continue
            # under FSDP every process runs every forward and backward (they gather the shards): an empty share
            # runs the batch's first sample with weight 0
            items = mb[share.start:share.end] or mb[:1]
            b = collate([self.data.train[i] for i in items], self.pad_id)
            b = {k: v.to(self.device) for k, v in b.items()}
            net = zero.engine if zero is not None else self.model  # DeepSpeed's forward prepares its backward
            with self._autocast():
                logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            s = loss_sum(logits, b["labels"]) * (1.0 if share.size else 0.0)
            if not procs.distributed and not torch.isfinite(s):
                self._nan(s)
            # FSDP and DeepSpeed average the gradients over the processes; the others are summed below
            loss = s * (procs.world if sharded else 1) / n_tokens
            if zero is not None:
                zero.backward(loss)
            else:
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += float(s.detach())
        total, stops = procs.sum_gradients([] if sharded else self.params,
                                           [total, 1.0 if self.stop.is_set() else 0.0])
        self.stop_synced = stops > 0
        if self.stop_synced and not self.stop.is_set():
            self.stop.set("stop requested by another process")
        if not math.isfinite(total):
            self._nan(torch.tensor(total))
        if zero is not None:  # the engine clips, steps and clears the gradients
            grad_norm = zero.step()
            self.scheduler.step()
            return total / n_tokens, lr, grad_norm
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / n_tokens, lr, grad_norm

    def _nan(self, value: torch.Tensor) -> None:
        step = self.p["global_step"] + 1
        keep = (f"the last good checkpoint is {self.last_checkpoint}; resume from it with a lower learning_rate "
                f"(or mixed_precision: bf16 / no)" if self.last_checkpoint else
                "no checkpoint was saved before (set save_steps to keep some); lower learning_rate (or use "
                "mixed_precision: bf16 / no) and start again")
        message = f"the loss became {float(value.detach())} at step {step} (epoch {self.p['epoch'] + 1}); training stopped. {keep}"
        self.events.emit("failed", step=step, total_steps=self.total_steps, epoch=self.p["epoch"] + 1,
                         path=str(self.last_checkpoint) if self.last_checkpoint else None, message=message)
        err = TextTrainingError(message)
        err._reported = True
        raise err

    def _epoch_end(self) -> None:
        cfg, p = self.cfg, self.p
        if self.data.val:
            self._validate(early_stopping=cfg.early_stopping_patience > 0)
        p["epoch_done"] = True
        if cfg.save_every_n_epochs and (p["epoch"] + 1) % cfg.save_every_n_epochs == 0:
            self._checkpoint()

    @torch.no_grad()
    def _validate(self, early_stopping: bool) -> float:
        cfg, p = self.cfg, self.p
        self.model.eval()
        total, n = 0.0, 0
        val = self.data.val
        for i in range(0, len(val), cfg.batch_size):
            b = {k: v.to(self.device) for k, v in collate(val[i:i + cfg.batch_size], self.pad_id).items()}
            with self._autocast():
                logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(loss_sum(logits, b["labels"]))
            n += _n_targets(b["labels"])
        self.model.train()
        val_loss = total / max(n, 1)
        step = p["global_step"]
        p["last_val_step"] = step
        improved = p["best_val"] is None or val_loss < p["best_val"]
        if improved:
            p.update(best_val=val_loss, best_step=step, best_epoch=p["epoch"] + 1, bad_validations=0)
            if early_stopping:
                self.best_weights = self._weights()
        else:
            p["bad_validations"] += 1
        self.log.scalars(step, **{"loss/val": val_loss})
        self.events.emit("validation", step=step, total_steps=self.total_steps, epoch=p["epoch"] + 1, loss=val_loss,
                         message=f"validation loss {val_loss:.4f} (best {p['best_val']:.4f} at epoch "
                                 f"{p['best_epoch']})", data={"val_loss": val_loss, "best_val": p["best_val"]})
        if early_stopping and p["bad_validations"] >= cfg.early_stopping_patience:
            p["early_stopped"] = True
            self.msg(f"early stopping: no better validation loss for {p['bad_validations']} validations; the "
                     f"adapter gets the weights of epoch {p['best_epoch']} (validation loss {p['best_val']:.4f})")
        return val_loss

    # ---- saving ---------------------------------------------------------------------------------------
    def _weights(self) -> dict[str, torch.Tensor]:
        """The trainable weights, whole, fp32, on the CPU (under FSDP every process must ask: they are gathered)."""
        if self.sharded is not None:
            return self.sharded.full_trainable()
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in trainable_state(self.model).items()}

    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if self.sharded is not None:
            self.sharded.load_trainable(weights)
            return
        with torch.no_grad():
            for k, v in trainable_state(self.model).items():
                v.copy_(weights[k].to(v.device, v.dtype))

    def _save_dtype(self) -> torch.dtype:
        return SAVE_DTYPES.get(self.cfg.save_precision, torch.float32)

    def _checkpoint(self) -> Path:
        from safetensors.torch import save_file

        step = self.p["global_step"]
        folder = self.out_dir / f"checkpoint-{step}"
        rank_rngs = self.procs.gather(rng_state()) if self.procs.distributed else None
        weights = self._weights()
        optimizer = self.optimizer
        if self.sharded is not None:  # gathered by every process
            optimizer = SavedState(self.sharded.optimizer_state(self.optimizer))
        if not self.procs.is_main:
            self.last_checkpoint = folder
            return folder
        extra = {"adapter": lambda path: save_adapter_files(self.model, self.tokenizer, path, self._save_dtype(),
                                                            weights)}
        if self.best_weights is not None:
            extra[BEST_FILE] = lambda path: save_file(self.best_weights, str(path))
        save_checkpoint(folder, weights=weights, optimizer=optimizer,
                        scheduler=self.scheduler, scaler=self.scaler,
                        progress=dict(self.p, total_steps=self.total_steps, task_type="text-generation",
                                      train_units=len(self.data.train), target_modules=self.targets,
                                      num_processes=self.procs.world, global_batch=self.global_batch),
                        cfg=self.cfg, extra_files=extra, rank_rngs=rank_rngs)
        self.last_checkpoint = folder
        removed = prune_checkpoints(self.out_dir, self.cfg.save_last_n_checkpoints)
        if self.last_checkpoint in removed:  # cannot happen with keep >= 1, but keep the reference honest
            self.last_checkpoint = None
        self.events.emit("checkpoint_saved", step=step, total_steps=self.total_steps, epoch=self.p["epoch"] + 1,
                         path=str(folder), message=f"saved checkpoint {folder}")
        return folder

    def _finish(self) -> Path:
        cfg, p = self.cfg, self.p
        note = ""
        if self.best_weights is not None and p["best_step"] != p["global_step"]:
            self._set_weights(self.best_weights)
            note = f" (weights of epoch {p['best_epoch']}, best validation loss {p['best_val']:.4f})"
        target = self.out_dir / cfg.name
        if target.exists() and not cfg.overwrite:
            new = free_path(target)
            self.msg(f"{target} already exists; writing the adapter to {new} instead (set overwrite: true to "
                     f"replace it)")
            target = new
        dtype = self._save_dtype()
        weights = self._weights() if self.sharded is not None else None  # gathered by every process
        if not self.procs.is_main:
            return target
        write_folder_atomically(target, lambda tmp: save_adapter_files(self.model, self.tokenizer, tmp, dtype,
                                                                       weights), replace=cfg.overwrite)
        self.events.emit("finished", step=p["global_step"], total_steps=self.total_steps,
                         epoch=p["epoch"] + (1 if p["micro"] else 0),
                         path=str(target), message=f"saved the LoRA adapter to {target}{note}",
                         data={"best_val": p["best_val"]})
        return target
