"""Data and environment problems are one line and exit status 2, never a traceback: every case
through launch/train.py's ``main`` (one also as a real process), with the message naming what
to change; a single text file, the first thing a user trains on, leaves a validation split."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lanton_dist.config import ConfigError, DataConfig, RunConfig, check_resume, load_run_config, to_dict
from lanton_dist.data import IndexedWriter, build_dataset, prepare_data, read_indexed

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "llama-tiny-cpu.yaml"
TINY = ["--model.dim", "32", "--model.n_layers", "1", "--model.ffn_dim", "64", "--model.n_heads", "2",
        "--model.n_kv_heads", "2", "--data.seq_len", "16", "--train.global_batch", "2", "--train.steps", "2",
        "--train.eval_every", "2", "--train.eval_batches", "1"]
BOOK = "\n\n".join(f"Paragraph {i}. The quick brown fox jumps over the lazy dog, again and again." for i in range(40))


def _launch_train():
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_main(capsys, tmp_path: Path, *argv: str) -> tuple[int, list[str]]:
    """Exit status and stderr lines of ``launch/train.py --config DEMO TINY argv``."""
    with pytest.raises(SystemExit) as e:
        _launch_train().main(["--config", str(DEMO), *TINY, "--train.out_dir", str(tmp_path / "run"), *argv])
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def indexed_with_ids(prefix: Path, top: int) -> Path:
    with IndexedWriter(prefix, np.uint16) as w:
        for i in range(20):
            w.add_document(np.arange(30) * top // 29)
    return prefix


CASES = [  # (make the input under tmp_path → extra argv, the words the one line must hold)
    (lambda d: ["--data.source", "text", "--data.path", str(put(d / "empty.txt", b""))],
     ["data error: ", "empty.txt", "no documents"]),
    (lambda d: ["--data.source", "text", "--data.path", str(put(d / "blank.txt", b" \n\n \n"))],
     ["data error: ", "blank.txt", "no documents"]),
    (lambda d: ["--data.source", "text", "--data.path", str(put(d / "latin1.txt", b"caf\xe9 au lait " * 20))],
     ["data error: ", "latin1.txt", "not UTF-8", "byte offset 3"]),
    (lambda d: ["--data.source", "jsonl", "--data.path",
                str(put(d / "d.jsonl", b'{"text": "a b c d e f"}\n' * 30 + b'{"body": "x"}\n'))],
     ["data error: ", "d.jsonl:31", "'text'", "found keys ['body']"]),
    (lambda d: ["--data.source", "text", "--data.path", str(put(d / "one.txt", b"one single line, no paragraphs"))],
     ["data error: ", "one.txt", "1 document(s)", "validation split empty", "data.sample_by"]),
    (lambda d: ["--data.source", "text", "--data.path",
                str(put(d / "five.txt", "\n".join(f"line {i} " * 8 for i in range(5)).encode()))],
     ["data error: ", "5 document(s)", "validation split empty", "data.val_fraction >= 0.1"]),
    (lambda d: ["--data.source", "indexed", "--data.path", str(indexed_with_ids(d / "gpt2", 50256))],
     ["data error: ", "token ids in [0, 50256]", "model.vocab_size is 256", "model.vocab_size >= 50257"]),
    (lambda d: ["--model.vocab_size", "100"],
     ["data error: ", "token ids up to 255", "model.vocab_size is 100", "model.vocab_size >= 256"]),
    (lambda d: ["--data.source", "text", "--data.path", str(put(d / "short.txt", b"tiny\n\nfile\n\nhere\n\n" * 4)),
                "--data.val_fraction", "0.25"],
     ["data error: ", "split has", "data.seq_len"]),
    (lambda d: ["--data.source", "text", "--data.path", str(put(d / "b.txt", BOOK.encode())),
                "--data.tokenizer", str(d / "missing.json")],
     ["config error: ", "data.tokenizer", "missing.json", "does not exist"]),
    (lambda d: ["--data.source", "jsonl", "--data.path", str(put(d / "l.jsonl", b'{"text": "a"}\n')),
                "--data.sample_by", "paragraph"],
     ["config error: ", "data.sample_by 'paragraph' is for text files"]),
]


@pytest.mark.parametrize("make, words", CASES, ids=[
    "empty-file", "blank-file", "not-utf8", "jsonl-missing-key", "one-line-file", "too-few-lines", "ids-beyond-vocab",
    "byte-data-small-vocab", "split-shorter-than-a-window", "missing-tokenizer", "jsonl-by-paragraph"])
def test_a_data_problem_is_one_line_naming_the_input_and_exit_2_before_training(capsys, tmp_path, make, words):
    code, lines = run_main(capsys, tmp_path, *make(tmp_path))
    assert code == 2
    assert len(lines) == 1, lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_train_device_cuda_without_a_gpu_is_one_config_error_line(capsys, tmp_path):
    code, lines = run_main(capsys, tmp_path, "--train.device", "cuda")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("config error: train.device is cuda") and "train.device auto or cpu" in lines[0]


def test_a_data_error_in_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    bad = put(tmp_path / "latin1.txt", b"abc " * 100 + b"\xff\xfe" + b" def" * 100)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(DEMO), *TINY,
                          "--data.source", "text", "--data.path", str(bad), "--train.out_dir", str(tmp_path / "run")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"data error: {bad} is not UTF-8 text (invalid start byte at byte offset 400); convert it to UTF-8, "
        "e.g. iconv -f latin1 -t utf-8"], res.stderr


# ----------------------------------------------------------------------------- a single text file
def test_a_single_text_file_defaults_to_paragraph_documents_and_leaves_a_validation_split(tmp_path):
    path = put(tmp_path / "book.txt", BOOK.encode())
    assert DataConfig().sample_by == "auto"
    data = build_dataset(DataConfig(source="text", path=str(path), seq_len=16), 256)
    paragraphs = BOOK.split("\n\n")
    n_train = 38  # round(0.95 * 40) paragraphs
    assert data.train.numel() == sum(len(p) + 1 for p in paragraphs[:n_train])
    assert data.val.numel() == sum(len(p) + 1 for p in paragraphs[n_train:])


def test_a_single_file_without_blank_lines_is_split_by_line_and_several_files_stay_whole(tmp_path):
    lines = [f"line {i}: some text" for i in range(20)]
    one = put(tmp_path / "lines.txt", "\n".join(lines).encode())
    by_line = build_dataset(DataConfig(source="text", path=str(one), seq_len=8), 256)
    assert by_line.train.numel() + by_line.val.numel() == sum(len(t) + 1 for t in lines)
    assert by_line.val.numel() == len(lines[19]) + 1  # round(0.95 * 20) = 19 lines train
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(20):
        put(d / f"{i:02d}.txt", BOOK.encode())  # several files: each one document, paragraphs and all
    whole = build_dataset(DataConfig(source="text", path=str(d), seq_len=8), 256)
    assert whole.val.numel() == len(BOOK) + 1


def test_prepare_data_splits_a_single_file_as_the_text_source_does(tmp_path):
    path = put(tmp_path / "book.txt", BOOK.encode())
    stats = prepare_data([str(path)], tmp_path / "book")
    assert stats.documents == 40
    direct = build_dataset(DataConfig(source="text", path=str(path), seq_len=16), 256)
    indexed = build_dataset(DataConfig(source="indexed", path=str(tmp_path / "book"), seq_len=16), 256)
    assert torch.equal(direct.train, indexed.train) and torch.equal(direct.val, indexed.val)
    assert read_indexed(tmp_path / "book").n_docs == 40


def test_a_single_text_file_trains_with_the_default_config(tmp_path):
    from lanton_dist.trainer import train

    path = put(tmp_path / "book.txt", BOOK.encode())
    cfg = load_run_config(DEMO, [*TINY, "--data.source", "text", "--data.path", str(path),
                                 "--train.out_dir", str(tmp_path / "run")])
    summary = train(cfg, log=lambda _msg: None)
    assert summary["final_val_loss"] is not None
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["sample_by"] == "auto"


def test_a_checkpoint_from_before_sample_by_auto_resumes_where_the_source_does_not_read_it():
    old = to_dict(RunConfig())
    old["data"]["sample_by"] = "document"  # the default a checkpoint written before `auto` stored
    assert check_resume(old, to_dict(RunConfig()), "ckpt") == []  # stdlib: sample_by is not read
    text_old = {**old, "data": {**old["data"], "source": "text", "path": "book.txt"}}
    text_now = to_dict(RunConfig(data=DataConfig(source="text", path="book.txt")))
    with pytest.raises(ConfigError, match="cannot resume from ckpt.*'sample_by': 'document'"):
        check_resume(text_old, text_now, "ckpt")  # a text source: auto may split it differently
    text_now["data"]["sample_by"] = "document"
    assert check_resume(text_old, text_now, "ckpt") == []
