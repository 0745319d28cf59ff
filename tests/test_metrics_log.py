"""The training log's pieces (lanton_dist.training_log): the line, MFU, memory, throughput,
TensorBoard and the rate-factor heat map."""
from __future__ import annotations

import builtins
import time

import pytest
import torch

from lanton_dist.config import ConfigError, ModelConfig, RunConfig, check_run_config
from lanton_dist.model import Transformer
from lanton_dist import training_log
from lanton_dist.training_log import (RunShape, TensorBoardLog, Throughput, duration, flops_per_token, format_line,
                                      peak_memory, peak_tflops, plot_rate_factors)

PNG = b"\x89PNG\r\n\x1a\n"


def test_flops_per_token_is_six_n_plus_the_attention_term_and_matches_a_matmul_count():
    assert flops_per_token(1000, 2, 8, 16) == 6 * 1000 + 12 * 2 * 8 * 16
    # Count the forward multiply-adds of one sequence by hand: every linear layer is
    # 2·in·out per token, attention 2·T·d (scores) + 2·T·d (weighted sum) per layer and token.
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)
    model = Transformer(cfg)
    T = 16
    linear = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    forward = linear + cfg.n_layers * 4 * T * cfg.dim
    n = model.num_params(exclude_embedding=True) - sum(
        p.numel() for name, p in model.named_parameters() if "norm" in name)  # gains: no matmul
    assert 3 * forward == pytest.approx(flops_per_token(n, cfg.n_layers, cfg.dim, T))


def test_peak_flops_come_from_the_override_or_the_gpu_name_and_are_unknown_on_cpu():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), override=100.0) == 100.0
    shape = RunShape.of(10, 1000, 6e6, torch.device("cpu"), world=4, override_tflops=1.0)
    assert shape.job_peak_flops == 4e12
    fields = shape.log_fields(tokens_per_s=1e5, grad_norm=0.5, device=torch.device("cpu"))
    assert fields["mfu"] == pytest.approx(6e6 * 1e5 / 4e12)
    assert RunShape.of(10, 1000, 6e6, torch.device("cpu"), 1).log_fields(1e5, None, torch.device("cpu"))["mfu"] is None


def test_cpu_peak_memory_is_the_process_max_rss():
    gib, kind = peak_memory(torch.device("cpu"))
    assert kind == "max_rss" and 0.01 < gib < 1024


def test_throughput_counts_the_window_since_the_last_line_without_excluded_time():
    window = Throughput(step=10)
    time.sleep(0.05)
    window.exclude(1000.0)  # e.g. an evaluation far longer than the window: rate is then huge
    assert window.lap(12, tokens_per_step=100) > 1e5
    time.sleep(0.05)
    rate = window.lap(14, tokens_per_step=100)  # the exclusion applied to one window only
    assert 200 / 1.0 < rate < 200 / 0.04


def test_the_progress_line_names_every_field_and_says_n_a_for_unknowns():
    rec = {"step": 40, "loss": 2.31412, "lr": {"hidden": 0.05, "vector": 0.01}, "skipped_steps": 1,
           "tokens_per_s": 21733.2, "grad_norm": None, "peak_mem_gib": 0.31, "mem_kind": "max_rss", "mfu": None}
    line = format_line(rec, 300)
    assert line == ("step 40/300 | loss 2.3141 | lr 5.000e-02 | 21,733 tok/s | grad n/a | skipped 1 | "
                    "mem 0.31 GiB (max RSS) | MFU n/a")
    rec.update(grad_norm=0.8123, mfu=0.4321, mem_kind="cuda_allocated", val_loss=2.5)
    assert format_line(rec, 300).endswith("grad 0.8123 | skipped 1 | mem 0.31 GiB (CUDA peak) | MFU 43.2% | val 2.5000")
    assert format_line({"step": 3, "loss": 1.0, "lr": [0.1], "val_loss": 1.5}, 9) == "step 3/9 | loss 1.0000 | lr 1.000e-01 | val 1.5000"


def test_elapsed_time_and_eta_come_from_the_mean_pace_since_the_loop_started(monkeypatch):
    clock = iter([1000.0, 1060.0, 1300.0])  # construction; 2 steps later (30 s/step); 10 steps later
    monkeypatch.setattr(training_log.time, "perf_counter", lambda: next(clock))
    window = Throughput(step=100)  # a run resumed at step 100 of 300: its pace counts from here
    assert window.progress(102, 300) == {"elapsed_s": 60.0, "eta_s": 30.0 * 198}
    assert window.progress(110, 300) == {"elapsed_s": 300.0, "eta_s": 30.0 * 190}


def test_eta_is_unknown_before_the_first_step_and_zero_at_the_end():
    window = Throughput(step=5)
    assert window.progress(5, 10)["eta_s"] is None
    assert window.progress(10, 10)["eta_s"] == 0.0


def test_durations_print_as_hours_minutes_seconds_and_days():
    assert [duration(x) for x in (0.0, 59.9, 61, 3600 * 7 + 62, 86400 * 3 + 3661, -1.0)] == [
        "0:00:00", "0:00:59", "0:01:01", "7:01:02", "3d 1:01:01", "0:00:00"]


def test_the_progress_line_ends_with_the_elapsed_time_and_the_eta():
    rec = {"step": 40, "loss": 2.0, "lr": [0.1], "skipped_steps": 0, "tokens_per_s": 1000.0, "grad_norm": 1.0,
           "peak_mem_gib": 0.5, "mem_kind": "max_rss", "mfu": None, "elapsed_s": 62.0, "eta_s": 403.5}
    assert format_line(rec, 300).endswith("| MFU n/a | elapsed 0:01:02 | ETA 0:06:43")
    rec.update(eta_s=None, val_loss=1.5)
    assert format_line(rec, 300).endswith("| MFU n/a | elapsed 0:01:02 | ETA n/a | val 1.5000")


