"""python -m lora_trainer train|check|caption|demo|merge|ui ..."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .config import ConfigError, TrainConfig, field_meta, from_dict, load_yaml


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Every config key is also a flag of the same name; flags override the YAML file."""
    group = parser.add_argument_group("config keys (override the YAML file)")
    for name, meta in field_meta().items():
        help_text = meta["help"]
        if meta.get("choices"):
            help_text += f" [{', '.join(map(str, meta['choices']))}]"
        if "default" not in help_text:  # some help texts say their default in words already
            help_text += f" (default: {meta['default']!r})"
        group.add_argument(f"--{name}", dest=f"cfg_{name}", default=None, metavar="VALUE", nargs="?", const="true",
                           help=help_text.replace("%", "%%"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config from a YAML or TOML file (kohya / lora-scripts) plus flags; notes on foreign keys are printed."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    path = getattr(args, "config", None) or getattr(args, "config_file", None)
    if path and Path(path).suffix.lower() == ".toml":
        from .config_import import load_toml_config

        cfg, notes = load_toml_config(path, overrides)
        for note in notes:
            print(f"note: {note}")
    elif path:
        cfg = load_yaml(path, overrides)
    else:
        cfg = from_dict(overrides, source="command line")
    dump = getattr(args, "dump_config", None)
    if dump:
        cfg.save_yaml(Path(dump))
        print(f"effective config written to {dump}")
    return cfg


class ProgressPrinter:
    """Renders training events on a terminal: a tqdm bar with loss / lr / it/s, and messages."""

    def __init__(self, interactive: Optional[bool] = None, every_s: float = 30.0):
        self.bar = None
        # a pipe or a log file gets plain lines every few steps, not a bar redrawn with carriage returns
        self.interactive = _is_terminal(sys.stderr) if interactive is None else interactive
        self.every_s = every_s
        self._last_line = 0.0

    def _line(self, event) -> None:
        import time

        every = max(1, event.total_steps // 20)
        now = time.monotonic()
        if event.step % every and event.step != event.total_steps and now - self._last_line < self.every_s:
            return
        self._last_line = now
        parts = [f"step {event.step}/{event.total_steps}", f"loss {event.loss:.4f}", f"lr {event.lr:.2e}"]
        if event.it_per_s:
            parts.append(f"{event.it_per_s:.2f} it/s")
        if event.eta_s is not None:
            parts.append(f"ETA {_clock(event.eta_s)}")
        print("  ".join(parts), flush=True)

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if event.kind == "step" and not self.interactive:
            self._line(event)
            return
        if event.kind == "step":
            if self.bar is None:
                self.bar = tqdm(total=event.total_steps, initial=event.step - 1, unit="step", dynamic_ncols=True)
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", epoch=event.epoch)
            return
        text = event.message or (event.path or "")
        if event.kind == "sample":
            text = f"sample: {event.path}"
        if not text:
            return
        prefix = {"failed": "error: ", "stopped": "stopped: "}.get(event.kind, "")
        stream = sys.stderr if event.kind == "failed" else sys.stdout  # errors where scripts look for them
        if self.bar is not None:
            self.bar.write(prefix + text, file=stream)
        else:
            print(prefix + text, file=stream, flush=True)
        if event.kind in ("finished", "failed", "stopped") and self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_training(cfg: TrainConfig) -> int:
    from .train.distributed import Processes

    procs = Processes.from_environment(cfg.device)  # several processes under torchrun / accelerate launch
    code = 1
    try:
        code = _run_training(cfg, procs)
        return code
    finally:
        # A launcher ends every process once one has exited. After a run that finished or stopped (all processes
        # together) none leaves before the main one has written; a process that failed leaves at once, since the
        # others wait for it in a reduction it will never join, and the launcher's ending them is what they need.
        procs.close(wait_for_others=code in (0, 130))


def _run_training(cfg: TrainConfig, procs) -> int:
    from .train.control import StopFlag, stop_on_signals
    from .train.distributed import launched_world_size
    from .train.events import EventBus

    events = EventBus()
    if procs.is_main:  # one progress bar and one log, from the main process
        events.subscribe(ProgressPrinter())
    else:
        events.subscribe(lambda e: print(f"[rank {procs.rank}] error: {e.message}", file=sys.stderr, flush=True)
                         if e.kind == "failed" and e.message else None)
    stop = StopFlag()
    # a launcher passes the terminal's Ctrl-C on to its processes: that second signal is the same request
    with stop_on_signals(stop, same_signal_within_s=5.0 if launched_world_size() > 1 else 0.0):
        if cfg.task_type == "text-generation":
            from .text import train_text

            from .text import TextTrainingError

            try:
                path = train_text(cfg, events, stop, processes=procs)
            except TextTrainingError:
                return 1
            if stop:
                return 130
            if procs.is_main:
                print(f"\nDone: peft adapter in {path} (load with peft.PeftModel.from_pretrained)")
            return 0
        from .train.trainer import Trainer, TrainingFailed

        try:
            result = Trainer(cfg, events, stop, processes=procs).run()
        except TrainingFailed:
            return 1
        except Exception as e:
            last = events.last
            if last is not None and last.kind == "failed":  # already printed once, as "error: ..."
                return 2 if isinstance(e, ConfigError) or _is_known_error(e) else 1
            raise
    if not procs.is_main:
        return 0 if result.status == "finished" else 130
    if result.status == "finished":
        name = result.lora_path.stem
        from .network.base import uses_peft

        diffusers = f", or in diffusers: pipe.load_lora_weights('{result.lora_path}')" if uses_peft(cfg) else ""
        print(f"\nDone: {result.lora_path}\nCopy it into your WebUI's models/Lora folder and prompt with "
              f"<lora:{name}:0.8>{diffusers}")
    if result.status == "stopped" and result.checkpoint is not None:
        print(f"resume with the same command plus --resume_from_checkpoint {result.checkpoint} (or: latest)")
    return 0 if result.status == "finished" else 130


def cmd_train(args) -> int:
    cfg = config_from_args(args)
    return run_training(cfg)


def cmd_check(args) -> int:
    cfg = config_from_args(args)
    if cfg.task_type == "text-generation":
        from .text.report import run_text_check

        return run_text_check(cfg)
    from .data import run_check

    return run_check(cfg)


def cmd_demo(args) -> int:
    from .demo import demo_config, export_base, next_steps, tiny_model_threads

    if args.export_base:
        path = export_base(Path(args.export_base), family=args.family)
        print(f"wrote the demo's tiny {args.family.upper()} base model (random weights): {path}\n"
              f"  and its {path.with_suffix('.yaml').name} beside it: keep the two together (the .yaml says how "
              f"to build this non-standard model; without it the file is refused)\n"
              f"Train on your own images with it, offline:\n"
              f"  python -m lora_trainer train --base_model {path} --train_data_dir YOUR_IMAGES --resolution 64 "
              f"--output_dir output/tiny-test")
        return 0
    cfg = demo_config(Path(args.output_dir), family=args.family, steps=args.steps)
    tiny_model_threads()
    print(f"demo: training a {args.family.upper()} LoRA on the bundled sample images with a built-in tiny base model "
          f"(random weights, offline). Output: {cfg.output_dir}")
    code = run_training(cfg)
    if code == 0:
        print(next_steps(cfg, args.family))
    return code


def cmd_merge(args) -> int:
    from .text import merge_adapter

    path = merge_adapter(args.adapter, args.output, base_model=args.base_model, overwrite=args.overwrite)
    print(f"merged model written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer",
                                     description="Train LoRA adapters (SD1, SD2, SDXL, text-generation).")
    sub = parser.add_subparsers(dest="command", required=True)

    config_help = ("config file: our YAML, or a kohya sd-scripts / lora-scripts TOML (--config_file or "
                   "config/*.toml, read as it is)")
    p = sub.add_parser("train", help="train a LoRA from a config file (flags override its keys)")
    p.add_argument("config_file", nargs="?", help="config file (same as --config)")
    p.add_argument("--config", "-c", help=config_help)
    p.add_argument("--dump_config", metavar="PATH", help="also write the effective config (file + flags) as our YAML")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check", help="report on a dataset: images, captions, buckets, duplicates, problems; for "
                                     "task_type text-generation: files, samples, skipped lines, token lengths")
    p.add_argument("config_file", nargs="?", help="config file (same as --config)")
    p.add_argument("--config", "-c", help=config_help)
    p.add_argument("--dump_config", metavar="PATH", help="also write the effective config as our YAML")
    _add_config_flags(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("caption", help="autotag a folder of images (CLIP zero-shot tagger)")
    try:
        from .caption.cli import add_caption_arguments, run_caption

        add_caption_arguments(p)
        p.set_defaults(func=run_caption)
    except ImportError as e:  # pragma: no cover - only when the caption package is broken
        p.set_defaults(func=lambda a, e=e: (print(f"caption is unavailable: {e}"), 1)[1])

    from .demo import DEMO_STEPS

    p = sub.add_parser("demo", help="train on the bundled sample images with a built-in tiny model (offline)")
    p.add_argument("--output_dir", default="output/demo",
                   help="where the demo's base model, LoRA, checkpoint and sample go (default: %(default)s)")
    p.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"],
                   help="which tiny model family to train on (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="optimizer steps to train (default: %(default)s)")
    p.add_argument("--export-base", "--export_base", dest="export_base", metavar="PATH", default=None,
                   help="only write the tiny base model (PATH.safetensors, or tiny-<family>.safetensors in the folder "
                        "PATH) with its same-named .yaml, to use as base_model offline; no training")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("merge", help="merge a text-generation LoRA adapter into its base model")
    p.add_argument("--adapter", required=True, help="the peft adapter folder a text-generation run wrote")
    p.add_argument("--output", required=True, help="folder for the merged transformers model")
    p.add_argument("--base_model", "--base-model", default=None,
                   help="base model (default: the one named in the adapter's adapter_config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("ui", help="serve the Train LoRA tab outside a WebUI")
    p.add_argument("--base_model", required=False, help="checkpoint file or diffusers folder to train on")
    p.add_argument("--port", type=int, default=7861, help="port to serve on (default: %(default)s)")
    p.add_argument("--lora_dir", default="models/Lora", help="where finished LoRAs go (default: %(default)s)")
    p.add_argument("--work_dir", default=None, help="where runs (checkpoints, logs) go (default: beside lora_dir, "
                                                    "lora-trainer-runs)")
    p.add_argument("--models_dir", default=None, help="a folder of checkpoints that API requests may name as "
                                                      "base_model (default: only --base_model)")
    p.add_argument("--listen", default="127.0.0.1", help="address to serve on (default: %(default)s, this machine "
                                                         "only); any other address requires --api-auth")
    p.add_argument("--api_auth", "--api-auth", default=None, metavar="USER:PASS",
                   help="require these credentials for the page and the API (several: u1:p1,u2:p2)")
    p.set_defaults(func=cmd_ui)
    return parser


def cmd_ui(args) -> int:
    try:
        from .ui.standalone import serve
    except ImportError as e:
        print(f"the UI is not available yet in this build: {e}")
        return 2
    return serve(args)


class _SafeStream:
    """stdout/stderr that never raise: when the reader of a pipe is gone (`train ... | tee log` and Ctrl-C
    ends tee first), output is dropped and training goes on to save its checkpoint and exit cleanly."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def write(self, text):
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._break()
        return len(text)

    def flush(self):
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._break()

    def _break(self) -> None:
        self.broken = True
        try:  # the interpreter flushes the real stream at exit: point it at devnull so that cannot fail either
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _guard_output() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _SafeStream):
            setattr(sys, name, _SafeStream(stream))


def _quiet_libraries() -> None:
    """Library notices that tell a person nothing they can act on (e.g. "modules ... should be kept in float32:
    []", "CLIPImageProcessor requires torchvision", a deprecation inside diffusers): errors still show."""
    import logging
    import os
    import warnings

    # read when the libraries set up their loggers (on first import, later than this): a user's setting wins
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers", "peft", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers|peft|accelerate)\b")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")


def main(argv: Optional[list[str]] = None) -> int:
    _guard_output()
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    except Exception as e:  # one line a person can act on, not a traceback, for the errors we anticipate
        if _is_known_error(e):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def _is_known_error(e: BaseException) -> bool:
    from .models.loader import ModelLoadError

    known = [ModelLoadError]
    try:
        from .data import DatasetError

        known.append(DatasetError)
    except ImportError:
        pass
    return isinstance(e, tuple(known))


if __name__ == "__main__":
    sys.exit(main())
