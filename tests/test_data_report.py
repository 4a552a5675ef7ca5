"""The `check` report: counts, duplicates, near-duplicates, small images, tags, exit codes."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from lora_trainer.config import from_dict
from lora_trainer.data import build_report, dataset_report, difference_hash, run_check
from lora_trainer.data.fingerprint import hamming, near_pairs


def pattern(seed: int, size=(192, 128)) -> Image.Image:
    blocks = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.NEAREST)


def config(root: Path, **changes):
    values = dict(train_data_dir=str(root), resolution=128, min_bucket_reso=64, max_bucket_reso=256,
                  bucket_reso_steps=32, batch_size=2, gradient_accumulation_steps=2, epochs=3,
                  output_dir=str(root.parent / "out"))
    values.update(changes)
    return from_dict(values)


def build_folder(tmp_path: Path) -> Path:
    root = tmp_path / "set"
    (root / "3_char").mkdir(parents=True)
    for i in range(4):
        pattern(i).save(root / "3_char" / f"c{i}.png")
        (root / "3_char" / f"c{i}.txt").write_text(f"sks, smile, pose{i % 2}")
    shutil.copy(root / "3_char" / "c0.png", root / "3_char" / "c0_copy.png")            # exact duplicate
    pattern(1).resize((120, 80), Image.LANCZOS).save(root / "3_char" / "c1_small.jpg", quality=90)  # near
    pattern(50, (40, 40)).save(root / "tiny.png")                                      # too small
    pattern(60, (128, 128)).save(root / "plain.png")                                   # no caption
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)              # unreadable
    return root


def test_report_counts_duplicates_sizes_and_tags(tmp_path):
    root = build_folder(tmp_path)
    report = build_report(config(root))
    assert report.usable and report.error is None
    assert report.num_images == 8 and report.num_reg_images == 0
    subsets = {s.folder: (s.subset, s.images, s.repeats) for s in report.subsets}
    assert subsets == {"3_char": ("char", 6, 3), "set": ("set", 2, 1)}
    assert report.samples_per_epoch == 6 * 3 + 2
    assert report.steps_per_epoch == sum(-(-s // 2) for _, _, s in report.buckets)
    assert report.optimizer_steps_per_epoch == -(-report.steps_per_epoch // 2)
    assert report.total_optimizer_steps == 3 * report.optimizer_steps_per_epoch
    assert sum(n for _, n, _ in report.buckets) == 8

    names = lambda paths: sorted(Path(p).name for p in paths)  # noqa: E731
    assert names(report.no_caption) == ["c0_copy.png", "c1_small.jpg", "plain.png", "tiny.png"]
    assert any("broken.png" in line for line in report.unreadable)
    assert [names(g) for g in report.exact_duplicates] == [["c0.png", "c0_copy.png"]]
    near = [sorted((Path(a).name, Path(b).name)) for a, b, _ in report.near_duplicates]
    assert near == [["c1.png", "c1_small.jpg"]]  # the exact copies are not listed again
    assert [Path(p).name for p, _, _ in report.too_small] == ["tiny.png"]
    assert report.top_tags[:2] == [("sks", 4), ("smile", 4)] and ("pose0", 2) in report.top_tags

    text = report.format()
    for expected in ("8 training image(s)", "exact duplicates", "near-duplicates", "too small", "broken.png",
                     "c1_small.jpg", "top tags", "OK: the dataset is usable", "char"):
        assert expected in text
    assert dataset_report(config(root)) == text


def test_report_with_regularization_and_max_train_steps(tmp_path):
    root = tmp_path / "train"
    root.mkdir()
    pattern(1).save(root / "a.png")
    (tmp_path / "reg" / "2_person").mkdir(parents=True)
    pattern(2).save(tmp_path / "reg" / "2_person" / "r.png")
    report = build_report(config(root, reg_data_dir=str(tmp_path / "reg"), max_train_steps=77))
    assert report.num_images == 1 and report.num_reg_images == 1
    assert report.samples_per_epoch == 3 and report.total_optimizer_steps == 77
    assert any(s.is_reg and s.repeats == 2 for s in report.subsets)
    assert "regularization" in report.format()


def test_run_check_exit_codes(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    pattern(3).save(good / "a.png")
    assert run_check(config(good)) == 0
    assert "OK: the dataset is usable" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.jpg").write_bytes(b"junk")
    assert run_check(config(empty)) == 1
    out = capsys.readouterr().out
    assert "UNUSABLE" in out and "x.jpg" in out

    assert run_check(config(tmp_path / "missing")) == 1
    assert "does not exist" in capsys.readouterr().out


def test_difference_hash_separates_different_pictures_and_matches_resized_ones():
    a, b = pattern(10), pattern(11)
    assert hamming(difference_hash(a), difference_hash(a.resize((96, 64)))) <= 3
    assert hamming(difference_hash(a), difference_hash(b)) > 12
    hashes = [difference_hash(pattern(s)) for s in range(30)] + [difference_hash(pattern(5).resize((100, 70)))]
    assert [(i, j) for i, j, _ in near_pairs(hashes, 5)] == [(5, 30)]
