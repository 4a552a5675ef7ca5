"""`check` with task_type: text-generation reports the text dataset as `train` reads it.

The tokenizer and the tiny Llama are built offline in code (see test_text_generation.py); no test skips for a
missing model.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_trainer.cli import main
from lora_trainer.config import TrainConfig
from test_text_generation import _jsonl, _one_thread, llama_dir, tokenizer  # noqa: F401  (fixtures)


def _data(root: Path) -> Path:
    _jsonl(root / "qa.jsonl", [
        {"prompt": "capital of france?", "completion": " paris"},
        "",
        "{not json",
        {"foo": 1},
        {"prompt": "capital of italy?", "completion": " rome, " + "the quick brown dog " * 30},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "capital of spain? " + "the quick brown dog " * 30, "completion": " madrid"},
    ])
    (root / "lines.txt").write_text("the quick brown fox\n\nthe slow red fox jumps\n", encoding="utf-8")
    (root / "notes.csv").write_text("x,y\n", encoding="utf-8")
    return root


def _cfg(base, data, **kw) -> TrainConfig:
    args = dict(task_type="text-generation", base_model=str(base), train_data_dir=str(data), max_seq_length=40,
                prompt_template="chatml", batch_size=2, epochs=3, device="cpu", log_with="none")
    args.update(kw)
    return TrainConfig(**args)


def test_report_is_what_train_reads(tmp_path, llama_dir, tokenizer):
    from lora_trainer.text.dataset import build_dataset
    from lora_trainer.text.report import build_text_report

    data = _data(tmp_path / "data")
    cfg = _cfg(llama_dir, data)
    report = build_text_report(cfg)
    trained = build_dataset(cfg, tokenizer)
    assert report.usable
    assert report.files == [(str(data / "lines.txt"), 2), (str(data / "qa.jsonl"), 4)]
    assert report.ignored_files == [str(data / "notes.csv")]
    assert report.kinds == {"text": 2, "completion": 3, "chat": 1} and report.n_read == 6
    assert report.n_usable == trained.n_samples == 5
    assert (report.n_train, report.n_val) == (len(trained.train), len(trained.val))
    assert report.lengths == trained.lengths and len(report.lengths) == 6
    # skipped lines with their reasons, by file and line; the long answer is truncated, the long question skipped
    assert [s.split(": ", 1)[0] for s in report.skipped] == [
        f"{data / 'lines.txt'} line 2", f"{data / 'qa.jsonl'} line 2", f"{data / 'qa.jsonl'} line 3",
        f"{data / 'qa.jsonl'} line 4", f"{data / 'qa.jsonl'} line 7"]
    assert "invalid JSON" in report.skipped[2] and "found keys: foo" in report.skipped[3]
    assert "no answer token is left; skipped" in report.skipped[4]
    assert report.n_over == 2 and len(report.truncated) == 1
    assert report.truncated[0].startswith(f"{data / 'qa.jsonl'} line 5: ")
    assert "truncated to max_seq_length 40" in report.truncated[0]
    assert sorted(report.lengths)[-2] > 40 >= sorted(report.lengths)[-3]
    assert report.steps_per_epoch == 3 and report.total_steps == 9 and report.epochs == 3

    text = report.format()
    lengths = sorted(report.lengths)
    assert f"min {lengths[0]}, median {(lengths[2] + lengths[3]) / 2:g}, max {lengths[-1]}" in text
    assert "2 of 6 longer than max_seq_length 40" in text
    assert "files: 2 .txt/.jsonl file(s); 1 other file(s) ignored (.csv)" in text
    assert "samples: 6 read (conversation 1, prompt/completion 3, plain text 2); 5 usable for training" in text
    assert "skipped (5):" in text and "truncated to max_seq_length (1):" in text
    # the first sample as the template renders it, and what of it is trained
    assert f"first sample ({data / 'lines.txt'} line 1) as prompt_template chatml renders it:" in text
    assert "  | <s>the quick brown fox</s>" in text
    assert text.rstrip().endswith("OK: the dataset is usable")


def test_template_rendering_marks_the_trained_part(tmp_path, llama_dir):
    from lora_trainer.text.report import build_text_report

    data = _jsonl(tmp_path / "d" / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]}])
    report = build_text_report(_cfg(llama_dir, data, prompt_template="llama2-inst"))
    assert report.first_rendered == "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST] hello </s>"
    assert report.first_trained == [" hello </s>"]
    text = report.format()
    assert "  | <s>[INST] <<SYS>>\n  | be brief\n  | <</SYS>>\n  | \n  | hi [/INST] hello </s>" in text
    assert "trained on (the rest is context, its labels are -100):\n  |  hello </s>" in text


def test_unusable_datasets_say_why(tmp_path, llama_dir):
    from lora_trainer.text.report import build_text_report

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n", encoding="utf-8")
    report = build_text_report(_cfg(llama_dir, empty))
    assert not report.usable and "no usable training samples" in report.error
    assert report.skipped and "a.txt line 1: empty line" in report.skipped[0]
    assert "UNUSABLE: train_data_dir: no usable training samples" in report.format()

    missing = build_text_report(_cfg(llama_dir, tmp_path / "nope"))
    assert not missing.usable and "does not exist" in missing.error

    chat = _jsonl(tmp_path / "c" / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    no_template = build_text_report(_cfg(llama_dir, chat, prompt_template="none"))
    assert not no_template.usable and "needs a prompt_template" in no_template.error
    assert no_template.n_read == 1 and no_template.kinds == {"chat": 1}

    # without a tokenizer what the files hold is still reported, and why the rest is not
    no_base = build_text_report(_cfg(llama_dir, _data(tmp_path / "data"), base_model=None))
    assert not no_base.usable and "base_model is not set" in no_base.error
    assert no_base.n_read == 6 and len(no_base.skipped) == 4 and not no_base.lengths
    bad_base = build_text_report(_cfg(str(tmp_path / "no" / "model"), chat))
    assert not bad_base.usable and "does not exist" in bad_base.error and bad_base.n_read == 1


def test_check_command_routes_text_datasets(tmp_path, llama_dir, capsys):
    data = _data(tmp_path / "data")
    config = tmp_path / "text.yaml"
    config.write_text(json.dumps({"task_type": "text-generation", "base_model": llama_dir,
                                  "train_data_dir": str(data), "max_seq_length": 40,
                                  "prompt_template": "chatml"}), encoding="utf-8")
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Text dataset check: {data}") and "token lengths" in out
    assert "no images" not in out.lower()
    assert main(["check", "--config", str(config), "--train_data_dir", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().out


@pytest.mark.parametrize("packing", [False, True])
def test_packing_and_validation_counts(tmp_path, llama_dir, packing):
    from lora_trainer.text.report import build_text_report

    data = tmp_path / "lines.txt"
    data.write_text("".join(f"line number {i} of the quick fox\n" for i in range(10)), encoding="utf-8")
    report = build_text_report(_cfg(llama_dir, data, packing=packing, validation_split=0.2, max_train_steps=7))
    assert report.n_usable == 10 and report.total_steps == 7 and report.epochs == 0
    if packing:
        assert report.n_train < 8 and "packed sequence(s)" in report.format()
    else:
        assert (report.n_train, report.n_val) == (8, 2) and "8 sample(s), 2 validation sample(s)" in report.format()
