"""The Forge adapter against small fakes of Forge (`modules.*` as in A1111, plus `backend.*`).

The fake model is laid out like Forge's: an LDM-named UNet and VAE, text encoders as transformers CLIP
models (OpenCLIP ones already split into q/k/v) inside IntegratedCLIP-like wrappers, ModelPatchers that
record refreshes, and every weight created under `torch.inference_mode()` as Forge loads them."""
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lora_trainer.hosts import HostError
from lora_trainer.hosts.forge import ForgeHost, forge_live_state_dict, lora_patch_counts, make_trainable
from lora_trainer.models import ldm_names as names
from lora_trainer.models.loader import build_from_ldm_state_dict
from lora_trainer.models.tiny import tiny_ldm_state_dict

from conftest import base_config, make_images
from test_hosts_a1111 import module_tree, webui  # noqa: F401  (webui is a fixture)

quiet = lambda *_: None  # noqa: E731


class FakePatcher:
    def __init__(self, model):
        self.model = model
        self.lora_patches = {}
        self.refreshed = 0

    def refresh_loras(self):
        self.refreshed += 1


def _integrated_clip(hf: dict, extra_projection: bool, dtype=torch.float32) -> torch.nn.Module:
    wrapper = torch.nn.Module()
    hf = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf.items()}
    # Forge wraps the token embedding for textual inversion, as A1111 does
    flat = {k.replace(".token_embedding.weight", ".token_embedding.wrapped.weight"): v for k, v in hf.items()}
    if extra_projection:  # Forge gives CLIP-L a projection it never uses
        width = hf["text_model.final_layer_norm.weight"].shape[0]
        flat["text_projection.weight"] = torch.randn(width, width)
    wrapper.transformer = module_tree(flat)
    # ...and registers the same tensor a second time on the wrapper (CLIPEmbeddingForTextualInversion)
    emb = wrapper.transformer.text_model.embeddings.token_embedding
    emb.weight = emb.wrapped.weight
    if dtype != torch.float32:  # after its first prompt Forge keeps both embeddings in fp32, the layers in fp16
        embeddings = wrapper.transformer.text_model.embeddings
        for m in (embeddings.position_embedding, emb.wrapped):
            m.weight = torch.nn.Parameter(m.weight.float(), requires_grad=False)
        emb.weight = emb.wrapped.weight
        # and a layer of another precision inside (what a real Forge showed after patching LoRAs in and out)
        out_proj = wrapper.transformer.text_model.encoder.layers._modules["0"].self_attn.out_proj
        for name in ("weight", "bias"):
            setattr(out_proj, name, torch.nn.Parameter(getattr(out_proj, name).float(), requires_grad=False))
    wrapper.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
    return wrapper


def fake_forge_model(family: str, tmp_path: Path, kind: str = None, te_dtype=torch.float32):
    sd, original = tiny_ldm_state_dict(family, v_prediction=(family == "sd2"))
    with torch.inference_mode():  # Forge loads its weights like this
        forge_sd = {k: v.clone() for k, v in sd.items()}
        unet = module_tree({k[len(names.UNET_PREFIX):]: v for k, v in forge_sd.items() if k.startswith(names.UNET_PREFIX)})
        vae = module_tree({k[len(names.VAE_PREFIX):]: v for k, v in forge_sd.items() if k.startswith(names.VAE_PREFIX)})
        encoders = torch.nn.Module()
        if family == "sd1":
            hf = {k[len(names.SD1_TE_PREFIX):]: v for k, v in forge_sd.items() if k.startswith(names.SD1_TE_PREFIX)}
            encoders.clip_l = _integrated_clip(hf, True, te_dtype)
        elif family == "sd2":
            hf = {k: v.clone().contiguous() for k, v in names.openclip_to_hf(forge_sd, names.SD2_TE_PREFIX).items()}
            encoders.clip_h = _integrated_clip(hf, False, te_dtype)
        else:
            hf1 = {k[len(names.SDXL_TE1_PREFIX):]: v for k, v in forge_sd.items() if k.startswith(names.SDXL_TE1_PREFIX)}
            hf2 = {k: v.clone().contiguous() for k, v in names.openclip_to_hf(forge_sd, names.SDXL_TE2_PREFIX).items()}
            encoders.clip_l = _integrated_clip(hf1, True, te_dtype)
            encoders.clip_g = _integrated_clip(hf2, False, te_dtype)
    kmodel = SimpleNamespace(diffusion_model=unet, storage_dtype=torch.float32,
                             predictor=SimpleNamespace(prediction_type="v_prediction" if family == "sd2" else "epsilon"))
    objs = SimpleNamespace(unet=FakePatcher(kmodel),
                           clip=SimpleNamespace(cond_stage_model=encoders, patcher=FakePatcher(encoders)),
                           vae=SimpleNamespace(first_stage_model=vae, patcher=FakePatcher(vae)))
    cls_name = kind or {"sd1": "StableDiffusion", "sd2": "StableDiffusion2", "sdxl": "StableDiffusionXL"}[family]
    model = type(cls_name, (), {})()
    model.forge_objects_original = objs
    model.forge_objects = SimpleNamespace(unet=objs.unet, clip=objs.clip, vae=objs.vae)
    model.forge_objects_after_applying_lora = SimpleNamespace(unet=FakePatcher(kmodel),
                                                              clip=SimpleNamespace(patcher=FakePatcher(encoders)))
    model.is_sd1, model.is_sd2, model.is_sdxl = family == "sd1", family == "sd2", family == "sdxl"
    model.is_inpaint = False
    model.current_lora_hash = "['some.safetensors', 1.0]"
    ckpt = tmp_path / f"forge-{family}.safetensors"
    ckpt.with_suffix(".yaml").write_text(yaml.safe_dump(original))  # a non-standard (tiny) architecture
    model.sd_checkpoint_info = SimpleNamespace(title=f"forge-{family}.safetensors [0123456789]", filename=str(ckpt),
                                               sha256="0123456789" + "0" * 54, name=ckpt.name)
    return model, sd, original


