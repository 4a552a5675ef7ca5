"""Caption processing: trigger words, shuffle with kept tags, dropouts, and their determinism."""
from __future__ import annotations

import random
from PIL import Image

from lora_trainer.config import from_dict
from lora_trainer.data import CaptionOptions, build_dataset, process_caption, split_tags
from lora_trainer.data.captions import join_parts, normalize_caption

TAGS = "mychar, 1girl, red hair, blue eyes, smile, outdoors, sky, tree, hat, dress"


def draw(options, seed, caption=TAGS):
    return process_caption(caption, options, random.Random(seed))


def test_prefix_and_suffix_join_without_doubled_commas():
    opts = CaptionOptions(prefix="sks,", suffix=", best quality ")
    assert draw(opts, 0, "a, b") == "sks, a, b, best quality"
    assert draw(opts, 0, "") == "sks, best quality"
    assert draw(CaptionOptions(prefix="sks"), 0, ", a,") == "sks, a"
    assert join_parts(["", "x", ",", "y,"]) == "x, y"


def test_without_shuffle_or_dropout_the_caption_is_untouched():
    assert draw(CaptionOptions(), 1, "1,000 birds over a lake") == "1,000 birds over a lake"


def test_shuffle_keeps_leading_tags_and_the_tag_set():
    opts = CaptionOptions(shuffle=True, keep_tokens=2)
    original = split_tags(TAGS)
    orders = set()
    for seed in range(30):
        tags = split_tags(draw(opts, seed))
        assert tags[:2] == ["mychar", "1girl"]
        assert sorted(tags) == sorted(original)
        orders.add(tuple(tags))
    assert len(orders) > 20


def test_trigger_prefix_is_never_shuffled():
    opts = CaptionOptions(prefix="sks", shuffle=True)
    assert all(draw(opts, s).startswith("sks, ") for s in range(20))


def test_tag_dropout_never_drops_kept_tags_or_the_prefix():
    opts = CaptionOptions(prefix="sks", keep_tokens=1, tag_dropout=0.5)
    lengths = set()
    for seed in range(40):
        tags = split_tags(draw(opts, seed))
        assert tags[:2] == ["sks", "mychar"]
        assert set(tags) <= set(split_tags(TAGS)) | {"sks"}
        lengths.add(len(tags))
    assert len(lengths) > 3
    assert draw(CaptionOptions(keep_tokens=2, tag_dropout=1.0), 0) == "mychar, 1girl"


def test_a_caption_that_starts_with_the_trigger_word_does_not_get_it_twice():
    assert draw(CaptionOptions(prefix="sks, my dog"), 0, "sks, my dog, grass") == "sks, my dog, grass"
    assert draw(CaptionOptions(prefix="sks"), 0, "sksx, grass") == "sks, sksx, grass"  # whole tags only
    opts = CaptionOptions(prefix="sks", keep_tokens=1, shuffle=True)  # keep_tokens counts the caption's own tags
    assert all(split_tags(draw(opts, s, "sks, " + TAGS))[:2] == ["sks", "mychar"] for s in range(10))


def test_caption_dropout_empties_everything():
    assert draw(CaptionOptions(prefix="sks", caption_dropout=1.0), 3) == ""
    results = [draw(CaptionOptions(caption_dropout=0.5), s) for s in range(60)]
    assert 10 < results.count("") < 50


def test_normalize_caption_joins_lines():
    assert normalize_caption(" tags, here,\n\nA sentence.\r\n") == "tags, here, A sentence."


def test_dataset_captions_are_deterministic_in_seed_epoch_index_and_position(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(TAGS)
    values = dict(train_data_dir=str(root), resolution=64, min_bucket_reso=64, shuffle_caption=True,
                  keep_tokens=1, caption_tag_dropout_rate=0.2, caption_prefix="sks", seed=7)
    ds = build_dataset(from_dict(values), log=None)
    again = build_dataset(from_dict(values), log=None)
    other_seed = build_dataset(from_dict({**values, "seed": 8}), log=None)

    grid = [(i, e, p) for i in range(3) for e in range(4) for p in range(3)]
    first = [ds.caption_for(*k) for k in grid]
    assert first == [ds.caption_for(*k) for k in grid] == [again.caption_for(*k) for k in grid]
    assert first != [other_seed.caption_for(*k) for k in grid]
    assert len({ds.caption_for(0, e, 0) for e in range(10)}) > 5   # epochs differ
    assert len({ds.caption_for(0, 0, p) for p in range(10)}) > 5   # repeated draws in one epoch differ
    assert all(c.startswith("sks, mychar") for c in first)
