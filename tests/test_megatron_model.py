"""Megatron-core LLaMA on CPU (gloo + lanton_dist.integrations.megatron_cpu): TP=2 and PP=2 against
TP=1/PP=1, the logical parameter specs LANTON sees, and ``launch/train.py --parallel.backend megatron``
end to end (the same loop, logs, checkpoints and exit codes as every other backend)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lanton_dist.config import load_run_config  # noqa: E402
from lanton_dist.groups import Geometry  # noqa: E402
from lanton_dist.integrations import megatron_cpu  # noqa: E402
from lanton_dist.integrations import megatron_model as mm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"

TINY = {
    "model.vocab_size": 64, "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
    "model.ffn_dim": 48, "model.max_seq_len": 16, "data.seq_len": 16, "data.source": "synthetic",
    "parallel.backend": "megatron", "train.seed": 3,
}


def tiny_cfg(**extra):
    items = {**TINY, **{k.replace("__", "."): v for k, v in extra.items()}}
    return load_run_config(None, [f"--{k}={v}" for k, v in items.items()])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int = 2, *args) -> None:
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)


def _entry(rank, fn, world, port, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    megatron_cpu.install()
    try:
        fn(rank, *args)
    finally:
        mm.destroy_model_parallel()
        dist.destroy_process_group()


def _batch(cfg, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (n, cfg.data.seq_len + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _loss(model, cfg, tokens, labels):
    pos = torch.arange(cfg.data.seq_len).expand_as(tokens)
    return model(tokens, pos, mm.causal_attention_mask(cfg.data.seq_len), labels=labels).mean()


# ----------------------------------------------------------------------------- fast, single process
def test_layout_checks():
    cfg = tiny_cfg(parallel__tp=2, parallel__pp=2)
    assert mm.check_parallel_layout(cfg, 8) == 2
    with pytest.raises(ValueError, match="not divisible by tp\\*pp"):
        mm.check_parallel_layout(cfg, 6)
    with pytest.raises(ValueError, match="n_kv_heads 2 not divisible by parallel.tp 4"):
        mm.check_parallel_layout(tiny_cfg(parallel__tp=4), 4)
    with pytest.raises(ValueError, match="n_layers 2 not divisible by parallel.pp 4"):
        mm.check_parallel_layout(tiny_cfg(parallel__pp=4), 4)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        mm.check_parallel_layout(tiny_cfg(data__seq_len=32), 1)
    for name in ("llama-7b", "llama-1b"):
        cfg = load_run_config(ROOT / "configs" / f"{name}.yaml")
        world = 32 if name == "llama-7b" else 8
        assert mm.check_parallel_layout(cfg, world) >= 1
        assert cfg.parallel.backend == "megatron"


def test_strided_blocks_follow_the_gathered_layout():
    # TP=2, SwiGLU fc1 with F=4 rows per matrix: rank r holds [gate_r; up_r] (2 rows each)
    gate, up = mm._strided_blocks("fc1", 8, tp=2, stride=2, labels=["gate", "up"])
    assert gate.rows == ((0, 2), (4, 6)) and up.rows == ((2, 4), (6, 8))
    (only,) = mm._strided_blocks("w", 6, tp=3, stride=1, labels=["0"])
    assert only.rows == ((0, 2), (2, 4), (4, 6))


def test_shim_install_and_uninstall():
    if torch.cuda.is_available():
        pytest.skip("the shim refuses to run where CUDA exists")
    original = torch.cuda.current_device
    megatron_cpu.install()
    try:
        assert torch.cuda.current_device() == torch.device("cpu")
        from megatron.core.pipeline_parallel import schedules
        assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    finally:
        megatron_cpu.uninstall()
    assert torch.cuda.current_device is original
    from megatron.core.pipeline_parallel import schedules
    assert schedules.torch is torch


def test_option_two_on_megatron_needs_an_even_per_replica_batch():
    from lanton_dist.config import ConfigError, check_run_config

    check_run_config(tiny_cfg(optim__option="II", train__global_batch=8, train__micro_batch=2), data_parallel=2)
    with pytest.raises(ConfigError, match="optim.option II splits each rank's batch in two halves"):
        check_run_config(tiny_cfg(optim__option="II", train__global_batch=6, train__micro_batch=0), data_parallel=2)


def test_megatron_on_a_cpu_only_machine_runs_only_when_train_device_says_cpu():
    if torch.cuda.is_available():
        pytest.skip("about machines without CUDA")
    from lanton_dist.config import ConfigError
    from lanton_dist.megatron_backend import setup_megatron_backend

    with pytest.raises(ConfigError, match="train.device auto found no CUDA device: Megatron-core needs CUDA"):
        setup_megatron_backend(tiny_cfg(train__device="auto"))
    assert not dist.is_initialized() and not megatron_cpu.installed()


def test_a_layout_the_world_does_not_allow_is_a_config_error_that_leaves_no_group_or_shim_behind():
    if torch.cuda.is_available():
        pytest.skip("runs Megatron on the CPU")
    from lanton_dist.config import ConfigError
    from lanton_dist.megatron_backend import setup_megatron_backend

    with pytest.raises(ConfigError, match="world size 1 is not divisible by tp\\*pp = 3\\*1"):
        setup_megatron_backend(tiny_cfg(parallel__tp=3, train__device="cpu"))
    assert not dist.is_initialized() and not megatron_cpu.installed()


def test_requires_distributed_and_cuda_or_shim():
    with pytest.raises(RuntimeError, match="init_process_group"):
        mm.initialize_model_parallel(tiny_cfg())


# ----------------------------------------------------------------------------- TP = 2 vs TP = 1
def _tp_worker(rank, out_dir):
    cfg2 = tiny_cfg(parallel__tp=2)
    mm.initialize_model_parallel(cfg2)
    model = mm.build_gpt_model(cfg2)
    specs = mm.logical_param_specs(model, cfg2)
    m = cfg2.model
    hd = m.dim // m.n_heads
    assert set(specs) == {n for n, _ in model.named_parameters()}

    # the specs describe the gathered tensors; gather∘shard is the identity
    gathered = {}
    for name, p in model.named_parameters():
        info = specs[name]
        full = mm.tp_gather(p.data, info)
        assert tuple(full.shape) == info.spec.shape
        assert torch.equal(mm.tp_shard(full, info), p.data)
        assert torch.equal(mm.from_tp1_layout(mm.to_tp1_layout(full, info), info), full)
        gathered[info.global_name] = mm.to_tp1_layout(full, info)
        leaf = name.split(".")[-2]
        if leaf == "linear_qkv":
            assert info.partition_dim == 0 and [b.name.rsplit(":", 1)[1] for b in info.spec.blocks] == ["q", "k", "v"]
            # each rank holds whole query groups: its shard is [q_g; k_g; v_g] for its groups
            local = p.data.view(m.n_kv_heads // 2, -1, m.dim)
            q_per = m.n_heads // m.n_kv_heads * hd
            q, k, v = (b.gather(full) for b in info.spec.blocks)
            g0 = rank * (m.n_kv_heads // 2)
            for j in range(m.n_kv_heads // 2):
                g = g0 + j
                assert torch.equal(local[j, :q_per], q[g * q_per:(g + 1) * q_per])
                assert torch.equal(local[j, q_per:q_per + hd], k[g * hd:(g + 1) * hd])
                assert torch.equal(local[j, q_per + hd:], v[g * hd:(g + 1) * hd])
        elif leaf == "linear_fc1":
            assert info.stride == 2 and info.spec.shape == (2 * m.ffn_dim, m.dim)
            gate, up = info.spec.blocks
            assert gate.name.endswith(":gate") and up.name.endswith(":up")
            half = m.ffn_dim // 2
            assert torch.equal(p.data[:half], gate.gather(full)[rank * half:(rank + 1) * half])
            assert torch.equal(p.data[half:], up.gather(full)[rank * half:(rank + 1) * half])
        elif leaf in ("linear_proj", "linear_fc2"):
            assert info.partition_dim == 1 and info.spec.geometry is Geometry.HIDDEN
        elif leaf == "word_embeddings":
            assert info.partition_dim == 0 and info.spec.geometry is Geometry.EMBED_HEAD and info.spec.role == "embed"
        elif leaf == "output_layer":
            assert info.partition_dim == 0 and info.spec.role == "head"
        else:
            assert info.partition_dim is None and info.spec.geometry is Geometry.VECTOR

    tokens, labels = _batch(cfg2)
    loss2 = _loss(model, cfg2, tokens, labels)
    loss2.backward()
    grads2 = {specs[n].global_name: mm.to_tp1_layout(mm.tp_gather(p.grad, specs[n]), specs[n])
              for n, p in model.named_parameters()}

    from lanton_dist.engine import ShardedLANTON
    from lanton_dist.megatron_backend import make_optimizer

    assert isinstance(make_optimizer(model, cfg2), ShardedLANTON)  # TP > 1: the TP-aware engine

    # the same seed at TP=1 builds the same logical model (CPU init draws full master weights)
    cfg1 = tiny_cfg()
    mm.initialize_model_parallel(cfg1)
    ref = mm.build_gpt_model(cfg1)
    specs1 = mm.logical_param_specs(ref, cfg1)
    for name, p in ref.named_parameters():
        info = specs1[name]
        assert info.spec.shape == tuple(gathered[info.global_name].shape)
        torch.testing.assert_close(p.data, gathered[info.global_name], rtol=0, atol=0, msg=name)
        # the blocks of a TP=1 spec are the same logical matrices
        if name.endswith("linear_fc1.weight"):
            assert [b.rows for b in info.spec.blocks] == [((0, m.ffn_dim),), ((m.ffn_dim, 2 * m.ffn_dim),)]
    loss1 = _loss(ref, cfg1, tokens, labels)
    loss1.backward()
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, grads2[specs1[name].global_name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_tp2_forward_backward_matches_tp1(tmp_path):
    spawn(_tp_worker, 2, str(tmp_path))


# ----------------------------------------------------------------------------- PP = 2 vs PP = 1
def _schedule(stage, cfg, x, y, micro):
    """``x, y`` through :class:`MegatronBackend`'s schedule (forward + backward): the global mean loss."""
    from lanton_dist.megatron_backend import MegatronBackend, checkpoint_keys

    backend = MegatronBackend(stage, None, torch.device("cpu"), cfg, checkpoint_keys(mm.logical_param_specs(stage, cfg)),
                              shim=False)
    loss, two = backend.forward_backward(x, y, micro, "fp32")
    assert not two
    return backend.reduce_loss(loss)


