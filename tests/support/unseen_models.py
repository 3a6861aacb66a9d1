"""Models the presets do not cover (leaf modules, einsum attention, BatchNorm, several inputs).

Shared by tests/torchrun/test_unseen_models.py and its torchrun worker; each builder returns (model, batch).
"""

import torch, torch.nn as nn, torch.nn.functional as F

class CNN(nn.Module):
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv2d(3, 8, 3, padding=1); s.bn = nn.BatchNorm2d(8); s.c2 = nn.Conv2d(8, 16, 3, padding=1)
        s.fc = nn.Linear(16 * 4 * 4, 10)
    def forward(s, x, y):
        x = F.max_pool2d(F.relu(s.bn(s.c1(x))), 2)
        x = F.max_pool2d(F.relu(s.c2(x)), 2)
        return F.cross_entropy(s.fc(x.flatten(1)), y)
def cnn(): return CNN(), (torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))

class CNNNoBN(CNN):
    def __init__(s):
        super().__init__(); s.bn = nn.Identity()
def cnn_nobn(): return CNNNoBN(), (torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))

class MHA(nn.Module):
    def __init__(s):
        super().__init__(); s.emb = nn.Embedding(50, 32); s.att = nn.MultiheadAttention(32, 4, batch_first=True); s.out = nn.Linear(32, 50)
    def forward(s, t, y):
        h = s.emb(t); a, _ = s.att(h, h, h, need_weights=False); return F.cross_entropy(s.out(h + a).flatten(0, 1), y.flatten())
def mha(): return MHA(), (torch.randint(0, 50, (8, 12)), torch.randint(0, 50, (8, 12)))

class Einsum(nn.Module):
    def __init__(s, d=32, h=4, L=3):
        super().__init__(); s.h = h
        s.emb = nn.Embedding(64, d)
        s.wq = nn.ParameterList([nn.Parameter(torch.randn(d, d) * .05) for _ in range(L)])
        s.wk = nn.ParameterList([nn.Parameter(torch.randn(d, d) * .05) for _ in range(L)])
        s.wv = nn.ParameterList([nn.Parameter(torch.randn(d, d) * .05) for _ in range(L)])
        s.wo = nn.ParameterList([nn.Parameter(torch.randn(d, d) * .05) for _ in range(L)])
        s.head = nn.Linear(d, 64, bias=False)
    def forward(s, t, y):
        x = s.emb(t); B, T, D = x.shape
        for q_, k_, v_, o_ in zip(s.wq, s.wk, s.wv, s.wo):
            q = (x @ q_).view(B, T, s.h, D // s.h); k = (x @ k_).view(B, T, s.h, D // s.h); v = (x @ v_).view(B, T, s.h, D // s.h)
            att = torch.einsum("bthd,bshd->bhts", q, k).softmax(-1)
            x = x + torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, D) @ o_
        return F.cross_entropy(s.head(x).flatten(0, 1), y.flatten())
def einsum(): return Einsum(), (torch.randint(0, 64, (8, 10)), torch.randint(0, 64, (8, 10)))

class LSTMm(nn.Module):
    def __init__(s):
        super().__init__(); s.emb = nn.Embedding(30, 16); s.rnn = nn.LSTM(16, 16, batch_first=True); s.out = nn.Linear(16, 30)
    def forward(s, t, y):
        h, _ = s.rnn(s.emb(t)); return F.cross_entropy(s.out(h).flatten(0, 1), y.flatten())
def lstm(): return LSTMm(), (torch.randint(0, 30, (8, 6)), torch.randint(0, 30, (8, 6)))

class Regress(nn.Module):  # three inputs, mse, sequential
    def __init__(s):
        super().__init__(); s.net = nn.Sequential(nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
    def forward(s, a, b, y):
        return F.mse_loss(s.net(torch.cat([a, b], -1)).squeeze(-1), y)
def regress(): return Regress(), (torch.randn(8, 6), torch.randn(8, 6), torch.randn(8))


BUILDERS = dict(cnn=cnn, cnn_nobn=cnn_nobn, mha=mha, einsum=einsum, lstm=lstm, regress=regress)
