"""LoRA targets, kohya key names and the file format, checked against what the hosts and diffusers read."""

import pytest
import torch

from lora_trainer.config import ConfigError
from lora_trainer.models.loader import load_base_model
from lora_trainer.network.kohya_file import file_tensor_hash, read_lora, save_lora
from lora_trainer.network.lora import LoraNetwork
from lora_trainer.network.targets import unet_targets

from conftest import base_config

quiet = dict(log_fn=lambda *_: None)


def _meta_unet(config_name):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from lora_trainer.models.loader import _config

    with init_empty_weights():
        return UNet2DConditionModel(**_config(config_name))


def _meta_clip(hidden, layers, inter, act):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        return CLIPTextModel(CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                                            num_attention_heads=hidden // 64, hidden_act=act))


def test_full_size_module_counts_match_kohya():
    # kohya-format.md: SD1.5 UNet 192 modules, its text encoder 72; SDXL UNet 722, te2 192
    sd1 = unet_targets(_meta_unet("sd1_unet.json"), "sd1", conv_lora=False)
    sdxl = unet_targets(_meta_unet("sdxl_unet.json"), "sdxl", conv_lora=False)
    assert len(sd1) == 192
    assert len(sdxl) == 722
    names = {t.kohya for t in sd1}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_up_blocks_3_attentions_2_proj_out" in names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj" in names
    xl = {t.kohya for t in sdxl}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in xl
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj" in xl
    assert "lora_unet_output_blocks_0_1_proj_in" in xl
    assert not any("down_blocks" in n for n in xl)

    from lora_trainer.network.targets import text_encoder_targets

    te = text_encoder_targets(_meta_clip(768, 12, 3072, "quick_gelu"), "lora_te", "te", used_layers=12)
    assert len(te) == 72
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in {t.kohya for t in te}
    te2 = text_encoder_targets(_meta_clip(1280, 32, 5120, "gelu"), "lora_te2", "te2", used_layers=32)
    assert len(te2) == 192
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc1" in {t.kohya for t in te2}


def test_locon_adds_resnet_and_sampler_convs():
    sd1 = unet_targets(_meta_unet("sd1_unet.json"), "sd1", conv_lora=True)
    names = {t.kohya: t for t in sd1}
    assert names["lora_unet_down_blocks_0_resnets_0_conv1"].conv3x3
    assert names["lora_unet_down_blocks_0_downsamplers_0_conv"].conv3x3
    assert names["lora_unet_up_blocks_0_upsamplers_0_conv"].conv3x3
    assert not names["lora_unet_down_blocks_0_resnets_0_time_emb_proj"].conv3x3
    xl = {t.kohya for t in unet_targets(_meta_unet("sdxl_unet.json"), "sdxl", conv_lora=True)}
    assert "lora_unet_input_blocks_1_0_in_layers_2" in xl
    assert "lora_unet_input_blocks_3_0_op" in xl
    assert "lora_unet_output_blocks_2_2_conv" in xl


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_text_encoder_keys_and_ranks(tiny_files, family):
    model = load_base_model(str(tiny_files[family]), **quiet)
    cfg = base_config(train_text_encoder=True, conv_lora=True, conv_rank=2, conv_alpha=1, lora_alpha=2)
    net = LoraNetwork(model, cfg)
    sd = net.state_dict()
    prefixes = {k.split("_text_model")[0] for k in sd if "_text_model_" in k}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    conv = [k for k in sd if k.endswith("resnets_0_conv1.lora_down.weight") or k.endswith("in_layers_2.lora_down.weight")]
    assert conv and all(sd[k].shape[0] == 2 and sd[k].dim() == 4 for k in conv)
    linear = [k for k in sd if k.endswith("attn1_to_q.lora_down.weight")]
    assert linear and all(sd[k].shape[0] == 4 for k in linear)
    alphas = {float(sd[k.replace("lora_down.weight", "alpha")]) for k in conv}
    assert alphas == {1.0}
    assert {float(sd[k.replace("lora_down.weight", "alpha")]) for k in linear} == {2.0}
    # B starts at zero: a fresh LoRA changes nothing
    assert all(torch.count_nonzero(v) == 0 for k, v in sd.items() if k.endswith("lora_up.weight"))


def _randomize(net):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in net.layers.values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_output_loads_in_diffusers_with_every_key_consumed(tiny_files, tiny_folders, tmp_path, family):
    """diffusers' load_lora_weights reads our file; weight 0 equals the base, weight 1 differs."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:  # diffusers needs transformers >= 4.34 for this; the WebUI pins 4.30.2
        pytest.skip("diffusers' LoRA loader is disabled with this transformers version (covered in the other env)")
    model = load_base_model(str(tiny_files[family]), **quiet)
    net = LoraNetwork(model, base_config(train_text_encoder=True))
    _randomize(net)
    path = save_lora(tmp_path / "x.safetensors", net.state_dict(), {"ss_output_name": "x"}, "fp32")
    n_modules = len(net.layers)

    # low_cpu_mem_usage=False: Forge pins accelerate 0.21, which transformers 4.46 refuses for that path
    pipe = DiffusionPipeline.from_pretrained(str(tiny_folders[family]), safety_checker=None, low_cpu_mem_usage=False)
    torch.manual_seed(0)
    lat = torch.randn(1, 4, 8, 8)

    def unet_out():
        with torch.no_grad():
            ids = pipe.tokenizer(["a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
            out = pipe.text_encoder(ids, output_hidden_states=True)
            if family == "sdxl":
                ids2 = pipe.tokenizer_2(["a red square"], padding="max_length", max_length=77,
                                        return_tensors="pt").input_ids
                out2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
                emb = torch.cat([out.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
                kw = {"added_cond_kwargs": {"text_embeds": out2.text_embeds,
                                            "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}}
            else:
                emb, kw = out.last_hidden_state, {}
            return pipe.unet(lat, torch.tensor([500]), encoder_hidden_states=emb, **kw).sample, emb

    base, base_emb = unet_out()
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    from peft.tuners.lora import LoraLayer

    loaded = sum(isinstance(m, LoraLayer) for c in [pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
                 if c is not None for m in c.modules())
    assert loaded == n_modules  # every module of the file found its place
    with_lora, emb = unet_out()
    assert not torch.allclose(with_lora, base, atol=1e-4)
    assert not torch.allclose(emb, base_emb, atol=1e-5)  # the text-encoder LoRA applies too
    pipe.set_adapters(["x"], adapter_weights=[0.0])
    zero, zero_emb = unet_out()
    assert torch.allclose(zero, base, atol=1e-5)
    assert torch.allclose(zero_emb, base_emb, atol=1e-6)


def test_file_metadata_hash_and_no_silent_overwrite(tiny_files, tmp_path):
    model = load_base_model(str(tiny_files["sd1"]), **quiet)
    net = LoraNetwork(model, base_config())
    _randomize(net)
    first = save_lora(tmp_path / "style.safetensors", net.state_dict(), {"ss_output_name": "style"})
    second = save_lora(tmp_path / "style.safetensors", net.state_dict(), {"ss_output_name": "style"})
    assert first.name == "style.safetensors" and second.name == "style_2.safetensors"
    third = save_lora(tmp_path / "style.safetensors", net.state_dict(), {"ss_output_name": "other"}, overwrite=True)
    assert third == first
    sd, meta = read_lora(first)
    assert meta["sshs_model_hash"] == file_tensor_hash(first)
    assert meta["ss_output_name"] == "other"  # replaced on request
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_init_lora_weights_refuses_other_rank_and_family(tiny_files, tmp_path):
    sd1 = load_base_model(str(tiny_files["sd1"]), **quiet)
    net = LoraNetwork(sd1, base_config(lora_rank=4))
    _randomize(net)
    weights = net.state_dict()
    again = LoraNetwork(load_base_model(str(tiny_files["sd1"]), **quiet), base_config(lora_rank=4))
    again.load_state_dict(weights)
    for k, v in again.state_dict().items():
        assert torch.equal(v, weights[k]), k
    other_rank = LoraNetwork(load_base_model(str(tiny_files["sd1"]), **quiet), base_config(lora_rank=8))
    with pytest.raises(ConfigError, match="rank 4"):
        other_rank.load_state_dict(weights)
    xl = LoraNetwork(load_base_model(str(tiny_files["sdxl"]), **quiet), base_config(lora_rank=4))
    with pytest.raises(ConfigError, match="does not fit this model.*SD1/SD2"):
        xl.load_state_dict(weights)


def test_multiplier_zero_is_the_base_model(tiny_files):
    model = load_base_model(str(tiny_files["sd1"]), **quiet)
    torch.manual_seed(0)
    lat, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = model.unet(lat, torch.tensor([3]), encoder_hidden_states=emb).sample
        net = LoraNetwork(model, base_config())
        _randomize(net)
        changed = model.unet(lat, torch.tensor([3]), encoder_hidden_states=emb).sample
        with net.multiplier(0.0):
            zero = model.unet(lat, torch.tensor([3]), encoder_hidden_states=emb).sample
        net.remove()
        removed = model.unet(lat, torch.tensor([3]), encoder_hidden_states=emb).sample
    assert not torch.allclose(base, changed)
    assert torch.equal(base, zero) or torch.allclose(base, zero, atol=1e-6)
    assert torch.equal(base, removed)
