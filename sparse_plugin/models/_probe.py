"""Attention probe: the language model's first layers on one image's sequence, with plain torch.

SparseVLM scores visual tokens with the attention of decoder layer ℓ. In vLLM the real attention op
needs KV-cache metadata that does not exist during the encoder step, so the probe re-runs layers
0..ℓ-1 with the model's own modules (norms, QKV, RoPE, O-proj, MLP) and a causal SDPA, then returns
layer ℓ's queries for the rater rows and its keys for the whole sequence.

Tensor parallelism: QKV/O projections are vLLM's parallel linears, so each rank holds its own heads
and ``o_proj`` all-reduces; per-head statistics are reduced across ranks by the callers below.
Works for Llama-style decoders (LLaVA's Llama/Vicuna/Mistral, Qwen2, Qwen3): attributes
``self_attn`` {``qkv_proj``, ``rotary_emb``, ``o_proj``, ``q_size``, ``kv_size``, ``num_heads``,
``num_kv_heads``, ``head_dim``, ``scaling``, and ``q_norm``/``k_norm`` where the model normalises
q and k per head}, ``input_layernorm``, ``post_attention_layernorm``, ``mlp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ProbeOutput:
    q: torch.Tensor  # (H_local, R, dh) rater queries after RoPE
    k: torch.Tensor  # (Hkv_local, L, dh) keys after RoPE
    scaling: float
    head_dim: int


def _split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(x.shape[0], heads, head_dim).transpose(0, 1)  # (L, H*dh) -> (H, L, dh)


def _qkv(attn: nn.Module, positions: torch.Tensor, x: torch.Tensor):
    qkv, _ = attn.qkv_proj(x)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    if hasattr(attn, "q_norm"):  # QK-norm (Qwen3): RMSNorm per head, before RoPE
        q = attn.q_norm(q.reshape(-1, attn.head_dim)).view(q.shape)
        k = attn.k_norm(k.reshape(-1, attn.head_dim)).view(k.shape)
    q, k = attn.rotary_emb(positions, q, k)
    return q, k, v


def _layer_forward(
    layer: nn.Module, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer, as vLLM's LlamaDecoderLayer.forward, with causal SDPA as attention."""
    if residual is None:
        residual = h
        x = layer.input_layernorm(h)
    else:
        x, residual = layer.input_layernorm(h, residual)
    attn = layer.self_attn
    q, k, v = _qkv(attn, positions, x)
    heads, kv_heads, dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    o = F.scaled_dot_product_attention(
        _split_heads(q, heads, dh),
        _split_heads(k, kv_heads, dh),
        _split_heads(v, kv_heads, dh),
        is_causal=True,
        scale=attn.scaling,
        enable_gqa=heads != kv_heads,
    )  # (H, L, dh)
    x, _ = attn.o_proj(o.transpose(0, 1).reshape(x.shape[0], heads * dh))
    x, residual = layer.post_attention_layernorm(x, residual)
    return layer.mlp(x), residual


@torch.inference_mode()
def probe_layer(
    layers: nn.ModuleList,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    layer: int,
    rows: torch.Tensor,
    added: torch.Tensor | None = None,
) -> ProbeOutput:
    """Queries of ``rows`` and keys of all tokens at decoder layer ``layer``.

    Args:
        layers: the decoder layers of the language model.
        embeds: (L, d) input embeddings of the whole sequence (prefix, image, text).
        positions: position ids as the model's RoPE expects them ((L,), or (3, L) for M-RoPE).
        layer: the scoring layer ℓ (layers 0..ℓ-1 run first).
        rows: (R,) indices of the query rows wanted (raters).
        added: (A, L, d) inputs added to the hidden states after layers 0..A-1, as the model
            adds them (Qwen3-VL's DeepStack features at the visual rows); None for none.
    """
    h, residual = embeds, None
    for i in range(layer):
        h, residual = _layer_forward(layers[i], positions, h, residual)
        if added is not None and i < len(added):
            h = h + added[i]
    target = layers[layer]
    x = target.input_layernorm(h) if residual is None else target.input_layernorm(h, residual)[0]
    attn = target.self_attn
    q, k, _ = _qkv(attn, positions, x)
    dh = attn.head_dim
    q = _split_heads(q[rows], attn.num_heads, dh)  # (H, R, dh)
    k = _split_heads(k, attn.num_kv_heads, dh)  # (Hkv, L, dh)
    return ProbeOutput(q=q, k=k, scaling=float(attn.scaling), head_dim=dh)


def rope_gravity(
    attn: nn.Module, positions: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """(R, C) attention logit that all-ones q and k get at those positions under this model's RoPE.

    SparseVLM v2 divides attention by it to remove RoPE's distance bias; computing it with the
    model's own rotary module keeps any RoPE scaling variant right.
    """
    dh = attn.head_dim
    n = positions.shape[-1]
    ones = torch.ones(n, dh, dtype=torch.float32, device=positions.device)
    q, k = attn.rotary_emb(positions, ones.clone(), ones.clone())
    q, k = q.view(n, dh).float(), k.view(n, dh).float()
    return (q[rows] @ k[cols].T) * float(attn.scaling)


def tp_world_size() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except (ImportError, AssertionError):
        return 1


def tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (ImportError, AssertionError):
        return 0


def tp_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a per-rank partial statistic over the tensor-parallel group (no-op without TP)."""
    if tp_world_size() == 1:
        return x
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(x.contiguous())


def tp_gather_heads(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-head statistic (H_local, ...) from every rank into (H_total, ...)."""
    if tp_world_size() == 1:
        return x
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(x.contiguous(), dim=0)
