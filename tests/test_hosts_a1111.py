"""The AUTOMATIC1111 adapter against small fakes of the WebUI's `modules.*` (no WebUI needed).

The fake `sd_model` is a module tree that carries a tiny real checkpoint under the WebUI's *live* names
(`cond_stage_model.wrapped.*`, the textual-inversion wrapper around the token embedding, ...), so the
adapter's state-dict mapping, the tensor sharing and a whole training job run for real."""
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lora_trainer.config import ConfigError
from lora_trainer.hosts import PREVIEW_SUBDIR, HostBusy, HostError
from lora_trainer.hosts import a1111 as a1111_mod
from lora_trainer.hosts.a1111 import (A1111Host, live_state_dict, live_to_ldm_state_dict, lora_prompt,
                                      restore_lora_backups)
from lora_trainer.models.tiny import tiny_ldm_state_dict
from lora_trainer.train.control import StopFlag
from lora_trainer.train.events import EventBus

from conftest import base_config, make_images


# ---- a fake WebUI --------------------------------------------------------------------------------------
def module_tree(flat: dict) -> torch.nn.Module:
    """nn.Module hierarchy whose parameters ARE the given tensors (names split on dots)."""
    root = torch.nn.Module()
    for key, tensor in flat.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, torch.nn.Module())
            node = node._modules[part]
        if tensor.is_floating_point():
            node.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            node.register_buffer(leaf, tensor)
    return root


LIVE_RENAMES = {
    "sd1": [("cond_stage_model.", "cond_stage_model.wrapped.")],
    "sd2": [("cond_stage_model.", "cond_stage_model.wrapped.")],
    "sdxl": [("conditioner.embedders.0.", "conditioner.embedders.0.wrapped."),
             ("conditioner.embedders.1.", "conditioner.embedders.1.wrapped.")],
}


def to_live_names(sd: dict, family: str) -> dict:
    out = {}
    for k, v in sd.items():
        for old, new in LIVE_RENAMES[family]:
            if k.startswith(old):
                k = new + k[len(old):]
        k = k.replace(".token_embedding.weight", ".token_embedding.wrapped.weight")  # the TI wrapper
        out[k] = v
    return out


def fake_sd_model(family: str, tmp_path: Path, dtype=torch.float32):
    sd, original = tiny_ldm_state_dict(family)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    live = to_live_names(sd, family)
    m = torch.nn.Module()
    m.model = module_tree({k[len("model."):]: v for k, v in live.items() if k.startswith("model.diffusion_model.")})
    m.first_stage_model = module_tree({k[len("first_stage_model."):]: v for k, v in live.items()
                                       if k.startswith("first_stage_model.")})
    te_root = "conditioner." if family == "sdxl" else "cond_stage_model."
    te = module_tree({k[len(te_root):]: v for k, v in live.items() if k.startswith(te_root)})
    if family == "sdxl":
        m.conditioner = te
        m.cond_stage_model = te
    else:
        m.cond_stage_model = te
    m.is_sd1, m.is_sd2, m.is_sdxl = family == "sd1", family == "sd2", family == "sdxl"
    m.parameterization = "v" if family == "sd2" else "eps"
    config = tmp_path / f"{family}.yaml"
    config.write_text(yaml.safe_dump(original))
    m.used_config = str(config)
    m.sd_checkpoint_info = SimpleNamespace(title=f"tiny-{family}.safetensors [abcdef0123]",
                                           filename=str(tmp_path / f"tiny-{family}.safetensors"),
                                           sha256="abcdef0123" + "0" * 54, name=f"tiny-{family}.safetensors")
    return m, sd


class FakeLock:
    """modules.fifo_lock.FIFOLock's interface: acquire(blocking) / release, not re-entrant."""

    def __init__(self):
        self._lock = threading.Lock()
        self.held = False

    def acquire(self, blocking=True):
        ok = self._lock.acquire(blocking)
        if ok:
            self.held = True
        return ok

    def release(self):
        self.held = False
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *a):
        self.release()


