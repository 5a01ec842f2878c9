"""Small transformer models for the attention-head tests (no torchvision here).

Every attention module reads its head counts from attributes at forward time
(``self.num_heads``, ``self.num_kv_heads``, ``self.inner_dim``), so slicing
heads away and updating those attributes leaves a working model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """ViT-style multi-head self-attention with separate q/k/v or one fused ``qkv`` Linear."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, fused: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.inner_dim = num_heads * self.head_dim  # read by forward, like HF BERT's all_head_size
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(dim, 3 * inner)
        else:
            self.q = nn.Linear(dim, inner)
            self.k = nn.Linear(dim, inner)
            self.v = nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x):
        b, n, _ = x.shape
        if self.fused:
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.inner_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, fused: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, fused=fused)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Tokens ``[B, N, in_dim]`` -> linear embedding -> blocks -> LayerNorm -> mean pool -> classifier."""

    def __init__(self, in_dim: int = 12, dim: int = 32, depth: int = 2, num_heads: int = 4,
                 mlp_hidden: int = 48, num_classes: int = 5, fused: bool = False):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(ViTBlock(dim, num_heads, mlp_hidden, fused) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n_rep: int):
    """``[B, KV, N, D]`` -> ``[B, KV * n_rep, N, D]``; query head ``h`` uses kv head ``h // n_rep``."""
    if n_rep == 1:
        return x
    b, kv, n, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, n, d).reshape(b, kv * n_rep, n, d)


class GQAttention(nn.Module):
    """LLaMA-style grouped-query attention with rotary embeddings and a causal mask."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, rope: bool = True,
                 rope_base: float = 10000.0):
        super().__init__()
        self.use_rope = rope
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)
        inv_freq = 1.0 / rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, n: int):
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = self.rope(n)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        n_rep = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        out = scores.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class GatedMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, mlp_hidden: int,
                 rope: bool = True):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = GQAttention(dim, num_heads, num_kv_heads, head_dim, rope)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = GatedMlp(dim, mlp_hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """Token ids ``[B, N]`` -> embedding -> LLaMA blocks -> RMSNorm -> logits."""

    def __init__(self, vocab: int = 50, dim: int = 32, depth: int = 2, num_heads: int = 8, num_kv_heads: int = 2,
                 head_dim: int = 8, mlp_hidden: int = 40, rope: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, num_heads, num_kv_heads, head_dim, mlp_hidden, rope)
                                    for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))
