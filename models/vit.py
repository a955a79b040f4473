"""A small Vision Transformer (Dosovitskiy et al., ICLR 2021) for 32x32 images, written timm-style.

Patch 4 (64 tokens plus a class token), width 192, depth 6, 3 heads, MLP ratio 4, pre-norm blocks.
Attention uses one ``nn.Linear`` for q, k, v and one for the output projection, and spells out the
matmuls (no ``nn.MultiheadAttention``, no fused kernel) so that every projection is a visible
weight-bearing module in the fx graph. Reshapes take the batch from ``x.shape[0]`` and every other
size from the module config, which keeps ``torch.fx.symbolic_trace`` happy. 2.69M parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_model


class Attention(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        qkv = self.qkv(x)  # (B, N, 3*C)
        qkv = qkv.reshape(batch, -1, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, N, d) each
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
        attn = attn.softmax(dim=-1)  # (B, h, N, N)
        attn = self.attn_drop(attn)  # (B, h, N, N)
        x = attn @ v  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(batch, -1, self.dim)  # (B, N, C)
        x = self.proj(x)  # (B, N, C)
        return self.proj_drop(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (B, N, hidden)
        return self.drop2(self.fc2(x))  # (B, N, C)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # (B, N, C)
        return x + self.mlp(self.norm2(x))  # (B, N, C)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.1,
        attn_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"VisionTransformer: img_size {img_size} must be divisible by patch_size {patch_size}")
        num_patches = (img_size // patch_size) ** 2
        self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # The position table is sized for img_size: inputs must be exactly that size.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # As timm's "jax-free" ViT init: truncated-normal linears and position table, tiny class token.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), N = (H/p)*(W/p)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, N+1, C)
        x = self.pos_drop(x + self.pos_embed)  # (B, N+1, C)
        x = self.blocks(x)  # (B, N+1, C)
        x = self.norm(x)  # (B, N+1, C)
        x = x[:, 0]  # (B, C): the class token
        x = self.head_drop(x)  # (B, C)
        return self.head(x)  # (B, num_classes)


@register_model("vit_tiny", input_shape=(3, 32, 32), num_classes=10, family="vit")
def vit_tiny(num_classes: int = 10, drop_rate: float = 0.1) -> VisionTransformer:
    return VisionTransformer(num_classes=num_classes, drop_rate=drop_rate)
