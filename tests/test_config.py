"""Run configs: every shipped YAML loads; unknown keys and bad types are clear errors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lanton_dist.config import RunConfig, load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_demo_config_exists():
    assert ROOT / "configs" / "llama-tiny-cpu.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.train.steps >= 1 and cfg.train.global_batch >= 1


def test_demo_config_is_a_tiny_single_process_llama():
    cfg = load_run_config(ROOT / "configs" / "llama-tiny-cpu.yaml")
    assert cfg.parallel.backend == "none"
    assert cfg.data.source == "stdlib" and cfg.model.vocab_size == 256
    assert cfg.model.n_kv_heads < cfg.model.n_heads  # exercises GQA
    assert cfg.optim.name == "lanton" and cfg.optim.estimate_every == 10
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_unknown_yaml_key_is_an_error_listing_the_valid_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ValueError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert "stepz" in msg and "'steps'" in msg and "'global_batch'" in msg


def test_unknown_section_is_an_error():
    with pytest.raises(ValueError, match="trian"):
        load_run_config(None, ["--trian.steps", "3"])


def test_overrides_convert_to_the_declared_types():
    cfg = load_run_config(ROOT / "configs" / "llama-tiny-cpu.yaml", [
        "--train.steps", "50", "--optim.lr.hidden=0.03", "--train.resume", "true",
        "--optim.adam_betas", "[0.9, 0.99]", "--optim.name", "dmuon", "--model.init_std", "1e-2",
    ])
    assert cfg.train.steps == 50 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr.hidden == pytest.approx(0.03) and isinstance(cfg.optim.lr.hidden, float)
    assert cfg.optim.lr.embed_head == load_run_config(ROOT / "configs" / "llama-tiny-cpu.yaml").optim.lr.embed_head
    assert cfg.train.resume is True
    assert cfg.optim.adam_betas == [0.9, 0.99]
    assert cfg.optim.name == "dmuon" and cfg.model.init_std == pytest.approx(0.01)


@pytest.mark.parametrize("override, where", [
    (["--train.steps", "abc"], "train.steps"),
    (["--train.steps", "2.5"], "train.steps"),
    (["--train.resume", "maybe"], "train.resume"),
    (["--optim.lr", "0.1"], "optim.lr"),
])
def test_bad_override_type_is_an_error_naming_the_key(override, where):
    with pytest.raises(ValueError, match=where.replace(".", r"\.")):
        load_run_config(None, override)


def test_override_without_value_is_an_error():
    with pytest.raises(ValueError, match="needs a value"):
        load_run_config(None, ["--train.steps"])


def _launch_train():
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_takes_config_anywhere_and_passes_the_rest_as_overrides():
    split = _launch_train().split_config_arg
    assert split(["--config", "a.yaml", "--train.steps", "5"]) == ("a.yaml", ["--train.steps", "5"])
    assert split(["--train.steps=5", "--config=b.yaml"]) == ("b.yaml", ["--train.steps=5"])
    assert split(["--optim.name", "dmuon"]) == (None, ["--optim.name", "dmuon"])
    with pytest.raises(SystemExit):
        split(["--config"])


def test_cli_reports_config_errors_as_one_line_and_exit_status_2(tmp_path, capsys):
    for argv, key in ((["--train.stepz", "3"], "stepz"), (["--config", str(tmp_path / "missing.yaml")], "not found")):
        with pytest.raises(SystemExit) as e:
            _launch_train().main(argv)
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("config error: ") and key in lines[0], lines


def test_a_checkpoint_config_written_before_a_key_existed_resumes_with_that_keys_default():
    from lanton_dist.config import ConfigError, RunConfig, check_resume, to_dict

    current = to_dict(RunConfig())
    saved = to_dict(RunConfig())
    del saved["optim"]["clip_grad_norm"]  # a checkpoint from before gradient clipping existed
    assert check_resume(saved, current, "old") == []
    current["optim"]["clip_grad_norm"] = 1.0  # ...but it ran without clipping: turning it on is a change
    with pytest.raises(ConfigError, match="optim: checkpoint"):
        check_resume(saved, current, "old")


def test_an_optional_key_is_unset_by_null_on_the_command_line():
    """``--optim.lr.head null`` (or ``none``, ``~``) unsets a key the YAML sets, as YAML's null would."""
    from lanton_dist.config import load_run_config

    assert load_run_config(ROOT / "configs" / "llama-tiny-cpu.yaml").optim.lr.head == 1.0
    for spelling in ("null", "none", "~"):
        assert load_run_config(ROOT / "configs" / "llama-tiny-cpu.yaml", ["--optim.lr.head", spelling]).optim.lr.head is None
    assert load_run_config(None, ["--optim.lr.head", "0.5"]).optim.lr.head == 0.5
