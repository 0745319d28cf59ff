"""``lanton-dist prepare-data``: text/JSONL files → a Megatron indexed dataset that megatron-core and the
``indexed`` source read back as the documents' tokens, each followed by the end-of-document token."""
from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
import torch

from lanton_dist.cli import main
from lanton_dist.data import build_dataset, read_indexed
from lanton_dist.data.indexed import IndexedWriter
from test_data import DOCS, file_cfg, packed, write_jsonl, write_text_dir
from test_imports import run_without_torch


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_text_dir(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("prepared") / "corpus"
    assert main(["prepare-data", "--input", str(corpus_dir), "--output", str(prefix)]) == 0
    return prefix


def prepare(capsys, *args: str) -> tuple[int, str]:
    """Exit status and stdout+stderr of ``lanton-dist prepare-data ARGS``."""
    try:
        rc = main(["prepare-data", *args])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_round_trip_gives_the_utf8_bytes_of_each_document_then_byte_0(corpus_dir, tmp_path, capsys):
    rc, out = prepare(capsys, "--input", str(corpus_dir), "--output", str(tmp_path / "c"))
    n_tokens = sum(len(d.encode()) + 1 for d in DOCS)
    assert rc == 0 and f"30 documents, {n_tokens:,} tokens (uint8; tokenizer bytes, vocab 256, end-of-document id 0)" in out
    docs = read_indexed(tmp_path / "c")
    assert torch.equal(torch.from_numpy(np.asarray(docs.tokens)), packed(DOCS))
    assert docs.starts.tolist() == np.cumsum([0] + [len(d.encode()) + 1 for d in DOCS]).tolist()


def test_indexed_source_on_prepared_files_equals_the_text_source(corpus_dir, prepared):
    text = build_dataset(file_cfg("text", corpus_dir), 256)
    for source in ("indexed", "megatron"):
        indexed = build_dataset(file_cfg(source, prepared), 256)
        assert torch.equal(indexed.train, text.train) and torch.equal(indexed.val, text.val)
        for world in (1, 3):
            for rank in range(world):
                a, b = indexed.get_batch(9, 6, rank, world, split="val"), text.get_batch(9, 6, rank, world, split="val")
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_jsonl_inputs_are_detected_and_read_under_the_given_key(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:10], key="body")
    write_jsonl(tmp_path / "b.jsonl", DOCS[10:], key="body")
    rc, out = prepare(capsys, "--input", str(tmp_path / "a.jsonl"), "--input", str(tmp_path / "b.jsonl"),
                      "--jsonl-key", "body", "--output", str(tmp_path / "j"))
    assert rc == 0 and "30 documents" in out
    assert torch.equal(torch.from_numpy(np.asarray(read_indexed(tmp_path / "j").tokens)), packed(DOCS))
    rc, out = prepare(capsys, "--input", str(tmp_path), "--jsonl-key", "body", "--output", str(tmp_path / "d"))
    assert rc == 0 and "30 documents" in out  # a directory of .jsonl files
    rc, out = prepare(capsys, "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "k"))
    assert rc == 2 and "a.jsonl:1: expected a JSON object with a string under 'text'" in out
    (tmp_path / "c.txt").write_text("plain")
    rc, out = prepare(capsys, "--input", str(tmp_path / "a.jsonl"), "--input", str(tmp_path / "c.txt"), "--output", str(tmp_path / "m"))
    assert rc == 2 and "mix JSONL and other files" in out


def test_bad_input_exits_2_and_leaves_no_dataset_behind(corpus_dir, tmp_path, capsys):
    prefix = tmp_path / "out"
    rc, out = prepare(capsys, "--input", str(tmp_path / "missing.txt"), "--output", str(prefix))
    assert rc == 2 and "missing.txt does not exist" in out
    (tmp_path / "blank.txt").write_text("\n \n")
    assert prepare(capsys, "--input", str(corpus_dir), "--output", str(prefix))[0] == 0
    rc, out = prepare(capsys, "--input", str(tmp_path / "blank.txt"), "--output", str(prefix))
    assert rc == 2 and "no documents" in out
    assert not list(tmp_path.glob("out.*"))  # the earlier dataset at that prefix is gone too, not half-replaced


def test_indexed_reader_refuses_broken_files(prepared, tmp_path):
    for ext in (".bin", ".idx"):
        (tmp_path / f"c{ext}").write_bytes(Path(f"{prepared}{ext}").read_bytes())
    n = sum(len(d.encode()) + 1 for d in DOCS)
    (tmp_path / "c.bin").write_bytes((tmp_path / "c.bin").read_bytes()[:-1])
    with pytest.raises(ValueError, match=f"c.bin has {n - 1} bytes; its index describes {n} uint8 tokens"):
        read_indexed(tmp_path / "c")
    idx = bytearray((tmp_path / "c.idx").read_bytes())
    idx[:9] = b"NOTANIDX\0"
    (tmp_path / "c.idx").write_bytes(bytes(idx))
    with pytest.raises(ValueError, match="not a Megatron index"):
        read_indexed(tmp_path / "c")


def test_indexed_token_ids_must_fit_the_model_vocabulary(tmp_path):
    with IndexedWriter(tmp_path / "w", np.uint16) as w:
        for i in range(20):
            w.add_document(np.arange(i, i + 30) * 10)
    assert build_dataset(file_cfg("indexed", tmp_path / "w"), 500).vocab_size == 500
    with pytest.raises(ValueError, match=r"token ids in \[0, 480\]; model.vocab_size is 300"):
        build_dataset(file_cfg("indexed", tmp_path / "w"), 300)
    with pytest.raises(ValueError, match="do not fit uint8"):
        with IndexedWriter(tmp_path / "v", np.uint8) as w:
            w.add_document(np.array([1, 256]))
    assert not list(tmp_path.glob("v.*"))


# ---------------------------------------------------------------------------- tokenizer.json
WORDS = ["<unk>", "<|endoftext|>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "."]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    tokenizers = pytest.importorskip(
        "tokenizers", reason="the optional 'tokenizers' package is not installed (pip install 'lanton_dist[data]')"
    )
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizer_json_ids_then_its_endoftext_token(tokenizer_json, tmp_path, capsys):
    docs = ["the cat sat on the mat.", "a dog ran", "the bird sat"] * 8
    write_text_dir(tmp_path / "docs", docs)
    rc, out = prepare(capsys, "--input", str(tmp_path / "docs"), "--tokenizer", str(tokenizer_json), "--output", str(tmp_path / "t"))
    assert rc == 0 and "24 documents, 128 tokens (uint8" in out and "vocab 11, end-of-document id 1" in out
    expected = [2, 3, 4, 5, 2, 6, 10, 1, 7, 8, 9, 1, 2, 0, 4, 1] * 8  # 'bird' is <unk> (0)
    assert np.asarray(read_indexed(tmp_path / "t").tokens).tolist() == expected
    cfg = file_cfg("text", tmp_path / "docs", tokenizer=str(tokenizer_json), val_fraction=0.25)
    data = build_dataset(cfg, 16)
    assert data.vocab_size == 11 and torch.cat([data.train, data.val]).tolist() == expected
    with pytest.raises(ValueError, match="tokenizer.json has 11 tokens.*model.vocab_size is 8"):
        build_dataset(cfg, 8)


def test_tokenizer_end_of_document_token_can_be_named_and_must_exist(tokenizer_json, tmp_path, capsys):
    write_text_dir(tmp_path / "docs", ["the cat", "a dog"])
    rc, out = prepare(capsys, "--input", str(tmp_path / "docs"), "--tokenizer", str(tokenizer_json), "--eod-token", ".",
                      "--output", str(tmp_path / "t"))
    assert rc == 0 and np.asarray(read_indexed(tmp_path / "t").tokens).tolist() == [2, 3, 10, 7, 8, 10]
    rc, out = prepare(capsys, "--input", str(tmp_path / "docs"), "--tokenizer", str(tokenizer_json), "--eod-token", "</s>",
                      "--output", str(tmp_path / "u"))
    assert rc == 2 and "has no end-of-document token '</s>'" in out


def test_prepare_data_runs_with_torch_blocked(corpus_dir, tmp_path):
    proc = run_without_torch(f"""
        from lanton_dist.cli import main
        assert main(["prepare-data", "--input", {str(corpus_dir)!r}, "--output", {str(tmp_path / "nt")!r}]) == 0
    """)
    assert proc.returncode == 0, proc.stderr
    assert "30 documents" in proc.stdout and (tmp_path / "nt.idx").exists()


# ---------------------------------------------------------------------------- megatron-core compatibility
@pytest.mark.slow
def test_megatron_core_reads_writes_and_splits_the_same_dataset(prepared, tmp_path):
    """megatron-core's IndexedDataset reads prepare-data's files document by document; its
    IndexedDatasetBuilder writes the same bytes; its GPTDataset holds out the same documents as
    the ``indexed`` source; and our reader handles documents of several sequences."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from lanton_dist.data import build_gpt_datasets

    theirs = IndexedDataset(str(prepared))
    assert len(theirs) == 30 and theirs.document_indices.tolist() == list(range(31))
    for i, doc in enumerate(DOCS):
        assert theirs[i].tolist() == list(doc.encode()) + [0]

    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint8)
    for doc in DOCS:
        builder.add_document(np.array(list(doc.encode()) + [0]), [len(doc.encode()) + 1])
    builder.finalize(str(tmp_path / "m.idx"))
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(f"{prepared}{ext}", tmp_path / f"m{ext}", shallow=False), ext

    cfg = file_cfg("megatron", prepared)
    train, valid = build_gpt_datasets(cfg, 256, train_samples=8, valid_samples=4, cache_dir=tmp_path / "cache")
    assert train.indices.tolist() == list(range(24)) and valid.indices.tolist() == list(range(24, 30))
    assert torch.equal(build_dataset(cfg, 256).val, packed(DOCS[24:]))
    with pytest.raises(FileNotFoundError, match="nope.bin does not exist"):
        build_gpt_datasets(file_cfg("megatron", tmp_path / "nope"), 256, 8, 4, tmp_path / "cache")

    multi = IndexedDatasetBuilder(str(tmp_path / "s.bin"), dtype=np.uint16)
    multi.add_document(np.arange(5), [2, 3])
    multi.add_document(np.arange(7, 9), [2])
    multi.add_document(np.arange(3), [1, 1, 1])
    multi.finalize(str(tmp_path / "s.idx"))
    docs = read_indexed(tmp_path / "s")
    assert docs.tokens.dtype == np.uint16 and docs.starts.tolist() == [0, 5, 7, 10]
