"""Data: the built-in corpora (stdlib, synthetic), text and JSONL files, indexed datasets; document-level
splits, world-size-independent batches, baselines, and clear errors for bad input."""
from __future__ import annotations

import json
import math
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from lanton_dist.config import DataConfig
from lanton_dist.data import SYNTH_BRANCHING, build_dataset, unigram_baseline
from lanton_dist.data import builtin as data_mod
from lanton_dist.data import dataset as dataset_mod

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stdlib():
    return build_dataset(DataConfig(source="stdlib", seq_len=64, seed=3), 256)


def test_stdlib_corpus_is_nonempty_bytes_and_deterministic(stdlib):
    assert stdlib.train.numel() > 1_000_000 and stdlib.val.numel() > 10_000
    assert stdlib.train.dtype == torch.uint8
    data_mod._stdlib_corpus.cache_clear()
    again = build_dataset(DataConfig(source="stdlib", seq_len=64, seed=3), 256)
    assert torch.equal(stdlib.train, again.train) and torch.equal(stdlib.val, again.val)
    assert stdlib.train_files == again.train_files
    assert b"def " in bytes(stdlib.train[:200_000].tolist())  # it is Python source


def test_stdlib_corpus_is_capped_near_the_fixed_size(stdlib):
    root = Path(sysconfig.get_paths()["stdlib"])
    included = sorted(stdlib.train_files + stdlib.val_files)
    assert len(included) < len(data_mod.stdlib_files())  # the cap cut the file list
    total = sum((root / f).stat().st_size for f in included)
    last = (root / included[-1]).stat().st_size
    assert total - last < data_mod.STDLIB_MAX_BYTES <= total
    assert stdlib.train.numel() + stdlib.val.numel() >= total  # every byte made it (plus separators)


def test_validation_files_are_disjoint_from_training_files(stdlib):
    assert stdlib.val_files and stdlib.train_files
    assert not set(stdlib.val_files) & set(stdlib.train_files)
    assert not any("site-packages" in f for f in stdlib.train_files + stdlib.val_files)
    frac = len(stdlib.val_files) / (len(stdlib.val_files) + len(stdlib.train_files))
    assert 0.01 < frac < 0.15  # val_fraction 0.05, by file hash


@pytest.mark.parametrize("world", [2, 4, 8])
def test_global_batch_is_identical_across_world_sizes(stdlib, world):
    x1, y1 = stdlib.get_batch(11, 8, rank=0, world=1)
    parts = [stdlib.get_batch(11, 8, rank=r, world=world) for r in range(world)]
    assert all(p[0].shape == (8 // world, 64) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), x1)
    assert torch.equal(torch.cat([p[1] for p in parts]), y1)


def test_targets_are_the_next_tokens_and_steps_differ(stdlib):
    x, y = stdlib.get_batch(0, 4)
    assert x.dtype == torch.int64 and x.shape == (4, 64)
    assert torch.equal(x[:, 1:], y[:, :-1])
    x_again, _ = stdlib.get_batch(0, 4)
    x_next, _ = stdlib.get_batch(1, 4)
    xv, _ = stdlib.get_batch(0, 4, split="val")
    assert torch.equal(x, x_again)
    assert not torch.equal(x, x_next) and not torch.equal(x, xv)


def test_batch_depends_on_the_data_seed():
    a = build_dataset(DataConfig(source="stdlib", seq_len=32, seed=0), 256).get_batch(0, 4)[0]
    b = build_dataset(DataConfig(source="stdlib", seq_len=32, seed=1), 256).get_batch(0, 4)[0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0, world=3), "not divisible by world size 3"),
    (dict(rank=2, world=2), "0 <= rank < world"),
    (dict(split="test"), "unknown split"),
])
def test_bad_batch_requests_are_clear_errors(stdlib, kwargs, message):
    with pytest.raises(ValueError, match=message):
        stdlib.get_batch(0, 8, **kwargs)


