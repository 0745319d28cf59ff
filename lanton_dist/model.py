"""A small LLaMA-style decoder in plain torch (the model the trainer and demo use).

RMSNorm (pre-norm), rotary position embeddings, grouped-query attention through
``F.scaled_dot_product_attention`` (causal), SwiGLU MLP, untied LM head, no biases.
Every projection is its own ``nn.Linear`` (``wq``/``wk``/``wv``/``wo``, ``w_gate``/``w_up``/
``w_down``) so each is one LANTON layer; the token embedding is ``tok_embeddings``
(``nn.Embedding``) and the head ``lm_head``, which :func:`lanton_dist.classify_parameters`
puts in the embed_head group; norm gains are vectors; the rest is hidden.

Shapes: B batch, T sequence length, D ``dim``, H ``n_heads``, K ``n_kv_heads``,
``hd = D / H``, V ``vocab_size``.

Memory and speed options (they change neither the parameters nor the results):
``activation_checkpointing`` recomputes each block's activations in the backward pass
(``torch.utils.checkpoint``, non-reentrant, one checkpoint per block: only each block's input
is kept during the forward); :meth:`Transformer.compile_blocks` compiles every block with
``torch.compile`` in place (parameter names and checkpoints unchanged).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lanton_dist.config import ConfigError, ModelConfig, check_model_config  # noqa: F401  (re-exported)


class RMSNorm(nn.Module):
    """``x / rms(x) · weight`` over the last dim; ``(..., D) → (..., D)``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``(max_seq_len, head_dim / 2)`` (fp32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., 2i], x[..., 2i+1])`` of ``x`` ``(B, heads, T, hd)`` by ``cos, sin`` ``(T, hd/2)``."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal GQA self-attention: ``(B, T, D) → (B, T, D)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """``w_down(silu(w_gate x) · w_up x)``: ``(B, T, D) → (B, T, D)``."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, ffn_dim, bias=False)
        self.w_up = nn.Linear(dim, ffn_dim, bias=False)
        self.w_down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``+ mlp(norm(·))``; ``(B, T, D)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """LLaMA-style decoder: token ids ``(B, T)`` int64 → logits ``(B, T, V)`` (fp32 params).

    ``seed`` fixes the initialisation (independent of the global RNG): every weight matrix
    ~ N(0, init_std²), the residual output projections (``wo``, ``w_down``) scaled by
    1/√(2·n_layers), norm gains 1. ``activation_checkpointing``: recompute each block in the
    backward pass instead of keeping its activations (module doc; only while gradients are
    recorded).
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, *, activation_checkpointing: bool = False) -> None:
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Deterministic init from ``seed`` (see class doc)."""
        g = torch.Generator().manual_seed(seed)
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
                continue
            std = residual_std if name.endswith(("wo.weight", "w_down.weight")) else self.cfg.init_std
            p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.tok_embeddings(tokens)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, cos, sin, use_reentrant=False) if recompute else layer(x, cos, sin)
        return self.lm_head(self.norm(x)).float()

    def compile_blocks(self, backend: str = "inductor") -> None:
        """``torch.compile`` every block in place (``nn.Module.compile``: the module tree, the
        parameter names and hence state dicts and checkpoints stay as they are). An unknown
        ``backend`` is a :class:`~lanton_dist.config.ConfigError` naming ``train.compile_backend``."""
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ConfigError(f"train.compile_backend {backend!r} is not a torch.compile backend; known: {known}")
        for layer in self.layers:
            layer.compile(backend=backend)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of ``tokens`` ``(B, T)`` against ``targets`` ``(B, T)``."""
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Trainable parameter count (optionally without the token embedding)."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return n - self.tok_embeddings.weight.numel() if exclude_embedding else n