@pytest.fixture
def forge(webui, monkeypatch, tmp_path):  # noqa: F811
    """The A1111 fakes plus Forge's lazy loader and memory manager."""
    ns = webui
    ns.pending = None  # what forge_model_reload() will "load"
    ns.gpu_loads = []

    def forge_model_reload():
        ns.calls.append("forge_model_reload")
        if ns.pending is None:
            raise ValueError("You do not have any model!")
        ns.set_model(ns.pending)
        return ns.pending, True

    ns.sd_models.forge_model_reload = forge_model_reload
    ns.sd_models.model_data.sd_model = type("FakeInitialModel", (), {})()
    ns.sd_models.model_data.forge_loading_parameters = {}
    backend = types.ModuleType("backend")
    backend.__path__ = []
    monkeypatch.setitem(sys.modules, "backend", backend)
    mm = types.ModuleType("backend.memory_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.load_models_gpu = lambda patchers: ns.gpu_loads.append((list(patchers), ns.lock.held))
    monkeypatch.setitem(sys.modules, "backend.memory_management", mm)
    return ns


# ---- pure helpers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_forge_modules_map_onto_the_checkpoint_layout_and_build_the_same_model(family, tmp_path):
    forge_model, sd, original = fake_forge_model(family, tmp_path)
    objs = forge_model.forge_objects_original
    encoders = dict(objs.clip.cond_stage_model.named_children())
    unet, vae = objs.unet.model.diffusion_model, objs.vae.first_stage_model
    assert make_trainable(unet, vae, *encoders.values()) > 0
    live = forge_live_state_dict(unet, encoders, vae, family)
    assert not any(k.endswith(("logit_scale", "position_ids")) for k in live)
    ours = build_from_ldm_state_dict(live, family=family, original_config=original, log_fn=quiet)
    reference = build_from_ldm_state_dict(sd, original_config=original, log_fn=quiet)
    assert ours.family == family and ours.v_prediction == (family == "sd2")
    # the engine's modules hold Forge's tensors, not copies
    forge_ptrs = {p.data_ptr() for m in (unet, vae, *encoders.values()) for p in m.parameters()}
    engine_params = [p for m in (ours.unet, ours.vae, *ours.text_encoders) for p in m.parameters()]
    assert all(p.data_ptr() in forge_ptrs for p in engine_params)
    # and compute what the checkpoint computes
    from lora_trainer.models.base import encode_prompts

    with torch.no_grad():
        a = encode_prompts(ours, ["a red square"])
        b = encode_prompts(reference, ["a red square"])
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            if isinstance(x, torch.Tensor):
                assert torch.allclose(x, y, atol=1e-5)
        lat = torch.randn(1, 4, 8, 8)
        assert torch.allclose(ours.vae.decode(lat).sample, reference.vae.decode(lat).sample, atol=1e-5)


def test_make_trainable_swaps_inference_tensors_in_place():
    with torch.inference_mode():
        layer = torch.nn.Linear(4, 3)
        layer.register_buffer("scale", torch.ones(3))
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        torch.nn.functional.linear(x, layer.weight).sum().backward()
    with torch.inference_mode():
        layer.twin = torch.nn.Module()
    layer.twin.weight = layer.weight  # one tensor registered in two modules, as Forge's TI wrapper does
    weight = layer.weight.detach().clone()
    assert make_trainable(layer) == 3  # weight, bias, buffer
    assert isinstance(layer.weight, torch.nn.Parameter) and not layer.weight.requires_grad
    assert layer.twin.weight is layer.weight  # still one tensor, not two copies
    assert not layer.weight.is_inference() and torch.equal(layer.weight, weight)
    torch.nn.functional.linear(x, layer.weight).sum().backward()  # now autograd can save it
    assert x.grad is not None
    assert make_trainable(layer) == 0
    with torch.inference_mode(), pytest.raises(HostError, match="inference_mode"):
        make_trainable(layer)


def test_lora_patch_counts_finds_the_patches_of_a_file(tmp_path):
    mine, other = tmp_path / "mine.safetensors", tmp_path / "other.safetensors"
    unet, clip = FakePatcher(None), FakePatcher(None)
    assert lora_patch_counts([unet, clip], str(mine)) == 0
    unet.lora_patches[(str(other), 1.0, 1.0, False)] = {"a": [1], "b": [1]}
    assert lora_patch_counts([unet, clip], str(mine)) == 0
    unet.lora_patches[(str(mine), 0.8, 1.0, False)] = {"a": [1], "b": [1], "c": [1]}
    clip.lora_patches[(str(mine), 0.8, 1.0, False)] = {"t": [1]}
    assert lora_patch_counts([unet, clip], str(mine)) == 4


# ---- the adapter ---------------------------------------------------------------------------------------
def test_checkpoint_info_names_the_pending_model_and_training_loads_it(forge, tmp_path):
    host = ForgeHost(log=quiet)
    info = host.checkpoint_info()
    assert not info.supported and "No checkpoint is selected" in info.message
    model = fake_forge_model("sdxl", tmp_path)[0]
    forge.sd_models.model_data.forge_loading_parameters = {"checkpoint_info": model.sd_checkpoint_info}
    info = host.checkpoint_info()  # shown on every page load: never loads the model itself
    assert info.family is None and "forge-sdxl" in info.describe() and "first use" in info.message
    assert info.path == model.sd_checkpoint_info.filename and "forge_model_reload" not in forge.calls
    with pytest.raises(HostError, match="could not load"):  # Forge's own error, named
        host.loaded_checkpoint()
    forge.pending = model
    loaded = host.loaded_checkpoint()
    assert loaded.family == "sdxl" and "forge_model_reload" in forge.calls
    info = host.checkpoint_info()
    assert info.supported and info.family == "sdxl" and info.title.startswith("forge-sdxl")
    forge.calls.clear()
    assert host.checkpoint_info().supported and "forge_model_reload" not in forge.calls  # loaded once


@pytest.mark.parametrize("kind,match", [("Chroma", "Chroma models cannot be trained here yet"),
                                        ("StableDiffusion3", "cannot be trained here yet"),
                                        ("StableDiffusionXLRefiner", "refiner")])
def test_unsupported_architectures_are_named(forge, tmp_path, kind, match):
    model = fake_forge_model("sdxl", tmp_path, kind=kind)[0]
    if kind != "StableDiffusionXLRefiner":
        model.is_sdxl = False
    forge.set_model(model)
    info = ForgeHost(log=quiet).checkpoint_info()
    assert not info.supported and match in info.message
    with pytest.raises(HostError, match=match):
        ForgeHost(log=quiet).loaded_checkpoint()


def test_quantized_and_inpainting_models_are_refused(forge, tmp_path):
    model = fake_forge_model("sd1", tmp_path)[0]
    model.forge_objects_original.unet.model.storage_dtype = "nf4"
    forge.set_model(model)
    info = ForgeHost(log=quiet).checkpoint_info()
    assert not info.supported and "nf4" in info.message and "Diffusion in Low Bits" in info.message
    model.forge_objects_original.unet.model.storage_dtype = torch.float8_e4m3fn
    assert "float8" in ForgeHost(log=quiet).checkpoint_info().message
    model.forge_objects_original.unet.model.storage_dtype = torch.float16
    model.is_inpaint = True
    assert "inpainting" in ForgeHost(log=quiet).checkpoint_info().message


def test_clean_weights_refreshes_the_original_patchers_under_the_lock(forge, tmp_path):
    model = fake_forge_model("sd1", tmp_path)[0]
    forge.set_model(model)
    held = []
    patchers = [model.forge_objects_original.unet, model.forge_objects_original.clip.patcher,
                model.forge_objects_original.vae.patcher]
    for p in patchers:
        p.refresh_loras = (lambda p=p: (held.append(forge.lock.held), setattr(p, "refreshed", p.refreshed + 1)))
    with ForgeHost(log=quiet).clean_weights():
        pass
    assert [p.refreshed for p in patchers] == [1, 1, 1] and all(held)
    assert model.current_lora_hash == "[]" and not forge.lock.held


def test_exclusive_gpu_loads_the_whole_model_under_the_lock(forge, tmp_path):
    model = fake_forge_model("sd1", tmp_path)[0]
    forge.set_model(model)
    forge.shared.cmd_opts.lowvram = True  # Forge still accepts the flag but manages memory itself
    with ForgeHost(log=quiet).exclusive_gpu():
        assert forge.lock.held and forge.state.job == "lora_trainer"
    (patchers, held), = forge.gpu_loads
    assert held and patchers[0] is model.forge_objects_original.unet
    assert not forge.lock.held


def test_preview_refuses_a_lora_forge_did_not_apply(forge, tmp_path):
    model = fake_forge_model("sd1", tmp_path)[0]
    forge.set_model(model)
    host = ForgeHost(log=quiet)
    lora = forge.lora_dir / "mystyle.safetensors"
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"x")
    with pytest.raises(HostError, match="Forge did not apply mystyle.safetensors"):
        host.preview("red square", "mystyle", 1.0, 1, 4, 64)
    assert host.preview("red square", "mystyle", 0.0, 1, 4, 64).size == (64, 64)  # weight 0 needs no patch
    assert host.preview("red square", None, 1.0, 1, 4, 64).size == (64, 64)
    model.forge_objects_after_applying_lora.unet.lora_patches[(str(lora), 1.0, 1.0, False)] = {"k": [1]}
    assert host.preview("red square", "mystyle", 1.0, 1, 4, 64).size == (64, 64)
    assert "<lora:mystyle:1>" in forge.previews[-1]["kw"]["prompt"]


