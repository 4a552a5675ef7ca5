"""Scanning: every folder layout and caption source, and how bad input is reported."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.config import from_dict
from lora_trainer.data import DatasetError, LatentCache, build_dataset, scan_dataset


def make_image(path: Path, size=(96, 64), seed=0, fmt=None) -> Path:
    """A small blocky picture (distinct per seed), saved in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize(size, Image.NEAREST).save(path, fmt)
    return path


def config(root: Path, **changes):
    values = dict(train_data_dir=str(root), resolution=128, min_bucket_reso=64, max_bucket_reso=256,
                  bucket_reso_steps=32, output_dir=str(root.parent / "out"))
    values.update(changes)
    return from_dict(values)


def by_name(items):
    return {item.path.name: item for item in items}


def test_flat_folder_any_case_extensions_hidden_and_other_files_skipped(tmp_path):
    root = tmp_path / "flat"
    make_image(root / "A.PNG", seed=1)
    make_image(root / "b.jpeg", seed=2, fmt="JPEG")
    make_image(root / "c.WebP", seed=3, fmt="WEBP")
    make_image(root / "d.bmp", seed=4)
    make_image(root / "e.JPG", seed=5, fmt="JPEG")
    make_image(root / ".hidden.png", seed=6)
    make_image(root / ".thumbs" / "f.png", seed=7)
    (root / "notes.md").write_text("not an image")

    result = scan_dataset(config(root, num_repeats=3))

    items = by_name(result.items)
    assert sorted(items) == ["A.PNG", "b.jpeg", "c.WebP", "d.bmp", "e.JPG"]
    assert all(i.caption == "" and i.caption_source == "none" for i in items.values())
    assert all(i.repeats == 3 and not i.is_reg and i.loss_weight == 1.0 for i in items.values())
    assert items["A.PNG"].subset == "flat" and (items["A.PNG"].width, items["A.PNG"].height) == (96, 64)
    assert result.problems == []


def test_sidecar_captions_with_default_and_custom_extension(tmp_path):
    root = tmp_path / "side"
    make_image(root / "a.png", seed=1)
    (root / "a.txt").write_text("1girl, smile\n", encoding="utf-8")
    make_image(root / "b.png", seed=2)
    (root / "b.png.txt").write_text("  line one\nline two  \n")  # tool-style double extension, two lines
    make_image(root / "c.png", seed=3)
    (root / "c.caption").write_text("other extension")

    items = by_name(scan_dataset(config(root)).items)
    assert items["a.png"].caption == "1girl, smile" and items["a.png"].caption_source == "sidecar"
    assert items["b.png"].caption == "line one, line two"
    assert items["c.png"].caption == "" and items["c.png"].caption_source == "none"

    custom = by_name(scan_dataset(config(root, caption_extension="caption")).items)
    assert custom["c.png"].caption == "other extension"
    assert custom["a.png"].caption == ""


def test_metadata_csv_with_header_and_quoted_commas_beats_sidecar(tmp_path):
    root = tmp_path / "csvh"
    make_image(root / "a.png", seed=1)
    (root / "a.txt").write_text("sidecar loses")
    make_image(root / "b.png", seed=2)
    (root / "b.txt").write_text("sidecar for b")
    make_image(root / "sub" / "c.png", seed=3)
    (root / "metadata.csv").write_text('file_name,caption\na.png,"red hair, blue eyes"\n'
                                       'sub/c.png,"a ""quoted"" word"\n', encoding="utf-8")

    items = by_name(scan_dataset(config(root)).items)
    assert items["a.png"].caption == "red hair, blue eyes" and items["a.png"].caption_source == "metadata"
    assert items["b.png"].caption == "sidecar for b" and items["b.png"].caption_source == "sidecar"
    assert items["c.png"].caption == 'a "quoted" word'


