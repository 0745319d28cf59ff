"""Checkpoint directories: a save is atomic (a save cut short is never resumed from), resume
picks the newest complete checkpoint and says why it skipped the others, retention keeps the
newest ``train.keep_checkpoints``, and nothing in a checkpoint directory is un-pickled."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from lanton_dist import checkpoint_dir as cd
from lanton_dist.config import ConfigError, load_run_config
from lanton_dist.trainer import read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "llama-tiny-cpu.yaml"
SMALL = [
    "--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
    "--model.ffn_dim", "64", "--data.seq_len", "32", "--train.global_batch", "4", "--train.eval_every", "0",
    "--train.log_every", "2", "--train.steps", "8", "--train.checkpoint_every", "2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out: Path, *extra: str):
    return load_run_config(DEMO, [*SMALL, "--train.out_dir", str(out), *extra])


def _no_barrier() -> None:
    pass


def _save(root: Path, step: int, write=lambda d: (d / "payload").write_text("x"), keep: int = 3) -> Path:
    return cd.save(root, step, write, {"step": step}, rank=0, world=1, barrier=_no_barrier, keep_last=keep)


def _strip_manifest(ckpt: Path) -> None:
    """Make ``ckpt`` look written by a version before manifests (marker without one)."""
    marker = json.loads((ckpt / cd.MARKER).read_text())
    marker.pop("manifest", None)
    (ckpt / cd.MARKER).write_text(json.dumps(marker))


class PlantedPickle:
    """Un-pickling this creates ``marker``: what a malicious file in a checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _planted(marker: Path) -> bytes:
    payload = pickle.dumps(PlantedPickle(marker))
    pickle.loads(payload)  # the payload really runs code when un-pickled …
    assert marker.exists()
    marker.unlink()  # … so its marker proves whether anything un-pickled it
    return payload


# ----------------------------------------------------------------------------- the directory protocol
def test_a_save_that_fails_midway_leaves_no_checkpoint_and_the_previous_one_is_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)

    def cut_short(d: Path) -> None:
        (d / "payload").write_text("half")
        raise KeyboardInterrupt("SIGKILL while writing")

    with pytest.raises(KeyboardInterrupt):
        _save(root, 4, cut_short)
    assert not cd.step_dir(root, 4).exists() and cd.tmp_dir(root, 4).is_dir()
    said: list[str] = []
    assert cd.latest_complete(root, said.append) == cd.step_dir(root, 2)
    assert any(".tmp-step_00000004" in m and "did not finish" in m for m in said), said
    _save(root, 4)  # the retry replaces the partial save
    assert cd.latest_complete(root, said.append) == cd.step_dir(root, 4)
    assert (cd.step_dir(root, 4) / "payload").read_text() == "x" and not cd.tmp_dir(root, 4).exists()


def test_a_step_directory_without_its_marker_is_skipped_with_a_message(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    (cd.step_dir(root, 6)).mkdir()  # e.g. a DCP directory cut short before its .metadata
    (cd.step_dir(root, 6) / "__0_0.distcp").write_bytes(b"\0" * 16)
    (root / "step_00000008.pt").write_bytes(b"old format")
    said: list[str] = []
    assert cd.latest_complete(root, said.append) == cd.step_dir(root, 2)
    assert any("step_00000006: no COMMITTED marker" in m for m in said), said
    assert any("step_00000008.pt: not a directory" in m for m in said), said
    assert said[-1].endswith("step_00000002 is the newest complete checkpoint (step 2)")


@pytest.mark.parametrize("legacy", ["step_00000004.pt", "latest"])
def test_a_directory_with_only_earlier_format_checkpoints_is_not_silently_restarted(tmp_path, legacy):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / legacy).write_bytes(b"x")
    with pytest.raises(ConfigError, match=rf"earlier format \({legacy}\)"):
        cd.latest_complete(root, lambda m: None)
    _save(root, 6)  # once a complete checkpoint exists, it is resumed from
    assert cd.latest_complete(root, lambda m: None) == cd.step_dir(root, 6)


def test_retention_keeps_the_newest_complete_checkpoints_and_drops_unfinished_saves(tmp_path):
    root = tmp_path / "checkpoints"
    cd.tmp_dir(root, 3).mkdir(parents=True)
    for step in (1, 2, 4, 5):
        _save(root, step, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    _save(root, 2, lambda d: (d / "payload").write_text("again"))
    assert (cd.step_dir(root, 2) / "payload").read_text() == "again"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


def test_loop_state_is_json_with_the_config(tmp_path):
    s = train(_cfg(tmp_path, "--train.steps", "2"), log=lambda m: None)
    loop = json.loads((Path(s["checkpoint"]) / "loop.json").read_text())
    assert loop["step"] == 2 and loop["backend"] == "none" and loop["world"] == 1
    assert loop["config"]["train"]["steps"] == 2 and loop["scheduler"]["last_epoch"] == 2


# ----------------------------------------------------------------------------- the training loop
def test_resume_skips_a_truncated_newest_checkpoint_with_a_message_and_continues_exactly(tmp_path):
    full = train(_cfg(tmp_path / "full"), log=lambda m: None)
    run = tmp_path / "cut"
    train(_cfg(run, "--train.stop_after", "4"), log=lambda m: None)
    root = run / "checkpoints"
    # the job was killed while saving step 6 (a partial temporary directory), and a step_8
    # directory without marker is lying around (what a save cut short looked like before)
    cd.tmp_dir(root, 6).mkdir()
    (cd.tmp_dir(root, 6) / "state.pt").write_bytes(b"truncated")
    cd.step_dir(root, 8).mkdir()
    said: list[str] = []
    resumed = train(_cfg(run, "--train.resume", "true"), log=said.append)
    assert resumed["resumed_from"] == str(cd.step_dir(root, 4))
    assert any("skipping" in m and ".tmp-step_00000006" in m for m in said), said
    assert any("skipping" in m and "step_00000008: no COMMITTED marker" in m for m in said), said
    assert any("step_00000004 is the newest complete checkpoint" in m for m in said), said
    assert [r["loss"] for r in read_metrics(resumed["metrics"])] == [r["loss"] for r in read_metrics(full["metrics"])]
    assert not cd.tmp_dir(root, 6).exists()  # cleaned up by the next save
    assert cd.is_complete(cd.step_dir(root, 8))  # step 8 was saved again, completely


def test_a_planted_pickle_in_a_checkpoint_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = _planted(marker)
    run = tmp_path / "run"
    train(_cfg(run, "--train.stop_after", "2"), log=lambda m: None)
    ckpt = cd.step_dir(run / "checkpoints", 2)
    (ckpt / "loop.pkl").write_bytes(payload)  # files our earlier versions read: ignored
    (ckpt / "meta.pkl").write_bytes(payload)
    s = train(_cfg(run, "--train.resume", "true", "--train.steps", "4"), log=lambda m: None)
    assert s["resumed_from"] == str(ckpt) and not marker.exists()

    for name in ("state.pt", "rng/rank0.pt"):  # files we do read: torch.load(weights_only=True) refuses code
        ckpt = cd.step_dir(run / "checkpoints", 4)
        _strip_manifest(ckpt)  # else the manifest would reject the changed file before anything reads it
        original = (ckpt / name).read_bytes()
        torch.save(PlantedPickle(marker), ckpt / name)
        with pytest.raises(pickle.UnpicklingError):
            train(_cfg(run, "--train.resume", "true", "--train.steps", "6"), log=lambda m: None)
        assert not marker.exists(), name
        (ckpt / name).write_bytes(original)
