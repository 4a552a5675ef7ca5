"""LoRA, LoCon, LoHa, LoKr and DoRA on each: file layout, the delta a host computes from the file, training
through the CLI, weight 0, continuing a file, exact resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_trainer.config import ConfigError
from lora_trainer.hosts.standalone import apply_lora_file, lora_file_config
from lora_trainer.models.loader import load_base_model
from lora_trainer.network.base import create_network, file_network_type, network_metadata
from lora_trainer.network.kohya_file import read_lora, save_lora
from lora_trainer.train.control import StopFlag
from lora_trainer.train.events import EventBus
from lora_trainer.train.trainer import Trainer

from conftest import base_config, make_images

quiet = dict(log_fn=lambda *_: None)
HERE = Path(__file__).resolve().parent

# (name, options, keys every module's file entry has (besides alpha))
VARIANTS = [
    ("locon", {"network_type": "locon", "conv_rank": 2, "conv_alpha": 1}, {"lora_down.weight", "lora_up.weight"}),
    ("lora-dora", {"network_type": "lora", "use_dora": True, "lora_alpha": 2},
     {"lora_down.weight", "lora_up.weight", "dora_scale"}),
    ("locon-dora", {"network_type": "locon", "use_dora": True, "conv_rank": 2},
     {"lora_down.weight", "lora_up.weight", "dora_scale"}),
    ("loha", {"network_type": "loha", "lora_alpha": 2}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("loha-dora-tucker", {"network_type": "loha", "use_dora": True, "use_tucker": True},
     {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "dora_scale"}),
    ("lokr", {"network_type": "lokr", "lora_rank": 2, "lokr_factor": 4}, {"lokr_w1"}),
    ("lokr-dora-both", {"network_type": "lokr", "lora_rank": 2, "use_dora": True, "decompose_both": True,
                        "lokr_factor": 16}, {"dora_scale"}),
    ("lokr-full", {"network_type": "lokr", "lokr_full_rank": True, "lora_alpha": 2}, {"lokr_w1", "lokr_w2"}),
]


def _randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def models(tiny_files):
    """One tiny SD1 and SDXL for the module: every network put into them is removed again."""
    return {family: load_base_model(str(tiny_files[family]), **quiet) for family in ("sd1", "sdxl")}


def _network(model, options, seed=0):
    net = create_network(model, base_config(train_text_encoder=True, **options))
    _randomize(net, seed)
    return net


def _metadata(cfg) -> dict:
    module, args = network_metadata(cfg)
    return {"ss_network_module": module, "ss_network_args": json.dumps(args), "ss_network_dim": str(cfg.lora_rank),
            "ss_network_alpha": str(cfg.effective_alpha)}


def _per_stem(sd):
    out = {}
    for k in sd:
        stem, _, suffix = k.partition(".")
        out.setdefault(stem, set()).add(suffix)
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_file_keys_shapes_and_round_trip(models, tmp_path, family):
    model = models[family]
    for name, options, keys in VARIANTS:
        net = _network(model, options)
        sd = net.state_dict()
        stems = _per_stem(sd)
        assert len(stems) == len(net.layers), name
        assert all(keys | {"alpha"} <= suffixes for suffixes in stems.values()), name
        assert any(s.startswith("lora_te") for s in stems)
        convs = any("resnets" in s or "in_layers" in s for s in stems)
        assert convs == (options["network_type"] != "lora"), name
        if options.get("use_dora"):  # one magnitude per input channel: the axis A1111 and Forge decompose on
            for stem, layer in net.layers.items():
                base = layer.get_base_layer().weight
                assert sd[f"{stem}.dora_scale"].shape == (1, base.shape[1], *[1] * (base.dim() - 2)), stem
        if name == "loha-dora-tucker":
            assert any("hada_t1" in s and "hada_t2" in s for s in stems.values())
        if name == "lokr-dora-both":  # the large factor is split where the rank is small against it
            assert any({"lokr_w2_a", "lokr_w2_b"} <= s for s in stems.values())
        assert file_network_type(sd) == {"lora-dora": "lora", "locon-dora": "locon"}.get(name, name.split("-")[0])
        # the file read back gives the same deltas
        path = save_lora(tmp_path / f"{name}.safetensors", sd, _metadata(net.cfg), "fp32")
        deltas = net.deltas()
        net.remove()
        again = apply_lora_file(model, path)
        for stem, d in again.deltas().items():
            assert torch.allclose(d, deltas[stem], atol=1e-6), (name, stem)
        again.remove()


def test_forward_is_base_plus_delta_and_weight_zero_is_base(models):
    """What a module adds in training is exactly W_eff - W = deltas(); at weight 0 the model is the base."""
    torch.manual_seed(0)
    lat, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    t = torch.tensor([500])
    model = models["sd1"]
    for name, options, _ in VARIANTS:
        if name in ("locon", "loha", "lokr-full"):  # peft's path, and the layouts the DoRA variants cover
            continue
        net = _network(model, options)
        with torch.no_grad():
            adapted = model.unet(lat, t, encoder_hidden_states=emb).sample
            with net.multiplier(0.0):
                zero = model.unet(lat, t, encoder_hidden_states=emb).sample
            deltas = net.deltas()
            bases = {stem: layer.get_base_layer() for stem, layer in net.layers.items()}
            net.remove()
            base = model.unet(lat, t, encoder_hidden_states=emb).sample
            unet = [(bases[s], deltas[s].to(bases[s].weight.dtype)) for s in bases if s.startswith("lora_unet_")]
            for module, delta in unet:
                module.weight += delta
            merged = model.unet(lat, t, encoder_hidden_states=emb).sample
            for module, delta in unet:
                module.weight -= delta
        assert torch.equal(zero, base), name
        assert not torch.allclose(adapted, base, atol=1e-3), name
        assert torch.allclose(adapted, merged, atol=1e-4, rtol=1e-4), (name, (adapted - merged).abs().max())


# ---- the hosts' own loaders ----------------------------------------------------------------------------
HOSTS = Path(os.environ.get("LORA_TRAINER_HOSTS", "/work/hosts"))


def _host_python(host: str) -> Path:
    return HOSTS / host / "venv" / "bin" / "python"


def host_delta_report(models, tmp_path, host: str, families=("sd1", "sdxl"), variants=VARIANTS,
                      precisions=("fp32", "fp16")) -> dict:
    """{(family, variant, precision): report} from tests/host_loaders.py run with the host's python."""
    jobs, keys = [], []
    for family in families:
        for name, options, _ in variants:
            net = _network(models[family], options)
            deltas = net.deltas()
            base = {}
            for stem, layer in net.layers.items():
                base[f"{stem}.weight"] = layer.get_base_layer().weight.detach().float().contiguous()
                base[f"{stem}.delta"] = deltas[stem].contiguous()
            base_path = tmp_path / f"{family}-{name}-base.safetensors"
            save_file(base, str(base_path))
            for precision in precisions:
                lora = save_lora(tmp_path / f"{family}-{name}-{precision}.safetensors", net.state_dict(),
                                 {"ss_output_name": name}, precision)
                out = tmp_path / f"{family}-{name}-{precision}-{host}.json"
                jobs.append({"lora": str(lora), "base": str(base_path), "out": str(out)})
                keys.append((family, name, precision))
            net.remove()
    job_file = tmp_path / f"jobs-{host}.json"
    job_file.write_text(json.dumps(jobs))
    subprocess.run([str(_host_python(host)), str(HERE / "host_loaders.py"), host, str(HOSTS / host), str(job_file)],
                   check=True, cwd=str(tmp_path), timeout=600)
    return {key: json.loads(Path(job["out"]).read_text()) for key, job in zip(keys, jobs)}


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_the_hosts_loaders_apply_the_trained_delta(models, tmp_path, host):
    if not _host_python(host).is_file():
        pytest.skip(f"no {host} checkout at {HOSTS / host} (set LORA_TRAINER_HOSTS); its loader code is not "
                    f"vendored here")
    reports = host_delta_report(models, tmp_path, host)
    for (family, name, precision), r in reports.items():
        assert len(r["applied"]) == r["total"], (family, name, "modules the host did not apply")
        # fp32 file: the same formula (float rounding only); fp16 file: within two fp16 steps of the merged weight
        # (A1111 computes in the file's precision)
        worst = max(relative_errors(r).values())
        assert worst <= (1e-5 if precision == "fp32" else 2e-3), (family, name, precision, worst)


