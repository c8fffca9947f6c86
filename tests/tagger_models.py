"""ParticleNet-like and Particle-Transformer-like jet taggers in PyTorch (seeded), and their
ONNX export by both of torch's exporters, with the particle axis P dynamic.

Written after the public weaver-core models (ParticleNet: EdgeConv blocks with kNN by TopK over
-|xi - xj|^2, neighbours gathered from a flattened [N*P, C] tensor at indices offset by
arange(N) * P; ParT: BatchNorm + Linear/GELU embeddings, pairwise interaction features
(log delta R, through Sqrt/Log/Floor), multi-head self-attention with a key-padding mask as a
large negative fill, a class token in front). Inputs, all float32:

    points  [N, 2, P]   (eta, phi)
    features [N, C, P]
    mask    [N, 1, P]   1 for a particle, 0 for padding

Public API::

    build(name) -> nn.Module (eval mode, seeded)             name in MODELS
    export(name, path, exporter="legacy" | "dynamo", opset=None) -> Path
    make_inputs(batch, particles, rng, features=C, padded=...) -> dict of arrays
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

MODELS = ("particlenet", "part")
FEATURES = 7
CLASSES = 5
INPUTS = ("points", "features", "mask")
LEGACY_OPSET = {"particlenet": 13, "part": 17}
DYNAMO_OPSET = 18


# ------------------------------------------------------------------------------- ParticleNet

def knn(x, k):
    inner = -2 * torch.matmul(x.transpose(2, 1), x)
    xx = torch.sum(x ** 2, dim=1, keepdim=True)
    pairwise = -xx - inner - xx.transpose(2, 1)
    return pairwise.topk(k=k + 1, dim=-1)[1][:, :, 1:]  # (N, P, k), self dropped


def graph_feature(x, k, idx):
    batch, dims, points = x.size()
    base = torch.arange(0, batch, device=x.device).view(-1, 1, 1) * points
    idx = (idx + base).view(-1)
    fts = x.transpose(2, 1).reshape(-1, dims)
    fts = fts[idx, :].view(batch, points, k, dims).permute(0, 3, 1, 2).contiguous()
    x = x.view(batch, dims, points, 1).repeat(1, 1, 1, k)
    return torch.cat((x, fts - x), dim=1)


class EdgeConv(nn.Module):
    def __init__(self, k, inputs, outputs):
        super().__init__()
        self.k = k
        layers, c = [], 2 * inputs
        for o in outputs:
            layers += [nn.Conv2d(c, o, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
            c = o
        self.convs = nn.Sequential(*layers)
        # weaver's shortcut is a Conv1d(1x1) + BatchNorm1d; written as the same product on the
        # transposed features (Linear) until 1-D Conv lands on the import side
        self.shortcut = nn.Linear(inputs, outputs[-1], bias=False)
        self.shortcut_bn = nn.BatchNorm1d(outputs[-1])
        self.act = nn.ReLU()

    def forward(self, points, features):
        idx = knn(points, self.k)
        x = self.convs(graph_feature(features, self.k, idx)).mean(dim=-1)
        sc = self.shortcut_bn(self.shortcut(features.transpose(1, 2)).transpose(1, 2))
        return self.act(sc + x)


class ParticleNet(nn.Module):
    def __init__(self, features=FEATURES, classes=CLASSES, k=8,
                 blocks=((32, 32, 32), (64, 64, 64)), fc=128):
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.blocks = nn.ModuleList()
        c = features
        for outs in blocks:
            self.blocks.append(EdgeConv(k, c, outs))
            c = outs[-1]
        self.fc = nn.Sequential(nn.Linear(c, fc), nn.ReLU(), nn.Dropout(0.1),
                                nn.Linear(fc, classes))

    def forward(self, points, features, mask):
        shift = (mask == 0) * 1e9
        counts = torch.max(mask.sum(dim=-1), torch.ones_like(mask.sum(dim=-1)))
        fts = self.bn(features) * mask
        for i, block in enumerate(self.blocks):
            pts = (points if i == 0 else fts) + shift
            fts = block(pts, fts) * mask
        return torch.softmax(self.fc(fts.sum(dim=-1) / counts), dim=1)


# ------------------------------------------------------------------------------------- ParT

def pair_features(points, eps=1e-8):
    """log delta R between every pair of particles: [N, 1, P, P]."""
    eta, phi = points[:, 0:1], points[:, 1:2]
    deta = eta.unsqueeze(-1) - eta.unsqueeze(-2)
    dphi = phi.unsqueeze(-1) - phi.unsqueeze(-2)
    dphi = dphi - 2 * math.pi * torch.floor((dphi + math.pi) / (2 * math.pi))
    return torch.log(torch.sqrt(deta ** 2 + dphi ** 2).clamp(min=eps))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, bias):
        n, p, d = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).reshape(n, p, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // self.heads)
                            + bias, dim=-1)
        h = torch.matmul(att, v).transpose(1, 2).reshape(n, p, d)
        x = x + self.proj(h)
        return x + self.mlp(self.norm2(x))


class ParT(nn.Module):
    def __init__(self, features=FEATURES, classes=CLASSES, dim=64, heads=4, layers=2):
        super().__init__()
        self.heads = heads
        self.bn = nn.BatchNorm1d(features)
        self.embed = nn.Sequential(nn.Linear(features, dim), nn.GELU(), nn.Linear(dim, dim),
                                   nn.GELU())
        self.pair = nn.Conv2d(1, heads, 1)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.cls_block = Block(dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, points, features, mask):
        n, _, p = features.shape
        x = self.embed(self.bn(features).transpose(1, 2)) * mask.transpose(1, 2)
        pad = mask.squeeze(1) == 0                                       # [N, P] bool
        fill = torch.where(pad, torch.full_like(mask.squeeze(1), -1e9),
                           torch.zeros_like(mask.squeeze(1)))            # [N, P]
        bias = self.pair(pair_features(points)) + fill[:, None, None, :]   # [N, H, P, P]
        for block in self.blocks:
            x = block(x, bias)
        x = torch.cat((self.cls.expand(n, 1, -1), x), dim=1)              # class token first
        cls_fill = torch.cat((torch.zeros_like(fill[:, :1]), fill), dim=1)
        x = self.cls_block(x, cls_fill[:, None, None, :].expand(n, self.heads, p + 1, p + 1))
        return torch.softmax(self.head(self.norm(x[:, 0])), dim=-1)


# ------------------------------------------------------------------------------------ common

def build(name: str) -> nn.Module:
    torch.manual_seed({"particlenet": 11, "part": 12}[name])
    module = {"particlenet": ParticleNet, "part": ParT}[name]()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return module.eval()


def make_inputs(batch: int, particles: int, rng: np.random.Generator, features=FEATURES,
                padded: float = 0.3) -> dict:
    """Random events with the last ~``padded`` fraction of each event's particles as padding
    (zero features, zero mask), the count varying per event, at least 10 real particles."""
    points = rng.standard_normal((batch, 2, particles)).astype(np.float32)
    fts = rng.standard_normal((batch, features, particles)).astype(np.float32)
    mask = np.ones((batch, 1, particles), np.float32)
    for i in range(batch):
        real = max(min(particles, 10), int(particles * (1 - padded * rng.random())))
        mask[i, :, real:] = 0
    points *= mask
    fts *= mask
    return {"points": points, "features": fts, "mask": mask}


def export(name: str, path, exporter: str = "legacy", opset: int | None = None) -> Path:
    """Write ``name`` to ``path`` with torch's legacy (TorchScript) or dynamo exporter; the
    batch axis N and the particle axis P are dynamic."""
    path = Path(path)
    module = build(name)
    example = make_inputs(2, 20, np.random.default_rng(0))
    args = tuple(torch.from_numpy(example[k]) for k in INPUTS)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(module, args, str(path), dynamo=False,
                              opset_version=opset or LEGACY_OPSET[name],
                              input_names=list(INPUTS), output_names=["y"],
                              dynamic_axes={**{k: {0: "N", 2: "P"} for k in INPUTS},
                                            "y": {0: "N"}})
        else:
            n, p = torch.export.Dim("N", min=1, max=4096), torch.export.Dim("P", min=10,
                                                                            max=512)
            prog = torch.onnx.export(module, args, dynamo=True,
                                     opset_version=opset or DYNAMO_OPSET,
                                     input_names=list(INPUTS), output_names=["y"],
                                     dynamic_shapes={k: {0: n, 2: p} for k in INPUTS},
                                     optimize=True, verbose=False)
            prog.save(str(path))
    return path
