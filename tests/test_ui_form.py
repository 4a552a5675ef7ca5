"""The tab's logic without Gradio: the generated form, presets, YAML, dataset and caption tools, the controller."""
import itertools
from pathlib import Path

import pytest

from lora_trainer.config import ConfigError, field_meta, load_yaml
from lora_trainer.hosts.standalone import StandaloneHost
from lora_trainer.ui import dataset_tools as dt
from lora_trainer.ui.controller import INSTALLED, TabController, format_status
from lora_trainer.ui.form import (MANAGED_ELSEWHERE, TEXT_GENERATION_KEYS, advanced_specs, basic_specs, config_to_form, field_specs,
                                  form_to_config)
from lora_trainer.ui.jobs import JobRunner
from lora_trainer.ui.plot import loss_curve
from lora_trainer.config import NETWORK_TYPES
from lora_trainer.ui.form import network_types_text
from lora_trainer.ui.presets import GOALS, TIERS, preset

from conftest import base_config, make_images

quiet = lambda *_: None  # noqa: E731


def test_every_config_key_has_exactly_one_widget():
    keys = [s.key for s in field_specs()]
    assert len(keys) == len(set(keys))
    assert set(keys) | set(MANAGED_ELSEWHERE) | set(TEXT_GENERATION_KEYS) == set(field_meta())
    basic = [s.key for s in basic_specs()]
    assert basic[0] == "output_name" and set(basic) == {k for k, m in field_meta().items() if m["group"] == "basic"}
    assert not set(basic) & {s.key for s in advanced_specs()}
    kinds = {s.key: s.kind for s in field_specs()}
    assert kinds["train_text_encoder"] == "bool" and kinds["optimizer"] == "choice" and kinds["epochs"] == "int"
    assert kinds["learning_rate"] == "text" and kinds["max_train_steps"] == "text"  # optional -> "" means unset


def test_form_round_trip_and_validation():
    cfg = base_config(output_name="x", resolution="768,512", optimizer_args={"betas": [0.9, 0.99]},
                      target_modules=["to_q", "to_k"], sample_prompts=["a red ball", "a blue ball"], max_train_steps=7,
                      caption_prefix="zz, ", lora_alpha=8, v_parameterization=True, max_token_length=150)
    form = config_to_form(cfg)
    assert form["sample_prompts"] == "a red ball\na blue ball" and form["max_train_steps"] == "7"
    back = form_to_config(form)
    for key, value in cfg.to_dict().items():
        if key not in MANAGED_ELSEWHERE and key not in TEXT_GENERATION_KEYS:
            assert getattr(back, key) == value, key
    form["max_train_steps"] = ""
    form["learning_rate"] = "2e-4"
    form["lora_rank"] = 8.0  # gr.Number gives floats
    cfg2 = form_to_config(form, {"train_data_dir": "/data"})
    assert cfg2.max_train_steps is None and cfg2.learning_rate == 2e-4 and cfg2.lora_rank == 8
    assert cfg2.train_data_dir == "/data"
    form["learning_rate"] = "fast"
    with pytest.raises(ConfigError, match="learning_rate"):
        form_to_config(form)
    form["learning_rate"] = "1e-4"
    form["lora_rank"] = 0
    with pytest.raises(ConfigError, match="lora_rank.*too small"):
        form_to_config(form)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", None])
def test_every_preset_is_a_valid_config(family):
    for tier, goal, kind in itertools.product(TIERS, GOALS, NETWORK_TYPES):
        values = preset(tier, goal, family, kind)
        cfg = base_config(**values)  # validates every key and value
        assert cfg.resolution == values["resolution"] and cfg.adapter_type == kind
    assert preset("24 GB+", "style", "sdxl")["resolution"] == 1024
    assert preset("6-8 GB", "character", "sdxl")["train_text_encoder"] is False  # too big for 8 GB on SDXL
    assert preset("6-8 GB", "style", "sd1")["gradient_checkpointing"] is True
    assert preset("24 GB+", "concept", "sd1")["batch_size"] > preset("6-8 GB", "concept", "sd1")["batch_size"]
    with pytest.raises(ValueError, match="unknown goal"):
        preset("16 GB", "landscape", "sd1")
    assert preset("16 GB", "style", "sd1", "lokr")["lokr_factor"] == 8
    with pytest.raises(ValueError, match="unknown network type"):
        preset("16 GB", "style", "sd1", "oft")
    text = network_types_text()  # the tab's one line per type
    assert all(f"**{kind}**" in text for kind in NETWORK_TYPES) and len(text.splitlines()) == 5