def test_metadata_csv_without_header_unquoted_commas_and_bom(tmp_path):
    root = tmp_path / "csvn"
    make_image(root / "a.png", seed=1)
    make_image(root / "b.jpg", seed=2, fmt="JPEG")
    (root / "metadata.csv").write_text("\ufeffa.png,red hair, blue eyes\n\nb.jpg,plain\n", encoding="utf-8")

    items = by_name(scan_dataset(config(root)).items)
    assert items["a.png"].caption == "red hair, blue eyes"
    assert items["b.jpg"].caption == "plain"


def test_metadata_path_with_text_column_absolute_rows_and_missing_files(tmp_path):
    root = tmp_path / "imgs"
    make_image(root / "a.png", seed=1)
    outside = make_image(tmp_path / "elsewhere" / "x.png", seed=2)
    csv_path = tmp_path / "meta" / "captions.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(f"file_name,text,score\na.png,from hf layout,5\n{outside},outside the folder,1\n"
                        f"missing.png,gone,0\n")

    result = scan_dataset(config(root, metadata_path=str(csv_path)))
    items = by_name(result.items)
    assert items["a.png"].caption == "from hf layout"  # not "from hf layout,5": score is its own column
    assert items["x.png"].caption == "outside the folder" and items["x.png"].path == outside
    assert any("missing.png" in p and "not found" in p and "line 4" in p for p in result.problems)


def test_metadata_path_alone_uses_exactly_the_listed_files(tmp_path):
    folder = tmp_path / "listed"
    make_image(folder / "a.png", seed=1)
    make_image(folder / "unlisted.png", seed=2)
    (folder / "list.csv").write_text("a.png,only me\n")
    cfg = from_dict(dict(metadata_path=str(folder / "list.csv"), resolution=128, min_bucket_reso=64))
    items = by_name(scan_dataset(cfg).items)
    assert list(items) == ["a.png"] and items["a.png"].caption == "only me"


def test_configured_metadata_path_that_does_not_exist(tmp_path):
    root = tmp_path / "d"
    make_image(root / "a.png")
    with pytest.raises(DatasetError, match="metadata_path.*does not exist"):
        scan_dataset(config(root, metadata_path=str(tmp_path / "nope.csv")))


def test_repeat_folders_nested_folders_and_zero_repeats(tmp_path):
    root = tmp_path / "kohya"
    make_image(root / "10_mychar" / "a.png", seed=1)
    make_image(root / "10_mychar" / "outfits" / "2020_old" / "b.png", seed=2)  # only the top level counts
    make_image(root / "3_style" / "c.png", seed=3)
    make_image(root / "plain" / "deep" / "d.png", seed=4)
    make_image(root / "e.png", seed=5)
    make_image(root / "0_disabled" / "f.png", seed=6)

    result = scan_dataset(config(root, num_repeats=2))
    items = by_name(result.items)
    assert sorted(items) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert (items["a.png"].repeats, items["a.png"].subset, items["a.png"].source_dir) == (10, "mychar", "10_mychar")
    assert (items["b.png"].repeats, items["b.png"].subset) == (10, "mychar")
    assert (items["c.png"].repeats, items["c.png"].subset) == (3, "style")
    assert (items["d.png"].repeats, items["d.png"].subset) == (2, "plain")
    assert (items["e.png"].repeats, items["e.png"].subset) == (2, "kohya")
    assert any("0_disabled" in p and "0 repeats" in p for p in result.problems)

    ds = build_dataset(config(root, num_repeats=2), log=None)
    assert ds.num_samples == 10 + 10 + 3 + 2 + 2


def test_year_like_repeat_folder_gets_a_note(tmp_path):
    root = tmp_path / "y"
    make_image(root / "2024_trip" / "a.png")
    result = scan_dataset(config(root))
    assert result.items[0].repeats == 2024
    assert any("2024_trip" in n and "rename" in n for n in result.notes)


