"""``lanton-dist export-hf`` (transformers' LlamaForCausalLM loads the export and gives our
logits) and ``lanton-dist eval`` (loss, perplexity and tokens of a checkpoint on other data)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lanton_dist.cli import main
from lanton_dist.config import load_run_config
from lanton_dist.evaluate import windows
from lanton_dist.export_hf import interleaved_to_half_rows
from lanton_dist.model import Transformer, apply_rope, rope_tables
from lanton_dist.trainer import train
from test_train import DEMO, quiet

pytestmark = pytest.mark.usefixtures("one_thread")

GQA = ["--model.vocab_size", "256", "--model.dim", "48", "--model.n_layers", "2", "--model.n_heads", "6",
       "--model.n_kv_heads", "2", "--model.ffn_dim", "80", "--model.max_seq_len", "32", "--model.rope_theta", "500.0",
       "--model.norm_eps", "1e-6", "--data.seq_len", "32", "--train.global_batch", "4", "--train.eval_batches", "1",
       "--train.log_every", "1", "--train.eval_every", "0", "--data.source", "synthetic"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 3-step single-process run of a GQA model (6 heads / 2 kv heads, rope_theta 500, eps 1e-6)."""
    out = tmp_path_factory.mktemp("run")
    train(load_run_config(DEMO, [*GQA, "--train.steps", "3", "--train.out_dir", str(out)]), log=quiet)
    return out


def _our_model(run_dir: Path) -> Transformer:
    cfg = load_run_config(DEMO, GQA)
    model = Transformer(cfg.model)
    state = torch.load(next((run_dir / "checkpoints").glob("step_*")) / "state.pt", weights_only=True)["model"]
    model.load_state_dict(state)
    return model.eval()


def test_rotate_half_on_permuted_rows_equals_interleaved_rope_on_the_original_rows():
    heads, hd, d, t = 3, 8, 16, 5
    w = torch.randn(heads * hd, d, dtype=torch.float64)
    x = torch.randn(t, d, dtype=torch.float64)
    cos, sin = rope_tables(hd, t, 10000.0)
    ours = apply_rope((x @ w.T).view(t, heads, hd).transpose(0, 1), cos.double(), sin.double())
    q = (x @ interleaved_to_half_rows(w, heads).T).view(t, heads, hd).transpose(0, 1)
    c, s = torch.cat([cos, cos], -1).double(), torch.cat([sin, sin], -1).double()
    half = torch.cat([-q[..., hd // 2:], q[..., : hd // 2]], -1)
    hf = q * c + half * s
    # the same vectors up to the per-head row permutation
    perm = interleaved_to_half_rows(torch.arange(heads * hd).view(-1, 1), heads).view(heads, hd) % hd
    torch.testing.assert_close(hf, torch.gather(ours, -1, perm[:, None, :].expand_as(ours)), rtol=0, atol=1e-5)  # apply_rope runs in fp32


def test_transformers_llama_loads_the_export_and_gives_our_logits(run_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    assert main(["export-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    assert "exported" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is False
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert hf.config.rms_norm_eps == 1e-6 and hf.config.num_key_value_heads == 2
    ours = _our_model(run_dir)
    x = torch.randint(256, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(x)
        got = hf(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (expected - ours(x.flip(1)).detach()).abs().max() > 1e-3  # the comparison is not vacuous


def test_export_refuses_a_directory_without_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export-hf", str(tmp_path), str(tmp_path / "hf")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no complete checkpoint" in err[0]


def test_eval_on_another_text_file_reports_loss_perplexity_and_tokens(run_dir, tmp_path, capsys):
    text = tmp_path / "other.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(60)))
    out = tmp_path / "eval.json"
    assert main(["eval", str(DEMO), "--checkpoint", str(run_dir), "--data.source", "text", "--data.path", str(text),
                 "--data.sample_by", "line", "--data.val_fraction", "0.2", "--data.seq_len", "32",
                 "--batch-size", "3", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("note: the model is the checkpoint's; the config's model.dim, model.n_layers")  # DEMO's 128, 4
    lines = lines[1:]
    assert lines[0].startswith("eval ") and "loss" in lines[0] and "perplexity" in lines[0] and "tokens" in lines[0]
    result = json.loads(out.read_text())
    # the reference: the checkpoint's model on every window of the validation split
    from lanton_dist.data import build_dataset

    cfg = load_run_config(DEMO, ["--data.source", "text", "--data.path", str(text), "--data.sample_by", "line",
                                 "--data.val_fraction", "0.2", "--data.seq_len", "32"])
    val = build_dataset(cfg.data, 256).val
    win = windows(val, 32).long()
    with torch.no_grad():
        logits = _our_model(run_dir)(win[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), win[:, 1:].flatten()).item()
    assert result["tokens"] == win.shape[0] * 32 == (val.numel() - 1) // 32 * 32
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["step"] == 3 and result["split"] == "val"


def test_eval_with_a_bad_override_is_one_config_error_line(run_dir, capsys):
    assert main(["eval", str(DEMO), "--checkpoint", str(run_dir), "--data.seq_len", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: data.seq_len 64 exceeds model.max_seq_len 32")


@pytest.mark.parametrize("backend", ["zero", "fsdp2"])
def test_a_sharded_dcp_checkpoint_exports_the_same_weights_as_the_model_it_trained(backend, tmp_path, monkeypatch):
    """``zero`` and ``fsdp2`` write DCP directories (``model/<name>`` entries); the export reads
    them in one process without a process group (here a world-1 run of each backend)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    train(load_run_config(DEMO, [*GQA, "--train.steps", "2", "--parallel.backend", backend, "--train.out_dir", str(out)]),
          log=quiet)
    from lanton_dist.checkpoint_weights import read_checkpoint_model

    ckpt = read_checkpoint_model(out)
    assert ckpt.backend == backend and ckpt.step == 2
    assert main(["export-hf", str(out / "checkpoints"), str(tmp_path / "hf")]) == 0
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert len(tensors) == 3 + 9 * 2
    torch.testing.assert_close(tensors["model.layers.1.mlp.down_proj.weight"], ckpt.state_dict["layers.1.feed_forward.w_down.weight"])
    # the same 2 steps in one process (backend none, state.pt) reach the same weights
    monkeypatch.delenv("WORLD_SIZE")
    single = tmp_path / "single"
    train(load_run_config(DEMO, [*GQA, "--train.steps", "2", "--train.out_dir", str(single)]), log=quiet)
    expected = read_checkpoint_model(single).state_dict
    assert set(expected) == set(ckpt.state_dict)
    for name, w in expected.items():
        torch.testing.assert_close(ckpt.state_dict[name], w, rtol=1e-4, atol=1e-5, msg=name)
    start = Transformer(load_run_config(DEMO, GQA).model)  # the step-0 weights: training moved them
    assert not torch.allclose(expected["layers.1.feed_forward.w_down.weight"], start.layers[1].feed_forward.w_down.weight)


def test_export_refuses_an_unknown_dtype_in_one_line(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export-hf", str(run_dir), str(tmp_path / "hf"), "--dtype", "float8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dtype must be one of ('float32', 'bfloat16', 'float16')" in err[0]
    assert not (tmp_path / "hf").exists()
