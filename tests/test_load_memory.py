"""Loading holds one copy of the weights: a single-file checkpoint is read tensor by tensor and each tensor is
converted to the training precision as it is read; the trainer's casts then change nothing on the CPU.
(bench/bench_load_memory.py measures the same at SD 1.5 / SDXL size.)"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_trainer.models.loader import ModelLoadError, load_base_model, read_checkpoint, training_dtypes
from lora_trainer.models.tiny import tiny_ldm_state_dict

quiet = dict(log_fn=lambda *_: None)
VAE = "first_stage_model."


def _fp16_file(path: Path) -> tuple[Path, dict]:
    sd, _ = tiny_ldm_state_dict("sd1")
    sd = {k: v.half() for k, v in sd.items()}
    sd["model_ema.decay"] = torch.tensor(0.999)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(64, 64)
    save_file(sd, str(path))
    return path, sd


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_tensors_are_converted_as_they_are_read(tmp_path, suffix):
    path, sd = _fp16_file(tmp_path / "m.safetensors")
    if suffix == ".ckpt":
        path = tmp_path / "m.ckpt"
        torch.save({"state_dict": sd, "global_step": 7}, path)
    got = read_checkpoint(path, training_dtypes(torch.bfloat16))
    assert set(got) == {k for k in sd if not k.startswith("model_ema.")}  # the EMA copy is not kept
    for key, value in got.items():
        want = torch.float32 if key.startswith(VAE) else torch.bfloat16
        assert value.dtype == want, key
        assert torch.equal(value, sd[key].to(want)), key
    # each tensor owns its memory (no view into one buffer that would live until the last tensor is freed)
    storages = {v.untyped_storage().data_ptr() for v in got.values() if v.numel()}
    assert len(storages) == sum(1 for v in got.values() if v.numel())
    # without a dtype every tensor is as stored
    plain = read_checkpoint(path)
    assert all(plain[k].dtype == torch.float16 and torch.equal(plain[k], sd[k]) for k in got)


def test_safetensors_reader_reads_what_safetensors_writes(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2, 2).bfloat16(),
               "i64": torch.arange(6).reshape(2, 3), "i32": torch.tensor([1, -2], dtype=torch.int32),
               "u8": torch.tensor([0, 255], dtype=torch.uint8), "flag": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    got = read_checkpoint(path)
    want = load_file(str(path))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k
    converted = read_checkpoint(path, lambda key: torch.float16)
    assert converted["f32"].dtype == torch.float16 and converted["i64"].dtype == torch.int64
    assert converted["flag"].dtype == torch.bool


@pytest.mark.parametrize("cut", [4, 20, 100_000, -1])
def test_a_cut_safetensors_file_is_one_clear_error(tmp_path, cut):
    path, _ = _fp16_file(tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError, match="m.safetensors is not a complete .safetensors file"):
        read_checkpoint(path, training_dtypes(torch.bfloat16))


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_the_trainer_loads_in_its_precision_and_casts_nothing(tmp_path, precision):
    """The model a run loads is already in the training dtype, so _place_model on the CPU copies no tensor."""
    from conftest import base_config
    from lora_trainer.train.trainer import Trainer

    path, _ = _fp16_file(tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text(__import__("yaml").safe_dump(tiny_ldm_state_dict("sd1")[1]))
    trainer = Trainer(base_config(base_model=str(path), mixed_precision=precision, device="cpu",
                                  output_dir=str(tmp_path / "out")))
    autocast = trainer._precision()
    model = trainer._load_model(autocast or torch.float32)
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    modules = [model.unet, *model.text_encoders]
    assert all(p.dtype == want for m in modules for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in model.vae.parameters())
    before = {id(p): p.data_ptr() for m in (*modules, model.vae) for p in m.parameters()}
    assert trainer._place_model(model, True, autocast) == autocast
    after = {id(p): p.data_ptr() for m in (*modules, model.vae) for p in m.parameters()}
    assert after == before


def test_a_diffusers_folder_loads_in_the_training_precision(tiny_folders):
    model = load_base_model(str(tiny_folders["sdxl"]), dtype=torch.bfloat16, **quiet)
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for te in model.text_encoders for p in te.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}


PEAK_SCRIPT = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    from lora_trainer.models.loader import read_checkpoint, training_dtypes

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    path = Path(sys.argv[1])
    base = status("VmRSS")
    try:
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on
    except OSError:
        pass
    sd = read_checkpoint(path, training_dtypes(torch.bfloat16))
    print((status("VmHWM") - base) / sum(v.numel() * v.element_size() for v in sd.values()))
''')


def test_peak_memory_of_reading_and_converting_is_one_copy(tmp_path):
    """A 256 MB fp16 file read as bf16: the process's peak rises by about one copy (reading the whole file and
    then casting, as before, rose by two)."""
    sd = {f"model.diffusion_model.block{i}.weight": torch.full((2048, 2048), 0.5, dtype=torch.float16)
          for i in range(32)}
    path = tmp_path / "big.safetensors"
    save_file(sd, str(path))
    del sd
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert 0.9 < ratio < 1.25, ratio
