"""Aspect-ratio buckets and the resize + crop into them."""
from __future__ import annotations

import math
import random

import pytest
from PIL import Image

from lora_trainer.config import from_dict
from lora_trainer.data import Bucketer, BucketSpec, DatasetError, make_buckets, resize_and_crop
from lora_trainer.data.buckets import format_bucket_table

SPEC = BucketSpec(resolution=(512, 512), min_reso=256, max_reso=1024, step=64, no_upscale=False)


def test_buckets_respect_area_limits_and_step():
    buckets = make_buckets(SPEC)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
    assert buckets == sorted(set(buckets))
    assert make_buckets(SPEC) == buckets  # deterministic
    assert all((h, w) in buckets for w, h in buckets)  # portrait and landscape alike


def test_non_square_resolution_and_small_resolution_below_min_bucket():
    wide = make_buckets(BucketSpec(resolution=(768, 512), min_reso=256, max_reso=1024, step=64))
    assert (768, 512) in wide and max(w * h for w, h in wide) <= 768 * 512
    small = make_buckets(BucketSpec(resolution=(128, 128), min_reso=256, max_reso=1024, step=32))
    assert (128, 128) in small and all(w * h <= 128 * 128 for w, h in small)


def test_step_larger_than_resolution_is_an_error():
    with pytest.raises(DatasetError, match="bucket_reso_steps"):
        make_buckets(BucketSpec(resolution=(64, 64), step=128))


@pytest.mark.parametrize("size", [(1000, 1000), (1920, 1080), (1080, 1920), (3000, 1000), (640, 480), (5000, 300)])
def test_each_image_gets_the_bucket_with_the_closest_aspect(size):
    bucketer = Bucketer(SPEC)
    chosen = bucketer.assign(*size)
    target = math.log(size[0] / size[1])
    best = min(abs(math.log(w / h) - target) for w, h in bucketer.buckets)
    assert abs(math.log(chosen[0] / chosen[1]) - target) == pytest.approx(best)
    if size[0] > size[1]:
        assert chosen[0] > chosen[1]


def test_no_upscale_small_image_gets_its_own_bucket_floored_to_the_step():
    bucketer = Bucketer(BucketSpec(resolution=(512, 512), min_reso=256, max_reso=1024, step=64, no_upscale=True))
    assert bucketer.assign(300, 200) == (256, 192)
    assert bucketer.assign(500, 500) == (448, 448)
    assert bucketer.assign(40, 30) == (64, 64)  # never below one step
    big = bucketer.assign(2000, 1500)  # larger than the area: a normal bucket, only ever shrunk into
    assert big in bucketer.buckets and big[0] <= 2000 and big[1] <= 1500
    thin = bucketer.assign(3000, 150)  # the closest normal bucket would need enlarging the short side
    assert thin[1] <= 150 and thin[0] <= 1024 and thin[0] % 64 == 0 and thin[1] % 64 == 0
    upscaling = Bucketer(SPEC)
    assert upscaling.assign(300, 200) in upscaling.buckets


def test_buckets_disabled_means_one_resolution_bucket_with_cover_and_crop():
    cfg = from_dict(dict(resolution="192,128", enable_bucket=False))
    bucketer = Bucketer.from_config(cfg)
    assert bucketer.assign(50, 400) == (192, 128) and bucketer.assign(4000, 300) == (192, 128)
    image, info = resize_and_crop(Image.new("RGB", (50, 400), (9, 9, 9)), (192, 128))
    assert image.size == (192, 128)
    assert info.original_size == (400, 50) and info.target_size == (128, 192)
    assert info.resized_size == (1536, 192) and info.crop_top_left == ((1536 - 128) // 2, 0)


def test_center_crop_keeps_the_middle():
    src = Image.new("RGB", (300, 100), (255, 0, 0))
    src.paste((0, 0, 255), (100, 0, 200, 100))  # blue middle third
    image, info = resize_and_crop(src, (64, 64))
    assert info.resized_size == (64, 192) and info.crop_top_left == (0, 64)
    assert image.getpixel((32, 32)) == (0, 0, 255)


def test_random_crop_is_deterministic_per_seed_and_stays_inside():
    src = Image.new("RGB", (400, 100))
    crops = []
    for seed in range(20):
        _, a = resize_and_crop(src, (64, 64), random.Random(seed))
        _, b = resize_and_crop(src, (64, 64), random.Random(seed))
        assert a == b
        top, left = a.crop_top_left
        assert top == 0 and 0 <= left <= 256 - 64
        crops.append(left)
    assert len(set(crops)) > 5


def test_source_size_keeps_geometry_of_a_reduced_decode():
    full = Image.new("RGB", (800, 600))
    half = Image.new("RGB", (400, 300))
    _, a = resize_and_crop(full, (128, 64))
    image, b = resize_and_crop(half, (128, 64), source_size=(800, 600))
    assert a == b and image.size == (128, 64)


def test_bucket_table_lists_counts():
    table = format_bucket_table([((512, 512), 3, 30), ((640, 384), 1, 10)])
    assert "512 x 512" in table and "640 x 384" in table
    last = table.splitlines()[-1].split()
    assert last[0] == "total" and last[1:] == ["4", "40"]