def _pp_worker(rank, out_dir):
    from megatron.core import parallel_state as ps

    cfg2 = tiny_cfg(parallel__pp=2)
    mm.initialize_model_parallel(cfg2)
    stage = mm.build_gpt_model(cfg2)
    specs = mm.logical_param_specs(stage, cfg2)
    names = {info.global_name for info in specs.values()}
    if rank == 0:
        assert "embedding.word_embeddings.weight" in names and "output_layer.weight" not in names
        assert "decoder.layers.0.mlp.linear_fc1.weight" in names
    else:
        # local layer 0 of the second stage is global layer 1
        assert "decoder.layers.0.mlp.linear_fc1.weight" in dict(stage.named_parameters())
        assert "decoder.layers.1.mlp.linear_fc1.weight" in names and "output_layer.weight" in names

    x, y = _batch(cfg2, n=8, seed=5)  # 4 micro-batches of 2 rows through the 1F1B schedule
    loss2 = _schedule(stage, cfg2, x, y, 2)
    assert ps.get_pipeline_model_parallel_world_size() == 2
    mine = {specs[n].global_name: (p.detach().clone(), p.grad.detach().clone()) for n, p in stage.named_parameters()}
    everything = [None, None]
    dist.all_gather_object(everything, mine)
    merged = {**everything[0], **everything[1]}

    # PP=1 (the two ranks become data-parallel replicas, both given the same rows) with the stages' weights
    cfg1 = tiny_cfg()
    mm.initialize_model_parallel(cfg1)
    ref = mm.build_gpt_model(cfg1)
    specs1 = mm.logical_param_specs(ref, cfg1)
    assert set(merged) == {i.global_name for i in specs1.values()}
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(merged[specs1[n].global_name][0])
    loss1 = _schedule(ref, cfg1, x, y, 2)
    assert torch.isfinite(loss2) and loss2 > 0
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-6)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, merged[specs1[n].global_name][1], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_pp2_pipeline_schedule_matches_pp1(tmp_path):
    spawn(_pp_worker, 2, str(tmp_path))


