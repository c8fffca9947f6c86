"""Chains of dense layers run as one fused step on the cpu device (fusions._fuse_dense_chain,
drivers/cpu.py build_dense -> _core.DenseChain): the same results as the layers one by one
(1e-5) for every activation, batch 1 and odd batches; no fusion where an intermediate is read
by another node or is a graph output, for a fused residual, in fixed point, or on a device
whose dense builder does not take chains."""

import numpy as np
import pytest

import offload
from offload import fusions, zoo
from offload import graph as G
from offload.drivers import cpu
from offload.model import Model

ACTS = [dict(activation="identity"), dict(activation="relu"),
        dict(activation="leaky_relu", alpha=0.2), dict(activation="sigmoid"),
        dict(activation="tanh"), dict(activation="clip", lo=-0.5, hi=0.75)]
WIDE = [256, 200, 64, 33, 5]  # wide enough to be fused at batch 1 (cpu._chain_fits)


def _mlp(dims, acts, extra_nodes=(), extra_outputs=(), seed=0):
    """x -> fc0 -> fc1 -> ... -> y, every second layer without a bias."""
    rng = np.random.default_rng(seed)
    nodes, consts, src = [], {}, "x"
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        consts[f"w{i}"] = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        inputs = [src, f"w{i}"]
        if i % 2 == 0:
            consts[f"b{i}"] = (0.3 * rng.standard_normal(n)).astype(np.float32)
            inputs.append(f"b{i}")
        out = "y" if i == len(dims) - 2 else f"h{i}"
        nodes.append(G.Node("dense", inputs, [out], dict(acts[i % len(acts)]), f"fc{i}"))
        src = out
    return G.Graph(nodes + list(extra_nodes), [G.TensorInfo("x", ("N", dims[0]))],
                   ["y"] + list(extra_outputs), consts)


def _unfused(monkeypatch):
    monkeypatch.delattr(cpu.OPS["dense"], "fused_chain")


def _steps(model):
    """The node names of every plan the model made."""
    return [[s.node.name for s in plan.steps] for plans in model._plans.values()
            for plan in plans]


def _run_both(graph, x, monkeypatch):
    fused = Model(graph, offload.device("cpu"))
    got = fused(x)
    with monkeypatch.context() as m:
        _unfused(m)
        unfused = Model(graph, offload.device("cpu"))
        want = unfused(x)
    return fused, got, unfused, want


@pytest.mark.parametrize("batch", [1, 2, 7, 13, 97, 1001])
@pytest.mark.parametrize("first", range(len(ACTS)))
def test_fused_chain_matches_the_layers_one_by_one(batch, first, monkeypatch):
    acts = ACTS[first:] + ACTS[:first]  # every activation at every position
    graph = _mlp(WIDE, acts, seed=first)
    x = np.random.default_rng(batch).standard_normal((batch, WIDE[0])).astype(np.float32)
    fused, got, unfused, want = _run_both(graph, x, monkeypatch)
    assert _steps(fused) == [["fc0+fc1+fc2+fc3"]]
    assert _steps(unfused) == [["fc0", "fc1", "fc2", "fc3"]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rank3_input_and_the_model_splitting_a_call(monkeypatch):
    """Rows of a [B, T, C] input; predict() in several runs of a smaller plan."""
    rng = np.random.default_rng(5)
    graph = _mlp(WIDE, ACTS)
    graph.inputs = [G.TensorInfo("x", ("N", 3, WIDE[0]))]
    x = rng.standard_normal((37, 3, WIDE[0])).astype(np.float32)
    fused, got, _, want = _run_both(graph, x, monkeypatch)
    assert ["fc0+fc1+fc2+fc3"] in _steps(fused)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.predict(x, batch_size=8), want, rtol=1e-5, atol=1e-5)


def test_small_products_stay_with_the_merged_program(monkeypatch):
    """jet_mlp at batch 1 (4 256 multiply-adds): one call of the small-op program already."""
    graph = _mlp([16, 64, 32, 32, 5], [ACTS[1]] * 3 + [ACTS[0]])
    model = Model(graph, offload.device("cpu"))
    model(np.ones((1, 16), np.float32))
    assert _steps(model) == [["fc0", "fc1", "fc2", "fc3"]]
    model(np.ones((256, 16), np.float32))
    assert ["fc0+fc1+fc2+fc3"] in _steps(model)


