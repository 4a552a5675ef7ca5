"""Training on the FLUX.1 model Forge has loaded, against fakes laid out like Forge's `Flux` (main @ dfdcbab).

The fake follows backend/diffusion_engine/flux.py and backend/loader.py: the transformer under BFL's names at
forge_objects.unet.model.diffusion_model with `storage_dtype` / `computation_dtype`; fp8 storage casts every
float tensor (norm scales and biases too) to fp8 (loader.py: `model_loader(config).to(dtype=storage_dtype)`);
nf4 storage keeps bitsandbytes-packed uint8 Linear weights with a quant_state and everything else in the
computation dtype; text encoders in a JointTextEncoder (clip_l: IntegratedCLIP around a transformers
CLIPTextModel; t5xxl: IntegratedT5 around Forge's T5 with `shared` and `encoder`); tokenizers at
clip.tokenizer.{clip_l, t5xxl}; the VAE under LDM names with diffusers' config. Every weight is created under
`torch.inference_mode()`, as Forge loads them. The weights are the tiny Flux of models/flux/tiny.py."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_trainer.hosts import HostError
from lora_trainer.hosts.forge import ForgeHost, make_trainable
from lora_trainer.models import ldm_names
from lora_trainer.models.flux import tiny
from lora_trainer.models.flux.bfl_names import diffusers_to_bfl
from lora_trainer.models.flux.loader import transformer_from_bfl
from lora_trainer.models.flux.model import FluxModel, encode_flux_prompts
from lora_trainer.models.low_precision import FrozenLowPrecisionLinear, dequantize_nf4

from conftest import base_config, make_images
from test_hosts_a1111 import module_tree, webui  # noqa: F401  (webui is a fixture)
from test_hosts_forge import FakePatcher, forge  # noqa: F401  (forge is a fixture)

quiet = lambda *_: None  # noqa: E731


class Packed4bit(torch.nn.Parameter):
    """Laid out like bitsandbytes' Params4bit as Forge holds it (ForgeParams4bit): opaque uint8 data, the real
    shape in quant_state. The bytes here are the fp16 weight (2 a weight) so that a CPU test can unpack them."""


def pack(weight: torch.Tensor) -> Packed4bit:
    p = Packed4bit(weight.to(torch.float16).contiguous().view(torch.uint8), requires_grad=False)
    p.quant_state = SimpleNamespace(shape=torch.Size(weight.shape))
    p.bnb_quantized = True
    return p


def unpack(p: Packed4bit) -> torch.Tensor:
    return p.view(torch.float16).view(p.quant_state.shape)


class ForgeT5Stack(torch.nn.Module):
    """Forge's T5 encoder stack takes embeddings positionally: encoder(x)."""

    def __init__(self, hf_encoder):
        super().__init__()
        self.hf = hf_encoder.eval()  # Forge's T5 has no dropout

    def forward(self, x, attention_mask=None):
        return self.hf(inputs_embeds=x).last_hidden_state


def _inference_copy(module: torch.nn.Module) -> torch.nn.Module:
    with torch.inference_mode():
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for k, v in list(store.items()):
                    if v is not None:
                        store[k] = torch.nn.Parameter(v.clone(), False) if isinstance(v, torch.nn.Parameter) \
                            else v.clone()
    return module


def bfl_tensors(components) -> dict:
    t = components["transformer"]
    return diffusers_to_bfl(t.state_dict(), t.config.num_layers, t.config.num_single_layers, t.config.guidance_embeds)


