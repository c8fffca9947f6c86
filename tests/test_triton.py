"""SONIC mode against a real tritonserver (the nvidia-pytriton 0.7.0 wheel's, in the server
environment that offload.triton.server_env makes: built into ~/.cache/offload on first use).

No mocks: offload-served zoo models and a converted SONIC repository are called with tritonclient
itself (gRPC and HTTP) and compared with in-process offload or onnxruntime; the offload client calls
a Triton Python-backend model written here that does not use offload. Skipped, with the reason,
where tritonclient is missing or the server binary cannot run.
"""

from __future__ import annotations

import concurrent.futures
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import offload
from offload import triton

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed "
                                 "(offload's 'triton' extra)")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402
from tritonclient.utils import shared_memory as shm  # noqa: E402

READY_S = 180.0

PLAIN_MODEL = textwrap.dedent('''
    # A Triton Python-backend model that knows nothing of offload.
    import json
    import time

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            self.slow = json.loads(args["model_config"])["name"] == "slow"

        def execute(self, requests):
            if self.slow:
                time.sleep(1.0)
            responses = []
            for request in requests:
                a = pb_utils.get_input_tensor_by_name(request, "A").as_numpy()
                b = pb_utils.get_input_tensor_by_name(request, "B").as_numpy()
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("SUM", a + b), pb_utils.Tensor("PROD", a * b)]))
            return responses
    ''')

PLAIN_CONFIG = '''
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "A" data_type: TYPE_FP32 dims: [ 4 ] }},
        {{ name: "B" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] }},
         {{ name: "PROD" data_type: TYPE_FP32 dims: [ 4 ] }} ]
dynamic_batching {{ }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
'''

# A CMS-style repository entry (SonicTriton): ONNX Runtime platform, GPU instances, TensorRT
# accelerator, two versions served
SONIC_CONFIG = '''
name: "jet_tagger"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "input" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 5 ] } ]
version_policy: { all { } }
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
instance_group [ { count: 2 kind: KIND_GPU } ]
optimization { execution_accelerators { gpu_execution_accelerator : [ { name : "tensorrt" } ] } }
'''


@pytest.fixture(scope="session")
def server_env():
    """The server environment, made on first use (pip), with a tritonserver that runs here."""
    try:
        env = triton.server_env(create=True)
        binary, env = triton.find_tritonserver(env=env)
    except offload.DeviceUnavailableError as e:
        pytest.skip(f"no tritonserver: {e}")
    probe = triton.Server.__new__(triton.Server)
    probe.binary, probe.env = binary, env
    try:
        done = subprocess.run([str(binary), "--help"], env=probe.environment(),
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"{binary} cannot run here: {e}")
    if done.returncode not in (0, 1) or "model-repository" not in done.stdout + done.stderr:
        pytest.skip(f"{binary} cannot run here (status {done.returncode}): "
                    f"{(done.stderr or done.stdout)[-500:]}")
    return env