class FakeState:
    def __init__(self):
        self.job, self.job_no, self.job_count, self.textinfo = "", 0, 0, None
        self.sampling_step, self.sampling_steps = 0, 0
        self.interrupted = self.skipped = self.stopping_generation = False
        self.time_start = None
        self.job_timestamp = "0"
        self.processing_has_refined_job_count = False
        self.begun = []

    def begin(self, job="(unknown)"):
        self.begun.append(job)
        self.job, self.job_no, self.job_count = job, 0, -1
        self.interrupted = False
        self.time_start = time.time()

    def end(self):
        self.job, self.job_count = "", 0


@pytest.fixture
def webui(monkeypatch, tmp_path):
    """Installs fake `modules.*` and `networks`; returns a namespace to configure and inspect them."""
    ns = SimpleNamespace(calls=[], lock=FakeLock(), state=FakeState(), lora_dir=tmp_path / "models" / "Lora",
                         previews=[])

    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    pkg = mod("modules")
    pkg.__path__ = []
    ns.shared = mod("modules.shared", sd_model=None, state=ns.state, interrogator=None,
                    cmd_opts=SimpleNamespace(lora_dir=str(ns.lora_dir), lowvram=False, medvram=False))
    mod("modules.call_queue", queue_lock=ns.lock)
    ns.sd_models = mod("modules.sd_models", model_data=SimpleNamespace(sd_model=None))
    mod("modules.devices", device=torch.device("cpu"), cpu=torch.device("cpu"),
        torch_gc=lambda: ns.calls.append("torch_gc"))
    mod("modules.lowvram", send_everything_to_cpu=lambda: ns.calls.append("send_everything_to_cpu"))
    mod("modules.paths", models_path=str(tmp_path / "models"), data_path=str(tmp_path))
    mod("modules.script_callbacks", on_ui_tabs=lambda fn: ns.calls.append(("on_ui_tabs", fn)),
        on_app_started=lambda fn: ns.calls.append(("on_app_started", fn)))

    class StableDiffusionProcessing:
        cached_c = ["key", "value"]
        cached_uc = ["key", "value"]

    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        def __init__(self, **kw):
            self.kw = kw
            self.closed = False

        def close(self):
            self.closed = True

    def process_images(p):
        from PIL import Image

        ns.previews.append({"kw": p.kw, "lock_held": ns.lock.held, "job": ns.state.job})
        ns.state.job_count, ns.state.textinfo = 1, "sampling"
        prompt = p.kw["prompt"].split(", <lora:")[0]  # the WebUI writes it with the extra-network tags taken out
        info = (f"{prompt}\nSteps: {p.kw['steps']}, Sampler: {p.kw['sampler_name']}, CFG scale: "
                f"{p.kw['cfg_scale']}, Seed: {p.kw['seed']}, Size: {p.kw['width']}x{p.kw['height']}")
        return SimpleNamespace(images=[Image.new("RGB", (p.kw["width"], p.kw["height"]), (1, 2, 3))],
                               infotexts=[info])

    ns.processing = mod("modules.processing", StableDiffusionProcessing=StableDiffusionProcessing,
                        StableDiffusionProcessingTxt2Img=StableDiffusionProcessingTxt2Img,
                        process_images=process_images)
    ns.bindings = []
    mod("modules.infotext_utils", create_buttons=lambda tabs: {t: f"button:{t}" for t in tabs},
        ParamBinding=lambda **kw: SimpleNamespace(**kw), register_paste_params_button=ns.bindings.append)
    mod("networks", load_networks=lambda names: ns.calls.append(("load_networks", list(names), ns.lock.held)),
        list_available_networks=lambda: ns.calls.append("list_available_networks"))

    def set_model(model):
        ns.shared.sd_model = model
        ns.sd_models.model_data.sd_model = model

    ns.set_model = set_model
    return ns


# ---- pure helpers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_live_names_map_back_and_share_the_webui_tensors(family, tmp_path):
    from lora_trainer.models.loader import build_from_ldm_state_dict

    sd_model, original = fake_sd_model(family, tmp_path)
    live = live_state_dict(sd_model)
    assert any(".wrapped." in k for k in live)  # the fake really uses the live names
    mapped = live_to_ldm_state_dict(live)
    assert set(mapped) == set(original)
    for k, v in original.items():
        assert mapped[k].data_ptr() == v.data_ptr(), k  # nothing copied
    model = build_from_ldm_state_dict(mapped, original_config=yaml.safe_load(Path(sd_model.used_config).read_text()),
                                      log_fn=lambda *_: None)
    assert model.family == family
    webui_ptrs = {p.data_ptr() for p in sd_model.parameters()}
    unet_ptrs = [p.data_ptr() for p in model.unet.parameters()]
    assert all(p in webui_ptrs for p in unet_ptrs)  # the diffusers UNet trains on the WebUI's tensors
    emb = model.text_encoders[0].get_input_embeddings().weight
    assert emb.data_ptr() in webui_ptrs  # the token embedding behind the TI wrapper is found


