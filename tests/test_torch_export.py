"""Models exported from PyTorch (both exporters) on every device, against PyTorch itself and
onnxruntime on the same file."""

import numpy as np
import onnxruntime as ort
import pytest

import offload
from conftest import assert_close

torch = pytest.importorskip("torch", reason="PyTorch is a test dependency (pip install torch)")
from torch_models import INPUT_SHAPES, build_module, export_module  # noqa: E402

EXPORTERS = ("dynamo", "legacy")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torch")
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            path = folder / f"{name}-{exporter}.onnx"
            export_module(build_module(name), INPUT_SHAPES[name], path, exporter=exporter)
            cache[name, exporter] = path
        return cache[name, exporter]
    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(INPUT_SHAPES))
def test_torch_export_matches(name, exporter, device, exported):
    path = exported(name, exporter)
    model = offload.load(path, device=device)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = build_module(name)
    for batch in (1, 3, 16):
        x = np.random.default_rng(batch).standard_normal((batch,) + INPUT_SHAPES[name]) \
            .astype(np.float32)
        got = model(x)
        assert_close(got, session.run(None, {"x": x})[0], "float32",
                     f"{name} ({exporter}) batch {batch} vs onnxruntime")
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        assert_close(got, want, "float32", f"{name} ({exporter}) batch {batch} vs torch")