def relative_errors(report: dict) -> dict:
    """|delta_host - delta_trained| per stem, relative to the largest entry of the merged weight W + delta."""
    return {stem: diff / (report["max_abs_weight"][stem] + report["max_abs_delta"][stem])
            for stem, diff in report["max_abs_diff"].items()}


def print_host_table(models, tmp_path) -> None:
    """The per-type, per-loader numbers (python tests/test_network_types.py --table)."""
    print(f"{'family':6} {'type':17} {'file':4} {'loader':6} {'applied':>9} {'max|dH-dT|':>11} {'rel':>9}")
    for host in ("a1111", "forge"):
        if not _host_python(host).is_file():
            print(f"{host}: not found at {HOSTS / host}")
            continue
        for (family, name, precision), r in host_delta_report(models, tmp_path, host).items():
            rel = max(relative_errors(r).values())
            print(f"{family:6} {name:17} {precision:4} {host:6} {len(r['applied']):>4}/{r['total']:<4} "
                  f"{max(r['max_abs_diff'].values()):11.2e} {rel:9.2e}")


# ---- training through the CLI ----------------------------------------------------------------------------
def _yaml(path: Path, **keys) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(keys))
    return path


CLI_VARIANTS = {"lora-dora": {"network_type": "lora", "use_dora": True, "rank_dropout": 0.1},
                "locon": {"network_type": "locon", "conv_rank": 2},
                "loha": {"network_type": "loha", "use_dora": True, "module_dropout": 0.2},
                "lokr": {"network_type": "lokr", "lora_rank": 2, "lokr_factor": 4}}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cli_trains_each_type(tiny_files, models, tmp_path, family):
    from lora_trainer.cli import main

    data = make_images(tmp_path / "data", n=1)
    torch.manual_seed(0)
    unet_config = models[family].unet.config
    lat, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet_config.cross_attention_dim)
    for name, options in CLI_VARIANTS.items():
        cfg = _yaml(tmp_path / f"{name}.yaml", base_model=str(tiny_files[family]), train_data_dir=str(data),
                    output_dir=str(tmp_path / "out"), resolution=64, min_bucket_reso=64, max_bucket_reso=64,
                    batch_size=1, max_train_steps=1, learning_rate=1e-2, train_text_encoder=True, log_with="none",
                    **{"lora_rank": 4, **options})
        assert main(["train", "--config", str(cfg)]) == 0, name
        sd, meta = read_lora(tmp_path / "out" / f"{name}.safetensors")
        kind = options["network_type"]
        assert file_network_type(sd) == kind
        args = json.loads(meta.get("ss_network_args", "{}"))
        if kind == "locon":
            assert meta["ss_network_module"] == "networks.lora" and args == {"conv_dim": "2", "conv_alpha": "2.0"}
        else:
            assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == kind
            assert (args.get("dora_wd") == "True") == bool(options.get("use_dora"))
        if kind == "lokr":
            assert args["factor"] == "4" and args["decompose_both"] == "False"
        trained = [k for k in sd if k.endswith(("lora_up.weight", "hada_w2_a", "lokr_w2", "lokr_w2_a"))]
        learned = sum(bool(torch.count_nonzero(sd[k])) for k in trained)  # these start at zero
        assert learned == len(trained) or (options.get("module_dropout") and learned > len(trained) / 3), name
        cfg_back = lora_file_config(sd, meta)
        assert cfg_back.adapter_type == kind and cfg_back.use_dora == bool(options.get("use_dora"))
        # the preview path loads it; weight 0 is the base model
        model = models[family]
        kw = {}
        if family == "sdxl":
            pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[64.] * 6])}
        with torch.no_grad():
            base = model.unet(lat, torch.tensor([500]), encoder_hidden_states=emb, **kw).sample
            net = apply_lora_file(model, tmp_path / "out" / f"{name}.safetensors")
            with net.multiplier(0.0):
                zero = model.unet(lat, torch.tensor([500]), encoder_hidden_states=emb, **kw).sample
            full = model.unet(lat, torch.tensor([500]), encoder_hidden_states=emb, **kw).sample
            net.remove()
        assert torch.equal(zero, base) and not torch.equal(full, base), name