def test_an_intermediate_read_elsewhere_is_not_fused(monkeypatch):
    """h1 is also read by an add: the chain ends with the layer writing it (fc0+fc1) and
    starts again after it (fc2+fc3+fc4); h2 is a graph output: the chain ends at fc2 (and
    fc3 -> fc4 at 50 rows is too small to be worth a chain)."""
    add = G.Node("add", ["h1", "h1"], ["z"], {}, "twice")
    graph = _mlp(WIDE + [7], ACTS, extra_nodes=[add], extra_outputs=["z"])
    x = np.random.default_rng(1).standard_normal((50, WIDE[0])).astype(np.float32)
    fused, got, _, want = _run_both(graph, x, monkeypatch)
    assert _steps(fused) == [["fc0+fc1", "twice", "fc2+fc3+fc4"]] or \
        _steps(fused) == [["fc0+fc1", "fc2+fc3+fc4", "twice"]]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

    graph = _mlp(WIDE + [7], ACTS, extra_outputs=["h2"])
    fused, got, _, want = _run_both(graph, x, monkeypatch)
    assert _steps(fused) == [["fc0+fc1+fc2", "fc3", "fc4"]]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_a_fused_residual_ends_no_chain_it_is_in(monkeypatch):
    """A layer with a residual operand (fuse_residual) is not a layer of a chain."""
    graph = _mlp(WIDE, ACTS)
    res = graph.nodes[2]  # fc2: 64 -> 33, adding a 200 -> 33 layer of h0 as a residual
    graph.constants["wr"] = np.full((200, 33), 0.01, np.float32)
    graph.nodes.insert(2, G.Node("dense", ["h0", "wr"], ["r"], dict(ACTS[0]), "side"))
    res.inputs = [res.inputs[0], res.inputs[1], "b2", "r"]
    res.attrs = dict(res.attrs, residual=True)
    x = np.random.default_rng(2).standard_normal((40, WIDE[0])).astype(np.float32)
    fused, got, _, want = _run_both(graph, x, monkeypatch)
    assert _steps(fused) == [["fc0", "fc1", "side", "fc2", "fc3"]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_zoo_mlps_are_fused_at_large_batches():
    for name, fused in [("jet_mlp", "fc1+fc2+fc3+fc4"),
                        ("hcal_mlp", "+".join(f"dense_{i}.matmul" for i in range(1, 8)))]:
        model = offload.load(name)
        x = zoo.sample_input(name, 300)
        model(x)
        assert any(fused in steps for steps in _steps(model)), _steps(model)


def test_fixed_point_layers_are_not_fused():
    model = offload.load("jet_mlp", precision="ap_fixed<16,6>")
    model(zoo.sample_input("jet_mlp", 300))
    assert not any("+" in name for steps in _steps(model) for name in steps), _steps(model)


def test_other_devices_see_no_chain():
    """The fusion asks the device's dense builder: without ``fused_chain`` nothing changes."""
    graph = _mlp(WIDE, ACTS)
    entries = [(n, dict(n.attrs, node=n.name), [i for i in n.inputs if i],
                (9, n.inputs and graph.constants[n.inputs[1]].shape[1]))
               for n in graph.nodes]
    shapes = {"x": (9, WIDE[0])}
    shapes.update({n.outputs[0]: e[3] for n, e in zip(graph.nodes, entries)})
    assert fusions._fuse_dense_chain(entries, shapes, ["y"], None) == entries
    assert fusions._fuse_dense_chain(entries, shapes, ["y"], {"dense": lambda *a: None}) == \
        entries
    fused = fusions._fuse_dense_chain(entries, shapes, ["y"], cpu.OPS)
    assert [e[0].name for e in fused] == ["fc0+fc1+fc2+fc3"]


def test_chains_too_wide_for_the_cache_are_cut():
    """cpu._chain_fits: a layer over CHAIN_MAX_WIDTH columns, or weights over
    CHAIN_MAX_WEIGHTS, starts a new chain."""
    assert cpu._chain_fits(1000, [(16, 64), (64, 32)])
    assert not cpu._chain_fits(1, [(16, 64), (64, 32)])  # 3 072 multiply-adds: the program's
    assert not cpu._chain_fits(1000, [(16, cpu.CHAIN_MAX_WIDTH + 1), (cpu.CHAIN_MAX_WIDTH + 1, 8)])
    assert not cpu._chain_fits(1000, [(1024, 1024), (1024, 16)])


def test_the_builder_falls_back_to_the_layers_for_arrays_it_cannot_take():
    """A strided x (no plan makes one today): the layers one by one through scratch buffers."""
    from offload.plan import BuildContext
    rng = np.random.default_rng(4)
    graph = _mlp([20, 40, 30, 6], ACTS[1:])
    ws = [graph.constants[f"w{i}"] for i in range(3)]
    bs = [graph.constants.get(f"b{i}") for i in range(3)]
    attrs = {"chain": tuple(dict(n.attrs, node=n.name) for n in graph.nodes),
             "counts": (2, 1, 2), "node": "fc0+fc1+fc2"}
    ctx = BuildContext(offload.device("cpu"), {})
    big = rng.standard_normal((33, 40)).astype(np.float32)
    x = big[:, ::2]
    out = np.empty((33, 6), np.float32)
    run = cpu.build_dense(ctx, attrs, [x, ws[0], bs[0], ws[1], ws[2], bs[2]], out)
    run()
    want = np.empty_like(out)
    cpu.build_dense(ctx, attrs, [np.ascontiguousarray(x), ws[0], bs[0], ws[1], ws[2], bs[2]],
                    want)()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