def test_a_whole_job_trains_on_forge_inference_weights_and_leaves_them_unchanged(forge, tmp_path):
    from lora_trainer.network.kohya_file import read_lora
    from lora_trainer.ui.jobs import JobRunner

    # Forge keeps text encoders in fp16 (embeddings in fp32) even when the UNet is fp32 (always on the CPU)
    model = fake_forge_model("sd1", tmp_path, te_dtype=torch.float16)[0]
    forge.pending = model  # not loaded yet: the job must load it
    objs = model.forge_objects_original
    roots = [objs.unet.model.diffusion_model, objs.vae.first_stage_model, objs.clip.cond_stage_model]
    before = {f"{i}.{k}": v.clone() for i, m in enumerate(roots) for k, v in m.state_dict().items()}
    data = make_images(tmp_path / "data", n=4)
    runner = JobRunner()
    cfg = base_config(train_data_dir=str(data), output_dir=str(tmp_path / "runs"), output_name="forge_style",
                      max_train_steps=3, sample_steps=2, train_text_encoder=True)
    # the preview would need Forge to apply the file; the fake patchers say it did
    model.forge_objects_after_applying_lora.unet.lora_patches[
        (str(forge.lora_dir / "forge_style.safetensors"), 1.0, 1.0, False)] = {"k": [1]}
    runner.start(cfg, ForgeHost(log=quiet))
    assert runner.wait(300)
    st = runner.status()
    assert st["state"] == "finished", st
    sd, meta = read_lora(Path(st["lora_path"]))
    assert Path(st["lora_path"]).parent == forge.lora_dir
    assert any(k.startswith("lora_te_") for k in sd) and any(k.startswith("lora_unet_") for k in sd)
    assert meta["ss_sd_model_name"].startswith("forge-sd1")
    after = {f"{i}.{k}": v for i, m in enumerate(roots) for k, v in m.state_dict().items()}
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # Forge's weights are exactly as before
    assert not any(p.is_inference() for m in roots for p in m.parameters())
    assert forge.gpu_loads and not forge.lock.held


def test_text_encoders_in_another_precision_than_the_unet_get_dtype_guards(tmp_path):
    from lora_trainer.models.base import align_text_encoder_dtypes, encode_prompts
    from lora_trainer.models.tiny import build_tiny

    model = build_tiny("sd1")
    assert align_text_encoder_dtypes(model) == 0  # one precision everywhere: nothing to do
    model.text_encoders[0].half()
    assert align_text_encoder_dtypes(model) == 1 and align_text_encoder_dtypes(model) == 0  # once
    with torch.no_grad():
        embeds, _, _ = encode_prompts(model, ["a red square"])
    assert embeds.dtype == torch.float32  # handed to the fp32 UNet in its dtype