def test_a_training_run_logs_elapsed_time_and_eta_on_every_log_line(tmp_path):
    from lanton_dist.config import load_run_config
    from lanton_dist.trainer import read_metrics, train

    cfg = load_run_config(None, ["--data.source", "synthetic", "--data.seq_len", "16", "--model.dim", "32",
                                 "--model.n_layers", "1", "--model.ffn_dim", "64", "--model.n_heads", "2",
                                 "--model.n_kv_heads", "2", "--train.steps", "4", "--train.log_every", "2",
                                 "--train.global_batch", "2", "--train.eval_every", "0", "--train.out_dir", str(tmp_path)])
    lines: list[str] = []
    summary = train(cfg, log=lines.append)
    progress = [ln for ln in lines if "tok/s" in ln]
    assert len(progress) == 2 and all(" | elapsed " in ln and " | ETA " in ln for ln in progress), progress
    assert progress[-1].endswith("ETA 0:00:00")
    recs = [r for r in read_metrics(summary["metrics"]) if "tokens_per_s" in r]
    assert [r["step"] for r in recs] == [2, 4]
    assert 0 < recs[0]["elapsed_s"] <= recs[1]["elapsed_s"] and recs[0]["eta_s"] > 0 and recs[1]["eta_s"] == 0.0


def test_rate_factor_heat_map_is_a_png_of_the_estimation_steps_and_absent_without_them(tmp_path):
    layers = {"names": ["a.weight", "b.weight"], "geometry": ["hidden", "hidden"], "H": [0.1, 2.0],
              "alpha": [1.0, 0.5], "lr_factor": [1.0, 0.4]}
    records = [{"step": 0, "val_loss": 5.0}, {"step": 5, "loss": 4.0, "layers": layers}, {"step": 6, "loss": 3.9},
               {"step": 10, "loss": 3.5, "layers": layers}]
    assert plot_rate_factors(records[:1] + records[2:3], tmp_path / "none.png", "t") is None
    assert not (tmp_path / "none.png").exists()
    path = plot_rate_factors(records, tmp_path / "heat.png", "t")
    assert path.read_bytes()[:8] == PNG


def test_tensorboard_writes_scalars_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = TensorBoardLog(tmp_path, enabled=True)
    board.write({"step": 1, "loss": 3.0, "lr": {"hidden": 0.1}, "two_halves": False, "grad_norm": None,
                 "layers": {"names": ["w"], "lr_factor": [0.5]}})
    board.write({"step": 2, "loss": 2.5, "lr": {"hidden": 0.2}})
    board.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "lr/hidden", "rate_factor/w"}
    assert [e.value for e in acc.Scalars("loss")] == [3.0, 2.5]


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(RuntimeError, match=r"tensorboard package is not installed.*lanton-dist\[tensorboard\]"):
        TensorBoardLog(tmp_path, enabled=True)
    TensorBoardLog(tmp_path, enabled=False).write({"step": 1, "loss": 1.0})  # off: no import, no error


def test_a_negative_peak_flops_setting_is_a_config_error():
    cfg = RunConfig()
    cfg.logging.peak_tflops = -1.0
    with pytest.raises(ConfigError, match="logging.peak_tflops"):
        check_run_config(cfg)


@pytest.mark.slow
def test_megatron_prints_the_same_line_and_logs_the_same_grad_norm_at_tp_1_and_tp_2(tmp_path):
    from test_megatron_model import _metrics, _write_config, train_megatron  # the Megatron CPU runs of those tests

    from lanton_dist.training_log import LOG_FIELDS

    norms = {}
    for tp in (1, 2):  # TP=1: one process, the reference optimizer; TP=2: the sharded engine's pieces
        out = tmp_path / f"tp{tp}"
        res = train_megatron(_write_config(tmp_path / f"tp{tp}.yaml", out), "--parallel.tp", str(tp), "--train.steps", "2",
                             nproc=tp)
        rows = _metrics(out)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("step ") and " | loss " in ln]  # not "step 0 | val"
        assert [ln.split(" | ")[0] for ln in lines] == ["step 1/2", "step 2/2"], res.stdout
        assert set(LOG_FIELDS) <= set(rows[1]) and rows[1]["grad_norm"] > 0
        assert f"grad {rows[1]['grad_norm']:.4g}" in lines[0] and "tok/s" in lines[0] and "MFU n/a" in lines[0]
        norms[tp] = rows[1]["grad_norm"]
    assert norms[2] == pytest.approx(norms[1], rel=1e-4)


def test_tensorboard_on_without_the_package_is_refused_with_the_config_checks(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = RunConfig()
    cfg.logging.tensorboard = True
    with pytest.raises(ConfigError, match=r"logging.tensorboard is true but the tensorboard package is not installed"):
        check_run_config(cfg)
    cfg.logging.tensorboard = False
    check_run_config(cfg)


def test_gpu_peak_flops_are_looked_up_by_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cuda", 0)) == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "NVIDIA A100-SXM4-40GB")
    assert peak_tflops(torch.device("cuda", 0)) == 312.0
    assert peak_tflops(torch.device("cuda", 0), override=400.0) == 400.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "Some Future GPU")
    assert peak_tflops(torch.device("cuda", 0)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_peak_memory_is_the_cuda_allocator_peak():
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    gib, kind = peak_memory(device)
    assert kind == "cuda_allocated" and gib >= 0.25
    del x
