"""The caption command through `run_caption`, with a tiny random CLIP saved as a transformers folder."""
import argparse
import csv
import io
import sys

import numpy as np
import pytest
from PIL import Image

from lora_trainer.caption import load_vocabulary
from lora_trainer.caption.cli import add_caption_arguments, run_caption
from lora_trainer.caption.testing import save_tiny_clip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return d


def _args(*argv):
    return add_caption_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


def test_cli_sidecar_tags(images, tiny_model, capsys):
    rc = run_caption(_args("--input", images, "--sidecar", "--model", f"hf:{tiny_model}", "--device", "cpu",
                           "--threshold", "0", "--top-k", "3", "--prefix", "mychar", "--batch-size", "2"))
    assert rc == 0
    vocab = set(load_vocabulary().terms)
    for i in range(3):
        tags = (images / f"img{i}.txt").read_text().strip().split(", ")
        assert tags[0] == "mychar" and len(tags) == 4
        assert set(tags[1:]) <= vocab
    out = capsys.readouterr()
    assert "3 written, 0 kept, 0 skipped, 0 failed" in out.out and "images/s" in out.out
    # a second run keeps them and says how to replace them
    before = (images / "img0.txt").read_text()
    assert run_caption(_args("--input", images, "--model", f"hf:{tiny_model}", "--threshold", "0")) == 0
    assert (images / "img0.txt").read_text() == before
    assert "--overwrite replaces them" in capsys.readouterr().out


def test_cli_csv_caption_mode_and_broken_image(images, tiny_model, capsys, tmp_path):
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    out_csv = tmp_path / "out" / "metadata.csv"
    rc = run_caption(_args("-i", images, "-o", out_csv, "--model", f"hf:{tiny_model}", "--mode", "caption",
                           "--prefix", "mychar"))
    assert rc == 1  # one image could not be read; the others are captioned
    rows = list(csv.reader(io.StringIO(out_csv.read_text())))
    assert rows[0] == ["file_name", "caption"]
    assert [r[0] for r in rows[1:]] == ["img0.png", "img1.png", "img2.png"]
    assert all(r[1].startswith("mychar, a p") for r in rows[1:])
    err = capsys.readouterr().err
    assert str(images / "broken.jpg") in err
    assert not list(images.glob("*.txt"))


def test_cli_defaults_to_existing_metadata_csv_and_appends(images, tiny_model, capsys):
    (images / "metadata.csv").write_text('file_name,caption\nimg0.png,"mine, first"\n')
    rc = run_caption(_args("-i", images, "--model", f"hf:{tiny_model}", "--append", "--threshold", "0",
                           "--top-k", "2"))
    assert rc == 0
    rows = dict(list(csv.reader(io.StringIO((images / "metadata.csv").read_text())))[1:])
    assert set(rows) == {"img0.png", "img1.png", "img2.png"}
    parts = rows["img0.png"].split(", ")
    assert parts[:2] == ["mine", "first"] and len(parts) == 4
    assert len(rows["img1.png"].split(", ")) == 2
    assert not list(images.glob("*.txt"))
    # --sidecar beside a metadata.csv works, and says which one training will use
    assert run_caption(_args("-i", images, "--sidecar", "--model", f"hf:{tiny_model}", "--threshold", "0")) == 0
    assert len(list(images.glob("*.txt"))) == 3
    assert "its rows take priority over sidecar files" in capsys.readouterr().err


def test_cli_custom_vocabulary(images, tiny_model, tmp_path):
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "subjects.txt").write_text("# template: a picture of {}\nred thing\nblue thing\n")
    assert run_caption(_args("-i", images, "--sidecar", "--model", f"hf:{tiny_model}", "--vocab", vocab,
                             "--threshold", "0")) == 0
    for i in range(3):
        assert set((images / f"img{i}.txt").read_text().strip().split(", ")) == {"red thing", "blue thing"}


def test_cli_errors(images, tmp_path, capsys, monkeypatch):
    assert run_caption(_args("-i", tmp_path / "missing")) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_caption(_args("-i", tmp_path / "empty")) == 2
    assert "no images in" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "open_clip", None)
    assert run_caption(_args("-i", images, "--model", "open_clip:ViT-B-32/laion2b_s34b_b79k", "--device", "cpu")) == 2
    err = capsys.readouterr().err
    assert "open_clip cannot be imported" in err and "hf:openai/clip-vit-base-patch32" in err
    assert not list(images.glob("*.txt"))
    assert run_caption(_args("-i", images, "--model", f"hf:{tmp_path}", "--device", "cpu")) == 2
    assert "must hold a transformers CLIPModel" in capsys.readouterr().err
    (images / "metadata.csv").write_bytes("file_name,caption\nimg0.png,café\n".encode("latin-1"))
    before = (images / "metadata.csv").read_bytes()
    assert run_caption(_args("-i", images, "--model", f"hf:{tmp_path}")) == 2  # fails before any model load
    assert "cannot be read as a UTF-8 CSV" in capsys.readouterr().err
    assert (images / "metadata.csv").read_bytes() == before
    for bad in (["--overwrite", "--append"], ["--threshold", "1.5"], ["--batch-size", "0"],
                ["--sidecar", "--output", "x.csv"], ["--mode", "poem"]):
        with pytest.raises(SystemExit):
            _args("-i", images, *bad)