def test_two_live_names_for_one_weight_is_an_error():
    t = torch.zeros(2)
    with pytest.raises(HostError, match="wraps its modules differently"):
        live_to_ldm_state_dict({"cond_stage_model.wrapped.transformer.x": t, "cond_stage_model.transformer.x": t})


def test_restore_lora_backups_restores_only_merged_modules():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    clean_w, clean_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
        lin.bias.add_(1.0)
    lin.network_weights_backup, lin.network_bias_backup = clean_w.clone(), clean_b.clone()
    lin.network_current_names = (("style", 1.0, 1.0, 1.0),)

    untouched = torch.nn.Linear(4, 4)
    untouched.network_weights_backup = torch.full_like(untouched.weight, 7.0)  # stale backup, no LoRA merged now
    untouched.network_current_names = ()
    before = untouched.weight.detach().clone()

    nobias = torch.nn.Conv2d(2, 2, 1, bias=False)
    nb_clean = nobias.weight.detach().clone()
    with torch.no_grad():
        nobias.weight.mul_(3.0)
    nobias.bias = torch.nn.Parameter(torch.ones(2))  # a LoRA with a bias added one
    nobias.network_weights_backup, nobias.network_bias_backup = nb_clean, None
    nobias.network_current_names = (("x", 0.5, 0.5, 1.0),)

    mha = torch.nn.MultiheadAttention(4, 1)
    mha_in, mha_out = mha.in_proj_weight.detach().clone(), mha.out_proj.weight.detach().clone()
    mha_bias = mha.out_proj.bias.detach().clone()
    with torch.no_grad():
        mha.in_proj_weight.add_(2.0)
        mha.out_proj.weight.add_(2.0)
    mha.network_weights_backup = (mha_in, mha_out)
    mha.network_bias_backup = mha_bias
    mha.network_current_names = (("x", 1.0, 1.0, 1.0),)

    root = torch.nn.ModuleList([lin, untouched, nobias, mha])
    with torch.no_grad():
        assert restore_lora_backups(root) == 3
    assert torch.equal(lin.weight, clean_w) and torch.equal(lin.bias, clean_b)
    assert torch.equal(untouched.weight, before)
    assert torch.equal(nobias.weight, nb_clean) and nobias.bias is None
    assert torch.equal(mha.in_proj_weight, mha_in) and torch.equal(mha.out_proj.weight, mha_out)
    assert all(m.network_current_names == () for m in (lin, nobias, mha))  # the WebUI re-merges next time


def test_lora_prompt():
    assert lora_prompt("a cat", "style-x", 0.5) == "a cat, <lora:style-x:0.5>"
    assert lora_prompt("", "s", 1) == "<lora:s:1>"


# ---- the adapter over the fake WebUI -------------------------------------------------------------------
def test_checkpoint_info_families_and_refusals(webui, tmp_path):
    host = A1111Host(log=lambda *_: None)
    info = host.checkpoint_info()
    assert not info.supported and "No checkpoint is loaded" in info.message
    sd_model, _ = fake_sd_model("sdxl", tmp_path)
    webui.set_model(sd_model)
    info = host.checkpoint_info()
    assert info.supported and info.family == "sdxl" and info.title.startswith("tiny-sdxl")
    assert info.hash.startswith("abcdef0123")
    assert info.describe().count("abcdef0123") == 1  # the WebUI's title already carries the short hash
    sd_model.is_sd3 = True
    assert not host.checkpoint_info().supported and "SD3" in host.checkpoint_info().message
    sd_model.is_sd3 = False
    webui.shared.cmd_opts.lowvram = True
    info = host.checkpoint_info()
    assert not info.supported and "--lowvram" in info.message
    with pytest.raises(HostError, match="--lowvram"):
        host.loaded_checkpoint()
    with pytest.raises(HostError, match="--lowvram"):
        with host.exclusive_gpu():
            pass
    assert not webui.lock.held


