"""kohya sd-scripts and lora-scripts TOML configs, read as people have them."""
import pytest

from lora_trainer.config import ConfigError
from lora_trainer.config_import import load_toml_config

LORA_SCRIPTS = """
[model]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "./sd-models/model.safetensors"

[dataset]
train_data_dir = "./train/aki"
reg_data_dir = ""
prior_loss_weight = 1
cache_latents = true
shuffle_caption = true
enable_bucket = true

[additional_network]
network_dim = 32
network_alpha = 16
network_train_unet_only = false
network_train_text_encoder_only = false
network_module = "networks.lora"
network_args = ["conv_dim=8", "conv_alpha=4"]

[optimizer]
unet_lr = 1e-4
text_encoder_lr = 1e-5
optimizer_type = "AdamW8bit"
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0
lr_restart_cycles = 1

[training]
resolution = "512,512"
train_batch_size = 1
max_train_epochs = 10
noise_offset = 0.0
keep_tokens = 0
xformers = true
lowram = false
clip_skip = 2
mixed_precision = "fp16"
save_precision = "fp16"

[sample_prompt]
sample_sampler = "euler_a"
sample_every_n_epochs = 0

[saving]
output_name = "aki"
save_every_n_epochs = 2
save_state = false
save_model_as = "safetensors"
output_dir = "./output"
logging_dir = "./logs"
log_prefix = "aki"

[others]
min_bucket_reso = 256
max_bucket_reso = 1024
caption_extension = ".txt"
max_token_length = 225
seed = 1337
"""


def test_lora_scripts_sections_map_every_key(tmp_path):
    path = tmp_path / "default.toml"
    path.write_text(LORA_SCRIPTS)  # sample_every_n_epochs = 0: off, so nothing is missing
    cfg, notes = load_toml_config(path)
    assert cfg.base_model == "./sd-models/model.safetensors" and cfg.train_data_dir == "./train/aki"
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.conv_lora, cfg.conv_rank, cfg.conv_alpha) == (32, 16.0, True, 8, 4.0)
    assert cfg.optimizer == "adamw8bit" and cfg.lr_scheduler == "cosine_with_restarts" and cfg.clip_skip == 2
    assert cfg.resolution_wh == (512, 512) and cfg.epochs == 10 and cfg.save_every_n_epochs == 2
    assert cfg.output_name == "aki" and cfg.mixed_precision == "fp16" and cfg.seed == 1337
    assert cfg.text_encoder_lr == 1e-5 and cfg.unet_lr == 1e-4 and cfg.reg_weight == 1.0
    assert any(n.startswith("xformers ignored") for n in notes)
    assert any(n.startswith("sample_sampler ignored") for n in notes)


def test_unknown_and_unsupported_keys_are_named(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(LORA_SCRIPTS.replace("sample_every_n_epochs = 0", "sample_every_n_epochs = 2"))
    with pytest.raises(ConfigError, match="sample_every_n_epochs: use sample_every_n_steps"):
        load_toml_config(path)
    path.write_text('pretrained_model_name_or_path = "m.safetensors"\nfull_fp16 = true\nnetwork_dimm = 4\n')
    with pytest.raises(ConfigError) as info:
        load_toml_config(path)
    assert "full_fp16" in str(info.value) and "mixed_precision" in str(info.value)
    assert "network_dimm" in str(info.value) and "network_dim" in str(info.value)


def test_kohya_config_file_with_dataset_config(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "reg").mkdir()
    (tmp_path / "dataset.toml").write_text("""
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 768
batch_size = 2

  [[datasets.subsets]]
  image_dir = "images"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
""")
    (tmp_path / "config.toml").write_text("""
pretrained_model_name_or_path = "model.safetensors"
dataset_config = "dataset.toml"
network_module = "networks.lora"
network_dim = 8
learning_rate = 1e-4
max_train_steps = 100
save_every_n_steps = 50
output_name = "kohya_style"
sdpa = true
""")
    cfg, notes = load_toml_config(tmp_path / "config.toml")
    assert cfg.train_data_dir == str(tmp_path / "images") and cfg.reg_data_dir == str(tmp_path / "reg")
    assert (cfg.num_repeats, cfg.batch_size, cfg.keep_tokens, cfg.shuffle_caption) == (10, 2, 1, True)
    assert cfg.resolution_wh == (768, 768) and cfg.save_steps == 50 and cfg.lora_rank == 8
    (tmp_path / "config.toml").write_text('network_module = "networks.oft"\n')
    with pytest.raises(ConfigError, match="networks.lora"):
        load_toml_config(tmp_path / "config.toml")
    (tmp_path / "config.toml").write_text('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "factor=8", '
                                          '"decompose_both=True", "dora_wd=True", "conv_dim=4"]\n')
    cfg, _ = load_toml_config(tmp_path / "config.toml")
    assert (cfg.network_type, cfg.lokr_factor, cfg.decompose_both, cfg.use_dora, cfg.conv_rank) == ("lokr", 8, True,
                                                                                                    True, 4)


def test_cli_reads_toml_and_dumps_the_effective_config(tmp_path, capsys):
    import yaml

    from lora_trainer.cli import main

    path = tmp_path / "lora.toml"
    path.write_text('[additional_network]\nnetwork_dim = 4\n[others]\nseed = 7\n')
    dump = tmp_path / "effective.yaml"
    code = main(["check", str(path), "--train_data_dir", str(tmp_path / "none"), "--dump_config", str(dump)])
    assert code != 0  # no data, but the config was read and written out
    data = yaml.safe_load(dump.read_text())
    assert data["lora_rank"] == 4 and data["seed"] == 7 and data["output_name"] == "lora"


def test_a_kohya_flux_config_imports_its_flux_keys_and_names_what_it_cannot(tmp_path):
    """flux_train_network.py's keys: fp8_base, t5xxl_max_token_length, guidance and timestep settings carry
    over, blocks_to_swap with kohya's meaning; separate ae / clip_l / t5xxl files are named with what to do
    instead."""
    (tmp_path / "images").mkdir()
    path = tmp_path / "flux.toml"
    flux = ('pretrained_model_name_or_path = "flux1-dev.safetensors"\ntrain_data_dir = "images"\n'
            'network_module = "networks.lora_flux"\nnetwork_dim = 16\nfp8_base = true\n'
            't5xxl_max_token_length = 256\nguidance_scale = 1.0\ntimestep_sampling = "shift"\n'
            'discrete_flow_shift = 3.1582\nmodel_prediction_type = "raw"\nblocks_to_swap = 18\n')
    path.write_text(flux)
    cfg, notes = load_toml_config(path)
    assert cfg.fp8_base and cfg.t5xxl_max_token_length == 256 and cfg.lora_rank == 16 and cfg.blocks_to_swap == 18
    assert cfg.timestep_sampling == "shift" and cfg.discrete_flow_shift == pytest.approx(3.1582)
    assert any(n.startswith("model_prediction_type ignored") for n in notes)
    path.write_text(flux + 'ae = "ae.safetensors"\n')
    with pytest.raises(ConfigError) as info:
        load_toml_config(path)
    assert "ae: give FLUX.1's VAE" in str(info.value) and "flux_components" in str(info.value)
