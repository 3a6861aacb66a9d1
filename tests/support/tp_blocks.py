"""Blocks written the ways real code writes them, for the sharding rules' tests: attention with
einsum, attention as bmm on [B*H, T, hd], a fused qkv weight and a fused gated MLP cut by chunk, and
convolutions. Each LM is forward(tokens, targets) -> loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EinsumAttention(nn.Module):
    """Attention with einsum for the scores and the weighted values (as in many research codebases)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (lin(x).view(b, t, self.heads, d // self.heads) for lin in (self.q, self.k, self.v))
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.heads) ** -0.5
        y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v)
        return self.o(y.reshape(b, t, d))


class EinsumMLP(nn.Module):
    """An MLP whose weights are raw parameters applied with einsum."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(dim, hidden) * 0.05)
        self.w_out = nn.Parameter(torch.randn(hidden, dim) * 0.05)

    def forward(self, x):
        return torch.einsum("btf,fd->btd", F.gelu(torch.einsum("btd,df->btf", x, self.w_in)), self.w_out)


class EinsumBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = EinsumAttention(dim, heads)
        self.mlp = EinsumMLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BmmAttention(nn.Module):
    """Attention as bmm on [B*H, T, hd] (heads merged into the batch, as fairseq and older HF code do)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h, hd = self.heads, d // self.heads

        def heads(y):
            return y.view(b, t, h, hd).transpose(1, 2).reshape(b * h, t, hd)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        att = torch.bmm(q, k.transpose(1, 2)) * hd ** -0.5
        y = torch.bmm(att.softmax(-1), v)
        return self.o(y.view(b, h, t, hd).transpose(1, 2).reshape(b, t, d))


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc, self.proj = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class BmmBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = BmmAttention(dim, heads)
        self.mlp = GeluMLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FusedBlock(nn.Module):
    """One fused qkv weight cut by chunk and one fused gate|up weight cut by chunk (SwiGLU)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate_up = nn.Linear(dim, 2 * 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyLM(nn.Module):
    """Embedding, `layers` blocks made by `block(dim, heads)`, a norm and an untied head."""

    def __init__(self, block, vocab=64, dim=64, heads=4, layers=2, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class ConvNet(nn.Module):
    """Two 2-D convolutions and a 1-D one over channels, pooled into a classifier:
    forward(images [N, 3, 8, 8], labels [N]) -> loss."""

    def __init__(self, channels: int = 32, classes: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, padding=1)
        self.conv4 = nn.Conv1d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels, classes)

    def forward(self, images, labels):
        x = F.relu(self.conv2(F.relu(self.conv1(images))))
        x = F.relu(self.conv4(F.relu(self.conv3(x.flatten(2)))))
        return F.cross_entropy(self.head(x.mean(-1)), labels)


class DepthwiseBlock(nn.Module):
    """ConvNeXt's block: a depthwise 7x7 conv (groups == channels), LayerNorm over the channels
    (channels last), a 4x MLP, a per-channel scale, the residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1, self.fc2 = nn.Linear(channels, 4 * channels), nn.Linear(4 * channels, channels)
        self.scale = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.scale * self.fc2(F.gelu(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class DepthwiseNet(nn.Module):
    """A patchify stem, two ConvNeXt blocks, pooled into a classifier:
    forward(images [N, 3, 8, 8], labels [N]) -> loss."""

    def __init__(self, channels: int = 32, classes: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 2, stride=2)
        self.blocks = nn.ModuleList(DepthwiseBlock(channels) for _ in range(2))
        self.head = nn.Linear(channels, classes)

    def forward(self, images, labels):
        x = self.stem(images)
        for blk in self.blocks:
            x = blk(x)
        return F.cross_entropy(self.head(x.mean((2, 3))), labels)


BLOCKS = {"einsum": EinsumBlock, "bmm": BmmBlock, "fused": FusedBlock}
VOCAB = 2048  # the vocab-parallel LMs: logits [tokens, 2048] are their largest tensors, and a tp4 shard of
# them (128 x 512 floats) is still larger than any other tensor a rank saves, whichever layers the planner
# shards (a replicated MLP saves its [tokens, 256] hidden whole)
CONVS = {"conv": ConvNet, "dwconv": DepthwiseNet}


def build_lm(name: str) -> nn.Module:
    """"einsum" | "bmm" | "fused" | "conv" | "dwconv", or "vocab" / "tied" (a large vocabulary, head untied / tied)."""
    torch.manual_seed(0)
    if name in ("vocab", "tied"):
        return TinyLM(BmmBlock, vocab=VOCAB, layers=1, tied=name == "tied")
    return CONVS[name]() if name in CONVS else TinyLM(BLOCKS[name])


def batch_for(name: str, seed: int = 1):
    if name in ("vocab", "tied"):  # a quarter of the labels ignored (-100): the mean is over the rest
        tokens, targets = lm_batch(vocab=VOCAB, seed=seed)
        g = torch.Generator().manual_seed(seed + 100)
        return tokens, targets.masked_fill(torch.rand(targets.shape, generator=g) < 0.25, -100)
    if name not in CONVS:
        return lm_batch(seed=seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 8, (8,), generator=g)


def lm_batch(batch: int = 8, seq: int = 16, vocab: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g)
