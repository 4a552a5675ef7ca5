"""The standalone host: the host contract outside a WebUI, on tiny real models."""
import json
import threading

import numpy as np
import pytest
import torch

from lora_trainer.config import ConfigError
from lora_trainer.hosts import PREVIEW_SUBDIR, HostBusy, HostError
from lora_trainer.hosts.detect import detect_host_kind
from lora_trainer.hosts.standalone import StandaloneHost, apply_lora_file, lora_file_config
from lora_trainer.models.loader import load_base_model
from lora_trainer.network.kohya_file import read_lora, save_lora
from lora_trainer.network.lora import LoraNetwork

from conftest import base_config

quiet = lambda *_: None  # noqa: E731


def _random_lora(model, path, **cfg):
    net = LoraNetwork(model, base_config(**cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in net.layers.values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    sd = net.state_dict()
    net.remove()
    return save_lora(path, sd, {"ss_output_name": path.stem, "ss_clip_skip": "1"}, "fp32")


def test_contract_basics(tiny_files, tmp_path):
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "loras", work_dir=tmp_path / "runs", log=quiet)
    info = host.checkpoint_info()
    assert info.supported and info.family == "sd1" and info.title == "tiny-sd1"
    assert host.lora_dir() == (tmp_path / "loras").resolve() and host.work_dir() == (tmp_path / "runs").resolve()
    assert host.interrogators() == {}
    model = host.base_model()
    assert model is host.loaded_checkpoint()  # loaded once, shared by training and previews
    with pytest.raises(ConfigError, match="SDXL"):
        host.base_model("sdxl")
    image = host.preview("red square", None, 1.0, 3, 2, (64, 48))
    assert image.size == (64, 48)
    with pytest.raises(HostError, match="no LoRA named 'missing'"):
        host.preview("x", "missing", 1.0, 1, 1, 64)


def test_no_base_model_says_what_to_do(tmp_path):
    host = StandaloneHost(None, tmp_path / "loras", log=quiet)
    info = host.checkpoint_info()
    assert not info.supported and "--base_model" in info.message
    with pytest.raises(HostError, match="no base model"):
        host.base_model()
    broken = StandaloneHost(str(tmp_path / "nope.safetensors"), tmp_path / "loras", log=quiet)
    info = broken.checkpoint_info()
    assert not info.supported and "does not exist" in info.message


def test_a_flux_model_is_pointed_to_the_cli_and_forge(tmp_path, tiny_files):
    """The standalone server's tab trains SD families; a FLUX.1 base model gets where to train it, not a loader
    error about a missing unet/ folder, as the server's model and as a run's base_model alike."""
    from lora_trainer.models.flux import tiny

    flux = tiny.write_tiny_flux_folder(tmp_path / "tiny-flux")
    info = StandaloneHost(str(flux), tmp_path / "loras", log=quiet).checkpoint_info()
    assert not info.supported and "FLUX.1" in info.message and "Forge" in info.message and "unet" not in info.message
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "loras", log=quiet)
    with pytest.raises(HostError, match="is a FLUX.1 model: train it with the CLI"):
        host.model_for(base_config(base_model=str(flux)), log=quiet)


def test_gpu_is_exclusive(tiny_files, tmp_path):
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "loras", log=quiet)
    with host.exclusive_gpu():
        with pytest.raises(HostBusy, match="training run"):
            host.preview("x", None, 1.0, 1, 1, 64)
        with pytest.raises(HostBusy):
            with host.exclusive_gpu():
                pass
        with pytest.raises(HostBusy):
            host.set_base_model(str(tiny_files["sd2"]))
    host.preview("x", None, 1.0, 1, 1, 64)  # free again


def test_preview_loads_the_file_weight_zero_is_the_base_and_leaves_the_model_clean(tiny_files, tmp_path):
    from peft.tuners.lora import LoraLayer

    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "loras", log=quiet)
    model = host.base_model()
    _random_lora(load_base_model(str(tiny_files["sd1"]), log_fn=quiet), host.lora_dir() / "mystyle.safetensors",
                 train_text_encoder=True)
    base = np.asarray(host.preview("red square", None, 0.0, 7, 3, 64))
    zero = np.asarray(host.preview("red square", "mystyle", 0.0, 7, 3, 64))
    half = np.asarray(host.preview("red square", "mystyle", 0.5, 7, 3, 64))
    one = np.asarray(host.preview("red square", "mystyle", 1.0, 7, 3, 64))
    assert np.array_equal(base, zero)
    assert not np.array_equal(base, one) and not np.array_equal(half, one)
    assert not any(isinstance(m, LoraLayer) for m in model.unet.modules())
    assert not any(isinstance(m, LoraLayer) for m in model.text_encoders[0].modules())
    # a different file under the same name previews the new weights (nothing is cached by name)
    _random_lora(load_base_model(str(tiny_files["sd1"]), log_fn=quiet), host.lora_dir() / "mystyle.safetensors",
                 train_text_encoder=False, lora_rank=2)
    (host.lora_dir() / "mystyle.safetensors").unlink()
    (host.lora_dir() / "mystyle_2.safetensors").rename(host.lora_dir() / "mystyle.safetensors")
    assert not np.array_equal(np.asarray(host.preview("red square", "mystyle", 1.0, 7, 3, 64)), one)


