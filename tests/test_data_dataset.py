"""The Dataset API the trainer uses: epochs, samples, cache keys, the latent cache."""
from __future__ import annotations

import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.config import from_dict
from lora_trainer.data import DatasetError, ImageLoadError, LatentCache, build_dataset, latent_cache_for, scan_dataset
from lora_trainer.data.cache import decode_safetensors, encode_safetensors


def make_image(path: Path, size, seed=0, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize(size, Image.NEAREST).save(path, fmt)
    return path


def config(root: Path, **changes):
    values = dict(train_data_dir=str(root), resolution=128, min_bucket_reso=64, max_bucket_reso=256,
                  bucket_reso_steps=32, batch_size=3, seed=11, output_dir=str(root.parent / "out"))
    values.update(changes)
    return from_dict(values)


@pytest.fixture
def mixed(tmp_path) -> Path:
    """11 images in three aspect groups and two repeat folders."""
    root = tmp_path / "mixed"
    sizes = [(160, 160), (150, 140), (200, 100), (210, 110), (100, 200), (96, 192)]
    for i, size in enumerate(sizes):
        make_image(root / "4_main" / f"m{i}.png", size, seed=i)
    for i, size in enumerate(sizes[:5]):
        make_image(root / "2_extra" / f"e{i}.png", size, seed=100 + i)
    return root


def test_epoch_batches_are_deterministic_pure_and_complete(mixed):
    cfg = config(mixed)
    ds = build_dataset(cfg, log=None)
    batches = ds.epoch_batches(0)
    assert batches == ds.epoch_batches(0) == build_dataset(cfg, log=None).epoch_batches(0)
    assert batches != ds.epoch_batches(1)
    assert batches != build_dataset(config(mixed, seed=12), log=None).epoch_batches(0)
    batches[0].append(999)  # callers get copies
    assert 999 not in ds.epoch_batches(0)[0]

    for epoch in range(3):
        batches = ds.epoch_batches(epoch)
        counts = Counter(i for b in batches for i in b)
        assert counts == {i: item.repeats for i, item in enumerate(ds.items)}
        assert sum(len(b) for b in batches) == ds.num_samples == 6 * 4 + 5 * 2
        short = Counter()
        for batch in batches:
            assert len({ds.items[i].bucket for i in batch}) == 1  # one bucket per batch
            assert 1 <= len(batch) <= 3
            if len(batch) < 3:
                short[ds.items[batch[0]].bucket] += 1
        assert all(n <= 1 for n in short.values())  # only a bucket's last batch is short
        assert len(batches) == ds.steps_per_epoch


def test_load_sample_shapes_range_and_sdxl_sizes(mixed):
    ds = build_dataset(config(mixed), log=None)
    for index, item in enumerate(ds.items):
        sample = ds.load_sample(index, epoch=0, position=0)
        w, h = item.bucket
        pixels = sample["pixels"]
        assert pixels.shape == (3, h, w) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0 and pixels.max() > pixels.min()
        assert sample["original_size"] == (item.height, item.width)
        assert sample["target_size"] == (h, w)
        assert len(sample["crop_top_left"]) == 2
    assert ds.cacheable
    a, b = ds.load_sample(2, 0, 0), ds.load_sample(2, 5, 9)  # no randomness: every draw is the same
    assert torch.equal(a["pixels"], b["pixels"])


def test_random_crop_and_flip_vary_by_draw_but_are_reproducible(tmp_path):
    root = tmp_path / "d"
    make_image(root / "wide.png", (400, 130), seed=3)
    logged = []
    cfg = config(root, random_crop=True, flip_aug=True, bucket_no_upscale=False)
    ds = build_dataset(cfg, log=logged.append)
    assert not ds.cacheable
    assert sum("make every draw of an image different" in line for line in logged) == 1
    draws = [ds.load_sample(0, epoch=e, position=p) for e in range(3) for p in range(4)]
    again = [build_dataset(cfg, log=None).load_sample(0, epoch=e, position=p) for e in range(3) for p in range(4)]
    assert all(torch.equal(x["pixels"], y["pixels"]) and x["crop_top_left"] == y["crop_top_left"]
               for x, y in zip(draws, again))
    assert len({d["crop_top_left"] for d in draws}) > 3
    assert len({d["pixels"].numpy().tobytes() for d in draws}) > 3


def test_flip_mirrors_the_picture_and_its_crop_position(tmp_path):
    root = tmp_path / "d"
    make_image(root / "a.png", (300, 100), seed=5)
    ds = build_dataset(config(root, flip_aug=True, bucket_no_upscale=False), log=None)
    draws = [ds.load_sample(0, epoch=0, position=p)["pixels"] for p in range(16)]
    plain = [d for d in draws if torch.equal(d, draws[0])]
    mirrored = [d for d in draws if not torch.equal(d, draws[0])]
    assert plain and mirrored
    assert all(torch.equal(torch.flip(draws[0], dims=[2]), m) for m in mirrored)


def test_exif_rotated_photo_is_trained_upright(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (256, 128), (200, 10, 10)).save(root / "phone.jpg", "JPEG", exif=exif.tobytes())
    ds = build_dataset(config(root), log=None)
    item = ds.items[0]
    assert (item.width, item.height) == (128, 256) and item.bucket[1] > item.bucket[0]
    sample = ds.load_sample(0)
    assert sample["original_size"] == (256, 128) and sample["pixels"].shape[1] > sample["pixels"].shape[2]


def test_large_jpeg_decoded_at_reduced_scale_matches_a_full_decode(tmp_path):
    root = tmp_path / "d"
    photo = make_image(root / "photo.jpg", (1200, 900), seed=4, fmt="JPEG")
    ds = build_dataset(config(root), log=None)
    sample = ds.load_sample(0)
    w, h = ds.items[0].bucket
    with Image.open(photo) as im:
        full = im.convert("RGB")
    scale = max(w / 1200, h / 900)
    size = (max(w, round(1200 * scale)), max(h, round(900 * scale)))
    top, left = sample["crop_top_left"]
    reference = np.asarray(full.resize(size, Image.LANCZOS).crop((left, top, left + w, top + h)), np.float32)
    ours = (sample["pixels"].permute(1, 2, 0).numpy() + 1.0) * 127.5
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).mean() < 4.0


