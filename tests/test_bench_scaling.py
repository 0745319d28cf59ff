"""The width-scaling study (launch/bench_scaling.py): token rule, rate transfer, probe, variants,
output fields and resuming a killed study, at tiny widths in a few steps."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))  # importable by name: the worker processes unpickle run_one from it
import bench_common as common  # noqa: E402
import bench_scaling as scaling  # noqa: E402

TINY = ["--widths", "16,1,2,1,32", "32,1,2,1,64", "--steps", "2", "--evals", "2", "--optimizers", "lanton", "dmuon",
        "--grid", "1", "--seeds", "1", "2", "--jobs", "1", "--data.seq_len", "32", "--train.global_batch", "4",
        "--train.eval_batches", "1"]


def tiny_shape(dim: int) -> list[str]:
    return ["--model.dim", str(dim), "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "1",
            "--model.ffn_dim", str(2 * dim), "--data.seq_len", "32"]


def test_token_rule_trains_each_width_for_the_same_tokens_per_parameter_rounded_up_to_the_evaluations():
    args, extra = scaling._parse([])
    widths = scaling.make_widths(args, extra)
    assert [(w.name, w.params) for w in widths] == [("d128", 803968), ("d192", 2174016), ("d256", 4558080)]
    for w in widths:  # 0.25 tokens per parameter, 2048 tokens per step, 20 evaluations
        assert w.steps % 20 == 0 and w.eval_every == w.steps // 20
        assert 0.25 * w.params <= w.steps * 2048 < 0.25 * w.params + 20 * 2048
        assert w.warmup == round(w.steps / 15)
    assert [w.steps for w in widths] == [100, 280, 560]
    args, extra = scaling._parse(["--steps", "50", "--evals", "20"])
    assert {w.steps for w in scaling.make_widths(args, extra)} == {60}


def test_widths_are_preset_names_or_five_integers_and_anything_else_is_an_error():
    assert scaling.parse_shape("d256") == ("d256", (256, 6, 8, 4, 704))
    assert scaling.parse_shape("64,2,4,2,176") == ("d64L2", (64, 2, 4, 2, 176))
    with pytest.raises(ValueError, match="expected one of"):
        scaling.parse_shape("64,2,4")
    args, extra = scaling._parse(["--widths", "50,1,3,1,64"])  # dim 50 does not split into 3 heads
    with pytest.raises(ValueError, match="not divisible by model.n_heads"):
        scaling.make_widths(args, extra)


def test_probe_factors_and_budget_options_are_checked():
    for bad in (["--probe", "1"], ["--probe", "2", "2"], ["--probe", "-1"], ["--steps", "10", "--tokens-per-param", "1"],
                ["--tune-seed", "1"], ["--seeds", "1", "1"]):
        with pytest.raises(SystemExit):
            scaling._parse(bad)


@pytest.mark.parametrize("name", ["lanton", "scion", "dmuon", "adamw"])
def test_each_optimizers_transfer_rule_keeps_its_own_hidden_update_norm_fixed_across_width(name):
    small, large = (scaling.hidden_update_norms(["--optim.name", name, *tiny_shape(d)]) for d in (32, 128))
    kept, moves = ("rms_to_rms", "entry_rms") if name in ("lanton", "scion") else ("entry_rms", "rms_to_rms")
    assert large[kept] / small[kept] == pytest.approx(1.0, abs=0.1)
    # the other norm moves by about √(128/32) = 2 (a sign matrix's σ_max more): the check tells the rules apart
    ratio = large[moves] / small[moves]
    assert ratio < 0.6 if name in ("lanton", "scion") else ratio > 1.7
    if name in ("lanton", "scion"):
        assert small[kept] == pytest.approx(1.0, abs=0.25)  # η per unit rate (Newton–Schulz: σ ≈ 1)
    elif name == "dmuon":
        assert small[kept] == pytest.approx(0.2, abs=0.05)  # Moonlight's 0.2·√max: AdamW-like entries
    else:
        assert small[kept] == pytest.approx(1.0, abs=0.05)  # AdamW's first step: ±η per entry


def test_a_variant_equal_to_the_main_lanton_config_is_not_a_run_of_its_own():
    w = scaling.Width("d16L1", (16, 1, 2, 1, 32), 0, 4, 2, 0)
    assert scaling.own_variants(list(scaling.VARIANTS), w, []) == dict(anchor_min=True, option_II=True, k1=True, k10=False)
    assert scaling.own_variants(["k10"], w, ["--optim.estimate_every", "5"]) == dict(k10=True)


def test_a_run_hash_names_what_differs_from_the_defaults_so_new_default_keys_keep_finished_runs():
    from lanton_dist.config import RunConfig

    spec = common.RunSpec("lanton", 1.0, 1, 4, 1, "r", common.BASE_LRS["lanton"], tiny_shape(16))
    beta = RunConfig().optim.beta1
    same = dataclasses.replace(spec, overrides=(*spec.overrides, "--optim.beta1", repr(beta)))
    other = dataclasses.replace(spec, overrides=(*spec.overrides, "--optim.beta1", repr(beta / 2)))
    assert common.config_hash(same) == common.config_hash(spec) != common.config_hash(other)


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path):
    spec = common.RunSpec("lanton", 1.0, 1, 4, 1, "r", common.BASE_LRS["lanton"],
                          (*tiny_shape(16), "--train.global_batch", "4", "--train.eval_batches", "1"))
    stopped = dataclasses.replace(spec, overrides=(*spec.overrides, "--train.stop_after", "2"))
    assert common.config_hash(stopped) == common.config_hash(spec)  # stop_after does not change the run
    first = common.run_one(stopped, str(tmp_path / "a"), 1, 1)
    assert not first["completed"] and first["steps"] == [0, 1, 2]
    resumed = common.run_one(spec, str(tmp_path / "a"), 1, 1)
    summary = json.loads((Path(resumed["dir"]) / "summary.json").read_text())
    assert resumed["completed"] and not resumed["reused"] and summary["resumed_from"]
    assert not (Path(resumed["dir"]) / "checkpoints").exists()  # a finished run drops its checkpoints
    straight = common.run_one(spec, str(tmp_path / "b"), 1, 1)
    assert resumed["steps"] == straight["steps"] == [0, 1, 2, 3, 4] and resumed["val"] == straight["val"]
    assert common.run_one(spec, str(tmp_path / "a"), 1, 1)["reused"]


@pytest.mark.slow
def test_study_at_tiny_widths_killed_midway_resumes_leaving_finished_runs_untouched_and_reports_every_field(tmp_path):
    args = ["--out", str(tmp_path), *TINY, "--variants", "k1", "k10"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "bench_scaling.py"), *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while len(list(tmp_path.glob("runs/*/COMPLETED"))) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the study and its worker: a kill, not a clean stop
        proc.wait()
    finished = {p.parent: (p.parent / "metrics.jsonl").stat().st_mtime_ns for p in tmp_path.glob("runs/*/COMPLETED")
                if (p.parent / "summary.json").is_file()}  # COMPLETED comes first: a kill may fall between them
    assert len(finished) >= 3 and not (tmp_path / "scaling.json").exists()

    report = scaling.main(args)
    assert {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in finished} == finished  # not trained again
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert saved["probe"] == json.loads(json.dumps(report["probe"]))
    assert [w["name"] for w in saved["protocol"]["widths"]] == ["d16L1", "d32L1"]
    assert saved["protocol"]["token_rule"] == "2 steps at every width"
    for name in ("lanton", "dmuon"):
        assert set(saved["tuning"]["grid"][name]) == {"1"}
        lrs = [saved["transfer"]["lr"][w][name] for w in ("d16L1", "d32L1")]
        assert lrs[0] == lrs[1] == saved["tuning"]["best"][name]["lr"]  # rates transfer as they are
        assert set(saved["transfer"]["hidden_update"]["d32L1"][name]) == {"rms_to_rms", "entry_rms"}
        probe = saved["probe"]["results"][name]
        assert set(probe["final_val"]) == {"x1", "x0.5", "x2"}
        assert probe["final_val"][f"x{probe['best']:g}"] == min(probe["final_val"].values())
        assert probe["transfer_holds"] == (probe["best"] == 1)
        for w in ("d16L1", "d32L1"):
            runs = saved["widths"][w]["runs"][name]
            assert [r["seed"] for r in runs] == [1, 2] and all(r["steps"] == [0, 1, 2] for r in runs)
            assert saved["widths"][w]["step_s"][name] > 0
    v = saved["widths"]["d32L1"]["lanton_vs"]["dmuon"]
    assert {"lanton_to_baseline_final", "baseline_to_lanton_final", "ratio"} <= set(v["mean_curves"]) and len(v["per_seed"]) == 2
    variants = saved["variants"]["results"]
    assert saved["variants"]["width"] == "d32L1" and set(variants) == {"k1", "k10"}
    assert variants["k10"]["same_as_main"] and variants["k10"]["paired_gap_to_lanton"] == [0.0, 0.0]
    assert not variants["k1"]["same_as_main"] and variants["k1"]["seeds"] == [1, 2]
    # the runs: tuning 2 + 2 widths x 2 optimizers x 2 seeds + probe 2 x 3 + 1 variant x 2 seeds
    assert len(list(tmp_path.glob("runs/*/COMPLETED"))) == 2 + 8 + 6 + 2
    from PIL import Image

    with Image.open(tmp_path / "scaling.png") as im:
        assert im.size[0] > 1200


@pytest.mark.slow
def test_estimate_times_every_planned_configuration_and_predicts_the_wall_time(tmp_path):
    rep = scaling.main(["--out", str(tmp_path), "--estimate-steps", "2", *TINY])
    assert set(rep["per_config"]) == {"d16L1_lanton", "d16L1_dmuon", "d32L1_lanton", "d32L1_dmuon", "d32L1_lanton-anchor_min",
                                      "d32L1_lanton-option_II", "d32L1_lanton-k1"}
    assert all(c["step_s"] > 0 and c["run_s"] >= 2 * c["step_s"] for c in rep["per_config"].values())
    lo, hi = rep["estimate_h"]
    assert 0 < lo <= hi and json.loads((tmp_path / "estimate.json").read_text())["estimate_h"] == [lo, hi]
    assert not (tmp_path / "scaling.json").exists()