def fake_forge_flux(storage: str = "bf16", kind: str = "Flux", seed: int = 0):
    """(Forge's sd_model, the tiny components it was made from)."""
    comps = tiny.tiny_flux_components(seed)
    sd = bfl_tensors(comps)
    compute = torch.bfloat16
    with torch.inference_mode():
        if storage == "fp8":
            forge_sd = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
        else:
            forge_sd = {k: v.to(compute) for k, v in sd.items()}
        diffusion_model = module_tree(forge_sd)
        if storage == "nf4":  # Linear weights packed, the rest in the computation dtype
            for name, m in diffusion_model.named_modules():
                w = m._parameters.get("weight")
                if w is not None and w.dim() == 2:
                    m._parameters["weight"] = pack(sd[f"{name}.weight"])
    diffusion_model.storage_dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}.get(storage, storage)
    diffusion_model.computation_dtype = compute
    clip_l = torch.nn.Module()
    clip_l.transformer = _inference_copy(comps["text_encoder"]).eval()
    t5 = torch.nn.Module()
    t5.transformer = torch.nn.Module()
    hf_t5 = _inference_copy(comps["text_encoder_2"])
    t5.transformer.shared = hf_t5.shared
    t5.transformer.encoder = ForgeT5Stack(hf_t5.encoder)
    encoders = torch.nn.ModuleDict({"clip_l": clip_l, "t5xxl": t5})
    encoders.__class__ = type("JointTextEncoder", (torch.nn.ModuleDict,), {})
    vae_sd = {k[len("first_stage_model."):]: v for k, v in ldm_names.vae_to_ldm_state_dict(comps["vae"]).items()}
    with torch.inference_mode():
        first_stage = module_tree({k: v.clone() for k, v in vae_sd.items()})
    first_stage.config = dict(comps["vae"].config)
    kmodel = SimpleNamespace(diffusion_model=diffusion_model, storage_dtype=diffusion_model.storage_dtype,
                             computation_dtype=compute)
    objs = SimpleNamespace(unet=FakePatcher(kmodel),
                           clip=SimpleNamespace(cond_stage_model=encoders, patcher=FakePatcher(encoders),
                                                tokenizer=SimpleNamespace(clip_l=comps["tokenizer"],
                                                                          t5xxl=comps["tokenizer_2"])),
                           vae=SimpleNamespace(first_stage_model=first_stage, patcher=FakePatcher(first_stage)))
    model = type(kind, (), {})()
    model.forge_objects_original = objs
    model.forge_objects = SimpleNamespace(unet=objs.unet, clip=objs.clip, vae=objs.vae)
    model.forge_objects_after_applying_lora = SimpleNamespace(unet=FakePatcher(kmodel),
                                                              clip=SimpleNamespace(patcher=FakePatcher(encoders)))
    model.is_inpaint = False
    model.current_lora_hash = "['flux-style.safetensors', 1.0]"
    model.sd_checkpoint_info = SimpleNamespace(title="flux1-tiny.safetensors [abcdef0123]", filename="/m/flux1-tiny.sft",
                                               sha256="abcdef0123" + "0" * 54, name="flux1-tiny.safetensors")
    return model, comps


def reference_model(comps) -> FluxModel:
    model = FluxModel(transformer=comps["transformer"], vae=comps["vae"],
                      text_encoders=[comps["text_encoder"], comps["text_encoder_2"]],
                      tokenizers=[comps["tokenizer"], comps["tokenizer_2"]], noise_scheduler=comps["scheduler"])
    model.freeze()
    return model


def _storages(module: torch.nn.Module) -> set:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def _forge_roots(sd_model):
    objs = sd_model.forge_objects_original
    return [objs.unet.model.diffusion_model, objs.clip.cond_stage_model, objs.vae.first_stage_model]


def _snapshot(sd_model) -> dict:
    out = {}
    for i, root in enumerate(_forge_roots(sd_model)):
        for k, v in root.named_parameters():
            out[f"{i}.{k}"] = (v.dtype, v.detach().clone())
    return out


# ---- recognising Forge's Flux --------------------------------------------------------------------------
@pytest.mark.parametrize("storage,shown", [("bf16", "bfloat16"), ("fp8", "float8_e4m3fn"), ("nf4", "nf4")])
def test_forge_flux_is_a_trainable_family(forge, storage, shown):
    forge.set_model(fake_forge_flux(storage)[0])
    info = ForgeHost(log=quiet).checkpoint_info()
    assert info.supported and info.family == "flux" and shown in info.message
    assert info.describe().startswith("FLUX: flux1-tiny")


def test_gguf_chroma_and_sd3_are_refused_with_what_to_do(forge):
    model = fake_forge_flux("bf16")[0]
    model.forge_objects_original.unet.model.diffusion_model.storage_dtype = "gguf"
    forge.set_model(model)
    info = ForgeHost(log=quiet).checkpoint_info()
    assert not info.supported and "GGUF" in info.message and "bf16, fp8 or nf4" in info.message
    with pytest.raises(HostError, match="GGUF"):
        ForgeHost(log=quiet).loaded_checkpoint()
    for kind in ("Chroma", "StableDiffusion3"):
        forge.set_model(fake_forge_flux("bf16", kind=kind)[0])
        info = ForgeHost(log=quiet).checkpoint_info()
        assert not info.supported and f"{kind} models cannot be trained here yet" in info.message


