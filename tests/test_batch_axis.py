"""Where the batch axis goes (batch_axis.batch_mixing_node): the real taggers, whose batch moves off
axis 0 (ParT's attention heads, DeepJet's time-major LSTMs) or is flattened into a gather
(ParticleNet's neighbours), are merged by the in-process batcher with each caller's results
unchanged; graphs that really mix samples are still refused with the node named."""

import threading

import numpy as np
import pytest
from onnx import TensorProto, helper

import offload
from offload import batch_axis as PL
from conftest import full_on

torch = pytest.importorskip("torch", reason="PyTorch is a test dependency (pip install torch)")
import recurrent_models as RM  # noqa: E402
import tagger_models as TM  # noqa: E402

MODELS = ("particlenet", "part", "deepjet")
EXPORTERS = ("legacy", "dynamo")
PARTICLES = 20


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch_axis")
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            path = folder / f"{name}-{exporter}.onnx"
            if name == "deepjet":
                RM.deepjet(path, exporter)
            else:
                TM.export(name, path, exporter)
            cache[name, exporter] = path
        return cache[name, exporter]
    return get


def feeds(name, rows, seed):
    rng = np.random.default_rng(seed)
    if name == "deepjet":
        return RM.make_inputs(rows, rng)
    return TM.make_inputs(rows, PARTICLES, rng)


def samples(name):
    f = feeds(name, 1, 0)
    return tuple(v.shape[1:] for v in f.values())


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", MODELS)
def test_taggers_are_batchable(name, exporter, exported):
    """None for every tagger (ParT by the dynamo exporter raised KeyError('val_21') here: a
    constant first operand)."""
    model = offload.load(exported(name, exporter))
    assert PL.batch_mixing_node(model.graph, samples(name)) is None


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", MODELS)
def test_merged_requests_equal_unbatched_calls(name, exporter, device, exported, request):
    """Requests of 1-3 rows submitted from several threads at once are merged (fewer device
    runs than requests), and each result equals the same model called on that request alone."""
    if not full_on(request.config, device) and (name, exporter) != ("deepjet", "legacy"):
        pytest.skip(f"slow on {device.spec}: one model only (--emulation-full runs all)")
    path = exported(name, exporter)
    plain = offload.load(path, device=device)
    batched = offload.load(path, device=device,
                           batching=offload.Batching(max_batch=8, max_delay_us=200_000))
    threads, per_thread = 3, 3
    asks = [[feeds(name, 1 + (t + k) % 3, 10 * t + k) for k in range(per_thread)]
            for t in range(threads)]
    futures = [[None] * per_thread for _ in range(threads)]
    start = threading.Barrier(threads)

    def client(t):
        start.wait()
        for k, f in enumerate(asks[t]):
            futures[t][k] = batched.submit(f)
    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for t in range(threads):
        for k in range(per_thread):
            got, want = futures[t][k].result(timeout=300), plain(asks[t][k])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=(
                f"{name} ({exporter}) on {device.spec}: request {k} of thread {t}"))
    stats = batched.stats
    assert stats["calls"] == threads * per_thread
    assert stats["device_runs"] < stats["calls"]  # requests were merged
    batched.close()


# ------------------------------------------------------------------ graphs that mix samples