def test_dataset_listing_caption_editing_and_bulk_edits(tmp_path):
    data = make_images(tmp_path / "data", n=3)
    (data / "img_02.txt").unlink()
    items = dt.list_dataset(data)
    assert [i.path.name for i in items] == ["img_00.png", "img_01.png", "img_02.png"]
    assert items[0].caption == "red square, simple background, sample 0" and items[2].caption == ""
    assert dt.save_caption(data, data / "img_02.png", "  blue  square,\nnew line ") == "blue square, new line"
    assert (data / "img_02.txt").read_text() == "blue square, new line\n"
    with pytest.raises(dt.DatasetToolError, match="not inside"):
        dt.save_caption(data, tmp_path / "elsewhere.png", "x")
    assert dt.bulk_edit(data, "add", "zztrigger", position="start") == 3
    assert (data / "img_00.txt").read_text().startswith("zztrigger, red square")
    assert dt.bulk_edit(data, "add", "zztrigger") == 0  # already there
    assert dt.bulk_edit(data, "replace", "Simple_Background", "white background") == 2
    assert "white background" in (data / "img_01.txt").read_text()
    assert dt.bulk_edit(data, "remove", "zztrigger") == 3
    assert not any("zztrigger" in p.read_text() for p in data.glob("*.txt"))
    with pytest.raises(dt.DatasetToolError, match="replacement"):
        dt.bulk_edit(data, "replace", "a", "")
    assert not list(data.glob(".*tmp*"))
    assert dt.default_prompt(data, "zz") == "zz, red square, white background, sample 0"


def test_metadata_csv_datasets_are_edited_in_the_csv(tmp_path):
    data = make_images(tmp_path / "data", n=2)
    for p in data.glob("*.txt"):
        p.unlink()
    (data / "metadata.csv").write_text("file_name,caption\nimg_00.png,a cat\nimg_01.png,a dog\n")
    assert [i.caption for i in dt.list_dataset(data)] == ["a cat", "a dog"]
    dt.save_caption(data, data / "img_01.png", "a big dog")
    assert "img_01.png,a big dog" in (data / "metadata.csv").read_text()
    assert not list(data.glob("*.txt"))  # training reads the CSV first: no sidecar that would be ignored


def test_import_uploads_keeps_names_and_never_overwrites(tmp_path):
    src = make_images(tmp_path / "src", n=2)
    (src / "notes.pdf").write_bytes(b"%PDF")

    class Upload:  # Gradio 3 hands tempfile objects with .name; Gradio 4 plain paths
        def __init__(self, p):
            self.name = str(p)

    files = [Upload(src / "img_00.png"), str(src / "img_00.txt"), str(src / "img_01.png"), str(src / "notes.pdf")]
    folder, n, skipped = dt.import_uploads(files, tmp_path / "ds")
    assert n == 2 and sorted(p.name for p in folder.iterdir()) == ["img_00.png", "img_00.txt", "img_01.png"]
    assert skipped and "notes.pdf" in skipped[0]
    folder, n, _ = dt.import_uploads([str(src / "img_00.png"), str(src / "img_00.txt")], tmp_path / "ds")
    assert n == 1 and (folder / "img_00_2.png").is_file() and (folder / "img_00_2.txt").is_file()
    # an upload that arrived empty (Upload pressed while a live A1111's browser still sent it) is not copied
    empty = tmp_path / "partial"
    empty.mkdir()
    (empty / "img_09.png").write_bytes(b"")
    (empty / "img_09.txt").write_text("a caption")
    folder, n, skipped = dt.import_uploads([str(empty / "img_09.png"), str(empty / "img_09.txt")], tmp_path / "ds")
    assert n == 0 and not (folder / "img_09.png").exists() and not (folder / "img_09.txt").exists()
    assert skipped == ["img_09.png: the file arrived empty (its upload had not finished); choose it again",
                       "img_09.txt: its image arrived empty"]


def test_loss_curve_and_status_text():
    assert loss_curve([]) is None
    img = loss_curve([(1, 0.5), (2, 0.4), (3, 0.45), (4, float("nan"))], total_steps=10)
    assert img.size == (560, 220)
    assert img.getpixel((10, 10)) == (255, 255, 255) and len(img.getcolors(1 << 20)) > 3  # something is drawn
    assert "idle" in format_status({"state": "idle"})
    text = format_status({"state": "running", "name": "s", "step": 5, "total_steps": 20, "epoch": 2, "loss": 0.1234,
                          "it_per_s": 2.5, "eta_s": 6})
    assert "step 5/20 (25%)" in text and "loss 0.1234" in text and "2.50 it/s" in text and "ETA 0:00:06" in text
    assert "error: boom" in format_status({"state": "failed", "name": "s", "error": "boom"})


