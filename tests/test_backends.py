"""The training entry under torchrun with the distributed backends (2 CPU processes, gloo)."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SMALL = ["--model.dim", "64", "--model.n_layers", "2", "--model.ffn_dim", "176", "--data.seq_len", "64",
         "--train.global_batch", "8", "--train.eval_every", "6", "--train.eval_batches", "2", "--train.log_every", "1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, *args: str, nproc: int = 2, fails_with: str | None = None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_port()),
           str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "llama-tiny-cpu.yaml"),
           *SMALL, "--train.out_dir", str(out), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if fails_with is not None:
        assert res.returncode != 0 and fails_with in res.stderr, res.stderr[-5000:]
        return []
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]  # training-step records (step 0 holds only val_loss)


def test_zero_backend_stopped_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    full = _train(tmp_path / "full", "--parallel.backend", "zero", "--train.steps", "12")
    _train(tmp_path / "part", "--parallel.backend", "zero", "--train.steps", "12", "--train.checkpoint_every", "6",
           "--train.stop_after", "6")
    ckpts = sorted((tmp_path / "part" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_00000006"] and (ckpts[-1] / ".metadata").is_file(), "a sharded DCP directory"
    assert_no_pickled_objects(ckpts[-1])
    resumed = _train(tmp_path / "part", "--parallel.backend", "zero", "--train.steps", "12", "--train.resume", "true")
    by_step = {r["step"]: r for r in full}
    later = [r for r in resumed if r["step"] > 6]
    assert [r["step"] for r in later] == list(range(7, 13))
    for r in later:
        assert r["loss"] == by_step[r["step"]]["loss"], r["step"]
    assert full[-1]["loss"] < full[0]["loss"]


def assert_no_pickled_objects(path: Path) -> None:
    """Every entry of the DCP checkpoint at ``path`` is a tensor: DCP would un-pickle any other
    object (its ``BytesStorageMetadata`` entries) with ``torch.load(weights_only=False)``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    objects = [k for k, v in entries.items() if not isinstance(v, TensorStorageMetadata)]
    assert entries and not objects, objects


