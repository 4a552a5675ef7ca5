"""CLIP backends: our preprocessing, the transformers backend on a tiny random CLIP, open_clip's adapter."""
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.caption import ClipTagger, TaggerUnavailable, load_backend, load_vocabulary
from lora_trainer.caption.backends import (CLIP_MEAN, CLIP_STD, OpenClipBackend, TransformersClipBackend,
                                           parse_model_spec, preprocess_images)
from lora_trainer.caption.testing import save_tiny_clip, tiny_clip_backend


@pytest.fixture(scope="module")
def backend():
    return tiny_clip_backend(seed=0)


def _noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# --- preprocessing ---------------------------------------------------------------------------------------

def test_preprocess_resizes_short_side_and_centre_crops():
    # 96x32 with the centre third white: the short side is already 32, so only the centre crop happens
    arr = np.zeros((32, 96, 3), dtype=np.uint8)
    arr[:, 32:64] = 255
    out = preprocess_images([Image.fromarray(arr)], 32)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[0, :, 16, 16], white, atol=1e-5)
    assert torch.allclose(out[0].amin(dim=(1, 2)), white, atol=1e-5)  # the crop is exactly the white third
    # a grey, portrait, RGBA image is converted and resized to the square
    grey = Image.new("RGBA", (40, 80), (128, 128, 128, 255))
    out = preprocess_images([grey], 16)
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert out.shape == (1, 3, 16, 16)
    assert torch.allclose(out[0].mean(dim=(1, 2)), expected, atol=1e-4)


def test_preprocess_matches_transformers_clip_image_processor():
    from transformers import CLIPImageProcessor

    reference = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = [_noise(64, 40, 1), _noise(33, 70, 2), _noise(32, 32, 3)]
    ours = preprocess_images(images, 32)
    theirs = reference(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())


# --- the transformers backend on the tiny model ----------------------------------------------------------

def test_backend_embeddings_reproduce_clipmodel_logits(backend):
    """Our image/text features give the same image-text logits as CLIPModel's own forward."""
    texts = ["a picture of cat", "a picture, soft lighting, in the evening", "a picture"]
    images = [_noise(48, 32, 4), _noise(32, 64, 5)]
    ours = backend.logit_scale * backend.encode_images(images) @ backend.encode_texts(texts).T
    tokens = backend.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = backend.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                            pixel_values=preprocess_images(images, 32))
    assert ours.shape == (2, 3)
    assert torch.allclose(ours, out.logits_per_image, atol=1e-4)
    emb = backend.encode_images(images)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_tiny_clip_tagger_end_to_end(backend):
    tagger = ClipTagger(backend)
    vocab = load_vocabulary()
    images = [_noise(40, 40, s) for s in range(5)]
    batched = tagger.tag(images)
    one_by_one = [tagger.tag([im])[0] for im in images]
    assert len(batched) == 5
    for scored, single in zip(batched, one_by_one):
        assert len(scored) == len(vocab)
        scores = [s for _, s in scored]
        assert scores == sorted(scores, reverse=True)  # ranked by score
        assert all(0.0 < s < 1.0 for s in scores)
        for category in vocab.categories:
            assert sum(s for t, s in scored if t in category.terms) < 1.0
        # batching and padding change nothing
        assert dict(scored) == pytest.approx(dict(single), abs=1e-5)
    assert dict(batched[0]) != pytest.approx(dict(batched[1]), abs=1e-4)  # the image matters
    # the same seed gives the same tagger
    again = ClipTagger(tiny_clip_backend(seed=0)).tag(images[:1])[0]
    assert dict(again) == pytest.approx(dict(batched[0]), abs=1e-6)
    assert tagger.input_size == 32


def test_hf_folder_loads_through_model_spec(tmp_path, backend):
    folder = save_tiny_clip(tmp_path / "tiny", seed=0)
    loaded = load_backend(f"hf:{folder}", device="cpu")
    assert isinstance(loaded, TransformersClipBackend)
    assert loaded.image_size == 32 and loaded.logit_scale == pytest.approx(backend.logit_scale)
    image = [_noise(50, 30, 9)]
    assert torch.allclose(loaded.encode_images(image), backend.encode_images(image), atol=1e-5)
    assert torch.allclose(loaded.encode_texts(["a cat"]), backend.encode_texts(["a cat"]), atol=1e-5)


def test_preprocessor_config_overrides_normalisation(tmp_path):
    folder = save_tiny_clip(tmp_path / "tiny", seed=1)
    (folder / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "crop_size": {"height": 32, "width": 32}}')
    loaded = TransformersClipBackend.from_pretrained(str(folder))
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)


def test_hf_folder_without_a_model_is_an_actionable_error(tmp_path):
    with pytest.raises(TaggerUnavailable, match="must hold a transformers CLIPModel"):
        load_backend(f"hf:{tmp_path}", device="cpu")
    with pytest.raises(TaggerUnavailable, match="needs a model id"):
        load_backend("hf:", device="cpu")


def test_the_tiny_clip_is_saved_without_pickle_and_a_refused_bin_says_what_to_do(tmp_path, monkeypatch):
    from lora_trainer.caption.testing import tiny_clip_model

    folder = save_tiny_clip(tmp_path / "tiny")
    assert [p.name for p in folder.glob("*.bin")] == [] and any(folder.glob("*.safetensors"))
    # AUTOMATIC1111 wraps torch.load: a .bin written by a newer torch is refused and None comes back, which
    # transformers reports as "'NoneType' object has no attribute ..."
    pickled = tmp_path / "pickled"
    model = tiny_clip_model(0)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            (pickled / name).write_bytes((folder / name).read_bytes())
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)
    with pytest.raises(TaggerUnavailable, match=r"pickled \.bin, which a WebUI's safe loader may refuse: save "
                                                r"the model as model\.safetensors"):
        TransformersClipBackend.from_pretrained(str(pickled))