def test_fp8_and_inpainting_checkpoints_are_refused(webui, tmp_path):
    host = A1111Host(log=lambda *_: None)
    sd_model, _ = fake_sd_model("sd1", tmp_path)
    webui.set_model(sd_model)
    sd_model.is_sdxl_inpaint = True
    assert "inpainting" in host.checkpoint_info().message
    sd_model.is_sdxl_inpaint = False
    if hasattr(torch, "float8_e4m3fn"):
        p = next(sd_model.model.diffusion_model.parameters())
        p.data = p.data.to(torch.float8_e4m3fn)
        info = host.checkpoint_info()
        assert not info.supported and "FP8" in info.message


def test_lora_dir_refresh_and_work_dir(webui, tmp_path):
    host = A1111Host(log=lambda *_: None)
    assert host.lora_dir() == webui.lora_dir
    webui.shared.cmd_opts.lora_dir = None
    assert host.lora_dir() == tmp_path / "models" / "Lora"
    host.refresh_loras()
    assert "list_available_networks" in webui.calls
    assert webui.processing.StableDiffusionProcessing.cached_c == [None, None]  # stale conditioning dropped
    assert host.work_dir() == tmp_path / "outputs" / "lora-trainer"


def test_clean_weights_restores_under_the_queue_lock(webui, tmp_path):
    host = A1111Host(log=lambda *_: None)
    sd_model, _ = fake_sd_model("sd1", tmp_path)
    webui.set_model(sd_model)
    node = sd_model.model.diffusion_model.input_blocks._modules["1"]._modules["1"].proj_in
    clean = node.weight.detach().clone()
    with torch.no_grad():
        node.weight.add_(0.5)  # a LoRA merged in by the WebUI
    node.network_weights_backup, node.network_bias_backup = clean, node.bias.detach().clone()
    node.network_current_names = (("old", 1.0, 1.0, 1.0),)
    with host.clean_weights():
        assert torch.equal(node.weight, clean)
        assert not webui.lock.held  # released after the restore when not training
    assert ("load_networks", [], True) in webui.calls  # unloaded while holding the lock
    # inside exclusive_gpu the lock is already ours: no deadlock (it is not re-entrant)
    with host.exclusive_gpu():
        with host.clean_weights():
            assert webui.lock.held
    assert not webui.lock.held


def test_exclusive_gpu_holds_the_lock_keeps_state_honest_and_ignores_a_waiting_generations_interrupt(webui,
                                                                                                       tmp_path):
    host = A1111Host(log=lambda *_: None)
    sd_model, _ = fake_sd_model("sd1", tmp_path)
    webui.set_model(sd_model)
    events, stop = EventBus(), StopFlag()
    with host.exclusive_gpu(stop=stop, events=events):
        assert webui.lock.held and webui.state.begun == ["lora_trainer"]
        events.emit("started", step=0, total_steps=40)
        events.emit("step", step=3, total_steps=40, loss=0.25)
        assert webui.state.job_count == 40 and webui.state.job_no == 3
        assert "step 3/40" in webui.state.textinfo and "0.2500" in webui.state.textinfo
        assert not stop
        webui.state.interrupted = True  # the WebUI's Interrupt, pressed on a generation waiting for us
        time.sleep(1.5)
        assert not stop  # meant for that generation: training goes on (the tab's Stop stops it)
    assert not webui.lock.held
    assert webui.state.job == "" and webui.state.textinfo is None
    events.emit("step", step=4, total_steps=40, loss=0.2)  # after the run: no more writes to the state
    assert webui.state.job_no == 3


def test_exclusive_gpu_waits_for_the_webui_and_can_be_stopped_while_waiting(webui, tmp_path):
    host = A1111Host(log=lambda *_: None)
    webui.set_model(fake_sd_model("sd1", tmp_path)[0])
    webui.lock.acquire()  # the WebUI is generating
    stop = StopFlag()
    threading.Timer(0.3, lambda: stop.set("user")).start()
    with pytest.raises(HostBusy, match="stopped while waiting"):
        with host.exclusive_gpu(stop=stop):
            pass
    webui.lock.release()


