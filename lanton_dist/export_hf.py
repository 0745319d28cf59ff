"""Export a checkpoint of :class:`lanton_dist.model.Transformer` to the Hugging Face format
(``lanton-dist export-hf CHECKPOINT OUT_DIR``): ``config.json`` and ``model.safetensors`` that
``transformers.LlamaForCausalLM.from_pretrained(OUT_DIR)`` loads and that give our logits.

The two models compute the same function; the export only renames and reorders:

* names: ``tok_embeddings`` → ``model.embed_tokens``, ``layers.i.attention.w{q,k,v,o}`` →
  ``model.layers.i.self_attn.{q,k,v,o}_proj``, ``attention_norm`` / ``ffn_norm`` →
  ``input_layernorm`` / ``post_attention_layernorm``, ``feed_forward.w_{gate,up,down}`` →
  ``mlp.{gate,up,down}_proj``, ``norm`` → ``model.norm``, ``lm_head`` stays
  (:func:`hf_name`);
* rotary embeddings: ours rotates interleaved pairs ``(x[2i], x[2i+1])`` of each head, Hugging
  Face's ``rotate_half`` the halves ``(x[i], x[i + hd/2])`` — the rows of each head of ``wq``
  and ``wk`` are permuted so that HF's row ``c·hd/2 + i`` is our row ``2i + c``
  (:func:`interleaved_to_half_rows`; attention scores are unchanged because q and k get the
  same permutation, and ``wv``/``wo`` are untouched);
* the config: ``num_key_value_heads`` = ``n_kv_heads`` (GQA), ``head_dim`` = ``dim / n_heads``,
  ``rms_norm_eps`` = ``norm_eps``, ``rope_theta`` = ``rope_theta`` (also as v5's
  ``rope_parameters``), ``tie_word_embeddings: false`` (our head is untied), no biases, SiLU.

Readable checkpoints: those of ``parallel.backend`` ``none``, ``ddp``, ``zero`` and ``fsdp2``
(:mod:`lanton_dist.checkpoint_weights`). The weights are written as fp32 unless ``dtype``
says otherwise; a ``data.tokenizer`` file of the run is copied as ``tokenizer.json``.
Needs the ``safetensors`` package (a dependency of ``transformers``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lanton_dist.checkpoint_weights import CheckpointModel, read_checkpoint_model
from lanton_dist.config import ModelConfig

SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_BLOCK = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "feed_forward.w_gate": "mlp.gate_proj", "feed_forward.w_up": "mlp.up_proj", "feed_forward.w_down": "mlp.down_proj",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    """The Hugging Face Llama name of our parameter ``name``; ValueError for an unknown one."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) >= 4 and parts[0] == "layers" and parts[-1] == "weight":
        inner = ".".join(parts[2:-1])
        if inner in _BLOCK:
            return f"model.layers.{parts[1]}.{_BLOCK[inner]}.weight"
    raise ValueError(f"parameter {name!r} has no Hugging Face Llama counterpart")


def interleaved_to_half_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection ``(heads·hd, D)`` reordered per head from interleaved rotary
    pairs to ``rotate_half`` halves: output row ``h·hd + c·hd/2 + i`` is input row ``h·hd + 2i + c``."""
    rows, d = w.shape
    hd = rows // heads
    return w.reshape(heads, hd // 2, 2, d).transpose(1, 2).reshape(rows, d)


def hf_config(m: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` of ``LlamaForCausalLM`` for our model ``m`` (module doc)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.dim, "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.dim // m.n_heads, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": m.init_std, "use_cache": True, "bos_token_id": None, "eos_token_id": None,
        "pad_token_id": None, "dtype": dtype, "torch_dtype": dtype,
    }


def hf_state_dict(state: dict[str, torch.Tensor], m: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our ``state`` (:class:`~lanton_dist.model.Transformer` names) as HF Llama tensors
    (renamed, q/k rows permuted, contiguous, ``dtype``)."""
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if name.endswith("attention.wq.weight"):
            w = interleaved_to_half_rows(w, m.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = interleaved_to_half_rows(w, m.n_kv_heads)
        out[hf_name(name)] = w.detach().to(dtype).contiguous()
    expected = 3 + 9 * m.n_layers
    if len(out) != expected:
        raise ValueError(f"the checkpoint has {len(out)} model tensors, a {m.n_layers}-layer model has {expected}")
    return out


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32") -> tuple[Path, CheckpointModel]:
    """Write ``config.json`` and ``model.safetensors`` of the checkpoint ``checkpoint`` names
    (a step directory, the checkpoints directory or a run's out_dir) into ``out_dir``; returns
    ``out_dir`` and what was read."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("export-hf writes safetensors: pip install safetensors (or transformers)") from None
    ckpt = read_checkpoint_model(checkpoint)
    tensors = hf_state_dict(ckpt.state_dict, ckpt.model, DTYPES[dtype])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(hf_config(ckpt.model, dtype), indent=2) + "\n")
    tokenizer = Path(ckpt.config.data.tokenizer) if ckpt.config.data.tokenizer else None
    if tokenizer is not None and tokenizer.is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out, ckpt
