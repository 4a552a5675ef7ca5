"""load_in_4bit / load_in_8bit (QLoRA) as far as a machine without CUDA and bitsandbytes can test it: the
settings, the message before anything loads, and peft's k-bit preparation on a tiny Llama that only claims to
be quantized (its weights are bf16; bitsandbytes cannot run here)."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.cli import main
from lora_trainer.config import ConfigError, TrainConfig
from lora_trainer.text import quantization as q

from test_text_generation import PAIRS, _make_tokenizer


def _cfg(tmp_path, **kw) -> TrainConfig:
    args = dict(task_type="text-generation", base_model=str(tmp_path / "model"), train_data_dir=str(tmp_path / "data"),
                output_dir=str(tmp_path / "out"), device="auto", log_with="none")
    args.update(kw)
    return TrainConfig(**args)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="choose one"):
        TrainConfig(task_type="text-generation", load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ConfigError, match="load_in_4bit is for task_type: text-generation"):
        TrainConfig(load_in_4bit=True)
    options = q.bnb_options(TrainConfig(task_type="text-generation", load_in_4bit=True))
    assert options == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                       "bnb_4bit_compute_dtype": torch.bfloat16}
    assert q.bnb_options(TrainConfig(task_type="text-generation", load_in_8bit=True)) == {"load_in_8bit": True}
    assert q.quantization_kwargs(TrainConfig(task_type="text-generation"), torch.device("cpu")) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message of a machine without CUDA")
def test_without_cuda_the_cli_says_so_before_loading_anything(tmp_path, monkeypatch, capsys):
    import yaml

    from lora_trainer.text import trainer as text_trainer

    def must_not_load(*a, **k):
        raise AssertionError("loaded something before checking for CUDA")

    monkeypatch.setattr(text_trainer, "load_tokenizer", must_not_load)
    monkeypatch.setattr(text_trainer, "load_causal_lm", must_not_load)
    for bits in (4, 8):
        config = tmp_path / f"q{bits}.yaml"
        config.write_text(yaml.safe_dump({"task_type": "text-generation", "base_model": "meta-llama/Llama-2-7b-hf",
                                          "train_data_dir": str(tmp_path), "output_dir": str(tmp_path / "out"),
                                          f"load_in_{bits}bit": True, "log_with": "none"}))
        assert main(["train", "--config", str(config)]) == 2
        captured = capsys.readouterr()
        err = captured.err + captured.out
        assert f"load_in_{bits}bit: quantized (QLoRA) training needs a CUDA GPU" in err
        assert "torch sees no CUDA GPU" in err and "Traceback" not in err


def test_with_cuda_but_without_bitsandbytes_the_message_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="keep_torch > keep-torch.txt && pip install -c keep-torch.txt bitsandbytes"):
        q.check_quantization(_cfg(tmp_path, load_in_4bit=True), torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="this run is on cpu"):
        q.check_quantization(_cfg(tmp_path, load_in_8bit=True), torch.device("cpu"))


def test_kbit_preparation_then_lora_trains(tmp_path):
    """peft's prepare_model_for_kbit_training on a bf16 Llama flagged as loaded in 4 bits (the flag is all that is
    mocked): the base is frozen, its non-quantized weights go to fp32, checkpointing is on, and the LoRA added
    after it trains."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_trainer.text.model import add_lora

    tokenizer = _make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64)).to(torch.bfloat16)
    model.is_loaded_in_4bit = True
    cfg = _cfg(tmp_path, load_in_4bit=True, gradient_checkpointing=True, lora_rank=4)
    q.prepare_quantized(model, cfg)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.is_gradient_checkpointing
    model, targets = add_lora(cfg, model)
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    model.train()
    ids = torch.tensor([tokenizer(PAIRS[0][0] + " " + PAIRS[0][1])["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert q.quantization_note(cfg).startswith("QLoRA: base model in 4 bits (nf4")