def test_lora_file_config_reads_the_network_shape(tiny_files, tmp_path):
    model = load_base_model(str(tiny_files["sd1"]), log_fn=quiet)
    path = _random_lora(model, tmp_path / "a.safetensors", lora_rank=4, lora_alpha=2, conv_lora=True, conv_rank=2,
                        conv_alpha=1, train_text_encoder=True)
    sd, meta = read_lora(path)
    cfg = lora_file_config(sd, meta)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.adapter_type, cfg.conv_rank, cfg.conv_alpha) == (4, 2.0, "locon", 2, 1.0)
    assert cfg.train_text_encoder and cfg.train_unet and not cfg.use_dora
    net = apply_lora_file(model, path)
    loaded = net.state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v.float()), k
    net.remove()
    with pytest.raises(HostError, match="no LoRA, LoHa or LoKr weights"):
        lora_file_config({"x.alpha": torch.tensor(1.0)}, {})
    xl = load_base_model(str(tiny_files["sdxl"]), log_fn=quiet)
    with pytest.raises(HostError, match="does not fit this model"):
        apply_lora_file(xl, path)
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in xl.unet.modules())  # a failed load leaves no layers behind


def test_install_never_replaces_and_staging_is_unique(tiny_files, tmp_path):
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "loras", log=quiet)
    run = tmp_path / "run"
    run.mkdir()
    src = run / "style.safetensors"
    src.write_bytes(b"first")
    (run / "style.json").write_text(json.dumps({"activation text": "zzstyle"}))
    a = host.install_lora(src)
    src.write_bytes(b"second")
    b = host.install_lora(src)
    assert a.name == "style.safetensors" and b.name == "style_2.safetensors"
    assert a.read_bytes() == b"first" and b.read_bytes() == b"second"
    assert json.loads(b.with_suffix(".json").read_text())["activation text"] == "zzstyle"
    c = host.install_lora(src, overwrite=True)
    assert c == a and a.read_bytes() == b"second"
    assert not list(host.lora_dir().glob(".*tmp*"))
    s1 = host.stage_lora(src, "style-step10")
    assert s1.path.parent.name == PREVIEW_SUBDIR and s1.name.startswith("style-step10-")
    assert host.stage_lora(src, "style-step10").name == s1.name
    src.write_bytes(b"third")
    assert host.stage_lora(src, "style-step10").name != s1.name
    assert host.list_loras()[:2] == ["style", "style_2"]  # preview copies sort last
    with pytest.raises(HostError, match="does not exist"):
        host.stage_lora(tmp_path / "gone.safetensors")


def test_set_base_model_switches_family(tiny_files, tmp_path):
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "loras", log=quiet)
    assert host.checkpoint_info().family == "sd1"
    assert host.set_base_model(str(tiny_files["sdxl"])).family == "sdxl"
    # a config naming another model trains on it for that run only: the server's model does not change
    cfg, notes = host.prepare_config(base_config(base_model=str(tiny_files["sd2"])))
    assert host.checkpoint_info().family == "sdxl" and any("for this run only" in n for n in notes)
    assert host.model_for(cfg, log=quiet).family == "sd2"
    assert host.checkpoint_info().family == "sdxl"
    cfg, notes = host.prepare_config(base_config())
    assert cfg.base_model == str(tiny_files["sdxl"]) and not notes


def test_detect_host_kind(monkeypatch):
    import sys
    import types

    assert detect_host_kind() == "standalone"
    for name in ("modules", "modules.shared", "modules.script_callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    assert detect_host_kind() == "a1111"
    for name in ("backend", "backend.memory_management"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    assert detect_host_kind() == "forge"
    from lora_trainer.hosts import host_for_webui

    from lora_trainer.hosts.forge import ForgeHost

    assert isinstance(host_for_webui(log=lambda *_: None), ForgeHost)


def test_preview_during_training_is_refused_not_blocked(tiny_files, tmp_path):
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "loras", log=quiet)
    host.base_model()
    entered, release = threading.Event(), threading.Event()

    def hold():
        with host.exclusive_gpu():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(10)
    try:
        with pytest.raises(HostBusy):
            host.preview("x", None, 1.0, 1, 1, 64)
    finally:
        release.set()
        t.join()
