"""Small models for the trace / coarsen / flops tests (no dependency on fxplan.models)."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """nanoGPT-like: token + position embedding, blocks in a ModuleList, tied head, view(B*T, V) loss."""

    def __init__(self, vocab=64, dim=32, heads=4, layers=4, seq=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))


class RawGPT(nn.Module):
    """Blocks written with F.linear on raw nn.Parameters (no nn.Linear), and a transpose that puts
    the batch on dim 1 for a moment."""

    def __init__(self, vocab=64, dim=32, layers=2):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(vocab, dim) * 0.1)
        self.w1 = nn.ParameterList(nn.Parameter(torch.randn(4 * dim, dim) / math.sqrt(dim)) for _ in range(layers))
        self.w2 = nn.ParameterList(nn.Parameter(torch.randn(dim, 4 * dim) / math.sqrt(4 * dim)) for _ in range(layers))
        self.b1 = nn.ParameterList(nn.Parameter(torch.zeros(4 * dim)) for _ in range(layers))

    def forward(self, idx, targets):
        x = F.embedding(idx, self.emb)
        for w1, b1, w2 in zip(self.w1, self.b1, self.w2):
            h = F.relu(F.linear(x, w1, b1))
            x = x + F.linear(h, w2)
        x = x.transpose(0, 1)  # (T, B, C): the batch sits on dim 1 here
        x = x.transpose(0, 1)
        logits = F.linear(x, self.emb)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class MLP(nn.Module):
    """No ModuleList: a Sequential of alternating Linear/ReLU (children of different types)."""

    def __init__(self, dim=16, hidden=32, depth=3):
        super().__init__()
        layers = [nn.Linear(dim, hidden), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x, y):
        return F.mse_loss(self.net(x), y)


def gpt_batch(batch=2, seq=16, vocab=64, device=None):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (batch, seq), generator=g)
    tgt = torch.randint(0, vocab, (batch, seq), generator=g)
    if device is not None:
        idx, tgt = idx.to(device), tgt.to(device)
    return idx, tgt
