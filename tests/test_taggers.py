"""Graph and transformer jet taggers (tests/tagger_models.py) exported by both of torch's
exporters, against onnxruntime on the same file, on every device: batches 1, 3 and 160 with a
different particle count at each call (plans per input shapes), padded particles masked."""

import numpy as np
import onnxruntime as ort
import pytest

import offload

torch = pytest.importorskip("torch", reason="PyTorch is a test dependency (pip install torch)")
import tagger_models as TM  # noqa: E402

EXPORTERS = ("legacy", "dynamo")
CALLS = ((1, 17), (3, 50), (160, 33), (3, 24))  # (batch, particles), in this order


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taggers")
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            path = TM.export(name, folder / f"{name}-{exporter}.onnx", exporter)
            cache[name, exporter] = (path, ort.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]))
        return cache[name, exporter]
    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", TM.MODELS)
def test_tagger_matches_onnxruntime(name, exporter, device, exported):
    path, session = exported(name, exporter)
    model = offload.load(path, device=device)
    for batch, particles in CALLS:
        feeds = TM.make_inputs(batch, particles, np.random.default_rng(batch * 100 + particles))
        want = session.run(None, feeds)[0]
        got = model(feeds)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=(
            f"{name} ({exporter}) on {device} at batch {batch}, P = {particles}"))


def test_padding_does_not_change_a_masked_tagger(exported):
    """The same events padded to more particles give the same scores (what bucketing relies
    on): ParticleNet pushes padded particles away, ParT masks them out of attention."""
    for name in TM.MODELS:
        path, _ = exported(name, "legacy")
        model = offload.load(path)
        feeds = TM.make_inputs(4, 20, np.random.default_rng(5))
        padded = {k: np.concatenate([v, np.zeros(v.shape[:2] + (12,), v.dtype)], axis=2)
                  for k, v in feeds.items()}
        np.testing.assert_allclose(model(padded), model(feeds), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_too_few_particles_for_knn_is_a_typed_error(exported):
    path, _ = exported("particlenet", "legacy")
    model = offload.load(path)
    feeds = TM.make_inputs(2, 5, np.random.default_rng(0))  # k + 1 = 9 neighbours > 5
    with pytest.raises(offload.ShapeError, match=r"TopK node .*k = 9 .* has 5 elements"):
        model(feeds)


def test_mismatched_particle_axes_are_a_typed_error(exported):
    path, _ = exported("particlenet", "legacy")
    model = offload.load(path)
    feeds = TM.make_inputs(2, 20, np.random.default_rng(0))
    feeds["mask"] = feeds["mask"][:, :, :19]
    with pytest.raises(offload.ShapeError, match=r"node .*\[2, 7, 20\].*\[2, 1, 19\]|"
                                                 r"\[2, 1, 19\].*\[2, 7, 20\]|do not broadcast"):
        model(feeds)


def test_attention_softmax_and_gelu_are_fused(device, exported):
    """In the ParT-like tagger (legacy export) the plan fuses softmax(scores / c + bias) into
    one softmax step and the written-out GELU (Div, Erf, Add, Mul, Mul) into one gelu step on
    every device that runs it, and still matches onnxruntime."""
    path, session = exported("part", "legacy")
    model = offload.load(path, device=device)
    feeds = TM.make_inputs(3, 20, np.random.default_rng(7))
    np.testing.assert_allclose(model(feeds), session.run(None, feeds)[0], rtol=1e-4, atol=1e-4)
    plan = model.plan(*[feeds[k].shape for k in TM.INPUTS])
    fused_softmax = [s for s, (attrs, *_) in zip(plan.steps, plan._step_args)
                     if s.node.op == "softmax" and "scale" in attrs]
    gelu = [s for s in plan.steps if s.node.attrs.get("fn") == "gelu"]
    erf = [s for s in plan.steps if s.node.attrs.get("fn") == "erf"]
    assert len(fused_softmax) == 3 and len(gelu) >= 3 and not erf


def test_particlenet_centre_features_are_read_through_on_cpu(exported):
    """ParticleNet's centre features, tiled over the k neighbours ([N, C, P, 1] -> [N, C, P, k]),
    are not materialised on the cpu device: Sub broadcasts the untiled tensor and Concat copies
    it broadcast into its part (fusions._elide_expands); the tagger still matches."""
    path, session = exported("particlenet", "legacy")
    model = offload.load(path, device="cpu")
    feeds = TM.make_inputs(3, 20, np.random.default_rng(8))
    np.testing.assert_allclose(model(feeds), session.run(None, feeds)[0], rtol=1e-4, atol=1e-4)
    plan = model.plan(*[feeds[k].shape for k in TM.INPUTS])
    assert not [s for s in plan.steps if s.node.op == "tile"]
