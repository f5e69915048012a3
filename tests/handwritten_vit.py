"""A small ViT written from scratch for the tests: its own attention (explicit softmax), its own
block class and names. No tokenreduce adapter knows it."""

import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.to_qkv(x).reshape(b, n, 3, self.heads, c // self.heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
        logits = (q @ k.transpose(-2, -1)) / (c // self.heads) ** 0.5  # (B, H, N, N)
        weights = logits.softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, c))


class Layer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_a = nn.LayerNorm(width)
        self.mix = SelfAttention(width, heads)
        self.ln_b = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.ln_a(x))
        return x + self.ffn(self.ln_b(x))


class TinyViT(nn.Module):
    """8 layers, 32 px images of 4 px patches (64 tokens plus a class token)."""

    def __init__(self, width: int = 48, depth: int = 8, heads: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.class_embedding = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.positions = nn.Parameter(torch.randn(1, 65, width) * 0.02)
        self.layers = nn.ModuleList([Layer(width, heads) for _ in range(depth)])
        self.ln_out = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.stem(img).flatten(2).transpose(1, 2)  # (B, 64, C)
        x = torch.cat([self.class_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.positions
        for layer in self.layers:
            x = layer(x)
        return self.classifier(self.ln_out(x)[:, 0])