def test_medvram_moves_the_model_to_the_device_and_back(webui, tmp_path):
    host = A1111Host(log=lambda *_: None)
    sd_model, _ = fake_sd_model("sd1", tmp_path)
    sd_model.lowvram = True  # what --medvram sets
    webui.set_model(sd_model)
    moves = []
    for name in ("first_stage_model", "cond_stage_model"):
        part = getattr(sd_model, name)
        part.to = (lambda n: (lambda device: moves.append((n, str(device)))))(name)
    with host.exclusive_gpu():
        assert webui.calls[0] == "send_everything_to_cpu"
        assert ("first_stage_model", "cpu") in moves  # (devices.device is the CPU in this fake)
        n_in = len(moves)
    assert len(moves) == 2 * n_in and "torch_gc" in webui.calls


def test_prepare_config_follows_the_webui_dtype_and_device(webui, tmp_path):
    host = A1111Host(log=lambda *_: None)
    webui.set_model(fake_sd_model("sd1", tmp_path, dtype=torch.float16)[0])
    cfg, notes = host.prepare_config(base_config(device="auto", mixed_precision="no"))
    assert cfg.device == "cpu" and cfg.mixed_precision == "fp16" and any("float16" in n for n in notes)
    assert cfg.base_model.endswith("tiny-sd1.safetensors")
    with pytest.raises(ConfigError, match="text-generation"):
        host.prepare_config(base_config(task_type="text-generation"))
    # FLUX.1's storage / swap keys are for the CLI's own load: off, and said, never silently ignored
    cfg, notes = host.prepare_config(base_config(fp8_base=True, blocks_to_swap=8))
    assert not cfg.fp8_base and cfg.blocks_to_swap == 0
    assert {n.split(":")[0] for n in notes if "as the WebUI holds it" in n} == {"fp8_base", "blocks_to_swap"}


def test_preview_uses_the_webui_pipeline_and_restores_its_state(webui, tmp_path):
    host = A1111Host(log=lambda *_: None)
    webui.set_model(fake_sd_model("sd1", tmp_path)[0])
    webui.state.job, webui.state.textinfo, webui.state.job_count = "txt2img", "earlier", 7
    image = host.preview("red square", "mystyle-abc", 0.75, 5, 6, (64, 48))
    assert image.size == (64, 48)
    call = webui.previews[-1]
    assert call["lock_held"] and call["job"] == "lora_trainer_preview"
    kw = call["kw"]
    assert kw["prompt"] == "red square, <lora:mystyle-abc:0.75>" and kw["seed"] == 5 and kw["steps"] == 6
    assert kw["do_not_save_samples"] and kw["do_not_save_grid"] and kw["sampler_name"] == "Euler"
    assert (webui.state.job, webui.state.textinfo, webui.state.job_count) == ("txt2img", "earlier", 7)
    assert not webui.lock.held
    # the WebUI's own generation parameters travel with the image; its Send buttons paste them into txt2img
    assert image.info["parameters"] == ("red square, <lora:mystyle-abc:0.75>\n"
                                        "Steps: 6, Sampler: Euler, CFG scale: 7.0, Seed: 5, Size: 64x48")
    assert a1111_mod.with_prompt("p\nNegative prompt: n\nSteps: 1", "p, <lora:x:1>") == \
        "p, <lora:x:1>\nNegative prompt: n\nSteps: 1"
    assert a1111_mod.with_prompt("line one\nline two\nSteps: 1", "q") == "q\nSteps: 1"
    assert host.send_buttons("preview-image", "preview-params")
    assert [(b.paste_button, b.tabname, b.source_text_component, b.source_image_component) for b in webui.bindings] \
        == [("button:txt2img", "txt2img", "preview-params", "preview-image"),
            ("button:img2img", "img2img", "preview-params", "preview-image")]
    # busy WebUI: wait, then a clear refusal
    webui.lock.acquire()
    orig = a1111_mod.LOCK_WAIT_S
    a1111_mod.LOCK_WAIT_S = 0.3
    try:
        with pytest.raises(HostBusy, match="busy"):
            host.preview("x", "y", 1.0, 1, 1, 64)
    finally:
        a1111_mod.LOCK_WAIT_S = orig
        webui.lock.release()
    # the built-in Lora extension disabled: say so instead of silently previewing the base model
    del sys.modules["networks"]
    with pytest.raises(HostError, match="Lora extension is disabled"):
        host.preview("x", "y", 1.0, 1, 1, 64)


