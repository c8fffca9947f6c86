"""Every ONNX op case (tests/onnx_cases.py) against onnxruntime, on every device."""

import numpy as np
import onnxruntime as ort
import pytest

import offload
from conftest import as_tuple, assert_close
from onnx_cases import CASES



@pytest.fixture(scope="module")
def sessions():
    cache = {}

    def get(case):
        if case.name not in cache:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            cache[case.name] = ort.InferenceSession(case.model.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])
        return cache[case.name]
    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_matches_onnxruntime(case, device, sessions):
    model = offload.load(case.model, device=device)
    for batch in (1, 3, 16):
        feeds = case.make_inputs(batch, np.random.default_rng(batch))
        want = sessions(case).run(None, feeds)
        got = as_tuple(model(feeds))
        assert len(got) == len(want)
        for k, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, "float32", f"{case.name} batch {batch} output {k}")