def one_node_graph(nodes, x_shape, y_shape, initializers=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def axes(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


MIXING = {
    "reduce_over_batch": (
        [helper.make_node("ReduceSum", ["x", "ax"], ["y"], name="sum_rows", keepdims=1)],
        ["N", 4], [1, 4], [axes("ax", [0])], "ReduceSum node 'sum_rows'"),
    "softmax_over_batch": (
        [helper.make_node("Softmax", ["x"], ["y"], name="soft_rows", axis=0)],
        ["N", 4], ["N", 4], [], "Softmax node 'soft_rows'"),
    "transpose_then_merge": (
        [helper.make_node("Transpose", ["x"], ["t"], name="swap", perm=[1, 0, 2]),
         helper.make_node("Reshape", ["t", "shape"], ["y"], name="merge")],
        ["N", 4, 3], [None, 3], [axes("shape", [-1, 3])], "Reshape node 'merge'"),
    "contract_over_batch": (  # x^T @ x
        [helper.make_node("Transpose", ["x"], ["t"], name="xt", perm=[1, 0]),
         helper.make_node("MatMul", ["t", "x"], ["y"], name="gram")],
        ["N", 4], [4, 4], [], "MatMul node 'gram'"),
    "range_over_batch": (  # x + arange(N)[:, None]: a constant made from the batch size
        [helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
         helper.make_node("Squeeze", ["s"], ["n"]),
         helper.make_node("Range", ["zero", "n", "one"], ["r"]),
         helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["rf", "ax"], ["col"]),
         helper.make_node("Add", ["x", "col"], ["y"], name="add_row_number")],
        ["N", 4], ["N", 4],
        [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
         helper.make_tensor("one", TensorProto.INT64, [], [1]), axes("ax", [1])],
        "Add node 'add_row_number'"),
}


@pytest.mark.parametrize("case", sorted(MIXING))
def test_graphs_that_mix_samples_are_refused(case):
    nodes, x_shape, y_shape, inits, named = MIXING[case]
    data = one_node_graph(nodes, x_shape, y_shape, inits)
    model = offload.load(data)
    assert PL.batch_mixing_node(model.graph, (tuple(x_shape[1:]),)) == named
    with pytest.raises(offload.ModelFormatError, match="cannot be batched: " + named):
        offload.load(data, batching=offload.Batching())


def test_batch_moved_and_moved_back_is_merged():
    """x [N, T, C] made time-major, summed over time: the batch moves to axis 1 and back."""
    data = one_node_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
         helper.make_node("ReduceSum", ["t", "ax"], ["y"], keepdims=0)],
        ["N", 5, 3], ["N", 3], [axes("ax", [0])])
    model = offload.load(data, batching=offload.Batching(max_batch=8, max_delay_us=100_000))
    xs = [np.random.default_rng(k).standard_normal((1 + k % 3, 5, 3)).astype(np.float32)
          for k in range(6)]
    futures = [model.submit(x) for x in xs]
    for x, f in zip(xs, futures):
        np.testing.assert_allclose(f.result(timeout=30), x.sum(axis=1), rtol=1e-5, atol=1e-6)
    assert model.stats["device_runs"] < len(xs)
    model.close()


def flat_gather(step, output="rows"):
    """x [N, 5, 3]: the 2 rows of each sample with the largest sums, gathered ParticleNet's way
    from x flattened to [N * 5, 3] at TopK's indices + arange(N) * ``step``; output="offsets":
    those indices themselves, as floats."""
    ints = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)  # noqa: E731
    nodes = [
        helper.make_node("ReduceSum", ["x", "last"], ["score"], keepdims=0),
        helper.make_node("TopK", ["score", "k"], ["top", "idx"], axis=1),
        helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
        helper.make_node("Squeeze", ["s"], ["n"]),
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("Mul", ["r", "step"], ["base"]),
        helper.make_node("Unsqueeze", ["base", "col"], ["base2"]),
        helper.make_node("Add", ["idx", "base2"], ["at"], name="offsets"),
        helper.make_node("Reshape", ["at", "flat"], ["at1"]),
        helper.make_node("Reshape", ["x", "to_rows"], ["x2"]),
    ]
    if output == "rows":
        nodes += [helper.make_node("Gather", ["x2", "at1"], ["g"], axis=0, name="pick"),
                  helper.make_node("Reshape", ["g", "back"], ["y"])]
        y_shape = ["N", 2, 3]
    else:
        nodes += [helper.make_node("Cast", ["at"], ["y"], to=TensorProto.FLOAT, name="as_float")]
        y_shape = ["N", 2]
    inits = [ints("last", [2]), ints("k", [2]), ints("col", [1]), ints("flat", [-1]),
             ints("to_rows", [-1, 3]), ints("back", [-1, 2, 3]),
             helper.make_tensor("zero", TensorProto.INT64, [], [0]),
             helper.make_tensor("one", TensorProto.INT64, [], [1]),
             helper.make_tensor("step", TensorProto.INT64, [], [step])]
    return one_node_graph(nodes, ["N", 5, 3], y_shape, inits)


def test_a_flattened_batch_gathered_at_its_own_rows_is_merged():
    data = flat_gather(5)
    model = offload.load(data, batching=offload.Batching(max_batch=8, max_delay_us=100_000))
    xs = [np.random.default_rng(k).standard_normal((1 + k % 3, 5, 3)).astype(np.float32)
          for k in range(6)]
    futures = [model.submit(x) for x in xs]
    for x, f in zip(xs, futures):
        top = np.argsort(-x.sum(axis=2), axis=1, kind="stable")[:, :2]
        np.testing.assert_array_equal(f.result(timeout=30),
                                      np.take_along_axis(x, top[:, :, None], axis=1))
    assert model.stats["device_runs"] < len(xs)
    model.close()


@pytest.mark.parametrize("step, output, named", [
    (4, "rows", "Add node 'offsets'"),  # offsets of 4 for 5 rows: samples overlap
    (5, "offsets", "Cast node 'as_float'"),  # the offsets (batch positions) as results
])
def test_row_offsets_are_only_gather_indices(step, output, named):
    model = offload.load(flat_gather(step, output))
    assert PL.batch_mixing_node(model.graph, ((5, 3),)) == named
