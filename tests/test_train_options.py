"""Training-loop options that change memory and speed but not the results:
``train.activation_checkpointing`` and ``train.compile``."""
from __future__ import annotations

import pytest

from lanton_dist.config import ConfigError, check_run_config, load_run_config
from lanton_dist.trainer import read_metrics, train
from test_train import DEMO, quiet, small_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(tmp_path, name: str, *extra: str) -> list[float]:
    cfg = small_cfg(tmp_path / name, "--train.steps", "3", "--train.eval_every", "0", *extra)
    s = train(cfg, log=quiet)
    return [r["loss"] for r in read_metrics(s["metrics"]) if "loss" in r]


def test_compiled_and_checkpointed_training_has_the_losses_of_plain_training(tmp_path):
    plain = _losses(tmp_path, "plain")
    options = _losses(tmp_path, "options", "--train.compile", "true", "--train.compile_backend", "aot_eager",
                      "--train.activation_checkpointing", "true")
    assert len(plain) == 3
    assert options == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_an_unknown_compile_backend_is_a_config_error(tmp_path):
    cfg = small_cfg(tmp_path, "--train.steps", "1", "--train.compile", "true", "--train.compile_backend", "no-such-backend")
    with pytest.raises(ConfigError, match="train.compile_backend 'no-such-backend'"):
        train(cfg, log=quiet)


@pytest.mark.parametrize("key", ["activation_checkpointing", "compile"])
def test_megatron_refuses_the_transformer_options(key):
    cfg = load_run_config(DEMO, ["--parallel.backend", "megatron", f"--train.{key}", "true"])
    with pytest.raises(ConfigError, match=f"train.{key} applies to lanton_dist's Transformer"):
        check_run_config(cfg)


@pytest.mark.parametrize("backend", ["zero", "fsdp2"])
def test_checkpointed_and_compiled_blocks_train_alike_under_the_sharded_backends(backend, tmp_path, monkeypatch):
    """FSDP2 wraps each (compiled, checkpointed) block; the engine hooks its gradients: a world-1
    run of each gives the losses of the same run without the options."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    plain = _losses(tmp_path, "plain", "--parallel.backend", backend)
    options = _losses(tmp_path, "options", "--parallel.backend", backend, "--train.activation_checkpointing", "true",
                      "--train.compile", "true", "--train.compile_backend", "aot_eager")
    assert options == pytest.approx(plain, rel=1e-5, abs=1e-6)