def test_unigram_baseline_of_stdlib_is_sane(stdlib):
    u = unigram_baseline(stdlib.train, stdlib.val)
    assert 2.0 < u < 5.5


def test_unigram_baseline_matches_hand_computation():
    uniform = torch.arange(256).repeat(10)
    assert unigram_baseline(uniform, torch.tensor([0, 5, 255])) == pytest.approx(math.log(256))
    # train: 'a' ×7, 'b' ×1 over vocab 4 (add-one: 8, 2, 1, 1 of 12); val: one 'a', one 'b'
    train = torch.tensor([0] * 7 + [1])
    expected = -(math.log(8 / 12) + math.log(2 / 12)) / 2
    assert unigram_baseline(train, torch.tensor([0, 1]), vocab_size=4) == pytest.approx(expected)


def test_synthetic_source_is_deterministic_and_learnable():
    cfg = DataConfig(source="synthetic", seq_len=32, seed=7)
    a, b = build_dataset(cfg, 64), build_dataset(cfg, 64)
    assert torch.equal(a.train, b.train) and a.train.max() < 64
    assert not torch.equal(a.train[:1000], build_dataset(DataConfig(source="synthetic", seq_len=32, seed=8), 64).train[:1000])
    # every token is followed by at most SYNTH_BRANCHING distinct tokens (within a walk)
    t = a.train[: data_mod.SYNTH_TRAIN_TOKENS // 4096]  # the first walk
    pairs = set(zip(t[:-1].tolist(), t[1:].tolist()))
    successors: dict[int, set[int]] = {}
    for u, v in pairs:
        successors.setdefault(u, set()).add(v)
    assert max(len(s) for s in successors.values()) <= SYNTH_BRANCHING
    assert unigram_baseline(a.train, a.val, 64) > math.log(SYNTH_BRANCHING) + 1.0


def test_unknown_source_lists_the_supported_ones():
    with pytest.raises(ValueError, match="stdlib.*synthetic.*text.*jsonl.*indexed"):
        build_dataset(DataConfig(source="c4"), 256)


def test_stdlib_needs_a_byte_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        build_dataset(DataConfig(source="stdlib"), 128)


# ---------------------------------------------------------------------------- text and JSONL files
SEQ = 16
#: 30 documents of 3..80 bytes (several shorter than a SEQ + 1 window), each with its index.
DOCS = [f"doc {i:02d}: " + "abcdefghij"[i % 10] * (i * 7 % 71) for i in range(30)]


def write_text_dir(root: Path, docs: list[str] = DOCS) -> Path:
    """One file per document, named so that sorted order is document order."""
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / f"{i:03d}.txt").write_text(doc)
    return root


def write_jsonl(path: Path, docs: list[str] = DOCS, key: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, key: d}) + "\n" for i, d in enumerate(docs)))
    return path