def test_hub_download_failure_is_actionable(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", offline)
    with pytest.raises(TaggerUnavailable) as err:
        load_backend("hf:someone/clip-model", device="cpu")
    message = str(err.value)
    assert "couldn't connect" in message and "HF_ENDPOINT" in message and "HF_HUB_OFFLINE=1" in message
    assert "`hf download someone/clip-model`" in message


def test_model_spec_parsing():
    assert parse_model_spec(None) == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert parse_model_spec("ViT-L-14/openai") == ("open_clip", "ViT-L-14", "openai")
    assert parse_model_spec("open_clip:ViT-B-16") == ("open_clip", "ViT-B-16", None)
    assert parse_model_spec("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") == \
        ("open_clip", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)
    assert parse_model_spec("ViT-B-32//data/w.bin") == ("open_clip", "ViT-B-32", "/data/w.bin")
    assert parse_model_spec("hf:openai/clip-vit-base-patch32") == ("hf", "openai/clip-vit-base-patch32", None)


# --- open_clip: its absence, its download failures, and the adapter (with a stand-in module) ------------

def test_open_clip_missing_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(TaggerUnavailable) as err:
        load_backend("open_clip:ViT-B-32/laion2b_s34b_b79k", device="cpu")
    message = str(err.value)
    assert "pip install -c keep-torch.txt open_clip_torch" in message and "torchvision" in message
    assert "hf:openai/clip-vit-base-patch32" in message


def _fake_open_clip(fail_with=None):
    """A stand-in for the open_clip module: same calls, a tiny transformers CLIP underneath."""
    module = types.ModuleType("open_clip")
    calls = {}
    tiny = tiny_clip_backend(seed=2)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(100.0), dtype=torch.float32))
            self.visual = types.SimpleNamespace(image_size=(32, 32))

        def encode_image(self, pixels):
            return tiny.model.visual_projection(tiny.model.vision_model(pixel_values=pixels).pooler_output) * 3.0

        def encode_text(self, ids):
            return tiny.model.text_projection(tiny.model.text_model(input_ids=ids).pooler_output) * 2.0

    def create_model_and_transforms(name, pretrained=None, device="cpu"):
        calls["create"] = (name, pretrained, device)
        if fail_with is not None:
            raise fail_with
        return Model(), None, lambda im: preprocess_images([im], 32)[0]

    def get_tokenizer(name):
        calls["tokenizer"] = name
        return lambda texts: tiny.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]

    module.create_model_and_transforms = create_model_and_transforms
    module.get_tokenizer = get_tokenizer
    module.list_models = lambda: ["ViT-B-32", "ViT-L-14"]
    module.list_pretrained_tags_by_model = lambda m: ["openai", "laion2b_s34b_b79k"]
    return module, calls, tiny


def test_open_clip_adapter_calls_the_library_and_normalises(monkeypatch):
    module, calls, tiny = _fake_open_clip()
    monkeypatch.setitem(sys.modules, "open_clip", module)
    backend = load_backend("ViT-B-32/laion2b_s34b_b79k", device="cpu")
    assert isinstance(backend, OpenClipBackend)
    assert calls == {"create": ("ViT-B-32", "laion2b_s34b_b79k", "cpu"), "tokenizer": "ViT-B-32"}
    assert backend.logit_scale == pytest.approx(100.0, rel=1e-5) and backend.image_size == 32
    images = [_noise(40, 60, 1), _noise(32, 32, 2)]
    emb = backend.encode_images(images)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(emb, tiny.encode_images(images), atol=1e-5)  # the scale factor is normalised away
    assert torch.allclose(backend.encode_texts(["a cat", "a dog"]), tiny.encode_texts(["a cat", "a dog"]), atol=1e-4)
    tags = ClipTagger(backend).tag(images)
    assert len(tags) == 2 and tags[0][0][1] >= tags[0][-1][1]


def test_open_clip_download_failure_is_actionable(monkeypatch):
    module, _, _ = _fake_open_clip(fail_with=OSError("We couldn't connect to 'https://huggingface.co'"))
    monkeypatch.setitem(sys.modules, "open_clip", module)
    with pytest.raises(TaggerUnavailable) as err:
        load_backend("ViT-B-32/laion2b_s34b_b79k", device="cpu")
    message = str(err.value)
    assert "couldn't connect" in message and "HF_HOME" in message and "HF_ENDPOINT" in message
    assert "local weights file" in message and "hf:openai/clip-vit-base-patch32" in message


def test_open_clip_unknown_names_list_the_choices(monkeypatch):
    module, calls, _ = _fake_open_clip()
    monkeypatch.setitem(sys.modules, "open_clip", module)
    with pytest.raises(TaggerUnavailable, match="no model 'ViT-Q-99'.*ViT-B-32"):
        load_backend("ViT-Q-99/openai", device="cpu")
    with pytest.raises(TaggerUnavailable, match="no pretrained weights 'laion9'.*available: openai, laion2b"):
        load_backend("ViT-B-32/laion9", device="cpu")
    assert "create" not in calls  # nothing was downloaded for a name that cannot exist
