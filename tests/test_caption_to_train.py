"""The caption command writes captions the engine then trains on (one dataset code path)."""
import json

import yaml

from lora_trainer.caption.testing import save_tiny_clip
from lora_trainer.cli import main
from lora_trainer.network.kohya_file import read_lora

from conftest import make_images


def test_autotag_then_train(tiny_files, tmp_path, capsys):
    data = make_images(tmp_path / "data", n=3)
    for txt in data.glob("*.txt"):
        txt.unlink()  # start uncaptioned
    clip = save_tiny_clip(tmp_path / "clip")
    assert main(["caption", "--input", str(data), "--output", str(data / "metadata.csv"), "--model", f"hf:{clip}",
                 "--device", "cpu", "--threshold", "0", "--top-k", "2", "--prefix", "zz_char"]) == 0
    rows = (data / "metadata.csv").read_text().splitlines()
    assert rows[0].startswith("file_name") and len(rows) == 4
    cfg = tmp_path / "tagged.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": str(tiny_files["sd1"]), "train_data_dir": str(data),
                                   "output_dir": str(tmp_path / "out"), "resolution": 64, "min_bucket_reso": 64,
                                   "bucket_reso_steps": 32, "max_bucket_reso": 128, "max_train_steps": 2,
                                   "lora_rank": 4, "log_with": "none"}))
    assert main(["check", str(cfg)]) == 0
    report = capsys.readouterr().out
    assert "zz_char" in report  # the tag table shows the autotagged trigger word
    assert main(["train", str(cfg)]) == 0
    _, meta = read_lora(tmp_path / "out" / "tagged.safetensors")
    freq = json.loads(meta["ss_tag_frequency"])["data"]
    assert freq["zz_char"] == 3 and len(freq) >= 2
