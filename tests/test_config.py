"""Config: validation messages, aliases, YAML round trip, the shipped example configs."""
from pathlib import Path

import pytest
import yaml

from lora_trainer.cli import build_parser, config_from_args
from lora_trainer.config import ConfigError, from_dict, load_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("keys,message", [
    ({"learnin_rate": 1e-4}, "unknown key 'learnin_rate'; did you mean 'learning_rate'"),
    ({"lora_rnak": 4}, "did you mean 'lora_rank'"),
    ({"batch_size": 0}, "batch_size: 0 is too small; it must be >= 1"),
    ({"optimizer": "sgd"}, "optimizer: 'sgd' is not allowed; choose one of adamw"),
    ({"epochs": "ten"}, "epochs: 'ten' has the wrong type; expected int"),
    ({"resolution": "big"}, "resolution: 'big' is not a resolution"),
    ({"resolution": 500}, "multiple of 8"),
    ({"caption_dropout_rate": 1.5}, "caption_dropout_rate: 1.5 is too large"),
    ({"mixed_precision": "fp8"}, "choose one of no, fp16, bf16"),
    ({"min_bucket_reso": 1024, "max_bucket_reso": 512}, "min_bucket_reso (1024) is larger"),
    ({"train_unet": False}, "nothing to train"),
])
def test_bad_values_are_named(keys, message):
    with pytest.raises(ConfigError) as e:
        from_dict(keys)
    assert message in str(e.value)


def test_strings_from_yaml_and_cli_are_coerced():
    cfg = from_dict({"learning_rate": "1e-4", "train_text_encoder": "true", "batch_size": "4", "resolution": "768,512",
                     "lora_alpha": 8, "optimizer": "AdamW8bit"})
    assert cfg.learning_rate == 1e-4 and cfg.train_text_encoder is True and cfg.batch_size == 4
    assert cfg.resolution_wh == (768, 512) and isinstance(cfg.lora_alpha, float) and cfg.optimizer == "adamw8bit"


def test_kohya_and_lora_scripts_keys_are_accepted():
    cfg = from_dict({"pretrained_model_name_or_path": "m.safetensors", "network_dim": 32, "network_alpha": 16,
                     "train_batch_size": 2, "max_train_epochs": 3, "conv_lora": 8})
    assert (cfg.base_model, cfg.lora_rank, cfg.lora_alpha, cfg.batch_size, cfg.epochs) == \
        ("m.safetensors", 32, 16.0, 2, 3)
    assert cfg.conv_lora is True and cfg.conv_rank == 8


def test_yaml_round_trip_and_name_from_file(tmp_path):
    path = tmp_path / "my_style.yaml"
    path.write_text("base_model: x.safetensors\nlora_rank: 8\n")
    cfg = load_yaml(path)
    assert cfg.output_name == "my_style" and cfg.lora_rank == 8
    cfg.save_yaml(tmp_path / "saved.yaml")
    assert load_yaml(tmp_path / "saved.yaml") == cfg
    with pytest.raises(ConfigError, match="not valid YAML"):
        (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
        load_yaml(tmp_path / "broken.yaml")


def test_cli_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"base_model": "x", "lora_rank": 8, "learning_rate": 1e-4}))
    args = build_parser().parse_args(["train", "--config", str(path), "--lora_rank", "32", "--train_text_encoder"])
    cfg = config_from_args(args)
    assert cfg.lora_rank == 32 and cfg.learning_rate == 1e-4 and cfg.train_text_encoder is True


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_example_configs_are_valid(name):
    cfg = load_yaml(ROOT / "configs" / name)
    assert cfg.base_model and cfg.train_data_dir and cfg.output_dir


def test_flux_example_config_is_a_flux_dev_lora_with_the_usual_settings():
    from lora_trainer.train.kinds import kind_for_config

    cfg = load_yaml(ROOT / "configs" / "flux_character.yaml")
    assert cfg.model_family == "flux" and kind_for_config(cfg).name == "flux"
    assert cfg.base_model.endswith(".safetensors") and cfg.flux_components  # BFL file + components folder
    assert cfg.timestep_sampling in ("sigmoid", "flux_shift") and cfg.guidance_scale == 1.0
    assert not cfg.min_snr_gamma  # FluxKind refuses DDPM loss weighting
    assert (cfg.lora_rank, cfg.effective_alpha, cfg.learning_rate) == (16, 16.0, 1e-4)
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing and cfg.cache_latents
    assert not cfg.train_text_encoder and cfg.caption_prefix.strip()
    assert 1000 <= cfg.max_train_steps <= 2000 and 0 < cfg.save_steps < cfg.max_train_steps
    for line in (ROOT / "configs" / "flux_character.yaml").read_text().splitlines():
        if line and not line.startswith((" ", "#")):  # every top-level key says what it is for
            assert "#" in line, line


def test_every_option_of_every_subcommand_is_described_and_defaults_said_once():
    import argparse

    from lora_trainer.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            text = str(action.help).replace("%(default)s", str(action.default))
            assert text.count("(default") <= 1, f"{name} {action.option_strings}: {text}"