def _sonic_repo(root):
    """A SONIC repository holding jet_mlp as versions 1 and 2 (different weights)."""
    folder = root / "jet_tagger"
    for version, seed in (("1", 0), ("2", 1)):
        (folder / version).mkdir(parents=True)
        (folder / version / "model.onnx").write_bytes(
            offload.zoo.build("jet_mlp", seed=seed).SerializeToString())
    (folder / "config.pbtxt").write_text(SONIC_CONFIG)
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    triton.write_repository(root, ["jet_mlp", "jet_cnn"], max_batch=64, delay_us=100)
    triton.convert_repository(root, _sonic_repo(tmp_path_factory.mktemp("sonic")))
    # jet_mlp again, with its feature axis left free in the config: a wrong shape reaches
    # offload inside the server, whose ShapeError comes back as the request's error
    any_dims = root / "jet_mlp_any"
    (any_dims / "1").mkdir(parents=True)
    for f in ("model.onnx", "model.py"):
        (any_dims / "1" / f).write_bytes((root / "jet_mlp" / "1" / f).read_bytes())
    text = (root / "jet_mlp" / "config.pbtxt").read_text()
    (any_dims / "config.pbtxt").write_text(
        text.replace('name: "jet_mlp"', 'name: "jet_mlp_any"').replace("dims: 16", "dims: -1"))
    for name in ("plain", "slow"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text(PLAIN_MODEL)
        (root / name / "config.pbtxt").write_text(PLAIN_CONFIG.format(name=name))
    return root


@pytest.fixture(scope="module")
def server(server_env, repo):
    s = triton.Server(repo, env=server_env)
    s.start(READY_S)
    try:
        yield s
    finally:
        s.stop()
    assert s.process.poll() is not None


def _grpc(server):
    return grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")


def _http(server):
    return httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")


def _raw_infer(module, client, model, arrays, version="", datatype="FP32"):
    inputs = []
    for name, a in arrays.items():
        i = module.InferInput(name, list(a.shape), datatype)
        i.set_data_from_numpy(a)
        inputs.append(i)
    return client.infer(model, inputs, model_version=version)


def _assert_serving(server):
    """A good request still works (the server kept serving)."""
    x = offload.zoo.sample_input("jet_mlp", 2)
    y = _raw_infer(grpcclient, _grpc(server), "jet_mlp", {"input": x}).as_numpy("output")
    np.testing.assert_allclose(y, offload.load("jet_mlp")(x), rtol=1e-5, atol=1e-6)


# -- tritonclient calling offload-served models -------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("name", ["jet_mlp", "jet_cnn"])
def test_tritonclient_on_offload_served_zoo(server, protocol, name):
    module, client = (grpcclient, _grpc(server)) if protocol == "grpc" else \
        (httpclient, _http(server))
    local = offload.load(name)
    for batch in (1, 7):
        x = offload.zoo.sample_input(name, batch, seed=batch)
        y = _raw_infer(module, client, name, {"input": x}).as_numpy("output")
        assert y.shape == offload.zoo.output_shape(name, batch)
        np.testing.assert_allclose(y, local(x), rtol=1e-5, atol=1e-6)
    client.close()


def test_concurrent_requests_merge_into_device_runs(server):
    """Requests sent together come back each with its own rows, and Triton's statistics show
    fewer executions (device runs) than requests."""
    client = _grpc(server)
    before = client.get_inference_statistics("jet_mlp", as_json=True)["model_stats"][0]
    local = offload.load("jet_mlp")
    xs = [offload.zoo.sample_input("jet_mlp", 1 + k % 3, seed=k) for k in range(48)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ys = list(pool.map(lambda x: _raw_infer(grpcclient, _grpc(server), "jet_mlp",
                                                {"input": x}).as_numpy("output"), xs))
    for x, y in zip(xs, ys):
        np.testing.assert_allclose(y, local(x), rtol=1e-5, atol=1e-6)
    after = client.get_inference_statistics("jet_mlp", as_json=True)["model_stats"][0]
    requests = int(after["inference_stats"]["success"]["count"]) - \
        int(before["inference_stats"]["success"].get("count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert requests == 48
    assert 1 <= executions <= 48


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_converted_sonic_repository(server, protocol, repo):
    import onnxruntime as ort
    module, client = (grpcclient, _grpc(server)) if protocol == "grpc" else \
        (httpclient, _http(server))
    config = client.get_model_config("jet_tagger", "1", **(
        {"as_json": True} if protocol == "grpc" else {}))
    config = config["config"] if protocol == "grpc" else config
    # names, batch size and batching kept; served by the python backend on CPU instances
    assert config["backend"] == "python" and int(config["max_batch_size"]) == 16
    assert [int(b) for b in config["dynamic_batching"]["preferred_batch_size"]] == [4, 8]
    assert [i["name"] for i in config["input"]] == ["input"]
    assert [(g["kind"], int(g["count"])) for g in config["instance_group"]] == [("KIND_CPU", 2)]
    x = offload.zoo.sample_input("jet_mlp", 5)
    outs = []
    for version in ("1", "2"):
        session = ort.InferenceSession(str(repo / "jet_tagger" / version / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        want = session.run(None, {"input": x})[0]
        y = _raw_infer(module, client, "jet_tagger", {"input": x}, version).as_numpy("output")
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
        outs.append(y)
    assert not np.allclose(outs[0], outs[1])  # the two versions are two models


def test_convert_refuses_other_platforms(tmp_path):
    src = tmp_path / "src"
    (src / "tf_model" / "1").mkdir(parents=True)
    (src / "tf_model" / "config.pbtxt").write_text('name: "tf_model"\n'
                                                   'platform: "tensorflow_savedmodel"\n')
    with pytest.raises(offload.ModelFormatError, match="tf_model.*tensorflow_savedmodel"):
        triton.convert_repository(tmp_path / "out", src)
    (src / "tf_model" / "config.pbtxt").write_text("name: [not text format")
    with pytest.raises(offload.ModelFormatError, match="config.pbtxt"):
        triton.convert_repository(tmp_path / "out", src)


# -- the offload client ------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_offload_client_on_plain_triton_model(server, protocol):
    """Dict inputs, several outputs, submit, infer_async, predict, stats, close."""
    url = (server.grpc_url if protocol == "grpc" else server.http_url) + "/plain"
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 4), dtype=np.float32)
    with offload.load(url) as model:
        assert [t.name for t in model.inputs] == ["A", "B"] and model.outputs == ["SUM", "PROD"]
        s, p = model({"B": b, "A": a})
        np.testing.assert_array_equal(s, a + b)
        np.testing.assert_array_equal(p, a * b)
        s, p = model(a, b)
        np.testing.assert_array_equal(s, a + b)
        futures = [model.submit(A=a[k:k + 1], B=b[k:k + 1]) for k in range(3)]
        np.testing.assert_array_equal(np.concatenate([f.result(60)[0] for f in futures]), a + b)
        import asyncio
        s, _ = asyncio.run(model.infer_async(a, b))
        np.testing.assert_array_equal(s, a + b)
        big_a, big_b = rng.standard_normal((2, 21, 4), dtype=np.float32)  # > max_batch_size 8
        s, p = model(big_a, big_b)
        np.testing.assert_array_equal(p, big_a * big_b)
        with pytest.raises(offload.ShapeError, match="'A'.*expected shape"):
            model(a[:, :3], b)
        with pytest.raises(offload.ShapeError, match="missing"):
            model({"A": a})
        stats = model.stats
        # bad input is refused before it is sent: 7 calls, the one of 21 rows as 3 requests
        assert stats["calls"] == 7 and stats["requests"] == 9 and stats["errors"] == 0
        assert stats["bytes_sent"] == (3 + 3 + 3 + 3 + 21) * 2 * 4 * 4  # rows x (A, B) x 4 x 4
        assert stats["server_requests"] >= 9 and stats["server_compute_s"] > 0
    with pytest.raises(offload.OffloadError, match="closed"):
        model.submit(a, b)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("name", ["jet_mlp", "jet_cnn"])
def test_offload_client_shared_memory_on_and_off(server, protocol, name):
    url = (server.grpc_url if protocol == "grpc" else server.http_url) + "/" + name
    x = offload.zoo.sample_input(name, 9)
    want = offload.load(name)(x)
    results = {}
    for shared in (False, True):
        with offload.load(url, shared_memory=shared) as model:
            results[shared] = model(x)
            futures = [model.submit(x[k:k + 1]) for k in range(9)]
            np.testing.assert_allclose(np.concatenate([f.result(60) for f in futures]), want,
                                       rtol=1e-5, atol=1e-6)
            stats = model.stats
            if shared:
                assert stats["shm_bytes"] > 0 and stats["bytes_sent"] == 0
                regions = _grpc(server).get_system_shared_memory_status(as_json=True)
                assert any(n.startswith("offload_") for n in regions.get("regions", {}))
            else:
                assert stats["shm_bytes"] == 0 and stats["bytes_sent"] == 18 * x[0].nbytes
        np.testing.assert_allclose(results[shared], want, rtol=1e-5, atol=1e-6)
    # close() unregistered every region of ours on the server
    regions = _grpc(server).get_system_shared_memory_status(as_json=True).get("regions", {})
    assert not [n for n in regions if n.startswith(f"offload_{os.getpid()}_")]


def test_offload_client_grpc_compression(server):
    x = offload.zoo.sample_input("jet_cnn", 4)
    for algorithm in ("gzip", "deflate"):
        with offload.load(server.grpc_url + "/jet_cnn", compression=algorithm) as model:
            np.testing.assert_allclose(model(x), offload.load("jet_cnn")(x), rtol=1e-5,
                                       atol=1e-6)
    with pytest.raises(ValueError, match="compression"):
        offload.load(server.grpc_url + "/jet_cnn", compression="zstd")


def test_offload_client_typed_errors(server):
    with pytest.raises(offload.ModelFormatError, match="no ready model 'nope'.*jet_mlp"):
        offload.load(server.grpc_url + "/nope")
    with pytest.raises(offload.ModelFormatError, match="version 9"):
        offload.load(server.http_url + "/jet_mlp/9")
    closed = f"grpc://127.0.0.1:{triton.free_port()}/jet_mlp"
    with pytest.raises(offload.DeviceUnavailableError, match="unavailable"):
        offload.load(closed)
    with pytest.raises(offload.DeviceUnavailableError, match="unavailable"):
        offload.load(closed.replace("grpc", "http"))
    with pytest.raises(ValueError, match="grpc://HOST:PORT/MODEL"):
        offload.load("grpc://127.0.0.1/jet_mlp")
    with pytest.raises(TypeError, match="shared_memory"):
        offload.load("jet_mlp", shared_memory=True)
    # a wrong shape that the config lets through reaches offload in the server
    with offload.load(server.grpc_url + "/jet_mlp_any") as model:
        with pytest.raises(offload.ShapeError, match="offload: ShapeError.*16"):
            model(np.zeros((2, 17), np.float32))
        np.testing.assert_allclose(model(offload.zoo.sample_input("jet_mlp", 2)),
                                   offload.load("jet_mlp")(offload.zoo.sample_input("jet_mlp", 2)),
                                   rtol=1e-5, atol=1e-6)
    with offload.load(server.grpc_url + "/jet_mlp") as model:
        with pytest.raises(offload.ShapeError, match="dtype float32.*int32"):
            model(np.zeros((2, 16), np.int32))
    # a timeout is its own error, and no retry hides it
    with offload.load(server.grpc_url + "/slow", timeout=0.2, retries=0) as model:
        with pytest.raises(offload.RequestTimeoutError, match="in time"):
            model(np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32))
        assert isinstance(offload.RequestTimeoutError("x"), TimeoutError)
    _assert_serving(server)


def test_list_of_urls_and_fallback(server):
    down = f"grpc://127.0.0.1:{triton.free_port()}/jet_mlp"
    x = offload.zoo.sample_input("jet_mlp", 3)
    want = offload.load("jet_mlp")(x)
    with offload.load([down, server.grpc_url + "/jet_mlp"], retries=1) as model:
        for _ in range(3):
            np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-6)
        # the server that did not answer at load is tried last
        assert model.stats["errors"] == 0 and model.stats["fallbacks"] == 0
        assert [e.url for e in model._order()] == [server.grpc_url + "/jet_mlp", down]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with offload.load(down, fallback="cpu", retries=0) as model:
            for _ in range(3):
                np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-6)
            stats = model.stats
    assert stats["fallbacks"] == 3 and stats["servers_answering"] == 0
    assert len([w for w in caught if "fallback='cpu'" in str(w.message)]) == 1
    with pytest.raises(ValueError, match="fallback_source"):
        offload.load(server.grpc_url + "/plain", fallback="cpu")


# -- bad input, raw tritonclient: clear errors, the server keeps serving -----------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_requests_get_clear_errors(server, protocol):
    module, client = (grpcclient, _grpc(server)) if protocol == "grpc" else \
        (httpclient, _http(server))
    x = offload.zoo.sample_input("jet_mlp", 2)
    cases = [
        ("shape", dict(model="jet_mlp", arrays={"input": np.zeros((2, 17), np.float32)})),
        ("FP64", dict(model="jet_mlp", arrays={"input": x.astype(np.float64)},
                      datatype="FP64")),
        ("unknown model", dict(model="nope", arrays={"input": x})),
        ("version", dict(model="jet_mlp", arrays={"input": x}, version="9")),
        ("batch", dict(model="jet_mlp", arrays={"input": np.zeros((65, 16), np.float32)})),
    ]
    for words, case in cases:
        with pytest.raises(InferenceServerException) as e:
            _raw_infer(module, client, case["model"], case["arrays"], case.get("version", ""),
                       case.get("datatype", "FP32"))
        assert words.lower() in e.value.message().lower(), (words, e.value.message())
        _assert_serving(server)
    # a shared-memory region too small for the tensor
    name, key = f"small_{protocol}_{os.getpid()}", f"/small_{protocol}_{os.getpid()}"
    handle = shm.create_shared_memory_region(name, key, 64)
    client.register_system_shared_memory(name, key, 64)
    try:
        big = np.zeros((4, 16), np.float32)  # 256 bytes
        i = module.InferInput("input", list(big.shape), "FP32")
        i.set_shared_memory(name, big.nbytes)
        with pytest.raises(InferenceServerException) as e:
            client.infer("jet_mlp", [i])
        assert "shared memory" in e.value.message().lower() or \
            "shm" in e.value.message().lower(), e.value.message()
    finally:
        client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(handle)
    _assert_serving(server)
    client.close()


# -- a server that dies under load -------------------------------------------------------------------
def test_server_killed_in_the_middle_of_1000_requests(server_env, tmp_path):
    triton.write_repository(tmp_path / "repo", ["jet_mlp"], max_batch=64, delay_us=100)
    s = triton.Server(tmp_path / "repo", env=server_env).start(READY_S)
    local = offload.load("jet_mlp")
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((1000, 1, 16), dtype=np.float32)
    want = local(xs[:, 0])
    try:
        url = s.grpc_url + "/jet_mlp"
        kept = offload.load(url, fallback="cpu", retries=1, timeout=10.0)
        plain = offload.load(url, retries=1, timeout=10.0)
        resolved = [0] * 1000
        lock = threading.Lock()

        def count(k):
            def done(_):
                with lock:
                    resolved[k] += 1
            return done

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning
            futures = []
            for k in range(1000):
                f = (kept if k % 2 == 0 else plain).submit(xs[k])
                f.add_done_callback(count(k))
                futures.append(f)
                if k == 300:
                    deadline = time.monotonic() + 60
                    while sum(f.done() for f in futures) < 100 and time.monotonic() < deadline:
                        time.sleep(0.005)
                    s.kill()
                    done_at_kill = sum(f.done() for f in futures)
            finished, pending = concurrent.futures.wait(futures, timeout=180)
        assert not pending, f"{len(pending)} futures never resolved"
        assert done_at_kill < 1000
        print(f"done at kill: {done_at_kill}")
        errors = 0
        for k, f in enumerate(futures):
            e = f.exception()
            if e is None:  # its own rows: nothing answered with another request's result
                np.testing.assert_allclose(f.result()[0], want[k], rtol=1e-5, atol=1e-6)
            else:
                assert k % 2 == 1, f"request {k} (fallback='cpu') failed: {e!r}"
                assert isinstance(e, (offload.DeviceUnavailableError,
                                      offload.RequestTimeoutError)), repr(e)
                errors += 1
        assert resolved == [1] * 1000  # each future resolved exactly once
        assert kept.stats["fallbacks"] >= 1 and kept.stats["errors"] == 0
        assert plain.stats["errors"] == errors
        print(f"errors: {errors}, fallbacks: {kept.stats['fallbacks']}, retries: {kept.stats['retries']}")
        kept.close()
        plain.close()
    finally:
        s.stop()


def test_shared_memory_survives_a_server_restart(server_env, tmp_path):
    """The regions a restarted server lost are registered again (one retry), not an error."""
    triton.write_repository(tmp_path / "repo", ["jet_mlp"], max_batch=8, delay_us=0)
    s = triton.Server(tmp_path / "repo", env=server_env).start(READY_S)
    x = offload.zoo.sample_input("jet_mlp", 2)
    want = offload.load("jet_mlp")(x)
    try:
        model = offload.load(s.grpc_url + "/jet_mlp", shared_memory=True, retries=2)
        np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-6)
        s.stop()
        s = triton.Server(tmp_path / "repo", grpc_port=s.grpc_port, http_port=s.http_port,
                          metrics_port=s.metrics_port, env=server_env).start(READY_S)
        np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-6)
        assert model.stats["retries"] >= 1 and model.stats["errors"] == 0
        model.close()
    finally:
        s.stop()