def test_a_file_replaced_after_the_scan_is_reported(tmp_path):
    root = tmp_path / "d"
    make_image(root / "a.png", (100, 100), seed=1)
    ds = build_dataset(config(root), log=None)
    make_image(root / "a.png", (100, 60), seed=1)
    with pytest.raises(ImageLoadError, match="changed since the dataset was scanned"):
        ds.load_sample(0)
    (root / "a.png").unlink()
    with pytest.raises(ImageLoadError, match="file not found"):
        ds.cache_key(0)


def test_cache_keys_are_stable_and_follow_content_and_settings(tmp_path, mixed):
    cfg = config(mixed)
    ds = build_dataset(cfg, log=None)
    keys = [ds.cache_key(i) for i in range(len(ds.items))]
    assert len(set(keys)) == len(keys)
    assert keys == [build_dataset(cfg, log=None).cache_key(i) for i in range(len(ds.items))]

    moved = tmp_path / "moved"
    shutil.copytree(mixed, moved)
    assert [build_dataset(config(moved), log=None).cache_key(i) for i in range(len(keys))] == keys

    assert build_dataset(config(mixed, alpha_background="black"), log=None).cache_key(0) != keys[0]
    assert build_dataset(config(mixed, resolution=64, min_bucket_reso=64), log=None).cache_key(0) != keys[0]

    target = ds.items[0].path
    make_image(target, (160, 160), seed=999)  # same name and size, different picture
    assert ds.cache_key(0) != keys[0]
    assert build_dataset(cfg, log=None).cache_key(0) != keys[0]


def test_duplicated_files_share_a_cache_key(tmp_path):
    root = tmp_path / "d"
    make_image(root / "a.png", (100, 100), seed=1)
    shutil.copy(root / "a.png", root / "copy.png")
    ds = build_dataset(config(root), log=None)
    assert ds.cache_key(0) == ds.cache_key(1)


def test_latent_cache_in_memory_and_on_disk(tmp_path):
    memory = LatentCache(None)
    latent = torch.randn(4, 16, 24)
    memory.put("k1", latent)
    assert "k1" in memory and "k2" not in memory and len(memory) == 1
    assert torch.equal(memory.get("k1"), latent) and memory.get("k2") is None

    folder = tmp_path / "cache"
    disk = LatentCache(folder)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        disk.put(f"key-{str(dtype)[6:]}", latent.to(dtype))
    assert len(disk) == 3 and "key-float16" in disk and "nope" not in disk
    reopened = LatentCache(folder)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        value = reopened.get(f"key-{str(dtype)[6:]}")
        assert value.dtype == dtype and torch.equal(value, latent.to(dtype))
    assert not list(folder.glob(".*.tmp*"))  # atomic writes leave no temporaries behind

    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00")
    assert reopened.get("broken") is None
    with pytest.raises(ValueError, match="cache key"):
        disk.put("../escape", latent)