def put(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def packed(docs: list[str]) -> torch.Tensor:
    """The byte tokens of ``docs``, each followed by the end-of-document byte 0."""
    return torch.tensor(list(b"".join(d.encode() + b"\0" for d in docs)), dtype=torch.uint8)


def file_cfg(source: str, path: Path, **kw) -> DataConfig:
    return DataConfig(source=source, path=str(path), seq_len=SEQ, val_fraction=kw.pop("val_fraction", 0.2), seed=5, **kw)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_text_dir(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module", params=["text", "jsonl"])
def file_data(request, corpus_dir, tmp_path_factory):
    path = corpus_dir if request.param == "text" else write_jsonl(tmp_path_factory.mktemp("jsonl") / "docs.jsonl")
    return build_dataset(file_cfg(request.param, path), 256)


def test_file_sources_pack_documents_with_end_of_document_bytes_and_hold_out_the_last_ones(file_data):
    # 30 documents, val_fraction 0.2: Megatron's split keeps round(0.8 * 30) = 24 for training
    assert torch.equal(file_data.train, packed(DOCS[:24]))
    assert torch.equal(file_data.val, packed(DOCS[24:]))
    assert file_data.vocab_size == 256 and file_data.source in ("text", "jsonl")


def test_no_validation_document_appears_in_training(file_data):
    train_text = bytes(file_data.train.tolist())
    val_docs = bytes(file_data.val.tolist()).split(b"\0")[:-1]
    assert len(val_docs) == 6
    assert not any(d in train_text for d in val_docs)


@pytest.mark.parametrize("world", [2, 3, 6])
def test_file_source_global_batch_is_identical_across_world_sizes(file_data, world):
    for split in ("train", "val"):
        x1, y1 = file_data.get_batch(4, 6, split=split)
        parts = [file_data.get_batch(4, 6, rank=r, world=world, split=split) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1) and torch.equal(torch.cat([p[1] for p in parts]), y1)
    assert torch.equal(x1[:, 1:], y1[:, :-1])


def test_file_source_batches_are_deterministic_across_builds(corpus_dir):
    a = build_dataset(file_cfg("text", corpus_dir), 256)
    b = build_dataset(file_cfg("text", corpus_dir), 256)
    assert torch.equal(a.get_batch(7, 8)[0], b.get_batch(7, 8)[0])
    assert not torch.equal(a.get_batch(7, 8)[0], a.get_batch(8, 8)[0])
    windows = torch.cat([a.get_batch(s, 8)[0] for s in range(20)])
    assert (windows == 0).any()  # windows cross document boundaries (documents are packed)


def test_text_and_jsonl_sources_agree_on_the_same_documents(corpus_dir, tmp_path):
    text = build_dataset(file_cfg("text", corpus_dir), 256)
    jsonl = build_dataset(file_cfg("jsonl", write_jsonl(tmp_path / "d.jsonl", key="body"), text_key="body"), 256)
    assert torch.equal(text.train, jsonl.train) and torch.equal(text.val, jsonl.val)
    assert torch.equal(text.get_batch(3, 4)[0], jsonl.get_batch(3, 4)[0])


def test_text_path_may_be_a_glob_and_a_single_file_split_by_paragraph_or_line(corpus_dir, tmp_path):
    globbed = build_dataset(file_cfg("text", f"{corpus_dir}/0[0-1]*.txt"), 256)
    assert torch.equal(torch.cat([globbed.train, globbed.val]), packed(DOCS[:20]))
    one = tmp_path / "book.txt"
    one.write_text("\n\n".join(DOCS[:10]) + "\n  \n" + "\n".join(DOCS[10:]))
    by_paragraph = build_dataset(file_cfg("text", one, sample_by="paragraph", val_fraction=0.05), 256)
    assert torch.equal(by_paragraph.train, packed(DOCS[:10]))  # 11 paragraphs: round(0.95 * 11) = 10 train
    assert torch.equal(by_paragraph.val, packed(["\n".join(DOCS[10:])]))
    by_line = build_dataset(file_cfg("text", one, sample_by="line"), 256)
    assert torch.equal(torch.cat([by_line.train, by_line.val]), packed(DOCS))


def test_unigram_baseline_counts_in_chunks_exactly(monkeypatch, file_data):
    whole = unigram_baseline(file_data.train, file_data.val)
    monkeypatch.setattr(dataset_mod, "_BINCOUNT_CHUNK", 7)
    assert unigram_baseline(file_data.train, file_data.val) == whole


@pytest.mark.parametrize("write, kw, message", [
    (lambda d: d / "missing", {}, "missing does not exist"),
    (lambda d: d / "nothing-*.txt", {}, "matches no files"),
    (lambda d: (d / "empty").mkdir() or d / "empty", {}, "has no .txt files"),
    (lambda d: put(d / "blank.txt", b" \n\n "), {}, "no documents"),
    (lambda d: put(d / "one.txt", b"x" * 100), {}, "1 document.*validation split empty.*sample_by"),
    (lambda d: put(d / "nul.txt", b"a\0b"), {}, "nul.txt: text contains a NUL byte"),
    (lambda d: put(d / "latin1.txt", b"caf\xe9"), {}, "latin1.txt is not UTF-8"),
    (lambda d: write_text_dir(d / "c"), dict(val_fraction=0.01), "validation split empty"),
    (lambda d: write_text_dir(d / "c"), dict(sample_by="sentence"), "unknown sample_by"),
    (lambda d: write_text_dir(d / "c"), dict(eod_token="</s>"), "needs a tokenizer"),
])
def test_bad_text_input_is_a_clear_error(tmp_path, write, kw, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_dataset(file_cfg("text", write(tmp_path), **kw), 256)


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', "not json"], r"d.jsonl:2: not a JSON line"),
    (['{"body": "a"}'], r"d.jsonl:1: expected a JSON object with a string under 'text'"),
    (['["a"]'], "expected a JSON object"),
    (["", '{"text": ""}'], "no documents"),
    (['{"text": "a"}', '{"text": "b\\u0000"}'], r"d.jsonl:2: text contains a NUL byte"),
])
def test_bad_jsonl_input_is_a_clear_error(tmp_path, lines, message):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        build_dataset(file_cfg("jsonl", tmp_path / "d.jsonl"), 256)


def test_jsonl_lines_are_the_documents(tmp_path):
    with pytest.raises(ValueError, match="sample_by 'line' is for text files; a JSONL line is one document"):
        build_dataset(file_cfg("jsonl", write_jsonl(tmp_path / "d.jsonl"), sample_by="line"), 256)


def test_byte_data_needs_a_byte_vocabulary(corpus_dir):
    with pytest.raises(ValueError, match="vocab_size is 128"):
        build_dataset(file_cfg("text", corpus_dir), 128)


def test_a_tokenizer_file_without_the_tokenizers_package_is_a_clear_error(monkeypatch, corpus_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ImportError, match=r"needs the 'tokenizers' package.*lanton_dist\[data\]"):
        build_dataset(file_cfg("text", corpus_dir, tokenizer=str(tmp_path / "tokenizer.json")), 256)


@pytest.mark.parametrize("source", ["indexed", "megatron"])
def test_indexed_source_needs_an_existing_prefix(tmp_path, source):
    with pytest.raises(ValueError, match=f"data.source {source} needs data.path"):
        build_dataset(DataConfig(source=source), 256)
    with pytest.raises(FileNotFoundError, match=r"nope.bin does not exist \(give the prefix"):
        build_dataset(DataConfig(source=source, path=str(tmp_path / "nope")), 256)


@pytest.mark.slow
def test_trainer_learns_from_a_text_file(tmp_path):
    """launch/train.py's loop (lanton_dist.trainer.train) consumes a text source unchanged."""
    from lanton_dist.config import load_run_config
    from lanton_dist.trainer import train

    lines = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    n_train = 380  # round(0.95 * 400) lines; each line's bytes + the end-of-document byte
    train_tokens, val_tokens = sum(len(t) + 1 for t in lines[:n_train]), sum(len(t) + 1 for t in lines[n_train:])
    cfg = load_run_config(ROOT / "configs" / "llama-tiny-cpu.yaml", [
        "--data.source", "text", "--data.path", str(path), "--data.sample_by", "line", "--data.seq_len", "32",
        "--model.dim", "32", "--model.n_layers", "1", "--model.ffn_dim", "64", "--model.n_heads", "2", "--model.n_kv_heads", "2",
        "--train.steps", "3", "--train.global_batch", "4", "--train.eval_every", "3", "--train.eval_batches", "1",
        "--train.log_every", "1", "--train.out_dir", str(tmp_path / "run")])
    logs: list[str] = []
    summary = train(cfg, log=logs.append)
    assert summary["steps"] == 3 and math.isfinite(summary["final_val_loss"])
    assert any(f"text data: {train_tokens:,} train / {val_tokens:,} val tokens" in line for line in logs), logs