# ---- the model built on Forge's tensors ----------------------------------------------------------------
def _transformer_out(transformer, dtype, autocast=False):
    kw = tiny.transformer_inputs(transformer)
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return transformer(**kw)[0].float()


def test_bf16_transformer_is_views_of_every_forge_weight(forge):
    sd_model, comps = fake_forge_flux("bf16")
    forge.set_model(sd_model)
    model = ForgeHost(log=quiet).loaded_checkpoint()
    forge_dm = sd_model.forge_objects_original.unet.model.diffusion_model
    forge_ptrs = {p.data_ptr() for p in forge_dm.parameters()}
    forge_storages = _storages(forge_dm)
    params = list(model.transformer.parameters())
    assert params and _storages(model.transformer) <= forge_storages  # no tensor of its own: no second copy
    # every Forge tensor is used, and the unfused ones are the very same tensors
    assert len(_storages(model.transformer)) == len(forge_storages)
    assert sum(p.data_ptr() in forge_ptrs for p in params) >= len(forge_ptrs) - 2 * len(
        [n for n in dict(forge_dm.named_modules()) if n.endswith(("qkv", "linear1"))])
    reference = transformer_from_bfl({k: v.to(torch.bfloat16) for k, v in bfl_tensors(comps).items()})
    assert torch.equal(_transformer_out(model.transformer, torch.bfloat16),
                       _transformer_out(reference, torch.bfloat16))


def test_fp8_transformer_stays_fp8_and_computes_with_upcast_weights(forge):
    sd_model, comps = fake_forge_flux("fp8")
    forge.set_model(sd_model)
    model = ForgeHost(log=quiet).loaded_checkpoint()
    forge_dm = sd_model.forge_objects_original.unet.model.diffusion_model
    layers = [m for m in model.transformer.modules() if isinstance(m, FrozenLowPrecisionLinear)]
    assert layers and {m.weight.dtype for m in layers} == {torch.float8_e4m3fn}
    assert not [m for m in model.transformer.modules() if type(m) is torch.nn.Linear]  # every Linear is fp8
    shared = {p.untyped_storage().data_ptr() for m in layers for p in (m.weight, m.bias)}
    assert shared <= _storages(forge_dm)
    # the only copies: q/k norm scales upcast from fp8 (4 per double block, 2 per single block, head_dim each)
    own = [p for p in model.transformer.parameters() if p.untyped_storage().data_ptr() not in _storages(forge_dm)]
    assert len(own) == 4 * 1 + 2 * 1 and all(p.numel() == tiny.TINY_HEAD_DIM for p in own)
    assert model.compute_dtype == torch.bfloat16
    # fp8 values are exact in bf16: the same computation as a bf16 model of the rounded weights
    rounded = {k: v.to(torch.float8_e4m3fn).to(torch.bfloat16) for k, v in bfl_tensors(comps).items()}
    reference = transformer_from_bfl(rounded)
    assert torch.equal(_transformer_out(model.transformer, torch.bfloat16), _transformer_out(reference, torch.bfloat16))


def test_nf4_transformer_holds_the_packed_weights_and_dequantizes_per_call(forge):
    from lora_trainer.models.flux.live import transformer_from_live

    sd_model, comps = fake_forge_flux("nf4")
    forge.set_model(sd_model)
    forge_dm = sd_model.forge_objects_original.unet.model.diffusion_model
    packed = [p for p in forge_dm.parameters() if isinstance(p, Packed4bit)]
    model = ForgeHost(log=quiet).loaded_checkpoint()
    assert packed and all(isinstance(p, Packed4bit) for p in forge_dm.parameters() if p.dtype == torch.uint8)
    layers = [m for m in model.transformer.modules() if isinstance(m, FrozenLowPrecisionLinear)]
    assert len(layers) == len([m for m in tiny.tiny_transformer().modules() if type(m) is torch.nn.Linear])
    assert {m.weight.data_ptr() for m in layers} == {p.data_ptr() for p in packed}  # the packed data itself
    assert _storages(model.transformer) <= _storages(forge_dm)
    # q, k, v of a fused qkv: one packed tensor, three row ranges
    attn = model.transformer.transformer_blocks[0].attn
    assert attn.to_q.weight is attn.to_k.weight and attn.to_q.rows != attn.to_k.rows
    assert attn.to_q.dequantize is dequantize_nf4  # bitsandbytes' own (test_nf4_with_bitsandbytes_... runs it)
    # what the layers compute, with an unpacker for the stand-in bytes (bitsandbytes' part is the one left out)
    ours = transformer_from_live(forge_dm, torch.bfloat16, dequantize=unpack)
    reference = transformer_from_bfl({k: v.to(torch.float16).to(torch.bfloat16) for k, v in bfl_tensors(comps).items()})
    assert torch.allclose(_transformer_out(ours, torch.bfloat16), _transformer_out(reference, torch.bfloat16),
                          atol=2e-2)


