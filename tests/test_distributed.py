"""Data-parallel training on 2 CPU processes (gloo), started by torchrun as a user would, on a tiny SD1 model.

2 processes x batch 1 must give the LoRA that 1 process x batch 2 gives on the same data order, a stop asked
for by the process that does not write must stop both with a checkpoint, and resuming it with 2 processes
(or with 1 process x batch 2) must end where the uninterrupted run ended.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_trainer
from lora_trainer.config import TrainConfig
from lora_trainer.network.kohya_file import read_lora
from lora_trainer.train.distributed import Processes, effective_batch_note, resume_note
from lora_trainer.train.events import EventBus
from lora_trainer.train.trainer import Trainer

from conftest import base_config, make_images

TESTS = Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 300
FLOAT_TOLERANCE = 1e-4


ROOT = Path(lora_trainer.__file__).resolve().parent.parent


def torchrun(args: list[str], cwd: Path, n: int = 2, env: dict | None = None) -> tuple[int, str]:
    """Runs `torchrun --standalone --nproc_per_node n ARGS` with this checkout's lora_trainer importable."""
    return _launch(["torch.distributed.run", "--standalone", f"--nproc_per_node={n}"], args, cwd, env)


def accelerate_launch(config: str, args: list[str], cwd: Path, n: int = 2) -> tuple[int, str]:
    """Runs `accelerate launch --config_file configs/accelerate/CONFIG --num_processes n ARGS`, as the README
    says (on this GPU-less machine accelerate starts CPU processes on gloo)."""
    return _launch(["accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / config),
                    "--num_processes", str(n)], args, cwd, None)


def _launch(launcher: list[str], args: list[str], cwd: Path, env: dict | None) -> tuple[int, str]:
    """The whole process group is killed if it outlives the timeout."""
    path = os.pathsep.join([str(ROOT), str(TESTS)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    full_env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", *launcher, *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{launcher[0]} did not finish in {LAUNCH_TIMEOUT_S} s:\n{out[-4000:]}")
    return proc.returncode, out


def _keys(tiny_files, data: Path, out: Path, **extra) -> dict:
    keys = dict(base_model=str(tiny_files["sd1"]), train_data_dir=str(data), output_dir=str(out), output_name="d",
                resolution=64, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, batch_size=1,
                gradient_accumulation_steps=2, max_train_steps=6, lora_rank=4, learning_rate=1e-3, seed=3,
                log_with="none", save_precision="fp32", train_text_encoder=True, noise_offset=0.05,
                min_snr_gamma=5.0, shuffle_caption=True, lr_scheduler="cosine", device="cpu")
    keys.update(extra)
    return keys


def _yaml(path: Path, keys: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(keys))
    return path


def _max_diff(a_path: Path, b_path: Path) -> float:
    a, _ = read_lora(a_path)
    b, _ = read_lora(b_path)
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tiny_files, tmp_path_factory):
    """One reference run in this process (1 x batch 2) and the three torchrun launches the tests look at."""
    tmp = tmp_path_factory.mktemp("dist")
    data = make_images(tmp / "data", n=5)  # three buckets: the last batch of some holds 1 image (rank 1: none)
    reference = Trainer(base_config(**_keys(tiny_files, data, tmp / "one", batch_size=2))).run()
    straight = torchrun([str(TESTS / "distributed_worker.py"), "train", "--config",
                         str(_yaml(tmp / "two.yaml", _keys(tiny_files, data, tmp / "two", cache_latents_to_disk=False,
                                                           save_steps=2)))], tmp)
    stop_cfg = _yaml(tmp / "stop.yaml", _keys(tiny_files, data, tmp / "stop"))
    stopped = torchrun([str(TESTS / "distributed_worker.py"), "train", "--config", str(stop_cfg)], tmp,
                       env={"LT_TEST_STOP_RANK": "1", "LT_TEST_STOP_STEP": "3"})
    resumed = torchrun(["-m", "lora_trainer", "train", "--config", str(stop_cfg), "--resume_from_checkpoint",
                        "latest"], tmp)
    return {"tmp": tmp, "data": data, "reference": reference, "straight": straight, "stopped": stopped,
            "resumed": resumed}


