"""Recurrent networks for the tests and benchmarks/bench_recurrent.py, written in PyTorch with
seeded weights: small LSTM/GRU stacks of every shape torch exports, and a DeepJet-sized tagger
(1-D convolutions over charged/neutral candidates and secondary vertices, one LSTM per branch,
dense head with softmax)."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import torch
from torch import nn

# DeepJet-sized: (candidates, features) per branch, the 1-D conv widths, the LSTM sizes
BRANCHES = {"cpf": (25, 16), "npf": (25, 6), "sv": (4, 12)}
CONVS = (64, 32, 32, 8)
LSTMS = {"cpf": 150, "npf": 50, "sv": 50}
INPUTS = tuple(BRANCHES)


class DeepJetLike(nn.Module):
    """Inputs [N, candidates, features] per branch (Keras' channels-last order); 1x1 Conv1d
    stacks with ReLU, an LSTM per branch (its last hidden state, as Keras' return_sequences
    False), dense 200 + ReLU, dense 8, softmax."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleDict()
        self.lstms = nn.ModuleDict()
        for name, (_, features) in BRANCHES.items():
            layers, width = [], features
            for out in CONVS:
                layers += [nn.Conv1d(width, out, 1), nn.ReLU()]
                width = out
            self.convs[name] = nn.Sequential(*layers)
            self.lstms[name] = nn.LSTM(width, LSTMS[name], batch_first=True)
        self.dense = nn.Sequential(nn.Linear(sum(LSTMS.values()), 200), nn.ReLU(),
                                   nn.Linear(200, 8), nn.Softmax(dim=-1))

    def forward(self, cpf, npf, sv):
        feats = []
        for name, x in zip(BRANCHES, (cpf, npf, sv)):
            y = self.convs[name](x.transpose(1, 2)).transpose(1, 2)
            _, (h, _) = self.lstms[name](y)
            feats.append(h[-1])
        return self.dense(torch.cat(feats, dim=1))


class Stack(nn.Module):
    """One torch LSTM/GRU (any layers, directions, batch_first); returns Y and the final
    states; with ``states`` the initial states are inputs of the model."""

    def __init__(self, cell, inputs=8, hidden=20, layers=1, bidirectional=False,
                 batch_first=False, states=False):
        super().__init__()
        self.cell, self.states = cell, states
        self.rnn = getattr(nn, cell)(inputs, hidden, num_layers=layers,
                                     bidirectional=bidirectional, batch_first=batch_first)

    def forward(self, x, *states):
        if self.states:
            y, h = self.rnn(x, states if self.cell == "LSTM" else states[0])
        else:
            y, h = self.rnn(x)
        return (y,) + (tuple(h) if isinstance(h, tuple) else (h,))


class Packed(nn.Module):
    """An LSTM over padded sequences of lengths ``lens`` (pack_padded_sequence), the output
    padded again with zeros (pad_packed_sequence), batch first."""

    def __init__(self, inputs=6, hidden=12, bidirectional=False):
        super().__init__()
        self.rnn = nn.LSTM(inputs, hidden, batch_first=True, bidirectional=bidirectional)

    def forward(self, x, lens):
        packed = nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True,
                                                   enforce_sorted=True)
        y, (h, c) = self.rnn(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        return y, h


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` with weights drawn from a seeded generator (uniform, PyTorch's ranges)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            bound = 1.0 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.3
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound * 2)
    return module.eval()


def export(module: nn.Module, args: tuple, names: list[str], outputs: list[str],
           exporter: str = "legacy", dynamic=True) -> bytes:
    """The ONNX bytes of ``module`` called on ``args`` (axis 0 of every input free)."""
    f = io.BytesIO()
    axes = {n: {0: "N"} for n in names} if dynamic else None
    if exporter == "legacy":
        torch.onnx.export(module, args, f, dynamo=False, input_names=names,
                          output_names=outputs, dynamic_axes=axes, opset_version=17)
        return f.getvalue()
    shapes = None
    if dynamic:
        batch = torch.export.Dim("N", min=1, max=4096)
        shapes = tuple({0: batch} for _ in names)
    program = torch.onnx.export(module, args, dynamo=True, input_names=names,
                                output_names=outputs, dynamic_shapes=shapes, verbose=False)
    return program.model_proto.SerializeToString()


def deepjet(path: pathlib.Path | None = None, exporter: str = "legacy") -> bytes:
    """The seeded DeepJet-sized tagger as ONNX bytes (also written to ``path``)."""
    model = seeded(DeepJetLike(), 12)
    feeds = make_inputs(2, np.random.default_rng(0))
    args = tuple(torch.from_numpy(feeds[k]) for k in INPUTS)
    data = export(model, args, list(INPUTS), ["probs"], exporter)
    if path is not None:
        pathlib.Path(path).write_bytes(data)
    return data


def make_inputs(batch: int, rng: np.random.Generator) -> dict:
    return {name: rng.standard_normal((batch, n, f)).astype(np.float32)
            for name, (n, f) in BRANCHES.items()}