def test_interrogators_are_wrapped_in_the_queue_lock(webui, tmp_path):
    seen = []

    class Interrogator:
        def interrogate(self, image):
            seen.append(webui.lock.held)
            return "a photo of a cat"

    webui.shared.interrogator = Interrogator()
    fns = A1111Host().interrogators()
    assert "clip-interrogator (WebUI)" in fns
    from PIL import Image

    assert fns["clip-interrogator (WebUI)"](Image.new("RGB", (8, 8))) == "a photo of a cat" and seen == [True]


def test_stage_lora_gives_each_version_a_unique_name(webui, tmp_path):
    host = A1111Host(log=lambda *_: None)
    a = tmp_path / "ck1" / "style-step00000010.safetensors"
    a.parent.mkdir()
    a.write_bytes(b"version one")
    first = host.stage_lora(a, "style-step10")
    again = host.stage_lora(a, "style-step10")
    assert first.name == again.name and first.path.parent == webui.lora_dir / PREVIEW_SUBDIR
    assert webui.calls.count("list_available_networks") == 1  # the copy is reused, no second refresh
    a.write_bytes(b"version two")  # same file name, new content (a re-run)
    second = host.stage_lora(a, "style-step10")
    assert second.name != first.name and first.path.read_bytes() == b"version one"
    assert host.find_lora(second.name) == second.path


def test_a_whole_job_trains_on_the_webui_weights(webui, tmp_path):
    """JobRunner + A1111Host over the fake WebUI: trains through the WebUI's own tensors, leaves them
    unchanged, installs the LoRA in its folder, refreshes it, and previews through its pipeline."""
    from lora_trainer.network.kohya_file import read_lora
    from lora_trainer.ui.jobs import JobRunner

    sd_model, _ = fake_sd_model("sd1", tmp_path)
    webui.set_model(sd_model)
    before = {k: v.detach().clone() for k, v in sd_model.state_dict().items()}
    data = make_images(tmp_path / "data", n=4)
    host = A1111Host(log=lambda *_: None)
    runner = JobRunner()
    cfg = base_config(train_data_dir=str(data), output_dir=str(tmp_path / "runs"), output_name="webui_style",
                      max_train_steps=3, sample_steps=2, caption_prefix="wbstyle")
    runner.start(cfg, host)
    assert runner.wait(300)
    st = runner.status()
    assert st["state"] == "finished", st
    lora = Path(st["lora_path"])
    assert lora == webui.lora_dir / "webui_style.safetensors"
    sd, meta = read_lora(lora)
    assert meta["ss_sd_model_name"].startswith("tiny-sd1") and meta["ss_new_sd_model_hash"].startswith("abcdef0123")
    assert "list_available_networks" in webui.calls
    assert webui.previews and "<lora:webui_style:1>" in webui.previews[-1]["kw"]["prompt"]
    assert "wbstyle" in webui.previews[-1]["kw"]["prompt"]
    assert Path(st["preview_path"]).is_file()
    for k, v in sd_model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the WebUI's weights are untouched by LoRA training
    assert not webui.lock.held and webui.state.job == ""


def test_scripts_file_registers_the_tab_and_the_api(webui, tmp_path, monkeypatch):
    import runpy

    script = Path(__file__).resolve().parents[1] / "scripts" / "lora_trainer_tab.py"
    runpy.run_path(str(script), run_name="lora_trainer_tab")
    registered = dict((name, fn) for name, fn in (c for c in webui.calls if isinstance(c, tuple) and len(c) == 2))
    assert set(registered) == {"on_ui_tabs", "on_app_started"}
    pytest.importorskip("fastapi")
    from fastapi import FastAPI

    ours = {"/lora-trainer/v1/train", "/lora-trainer/v1/status", "/lora-trainer/v1/events", "/lora-trainer/v1/stop"}
    app = FastAPI()
    registered["on_app_started"](None, app)  # the WebUI runs without --api: no training API either
    assert not ours & {getattr(r, "path", "") for r in app.routes}
    webui.shared.cmd_opts.nowebui = True
    app = FastAPI()
    registered["on_app_started"](None, app)
    assert ours <= {getattr(r, "path", "") for r in app.routes}
    try:
        import gradio  # noqa: F401
    except ImportError:
        return
    webui.set_model(fake_sd_model("sd1", tmp_path)[0])
    tabs = registered["on_ui_tabs"]()
    assert len(tabs) == 1 and tabs[0][1:] == ("Train LoRA", "lora_trainer")


