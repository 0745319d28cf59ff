"""The sample-efficiency study (launch/bench_sample_efficiency.py): arms, plan, fixed validation
set, tuning path, resuming, frontier and paired-ratio arithmetic, summary step; and the curve
arithmetic it shares with the scaling study (launch/bench_common.py)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))  # importable by name: the worker processes unpickle run_one from it
import bench_common as common  # noqa: E402
import bench_sample_efficiency as bench  # noqa: E402

SMALL = ["--model.dim", "32", "--model.n_layers", "1", "--model.ffn_dim", "64", "--data.seq_len", "32"]


def make_plan(argv: list[str]) -> bench.Plan:
    return bench.make_plan(*bench._parse(argv))


# ============================================================================ shared curve arithmetic
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
    assert up["lanton_to_baseline_final"] == pytest.approx(50.0) and up["baseline_to_lanton_final"] is None


def test_analysis_pairs_seeds_and_reports_mean_and_spread():
    steps = [0, 10, 20]
    runs = {"lanton": [dict(seed=s, steps=steps, val=[5.0, 3.0, 2.0 + 0.1 * s], final_val=2.0 + 0.1 * s) for s in (1, 2)],
            "adamw": [dict(seed=s, steps=steps, val=[5.0, 4.0, 3.0], final_val=3.0) for s in (1, 2)]}
    res = common.analyse(runs)
    assert res["summary"]["lanton"]["final_mean"] == pytest.approx(2.15)
    v = res["lanton_vs"]["adamw"]
    assert v["mean_curves"]["ratio"] == pytest.approx(20 / 10) and len(v["per_seed_ratio"]) == 2


# ============================================================================ arms and plan
def test_arms_are_override_lists_with_the_new_optimizer_keys():
    assert list(bench.ARMS) == ["dmuon", "scion", "lanton", "lanton_auto"]
    assert bench.ARMS["lanton_auto"].overrides == ("--optim.alpha_mode", "auto")
    assert bench.ARMS["lanton"].overrides == ("--optim.alpha_mode", "fixed")
    assert {a.head_key for n, a in bench.ARMS.items() if n != "dmuon"} == {"optim.lr.head"}
    assert bench.ARMS["dmuon"].head_key == "optim.lr.embed_head"  # D-Muon's head is AdamW's embed_head group
    plan = make_plan([])
    spec = plan.spec("lanton_auto", 2.0, 0.5, 3, 600)
    over = spec.config_overrides()
    assert over[:2] == ["--optim.name", "lanton"] and over[over.index("--optim.lr.head") + 1] == "0.5"
    assert over[over.index("--optim.alpha_mode") + 1] == "auto"
    assert over[over.index("--optim.lr.hidden") + 1] == repr(2.0 * 0.05)
    assert plan.rates("dmuon", 2.0, 0.5) == {"optim.lr.hidden": 0.02, "optim.lr.embed_head": 0.025, "optim.lr.vector": 0.1}


def test_default_plan_is_the_issues_study():
    plan = make_plan([])
    assert plan.arms == ("dmuon", "scion", "lanton", "lanton_auto")
    assert [round(m, 4) for m in plan.rate_grid] == [0.5, 0.7071, 1.0, 1.4142, 2.0]  # a √2 grid
    assert plan.seeds == (1, 2, 3, 4) and plan.horizons == (300, 600, 1200) and plan.tune_steps == 600
    assert plan.eval_batches() * 16 == 64


def test_each_horizon_has_its_own_schedule_and_every_run_the_same_validation_windows():
    plan = make_plan([])
    for seed in (1, 2):
        for steps, warmup in ((300, 20), (600, 40), (1200, 80)):
            cfg = common.load_config(plan.spec("scion", 1.0, None, seed, steps).config_overrides())
            assert (cfg.train.steps, cfg.schedule.warmup_steps, cfg.train.eval_every) == (steps, warmup, steps // 12)
            assert (cfg.train.seed, cfg.data.seed, cfg.data.val_seed, cfg.train.eval_batches) == (seed, seed, 0, 4)


def test_validation_windows_are_identical_across_seeds_while_training_batches_differ():
    from lanton_dist.data import build_dataset

    plan = make_plan([])
    cfgs = [common.load_config(plan.spec("scion", 1.0, None, s, 300).config_overrides()) for s in (1, 2)]
    a, b = (build_dataset(c.data, c.model.vocab_size) for c in cfgs)
    for i in range(cfgs[0].train.eval_batches):  # the trainer's validation batches 0 … eval_batches−1
        assert a.global_starts(i, 16, "val").tolist() == b.global_starts(i, 16, "val").tolist()
    assert a.global_starts(0, 16, "train").tolist() != b.global_starts(0, 16, "train").tolist()
    # without data.val_seed the validation windows are the seed's own (what the width study had)
    a.val_seed = b.val_seed = None
    assert a.global_starts(0, 16, "val").tolist() != b.global_starts(0, 16, "val").tolist()


def test_arguments_are_checked():
    for bad in (["--tune-seed", "1"], ["--seeds", "1", "1"], ["--evals", "7"], ["--head-grid", "0.5", "2"],
                ["--rate-grid", "0"], ["--warmup-fraction", "1"]):
        with pytest.raises(SystemExit):
            bench._parse(bad)


def test_an_arm_needing_a_config_key_this_checkout_lacks_is_one_config_error_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(bench.ARMS, "scion", bench.Arm("scion", "scion", (0.05, 0.1, 0.01), "optim.lr.hidden", 0.05,
                                                       ("--optim.no_such_key", "1")))
    with pytest.raises(SystemExit) as e:
        bench.main(["--out", str(tmp_path), "--arms", "scion"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: arm scion") and "no_such_key" in err[0]
    assert not list(tmp_path.iterdir())  # nothing trained


# ============================================================================ the tuning path (fake runs)
BEST = {"dmuon": (1.0, 2.0), "scion": (2.0 * math.sqrt(2), 1.0), "lanton": (0.5, 0.5), "lanton_auto": (1.0, 1.0)}


class FakeRunner:
    """:class:`bench_common.Launcher`'s interface: a run's final loss is a bowl around the arm's
    :data:`BEST` (rate multiplier, head multiplier) in log space, lower with more steps and
    seed-dependent; ``root`` (optional) gets the files of a finished run."""

    def __init__(self, root: Path | None = None) -> None:
        self.calls: list[list[str]] = []
        self.root = root

    def run(self, specs: list[common.RunSpec]) -> list[dict]:
        self.calls.append([s.label for s in specs])
        return [self.record(s) for s in specs]

    @staticmethod
    def loss(s: common.RunSpec, step: int) -> float:
        arm = s.label.split("_x")[0]
        m, h = BEST[arm]
        head = float(s.label.split("_h")[1].split("_")[0]) if "_h" in s.label else 1.0
        bowl = math.log(s.mult / m) ** 2 + math.log(head / h) ** 2
        speed = {"lanton_auto": 2.0, "lanton": 1.0, "scion": 1.0, "dmuon": 0.9}[arm] * (1 + 0.01 * s.seed)
        return 1.0 + bowl + 3.0 / (1 + speed * step / 100)

    def record(self, s: common.RunSpec) -> dict:
        steps = list(range(0, s.steps + 1, s.eval_every))
        val = [self.loss(s, t) for t in steps]
        if self.root is not None:
            from lanton_dist.preemption import COMPLETED

            out = common.run_dir(self.root, s)
            out.mkdir(parents=True, exist_ok=True)
            lines = [dict(step=t, val_loss=v, step_time=0.1) for t, v in zip(steps, val)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            (out / "summary.json").write_text(json.dumps(dict(wall_s=1.0, num_params=10, unigram_baseline=5.0)))
            (out / COMPLETED).write_text("")
        return dict(label=s.label, seed=s.seed, mult=s.mult, steps=steps, val=val, final_val=val[-1], wall_s=1.0,
                    step_s=0.1, unigram=5.0, num_params=10)


def test_tuning_searches_the_rate_axis_then_the_head_axis_extending_edges_then_evaluates_seeds_by_horizons():
    plan = make_plan(["--max-extend", "2"])
    runner = FakeRunner()
    study = bench.run_study(plan, runner)
    r2 = math.sqrt(2)
    # scion's optimum 2√2 lies past the grid's top: extended by ×√2 once (2√2), then once more (4), not further
    assert sorted(study["rate"]["scion"]) == pytest.approx([0.5, 1 / r2, 1.0, r2, 2.0, 2 * r2, 4.0])
    assert sorted(study["rate"]["lanton_auto"]) == pytest.approx(plan.rate_grid)  # interior optimum: no extension
    assert sorted(study["head"]["dmuon"]) == pytest.approx([0.5, 1.0, 2.0, 4.0])  # head axis: ×2 past the edge
    for arm, (m, h) in BEST.items():
        assert study["best"][arm] == (pytest.approx(m), pytest.approx(h))
    # the head axis' ×1 run is the rate axis' best run: same label and config, so never trained twice
    labels = [lab for call in runner.calls for lab in call]
    assert labels.count(plan.spec("lanton", 0.5, 1.0, 0, 600).label) == 2
    evaluation = runner.calls[-1]
    assert len(evaluation) == 4 * 4 * 3 == len(set(evaluation))
    assert {k[1:] for k in study["runs"]} == {(s, n) for s in (1, 2, 3, 4) for n in (300, 600, 1200)}
    assert all(r["steps"][-1] == n for (_, _, n), r in study["runs"].items())


def test_a_resumed_study_takes_the_same_path_and_the_summary_reads_finished_runs_only(tmp_path):
    plan = make_plan(["--arms", "dmuon", "scion", "--head-grid", "--tune-steps", "12", "--horizons", "12", "24",
                      "--seeds", "1", "2", "--evals", "4", *SMALL])
    first, again = FakeRunner(tmp_path), FakeRunner()
    study = bench.run_study(plan, first)
    assert bench.run_study(plan, again)["best"] == study["best"] and again.calls == first.calls
    read = bench.run_study(plan, common.Reader(tmp_path))  # what --summary does: reads, trains nothing
    assert {k: r["final_val"] for k, r in read["runs"].items()} == {k: r["final_val"] for k, r in study["runs"].items()}
    victim = common.run_dir(tmp_path, plan.spec("scion", *study["best"]["scion"], 2, 24))
    (victim / "COMPLETED").unlink()  # an unfinished run: the summary refuses
    with pytest.raises(common.MissingRuns, match="1 of 8 runs not finished"):
        bench.run_study(plan, common.Reader(tmp_path))


def test_summary_step_writes_json_and_plot_to_the_results_folder_and_prints_claims(tmp_path, capsys):
    argv = ["--arms", "dmuon", "scion", "--head-grid", "--tune-steps", "12", "--horizons", "12", "24", "--seeds", "1",
            "2", "--evals", "4", *SMALL]
    bench.run_study(make_plan(argv), FakeRunner(tmp_path / "runs"))
    report = bench.main(["--out", str(tmp_path / "runs"), "--summary", "--results", str(tmp_path / "res"), *argv])
    saved = json.loads((tmp_path / "res" / "sample_efficiency.json").read_text())
    assert saved["claims"] == report["claims"] and set(saved["pairs"]) == {"scion_vs_dmuon"}
    assert saved["frontier"]["scion"]["1"][-1][0] == 24 * 16 * 32
    out = capsys.readouterr().out
    assert out.startswith("sample_efficiency | 12 steps: dmuon") and "claim: " in out
    from PIL import Image

    with Image.open(tmp_path / "res" / "sample_efficiency.png") as im:
        assert im.size[0] > 1000


# ============================================================================ frontier and paired ratios
def test_frontier_is_the_lower_envelope_of_every_horizons_curve():
    short = ([100, 200], [3.0, 2.0])         # annealed at 200
    long = ([100, 200, 300, 400], [3.2, 2.4, 1.9, 1.5])
    assert bench.frontier([short, long]) == [(100, 3.0), (200, 2.0), (300, 1.9), (400, 1.5)]
    assert bench.frontier([([0, 100], [5.0, 4.0]), ([100, 200], [float("nan"), 3.0])]) == [(100, 4.0), (200, 3.0)]
    assert bench.tokens_to_loss([(100, 3.0), (200, 2.0)], 2.5) == pytest.approx(150)
    assert bench.tokens_to_loss([(100, 3.0), (200, 2.0)], 1.0) is None


def test_paired_ratio_is_per_seed_at_the_common_loss_and_a_claim_needs_every_seed():
    fronts = {"a": {1: [(100, 3.0), (200, 2.0)], 2: [(100, 3.0), (200, 2.0)], 3: [(100, 3.0), (200, 2.0)]},
              "b": {1: [(100, 3.5), (200, 3.0)], 2: [(100, 3.5), (200, 3.0)], 3: [(100, 2.5), (200, 1.9)]}}
    finals = {k: {s: {200: f[-1][1]} for s, f in v.items()} for k, v in fronts.items()}
    p = bench.paired(fronts, finals, "a", "b", 200)
    # seeds 1, 2: common loss 3.0, a reaches it at 100 tokens, b at 200; seed 3: common loss 2.0, a at 200, b at ~183
    assert p["ratio"][:2] == [pytest.approx(2.0)] * 2 and p["ratio"][2] == pytest.approx((100 + 100 * 0.5 / 0.6) / 200)
    assert p["gap"] == [pytest.approx(-1.0), pytest.approx(-1.0), pytest.approx(0.1)]
    assert p["claims"] == []  # seed 3 disagrees with seeds 1 and 2: nothing holds on every seed
    finals["b"][3][200] = 3.0
    fronts["b"][3] = [(100, 3.5), (200, 3.0)]
    p = bench.paired(fronts, finals, "a", "b", 200)
    assert p["claims"] == ["200 steps: a ends below b on every seed (gap 1.0000–1.0000)",
                           "200 steps: a reaches the common loss with 2.00–2.00× fewer tokens than b on every seed"]
    q = bench.paired(fronts, finals, "b", "a", 200)  # the same facts, stated from the other side
    assert q["claims"] == p["claims"] and q["ratio"] == [pytest.approx(0.5)] * 3


# ============================================================================ end to end (real training)
@pytest.mark.slow
def test_smoke_study_trains_reuses_finished_runs_and_estimates_its_wall_time(tmp_path):
    argv = ["--out", str(tmp_path), "--arms", "scion", "--head-grid", "--rate-grid", "1", "2", "--max-extend", "0",
            "--tune-steps", "4", "--horizons", "2", "4", "--evals", "2", "--seeds", "1", "--jobs", "1",
            "--val-windows", "16", *SMALL]
    report = bench.main(argv)
    assert report["tuning"]["rate"]["scion"].keys() == {"1", "2"}
    assert (tmp_path / "sample_efficiency.json").is_file() and (tmp_path / "sample_efficiency.png").is_file()
    written = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/metrics.jsonl")}
    assert len(written) == 2 + 2 and not list(tmp_path.glob("*/checkpoints/*"))
    assert bench.main(argv)["final"] == report["final"]  # resumed: every run is reused, none trained again
    assert {p: p.stat().st_mtime_ns for p in written} == written
    est = bench.main([*argv, "--estimate-steps", "2", "--max-extend", "1"])
    lo, hi = est["estimate_h"]
    assert 0 < lo < hi and set(est["per_optimizer"]) == {"scion"}