# ----------------------------------------------------------------------------- launch/train.py
def _write_config(path: Path, out_dir: Path, **train) -> Path:
    import yaml

    cfg = {
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 48, "max_seq_len": 32},
        "data": {"source": "synthetic", "seq_len": 32},
        "optim": {"name": "lanton", "lr": {"hidden": 0.05, "embed_head": 0.01, "vector": 0.002}, "estimate_every": 2},
        "schedule": {"warmup_steps": 2, "min_ratio": 0.1},
        "train": {"steps": 8, "global_batch": 8, "micro_batch": 4, "eval_every": 4, "eval_batches": 1, "log_every": 1,
                  "out_dir": str(out_dir), "checkpoint_every": 0, "device": "cpu", **train},
        "parallel": {"backend": "megatron"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(script: Path, config: Path, *args: str, env: dict | None = None, nproc: int = 1,
           returncode: int = 0) -> subprocess.CompletedProcess:
    """``script --config config args…`` in one process, or under torchrun with ``nproc`` workers."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "LANTON_STOP_FILE")}
    full_env.update(env or {})
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    res = subprocess.run([*launcher, str(script), "--config", str(config), *args],
                         cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == returncode, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def train_megatron(config: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    """``launch/train.py`` on a ``parallel.backend: megatron`` config (CPU: the shim installs itself)."""
    return launch(TRAIN, config, *overrides, **kw)


def _complete_checkpoints(out_dir: Path) -> list[str]:
    from lanton_dist import checkpoint_dir

    return [p.name for _, p in checkpoint_dir.complete_checkpoints(out_dir / "checkpoints")]


def _assert_only_tensors(path: Path) -> None:
    """No non-tensor object in the checkpoint (DCP, or state.pt in one process): nothing un-pickled on load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if (path / "state.pt").exists():
        state = torch.load(path / "state.pt", weights_only=True)
        assert state["model"] and all(torch.is_tensor(v) for v in state["model"].values())
        return
    entries = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert entries and all(isinstance(v, TensorStorageMetadata) for v in entries.values()), sorted(entries)


def _metrics(out_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


HEADER = "M params |"  # the loop's first line, printed once the model is built


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_run_smoke_stop_and_resume(tmp_path, tp):
    """TP=1 (one process, reference optimizer) and TP=2 (two processes, the sharded engine)."""
    straight = tmp_path / "straight"
    run = lambda cfg, **kw: train_megatron(cfg, "--parallel.tp", str(tp), nproc=tp, **kw)  # noqa: E731
    run(_write_config(tmp_path / "a.yaml", straight))
    rows = _metrics(straight)
    losses = [rows[s]["loss"] for s in sorted(rows) if s > 0]
    assert len(losses) == 8 and all(map(lambda x: x == x and abs(x) < 1e9, losses))
    assert losses[-1] < losses[0] - 0.1, losses
    assert "val_loss" in rows[4] and "val_loss" in rows[8]
    assert (straight / "COMPLETED").exists()
    assert _complete_checkpoints(straight) == ["step_00000008"]
    _assert_only_tensors(straight / "checkpoints" / "step_00000008")

    # a stop request (the Slurm pre-emption path) checkpoints after the step and exits …
    resumed = tmp_path / "resumed"
    stop = tmp_path / "stop"
    stop.touch()
    cfg = _write_config(tmp_path / "b.yaml", resumed, resume=True)
    first = run(cfg, env={"LANTON_STOP_FILE": str(stop)})
    assert "stop requested" in first.stdout and not (resumed / "COMPLETED").exists()
    assert _complete_checkpoints(resumed) == ["step_00000001"]
    # … and the resumed run is the uninterrupted one, step for step (model, LANTON state, schedule)
    stop.unlink()
    second = run(cfg)
    assert "step_00000001 is the newest complete checkpoint" in second.stdout and "resumed from" in second.stdout
    again = _metrics(resumed)
    for step in range(1, 9):
        assert again[step]["loss"] == rows[step]["loss"], step
        assert again[step]["lr"] == rows[step]["lr"], step
    assert again[8]["val_loss"] == rows[8]["val_loss"]
    assert (resumed / "COMPLETED").exists()


@pytest.mark.slow
@pytest.mark.parametrize("head_rate", [None, "0.02"])
def test_a_four_stage_pipeline_trains_though_its_middle_stages_hold_no_embedding_or_head(tmp_path, head_rate):
    """PP = 4: stages 1 and 2 hold only hidden matrices and norms, yet the group-wide rate anchor
    runs over the embedding and head other stages hold; their groups' hyper-parameters reach
    every stage (also the LM head's own rate, ``optim.lr.head``)."""
    out = tmp_path / "pp4"
    extra = ("--optim.lr.head", head_rate) if head_rate else ()
    train_megatron(_write_config(tmp_path / "pp4.yaml", out), "--parallel.pp", "4", "--model.n_layers", "4",
                   "--train.steps", "4", *extra, nproc=4)
    rows = _metrics(out)
    losses = [rows[s]["loss"] for s in sorted(rows) if s > 0]
    assert len(losses) == 4 and all(x == x and abs(x) < 1e9 for x in losses) and losses[-1] < losses[0], losses
    assert (out / "COMPLETED").exists()


def test_every_geometry_groups_carry_the_hyper_parameters_of_layers_other_stages_hold():
    """``param_groups(..., every_geometry=True)`` on a stage with hidden matrices only: empty
    embed_head (and, with ``lr.head``, head) groups at the config's rates."""
    from torch import nn

    from lanton_dist.factory import param_groups
    from lanton_dist.groups import ParamSpec

    stage = nn.Linear(8, 8, bias=False)
    specs = {"weight": ParamSpec("layers.1.mlp.weight", Geometry.HIDDEN, (8, 8))}
    cfg = tiny_cfg(optim__lr__head=0.02).optim
    plain = param_groups(stage, cfg, specs=specs)
    every = param_groups(stage, cfg, specs=specs, every_geometry=True)
    assert [g["geometry"] for g in plain] == ["hidden"]
    assert [g["geometry"] for g in every] == ["hidden", "embed_head", "head", "vector"]
    by = {g["geometry"]: g for g in every}
    assert by["head"]["lr"] == 0.02 and by["embed_head"]["lr"] == cfg.lr.embed_head and not by["head"]["params"]


@pytest.mark.slow
def test_megatron_run_reads_an_indexed_dataset(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(20, 90))
        builder.add_document(torch.from_numpy((int(rng.integers(0, 64)) + int(rng.integers(1, 8)) * np.arange(n)) % 64), [n])
    builder.finalize(f"{prefix}.idx")
    out = tmp_path / "run"
    cfg = _write_config(tmp_path / "c.yaml", out, steps=3, eval_every=3)
    train_megatron(cfg, "--data.source", "megatron", "--data.path", str(prefix))
    rows = _metrics(out)
    assert sorted(rows) == [0, 1, 2, 3] and all(np.isfinite(r["loss"]) for s, r in rows.items() if s)
    assert np.isfinite(rows[3]["val_loss"])

    bad = train_megatron(cfg, "--data.source", "megatron", "--data.path", str(tmp_path / "missing"), returncode=2)
    errors = [line for line in bad.stderr.splitlines() if "Error" in line or "error" in line]
    assert errors == [f"config error: data.path {str(tmp_path / 'missing')!r}: {tmp_path / 'missing'}.bin and "
                      f"{tmp_path / 'missing'}.idx does not exist (give the prefix of the indexed dataset, without extension)"]
    assert HEADER not in bad.stdout  # refused before the model was built


@pytest.mark.slow
def test_megatron_run_reads_a_text_file_through_the_shared_data_module(tmp_path):
    import numpy as np

    path = tmp_path / "c.txt"
    path.write_text("\n".join(f"line {i}: the quick brown fox" for i in range(300)))
    out = tmp_path / "run"
    cfg = _write_config(tmp_path / "c.yaml", out, steps=3, eval_every=3)
    train_megatron(cfg, "--model.vocab_size", "256", "--data.source", "text", "--data.path", str(path),
                   "--data.sample_by", "line")
    rows = _metrics(out)
    assert sorted(rows) == [0, 1, 2, 3] and np.isfinite(rows[3]["val_loss"]), rows


@pytest.mark.slow
@pytest.mark.parametrize("overrides, key", [
    (["--optim.lr.hidden", "nan"], "optim.lr.hidden"),
    (["--optim.name", "dmuon", "--optim.adam_betas", "[1.5, 2]"], "optim.adam_betas[0]"),
    (["--optim.option", "II", "--train.global_batch", "7", "--train.micro_batch", "0"], "optim.option II"),
    (["--parallel.tp", "3"], "not divisible by tp*pp = 3*1"),
])
def test_megatron_run_refuses_a_bad_config_with_one_line_and_exit_2(tmp_path, overrides, key):
    out = tmp_path / "run"
    res = train_megatron(_write_config(tmp_path / "c.yaml", out), *overrides, returncode=2)
    errors = [line for line in res.stderr.splitlines() if "rror" in line]
    assert len(errors) == 1 and errors[0].startswith("config error: ") and key in errors[0], res.stderr[-3000:]
    assert not (out / "COMPLETED").exists() and not (out / "checkpoints").exists() and HEADER not in res.stdout


@pytest.mark.slow
def test_megatron_run_stops_a_diverging_run_with_exit_3_and_no_completed(tmp_path):
    out = tmp_path / "run"
    res = train_megatron(_write_config(tmp_path / "c.yaml", out, checkpoint_every=1, keep_checkpoints=5,
                                       max_consecutive_skips=2), "--optim.lr.hidden", "1e30", returncode=3)
    assert "error: training diverged: steps 2-3 (2 in a row)" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "COMPLETED").exists()
    # step 1's weights gave step 2's bad loss: set aside, none predates the trouble (lanton_dist.divergence)
    assert _complete_checkpoints(out) == [] and (out / "checkpoints" / "diverged-step_00000001").is_dir()
    assert "No checkpoint predates the trouble" in res.stderr


@pytest.mark.slow
def test_megatron_resume_with_another_model_is_refused_before_building_it_and_more_steps_warn(tmp_path):
    out = tmp_path / "run"
    cfg = _write_config(tmp_path / "c.yaml", out, steps=2, eval_every=0)
    train_megatron(cfg)
    res = train_megatron(cfg, "--train.resume", "true", "--model.ffn_dim", "64", returncode=2)
    assert "config error: cannot resume from" in res.stderr and "model: checkpoint" in res.stderr
    assert HEADER not in res.stdout
    res = train_megatron(cfg, "--train.resume", "true", "--train.steps", "3")
    assert "warning: resume from" in res.stdout and "train.steps: checkpoint 2, now 3" in res.stdout
    assert sorted(_metrics(out)) == [1, 2, 3] and (out / "COMPLETED").read_text() == "3\n"


@pytest.mark.slow
def test_a_megatron_checkpoint_resumes_at_another_data_parallel_size(tmp_path):
    """TP 2 × DP 2 (4 processes) stopped after step 1, resumed on TP 2 × DP 1 (2 processes):
    the engine's DCP state reshards over DP, so the run continues as the uninterrupted TP 2 run
    at DP 1 (fp32; DP changes only the gradient reduction order)."""
    straight, resumed, stop = tmp_path / "straight", tmp_path / "resumed", tmp_path / "stop"
    tp2 = ("--parallel.tp", "2")
    train_megatron(_write_config(tmp_path / "a.yaml", straight), *tp2, nproc=2)
    cfg = _write_config(tmp_path / "b.yaml", resumed, resume=True)
    stop.touch()
    train_megatron(cfg, *tp2, nproc=4, env={"LANTON_STOP_FILE": str(stop)})
    stop.unlink()
    res = train_megatron(cfg, *tp2, nproc=2)
    assert "resumed from" in res.stdout and (resumed / "COMPLETED").exists()
    want, got = _metrics(straight), _metrics(resumed)
    for step in range(1, 9):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
        assert got[step]["lr"] == want[step]["lr"], step
    assert got[8]["val_loss"] == pytest.approx(want[8]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_one_process_megatron_checkpoint_is_refused_by_a_multi_process_run(tmp_path):
    """state.pt (the reference optimizer) does not load into the sharded engine: a config error
    on every rank (torchrun then exits 1), the checkpoint left as it was."""
    out = tmp_path / "run"
    cfg = _write_config(tmp_path / "c.yaml", out, steps=1, eval_every=0, resume=True)
    train_megatron(cfg)
    res = train_megatron(cfg, "--train.steps", "2", "--parallel.tp", "1", nproc=2, returncode=1)
    assert "config error: cannot resume from" in res.stderr and "written by one process" in res.stderr, res.stderr[-2000:]
    assert _complete_checkpoints(out) == ["step_00000001"] and sorted(_metrics(out)) == [1]