def test_resume_is_exact_for_each_type(tiny_files, tmp_path):
    data = make_images(tmp_path / "data", n=2)

    def cfg(out, family, options, **extra):
        return base_config(base_model=str(tiny_files[family]), train_data_dir=str(data), output_dir=str(out),
                           output_name="r", max_train_steps=3, batch_size=1, lr_scheduler="cosine",
                           lora_dropout=0.1, save_precision="fp32", **options, **extra)

    for family, options in [("sd1", {"network_type": "loha", "use_dora": True, "rank_dropout": 0.2,
                                     "module_dropout": 0.2, "use_tucker": True, "train_text_encoder": True}),
                            ("sdxl", {"network_type": "lokr", "lora_rank": 2, "decompose_both": True,
                                      "use_dora": True})]:
        root = tmp_path / family
        straight = Trainer(cfg(root / "a", family, options)).run()
        events, stop = EventBus(), StopFlag()
        events.subscribe(lambda e: stop.set("test") if e.kind == "step" and e.step == 1 else None)
        first = Trainer(cfg(root / "b", family, options), events, stop).run()
        assert first.status == "stopped" and first.global_step == 1
        resumed = Trainer(cfg(root / "b", family, options, resume_from_checkpoint=str(first.checkpoint))).run()
        a, _ = read_lora(straight.lora_path)
        b, _ = read_lora(resumed.lora_path)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-6, (family, worst)
        assert straight.losses[1:] == pytest.approx(resumed.losses, abs=1e-6)
        with pytest.raises(ConfigError, match="network_type 'lokr' -> 'loha'|network_type 'loha' -> 'lokr'"):
            other = {"loha": "lokr", "lokr": "loha"}[options["network_type"]]
            Trainer(cfg(root / "b", family, {**options, "network_type": other},
                        resume_from_checkpoint=str(first.checkpoint))).run()


