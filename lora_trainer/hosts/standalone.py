"""The host contract outside any WebUI: a checkpoint file or diffusers folder, a LoRA folder, diffusers previews.

`python -m lora_trainer ui` serves the tab on this host, and the tests drive the whole tab through it.
Previews load the saved LoRA *file* from the LoRA folder into the in-memory model (the engine's kohya
reader), so a preview proves the file on disk, not the weights left in memory by training.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from ..config import ConfigError, from_dict
from .base import CheckpointInfo, Host, HostBusy, HostError, infotext, lora_prompt


class StandaloneHost(Host):
    kind = "standalone"

    def __init__(self, base_model: Optional[str], lora_dir: Union[str, Path],
                 work_dir: Optional[Union[str, Path]] = None, device: str = "auto",
                 log: Callable[[str], None] = print, models_dir: Optional[Union[str, Path]] = None,
                 api_auth: Optional[str] = None):
        """models_dir: a folder of checkpoints API requests may name as base_model (besides the configured one);
        api_auth: "user:pass" credentials the HTTP API requires."""
        self._base_path = str(base_model) if base_model else None
        self._models_dir = Path(models_dir).expanduser().resolve() if models_dir else None
        self._api_auth = api_auth
        self._lora_dir = Path(lora_dir).expanduser().resolve()
        self._work_dir = Path(work_dir).expanduser().resolve() if work_dir else \
            self._lora_dir.parent / "lora-trainer-runs"
        self._device_name = device
        self._log = log
        self._model = None
        self._load_error: Optional[str] = None
        self._load_lock = threading.Lock()
        self._gpu = threading.Lock()  # a training run or a preview: one at a time on the model

    # ---- base model ------------------------------------------------------------------------------
    @property
    def base_model_path(self) -> Optional[str]:
        return self._base_path

    def set_base_model(self, path: Optional[str]) -> CheckpointInfo:
        """Switches to another checkpoint (loaded on first use); refused while the model is in use."""
        if not self._gpu.acquire(blocking=False):
            raise HostBusy("a training run is using the base model; switch after it ends")
        try:
            with self._load_lock:
                self._base_path = str(path).strip() if path and str(path).strip() else None
                self._model = None
                self._load_error = None
        finally:
            self._gpu.release()
        return self.checkpoint_info()

    def _load(self):
        from ..models.loader import ModelLoadError, load_base_model
        from ..train.trainer import pick_device

        with self._load_lock:
            if self._model is not None:
                return self._model
            if not self._base_path:
                raise HostError("no base model: start the UI with --base_model PATH (a .safetensors/.ckpt "
                                "checkpoint or a diffusers folder), or enter a path in Base model")
            _refuse_flux(self._base_path)
            try:
                model = load_base_model(self._base_path, log_fn=self._log)
            except ModelLoadError as e:
                self._load_error = str(e)
                raise HostError(f"cannot load the base model {self._base_path}: {e}") from None
            model.to(pick_device(self._device_name))
            self._model = model
            return model

    def checkpoint_info(self) -> CheckpointInfo:
        if not self._base_path:
            return CheckpointInfo(None, "", supported=False,
                                  message="No base model. Start with --base_model PATH, or enter a checkpoint file "
                                          "or diffusers folder below.")
        try:
            model = self._load()
        except HostError as e:
            return CheckpointInfo(None, Path(self._base_path).name, path=self._base_path, supported=False,
                                  message=str(e))
        return CheckpointInfo(model.family, model.name, path=model.path, hash=model._hash, supported=True,
                              message=model.describe())

    def loaded_checkpoint(self):
        return self._load()

    def prepare_config(self, cfg):
        cfg, notes = super().prepare_config(cfg)
        wanted = cfg.base_model
        if wanted and (not self._base_path or _norm(wanted) != _norm(self._base_path)):
            # a config that names another checkpoint trains on it for this run only; the server's model stays
            notes.append(f"this run trains on {wanted} (loaded for this run only; the server's base model stays "
                         f"{self._base_path or 'unset'})")
        elif not wanted and self._base_path:
            cfg = cfg.replace(base_model=self._base_path)
        return cfg, notes

    def device(self):
        from ..train.trainer import pick_device

        return pick_device(self._device_name)

    def model_for(self, cfg, log: Callable[[str], None] = print):
        wanted = cfg.base_model
        if not wanted or (self._base_path and _norm(wanted) == _norm(self._base_path)):
            return self.base_model(cfg.model_family, log=log)
        from ..models.base import align_text_encoder_dtypes
        from ..models.loader import ModelLoadError, load_base_model

        _refuse_flux(wanted)
        try:
            model = load_base_model(wanted, cfg.model_family, cfg.v_parameterization, cfg.vae, log_fn=log)
        except ModelLoadError as e:
            raise HostError(f"cannot load the base model {wanted}: {e}") from None
        align_text_encoder_dtypes(model)
        return model

    # ---- HTTP API ----------------------------------------------------------------------------------
    def api_access(self, app) -> Optional[list]:
        if not self._api_auth:
            return []
        from ..ui.api import basic_auth_dependency

        return [basic_auth_dependency(self._api_auth)]

    def request_roots(self) -> dict:
        roots = super().request_roots()
        models = [Path(self._base_path).expanduser().resolve()] if self._base_path else []
        if self._models_dir:
            models.append(self._models_dir)
        roots["models"] = models
        return roots

    def allows_base_model(self, value: str) -> bool:
        try:
            path = Path(value).expanduser().resolve()
        except (OSError, ValueError):
            return False
        if self._base_path and path == Path(self._base_path).expanduser().resolve():
            return True
        return bool(self._models_dir) and self._models_dir in path.parents

    def base_model_rule(self) -> str:
        rule = f"This server trains on {self._base_path or 'its configured model'}"
        if self._models_dir:
            return rule + f" or a model in {self._models_dir}."
        return rule + " (start it with --models_dir FOLDER to allow others)."

    # ---- contexts --------------------------------------------------------------------------------
    @contextmanager
    def clean_weights(self) -> Iterator[None]:
        yield  # nothing is ever merged into the weights here: previews inject and remove their LoRA

    @contextmanager
    def exclusive_gpu(self, stop=None, events=None) -> Iterator[None]:
        if not self._gpu.acquire(blocking=False):
            raise HostBusy("the base model is in use (a preview or another run); try again when it is done")
        try:
            yield
        finally:
            model = self._model
            if model is not None:
                model.freeze()  # training leaves modules in train mode; previews expect eval
            self._gpu.release()

    # ---- LoRA folder -----------------------------------------------------------------------------
    def lora_dir(self) -> Path:
        return self._lora_dir

    def refresh_loras(self) -> None:
        pass  # files are looked up on every preview

    def work_dir(self) -> Path:
        return self._work_dir

    # ---- previews --------------------------------------------------------------------------------
    def preview(self, prompt: str, lora_name: Optional[str], weight: float, seed: int, steps: int,
                size: Union[int, tuple[int, int]], negative_prompt: str = "", cfg_scale: float = 7.0):
        from ..train.sampling import SAMPLER, render

        width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if not self._gpu.acquire(blocking=False):
            raise HostBusy("a training run is using the base model; preview when it has finished (or stop it)")
        try:
            model = self._load()
            network = None
            if lora_name:
                path = self.find_lora(lora_name)
                if path is None:
                    raise HostError(f"no LoRA named {lora_name!r} in {self.lora_dir()}")
                network = apply_lora_file(model, path)
            try:
                if network is None:
                    image = render(model, prompt, seed=int(seed), steps=int(steps), cfg_scale=float(cfg_scale),
                                   width=width, height=height, negative_prompt=negative_prompt)
                else:
                    with network.multiplier(float(weight)):
                        image = render(model, prompt, seed=int(seed), steps=int(steps), cfg_scale=float(cfg_scale),
                                       width=width, height=height, negative_prompt=negative_prompt,
                                       clip_skip=network.clip_skip)
            finally:
                if network is not None:
                    network.remove()
            shown = lora_prompt(prompt, lora_name, weight) if lora_name else prompt
            image.info["parameters"] = infotext(shown, negative_prompt, steps=steps, sampler=SAMPLER,
                                                cfg_scale=cfg_scale, seed=seed, width=width, height=height,
                                                model=model.name)
            return image
        finally:
            self._gpu.release()


def lora_file_config(sd: dict, metadata: dict):
    """A TrainConfig whose network matches a kohya / LyCORIS file (type, rank, alpha, convolutions, DoRA, text
    encoder, LoKr layout): from the tensors where they tell, else from the file's ss_network_* metadata."""
    import json

    from ..network.base import file_network_type

    kind = file_network_type(sd)
    if kind is None:
        raise HostError("the file holds no LoRA, LoHa or LoKr weights (no *.lora_down.weight, hada_* or lokr_* keys)")
    stems = {k.split(".", 1)[0] for k in sd}
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        args = {}
    args = args if isinstance(args, dict) else {}

    def alpha_of(stem: str, rank: int) -> float:
        a = sd.get(f"{stem}.alpha")
        return float(a) if a is not None else float(rank)

    def is_conv3x3(stem: str) -> bool:
        return any(v.dim() == 4 and tuple(v.shape[2:]) != (1, 1) for k, v in sd.items()
                   if k.startswith(stem + ".") and not k.endswith(".dora_scale")) or f"{stem}.hada_t1" in sd \
            or f"{stem}.lokr_t2" in sd

    def rank_of(stem: str):
        for key, dim in (("lora_down.weight", 0), ("hada_w1_b", 0), ("lokr_w2_b", 0), ("lokr_w1_b", 0)):
            if f"{stem}.{key}" in sd:
                return int(sd[f"{stem}.{key}"].shape[dim])
        return None

    linear = sorted(s for s in stems if not is_conv3x3(s))
    conv = sorted(s for s in stems if is_conv3x3(s))
    if not linear:
        raise HostError("the file has only 3x3 convolution adapters, which this previewer cannot map")

    def number(value, cast):
        try:
            return cast(value) if value not in (None, "", "None") else None
        except ValueError:
            return None

    # the shape the file says it has (ss_network_dim/alpha, conv_dim/alpha); else what its tensors show
    rank, alpha = number(metadata.get("ss_network_dim"), int), number(metadata.get("ss_network_alpha"), float)
    if rank is None:
        ranks = {rank_of(s) for s in linear} - {None}
        if len(ranks) != 1:
            raise HostError("the file mixes ranks across modules (or does not say its rank); only uniform files (as "
                            "trained here) can be previewed outside a WebUI")
        rank = ranks.pop()
    if alpha is None:
        alphas = {alpha_of(s, rank) for s in linear}
        if len(alphas) > 1:
            raise HostError(f"the file mixes alphas {sorted(alphas)} across modules; only uniform files (as trained "
                            f"here) can be previewed outside a WebUI")
        alpha = alphas.pop()

    def flag(name: str) -> bool:
        return str(args.get(name, "False")).lower() in ("true", "1")

    keys = {"network_type": "locon" if kind == "lora" and (conv or "conv_dim" in args) else kind,
            "lora_rank": rank, "lora_alpha": alpha, "train_unet": any(s.startswith("lora_unet_") for s in stems),
            "train_text_encoder": any(s.startswith("lora_te") for s in stems),
            "use_dora": any(k.endswith(".dora_scale") for k in sd),
            "lokr_factor": number(args.get("factor"), int) or -1, "decompose_both": flag("decompose_both"),
            "lokr_full_rank": flag("full_matrix"), "use_tucker": any(".hada_t" in k or ".lokr_t2" in k for k in sd)}
    conv_rank, conv_alpha = number(args.get("conv_dim"), int), number(args.get("conv_alpha"), float)
    if conv_rank is None and conv:
        conv_rank = rank_of(conv[0])
    if conv_alpha is None and conv:
        conv_alpha = alpha_of(conv[0], conv_rank or rank)
    keys.update(conv_rank=conv_rank, conv_alpha=conv_alpha)
    try:
        keys["clip_skip"] = int(metadata.get("ss_clip_skip") or 1)
    except ValueError:
        keys["clip_skip"] = 1
    return from_dict(keys, source="LoRA file")


