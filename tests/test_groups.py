"""Specification of geometry classification and logical blocks (``lanton_dist.groups``).

Every trainable tensor lands in exactly one group (spec table 1): token embedding and LM
head → ``embed_head`` (roles ``embed``/``head``), 1-D gains and biases → ``vector``, other
2-D weights → ``hidden``; overrides (fnmatch) win; anything else must be declared. Fused
weights carry blocks (row sets) that tile their rows exactly. Blocks, d_in and the rate-factor
multiplier (``block_scale``) refer to the logical (d_out, d_in) matrix: Hugging Face ``Conv1D``
weights, or any parameter declared ``in_out``, are stored transposed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lanton_dist.groups import (
    Block,
    block_scale,
    Geometry,
    ParamSpec,
    classify_parameters,
    qkv_blocks,
    stacked_blocks,
)


class Attn(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=True)


class Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attn(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim, bias=False), nn.Linear(2 * dim, dim, bias=False))


class Toy(nn.Module):
    """tok_emb / pos_emb (Embedding), two blocks, final RMSNorm, untied lm_head."""

    def __init__(self, vocab: int = 11, dim: int = 4) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(8, dim)
        self.layers = nn.ModuleList([Layer(dim) for _ in range(2)])
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)


EXPECTED = {
    "tok_emb.weight": (Geometry.EMBED_HEAD, "embed"),
    "pos_emb.weight": (Geometry.EMBED_HEAD, "embed"),
    "lm_head.weight": (Geometry.EMBED_HEAD, "head"),
    "norm.weight": (Geometry.VECTOR, ""),
    **{f"layers.{i}.norm.{w}": (Geometry.VECTOR, "") for i in range(2) for w in ("weight", "bias")},
    **{f"layers.{i}.attn.proj.bias": (Geometry.VECTOR, "") for i in range(2)},
    **{f"layers.{i}.attn.{m}.weight": (Geometry.HIDDEN, "") for i in range(2) for m in ("qkv", "proj")},
    **{f"layers.{i}.mlp.{j}.weight": (Geometry.HIDDEN, "") for i in range(2) for j in (0, 1)},
}


# --------------------------------------------------------------------------- classifier
def test_classifier_puts_embedding_head_vector_and_hidden_in_their_groups():
    specs = classify_parameters(Toy())
    assert {n: (s.geometry, s.role) for n, s in specs.items()} == EXPECTED


def test_classifier_covers_every_trainable_parameter_exactly_once_with_its_shape():
    model = Toy()
    specs = classify_parameters(model)
    assert list(specs) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert specs[n].shape == tuple(p.shape) and specs[n].name == n


@pytest.mark.parametrize("head_name", ["lm_head", "output", "output_layer", "head"])
def test_classifier_recognises_all_head_module_names(head_name):
    model = nn.Module()
    model.body = nn.Linear(4, 4, bias=False)
    setattr(model, head_name, nn.Linear(4, 9, bias=False))
    specs = classify_parameters(model)
    assert (specs[f"{head_name}.weight"].geometry, specs[f"{head_name}.weight"].role) == (Geometry.EMBED_HEAD, "head")
    assert specs["body.weight"].geometry is Geometry.HIDDEN


def test_head_name_must_be_the_whole_module_name_not_a_suffix():
    model = nn.Module()
    model.multihead = nn.Linear(4, 4, bias=False)  # ends in "head" but is not a head
    model.head_proj = nn.Linear(4, 4, bias=False)
    specs = classify_parameters(model)
    assert specs["multihead.weight"].geometry is Geometry.HIDDEN
    assert specs["head_proj.weight"].geometry is Geometry.HIDDEN


def test_head_bias_is_a_vector():
    model = nn.Module()
    model.lm_head = nn.Linear(4, 9, bias=True)
    specs = classify_parameters(model)
    assert specs["lm_head.bias"].geometry is Geometry.VECTOR


def test_tied_embedding_and_head_appear_once_as_embedding():
    model = Toy()
    model.lm_head.weight = model.tok_emb.weight
    specs = classify_parameters(model)
    assert "lm_head.weight" not in specs
    assert (specs["tok_emb.weight"].geometry, specs["tok_emb.weight"].role) == (Geometry.EMBED_HEAD, "embed")


def test_frozen_parameters_are_not_classified():
    model = Toy()
    model.pos_emb.weight.requires_grad_(False)
    assert "pos_emb.weight" not in classify_parameters(model)


def test_overrides_take_precedence_and_first_matching_pattern_wins():
    specs = classify_parameters(
        Toy(),
        overrides={"layers.0.mlp.*": "vector", "layers.*.mlp.*": "embed_head", "tok_emb.weight": "hidden"},
    )
    assert specs["layers.0.mlp.0.weight"].geometry is Geometry.VECTOR  # first pattern
    assert (specs["layers.1.mlp.0.weight"].geometry, specs["layers.1.mlp.0.weight"].role) == (Geometry.EMBED_HEAD, "embed")
    assert (specs["tok_emb.weight"].geometry, specs["tok_emb.weight"].role) == (Geometry.HIDDEN, "")  # beats nn.Embedding
    # an unmatched parameter keeps the default rule
    assert specs["layers.1.attn.qkv.weight"].geometry is Geometry.HIDDEN


def test_override_to_embed_head_gives_head_role_to_head_modules():
    model = nn.Module()
    model.output = nn.Linear(4, 9, bias=False)
    model.proj = nn.Linear(4, 4, bias=False)
    specs = classify_parameters(model, overrides={"*": "embed_head"})
    assert specs["output.weight"].role == "head"
    assert specs["proj.weight"].role == "embed"


def test_override_with_unknown_geometry_raises_clear_error():
    with pytest.raises(ValueError, match="unknown geometry 'matrix'"):
        classify_parameters(Toy(), overrides={"lm_head.*": "matrix"})


def test_overriding_a_vector_to_hidden_raises_because_hidden_must_be_2d():
    with pytest.raises(ValueError, match="hidden parameters must be 2-D"):
        classify_parameters(Toy(), overrides={"norm.weight": "hidden"})


class WithExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)
        self.experts = nn.Parameter(torch.zeros(3, 4, 4))


def test_3d_parameter_without_declared_group_raises_clear_value_error():
    with pytest.raises(ValueError) as err:
        classify_parameters(WithExperts())
    msg = str(err.value)
    assert "'experts'" in msg and "(3, 4, 4)" in msg and "overrides" in msg


def test_3d_parameter_with_an_override_is_accepted():
    specs = classify_parameters(WithExperts(), overrides={"experts": "vector"})
    assert specs["experts"].geometry is Geometry.VECTOR
    assert specs["experts"].shape == (3, 4, 4)


def test_0d_parameter_without_declared_group_raises():
    model = nn.Module()
    model.scale = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ValueError, match="cannot infer its geometry"):
        classify_parameters(model)


def test_fused_blocks_attach_to_hidden_parameters():
    blocks = qkv_blocks("layers.0.attn.qkv.weight", 2, 2, 2, interleaved=False)
    specs = classify_parameters(Toy(), fused={"layers.0.attn.qkv.weight": blocks})
    assert specs["layers.0.attn.qkv.weight"].blocks == blocks
    assert len(specs["layers.1.attn.qkv.weight"].blocks) == 1


def test_fused_blocks_on_a_non_hidden_parameter_raise():
    with pytest.raises(ValueError, match="only hidden parameters can be fused"):
        classify_parameters(Toy(), fused={"lm_head.weight": stacked_blocks("lm_head.weight", [5, 6])})


def test_fused_blocks_for_an_unknown_parameter_raise():
    with pytest.raises(ValueError, match="unknown parameters"):
        classify_parameters(Toy(), fused={"nope.weight": stacked_blocks("nope.weight", [2, 2])})


# --------------------------------------------------------------------------- blocks
def _row_list(block: Block) -> list[int]:
    return [r for a, b in block.rows for r in range(a, b)]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads,kv,hd", [(4, 4, 2), (4, 2, 3), (8, 1, 2), (6, 3, 1)])
def test_qkv_blocks_tile_the_rows_exactly(interleaved, heads, kv, hd):
    blocks = qkv_blocks("w", heads, kv, hd, interleaved)
    assert [b.name for b in blocks] == ["w:q", "w:k", "w:v"]
    rows = sorted(r for b in blocks for r in _row_list(b))
    total = (heads + 2 * kv) * hd
    assert rows == list(range(total))
    assert [b.d_out for b in blocks] == [heads * hd, kv * hd, kv * hd]
    ParamSpec("w", Geometry.HIDDEN, (total, 5), blocks=blocks)  # validates


def test_qkv_blocks_non_interleaved_layout_is_q_then_k_then_v():
    q, k, v = qkv_blocks("w", 4, 2, 3, interleaved=False)
    assert q.rows == ((0, 12),) and k.rows == ((12, 18),) and v.rows == ((18, 24),)


def test_qkv_blocks_interleaved_layout_groups_rows_per_kv_head():
    # Megatron linear_qkv: per KV group g, [q_g (heads/kv·hd); k_g (hd); v_g (hd)].
    q, k, v = qkv_blocks("w", 4, 2, 2, interleaved=True)  # group = 2·2 + 2 + 2 = 8 rows
    assert q.rows == ((0, 4), (8, 12))
    assert k.rows == ((4, 6), (12, 14))
    assert v.rows == ((6, 8), (14, 16))


def test_qkv_blocks_reject_heads_not_divisible_by_kv_heads():
    with pytest.raises(ValueError, match="not divisible"):
        qkv_blocks("w", 6, 4, 2, interleaved=True)


def test_stacked_blocks_are_consecutive_with_labels():
    gate, up = stacked_blocks("mlp.w", [3, 5], ["gate", "up"])
    assert (gate.name, gate.rows, up.name, up.rows) == ("mlp.w:gate", ((0, 3),), "mlp.w:up", ((3, 8),))
    assert [b.name for b in stacked_blocks("x", [1, 1, 1])] == ["x:0", "x:1", "x:2"]
    with pytest.raises(ValueError):
        stacked_blocks("x", [1, 2], ["only_one"])


def test_block_gather_and_scatter_round_trip_non_contiguous_rows():
    blk = Block("b", ((1, 3), (5, 6)))
    t = torch.arange(28.0).reshape(7, 4)
    g = blk.gather(t)
    assert torch.equal(g, torch.cat([t[1:3], t[5:6]]))
    out = torch.zeros(7, 4)
    blk.scatter_(out, g)
    mask = torch.zeros(7, dtype=torch.bool)
    mask[[1, 2, 5]] = True
    assert torch.equal(out[mask], t[mask]) and torch.equal(out[~mask], torch.zeros(4, 4))


def test_block_gather_of_contiguous_rows_is_a_view():
    t = torch.zeros(6, 3)
    Block("b", ((2, 5),)).gather(t).fill_(1.0)
    assert t[2:5].eq(1).all() and t[:2].eq(0).all() and t[5:].eq(0).all()


# --------------------------------------------------------------------------- ParamSpec
def test_paramspec_defaults_to_one_block_covering_all_rows():
    spec = ParamSpec("w", Geometry.HIDDEN, (6, 4))
    assert spec.blocks == (Block("w", ((0, 6),)),)
    assert (spec.numel, spec.d_in) == (24, 4)
    vec = ParamSpec("g", Geometry.VECTOR, (5,))
    assert vec.blocks == (Block("g", ((0, 5),)),) and vec.d_in == 1 and vec.numel == 5


def test_paramspec_rejects_non_2d_hidden():
    with pytest.raises(ValueError, match="hidden parameters must be 2-D"):
        ParamSpec("w", Geometry.HIDDEN, (2, 3, 4))
    with pytest.raises(ValueError, match="hidden parameters must be 2-D"):
        ParamSpec("w", Geometry.HIDDEN, (6,))


@pytest.mark.parametrize(
    "rows,match",
    [
        ([((0, 3),), ((2, 6),)], "tile rows"),  # overlap
        ([((0, 2),), ((3, 6),)], "tile rows"),  # gap
        ([((0, 3),), ((3, 5),)], "cover 5 of 6"),  # short
        ([((0, 3),), ((3, 7),)], "cover 7 of 6"),  # past the end
        ([((1, 6),)], "tile rows"),  # does not start at 0
        ([((0, 3),), ((3, 3),), ((3, 6),)], "tile rows"),  # empty range
    ],
)
def test_paramspec_rejects_blocks_that_do_not_tile_the_rows(rows, match):
    blocks = tuple(Block(f"b{i}", r) for i, r in enumerate(rows))
    with pytest.raises(ValueError, match=match):
        ParamSpec("w", Geometry.HIDDEN, (6, 4), blocks=blocks)


def test_paramspec_is_frozen():
    spec = ParamSpec("w", Geometry.HIDDEN, (2, 2))
    with pytest.raises(AttributeError):
        spec.name = "v"  # type: ignore[misc]


# --------------------------------------------------------------------------- storage orientation
def _conv1d():
    return pytest.importorskip("transformers").pytorch_utils.Conv1D


def test_transposed_paramspec_reads_d_in_and_blocks_from_the_logical_matrix():
    spec = ParamSpec("w", Geometry.HIDDEN, (4, 6), blocks=stacked_blocks("w", [2, 4]), transposed=True)
    assert (spec.logical_shape, spec.d_in, spec.numel) == ((6, 4), 4, 24)
    t = torch.arange(24.0).view(4, 6)
    assert torch.equal(spec.logical(t), t.T)
    spec.blocks[1].gather(spec.logical(t)).fill_(-1.0)  # logical rows 2..6 are storage columns 2..6
    assert t[:, 2:].eq(-1).all() and t[:, :2].ge(0).all()
    assert ParamSpec("w", Geometry.HIDDEN, (4, 6), transposed=True).blocks == (Block("w", ((0, 6),)),)


def test_transposed_paramspec_blocks_must_tile_the_logical_rows():
    with pytest.raises(ValueError, match="cover 4 of 6 rows of the logical matrix"):
        ParamSpec("w", Geometry.HIDDEN, (4, 6), blocks=stacked_blocks("w", [2, 2]), transposed=True)


def test_only_2d_parameters_can_be_stored_transposed():
    with pytest.raises(ValueError, match="only 2-D parameters can be stored transposed"):
        ParamSpec("g", Geometry.VECTOR, (5,), transposed=True)


def _gpt_like(conv1d=None):
    """Conv1D(nf, nx) stores (nx, nf): c_attn self-attention (4 → 12), cross-attention (4 → 8),
    an odd-width c_attn (4 → 20), c_fc, and a plain Linear."""
    conv1d = conv1d or _conv1d()
    m = nn.Module()
    m.attn = nn.Module()
    m.attn.c_attn = conv1d(12, 4)
    m.cross = nn.Module()
    m.cross.c_attn = conv1d(8, 4)
    m.odd = nn.Module()
    m.odd.c_attn = conv1d(20, 4)
    m.c_fc = conv1d(16, 4)
    m.proj = nn.Linear(16, 4, bias=False)
    return m


def test_conv1d_weights_are_stored_in_out_and_c_attn_splits_into_its_projections():
    specs = classify_parameters(_gpt_like())
    fc = specs["c_fc.weight"]
    assert fc.transposed and fc.shape == (4, 16) and fc.logical_shape == (16, 4) and fc.d_in == 4
    assert [(b.name, b.rows) for b in specs["attn.c_attn.weight"].blocks] == [
        ("attn.c_attn.weight:q", ((0, 4),)), ("attn.c_attn.weight:k", ((4, 8),)), ("attn.c_attn.weight:v", ((8, 12),))]
    assert [b.name for b in specs["cross.c_attn.weight"].blocks] == ["cross.c_attn.weight:k", "cross.c_attn.weight:v"]
    assert len(specs["odd.c_attn.weight"].blocks) == 1  # no known layout: one logical matrix
    assert specs["c_fc.bias"].geometry is Geometry.VECTOR and not specs["c_fc.bias"].transposed
    assert not specs["proj.weight"].transposed


def test_a_subclass_of_conv1d_is_recognised():
    class MyConv1D(_conv1d()):
        pass

    assert classify_parameters(_gpt_like(MyConv1D))["c_fc.weight"].transposed


def test_declared_orientation_wins_over_detection_first_match_first():
    specs = classify_parameters(_gpt_like(), orientation={"attn.*": "out_in", "*": "in_out", "c_fc.weight": "out_in"})
    assert not specs["attn.c_attn.weight"].transposed and len(specs["attn.c_attn.weight"].blocks) == 1
    assert specs["c_fc.weight"].transposed  # "*" matched first
    assert specs["proj.weight"].transposed and specs["proj.weight"].logical_shape == (16, 4)
    toy = classify_parameters(Toy(), orientation={"layers.0.mlp.0.weight": "in_out"})
    assert toy["layers.0.mlp.0.weight"].transposed and toy["layers.0.mlp.0.weight"].logical_shape == (4, 8)
    assert not toy["layers.1.mlp.0.weight"].transposed


def test_unknown_orientation_value_raises_clear_error():
    with pytest.raises(ValueError, match="unknown value 'transposed'"):
        classify_parameters(Toy(), orientation={"*": "transposed"})


def test_orientation_patterns_skip_1d_parameters_and_in_out_on_3d_raises():
    specs = classify_parameters(Toy(), orientation={"*norm*": "in_out"})
    assert not specs["norm.weight"].transposed and not specs["layers.0.norm.bias"].transposed
    with pytest.raises(ValueError, match="only 2-D parameters can be stored transposed"):
        classify_parameters(WithExperts(), overrides={"experts": "vector"}, orientation={"experts": "in_out"})


def test_fused_blocks_of_a_conv1d_weight_replace_the_automatic_split():
    blocks = stacked_blocks("attn.c_attn.weight", [8, 4], ["qk", "v"])
    specs = classify_parameters(_gpt_like(), fused={"attn.c_attn.weight": blocks})
    assert specs["attn.c_attn.weight"].blocks == blocks and specs["attn.c_attn.weight"].transposed


# --------------------------------------------------------------------------- block_scale
def _expected_multiplier(spec: ParamSpec, factors: torch.Tensor) -> torch.Tensor:
    """The storage-shaped multiplier, element by element."""
    full = torch.empty(spec.shape, dtype=factors.dtype)
    for i, blk in enumerate(spec.blocks):
        for a, b in blk.rows:
            for r in range(a, b):
                if spec.transposed:
                    full[:, r] = factors[i]
                else:
                    full[r, :] = factors[i]
    return full


@pytest.mark.parametrize("transposed", [False, True])
def test_block_scale_broadcasts_each_blocks_factor_over_its_logical_rows(transposed):
    blocks = qkv_blocks("w", 4, 2, 2, interleaved=True)  # non-contiguous row sets
    spec = ParamSpec("w", Geometry.HIDDEN, (5, 16) if transposed else (16, 5), blocks=blocks, transposed=transposed)
    factors = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    scale = block_scale(spec, factors)
    assert scale.shape == ((1, 16) if transposed else (16, 1))
    assert torch.equal(scale.expand(spec.shape), _expected_multiplier(spec, factors))


@pytest.mark.parametrize("transposed", [False, True])
def test_block_scale_of_a_piece_is_the_slice_of_the_flattened_multiplier(transposed):
    spec = ParamSpec("w", Geometry.HIDDEN, (5, 12) if transposed else (12, 5),
                     blocks=stacked_blocks("w", [4, 4, 4], ["q", "k", "v"]), transposed=transposed)
    factors = torch.tensor([0.5, 2.0, 3.0])
    flat = _expected_multiplier(spec, factors).reshape(-1)
    for start, stop in [(0, 60), (0, 7), (3, 4), (7, 33), (12, 24), (59, 60), (20, 20)]:
        piece = block_scale(spec, factors, (start, stop))
        assert torch.equal(piece, flat[start:stop]), (start, stop)


def test_block_scale_of_one_block_is_its_scalar_factor():
    spec = ParamSpec("w", Geometry.HIDDEN, (3, 4), transposed=True)
    factors = torch.tensor([0.25])
    assert block_scale(spec, factors).shape == () and float(block_scale(spec, factors, (2, 9))) == 0.25