class PlantedPickle:
    """Un-pickling this creates ``marker`` (it needs only :mod:`pathlib` to load)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(directory: Path, marker: Path) -> None:
    """A ``loop.pkl`` whose un-pickling would create ``marker`` (earlier versions read this file)."""
    payload = pickle.dumps(PlantedPickle(marker))
    pickle.loads(payload)
    assert marker.exists(), "the planted payload must run code when un-pickled"
    marker.unlink()
    (directory / "loop.pkl").write_bytes(payload)


def test_backends_module_does_not_import_the_trainer():
    """No cycle: trainer imports backends, never the reverse (not even lazily on setup)."""
    code = ("import sys, lanton_dist.backends as b; from lanton_dist.config import load_run_config; "
            "from lanton_dist.model import Transformer; cfg = load_run_config(None, ['--train.device', 'cpu']); "
            "b.setup_backend(cfg, Transformer(cfg.model)); print('lanton_dist.trainer' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-3000:]
    import lanton_dist.backends as backends
    import lanton_dist.trainer as trainer

    assert trainer.Backend is backends.Backend and trainer.setup_backend is backends.setup_backend


def test_ddp_backend_and_zero_backend_train_the_same_model_alike(tmp_path):
    """DDP (every rank runs the whole reference optimizer) and the sharded engine see the same
    global batches: their losses agree to fp32 reduction-order noise."""
    zero = _train(tmp_path / "zero", "--parallel.backend", "zero", "--train.steps", "6", "--parallel.overlap", "false")
    ddp = _train(tmp_path / "ddp", "--parallel.backend", "ddp", "--train.steps", "6")
    for a, b in zip(zero, ddp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]


def test_megatron_builds_its_own_model_so_the_transformer_seam_points_to_its_setup():
    from lanton_dist.backends import setup_backend
    from lanton_dist.config import load_run_config
    from lanton_dist.megatron_backend import setup_megatron_backend
    from lanton_dist.model import Transformer

    cfg = load_run_config(None, ["--parallel.backend", "megatron"])
    with pytest.raises(ValueError, match="megatron_backend.setup_megatron_backend"):
        setup_backend(cfg, Transformer(cfg.model))
    with pytest.raises(ValueError, match="takes no optimizer factory"):
        setup_megatron_backend(cfg, lambda model, optim: None)


def test_megatron_data_parallel_size_is_the_world_over_tp_times_pp(monkeypatch):
    from lanton_dist.backends import data_parallel_size
    from lanton_dist.config import load_run_config

    monkeypatch.setenv("WORLD_SIZE", "8")
    assert data_parallel_size(load_run_config(None, ["--parallel.backend", "megatron", "--parallel.tp", "2",
                                                     "--parallel.pp", "2"])) == 2
    assert data_parallel_size(load_run_config(None, ["--parallel.backend", "zero"])) == 8


def test_deepspeed_config_of_a_run_has_one_step_per_global_batch_and_no_clipping():
    from lanton_dist.backends import deepspeed_config
    from lanton_dist.config import load_run_config

    cfg = load_run_config(None, ["--train.global_batch", "16", "--train.micro_batch", "2", "--parallel.zero_stage", "3"])
    ds = deepspeed_config(cfg, world=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.0
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(load_run_config(None, ["--parallel.zero_stage", "0"]), world=2)


def test_deepspeed_skipped_steps_count_the_engines_overflow_skips_with_the_optimizers():
    import types

    import torch

    from lanton_dist.backends import DeepSpeedBackend

    engine = types.SimpleNamespace(skipped_steps=2, module=None)
    optimizer = types.SimpleNamespace(skipped_steps=1)
    assert DeepSpeedBackend(engine, optimizer, torch.device("cpu"), 0, 2).skipped_steps() == 3


def test_distributed_backend_without_torchrun_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--parallel.backend", "zero",
                          "--train.out_dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "torchrun" in res.stderr


@pytest.mark.parametrize("backend, extra", [
    ("fsdp2", []),
    ("deepspeed", ["--parallel.zero_stage", "1"]),
    ("deepspeed", ["--parallel.zero_stage", "3", "--train.micro_batch", "2"]),
], ids=["fsdp2", "deepspeed-zero1", "deepspeed-zero3-accumulation"])
def test_framework_backends_train_like_the_engine_and_resume_exactly(tmp_path, backend, extra):
    """``parallel.backend: fsdp2 | deepspeed`` through launch/train.py: the same losses as our
    engine (same global batches; fp32 reduction order differs), and a run stopped after step 3
    and resumed through the framework's own checkpoint (DCP, ``engine.save_checkpoint``)
    continues exactly. LANTON estimates every 2 steps so the noise factors act in 6 steps."""
    args = ["--train.steps", "6", "--parallel.overlap", "false", "--optim.estimate_every", "2", *extra]
    zero = _train(tmp_path / "zero", "--parallel.backend", "zero", *args)
    full = _train(tmp_path / "full", "--parallel.backend", backend, *args)
    for a, b in zip(zero, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
    _train(tmp_path / "part", "--parallel.backend", backend, *args, "--train.checkpoint_every", "3", "--train.stop_after", "3")
    ckpt = tmp_path / "part" / "checkpoints" / "step_00000003"
    plant_pickle(ckpt, tmp_path / "pwned")
    resumed = _train(tmp_path / "part", "--parallel.backend", backend, *args, "--train.resume", "true")
    assert not (tmp_path / "pwned").exists(), "a planted loop.pkl was un-pickled on resume"
    if backend == "fsdp2":
        assert_no_pickled_objects(ckpt.parent / "step_00000006")
    by_step = {r["step"]: r["loss"] for r in full}
    assert [r["step"] for r in resumed if r["step"] > 3] == [4, 5, 6]
    for r in resumed:
        if r["step"] > 3:
            assert r["loss"] == by_step[r["step"]], r["step"]
    if backend == "deepspeed":  # its checkpoints do not reshard: a clear error, not a silent mis-load
        _train(tmp_path / "part", "--parallel.backend", backend, *args, "--train.resume", "true", nproc=4,
               fails_with="config error: cannot resume from")


def reference_grad_norm(cfg) -> float:
    """Global L2 norm of the first step's gradient in one process: the model the trainer builds
    from ``cfg``'s seed, the whole global batch 0, mean cross-entropy."""
    import torch
    import torch.nn.functional as F

    from lanton_dist.data import build_dataset
    from lanton_dist.model import Transformer

    model = Transformer(cfg.model, seed=cfg.train.seed)
    x, y = build_dataset(cfg.data, cfg.model.vocab_size).get_batch(0, cfg.train.global_batch, 0, 1)
    F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


@pytest.mark.parametrize("backend, extra", [
    ("zero", []),
    ("zero", ["--optim.option", "II", "--optim.estimate_every", "1"]),  # two halves: the pieces combine them
    ("fsdp2", []),
    ("fsdp2", ["--optim.option", "II", "--optim.estimate_every", "1"]),  # two halves: the optimizer's combined Σ G²
    ("ddp", []),
    ("ddp", ["--optim.option", "II", "--optim.estimate_every", "1"]),  # two halves: the optimizer's combined norm
    ("deepspeed", ["--parallel.zero_stage", "2"]),
], ids=["zero", "zero-option-II", "fsdp2", "fsdp2-option-II", "ddp", "ddp-option-II", "deepspeed-zero2"])
def test_logged_grad_norm_equals_the_single_process_global_grad_norm(tmp_path, backend, extra):
    from lanton_dist.config import load_run_config

    args = ["--train.steps", "1", "--train.eval_every", "0", *extra]
    logged = _train(tmp_path, "--parallel.backend", backend, *args)[0]
    cfg = load_run_config(ROOT / "configs" / "llama-tiny-cpu.yaml", [*SMALL, *args])
    assert logged["two_halves"] == ("II" in extra)
    assert logged["grad_norm"] == pytest.approx(reference_grad_norm(cfg), rel=1e-4)