def test_nf4_with_bitsandbytes_matches_the_dequantized_model():
    """Real Params4bit weights (bitsandbytes >= 0.46 quantizes on the CPU; CUDA when there is one)."""
    bnb = pytest.importorskip("bitsandbytes")
    from lora_trainer.models.flux.live import transformer_from_live

    device = "cuda" if torch.cuda.is_available() else "cpu"
    comps = tiny.tiny_flux_components(0)
    sd = {k: v.to(torch.bfloat16).to(device) for k, v in bfl_tensors(comps).items()}
    root = module_tree(dict(sd))
    for name, m in root.named_modules():
        w = m._parameters.get("weight")
        if w is not None and w.dim() == 2:
            m._parameters["weight"] = bnb.nn.Params4bit(w.data.cpu(), requires_grad=False, quant_type="nf4").to(device)
    ours = transformer_from_live(root, torch.bfloat16)
    deq = {k: v for k, v in sd.items()}
    for name, m in root.named_modules():
        w = m._parameters.get("weight")
        if w is not None and hasattr(w, "quant_state"):
            deq[f"{name}.weight"] = bnb.functional.dequantize_4bit(w, quant_state=w.quant_state).to(torch.bfloat16)
    reference = transformer_from_bfl(deq)
    kw = {k: (v.to(device, torch.bfloat16) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor)
          else v for k, v in tiny.transformer_inputs(reference).items()}
    with torch.no_grad():
        assert torch.allclose(ours(**kw)[0].float(), reference(**kw)[0].float(), atol=2e-2)


def test_text_encoders_and_vae_are_forges_and_encode_as_the_pipeline_does(forge):
    sd_model, comps = fake_forge_flux("bf16")
    forge.set_model(sd_model)
    model = ForgeHost(log=quiet).loaded_checkpoint()
    reference = reference_model(comps)
    model.compute_dtype = reference.compute_dtype = torch.float32
    with torch.no_grad():
        seq, pooled = encode_flux_prompts(model, ["a red square", "green"], max_length=16)
        ref_seq, ref_pooled = encode_flux_prompts(reference, ["a red square", "green"], max_length=16)
    assert torch.allclose(seq, ref_seq, atol=1e-5) and torch.allclose(pooled, ref_pooled, atol=1e-5)
    # the VAE holds Forge's tensors, with Flux's latent shift and scale
    first_stage = sd_model.forge_objects_original.vae.first_stage_model
    assert _storages(model.vae) <= _storages(first_stage) and len(list(model.vae.parameters()))
    assert (model.vae.config.scaling_factor, model.vae.config.shift_factor) == (tiny.VAE_SCALE, tiny.VAE_SHIFT)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model.vae.encode(pixels).latent_dist.mean, comps["vae"].encode(pixels).latent_dist.mean,
                              atol=1e-5)
    # Forge's encoders are not adopted: moving or re-flagging our model leaves them alone
    clip = sd_model.forge_objects_original.clip.cond_stage_model["clip_l"].transformer
    assert not list(model.text_encoders[0].parameters()) and next(clip.parameters()).is_inference()
    assert model.text_encoders[1].dtype == torch.float32  # the compute dtype, never an fp8 / packed storage one