def test_controller_yaml_is_the_cli_yaml(tiny_files, tmp_path):
    data = make_images(tmp_path / "data", n=2)
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "Lora", work_dir=tmp_path / "runs", log=quiet)
    ctl = TabController(host, JobRunner())
    values = config_to_form(base_config(output_name="yaml_style", max_train_steps=3, caption_prefix="zz"))
    msg = ctl.save_yaml(values, str(data), str(tmp_path / "cfg" / "my"))
    path = tmp_path / "cfg" / "my.yaml"
    assert path.is_file() and "Load YAML" in msg and "python -m" not in msg  # tab words, not a terminal command
    cfg = load_yaml(path)  # exactly what `python -m lora_trainer train --config` reads
    assert cfg.base_model == str(tiny_files["sd1"]) and cfg.train_data_dir == str(data)
    assert cfg.output_name == "yaml_style" and cfg.max_train_steps == 3 and cfg.caption_prefix == "zz"
    form, folder, msg = ctl.load_yaml(str(path))
    assert folder == str(data) and form["output_name"] == "yaml_style" and "loaded" in msg
    form2, _, _ = ctl.load_yaml(data=path.read_bytes())
    assert form2 == form
    (tmp_path / "bad.yaml").write_text("lora_rnk: 4\n")
    form, folder, msg = ctl.load_yaml(str(tmp_path / "bad.yaml"))
    assert form is None and "did you mean 'lora_rank'" in msg
    assert "enter a file path" in ctl.save_yaml(values, str(data), " ")


def test_controller_dataset_captions_and_preview_guards(tiny_files, tmp_path):
    data = make_images(tmp_path / "data", n=3)
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "Lora", work_dir=tmp_path / "runs", log=quiet)
    ctl = TabController(host, JobRunner())
    gallery, choices, msg = ctl.load_dataset(str(data))
    assert len(gallery) == 3 and choices == ["img_00.png", "img_01.png", "img_02.png"] and "3 image(s)" in msg
    assert gallery[0][0].size[0] <= 256 and gallery[0][1].startswith("red square")
    assert "not a folder" in ctl.load_dataset(str(tmp_path / "nope"))[2]
    assert ctl.caption_of(str(data), "img_01.png") == "green square, simple background, sample 1"
    assert "saved" in ctl.save_caption(str(data), "img_01.png", "edited caption")
    assert (data / "img_01.txt").read_text().strip() == "edited caption"
    assert "select an image" in ctl.save_caption(str(data), "", "x")
    assert "3 caption(s) changed" in ctl.bulk_edit(str(data), "add", "zz", "", "start")
    report = ctl.check_dataset(config_to_form(base_config()), str(data))
    assert "3 training image(s)" in report and "OK: the dataset is usable" in report
    folder, msg = ctl.import_uploads([str(data / "img_00.png")], "my set")
    assert Path(folder) == host.work_dir() / "datasets" / "my_set" and "copied 1 image" in msg
    image, msg, params = ctl.generate("x", "", INSTALLED, 1.0, 1, 2, "64")
    assert image is None and "choose a LoRA" in msg and params == ""
    image, msg, _ = ctl.generate("x", "nope", INSTALLED, 1.0, 1, 2, "64")
    assert image is None and "no LoRA named" in msg
    image, msg, _ = ctl.generate("x", "nope", INSTALLED, 1.0, 1, 2, "big")
    assert image is None and "size" in msg
    assert ctl.checkpoint_choices() == [INSTALLED]
    assert "nothing is running" in ctl.stop()
    assert "not started" in ctl.start(config_to_form(base_config()), "")[0]


def test_autotag_through_the_controller_with_a_tiny_clip(tiny_files, tmp_path):
    pytest.importorskip("transformers")
    from lora_trainer.caption.testing import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    data = make_images(tmp_path / "data", n=2)
    for p in data.glob("*.txt"):
        p.unlink()
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "Lora", log=quiet)
    ctl = TabController(host, JobRunner())
    assert "clip" in ctl.taggers()
    msg = ctl.autotag(str(data), "clip-hf", f"hf:{clip}", 0.0, "zztrigger", "tags", "overwrite")
    assert "2 written" in msg, msg
    for p in sorted(data.glob("*.txt")):
        assert p.read_text().startswith("zztrigger, ")
    assert "is not a folder" in ctl.autotag(str(tmp_path / "nope"), "clip-hf", f"hf:{clip}", 0.3, "", "tags", "keep")


def test_the_starting_preset_fits_the_machine(tmp_path):
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.controller import TabController
    from lora_trainer.ui.jobs import JobRunner
    from lora_trainer.ui.presets import tier_for

    gib = 2**30
    assert tier_for("cpu", None) == "CPU / test"
    assert [tier_for("cuda", n * gib) for n in (6, 8, 12, 16, 24, 80)] == \
        ["6-8 GB", "6-8 GB", "10-12 GB", "16 GB", "24 GB+", "24 GB+"]
    host = StandaloneHost(None, tmp_path / "Lora", device="cpu", log=lambda *_: None)
    assert host.device_memory() == ("cpu", None)
    assert TabController(host, JobRunner()).starting_tier() == "CPU / test"  # not the 16 GB GPU preset
