"""Building the tab with the installed Gradio (3.41 in the A1111 environment, 4.x in Forge's)."""
import pytest

gr = pytest.importorskip("gradio")

from lora_trainer.config import field_meta  # noqa: E402
from lora_trainer.hosts.standalone import StandaloneHost  # noqa: E402
from lora_trainer.ui import build_tab  # noqa: E402
from lora_trainer.ui.form import MANAGED_ELSEWHERE, TEXT_GENERATION_KEYS  # noqa: E402
from lora_trainer.ui.jobs import JobRunner  # noqa: E402


def _elem_ids(blocks) -> dict:
    out = {}
    for block in blocks.blocks.values():
        eid = getattr(block, "elem_id", None)
        if eid:
            out.setdefault(eid, []).append(block)
    return out


def test_tab_builds_with_a_widget_per_config_key(tiny_files, tmp_path):
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "Lora", log=lambda *_: None)
    tab = build_tab(host, JobRunner())
    assert isinstance(tab, gr.Blocks)
    ids = _elem_ids(tab)
    assert all(len(v) == 1 for v in ids.values()), [k for k, v in ids.items() if len(v) > 1]
    for key in field_meta():
        if key in TEXT_GENERATION_KEYS:  # the image tab has no text-generation fields
            assert f"lora_trainer_cfg_{key}" not in ids, key
        elif key not in MANAGED_ELSEWHERE:
            assert f"lora_trainer_cfg_{key}" in ids, key
            widget = ids[f"lora_trainer_cfg_{key}"][0]
            assert "_" not in widget.label and f"YAML key: {key}" in widget.info  # words; the key in the tooltip
            assert "text-generation" not in widget.info, key
    for eid in ("lora_trainer_base_info", "lora_trainer_dataset_dir", "lora_trainer_gallery", "lora_trainer_autotag",
                "lora_trainer_caption", "lora_trainer_bulk_btn", "lora_trainer_preset", "lora_trainer_yaml_save",
                "lora_trainer_start", "lora_trainer_stop", "lora_trainer_resume", "lora_trainer_status",
                "lora_trainer_loss", "lora_trainer_weight", "lora_trainer_generate", "lora_trainer_sweep",
                "lora_trainer_ckpt_pick", "lora_trainer_base_path"):
        assert eid in ids, eid
    weight = ids["lora_trainer_weight"][0]
    assert (weight.minimum, weight.maximum) == (0.0, 1.5)
    assert "SD1" in ids["lora_trainer_base_info"][0].value
    # labels are unique (A1111 stores UI defaults by label; duplicates would collide there)
    labels = [getattr(b, "label", None) for b in tab.blocks.values() if getattr(b, "label", None)]
    assert len(labels) == len(set(labels)), sorted(lbl for lbl in labels if labels.count(lbl) > 1)
    # the basic fields start from the preset, with a run folder under the host's work dir
    assert ids["lora_trainer_cfg_output_dir"][0].value == str(host.work_dir())
    assert ids["lora_trainer_cfg_output_name"][0].value == "my_lora"


def test_tab_builds_for_a_host_without_a_model(tmp_path):
    host = StandaloneHost(None, tmp_path / "Lora", log=lambda *_: None)
    tab = build_tab(host, JobRunner())
    ids = _elem_ids(tab)
    assert "--base_model" in ids["lora_trainer_base_info"][0].value
