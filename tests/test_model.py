"""The LLaMA-style model: shapes, causality, GQA, RoPE, init and parameter classification."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lanton_dist import Geometry, classify_parameters
from lanton_dist.config import ModelConfig
from lanton_dist.model import Transformer, apply_rope, rope_tables

TINY = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)


def tokens(b: int = 2, t: int = 12, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_logits_have_shape_batch_by_seq_by_vocab():
    model = Transformer(TINY)
    out = model(tokens(3, 10))
    assert out.shape == (3, 10, TINY.vocab_size)
    assert out.dtype == torch.float32


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = Transformer(TINY, seed=1)
    x = tokens(2, 12)
    y = x.clone()
    j = 7
    y[:, j] = (y[:, j] + 1) % TINY.vocab_size
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j:] - b[:, j:]).abs().max() > 1e-4  # later positions do see the change


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    gqa = Transformer(TINY, seed=2)
    mha_cfg = dataclasses.replace(TINY, n_kv_heads=TINY.n_heads)
    mha = Transformer(mha_cfg, seed=3)
    hd = TINY.dim // TINY.n_heads
    rep = TINY.n_heads // TINY.n_kv_heads
    src = gqa.state_dict()
    dst = {}
    for name, w in src.items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            w = w.view(TINY.n_kv_heads, hd, TINY.dim).repeat_interleave(rep, dim=0).reshape(TINY.n_heads * hd, TINY.dim)
        dst[name] = w
    mha.load_state_dict(dst)
    x = tokens(2, 9)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)
    assert gqa.layers[0].attention.wk.weight.shape == (TINY.n_kv_heads * hd, TINY.dim)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_every_kv_head_count_dividing_the_heads_runs(n_kv_heads):
    model = Transformer(dataclasses.replace(TINY, n_kv_heads=n_kv_heads))
    assert torch.isfinite(model(tokens())).all()


def test_rope_scores_depend_only_on_relative_position():
    hd, t = 8, 16
    cos, sin = rope_tables(hd, t, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    qs = apply_rope(q.expand(1, 1, t, hd).contiguous(), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, t, hd).contiguous(), cos, sin)[0, 0]
    torch.testing.assert_close(qs[5] @ ks[2], qs[12] @ ks[9], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(qs[5] @ ks[2], qs[5] @ ks[4], atol=1e-3)


def test_init_is_a_function_of_the_seed_alone():
    torch.manual_seed(123)
    a = Transformer(TINY, seed=5).state_dict()
    torch.manual_seed(456)
    b = Transformer(TINY, seed=5).state_dict()
    c = Transformer(TINY, seed=6).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert abs(a["tok_embeddings.weight"].std().item() - TINY.init_std) < 0.1 * TINY.init_std


def test_every_parameter_classifies_into_its_geometry_group():
    model = Transformer(TINY)
    specs = classify_parameters(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(specs) == sorted(names)
    hidden_suffixes = ("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w_gate.weight", "w_up.weight", "w_down.weight")
    for name, spec in specs.items():
        if name == "tok_embeddings.weight":
            assert (spec.geometry, spec.role) == (Geometry.EMBED_HEAD, "embed")
        elif name == "lm_head.weight":
            assert (spec.geometry, spec.role) == (Geometry.EMBED_HEAD, "head")
        elif name.endswith("norm.weight"):
            assert spec.geometry is Geometry.VECTOR, name
        else:
            assert name.endswith(hidden_suffixes), name
            assert spec.geometry is Geometry.HIDDEN, name
    assert sum(s.geometry is Geometry.HIDDEN for s in specs.values()) == 7 * TINY.n_layers
    assert sum(s.geometry is Geometry.VECTOR for s in specs.values()) == 2 * TINY.n_layers + 1


def test_num_params_counts_every_weight():
    c = TINY
    hd = c.dim // c.n_heads
    per_layer = c.dim * c.dim * 2 + 2 * c.dim * c.n_kv_heads * hd + 3 * c.dim * c.ffn_dim + 2 * c.dim
    expected = 2 * c.vocab_size * c.dim + c.n_layers * per_layer + c.dim
    model = Transformer(c)
    assert model.num_params() == expected
    assert model.num_params(exclude_embedding=True) == expected - c.vocab_size * c.dim


@pytest.mark.parametrize("change, message", [
    (dict(dim=30), "not divisible by model.n_heads"),
    (dict(n_kv_heads=3), "not divisible by model.n_kv_heads"),
    (dict(dim=12, n_heads=4), "must be even"),
    (dict(n_layers=0), "model.n_layers"),
])
def test_inconsistent_model_config_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        Transformer(dataclasses.replace(TINY, **change))


def test_sequence_longer_than_max_seq_len_is_an_error():
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(TINY)(tokens(1, TINY.max_seq_len + 1))


# ---------------------------------------------------------------- activation checkpointing and compile
def _loss_and_grads(model: Transformer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_bytes(model: Transformer, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one loss."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    return sum(seen.values())


def test_activation_checkpointing_gives_the_same_loss_and_gradients_in_fp64():
    cfg = dataclasses.replace(TINY, n_layers=3)
    plain = Transformer(cfg, seed=4).double()
    recomputed = Transformer(cfg, seed=4, activation_checkpointing=True).double()
    x = tokens(3, 13)
    loss_a, grads_a = _loss_and_grads(plain, x)
    loss_b, grads_b = _loss_and_grads(recomputed, x)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-13, atol=0)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-12, atol=1e-15, msg=name)


def test_activation_checkpointing_keeps_fewer_activations_for_backward():
    cfg = dataclasses.replace(TINY, n_layers=4, max_seq_len=64)
    x = tokens(4, 65)
    plain = _saved_bytes(Transformer(cfg, seed=5), x)
    recomputed = _saved_bytes(Transformer(cfg, seed=5, activation_checkpointing=True), x)
    assert recomputed < 0.5 * plain, (recomputed, plain)


def test_activation_checkpointing_is_off_without_grad():
    model = Transformer(TINY, seed=6, activation_checkpointing=True)
    x = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), Transformer(TINY, seed=6)(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compiled_blocks_give_the_same_loss_and_gradients_and_keep_parameter_names(backend):
    torch._dynamo.reset()
    plain = Transformer(TINY, seed=7)
    compiled = Transformer(TINY, seed=7, activation_checkpointing=True)
    compiled.compile_blocks(backend)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    x = tokens(2, 13)
    loss_a, grads_a = _loss_and_grads(plain, x)
    loss_b, grads_b = _loss_and_grads(compiled, x)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-6, msg=name)