# -- the command line ----------------------------------------------------------------------------------
def test_cli_repo(tmp_path):
    from offload.cli import main
    assert main(["repo", str(tmp_path / "r"), "jet_mlp", "--max-batch", "32", "--delay-us",
                 "250", "--instances", "2", "--device", "cpu"]) == 0
    text = (tmp_path / "r" / "jet_mlp" / "config.pbtxt").read_text()
    for line in ("max_batch_size: 32", "max_queue_delay_microseconds: 250", "count: 2",
                 'backend: "python"', "dims: 16", "dims: 5", 'string_value: "cpu"'):
        assert line in text
    assert (tmp_path / "r" / "jet_mlp" / "1" / "model.onnx").is_file()
    assert main(["repo", str(tmp_path / "r2"), "missing.onnx"]) == 2
    assert main(["repo", str(tmp_path / "r3")]) == 2


def test_cli_serve_prints_endpoints_and_stops_on_ctrl_c(server_env):
    ports = [str(triton.free_port()) for _ in range(3)]
    env = dict(os.environ, OFFLOAD_TRITON_ENV=str(server_env))
    p = subprocess.Popen([sys.executable, "-m", "offload", "serve", "jet_mlp", "--grpc-port",
                          ports[0], "--http-port", ports[1], "--metrics-port", ports[2]],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        text, sel = b"", selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_S
        while b"metrics:" not in text:
            assert time.monotonic() < deadline and p.poll() is None, text
            if sel.select(timeout=1.0):
                text += os.read(p.stdout.fileno(), 65536)
        lines = text.decode().splitlines()
        assert f"grpc://127.0.0.1:{ports[0]}/jet_mlp" in lines[0]
        assert f"http://127.0.0.1:{ports[1]}/jet_mlp" in lines[0]
        with offload.load(f"grpc://127.0.0.1:{ports[0]}/jet_mlp") as model:
            x = offload.zoo.sample_input("jet_mlp", 2)
            np.testing.assert_allclose(model(x), offload.load("jet_mlp")(x), rtol=1e-5,
                                       atol=1e-6)
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.terminate()  # offload serve stops its server on SIGTERM too
            p.wait(60)
    with pytest.raises(offload.DeviceUnavailableError):  # the server went with it
        offload.load(f"grpc://127.0.0.1:{ports[0]}/jet_mlp", retries=0)


def test_model_urls():
    from offload import remote
    assert remote.parse_url("grpc://127.0.0.1:8001/jet_mlp") == \
        ("grpc", "127.0.0.1:8001", "jet_mlp", "")
    assert remote.parse_url("http://host:8000/m/3") == ("http", "host:8000", "m", "3")
    assert remote.is_url(["grpc://a:1/m", "http://b:2/m"]) and not remote.is_url("jet_mlp")
    assert not remote.is_url("model.onnx") and not remote.is_url([])
    for bad in ("grpc://host/m", "grpc://host:1/", "grpc://host:1/m/v1", "grpc://host:1/a/1/b"):
        with pytest.raises(ValueError, match="grpc://HOST:PORT/MODEL"):
            remote.parse_url(bad)
    with pytest.raises(ValueError, match="different models"):
        offload.load(["grpc://127.0.0.1:1/a", "grpc://127.0.0.1:1/b"])