def apply_lora_file(model, path: Path):
    """Injects the LoRA stored in `path` into `model` (weight 1); call .remove() on the result to take it out.

    The returned network also has `clip_skip`, the value the file was trained with."""
    from ..network.kohya_file import read_lora
    from ..network.base import create_network

    sd, metadata = read_lora(Path(path))
    cfg = lora_file_config(sd, metadata)
    network = create_network(model, cfg)
    try:
        network.load_state_dict({k: v.float() for k, v in sd.items()}, source=Path(path).name)
        device = next(model.unet.parameters()).device
        for p in network.parameters():
            p.data = p.data.to(device)
            p.requires_grad_(False)
    except ConfigError as e:
        network.remove()
        raise HostError(str(e)) from None
    except Exception:
        network.remove()
        raise
    network.clip_skip = cfg.clip_skip
    return network


def _norm(path: str) -> str:
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        return str(path)


def _refuse_flux(path) -> None:
    """This tab's own server trains the SD families; FLUX.1 trains from the CLI and in Forge's tab."""
    from ..models.flux.loader import detect_flux

    if detect_flux(Path(str(path)).expanduser()):
        raise HostError(f"{Path(str(path)).name} is a FLUX.1 model: train it with the CLI (python -m lora_trainer "
                        f"train with base_model set to it) or in Forge's Train LoRA tab; this server's tab trains "
                        f"SD1, SD2 and SDXL")