def test_regularization_folder_is_flagged_weighted_and_not_scanned_twice(tmp_path):
    root = tmp_path / "train"
    make_image(root / "5_me" / "a.png", seed=1)
    make_image(root / "reg" / "1_person" / "r1.png", seed=2)  # reg folder inside the train folder
    make_image(root / "reg" / "1_person" / "r2.png", seed=3)
    (root / "reg" / "1_person" / "r1.txt").write_text("a person")

    cfg = config(root, reg_data_dir=str(root / "reg"), reg_weight=0.5)
    items = by_name(scan_dataset(cfg).items)
    assert sorted(items) == ["a.png", "r1.png", "r2.png"]
    assert not items["a.png"].is_reg and items["a.png"].loss_weight == 1.0
    assert items["r1.png"].is_reg and items["r1.png"].loss_weight == 0.5 and items["r1.png"].subset == "person"
    assert items["r1.png"].caption == "a person"


def test_output_and_cache_folders_inside_the_dataset_are_skipped(tmp_path):
    root = tmp_path / "d"
    make_image(root / "a.png", seed=1)
    make_image(root / "out" / "sample_001.png", seed=2)  # previews the trainer wrote
    LatentCache(root / "anywhere" / "latents")
    make_image(root / "anywhere" / "latents" / "stray.png", seed=3)

    items = by_name(scan_dataset(config(root, output_dir=str(root / "out"))).items)
    assert list(items) == ["a.png"]


def test_unsupported_picture_types_are_mentioned(tmp_path):
    root = tmp_path / "d"
    make_image(root / "a.png")
    make_image(root / "b.gif", fmt="GIF")
    (root / "c.heic").write_bytes(b"\0" * 10)
    result = scan_dataset(config(root))
    assert len(result.items) == 1
    assert any(".gif" in n and ".heic" in n for n in result.notes)


def test_broken_files_are_reported_by_name_and_skipped(tmp_path):
    root = tmp_path / "d"
    make_image(root / "good.png", seed=1)
    make_image(root / "good.jpg", size=(200, 150), seed=2, fmt="JPEG")
    (root / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    full = (root / "good.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(full[: len(full) // 2])
    png = make_image(tmp_path / "whole.png", size=(120, 90), seed=3).read_bytes()
    (root / "cut.png").write_bytes(png[: len(png) - 40])
    (root / "empty.webp").write_bytes(b"")

    logged = []
    ds = build_dataset(config(root), log=logged.append)
    assert sorted(i.path.name for i in ds.items) == ["good.jpg", "good.png"]
    problems = "\n".join(ds.problems)
    for name in ("garbage.jpg", "cut.jpg", "cut.png", "empty.webp"):
        assert name in problems
    assert "truncated" in next(p for p in ds.problems if "cut.jpg" in p)
    assert "not a readable image" in next(p for p in ds.problems if "garbage.jpg" in p)
    assert any("cut.jpg" in line for line in logged)
    for i in range(len(ds.items)):  # the rest still load
        assert ds.load_sample(i)["pixels"].shape[0] == 3


def test_empty_folder_error_says_what_was_looked_for_and_where(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "readme.txt").write_text("nothing here")
    with pytest.raises(DatasetError) as info:
        build_dataset(config(root), log=None)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(root) in message
    for expected in (".jpg", ".png", ".webp", "metadata.csv", ".txt", "N_name"):
        assert expected in message


def test_folder_of_only_broken_files_lists_them_in_the_error(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "x.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match=r"x\.png: not a readable image"):
        build_dataset(config(root), log=None)


def test_only_regularization_images_is_an_error(tmp_path):
    root = tmp_path / "train"
    root.mkdir()
    make_image(tmp_path / "reg" / "a.png")
    with pytest.raises(DatasetError, match="Only regularization images"):
        build_dataset(config(root, reg_data_dir=str(tmp_path / "reg")), log=None)


def test_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="train_data_dir: .*does not exist"):
        scan_dataset(config(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="train_data_dir is not set"):
        scan_dataset(from_dict({}))
    root = tmp_path / "d"
    make_image(root / "a.png")
    with pytest.raises(DatasetError, match="reg_data_dir: .*does not exist"):
        scan_dataset(config(root, reg_data_dir=str(tmp_path / "noreg")))
