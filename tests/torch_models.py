"""Small PyTorch models exported to ONNX for end-to-end tests.

Each entry of ``TORCH_MODELS`` is ``export_fn(folder) -> (path, input_shape)``
where ``input_shape`` is the shape of the single input *without* the batch
axis.  Models are built with seeded weights, put in eval() mode and exported
with a dynamic batch axis (input ``"x"``, output ``"y"``).

Export strategy (see ``export_module``): torch's default exporter
(``dynamo=True``, needs onnxscript) is tried first, at opset 18 (the lowest
it implements; asking for 17 triggers a version conversion that fails on
ReduceMean and leaves opset 18 anyway), with its optimizer on, so BN is
folded into Conv and x.view(x.size(0), -1) becomes a plain Reshape([-1, K])
(``allowzero=1``).  Its files have ``ir_version`` 10.  If it raises, the
TorchScript exporter (``dynamo=False``, opset 17, ``do_constant_folding``)
is used; for ``shape_ops`` that one emits a Shape/Gather/Unsqueeze/Concat
subgraph and a ConstantOfShape chain computing the Pad pads.  Pass
``exporter="dynamo"`` / ``"legacy"`` to force one.

Public API::

    TORCH_MODELS: dict[str, Callable[[str | Path], tuple[Path, tuple[int, ...]]]]
    build_module(name) -> torch.nn.Module           # seeded, eval() mode
    export_module(module, input_shape, path, exporter="auto", opset=None) -> Path
    last_exporter(path) -> str | None               # "legacy" / "dynamo" used for that file
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TORCH_MODELS",
    "build_module",
    "export_module",
    "last_exporter",
    "INPUT_SHAPES",
]

LEGACY_OPSET = 17
DYNAMO_OPSET = 18
EXAMPLE_BATCH = 2  # batch used for tracing (not 1, to avoid specialisation)


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Conv+BN+ReLU, MaxPool, residual add, AdaptiveAvgPool2d(1), flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(x)
        x = F.relu(self.bn2(self.conv2(x)) + x)  # residual
        x = self.gap(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class MLP(nn.Module):
    """Linear layers with LeakyReLU / Tanh / Sigmoid and Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.act1 = nn.LeakyReLU(0.1)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act1(self.fc1(x)))
        x = torch.tanh(self.fc2(x))
        return torch.sigmoid(self.fc3(x))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 (groups=C) + BN + ReLU6, then pointwise 1x1 + BN + ReLU."""

    def __init__(self, c_in: int = 6, c_out: int = 12) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act1 = nn.ReLU6()
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dw2 = nn.Conv2d(c_out, c_out, 3, stride=2, padding=1, groups=c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        return self.dw2(x)


class ShapeOps(nn.Module):
    """x.view(x.size(0), -1), torch.cat, F.pad, mean(dim=(2,3)), clamp(0, 6), softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 8 * 8 + 3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3))  # [N, 3]
        h = F.pad(x, (1, 1, 1, 1), mode="constant", value=0.5)  # [N,3,10,10]
        h = torch.clamp(self.conv(h), min=0.0, max=6.0)  # [N,4,8,8]
        h = h.view(h.size(0), -1)  # [N,256]
        h = torch.cat([h, m], dim=1)  # [N,259]
        return torch.softmax(self.fc(h), dim=-1)


_MODULES: dict[str, tuple[type[nn.Module], tuple[int, ...], int]] = {
    # name: (class, input shape without batch, seed)
    "small_cnn": (SmallCNN, (3, 16, 16), 1),
    "mlp": (MLP, (20,), 2),
    "depthwise_separable": (DepthwiseSeparable, (6, 12, 12), 3),
    "shape_ops": (ShapeOps, (3, 8, 8), 4),
}

INPUT_SHAPES: dict[str, tuple[int, ...]] = {k: v[1] for k, v in _MODULES.items()}


def _randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Give BatchNorm layers non-trivial running stats / affine params."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))


def build_module(name: str) -> nn.Module:
    """Instantiate model ``name`` with seeded weights, in eval() mode."""
    cls, _, seed = _MODULES[name]
    with torch.random.fork_rng(devices=[]):  # don't disturb the global RNG
        torch.manual_seed(seed)
        module = cls()
    _randomize_bn(module, torch.Generator().manual_seed(seed + 1000))
    return module.eval()


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------

_USED_EXPORTER: dict[str, str] = {}


def last_exporter(path: str | Path) -> str | None:
    """Which exporter ("legacy" or "dynamo") wrote ``path`` in this process."""
    return _USED_EXPORTER.get(str(Path(path)))


def _export_legacy(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            export_params=True,
            opset_version=opset,
            do_constant_folding=True,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )


@contextlib.contextmanager
def _quiet_torch_logs():
    """Silence the exporter's logger warnings (e.g. 'torchvision is not installed')."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)


def _export_dynamo(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("N", min=1, max=4096)
    with warnings.catch_warnings(), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes={"x": {0: batch}},
            optimize=True,
            verbose=False,
        )
        prog.save(str(path))


def export_module(
    module: nn.Module,
    input_shape: tuple[int, ...],
    path: str | Path,
    exporter: str = "auto",
    opset: int | None = None,
) -> Path:
    """Export ``module`` (single input ``x`` of shape [N, *input_shape]) to ``path``.

    ``exporter``: "dynamo" (torch's default exporter), "legacy" (TorchScript,
    dynamo=False), or "auto" (dynamo first, legacy if that raises).
    ``opset`` defaults to 18 for dynamo and 17 for legacy.  The batch axis is
    dynamic ("N"); the file holds the weights inline (no external data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(EXAMPLE_BATCH, *input_shape, generator=gen)

    if exporter == "legacy":
        order = [("legacy", _export_legacy)]
    elif exporter == "dynamo":
        order = [("dynamo", _export_dynamo)]
    elif exporter == "auto":
        order = [("dynamo", _export_dynamo), ("legacy", _export_legacy)]
    else:
        raise ValueError(f"unknown exporter {exporter!r}")

    errors = []
    for kind, fn in order:
        try:
            with torch.no_grad():
                default = DYNAMO_OPSET if kind == "dynamo" else LEGACY_OPSET
                fn(module, example, path, opset or default)
            _USED_EXPORTER[str(path)] = kind
            return path
        except Exception as e:  # pragma: no cover - depends on torch version
            errors.append(f"{kind}: {type(e).__name__}: {e}")
    raise RuntimeError("ONNX export failed:\n" + "\n".join(errors))


def _make_exporter(name: str) -> Callable[[str | Path], tuple[Path, tuple[int, ...]]]:
    def export(folder: str | Path, exporter: str = "auto") -> tuple[Path, tuple[int, ...]]:
        shape = INPUT_SHAPES[name]
        path = export_module(build_module(name), shape, Path(folder) / f"{name}.onnx", exporter=exporter)
        return path, shape

    export.__name__ = f"export_{name}"
    export.__doc__ = f"Export torch model {name!r} into ``folder``; returns (path, input shape w/o batch)."
    return export


TORCH_MODELS: dict[str, Callable[[str | Path], tuple[Path, tuple[int, ...]]]] = {
    name: _make_exporter(name) for name in _MODULES
}
