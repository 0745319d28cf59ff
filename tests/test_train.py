"""The single-process training loop: it learns, resumes bit-identically, runs Option II,
accumulates micro-batches exactly, and writes parseable metrics and plots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lanton_dist.backends import Backend, micro_slices, setup_backend
from lanton_dist.config import ConfigError, RunConfig, load_run_config
from lanton_dist.model import Transformer
from lanton_dist.schedule import warmup_cosine
from lanton_dist.trainer import read_metrics, train, train_step
from lanton_dist.training_log import LOG_FIELDS
from test_backends import reference_grad_norm

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "llama-tiny-cpu.yaml"
SMALL = [  # a very small model on the real stdlib corpus, for loop-logic tests
    "--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
    "--model.ffn_dim", "64", "--data.seq_len", "32", "--train.global_batch", "4",
    "--train.eval_batches", "2", "--train.log_every", "2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(out: Path, *extra: str) -> RunConfig:
    return load_run_config(DEMO, [*SMALL, "--train.out_dir", str(out), *extra])


def quiet(_msg: str) -> None:
    pass


def test_demo_config_learns_the_stdlib_corpus_well_below_the_unigram_baseline(tmp_path):
    cfg = load_run_config(DEMO, [
        "--train.steps", "200", "--data.seq_len", "64", "--train.global_batch", "8",
        "--train.eval_every", "100", "--train.eval_batches", "4", "--train.log_every", "50",
        "--train.out_dir", str(tmp_path),
    ])
    s = train(cfg, log=quiet)
    assert s["steps"] == 200 and s["skipped_steps"] == 0
    assert 2.0 < s["unigram_baseline"] < 5.5
    first_val = read_metrics(s["metrics"])[0]["val_loss"]
    assert first_val > 5.0  # ~ln 256 at init
    assert s["final_val_loss"] < s["unigram_baseline"] - 1.0, s
    assert s["final_train_loss"] < s["unigram_baseline"] - 1.0, s


def test_a_small_model_learns_the_synthetic_markov_source(tmp_path):
    cfg = small_cfg(tmp_path, "--data.source", "synthetic", "--train.global_batch", "8", "--train.steps", "150",
                    "--train.eval_every", "150")
    s = train(cfg, log=quiet)
    assert s["final_val_loss"] < s["unigram_baseline"] - 2.0, s


@pytest.mark.parametrize("optim", [
    ["--optim.name", "lanton", "--optim.estimate_every", "2"],
    ["--optim.name", "lanton", "--optim.estimate_every", "2", "--optim.option", "II"],
    ["--optim.name", "dmuon"],
], ids=["lanton-I", "lanton-II", "dmuon"])
def test_resuming_from_a_mid_run_checkpoint_is_bit_identical(tmp_path, optim):
    common = ["--train.steps", "12", "--train.eval_every", "4", "--train.checkpoint_every", "5", *optim]
    full = train(small_cfg(tmp_path / "full", *common), log=quiet)
    cut = train(small_cfg(tmp_path / "cut", *common, "--train.stop_after", "7"), log=quiet)
    assert cut["steps"] == 7 and Path(cut["checkpoint"]).name == "step_00000007"
    resumed = train(small_cfg(tmp_path / "cut", *common, "--train.resume", "true"), log=quiet)
    assert resumed["resumed_from"].endswith("step_00000007")

    a, b = read_metrics(full["metrics"]), read_metrics(resumed["metrics"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(13))
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
        assert ra.get("lanton") == rb.get("lanton") and ra.get("lr") == rb.get("lr")
    assert full["final_val_loss"] == resumed["final_val_loss"]

    ca = torch.load(Path(full["checkpoint"]) / "state.pt", weights_only=True)
    cb = torch.load(Path(resumed["checkpoint"]) / "state.pt", weights_only=True)
    for name, t in ca["model"].items():
        assert torch.equal(t, cb["model"][name]), name
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for key, t in sa[i].items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(sb[i][key])), (i, key)
    loop_a = json.loads((Path(full["checkpoint"]) / "loop.json").read_text())
    loop_b = json.loads((Path(resumed["checkpoint"]) / "loop.json").read_text())
    assert loop_a["scheduler"] == loop_b["scheduler"] and loop_a["step"] == loop_b["step"] == 12
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert kept == ["step_00000010", "step_00000012"]  # train.keep_checkpoints: 2


@pytest.mark.parametrize("change, key", [
    (["--optim.lr.hidden", "0.5"], "optim"),
    (["--model.ffn_dim", "96"], "model"),
    (["--train.global_batch", "8"], "train.global_batch"),
])
def test_resuming_with_a_different_config_is_refused_before_a_model_is_built(tmp_path, change, key, monkeypatch):
    common = ["--train.steps", "6", "--train.eval_every", "0", "--train.stop_after", "3"]
    train(small_cfg(tmp_path, *common), log=quiet)
    built = []
    monkeypatch.setattr("lanton_dist.trainer.Transformer", lambda *a, **k: built.append(1))
    with pytest.raises(ConfigError, match=rf"cannot resume from .*step_00000003.*{key}: checkpoint"):
        train(small_cfg(tmp_path, *common, "--train.resume", "true", *change), log=quiet)
    assert not built


def test_resuming_with_more_steps_and_a_new_schedule_warns_and_follows_the_new_schedule(tmp_path):
    common = ["--train.eval_every", "0", "--schedule.warmup_steps", "2"]
    train(small_cfg(tmp_path, *common, "--train.steps", "6", "--train.stop_after", "3"), log=quiet)
    said: list[str] = []
    s = train(small_cfg(tmp_path, *common, "--train.steps", "10", "--schedule.min_ratio", "0.5", "--train.resume", "true"),
              log=said.append)
    assert s["steps"] == 10 and s["resumed_from"].endswith("step_00000003")
    warnings = [m for m in said if m.startswith("warning:")]
    assert len(warnings) == 2 and "train.steps: checkpoint 6, now 10" in warnings[0] and "schedule" in warnings[1]
    cfg = small_cfg(tmp_path)
    for r in read_metrics(s["metrics"]):
        if r["step"] > 3:  # the rates after the resume point are the new schedule's
            factor = warmup_cosine(r["step"] - 1, 2, 10, 0.5)
            assert r["lr"]["hidden"] == pytest.approx(cfg.optim.lr.hidden * factor), r["step"]


def test_option_two_runs_two_half_batches_on_estimation_steps(tmp_path):
    cfg = small_cfg(tmp_path, "--train.steps", "8", "--train.eval_every", "4", "--optim.option", "II",
                    "--optim.estimate_every", "2", "--train.micro_batch", "1")
    s = train(cfg, log=quiet)
    recs = [r for r in read_metrics(s["metrics"]) if "loss" in r]
    assert [r["two_halves"] for r in recs] == [step % 2 == 0 for step in range(1, 9)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    last = recs[-1]["lanton"]
    assert last["hidden"]["H_max"] > 0 and last["embed_head"]["H_max"] > 0
    assert last["hidden"]["lr_factor_min"] < 1.0 <= last["hidden"]["lr_factor_max"] + 1e-12


class RecordingSGD(torch.optim.SGD):
    """lr-0 SGD that records gradients; optionally asks for two half-batches like LANTON Option II."""

    def __init__(self, params, two_halves: bool) -> None:
        super().__init__(params, lr=0.0)
        self.two_halves = two_halves
        self.stashed: list[torch.Tensor] | None = None
        self.final: list[torch.Tensor] = []

    def needs_two_half_batches(self) -> bool:
        return self.two_halves

    def stash_half_gradient(self) -> None:
        self.stashed = [p.grad.clone() for p in self.param_groups[0]["params"]]
        self.zero_grad(set_to_none=True)

    def step(self, closure=None):
        self.final = [p.grad.clone() for p in self.param_groups[0]["params"]]
        return super().step(closure)


def grads_of(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _batch(cfg: RunConfig, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.model.vocab_size, (rows, cfg.data.seq_len + 1), generator=g)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("micro", [0, 1, 2])
def test_option_two_halves_are_weighted_one_half_and_sum_to_the_full_batch_gradient(tmp_path, micro):
    cfg = small_cfg(tmp_path)
    model = Transformer(cfg.model)
    opt = RecordingSGD(model.parameters(), two_halves=True)
    x, y = _batch(cfg, 4)
    full, first = grads_of(model, x, y), grads_of(model, x[:2], y[:2])
    loss, two, _ = train_step(Backend(model, opt, torch.device("cpu")), x, y, micro, "fp32")
    assert two and opt.stashed is not None
    for s, f, g_full, g_a in zip(opt.stashed, opt.final, full, first):
        torch.testing.assert_close(s, 0.5 * g_a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s + f, g_full, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(model(x).flatten(0, 1), y.flatten()).detach(), rtol=1e-5, atol=1e-6)


def test_micro_batch_accumulation_gives_the_full_batch_gradient(tmp_path):
    cfg = small_cfg(tmp_path)
    model = Transformer(cfg.model)
    opt = RecordingSGD(model.parameters(), two_halves=False)
    x, y = _batch(cfg, 4)
    full = grads_of(model, x, y)
    _, two, _ = train_step(Backend(model, opt, torch.device("cpu")), x, y, 1, "fp32")
    assert not two and opt.stashed is None
    for f, g in zip(opt.final, full):
        torch.testing.assert_close(f, g, rtol=1e-4, atol=1e-6)


def test_metrics_plot_and_summary_are_written_and_parse(tmp_path):
    cfg = small_cfg(tmp_path, "--train.steps", "6", "--train.eval_every", "3", "--schedule.warmup_steps", "2")
    s = train(cfg, log=quiet)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert recs[0] == {"step": 0, "tokens": 0, "val_loss": recs[0]["val_loss"]}
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:
        assert set(r["lr"]) == {"hidden", "embed_head", "head", "vector"}  # the demo config gives the LM head its own rate
        assert r["tokens"] == r["step"] * 4 * 32 and r["step_time"] > 0 and r["skipped_steps"] == 0
        factor = warmup_cosine(r["step"] - 1, 2, 6, cfg.schedule.min_ratio)
        assert r["lr"]["hidden"] == pytest.approx(cfg.optim.lr.hidden * factor)
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 3, 6]
    assert [r["step"] for r in steps if "lanton" in r] == [2, 4, 6]  # log_every 2
    diag = steps[-1]["lanton"]
    assert set(diag) == {"hidden", "embed_head", "vector"}
    assert set(diag["hidden"]) >= {"lr_factor_min", "lr_factor_max", "H_min", "H_max"}
    assert Path(s["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_val_loss"] == recs[-1]["val_loss"] and summary["steps"] == 6
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6


def test_other_optimizers_train_through_the_same_loop(tmp_path):
    for name in ("dmuon", "adamw", "scion"):
        cfg = small_cfg(tmp_path / name, "--train.steps", "3", "--train.eval_every", "0", "--optim.name", name)
        s = train(cfg, log=quiet)
        recs = read_metrics(s["metrics"])
        assert len(recs) == 3 and all("val_loss" not in r for r in recs)
        assert ("lanton" in recs[1]) == (name == "scion")  # LANTON's class logs diagnostics


def test_unsupported_backend_is_a_clear_error_naming_the_supported_ones(tmp_path):
    cfg = small_cfg(tmp_path, "--parallel.backend", "horovod")
    with pytest.raises(ValueError, match=r"unsupported parallel\.backend 'horovod'.*'none'"):
        setup_backend(cfg, Transformer(cfg.model))


@pytest.mark.parametrize("extra, message", [
    (["--train.micro_batch", "3"], "train.micro_batch 3 does not divide"),
    (["--data.seq_len", "256"], "max_seq_len"),
    (["--train.stop_after", "99"], "stop_after"),
    (["--train.device", "tpu"], "train.device"),
    (["--optim.option", "II", "--train.global_batch", "3"], "optim.option II .* train.global_batch 3"),
])
def test_bad_training_settings_are_config_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(small_cfg(tmp_path, "--train.steps", "2", "--train.eval_every", "0", *extra), log=quiet)


def test_option_two_needs_an_even_batch():
    with pytest.raises(ValueError, match="odd"):
        micro_slices(5, 0, 2)
    assert micro_slices(4, 1, 2) == [[slice(0, 1), slice(1, 2)], [slice(2, 3), slice(3, 4)]]


def test_a_stop_request_checkpoints_the_current_step_and_resume_finishes_like_an_uninterrupted_run(tmp_path):
    from lanton_dist.preemption import COMPLETED, StopRequest

    common = ["--train.steps", "6", "--train.eval_every", "3", "--optim.estimate_every", "2"]
    full = train(small_cfg(tmp_path / "full", *common), log=quiet)
    assert (tmp_path / "full" / COMPLETED).read_text() == "6\n" and not full["stopped"]
    flag = tmp_path / "stop"
    flag.touch()
    cut = train(small_cfg(tmp_path / "cut", *common), log=quiet, stop=StopRequest(str(flag)))
    assert cut["stopped"] and cut["steps"] == 1 and (Path(cut["checkpoint"]) / "COMMITTED").is_file()
    assert not (tmp_path / "cut" / COMPLETED).exists(), "a stopped run must be requeued, not marked complete"
    flag.unlink()
    resumed = train(small_cfg(tmp_path / "cut", *common, "--train.resume", "true"), log=quiet, stop=StopRequest(str(flag)))
    assert not resumed["stopped"] and (tmp_path / "cut" / COMPLETED).exists()
    a, b = read_metrics(full["metrics"]), read_metrics(resumed["metrics"])
    assert [(r.get("loss"), r.get("val_loss")) for r in a] == [(r.get("loss"), r.get("val_loss")) for r in b]


def test_stop_requests_come_from_signals_or_the_stop_file(tmp_path):
    import os
    import signal

    from lanton_dist.preemption import StopRequest

    old = signal.getsignal(signal.SIGUSR1)
    try:
        req = StopRequest(str(tmp_path / "absent"), (signal.SIGUSR1,))
        assert not req.local() and not req.agreed(lambda local: local)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert req.local() and req.agreed(lambda local: local)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert StopRequest(str(tmp_path)).local()  # an existing path is a request
    assert StopRequest(None).agreed(lambda local: True)  # another rank's request stops this one too


def test_launch_train_stops_on_the_job_scripts_stop_file(tmp_path):
    import os
    import subprocess
    import sys

    flag = tmp_path / "stop"
    flag.touch()
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "LANTON_STOP_FILE": str(flag)}
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(DEMO), *SMALL,
                          "--train.steps", "5", "--train.eval_every", "0", "--train.out_dir", str(tmp_path / "run")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stop requested" in res.stdout
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000001"]
    assert not (tmp_path / "run" / "COMPLETED").exists()


def test_a_run_without_a_terminal_prints_one_progress_line_per_log_step_with_the_logged_numbers(tmp_path):
    lines: list[str] = []
    s = train(small_cfg(tmp_path, "--train.steps", "6", "--train.eval_every", "3"), log=lines.append)
    progress = [ln for ln in lines if "tok/s" in ln]
    assert [ln.split(" | ")[0] for ln in progress] == ["step 2/6", "step 4/6", "step 6/6"]
    recs = {r["step"]: r for r in read_metrics(s["metrics"]) if "loss" in r}
    for ln in progress:
        r = recs[int(ln.split()[1].split("/")[0])]
        assert set(LOG_FIELDS) <= set(r)
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["mem_kind"] == "max_rss" and r["mfu"] is None
        for part in (f"loss {r['loss']:.4f}", f"{r['tokens_per_s']:,.0f} tok/s", f"grad {r['grad_norm']:.4g}",
                     "skipped 0", f"mem {r['peak_mem_gib']:.2f} GiB (max RSS)", "MFU n/a"):
            assert part in ln, (part, ln)
    assert all(not set(LOG_FIELDS) & set(recs[k]) for k in (1, 3, 5)), "log fields on log steps only"
    assert [ln for ln in lines if ln.startswith("step 3/6")] == [f"step 3/6 | loss {recs[3]['loss']:.4f} | "
                                                                 f"lr {recs[3]['lr']['hidden']:.3e} | val {recs[3]['val_loss']:.4f}"]


def test_logged_grad_norm_is_the_global_norm_of_the_steps_gradient_also_on_two_half_steps(tmp_path):
    cfg = small_cfg(tmp_path / "one", "--train.steps", "1", "--train.eval_every", "0")
    logged = read_metrics(train(cfg, log=quiet)["metrics"])[-1]["grad_norm"]
    assert logged == pytest.approx(reference_grad_norm(cfg), rel=1e-5)
    # Option II on one process: p.grad holds only the second half after the step; the optimizer's
    # norm of the combined gradient (the two halves, each weighted 1/2) is the full batch's
    cfg = small_cfg(tmp_path / "two", "--train.steps", "1", "--train.eval_every", "0",
                    "--optim.option", "II", "--optim.estimate_every", "1")
    rec = read_metrics(train(cfg, log=quiet)["metrics"])[-1]
    assert rec["two_halves"] and rec["grad_norm"] == pytest.approx(reference_grad_norm(cfg), rel=1e-5)


def test_lanton_layer_diagnostics_are_recorded_every_estimation_step_and_drawn_as_a_heat_map(tmp_path):
    s = train(small_cfg(tmp_path, "--train.steps", "9", "--train.eval_every", "0", "--optim.estimate_every", "3"),
              log=quiet)
    recs = [r for r in read_metrics(s["metrics"]) if "layers" in r]
    assert [r["step"] for r in recs] == [3, 6, 9]  # not only the log steps (2, 4, 6, 8, 9)
    layers = recs[-1]["layers"]
    assert len(layers["names"]) == len(layers["H"]) == len(layers["alpha"]) == len(layers["lr_factor"]) > 0
    assert {"lm_head.weight", "layers.0.attention.wq.weight", "norm.weight"} <= set(layers["names"])
    assert max(layers["H"]) > 0 and min(layers["lr_factor"]) < 1.0 <= max(layers["lr_factor"]) + 1e-12
    assert Path(s["rate_factor_plot"]) == tmp_path / "rate_factors.png"
    assert Path(s["rate_factor_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = train(small_cfg(tmp_path / "dmuon", "--train.steps", "3", "--train.eval_every", "0", "--optim.name", "dmuon"),
                  log=quiet)
    assert other["rate_factor_plot"] is None and not any("layers" in r for r in read_metrics(other["metrics"]))


def test_a_run_resumed_at_its_last_step_evaluates_so_the_summary_is_complete(tmp_path):
    from lanton_dist.preemption import COMPLETED

    common = ["--train.steps", "4", "--train.eval_every", "2"]
    done = train(small_cfg(tmp_path, *common), log=quiet)
    (tmp_path / COMPLETED).unlink()  # as if killed after the final checkpoint, before COMPLETED
    again = train(small_cfg(tmp_path, *common, "--train.resume", "true"), log=quiet)
    assert again["steps"] == 4 and (tmp_path / COMPLETED).exists()
    assert again["final_val_loss"] == pytest.approx(done["final_val_loss"], rel=1e-6)
    assert again["final_train_loss"] == done["final_train_loss"]
    assert read_metrics(again["metrics"]) == read_metrics(done["metrics"]), "no record added or lost"


def test_tensorboard_scalars_are_written_when_enabled(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(small_cfg(tmp_path, "--train.steps", "4", "--train.eval_every", "0", "--logging.tensorboard", "true",
                    "--optim.estimate_every", "2"), log=quiet)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "grad_norm", "tokens_per_s", "lr/hidden", "rate_factor/lm_head.weight"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4] and [e.step for e in acc.Scalars("grad_norm")] == [2, 4]


@pytest.mark.slow
def test_demo_prints_and_keeps_the_lanton_rate_factor_heat_map(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", Path(__file__).resolve().parents[1] / "launch" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    summary = demo.main(["--steps", "10", "--nproc", "1", "--threads", "0", "--out", str(tmp_path)])
    heat = summary["runs"]["lanton"]["rate_factor_plot"]
    assert heat == str(tmp_path / "lanton" / "rate_factors.png") and Path(heat).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["runs"]["dmuon"]["rate_factor_plot"] is None
    out = capsys.readouterr().out
    assert f"lanton rate factors per layer and step (heat map): {heat}" in out
    assert "[lanton] step 10/10 | loss" in out and "tok/s" in out
