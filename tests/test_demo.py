"""`demo`: trains offline on the bundled images, says only true things afterwards, and `--export-base` gives a
person the tiny base model (with its .yaml) to try their own images on."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from lora_trainer.cli import main
from lora_trainer.demo import demo_data_dir


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_demo_trains_and_its_hint_points_at_what_exists(tmp_path, capsys, monkeypatch, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "demo"
    assert main(["demo", "--output_dir", str(out_dir), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert (out_dir / "demo_sd1.safetensors").is_file() and "<lora:demo_sd1:0.8>" in out
    assert torch.get_num_threads() == 1  # the tiny model runs on one thread (ten times faster on a busy CPU)
    hint = out[out.index("This LoRA fits the tiny demo model only."):]
    base = out_dir / "base_model" / "tiny-sd1.safetensors"
    assert f"{base} (with tiny-sd1.yaml beside it" in hint
    assert base.is_file() and base.with_suffix(".yaml").is_file()
    # every path the hint names exists, except the placeholders a person fills in
    for token in re.findall(r"(?<![\w<])/[^\s,()']+", hint):
        assert Path(token).exists(), token
    # the command it gives trains, on the file it names
    command = next(line for line in hint.splitlines() if "lora_trainer train --base_model" in line)
    args = shlex.split(command.strip())[3:]
    args[args.index("YOUR_IMAGES")] = str(demo_data_dir())
    args[args.index("--output_dir") + 1] = str(tmp_path / "mine")
    assert main(args + ["--max_train_steps", "1", "--log_with", "none"]) == 0
    assert list((tmp_path / "mine").glob("*.safetensors"))


def test_demo_hint_names_the_example_config_where_there_is_one(tmp_path, capsys, monkeypatch, threads):
    from lora_trainer.demo import demo_config, next_steps

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sdxl_concept.yaml").write_text("base_model: x\n")
    monkeypatch.chdir(tmp_path)
    cfg = demo_config(tmp_path / "demo", family="sdxl", steps=1)
    hint = next_steps(cfg, "sdxl")
    assert f"python -m lora_trainer train --config {Path('configs') / 'sdxl_concept.yaml'}" in hint
    # an installed package without the repository's configs/ beside it: no config file is named
    (tmp_path / "configs" / "sdxl_concept.yaml").unlink()
    import lora_trainer.demo as demo

    monkeypatch.setattr(demo, "__file__", str(tmp_path / "site-packages" / "lora_trainer" / "demo.py"))
    hint = next_steps(cfg, "sdxl")
    assert "configs" not in hint and "--base_model CHECKPOINT --train_data_dir YOUR_IMAGES" in hint


def test_export_base_writes_a_model_with_its_yaml_that_trains(tmp_path, capsys, threads):
    target = tmp_path / "models" / "my-tiny.safetensors"
    assert main(["demo", "--export-base", str(target)]) == 0
    out = capsys.readouterr().out
    assert target.is_file() and target.with_suffix(".yaml").is_file()
    assert target.stat().st_mode & 0o777 == target.with_suffix(".yaml").stat().st_mode & 0o777  # not owner-only
    assert str(target) in out and "my-tiny.yaml" in out and "keep the two together" in out
    assert not (tmp_path / "output").exists()  # no training
    # the same weights the demo trains on
    from safetensors.torch import load_file

    from lora_trainer.models.tiny import ensure_tiny_model

    demo_base = ensure_tiny_model(tmp_path / "demo_base", "sd1")
    a, b = load_file(str(target)), load_file(str(demo_base))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # copied elsewhere with its yaml, it is a base_model a person can use offline
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for f in (target, target.with_suffix(".yaml")):
        (moved / f.name).write_bytes(f.read_bytes())
    assert main(["train", "--base_model", str(moved / target.name), "--train_data_dir", str(demo_data_dir()),
                 "--resolution", "64", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
                 "--log_with", "none"]) == 0
    capsys.readouterr()

    # a folder gets tiny-<family>.safetensors; existing files are never replaced
    assert main(["demo", "--export-base", str(tmp_path / "folder"), "--family", "sdxl"]) == 0
    assert (tmp_path / "folder" / "tiny-sdxl.safetensors").is_file()
    assert (tmp_path / "folder" / "tiny-sdxl.yaml").is_file()
    capsys.readouterr()
    assert main(["demo", "--export-base", str(target)]) == 2
    assert "exists already" in capsys.readouterr().err


def test_demo_rewrites_a_base_model_whose_yaml_is_gone(tmp_path):
    from lora_trainer.models.tiny import ensure_tiny_model

    path = ensure_tiny_model(tmp_path, "sd1")
    path.with_suffix(".yaml").unlink()
    assert ensure_tiny_model(tmp_path, "sd1") == path and path.with_suffix(".yaml").is_file()


def test_readme_says_what_the_demo_does():
    from lora_trainer.demo import DEMO_STEPS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"`demo` trains {DEMO_STEPS} steps" in readme
    assert "demo --export-base models/tiny-sd1.safetensors" in readme
