"""The sample-efficiency benchmark's protocol (launch/bench_sample_efficiency.py) and the curve
arithmetic it shares with the scaling study (launch/bench_common.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))  # importable by name: the worker processes unpickle run_one from it
import bench_common as common  # noqa: E402
import bench_sample_efficiency as bench  # noqa: E402

SMALL = ["--model.dim", "32", "--model.n_layers", "1", "--model.ffn_dim", "64", "--data.seq_len", "32",
         "--train.eval_batches", "2"]


def test_steps_to_reach_interpolates_between_evaluations_and_is_none_when_never_reached():
    steps, losses = [0, 10, 20, 30], [5.0, 4.0, 3.0, 2.5]
    assert common.steps_to_reach(steps, losses, 4.0) == 10
    assert common.steps_to_reach(steps, losses, 3.5) == pytest.approx(15.0)
    assert common.steps_to_reach(steps, losses, 2.75) == pytest.approx(25.0)
    assert common.steps_to_reach(steps, losses, 2.0) is None


def test_a_curve_twice_as_fast_is_a_speed_up_of_two_and_the_reverse_one_half():
    steps = list(range(0, 101, 10))
    slow = [5.0 - 0.02 * s for s in steps]        # reaches 3.0 at step 100
    fast = [max(2.9, 5.0 - 0.04 * s) for s in steps]  # reaches 3.0 at step 50, ends lower
    up = common.speedup(steps, fast, slow)
    assert up["lanton_reaches_baseline_final"] and up["ratio"] == pytest.approx(2.0)
    down = common.speedup(steps, slow, fast)
    assert not down["lanton_reaches_baseline_final"] and down["ratio"] == pytest.approx(0.5)


def test_steps_to_each_others_final_loss_in_both_directions():
    steps = list(range(0, 101, 10))
    slow = [5.0 - 0.02 * s for s in steps]            # final 3.0
    fast = [max(2.9, 5.0 - 0.04 * s) for s in steps]  # reaches 3.0 at step 50, final 2.9 (step 52.5)
    up = common.speedup(steps, fast, slow)
    assert up["lanton_to_baseline_final"] == pytest.approx(50.0)
    assert up["baseline_to_lanton_final"] is None     # the slow curve never reaches 2.9
    down = common.speedup(steps, slow, fast)
    assert down["lanton_to_baseline_final"] is None and down["baseline_to_lanton_final"] == pytest.approx(50.0)


def test_analysis_pairs_seeds_and_reports_mean_and_spread():
    steps = [0, 10, 20]
    runs = {"lanton": [dict(seed=s, steps=steps, val=[5.0, 3.0, 2.0 + 0.1 * s], final_val=2.0 + 0.1 * s) for s in (1, 2)],
            "adamw": [dict(seed=s, steps=steps, val=[5.0, 4.0, 3.0], final_val=3.0) for s in (1, 2)]}
    res = common.analyse(runs)
    assert res["summary"]["lanton"]["final_mean"] == pytest.approx(2.15)
    assert res["summary"]["lanton"]["final_std"] > 0 and res["summary"]["adamw"]["final_std"] == 0
    v = res["lanton_vs"]["adamw"]
    assert v["mean_curves"]["ratio"] == pytest.approx(20 / 10) and len(v["per_seed_ratio"]) == 2
    assert v["final_gap"] == pytest.approx(2.15 - 3.0)


@pytest.mark.slow
def test_benchmark_tunes_extends_an_edge_grid_evaluates_held_out_seeds_and_reuses_finished_runs(tmp_path):
    args = ["--out", str(tmp_path), "--steps", "4", "--eval-every", "2", "--optimizers", "lanton", "adamw",
            "--grid", "1", "2", "--max-extend", "1", "--seeds", "1", "2", "--jobs", "1", *SMALL]
    report = bench.main(args)
    saved = json.loads((tmp_path / "sample_efficiency.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    for name in ("lanton", "adamw"):
        grid = saved["grid"][name]
        assert {"1", "2"} <= set(grid) and len(grid) in (2, 3)  # extended once when the best sat at an edge
        assert [r["seed"] for r in saved["runs"][name]] == [1, 2]
        assert all(r["steps"] == [0, 2, 4] for r in saved["runs"][name])
    assert set(saved["lanton_vs"]) == {"adamw"}
    from PIL import Image

    with Image.open(tmp_path / "sample_efficiency.png") as im:
        assert im.size[0] > 600
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/metrics.jsonl")}
    assert len(written) == sum(len(g) for g in saved["grid"].values()) + 4
    assert not list((tmp_path / "runs").glob("*/checkpoints/*"))  # a finished run keeps its curves, not its checkpoints
    again = bench.main(args)  # an interrupted benchmark resumes: finished runs are not trained again
    assert again["summary"] == report["summary"]
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_tuning_seed_may_not_be_an_evaluation_seed():
    with pytest.raises(SystemExit):
        bench._parse(["--tune-seed", "1", "--seeds", "1", "2"])
