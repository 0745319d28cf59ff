"""Configs are checked before anything is built: every bad value is one ``config error: …``
line naming its key (exit status 2), for every algorithm; zero.Init-partitioned parameters
are refused by the optimizer factory with a message naming the supported entry."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from lanton_dist.config import ConfigError, check_run_config, load_run_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "llama-tiny-cpu.yaml"


def _launch_train():
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BAD_VALUES = [  # (overrides, key the message must name)
    (["--optim.lr.hidden", "-0.1"], "optim.lr.hidden"),
    (["--optim.lr.embed_head", "nan"], "optim.lr.embed_head"),
    (["--optim.lr.vector", "inf"], "optim.lr.vector"),
    (["--optim.weight_decay", "-0.01"], "optim.weight_decay"),
    (["--optim.beta1", "1.0"], "optim.beta1"),
    (["--optim.beta2", "-0.5"], "optim.beta2"),
    (["--optim.name", "dmuon", "--optim.momentum", "1.5"], "optim.momentum"),
    (["--optim.name", "dmuon", "--optim.adam_betas", "[1.5, 2]"], "optim.adam_betas[0]"),
    (["--optim.name", "adamw", "--optim.adam_betas", "[0.9, 1.0]"], "optim.adam_betas[1]"),
    (["--optim.name", "scion", "--optim.beta1", "nan"], "optim.beta1"),
    (["--optim.alpha.hidden", "-1"], "optim.alpha.hidden"),
    (["--optim.clip_grad_norm", "-1"], "optim.clip_grad_norm"),
    (["--optim.name", "adamw", "--optim.clip_grad_norm", "nan"], "optim.clip_grad_norm"),
    (["--optim.name", "dmuon", "--optim.clip_grad_norm", "inf"], "optim.clip_grad_norm"),
    (["--optim.option", "II", "--train.global_batch", "5"], "optim.option II"),
    (["--train.keep_checkpoints", "0"], "train.keep_checkpoints"),
    (["--train.max_consecutive_skips", "-1"], "train.max_consecutive_skips"),
    (["--schedule.min_ratio", "1.5"], "schedule.min_ratio"),
    (["--data.source", "megatron", "--data.path", "/nonexistent/corpus"], "data.path"),
    (["--data.path", "/some/prefix"], "data.path"),
    (["--parallel.backend", "horovod"], "parallel.backend"),
    (["--parallel.backend", "deepspeed", "--optim.option", "II"], "optim.option II"),
]


@pytest.mark.parametrize("overrides, key", BAD_VALUES, ids=[k + "/" + "_".join(o[1::2]) for o, k in BAD_VALUES])
def test_a_bad_value_is_a_config_error_naming_its_key(overrides, key):
    cfg = load_run_config(DEMO, overrides)
    with pytest.raises(ConfigError) as e:
        check_run_config(cfg)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_the_shipped_single_process_config_passes_the_checks():
    check_run_config(load_run_config(DEMO))


def test_option_two_needs_an_even_batch_on_every_data_parallel_rank():
    cfg = load_run_config(DEMO, ["--optim.option", "II", "--train.global_batch", "6"])
    check_run_config(cfg, data_parallel=1)
    with pytest.raises(ConfigError, match=r"optim\.option II.*6 / 2 ranks = 3 rows \(odd\)"):
        check_run_config(cfg, data_parallel=2)


def test_megatron_data_path_must_exist(tmp_path):
    prefix = tmp_path / "corpus"
    cfg = load_run_config(DEMO, ["--data.source", "megatron", "--data.path", str(prefix)])
    with pytest.raises(ConfigError, match=r"data\.path .*corpus\.bin and .*corpus\.idx does not exist"):
        check_run_config(cfg)
    for ext in (".bin", ".idx"):
        Path(f"{prefix}{ext}").write_bytes(b"")
    check_run_config(cfg)


@pytest.mark.parametrize("argv, key", [
    (["--optim.name", "dmuon", "--optim.adam_betas", "[1.5, 2]"], "optim.adam_betas[0]"),  # was a complex cast at step 1
    (["--optim.lr.hidden", "nan"], "optim.lr.hidden"),
    (["--optim.weight_decay", "-1"], "optim.weight_decay"),
    (["--optim.option", "II", "--train.global_batch", "5"], "optim.option"),
])
def test_launch_train_prints_one_config_error_line_and_exits_2_without_writing_anything(tmp_path, capsys, argv, key):
    with pytest.raises(SystemExit) as e:
        _launch_train().main(["--config", str(DEMO), "--train.out_dir", str(tmp_path / "run"), *argv])
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and key in lines[0], captured.err
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_is_one_config_error_line_with_its_position(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n  global_batch: 4\n")
    with pytest.raises(SystemExit) as e:
        _launch_train().main(["--config", str(bad)])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {bad}:") and "malformed YAML" in lines[0], lines


# ----------------------------------------------------------------------------- zero.Init
def _zero_init_partitioned(model: nn.Module) -> nn.Module:
    """What ``deepspeed.zero.Init`` leaves: every parameter is an empty local shard with ``ds_id``."""
    for i, p in enumerate(model.parameters()):
        p.ds_id, p.ds_numel = i, p.numel()
        p.data = torch.empty(0)
    return model


def test_zero_init_partitioned_parameters_are_refused_naming_zero_init_and_the_supported_entry():
    from lanton_dist.config import OptimConfig
    from lanton_dist.factory import build_optimizer, param_groups

    model = _zero_init_partitioned(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)))
    for build in (lambda: param_groups(model, OptimConfig()), lambda: build_optimizer(model, OptimConfig()),
                  lambda: build_optimizer(model, OptimConfig(), [{"params": list(model.parameters())}])):
        with pytest.raises(ValueError, match=r"zero\.Init.*lanton_dist\.integrations\.deepspeed\.initialize"):
            build()
