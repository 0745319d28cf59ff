"""The rehearsal (lanton_dist.rehearsal, ``lanton-dist rehearse``): the real ZeRO engine built and
stepped as sampled ranks of a fake 8- and 64-rank world with LLaMA-7B shapes on meta equals the
planner (bytes held by kind, every metered collective of construction and three steps) and its
ranks issue one collective sequence; a divergent sequence, a planner difference and bad input
are caught with the documented exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lanton_dist.cli import main
from lanton_dist.rehearsal import rehearse, run_ranks
from lanton_dist.rehearsal.compare import consistency
from lanton_dist.rehearsal.driver import RankSpec
from lanton_dist.rehearsal.fakeworld import meta_skip_vote

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "llama-7b.yaml")
ZERO = ["--parallel.backend=zero"]


def _check_engine_report(data: dict, gpus: int) -> None:
    """A report (``Report.to_json``) of LLaMA-7B on ``gpus`` engine ranks equals the planner."""
    assert data["ok"], "\n".join(data["differences"] + data["inconsistencies"])
    ranks = [r["rank"] for r in data["ranks"]]
    assert {0, 1, gpus // 2, gpus - 1} <= set(ranks) and len(ranks) <= 5
    assert any("most loaded owner" in r["why"] for r in data["ranks"])
    assert len(set(data["digests"].values())) == 1
    for r in data["ranks"]:
        mem = r["memory"]
        assert mem["parameters"][0] == mem["parameters"][1] >= 6_738_415_616 * 4
        assert mem["state"][0] == mem["state"][1] > 0
        assert mem["prev_grad"][0] == mem["prev_grad"][1] > 0       # Option I, before the estimation step
        assert [s["count"][0] for s in r["steps"]] == [s["count"][1] for s in r["steps"]]
        assert r["steps"][2]["estimation"] and "variance" in r["steps"][2]["phases"]["rehearsed"]
        assert "variance" not in r["steps"][1]["phases"]["rehearsed"]
        assert r["skip_vote_reads"] == [1, 1, 1]                    # the one seam, once per step
        assert len(r["step_ms"]) == 3 and r["construction_s"] > 0


@pytest.mark.slow
def test_rehearsed_engine_ranks_equal_the_planner_and_issue_one_collective_sequence_at_64_ranks():
    report = rehearse(CONFIG, ZERO, 8, 8, "sample", steps=3, jobs=2)
    _check_engine_report(report.to_json(), 64)


@pytest.mark.slow
def test_cli_exits_0_when_the_rehearsal_equals_the_planner_at_8_ranks(tmp_path, capsys):
    out_json = tmp_path / "report.json"
    assert main(["rehearse", CONFIG, *ZERO, "--nodes", "1", "--gpus-per-node", "8", "--jobs", "2", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "OK: rehearsal equals the planner" in out and "skip/presence vote" in out
    _check_engine_report(json.loads(out_json.read_text()), 8)


@pytest.mark.slow
def test_fsdp2_adapter_on_synthesised_shards_holds_and_sends_what_the_planner_predicts():
    """LANTONFSDP2's exchange and core on FSDP2-shaped meta shards, 2 ranks: parameters,
    gradients, state and Option I's previous gradient equal the planner's fsdp2 model, and
    the metered collectives (all-to-alls of the LMO exchange, scalar phases) its multiset."""
    report = rehearse(CONFIG, ["--parallel.backend=fsdp2"], 1, 2, "sample", jobs=2)
    assert report.ok, "\n".join(report.differences + report.inconsistencies)
    for r in report.ranks:
        assert r.rules["buffers"] == "model"                   # FSDP2's own unit buffers are not run
        assert r.memory["state"][0] == r.memory["state"][1] > 0
        assert {"lmo_gather", "lmo_scatter"} <= set(r.steps[1]["phases"]["rehearsed"])


@pytest.mark.slow
def test_megatron_tp_pp_ranks_agree_and_differ_from_the_planner_only_in_dp_buckets_of_fused_weights():
    """Megatron TP 2 × PP 2 (4 ranks, two stages, DP 1): every rank's collectives agree within each
    group instance and job-wide (the scalar all-reduces span both stages), memory by kind and
    the TP exchange equal the planner's; the planner's DP buckets differ because it models
    q/k/v and gate/up as separate parameters where Megatron fuses them (linear_qkv, linear_fc1).
    (With DP 1 every matrix's DP owner is the rank itself; at DP > 1 the owners, hence state per
    rank, differ too: docs/rehearsal.md.)"""
    report = rehearse(CONFIG, ["--parallel.tp=2", "--parallel.pp=2"], 1, 4, "sample", jobs=2)
    assert report.inconsistencies == []
    assert not report.ok
    assert all(any(ph in d for ph in ("init_sync", "grad_reduce", "param_gather")) for d in report.differences)
    for r in report.ranks:
        assert all(a == b for kind, (a, b) in r.memory.items() if r.rules[kind] == "="), r.memory
        for s in r.steps[1:]:
            for phase in ("lmo_gather", "lmo_scatter", "finite", "norm"):
                assert s["phases"]["rehearsed"][phase] == s["phases"]["planned"][phase], (r.rank, s["step"], phase)
    assert {r.rank for r in report.ranks} == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def divergent_ranks() -> list[dict]:
    """Ranks 0 and 1 of 8 built with different bucket sizes (25 and 10 MiB): the bug class
    that hangs NCCL."""
    return run_ranks([RankSpec(CONFIG, (*ZERO, "--parallel.bucket_mb=25"), 8, 0),
                      RankSpec(CONFIG, (*ZERO, "--parallel.bucket_mb=10"), 8, 1)], jobs=2)


@pytest.mark.slow
def test_a_rank_with_another_collective_sequence_is_detected(divergent_ranks):
    """The first divergent collective of the shared group is named; equal sequences pass."""
    problems = consistency(divergent_ranks)
    assert len(problems) == 1 and "ranks 0 and 1 diverge at their dp collective #" in problems[0]
    assert consistency([divergent_ranks[0], divergent_ranks[1] | {"collectives": divergent_ranks[0]["collectives"]}]) == []


def test_the_seam_answers_only_the_cores_skip_vote_read():
    with meta_skip_vote() as log:
        with pytest.raises((NotImplementedError, RuntimeError)):
            torch.zeros(3, device="meta").tolist()     # any other host read of a meta tensor still fails
        assert torch.ones(2).tolist() == [1.0, 1.0]
    assert log.reads == []


@pytest.mark.slow
def test_cli_exits_1_where_the_rehearsal_differs_from_the_planner_or_ranks_disagree(divergent_ranks, monkeypatch, capsys):
    """Rank 1 built with a 10 MiB bucket against the planner of the config's 25 MiB: its
    collectives differ from the planner's and from rank 0's."""
    import lanton_dist.rehearsal.runner as runner

    monkeypatch.setattr(runner, "run_ranks", lambda specs, jobs: divergent_ranks)
    assert main(["rehearse", CONFIG, *ZERO, "--nodes", "1", "--gpus-per-node", "8"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "rank 1 step 1: collective #" in out and "diverge at their dp collective" in out
    assert "rank 0 step" not in out


@pytest.mark.parametrize("argv,message", [
    ([CONFIG, "--parallel.backend=deepspeed"], "parallel.backend 'deepspeed' is not rehearsed yet"),
    ([CONFIG, "--nodes", "1"], "not divisible by tp"),     # megatron TP 8 × PP 2 from the config on 8 GPUs
    ([CONFIG, *ZERO, "--steps", "2"], "--steps must be >= 3"),
    ([CONFIG, "--parallel.no_such_key=1"], "no_such_key"),
    ([str(ROOT / "configs" / "missing.yaml")], "does not exist"),
    ([CONFIG, *ZERO, "--model", "llama-8b"], "unknown model preset"),
    ([CONFIG, "--nodes", "2", "--model", "llama-1b"], "data.seq_len 4096 exceeds model.max_seq_len 2048"),
])
def test_cli_refuses_bad_input_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["rehearse", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
