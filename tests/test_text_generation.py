"""task_type: text-generation — LoRA for causal LMs (lora_trainer.text).

Everything is built offline: a byte-level BPE tokenizer trained on the test sentences and a tiny Llama (and GPT-2)
with random weights. Runs under transformers 4.30 / peft 0.13 and transformers 5 / peft 0.21.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_trainer.config import ConfigError, TrainConfig
from lora_trainer.train.control import StopFlag
from lora_trainer.train.events import EventBus

PAIRS = [
    ("capital of france?", "paris"), ("capital of italy?", "rome"), ("capital of spain?", "madrid"),
    ("capital of japan?", "tokyo"), ("color of the sky?", "blue"), ("color of grass?", "green"),
    ("opposite of hot?", "cold"), ("opposite of up?", "down"),
]
LINES = [f"the {a} {b} jumps over the {c} dog number {i}" for i, (a, b, c) in enumerate(
    [("quick", "brown", "lazy"), ("slow", "red", "happy"), ("small", "green", "sleepy"), ("big", "blue", "angry"),
     ("old", "white", "young"), ("new", "black", "tired"), ("fast", "grey", "hungry"), ("tiny", "pink", "sad"),
     ("wise", "gold", "calm"), ("bold", "teal", "loud"), ("shy", "plum", "wild"), ("odd", "rust", "kind")])]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                 "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _corpus():
    text = [p + " " + c for p, c in PAIRS] + LINES
    text += ["[INST] <<SYS>> <</SYS>> [/INST] system user assistant you are helpful answer briefly hello hi"] * 3
    return text


def _make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def _save_model(model, tokenizer, folder: Path) -> str:
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: thread start-up costs more than it saves, and badly so on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return _make_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, initializer_range=0.3,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save_model(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.3,
                        bos_token_id=1, eos_token_id=2)
    return _save_model(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(base, data, out, **kw) -> TrainConfig:
    args = dict(task_type="text-generation", base_model=str(base), train_data_dir=str(data), output_dir=str(out),
                output_name="adapter", lora_rank=8, lora_alpha=16, batch_size=4, epochs=1, learning_rate=1e-2,
                max_seq_length=64, seed=1, device="cpu", log_with="none", save_precision="fp32", weight_decay=0.0)
    args.update(kw)
    return TrainConfig(**args)


def _run(cfg, stop=None):
    from lora_trainer.text import train_text

    bus = EventBus()
    path = train_text(cfg, bus, stop or StopFlag())
    return path, bus.since(0)[0]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


# ---- reading data ----------------------------------------------------------------------------------------

def test_bad_data_is_reported_by_file_and_line_and_skipped(tmp_path):
    from lora_trainer.text import read_text_samples

    data = tmp_path / "data"
    _jsonl(data / "a.jsonl", [{"prompt": "p1", "completion": "c1"}, "", "{not json", {"foo": 1},
                              {"prompt": "p2", "completion": 3}, {"messages": [{"role": "user", "content": "hi"}]},
                              {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
                              {"text": "fine"},
                              {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    (data / "b.txt").write_text("line one\n\n   \nline four\n", encoding="utf-8")
    (data / "notes.csv").write_text("x,y\n", encoding="utf-8")
    samples, issues, ignored = read_text_samples(data)
    got = {(Path(i.file).name, i.line) for i in issues}
    assert got == {("a.jsonl", 2), ("a.jsonl", 3), ("a.jsonl", 4), ("a.jsonl", 5), ("a.jsonl", 6), ("a.jsonl", 7),
                   ("b.txt", 2), ("b.txt", 3)}
    by_line = {(Path(i.file).name, i.line): i.message for i in issues}
    assert "invalid JSON" in by_line[("a.jsonl", 3)]
    assert "found keys: foo" in by_line[("a.jsonl", 4)]
    assert "robot" in by_line[("a.jsonl", 7)]
    assert all(i.message.endswith("skipped") for i in issues)
    assert [(s.kind, Path(s.file).name, s.line) for s in samples] == [
        ("completion", "a.jsonl", 1), ("text", "a.jsonl", 8), ("chat", "a.jsonl", 9), ("text", "b.txt", 1),
        ("text", "b.txt", 4)]
    assert [p.name for p in ignored] == ["notes.csv"]
    assert str(issues[0]).startswith(str(data / "a.jsonl") + " line 2:")


def test_txt_paragraphs_when_blocks_span_lines(tmp_path):
    from lora_trainer.text import read_text_samples

    f = tmp_path / "p.txt"
    f.write_text("first para\nstill first\n\n\nsecond para\n\nthird\nand more\n", encoding="utf-8")
    samples, issues, _ = read_text_samples(f)
    assert [(s.text, s.line) for s in samples] == [("first para\nstill first", 1), ("second para", 5),
                                                   ("third\nand more", 7)]
    assert issues == []


def test_empty_dataset_is_an_error_naming_folder_and_formats(tmp_path, llama_dir):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "a.txt").write_text("\n\n", encoding="utf-8")
    (data / "b.json").write_text("[]", encoding="utf-8")
    cfg = _cfg(llama_dir, data, tmp_path / "out")
    from lora_trainer.text import train_text

    bus = EventBus()
    with pytest.raises(ConfigError) as e:
        train_text(cfg, bus, StopFlag())
    assert str(data) in str(e.value) and ".jsonl" in str(e.value) and ".txt" in str(e.value)
    assert "a.txt line 1: empty line" in str(e.value)
    assert bus.last.kind == "failed" and str(data) in bus.last.message
    with pytest.raises(ConfigError, match="does not exist"):
        train_text(_cfg(llama_dir, tmp_path / "nope", tmp_path / "out"), EventBus(), StopFlag())
    with pytest.raises(ConfigError, match=r"base_model: \./no/such/model does not exist .* hub id"):
        train_text(_cfg("./no/such/model", data, tmp_path / "out"), EventBus(), StopFlag())


# ---- templates and the loss mask ---------------------------------------------------------------------------

def _runs(tokenizer, tok):
    """Contiguous runs of (trained?, decoded text): every token belongs to exactly one run."""
    runs = []
    for tid, lab in zip(tok.input_ids, tok.labels):
        trained = lab != -100
        assert lab in (-100, tid)
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tid)
        else:
            runs.append((trained, [tid]))
    return [(t, tokenizer.decode(ids)) for t, ids in runs]


CHAT = [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "capital of france?"},
        {"role": "assistant", "content": "paris"}, {"role": "user", "content": "capital of italy?"},
        {"role": "assistant", "content": "rome"}]


@pytest.mark.parametrize("template,sample,expected", [
    ("none", {"text": "hello world"}, [(False, "<s>"), (True, "hello world</s>")]),
    ("none", {"prompt": "capital of france?", "completion": " paris"},
     [(False, "<s>capital of france?"), (True, " paris</s>")]),
    ("llama2-inst", {"prompt": "capital of france?", "completion": "paris"},
     [(False, "<s>[INST] capital of france? [/INST]"), (True, " paris </s>")]),
    ("llama2-inst", {"messages": CHAT},
     [(False, "<s>[INST] <<SYS>>\nyou are helpful\n<</SYS>>\n\ncapital of france? [/INST]"), (True, " paris </s>"),
      (False, "<s>[INST] capital of italy? [/INST]"), (True, " rome </s>")]),
    ("chatml", {"messages": CHAT},
     [(False, "<|im_start|>system\nyou are helpful<|im_end|>\n<|im_start|>user\ncapital of france?<|im_end|>\n"
              "<|im_start|>assistant\n"), (True, "paris<|im_end|>"),
      (False, "\n<|im_start|>user\ncapital of italy?<|im_end|>\n<|im_start|>assistant\n"), (True, "rome<|im_end|>"),
      (False, "\n"), (True, "</s>")]),
    ("chat-template", {"messages": CHAT},
     [(False, "<s><|im_start|>system\nyou are helpful<|im_end|>\n<|im_start|>user\ncapital of france?<|im_end|>\n"
              "<|im_start|>assistant\n"), (True, "paris<|im_end|>\n"),
      (False, "<|im_start|>user\ncapital of italy?<|im_end|>\n<|im_start|>assistant\n"), (True, "rome<|im_end|>\n")]),
])
def test_prompt_templates_and_loss_mask_token_by_token(tokenizer, template, sample, expected):
    from lora_trainer.text import Renderer, tokenize_rendered
    from lora_trainer.text.data import parse_record

    s, problem = parse_record(sample)
    assert problem is None
    rendered = Renderer(template, tokenizer)(s)
    tok = tokenize_rendered(tokenizer, rendered)
    assert rendered.text == "".join(text for _, text in expected)
    assert tok.input_ids == tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    assert _runs(tokenizer, tok) == expected
    # special tokens are single ids, and the mask is identical on the slow (piece by piece) path

    class Slow:
        is_fast = False

        def __call__(self, text, **kw):
            return tokenizer(text, add_special_tokens=False)

    slow = tokenize_rendered(Slow(), rendered)
    assert (slow.input_ids, slow.labels) == (tok.input_ids, tok.labels)
    assert tok.input_ids.count(tokenizer.eos_token_id) == rendered.text.count("</s>")


def test_template_errors_are_clear(tokenizer, tmp_path):
    from lora_trainer.text import Renderer
    from lora_trainer.text.data import parse_record
    from lora_trainer.text.dataset import tokenize_samples

    chat, _ = parse_record({"messages": CHAT}, "x.jsonl", 3)
    with pytest.raises(ConfigError, match=r"x.jsonl line 3: chat data .* needs a prompt_template"):
        Renderer("none", tokenizer)(chat)
    bad, _ = parse_record({"messages": [{"role": "assistant", "content": "a"}]}, "x.jsonl", 5)
    long, _ = parse_record({"prompt": "capital of france? " * 40, "completion": "paris"}, "x.jsonl", 6)
    longtext, _ = parse_record({"text": "the quick brown fox " * 40}, "x.jsonl", 7)
    issues = []
    out = tokenize_samples([bad, long, longtext, chat], tokenizer, "llama2-inst", 32, issues)
    assert [(i.line, i.message.split(";")[0]) for i in issues][:1] == [
        (5, "llama2-inst needs user and assistant messages in turn")]
    assert issues[1].line == 6 and "no answer token is left; skipped" in issues[1].message
    assert issues[2].line == 7 and "truncated to max_seq_length 32" in issues[2].message
    assert [len(t.input_ids) for t in out] == [32, len(out[1].input_ids)] and out[1].line == 3
    no_tpl = _make_tokenizer()
    no_tpl.chat_template = None
    no_tpl.init_kwargs.pop("chat_template", None)
    no_tpl.name_or_path = str(tmp_path)
    with pytest.raises(ConfigError, match="has no chat_template"):
        Renderer("chat-template", no_tpl)


def test_packing_split_and_order_are_deterministic(tokenizer):
    from lora_trainer.text.data import TextSample
    from lora_trainer.text.dataset import epoch_batches, pack, split_validation, tokenize_samples

    samples = [TextSample("text", "f.txt", i + 1, text=t) for i, t in enumerate(LINES)]
    toks = tokenize_samples(samples, tokenizer, "none", 64, [])
    packs = pack(toks, 64)
    assert len(packs) < len(toks) and all(len(p.input_ids) <= 64 for p in packs)
    assert [i for p in packs for i in p.input_ids] == [i for t in toks for i in t.input_ids]
    assert [i for p in packs for i in p.labels] == [i for t in toks for i in t.labels]
    assert sum(p.n_targets for p in packs) >= sum(t.n_targets for t in toks)
    tr, va = split_validation(list(range(20)), 0.25, seed=3)
    assert len(va) == 5 and sorted(tr + va) == list(range(20)) and (tr, va) == split_validation(list(range(20)), 0.25, 3)
    assert epoch_batches(10, 3, 7, 0) == epoch_batches(10, 3, 7, 0) != epoch_batches(10, 3, 7, 1)
    assert sorted(sum(epoch_batches(10, 3, 7, 2), [])) == list(range(10))


def test_default_target_modules_per_architecture(llama_dir, gpt2_dir):
    from transformers import AutoModelForCausalLM

    from lora_trainer.text import resolve_target_modules

    llama = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert resolve_target_modules(llama, None) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    gpt2 = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    assert resolve_target_modules(gpt2, None) == ["c_attn"]
    with pytest.raises(ConfigError, match=r"qq_proj not found .* Linear layers are: q_proj, k_proj"):
        resolve_target_modules(llama, ["q_proj", "qq_proj"])

    class Unknown(torch.nn.Module):
        config = type("C", (), {"model_type": "mystery"})()

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.up, self.down, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4), torch.nn.Linear(4, 10)

        def get_output_embeddings(self):
            return self.head

    assert resolve_target_modules(Unknown(), None) == ["up", "down"]


# ---- training ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_dir):
    """Memorization run on prompt/completion data with some bad lines; used by several tests below."""
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS]
    _jsonl(data / "qa.jsonl", rows[:4] + ["{broken"] + rows[4:] + [""])
    cfg = _cfg(llama_dir, data, root / "out", prompt_template="llama2-inst", epochs=30, batch_size=4,
               learning_rate=2e-2, log_with="tensorboard")
    path, events = _run(cfg)
    return {"cfg": cfg, "path": path, "events": events, "root": root, "data": data}


def test_training_lowers_loss_and_writes_a_peft_adapter(trained, llama_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, events = trained["path"], trained["events"]
    assert path == Path(trained["cfg"].output_dir) / "adapter"
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    assert (path / "tokenizer.json").is_file()
    acfg = json.loads((path / "adapter_config.json").read_text())
    assert acfg["r"] == 8 and acfg["lora_alpha"] == 16
    assert sorted(acfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    losses = [e.loss for e in events if e.kind == "step"]
    assert len(losses) == 60
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    msgs = [e.message for e in events if e.kind == "message"]
    assert any("qa.jsonl line 5: invalid JSON" in m for m in msgs)
    assert any("qa.jsonl line 10: empty line" in m for m in msgs)
    assert events[-1].kind == "finished" and events[-1].path == str(path)
    # TensorBoard scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(trained["cfg"].output_dir) / "logs"))
    acc.Reload()
    assert len(acc.Scalars("loss/train")) == 60 and abs(acc.Scalars("loss/train")[0].value - losses[0]) < 1e-5
    # peft loads it and it changes the logits
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    ids = tokenizer("<s>[INST] capital of france? [/INST]", add_special_tokens=False)["input_ids"]
    before = _logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, str(path))
    after = _logits(peft_model, ids)
    assert (after - before).abs().max() > 1e-2
    # ... and it learned the answer
    assert int(after[0, -1].argmax()) == tokenizer(" paris", add_special_tokens=False)["input_ids"][0]


def test_merge_writes_a_model_equal_to_base_plus_adapter(trained, llama_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_trainer.text import merge_adapter

    out = merge_adapter(str(trained["path"]), str(tmp_path / "merged"))
    assert out == tmp_path / "merged" and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not any(out.glob("adapter_config.json"))
    ids = tokenizer("<s>[INST] color of grass? [/INST] green", add_special_tokens=False)["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(trained["path"]))
    torch.testing.assert_close(_logits(merged, ids), _logits(ref, ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="already exists"):
        merge_adapter(str(trained["path"]), str(out))
    with pytest.raises(ConfigError, match="expected a peft adapter folder"):
        merge_adapter(str(tmp_path), str(tmp_path / "m2"))


def test_init_lora_weights_continues_and_refuses_other_shapes(trained, llama_dir):
    from safetensors.torch import load_file

    cfg = trained["cfg"]
    adapter = str(trained["path"])
    before = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"was trained with rank 8 \(this run: lora_rank 4\)"):
        _run(cfg.replace(init_lora_weights=adapter, lora_rank=4, log_with="none"))
    with pytest.raises(ConfigError, match=r"target modules .* \(this run: \['q_proj', 'v_proj'\]\)"):
        _run(cfg.replace(init_lora_weights=adapter, target_modules=["q_proj", "v_proj"], log_with="none"))
    # the same shape continues from the trained weights: the first loss is already low; the adapter folder of the
    # first run is not overwritten but a numbered one is written
    path, events = _run(cfg.replace(init_lora_weights=adapter, max_train_steps=1, learning_rate=0.0,
                                    log_with="none"))
    first = [e.loss for e in events if e.kind == "step"][0]
    trained_losses = [e.loss for e in trained["events"] if e.kind == "step"]
    assert first < 0.5 * trained_losses[0]
    assert path.name == "adapter_2"
    assert any("already exists; writing the adapter to" in e.message for e in events if e.kind == "message")
    assert load_file(str(Path(adapter) / "adapter_model.safetensors")).keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in load_file(str(Path(adapter) / "adapter_model.safetensors")).items())
    # overwrite: true replaces the folder in place
    path, _ = _run(cfg.replace(max_train_steps=1, overwrite=True, log_with="none"))
    assert path == Path(adapter)
    assert any(not torch.equal(before[k], v) for k, v in load_file(str(path / "adapter_model.safetensors")).items())


def _text_data(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "lines.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return data


def test_resume_is_exact(tmp_path, llama_dir):
    from safetensors.torch import load_file

    data = _text_data(tmp_path)
    common = dict(batch_size=2, gradient_accumulation_steps=2, max_train_steps=20, lora_dropout=0.1,
                  lr_scheduler="cosine", lr_warmup_steps=3, save_steps=5, learning_rate=5e-3, weight_decay=0.01)
    straight, ev1 = _run(_cfg(llama_dir, data, tmp_path / "a", save_last_n_checkpoints=2, **common))
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-20"]
    assert [e.step for e in ev1 if e.kind == "checkpoint_saved"] == [5, 10, 15, 20]

    stop = StopFlag()
    cfg_b = _cfg(llama_dir, data, tmp_path / "b", **common)
    from lora_trainer.text import train_text

    bus = EventBus()
    bus.subscribe(lambda e: stop.set("test stop") if e.kind == "step" and e.step == 10 else None)
    stopped = train_text(cfg_b, bus, stop)
    ev2a = bus.since(0)[0]
    assert stopped == tmp_path / "b" / "checkpoint-10" and ev2a[-1].kind == "stopped"
    assert "test stop" in ev2a[-1].message
    assert not (tmp_path / "b" / "adapter").exists()
    assert (stopped / "adapter" / "adapter_model.safetensors").is_file()
    resumed, ev2b = _run(cfg_b.replace(resume_from_checkpoint="latest"))
    l1 = [e.loss for e in ev1 if e.kind == "step"]
    l2 = [e.loss for e in ev2a + ev2b if e.kind == "step"]
    assert [e.step for e in ev2b if e.kind == "step"] == list(range(11, 21))
    assert l2 == pytest.approx(l1, abs=1e-6)
    wa, wb = load_file(str(straight / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) == 16
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == [
        "checkpoint-10", "checkpoint-15", "checkpoint-20", "checkpoint-5"]
    assert any("resumed from" in e.message and "checkpoint-10" in e.message for e in ev2b if e.kind == "message")


def test_stop_without_save_steps_and_nan_keeps_last_good_checkpoint(tmp_path, llama_dir, monkeypatch):
    import lora_trainer.text.trainer as tr

    data = _text_data(tmp_path)
    real = tr.loss_sum
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        value = real(logits, labels)
        return value * float("nan") if calls["n"] >= 4 else value

    monkeypatch.setattr(tr, "loss_sum", poisoned)
    bus = EventBus()
    with pytest.raises(tr.TextTrainingError, match="loss became nan at step 4"):
        tr.train_text(_cfg(llama_dir, data, tmp_path / "out", batch_size=4, save_steps=2, epochs=3), bus, StopFlag())
    failed = bus.last
    assert failed.kind == "failed" and str(tmp_path / "out" / "checkpoint-2") in failed.message
    assert sum(e.kind == "failed" for e in bus.since(0)[0]) == 1
    assert (tmp_path / "out" / "checkpoint-2").is_dir() and not (tmp_path / "out" / "checkpoint-4").exists()
    assert not (tmp_path / "out" / "adapter").exists()


def test_validation_and_early_stopping(tmp_path, llama_dir):
    data = _text_data(tmp_path)
    # learning_rate 0: the validation loss never improves after the first epoch -> stop after patience 1
    path, events = _run(_cfg(llama_dir, data, tmp_path / "out", validation_split=0.25, early_stopping_patience=1,
                             learning_rate=0.0, epochs=6, batch_size=3, log_with="tensorboard"))
    vals = [e for e in events if e.kind == "validation"]
    assert [v.epoch for v in vals] == [1, 2]
    assert vals[0].loss == pytest.approx(vals[1].loss, abs=1e-6) and vals[0].loss > 1.0
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 2 * 3  # 9 training lines, batch 3 -> 3 steps per epoch, 2 epochs
    assert any("early stopping" in e.message for e in events if e.kind == "message")
    assert (path / "adapter_model.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "out" / "logs"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("loss/val")] == [3, 6]


def test_packing_and_chat_data_on_gpt2(tmp_path, gpt2_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data"
    _jsonl(data / "chat.jsonl", [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
                                 for p, c in PAIRS])
    path, events = _run(_cfg(gpt2_dir, data, tmp_path / "out", prompt_template="chatml", packing=True,
                             max_seq_length=64, batch_size=2, epochs=2, mixed_precision="bf16",
                             gradient_checkpointing=True))
    assert all(math.isfinite(e.loss) for e in events if e.kind == "step")
    info = [e for e in events if e.kind == "message" and "text data" in e.message][0]
    assert info.data["samples"] == 8 and info.data["train"] < 8  # packed into fewer sequences
    acfg = json.loads((path / "adapter_config.json").read_text())
    assert acfg["target_modules"] == ["c_attn"] and acfg["fan_in_fan_out"] is True
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    ids = tokenizer("<|im_start|>user\ncapital of france?<|im_end|>\n", add_special_tokens=False)["input_ids"]
    before = _logits(base, ids)
    assert (_logits(PeftModel.from_pretrained(base, str(path)), ids) - before).abs().max() > 1e-3


def test_early_stopping_keeps_the_best_epoch(tmp_path, llama_dir, monkeypatch):
    """Scripted validation losses 3.0, 2.0, 2.5, 2.6: patience 2 stops after epoch 4 and the adapter holds the
    weights of epoch 2 (the same as that epoch's checkpoint)."""
    from safetensors.torch import load_file

    import lora_trainer.text.trainer as tr

    real, script = tr.loss_sum, iter([3.0, 2.0, 2.5, 2.6, 9.9])

    def scripted(logits, labels):
        value = real(logits, labels)
        if torch.is_grad_enabled():
            return value
        return torch.tensor(next(script) * tr._n_targets(labels))

    monkeypatch.setattr(tr, "loss_sum", scripted)
    data = _text_data(tmp_path)
    path, events = _run(_cfg(llama_dir, data, tmp_path / "out", validation_split=0.1, early_stopping_patience=2,
                             epochs=8, batch_size=11, save_every_n_epochs=1, learning_rate=1e-2))
    assert [round(e.loss, 6) for e in events if e.kind == "validation"] == [3.0, 2.0, 2.5, 2.6]
    assert [e.step for e in events if e.kind == "checkpoint_saved"] == [1, 2, 3, 4]
    assert "weights of epoch 2" in events[-1].message
    best = load_file(str(tmp_path / "out" / "checkpoint-2" / "adapter" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "out" / "checkpoint-4" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(path / "adapter_model.safetensors"))
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert any(not torch.equal(final[k], last[k]) for k in final)


def test_adapter_path_messages_say_what_is_there(tmp_path):
    from lora_trainer.text.model import read_adapter_config

    (tmp_path / "empty").mkdir()
    (tmp_path / "x.safetensors").write_bytes(b"x")
    cases = {tmp_path / "missing": "does not exist", tmp_path / "empty": "is a folder without adapter_config.json",
             tmp_path / "x.safetensors": "is a file (.safetensors); kohya"}
    for path, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            read_adapter_config(path, "init_lora_weights")
        assert expected in str(info.value)
        if path.suffix:  # a file is not described as lacking a config file it could never hold
            assert "without" not in str(info.value)
