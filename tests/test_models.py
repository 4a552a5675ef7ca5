"""Loading base models: family detection, single file vs diffusers folder, sharing the state dict's tensors."""
import os
import re

import pytest
import torch

from lora_trainer.models.base import encode_prompts
from lora_trainer.models.loader import (ModelLoadError, build_from_ldm_state_dict, detect_family, load_base_model,
                                        read_checkpoint)
from lora_trainer.models.tiny import tiny_ldm_state_dict
from lora_trainer.models.tokenizer import clip_tokenizer

quiet = dict(log_fn=lambda *_: None)


def test_tokenizer_from_open_clip_bpe_matches_clip_ids():
    tok = clip_tokenizer()
    # the ids OpenAI's CLIP vocabulary gives (BOS, a, photo, of, a, cat, ",", EOS)
    assert tok("a photo of a cat,")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 267, 49407]
    assert len(tok) == 49408
    assert clip_tokenizer(pad_token="!").pad_token_id == 0  # "!" is the first symbol of the vocabulary


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_detection_and_v_prediction(tiny_files, family):
    messages = []
    model = load_base_model(str(tiny_files[family]), log_fn=messages.append)
    assert model.family == family
    assert model.v_prediction == (family == "sd2")
    assert model.noise_scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert any(family.upper() in m and "detected" in m for m in messages)
    assert len(model.text_encoders) == (2 if family == "sdxl" else 1)


def test_wrong_family_option_is_refused(tiny_files):
    with pytest.raises(ModelLoadError, match="SDXL"):
        load_base_model(str(tiny_files["sdxl"]), family="sd1", **quiet)


def test_not_a_checkpoint_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="no UNet weights"):
        load_base_model(str(path), **quiet)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(str(tmp_path / "missing.safetensors"), **quiet)


def test_ckpt_is_loaded_without_unpickling_code(tmp_path):
    sd, _ = tiny_ldm_state_dict("sd1")
    good = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd}, good)
    assert detect_family(read_checkpoint(good)) == "sd1"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "x": Evil()}, bad)
    with pytest.raises(ModelLoadError, match="cannot be loaded safely"):
        read_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_state_dict_loader_shares_every_tensor(family):
    sd, original = tiny_ldm_state_dict(family)
    model = build_from_ldm_state_dict(sd, original_config=original, **quiet)
    storages = {v.untyped_storage().data_ptr() for v in sd.values()}
    params = [p for m in [model.unet, model.vae, *model.text_encoders] for p in m.parameters()]
    assert params and all(p.untyped_storage().data_ptr() in storages for p in params)
    # a change to the host's tensor is seen by our module (same memory, not a copy)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    with torch.no_grad():
        sd[key].add_(1.0)
    assert torch.equal(model.unet.conv_in.weight, sd[key])


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_state_dict_loader_adds_no_copy_of_the_weights():
    sd, original = tiny_ldm_state_dict("sd1")
    weights_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    # Eight models on the same tensors: copies would add 8x the weights (~110 MB), sharing only module overhead.
    before = _rss_bytes()
    models = [build_from_ldm_state_dict(sd, original_config=original, **quiet) for _ in range(8)]
    grown = _rss_bytes() - before
    assert len(models) == 8
    assert grown < 2 * weights_bytes, (grown, weights_bytes)


def test_single_file_and_diffusers_folder_give_the_same_model(tiny_files, tiny_folders):
    for family in ("sd1", "sd2", "sdxl"):
        a = load_base_model(str(tiny_files[family]), **quiet)
        b = load_base_model(str(tiny_folders[family]), **quiet)
        assert b.family == family and b.v_prediction == a.v_prediction
        torch.manual_seed(0)
        lat = torch.randn(1, 4, 8, 8)
        with torch.no_grad():
            ea, pa, _ = encode_prompts(a, ["a red square"])
            eb, pb, _ = encode_prompts(b, ["a red square"])
            assert torch.allclose(ea, eb, atol=1e-6)
            kw = {}
            if family == "sdxl":
                kw = {"added_cond_kwargs": {"text_embeds": pa, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}}
            oa = a.unet(lat, torch.tensor([10]), encoder_hidden_states=ea, **kw).sample
            ob = b.unet(lat, torch.tensor([10]), encoder_hidden_states=eb, **kw).sample
        assert torch.allclose(oa, ob, atol=1e-5)


def test_long_prompts_are_encoded_in_75_token_chunks(tiny_files):
    model = load_base_model(str(tiny_files["sd1"]), **quiet)
    short, _, _ = encode_prompts(model, ["red"])
    long_text = ", ".join(["red square"] * 60)  # ~180 tokens -> 3 chunks
    emb, _, truncated = encode_prompts(model, [long_text])
    assert short.shape[1] == 77 and emb.shape[1] == 3 * 77 and truncated == 0
    emb, _, truncated = encode_prompts(model, [", ".join(["red square"] * 120)], max_token_length=225)
    assert emb.shape[1] == 225 + 6 and truncated == 1
    assert re.match(r"sd1", model.family)