def test_a_job_waits_for_the_webui_and_a_stop_while_waiting_ends_it_cleanly(webui, tmp_path):
    from lora_trainer.ui.jobs import JobRunner

    webui.set_model(fake_sd_model("sd1", tmp_path)[0])
    data = make_images(tmp_path / "data", n=2)
    runner = JobRunner()
    webui.lock.acquire()  # the WebUI is busy generating
    try:
        job = runner.start(base_config(train_data_dir=str(data), output_dir=str(tmp_path / "runs"), output_name="w",
                                       max_train_steps=2), A1111Host(log=lambda *_: None))
        time.sleep(0.5)
        assert job.state == "waiting" and runner.running
        assert runner.stop()
        assert runner.wait(30)
    finally:
        webui.lock.release()
    st = runner.status()
    assert st["state"] == "stopped" and st["error"] is None
    assert runner.events_since(0)[0][-1]["kind"] == "stopped"
    assert not (tmp_path / "runs" / "w").exists() or not list((tmp_path / "runs" / "w").glob("checkpoint-*"))


def test_api_follows_the_webuis_api_flags_and_uses_its_own_auth(webui, tmp_path, serve_app):
    """--api-auth: our routes carry the very dependency the WebUI's /sdapi/v1 routes carry (401 without it)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import runpy

    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    script = Path(__file__).resolve().parents[1] / "scripts" / "lora_trainer_tab.py"
    runpy.run_path(str(script), run_name="lora_trainer_tab")
    on_app_started = dict(c for c in webui.calls if isinstance(c, tuple) and len(c) == 2)["on_app_started"]
    checked = []

    def webui_auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic())):  # stands in for Api.auth
        checked.append(credentials.username)
        if (credentials.username, credentials.password) != ("alice", "s3cret"):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
        return True

    webui.shared.cmd_opts.api, webui.shared.cmd_opts.api_auth = True, "alice:s3cret"
    app = FastAPI()
    app.add_api_route("/sdapi/v1/progress", lambda: {"progress": 0}, dependencies=[Depends(webui_auth)])
    on_app_started(None, app)
    client = serve_app(app)
    for method, path in (("GET", "/status"), ("GET", "/events"), ("POST", "/stop"), ("POST", "/train")):
        code, _ = client.request(method, "/lora-trainer/v1" + path, body={} if method == "POST" else None)
        assert code == 401, (path, code)
        code, _ = client.request(method, "/lora-trainer/v1" + path, body={} if method == "POST" else None,
                                 auth=("alice", "wrong"))
        assert code == 401, (path, code)
    assert client.get("/lora-trainer/v1/status", auth=("alice", "s3cret")) == (200, {"id": None, "state": "idle"})
    assert "alice" in checked  # the WebUI's own check ran, not a copy of it

    # no /sdapi route to borrow from (an unusual start-up order): the same check on the same flag
    app = FastAPI()
    on_app_started(None, app)
    client = serve_app(app)
    assert client.get("/lora-trainer/v1/status")[0] == 401
    assert client.get("/lora-trainer/v1/status", auth=("alice", "s3cret"))[0] == 200


def test_training_progress_reaches_the_webui_console_every_tenth():
    from lora_trainer.hosts.a1111 import _StateTracker

    lines = []
    tracker = _StateTracker(SimpleNamespace(), None, print_fn=lines.append, every_s=3600)
    tracker.begin()
    events = EventBus()
    events.subscribe(tracker.on_event)
    for step in range(1, 41):
        events.emit("step", step=step, total_steps=40, loss=0.5, it_per_s=2.0, eta_s=(40 - step) / 2)
    tracker.end()
    # the first step (it has started), then every 10 %
    assert [line.split(",")[0] for line in lines] == [f"[lora-trainer] step {n}/40" for n in [1, *range(4, 41, 4)]]
    assert "ETA 0:00:18" in lines[1] and "2.00 it/s" in lines[1]
