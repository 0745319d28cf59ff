"""Data: the stdlib byte corpus, its file-level split, world-size-independent batches, baselines."""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch

from lanton_dist import data as data_mod
from lanton_dist.config import DataConfig
from lanton_dist.data import SYNTH_BRANCHING, build_dataset, unigram_baseline


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


def test_megatron_source_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="megatron"):
        build_dataset(DataConfig(source="megatron"), 256)


def test_unknown_source_lists_the_supported_ones():
    with pytest.raises(ValueError, match="stdlib.*synthetic"):
        build_dataset(DataConfig(source="c4"), 256)


def test_stdlib_needs_a_byte_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        build_dataset(DataConfig(source="stdlib"), 128)