def test_cache_files_are_real_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    latent = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    LatentCache(tmp_path).put("abc", latent)
    loaded = safetensors_torch.load_file(str(tmp_path / "abc.safetensors"))
    assert torch.equal(loaded["latent"], latent)
    theirs = safetensors_torch.save({"x": latent.half(), "y": torch.tensor([True, False])})
    ours = decode_safetensors(theirs)
    assert torch.equal(ours["x"], latent.half()) and ours["y"].tolist() == [True, False]
    assert torch.equal(decode_safetensors(encode_safetensors({"e": torch.zeros(0, 3)}))["e"], torch.zeros(0, 3))


def test_latent_cache_for_config(tmp_path):
    base = dict(train_data_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    assert latent_cache_for(from_dict({**base, "cache_latents": False})) is None
    assert latent_cache_for(from_dict({**base, "flip_aug": True})) is None
    assert latent_cache_for(from_dict(base)).folder is None
    disk = latent_cache_for(from_dict({**base, "cache_latents_to_disk": True}), namespace="vae123")
    assert disk.folder == tmp_path / "out" / "cache" / "latents" / "vae123" and disk.folder.is_dir()


def test_tag_frequency_and_dataset_dirs(tmp_path):
    root = tmp_path / "d"
    make_image(root / "5_me" / "a.png", (64, 64), seed=1)
    (root / "5_me" / "a.txt").write_text("sks, red hair, smile")
    make_image(root / "5_me" / "b.png", (64, 64), seed=2)
    (root / "5_me" / "b.txt").write_text("sks, smile, smile")
    make_image(root / "c.png", (64, 64), seed=3)
    (root / "c.txt").write_text("landscape")
    make_image(tmp_path / "reg" / "r.png", (64, 64), seed=4)
    (tmp_path / "reg" / "r.txt").write_text("a person")
    ds = build_dataset(config(root, reg_data_dir=str(tmp_path / "reg")), log=None)
    assert ds.tag_frequency() == {"5_me": {"sks": 2, "smile": 2, "red hair": 1}, "d": {"landscape": 1}}
    assert ds.dataset_dirs() == {"5_me": {"n_repeats": 5, "img_count": 2}, "d": {"n_repeats": 1, "img_count": 1}}
    assert ds.dataset_dirs(is_reg=True) == {"reg": {"n_repeats": 1, "img_count": 1}}


def test_verify_excludes_images_that_only_fail_when_decoded(tmp_path):
    root = tmp_path / "d"
    make_image(root / "good.png", (100, 100), seed=1)
    bad = make_image(root / "bad.png", (100, 100), seed=2)
    data = bytearray(bad.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 4:idat + 6] = b"\x00\x00"  # breaks the zlib stream; the file still ends properly
    bad.write_bytes(bytes(data))

    ds = build_dataset(config(root, num_repeats=2), log=None)
    assert len(ds.items) == 2 and ds.num_samples == 4  # the header-only scan cannot see it
    logged = []
    assert ds.verify(log=logged.append) == 1
    assert any("bad.png" in p for p in ds.problems) and any("bad.png" in line for line in logged)
    assert ds.num_samples == 2
    good = next(i for i, item in enumerate(ds.items) if item.path.name == "good.png")
    assert all(i == good for b in ds.epoch_batches(0) for i in b)
    with pytest.raises(DatasetError, match="every training image failed"):
        ds.exclude(good, "test")


def test_build_dataset_logs_summary_problems_and_bucket_table(mixed):
    (mixed / "broken.jpg").write_bytes(b"xx")
    logged = []
    ds = build_dataset(config(mixed), log=logged.append)
    text = "\n".join(logged)
    assert "11 training image(s)" in text and f"{ds.num_samples} samples per epoch" in text
    assert "broken.jpg" in text and "no caption for 11 image(s)" in text
    assert ds.bucket_table() in text
    for (w, h), (n, s) in ds.bucket_counts().items():
        assert f"{w} x {h}" in ds.bucket_table()
    assert sum(n for n, _ in ds.bucket_counts().values()) == 11


def test_dataset_survives_pickling_for_worker_processes(mixed):
    ds = build_dataset(config(mixed), log=None)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.epoch_batches(3) == ds.epoch_batches(3)
    assert torch.equal(clone.load_sample(1)["pixels"], ds.load_sample(1)["pixels"])


def test_scan_items_carry_what_the_trainer_needs(mixed):
    item = scan_dataset(config(mixed)).items[0]
    for name in ("path", "caption", "repeats", "is_reg", "loss_weight", "subset", "width", "height", "bucket"):
        assert hasattr(item, name)
    assert isinstance(item.path, Path)