def test_init_lora_weights_continues_the_same_type_and_refuses_another(models):
    model = models["sd1"]
    loha = _network(model, {"network_type": "loha", "use_dora": True})
    sd = loha.state_dict()
    loha.remove()
    again = _network(model, {"network_type": "loha", "use_dora": True}, seed=1)
    again.load_state_dict(sd)
    assert all(torch.equal(v, sd[k]) for k, v in again.state_dict().items())
    again.remove()
    cases = [({"network_type": "lokr"}, "is a LoHa file but this run trains LoKr; set network_type: loha"),
             ({"network_type": "lora", "use_dora": True}, "is a LoHa file but this run trains LoRA"),
             ({"network_type": "loha"}, "has DoRA magnitudes .* set use_dora: true"),
             ({"network_type": "loha", "use_dora": True, "lora_rank": 8}, r"shape \[.*\] but this run trains"),
             ({"network_type": "loha", "use_dora": True, "lora_alpha": 1}, "alpha 4 but this run uses 1")]
    for options, message in cases:
        other = _network(model, options)
        with pytest.raises(ConfigError, match=message):
            other.load_state_dict(sd, source="init_lora_weights x.safetensors")
        other.remove()
    # a LoKr file is refused by a plain (peft) LoRA run too
    lokr = _network(model, {"network_type": "lokr"})
    lokr_sd = lokr.state_dict()
    lokr.remove()
    plain = _network(model, {"network_type": "lora"})
    with pytest.raises(ConfigError, match="is a LoKr file but this run trains LoRA; set network_type: lokr"):
        plain.load_state_dict(lokr_sd)
    plain.remove()


if __name__ == "__main__":  # prints the per-loader table (python tests/test_network_types.py)
    sys.exit(pytest.main([__file__, "-q", "-k", "hosts_loaders"]))
