"""The planner's activation memory (Korthikanti et al.'s estimate, with and without activation
checkpointing) in its fit check, and the smallest TP × PP that fits a run that does not."""
from __future__ import annotations

from dataclasses import replace

import pytest

from lanton_dist.config import ModelConfig
from lanton_dist.plan import HARDWARE, OptimSettings, ParallelLayout, StepPlanner, plan_table
from lanton_dist.plan.inputs import PRESETS
from lanton_dist.plan.memory import ActivationSettings, fit_with_activations, layer_activation_bytes, stage_activation_bytes
from lanton_dist.plan.report import candidate_layouts

L13 = PRESETS["llama-13b"]


def test_layer_activations_follow_the_korthikanti_formula():
    s, b, h, a = 4096, 2, L13.dim, L13.n_heads
    stored = ActivationSettings(seq_len=s, micro_batch=b, flash_attention=False)
    assert layer_activation_bytes(L13, stored, 1, recompute=False) == s * b * h * (34 + 5 * a * s / h)
    assert layer_activation_bytes(L13, stored, 8, recompute=False) == s * b * h * (10 + 24 / 8 + 5 * a * s / (h * 8))
    flash = ActivationSettings(seq_len=s, micro_batch=b)
    assert layer_activation_bytes(L13, flash, 1, recompute=False) == 34 * s * b * h
    assert layer_activation_bytes(L13, flash, 4, recompute=True) == 2 * s * b * h  # the block input only
    fp32 = ActivationSettings(seq_len=s, micro_batch=b, activation_bytes=4)
    assert layer_activation_bytes(L13, fp32, 1, recompute=False) == 2 * 34 * s * b * h


def test_the_first_pipeline_stage_holds_every_layers_worth_and_the_last_the_logits():
    act = ActivationSettings(seq_len=2048)
    per_layer = layer_activation_bytes(L13, act, 2, recompute=False)
    logits = 4 * 2048 * L13.vocab_size / 2
    stages = stage_activation_bytes(L13, act, tp=2, pp=4)
    assert stages[0] == int(L13.n_layers * per_layer)  # 4 micro-batches in flight × 10 layers
    assert stages[3] == int(L13.n_layers // 4 * per_layer + logits)
    assert stages == sorted(stages, reverse=True)
    ckpt = stage_activation_bytes(L13, replace(act, recompute=True), tp=2, pp=1)[0]
    assert ckpt == int(L13.n_layers * 2 * 2048 * L13.dim + per_layer + logits)
    assert ckpt < stage_activation_bytes(L13, act, tp=2, pp=1)[0] / 5


def test_activations_decide_the_fit_and_checkpointing_can_restore_it():
    """7B in fp32 on 8 H100s (ZeRO-2): ~67 GB of model and optimizer per rank fits 80 GiB; with
    the activations of one 4096-token sequence (~19 GB) it does not; with activation
    checkpointing (~2 GB) it does again."""
    p = StepPlanner("llama-7b", ParallelLayout(), OptimSettings(), HARDWARE["h100"])
    assert p.memory_summary()["fits"]  # activations apart
    act = ActivationSettings(seq_len=4096)
    plain, ckpt = fit_with_activations(p, act), fit_with_activations(p, replace(act, recompute=True))
    assert not plain["fits"] and ckpt["fits"]
    assert plain["total"] == p.memory_summary()["peak"] + plain["activations"]
    assert plain["activations"] > 8 * ckpt["activations"]


def test_candidate_layouts_grow_by_tp_times_pp_and_respect_the_model():
    lay = ParallelLayout(nodes=2, gpus_per_node=16)
    got = [(c.tp, c.pp) for c in candidate_layouts(L13, lay)]
    assert got[:4] == [(2, 1), (1, 2), (4, 1), (2, 2)]
    assert all(40 % tp == 0 and 40 % pp == 0 and 32 % (tp * pp) == 0 for tp, pp in got)
    assert (16, 1) not in got and (1, 1) not in got  # 40 heads do not split over 16; (1, 1) is the layout itself
    products = [tp * pp for tp, pp in got]
    assert products == sorted(products)


def test_plan_names_the_smallest_tp_pp_that_fits_13b_on_64_ranks():
    text, data = plan_table("llama-13b", ParallelLayout(nodes=8), OptimSettings(), HARDWARE["h100"], algorithms=("lanton",),
                            ks=(10,), growth_models=("llama-1b",), seq_len=4096)
    found = data["fit_search"]["lanton"]
    assert (found["plain"]["tp"], found["plain"]["pp"]) == (2, 1) and found["plain"]["fits"]
    assert (found["checkpointed"]["tp"], found["checkpointed"]["pp"]) == (2, 1)
    line = next(ln for ln in text.splitlines() if ln.startswith("WARNING: does not fit: lanton at"))
    assert "TP 1 x PP 1 on 64 ranks" in line and "the smallest TP x PP that fits is TP 2 x PP 1 (x DP 32" in line
    # and TP 2 x PP 1 does fit once planned
    p = StepPlanner("llama-13b", ParallelLayout(nodes=8, tp=2), OptimSettings(), HARDWARE["h100"])
    assert fit_with_activations(p, ActivationSettings(seq_len=4096))["fits"]


def test_plan_says_when_no_tp_pp_of_the_ranks_fits():
    tiny = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)
    hw = replace(HARDWARE["h100"], memory_gib=0.0005)  # 512 KiB
    text, data = plan_table(tiny, ParallelLayout(nodes=1, gpus_per_node=2), OptimSettings(), hw, algorithms=("adamw",),
                            ks=(10,), growth_models=("llama-1b",))
    assert data["fit_search"]["adamw"] == {"plain": None, "checkpointed": None}
    assert "without activation checkpointing no TP x PP of these ranks fits" in text


def test_plan_cli_activations_scale_with_the_micro_batch(tmp_path, capsys):
    import json

    from lanton_dist.cli import main

    acts = {}
    for micro_batch in (1, 4):
        path = tmp_path / f"plan{micro_batch}.json"
        assert main(["plan", "--model", "llama-1b", "--nodes", "1", "--algorithms", "lanton", "--growth-models", "llama-1b",
                     "--ks", "10", "--micro-batch", str(micro_batch), "--seq-len", "2048", "--json", str(path)]) == 0
        assert f"activations of micro-batch {micro_batch} x 2048 tokens" in capsys.readouterr().out
        acts[micro_batch] = json.loads(path.read_text())["plans"]["lanton"]["memory"]["with_activations"]["plain"]["activations"]
    assert acts[4] == pytest.approx(4 * acts[1], rel=1e-9)