def test_train_text_encoder_and_fp8_base_are_explained(forge):
    forge.set_model(fake_forge_flux("fp8")[0])
    host = ForgeHost(log=quiet)
    from lora_trainer.config import ConfigError

    with pytest.raises(ConfigError, match="train_text_encoder"):
        host.prepare_config(base_config(train_text_encoder=True))
    cfg, notes = host.prepare_config(base_config(fp8_base=True, train_text_encoder=False))
    assert not cfg.fp8_base and cfg.mixed_precision == "bf16"
    assert any("float8_e4m3fn" in n for n in notes) and any("bf16" in n for n in notes)
    # nf4 storage and block swap are the CLI's own loading; on Forge its memory manager decides, and the tab says so
    cfg, notes = host.prepare_config(base_config(nf4_base=True, blocks_to_swap=8, train_text_encoder=False))
    assert not cfg.nf4_base and cfg.blocks_to_swap == 0
    assert any(n.startswith("nf4_base") and "float8_e4m3fn" in n for n in notes)
    assert any(n.startswith("blocks_to_swap") and "GPU Weights" in n for n in notes)


# ---- a whole job in the tab's runner --------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["bf16", "fp8"])
def test_a_job_trains_a_kohya_flux_lora_on_forges_model_and_leaves_it_as_it_was(forge, tmp_path, storage):
    from lora_trainer.network.base import create_network
    from lora_trainer.network.kohya_file import read_lora
    from lora_trainer.ui.jobs import JobRunner

    sd_model, comps = fake_forge_flux(storage)
    forge.pending = sd_model  # not loaded yet: the job loads it
    before = _snapshot(sd_model)
    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    cfg = base_config(train_data_dir=str(data), output_dir=str(tmp_path / "runs"), output_name="forge_flux",
                      max_train_steps=3, train_text_encoder=False, max_bucket_reso=64, learning_rate=1e-2,
                      save_precision="fp32", sample_prompts=["red square"], sample_steps=1)
    runner = JobRunner()
    runner.start(cfg, ForgeHost(log=quiet))
    assert runner.wait(300)
    st = runner.status()
    assert st["state"] == "finished", st
    sd, meta = read_lora(Path(st["lora_path"]))
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_sd_model_name"].startswith("flux1-tiny")
    assert meta["ss_fp8_base"] == str(storage == "fp8")  # kohya's record of an fp8 base
    # the same keys (and shapes) as the CLI writes for this transformer
    cli_keys = create_network(reference_model(comps), cfg).state_dict()
    assert sd.keys() == cli_keys.keys() and all(sd[k].shape == cli_keys[k].shape for k in sd)
    assert {v.dtype for v in sd.values()} == {torch.float32}
    assert any(torch.count_nonzero(v) for k, v in sd.items() if k.endswith("lora_up.weight"))
    assert list((tmp_path / "runs").rglob("samples/*.png"))  # our own sampler runs on Forge's model too
    # Forge's model exactly as before: every tensor bit-identical in its dtype, no LoRA layer left in it
    after = _snapshot(sd_model)
    assert after.keys() == before.keys()
    for k, (dtype, value) in before.items():
        assert after[k][0] == dtype and torch.equal(after[k][1].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), k
    assert not any("lora" in n for root in _forge_roots(sd_model) for n, _ in root.named_modules())
    assert forge.gpu_loads and not forge.lock.held


@pytest.mark.parametrize("storage", ["bf16", "fp8"])
def test_the_tab_estimates_memory_on_forges_flux(forge, storage):
    """The tab's Memory line on Forge's loaded Flux: Forge's weights count as resident, in the precision Forge
    stores them (fp8 is 1 byte a weight); the run adds its LoRA, optimizer and activations."""
    from lora_trainer.train.memory_plan import plan_memory

    forge.set_model(fake_forge_flux(storage)[0])
    host = ForgeHost(log=quiet)
    cfg, _ = host.prepare_config(base_config(train_text_encoder=False, resolution=64, max_bucket_reso=64))
    checkpoint = host.loaded_checkpoint()
    plan = plan_memory(checkpoint, cfg, torch.device("cpu"), resident=True)
    e = plan.estimate
    stored = sum(p.numel() * p.element_size() for p in checkpoint.transformer.parameters())
    assert e.resident and e.weights >= stored and e.trainable > 0 and e.activations > 0
    assert e.extra == e.peak - e.weights and "loaded already" in plan.describe()