def test_two_processes_batch_1_equal_one_process_batch_2(runs):
    code, out = runs["straight"]
    assert code == 0, out[-4000:]
    tmp = runs["tmp"]
    worst = _max_diff(runs["reference"].lora_path, tmp / "two" / "d.safetensors")
    # float summation order alone (1 vs 2 threads in one process) moves these weights by ~2e-5 after Adam's
    # normalisation; a wrong shard, noise or weighting moves them by about a step's size (lr 1e-3)
    assert worst <= FLOAT_TOLERANCE, worst
    lora, _ = read_lora(tmp / "two" / "d.safetensors")
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_up" in k) > 20 * FLOAT_TOLERANCE
    # one process writes: one final LoRA, checkpoints with every rank's RNG state, one progress log
    assert out.count("Done: ") == 1 and out.count("step 6/6") == 1
    # each process leaves the process group itself: one left to the interpreter's exit aborted now and then
    assert out.count("process group still open at exit: False") == 2, out[-4000:]
    assert "effective batch 4 (batch_size 1 per device x 2 processes x gradient_accumulation_steps 2)" in out
    assert sorted(p.name for p in (tmp / "two").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (tmp / "two" / "checkpoint-4" / "rng-rank1.json").is_file()
    assert json.loads((tmp / "two" / "checkpoint-4" / "trainer_state.json").read_text())["num_processes"] == 2
    # the latents were cached on disk, each process encoding its part, though the config kept them in memory
    assert "encoded by 2 processes" in out and len(list((tmp / "two" / "cache").glob("*.safetensors"))) == 5
    _, meta = read_lora(tmp / "two" / "d.safetensors")
    assert meta["ss_total_batch_size"] == "4" and meta["ss_num_processes"] == "2"
    assert meta["ss_batch_size_per_device"] == "1"


def test_a_stop_on_one_process_stops_both_and_resumes_exactly(runs):
    tmp = runs["tmp"]
    code, out = runs["stopped"]
    # the processes exit with 130 (interrupted) once the main one has written; torchrun calls that a failure
    # and ends the other (which is leaving anyway)
    assert code != 0 and "exitcode  : 130" in out, out[-4000:]
    checkpoints = [p.name for p in (tmp / "stop").glob("checkpoint-*")]
    # rank 1 asked after step 3; both processes see it with step 4's gradients and stop there together
    assert checkpoints == ["checkpoint-4"], out[-4000:]
    assert "resume with the same command plus --resume_from_checkpoint" in out
    assert "Done: " not in out and "stopped at step 4/6 (stop requested by another process)" in out

    code, out = runs["resumed"]
    assert code == 0, out[-4000:]
    assert "resumed from" in out and "note: the checkpoint was made with" not in out
    worst = _max_diff(tmp / "two" / "d.safetensors", tmp / "stop" / "d.safetensors")
    assert worst <= 1e-6, worst


def test_resume_with_another_number_of_processes_says_what_changes(runs, tiny_files):
    tmp = runs["tmp"]
    checkpoint = tmp / "stop" / "checkpoint-4"
    events = EventBus()
    cfg = base_config(**_keys(tiny_files, runs["data"], tmp / "stop", batch_size=2, output_name="d1",
                              resume_from_checkpoint=str(checkpoint)))
    result = Trainer(cfg, events).run()
    notes = [e.message for e in events.since(0)[0] if "process(es)" in (e.message or "")]
    assert notes and "global batch (2) and the data order stay the same" in notes[0]
    # no dropout here: 1 x batch 2 continues the 2 x batch 1 run to the same weights
    assert _max_diff(result.lora_path, tmp / "two" / "d.safetensors") <= FLOAT_TOLERANCE


def test_a_failure_on_one_process_ends_the_launch_at_once_with_its_message(runs, tiny_files):
    """A process that fails mid-run (its GPU ran out of memory) must not leave the others waiting in a reduction
    until the process group's timeout (30 minutes): the launch ends in seconds and says why."""
    import time

    tmp = runs["tmp"]
    cfg = _yaml(tmp / "crash.yaml", _keys(tiny_files, runs["data"], tmp / "crash"))
    started = time.monotonic()
    code, out = torchrun([str(TESTS / "distributed_worker.py"), "train", "--config", str(cfg)], tmp,
                         env={"LT_TEST_CRASH_RANK": "1", "LT_TEST_CRASH_FORWARD": "3"})
    took = time.monotonic() - started
    # the failing process says why; the main one, whose reduction lost its partner, says only that
    assert code != 0 and "[rank 1] error: cpu: out of memory. Try, in this order" in out, out[-4000:]
    assert "error: another process of this run failed (its error is printed above" in out, out[-4000:]
    assert "Done: " not in out and not (tmp / "crash" / "d.safetensors").exists()
    assert took < 120, f"the launch took {took:.0f} s to end after a process failed:\n{out[-3000:]}"


def test_shares_and_notes():
    # 2 processes, batch 2 each, a global batch of 3: rank 0 takes 2 draws (weight 2/3), rank 1 one (1/3)
    shares = [Processes(rank=r, world=2).share(3, 2) for r in (0, 1)]
    assert [(s.start, s.end) for s in shares] == [(0, 2), (2, 3)]
    assert sum(s.weight for s in shares) == pytest.approx(1.0)
    assert Processes(rank=1, world=2).share(1, 1).size == 0
    assert Processes(rank=1, world=3).split(list(range(7))) == [1, 4]
    assert effective_batch_note(2, 4, 8).startswith("effective batch 64 ")
    assert resume_note(2, 4, 2, 4) == ""
    assert "changes from 4 to 8" in resume_note(2, 4, 4, 8)
    single = Processes.single()
    params = [torch.nn.Parameter(torch.ones(3))]
    assert single.sum_gradients(params, [1.5, 0.0]) == [1.5, 0.0] and params[0].grad is None


# ---- text-generation LoRA -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """A tiny Llama; 7 samples at a global batch of 4 (the last batch gives rank 1 one sample): 2 processes x
    batch 2 under torchrun, and 1 process x batch 4 here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_text_generation import PAIRS, _jsonl, _make_tokenizer, _save_model

    tmp = tmp_path_factory.mktemp("dist-text")
    tokenizer = _make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = _save_model(LlamaForCausalLM(config), tokenizer, tmp / "llama")
    data = _jsonl(tmp / "data" / "qa.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS[:7]])
    keys = dict(task_type="text-generation", base_model=base, train_data_dir=str(data.parent), output_name="adapter",
                lora_rank=4, lora_alpha=8, epochs=2, learning_rate=1e-2, max_seq_length=32, seed=1, device="cpu",
                log_with="none", save_precision="fp32", weight_decay=0.0,
                # no clipping: with transformers 4.30 it scales these gradients down to where Adam's eps turns
                # float rounding into differences of ~2e-4 (both data parallel and FSDP; 1e-6 on transformers 5)
                max_grad_norm=0.0)
    from lora_trainer.text import train_text
    from lora_trainer.train.control import StopFlag

    one = train_text(TrainConfig(**keys, batch_size=4, output_dir=str(tmp / "one")), EventBus(), StopFlag())
    two = torchrun(["-m", "lora_trainer", "train", "--config",
                    str(_yaml(tmp / "two.yaml", dict(keys, batch_size=2, output_dir=str(tmp / "two"))))], tmp)
    # FSDP by `accelerate launch --config_file configs/accelerate/fsdp.yaml`; 5 samples, so the last batch of an
    # epoch leaves rank 1 nothing to train (it still runs the sharded forward and backward)
    five = _jsonl(tmp / "data5" / "qa.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS[:5]])
    keys5 = dict(keys, train_data_dir=str(five.parent), save_steps=2)
    one5 = train_text(TrainConfig(**keys5, batch_size=4, output_dir=str(tmp / "one5")), EventBus(), StopFlag())
    fsdp = accelerate_launch("fsdp.yaml", ["-m", "lora_trainer", "train", "--config",
                                           str(_yaml(tmp / "fsdp.yaml", dict(keys5, batch_size=2,
                                                                             output_dir=str(tmp / "fsdp"))))], tmp)
    return {"tmp": tmp, "base": base, "one": one, "two": two, "keys5": keys5, "one5": one5, "fsdp": fsdp}


def test_text_lora_on_two_processes_equals_one_and_is_a_standard_adapter(text_runs):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lora_trainer.text import merge_adapter

    code, out = text_runs["two"]
    assert code == 0, out[-4000:]
    assert "effective batch 4 (batch_size 2 per device x 2 processes" in out and out.count("Done: ") == 1
    tmp = text_runs["tmp"]
    adapter = tmp / "two" / "adapter"
    a = load_file(str(text_runs["one"] / "adapter_model.safetensors"))
    b = load_file(str(adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= FLOAT_TOLERANCE, worst
    assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 20 * FLOAT_TOLERANCE
    # the standard peft folder: loads on the (unquantized) base, and merges
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(text_runs["base"]), str(adapter))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = merge_adapter(str(adapter), str(tmp / "merged"), base_model=text_runs["base"])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(merged))(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)


def test_shipped_accelerate_configs_are_valid_and_unsupported_engines_are_refused(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    from lora_trainer.config import ConfigError

    folder = ROOT / "configs" / "accelerate"
    kinds = {p.name: str(load_config_from_file(str(p)).distributed_type) for p in sorted(folder.glob("*.yaml"))}
    assert kinds == {"multi_gpu.yaml": "DistributedType.MULTI_GPU", "multi_node.yaml": "DistributedType.MULTI_GPU",
                     "fsdp.yaml": "DistributedType.FSDP", "zero2.yaml": "DistributedType.DEEPSPEED",
                     "zero3.yaml": "DistributedType.DEEPSPEED"}
    stages = {name: load_config_from_file(str(folder / name)).deepspeed_config["zero_stage"]
              for name in ("zero2.yaml", "zero3.yaml")}
    assert stages == {"zero2.yaml": 2, "zero3.yaml": 3}
    for name in kinds:
        assert f"accelerate launch --config_file configs/accelerate/{name} -m lora_trainer train" in \
            (folder / name).read_text()
    # an image LoRA is data parallel only
    for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(variable, "true")
        with pytest.raises(ConfigError, match="a Stable Diffusion UNet fits one GPU"):
            Trainer(base_config())
        monkeypatch.delenv(variable)


def test_zero_config_comes_from_accelerate_and_ours(monkeypatch, tmp_path):
    from lora_trainer.config import ConfigError
    from lora_trainer.text.zero import zero_config

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    got = zero_config(batch_size=2, accumulation=4, max_grad_norm=1.0)
    assert got["train_micro_batch_size_per_gpu"] == 2 and got["gradient_accumulation_steps"] == 4
    assert got["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert got["gradient_clipping"] == 1.0 and got["managed_gradient_accumulation"] is False
    # a deepspeed_config_file lends its ZeRO section; batch sizes, optimizer and precision stay ours
    file = tmp_path / "ds.json"
    file.write_text('{"train_micro_batch_size_per_gpu": 64, "bf16": {"enabled": true}, '
                    '"zero_optimization": {"stage": 2, "overlap_comm": true}}')
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(file))
    got = zero_config(batch_size=2, accumulation=1, max_grad_norm=0.0)
    assert got["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert got["train_micro_batch_size_per_gpu"] == 2 and "bf16" not in got
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(ConfigError, match="stage 2 .* or 3"):
        zero_config(batch_size=2, accumulation=1, max_grad_norm=0.0)
    file.write_text("{not json")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        zero_config(batch_size=2, accumulation=1, max_grad_norm=0.0)


def test_text_lora_with_fsdp_on_two_processes_equals_one_and_its_checkpoint_resumes(text_runs):
    from safetensors.torch import load_file

    from lora_trainer.text import train_text
    from lora_trainer.train.control import StopFlag

    code, out = text_runs["fsdp"]
    assert code == 0, out[-4000:]
    assert "FSDP: the model is sharded over 2 processes (2 blocks)" in out
    tmp = text_runs["tmp"]

    def diff(a_dir, b_dir):
        a = load_file(str(a_dir / "adapter_model.safetensors"))
        b = load_file(str(b_dir / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        return max((a[k] - b[k]).abs().max().item() for k in a)

    assert diff(text_runs["one5"], tmp / "fsdp" / "adapter") <= FLOAT_TOLERANCE
    # the checkpoint holds whole tensors in the usual layout: one process continues it to the same adapter
    checkpoint = tmp / "fsdp" / "checkpoint-2"
    assert diff(checkpoint / "adapter", text_runs["one5"].parent / "checkpoint-2" / "adapter") <= FLOAT_TOLERANCE
    resumed = train_text(TrainConfig(**dict(text_runs["keys5"], batch_size=4, output_dir=str(tmp / "fsdp"),
                                            output_name="resumed", resume_from_checkpoint=str(checkpoint))),
                         EventBus(), StopFlag())
    assert diff(resumed, text_runs["one5"]) <= FLOAT_TOLERANCE


def test_text_lora_with_deepspeed_zero_2_and_3_equals_one_process_and_resumes_across_stages(text_runs):
    """ZeRO-2 on 2 CPU processes (gloo) gives the single-process adapter; its checkpoint is continued by ZeRO-3
    (base weights partitioned too) to the same adapter as the uninterrupted run."""
    pytest.importorskip("deepspeed")
    import shutil

    from safetensors.torch import load_file

    tmp = text_runs["tmp"]
    config = _yaml(tmp / "zero.yaml", dict(text_runs["keys5"], batch_size=2, output_dir=str(tmp / "zero")))
    code, out = accelerate_launch("zero2.yaml", ["-m", "lora_trainer", "train", "--config", str(config)], tmp)
    assert code == 0, out[-4000:]
    assert "DeepSpeed ZeRO-2: gradients and optimizer state partitioned over the processes" in out

    def diff(a_dir, b_dir):
        a = load_file(str(a_dir / "adapter_model.safetensors"))
        b = load_file(str(b_dir / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        return max((a[k] - b[k]).abs().max().item() for k in a)

    one5 = text_runs["one5"]
    assert diff(one5, tmp / "zero" / "adapter") <= FLOAT_TOLERANCE
    assert diff(one5.parent / "checkpoint-2" / "adapter", tmp / "zero" / "checkpoint-2" / "adapter") <= FLOAT_TOLERANCE
    # the stopped run: its first checkpoint only, continued under ZeRO-3 (the optimizer state goes into
    # DeepSpeed's partitions)
    shutil.rmtree(tmp / "zero" / "checkpoint-4")
    shutil.rmtree(tmp / "zero" / "adapter")
    code, out = accelerate_launch("zero3.yaml", ["-m", "lora_trainer", "train", "--config", str(config),
                                                 "--resume_from_checkpoint", "latest"], tmp)
    assert code == 0, out[-4000:]
    assert "DeepSpeed ZeRO-3: base weights" in out and "resumed from" in out
    assert diff(one5, tmp / "zero" / "adapter") <= FLOAT_TOLERANCE


def test_ctrl_c_under_torchrun_stops_every_process_with_one_checkpoint(tiny_files, tmp_path):
    """Ctrl-C in a terminal reaches torchrun and every process; torchrun sends it on again (the same request)
    and waits for them: the main process writes one checkpoint and all exit."""
    import time

    data = make_images(tmp_path / "data", n=4)
    config = _yaml(tmp_path / "c.yaml", _keys(tiny_files, data, tmp_path / "out", max_train_steps=100000,
                                              train_text_encoder=False))
    root = ROOT
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "lora_trainer", "train", "--config", str(config)], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + LAUNCH_TIMEOUT_S
        while "step 1/" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert "step 1/" in log.read_text(), log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    checkpoints = list((tmp_path / "out").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "rng-rank1.json").is_file(), text[-3000:]
    assert text.count("resume with the same command plus --resume_from_checkpoint") == 1
    # torchrun's second SIGINT is taken as the same request, not as "abort without saving"
    assert "stopped at step" in text and "received SIGINT" in text and "aborted" not in text
