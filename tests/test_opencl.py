"""The OpenCL driver itself: discovery, the program cache, build errors, typed errors, the GEMM.

Every op on the OpenCL device is checked by the device matrix (test_ops, test_onnx_ops, test_zoo);
these tests cover what only this driver has. They run on the first available OpenCL device and are
skipped, with the reason, where there is none.
"""

import logging
import sys

import numpy as np
import pytest

import offload
from offload.plan import BuildContext
from offload import DeviceMemoryError, DeviceRuntimeError, KernelBuildError
from offload import zoo
from offload.drivers import opencl as ocl


def _first_available():
    infos = [i for i in ocl.discover()]
    for info in infos:
        if info.available:
            return info
    reasons = "; ".join(f"{i.spec}: {i.reason}" for i in infos)
    pytest.skip(f"no available OpenCL device ({reasons})")


@pytest.fixture(scope="module")
def info():
    return _first_available()


@pytest.fixture(scope="module")
def dev(info):
    return offload.device(info.spec)


def fresh(dev):
    """A second device object on the same OpenCL device: an empty in-process program table."""
    return ocl.OpenCLDevice(dev.index, dev.cl_device)


def test_discover_lists_opencl_devices_by_index():
    infos = ocl.discover()
    assert infos, "discover() must list at least one (possibly unavailable) entry"
    for k, info in enumerate(infos):
        assert info.spec == f"opencl:{k}"
        if info.available:
            assert " / " in info.name  # "<platform> (<version>) / <device>"
            assert "(OpenCL " in info.name.split(" / ")[0]
            assert info.open is not None
        else:
            assert info.reason
    # best first: every device that works before any that does not
    states = [i.available for i in infos]
    assert states == sorted(states, reverse=True)


def test_discover_order_does_not_depend_on_the_icd_loader(monkeypatch):
    cl = pytest.importorskip("pyopencl")
    platforms = cl.get_platforms()
    before = [(i.name, i.available) for i in ocl.discover()]
    monkeypatch.setattr(cl, "get_platforms", lambda: list(reversed(platforms)))
    assert [(i.name, i.available) for i in ocl.discover()] == before


def test_version_helpers():
    long = "OpenCL 3.0 PoCL 6.0+debian  Linux, None+Asserts, RELOC, LLVM 18.1.8, SLEEF"
    assert ocl._short_version(long) == "OpenCL 3.0 PoCL 6.0+debian"
    assert ocl._version_key("OpenCL 3.0 PoCL 6.0+debian") > ocl._version_key("OpenCL 3.0 PoCL 3.0-rc2")


def test_spec_by_platform_name(info):
    """'opencl:pocl' (any case) is the first available device whose platform says PoCL; the
    opened device keeps its numbered spec."""
    text = f"{info.name} {info.match}".lower()
    word = "pocl" if "pocl" in text else info.name.split()[0].lower()
    dev = offload.device(f"opencl:{word.upper()}")
    first = next(i for i in ocl.discover() if i.available and word in f"{i.name} {i.match}".lower())
    assert dev.spec == first.spec and dev is offload.device(first.spec)
    with pytest.raises(offload.DeviceUnavailableError, match="no device 'opencl:nosuchvendor'"):
        offload.device("opencl:nosuchvendor")


def test_first_compile_is_announced_once(dev, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    d = fresh(dev)
    with caplog.at_level(logging.WARNING, logger="offload"):
        offload.load("jet_mlp", device=d)(zoo.sample_input("jet_mlp", 2))
        offload.load("jet_cnn", device=d)(zoo.sample_input("jet_cnn", 2))
    notes = [r for r in caplog.records if "compiling OpenCL kernels" in r.getMessage()]
    assert len(notes) == 1 and d.build_stats["compiled"] >= 2
    assert "offload warmup" in notes[0].getMessage()
    caplog.clear()
    warm = fresh(dev)  # same disk cache: nothing compiles, nothing is said
    with caplog.at_level(logging.WARNING, logger="offload"):
        offload.load("jet_mlp", device=warm)(zoo.sample_input("jet_mlp", 2))
    assert warm.build_stats["compiled"] == 0 and not caplog.records


def test_warmup_builds_every_kernel_ahead(dev, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    d = fresh(dev)
    model = offload.load("jet_cnn", device=d, precision="float16")
    model.warmup()
    built = dict(d.build_stats)
    assert built["compiled"] > 0
    for batch in (1, 7, 64):  # other batch sizes need no other kernel
        model(zoo.sample_input("jet_cnn", batch))
    assert d.build_stats["compiled"] == built["compiled"]
    assert d.build_stats["from_disk"] == built["from_disk"]


def test_discover_without_pyopencl(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyopencl", None)  # import pyopencl -> ImportError
    infos = ocl.discover()
    assert len(infos) == 1 and not infos[0].available
    assert infos[0].spec == "opencl:0"
    assert "pyopencl is not installed" in infos[0].reason


def test_kernel_sources_are_package_files():
    names = sorted(p.name for p in ocl.KERNEL_DIR.iterdir())
    assert "dialect.h" in names
    for program in ocl.PROGRAMS:
        assert program in names
        text = ocl.kernel_source(program)
        assert '#line 1 "dialect.h"' in text  # includes expanded with their file names
        assert "#include" not in text.replace('#include "', "")  # no quoted include left


def test_program_cache_on_disk(dev, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    cold = fresh(dev)
    cold.program("elementwise.cl")
    assert cold.build_stats["compiled"] == 1 and cold.build_stats["from_disk"] == 0
    files = list((tmp_path / "opencl").glob("*.bin"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    # same process, same device object: no second build
    cold.program("elementwise.cl")
    assert cold.build_stats["compiled"] == 1

    warm = fresh(dev)
    warm.program("elementwise.cl")
    assert warm.build_stats == {**warm.build_stats, "compiled": 0, "from_disk": 1}
    # a program loaded from its binary runs
    x = np.array([-2.0, -0.5, 0.0, 3.0], np.float32)
    xb, yb = warm.upload(x), warm.view(warm.alloc(x.nbytes), x.shape)
    run = ocl.OPS["activation"](BuildContext(warm, {}), {"fn": "relu"}, [xb], yb)
    run()
    y = np.empty_like(x)
    warm.copy_out(y, yb)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_cache_key_covers_options_and_source(dev, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    d = fresh(dev)
    d.program("gemm.cl", ocl.GEMM_GPU)
    d.program("gemm.cl", ocl.GEMM_CPU)
    assert len(list((tmp_path / "opencl").glob("*.bin"))) == 2
    assert d.program_key("a", "") != d.program_key("b", "")
    assert d.program_key("a", "-DX=1") != d.program_key("a", "-DX=2")


def test_corrupt_cache_entry_is_rebuilt(dev, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    fresh(dev).program("reduce.cl")
    (entry,) = (tmp_path / "opencl").glob("*.bin")
    entry.write_bytes(b"not a program binary")
    d = fresh(dev)
    d.program("reduce.cl")
    assert d.build_stats["compiled"] == 1


BROKEN = """KERNEL void broken(GLOBAL float* x)
{
    x[GID(0)] = activate(x[0], ACT_RELU, 0.0f, 0.0f, 0.0f);
    x[1] = no_such_variable * 2.0f;
}
"""


def test_build_failure_raises_kernel_build_error(dev, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    text = ocl.kernel_source("common.h") + '\n#line 1 "broken.cl"\n' + BROKEN
    with pytest.raises(KernelBuildError) as info:
        fresh(dev).program("broken.cl", source=text)
    err = info.value
    assert "no_such_variable" in err.log
    assert "broken.cl:4: x[1] = no_such_variable * 2.0f;" in str(err)
    assert err.source == text
    assert not list((tmp_path / "opencl").glob("*.bin"))  # nothing cached


def test_failing_line_names_the_included_file():
    text = ocl.kernel_source("gemm.cl")
    log = "gemm.cl:1: error: something\n"
    assert ocl.failing_line(log, text).startswith("gemm.cl:1: /* gemm.cl")
    log = "<source>:9:5: error: x\ncommon.h:14:3: error: y"
    assert ocl.failing_line(log, text).startswith("common.h:14:")
    assert ocl.failing_line("no location here", text) == ""


def test_allocation_failure_is_device_memory_error(dev):
    too_big = dev.max_alloc + 1
    with pytest.raises(DeviceMemoryError) as info:
        dev.alloc(too_big)
    assert str(too_big) in str(info.value) and "in use" in str(info.value)


def test_cl_errors_map_to_typed_errors(dev):
    import pyopencl as cl

    def error(code):
        return cl.RuntimeError(cl._cl._ErrorRecord(msg="boom", code=code, routine="clX"))
    assert isinstance(ocl.map_error(dev, error(cl.status_code.MEM_OBJECT_ALLOCATION_FAILURE),
                                    "running"), DeviceMemoryError)
    assert isinstance(ocl.map_error(dev, error(cl.status_code.OUT_OF_RESOURCES), "running"),
                      DeviceMemoryError)
    other = ocl.map_error(dev, error(cl.status_code.INVALID_VALUE), "running gemm")
    assert isinstance(other, DeviceRuntimeError) and "running gemm" in str(other)


@pytest.mark.parametrize("kernel", ["cpu", "gpu", "naive"])
@pytest.mark.parametrize("m,n,k,batch,groups", [(1, 1, 1, 1, 1), (37, 129, 70, 1, 1),
                                                (64, 128, 32, 1, 1), (5, 300, 17, 3, 2)])
def test_gemm_edges_batches_groups(dev, m, n, k, batch, groups, kernel):
    """Both GEMM schedules (gemm_direct with GEMM_CPU, gemm_tiled with GEMM_GPU) and the naive
    kernel, whatever the device: edges in every dimension, batches, groups, the epilogue."""
    naive = kernel == "naive"
    defines = None if naive else ocl.GEMM_CPU if kernel == "cpu" else ocl.GEMM_GPU
    rng = np.random.default_rng(m * n + k)
    z = batch * groups
    a = rng.standard_normal((groups, m, k)).astype(np.float32)       # weights, per group
    b = rng.standard_normal((batch, groups, k, n)).astype(np.float32)
    bias = rng.standard_normal((groups, m)).astype(np.float32)
    res = rng.standard_normal((batch, groups, m, n)).astype(np.float32)
    ab, bb, biasb, resb = (dev.upload(v) for v in (a, b, bias, res))
    cb = dev.view(dev.alloc(z * m * n * 4), (batch, groups, m, n))
    run = ocl.gemm(dev, ab, bb, cb, m, n, k, lda=k, ldb=n, ldc=n, batch=batch, groups=groups,
                   sa=(0, m * k), sb=(groups * k * n, k * n), sc=(groups * m * n, m * n),
                   bias=biasb, bias_mode=2, bias_gs=m, residual=resb,
                   epilogue=ocl._epilogue_args({"activation": "relu"}), naive=naive,
                   defines=defines)
    run()
    got = np.empty((batch, groups, m, n), np.float32)
    dev.copy_out(got, cb)
    want = np.maximum(np.matmul(a[None], b) + bias[None, :, :, None] + res, 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_half_storage_needs_cl_khr_fp16(dev):
    if not dev.has_fp16:
        pytest.skip(f"{dev.spec} ({dev.name}) does not report cl_khr_fp16: no half storage")
    pytest.skip("half-storage kernels are not implemented yet: the driver runs float32 only")


# -- zero-copy inputs ----------------------------------------------------------------------------

def test_pocl_maps_a_use_host_ptr_buffer_at_the_same_address(dev):
    import pyopencl as cl
    if not dev.zero_copy:
        pytest.skip(f"{dev.spec} does not share host memory")
    host = offload.empty((1024,))
    host[:] = 3.0
    mem = cl.Buffer(dev.context, cl.mem_flags.READ_ONLY | cl.mem_flags.USE_HOST_PTR,
                    hostbuf=host)
    mapped, _ = cl.enqueue_map_buffer(dev.queue, mem, cl.map_flags.READ, 0, host.shape,
                                      host.dtype)
    assert offload.hostmem.address(mapped) == offload.hostmem.address(host)
    mapped.base.release(dev.queue)


def test_aligned_inputs_are_used_in_place(dev):
    if not dev.zero_copy:
        pytest.skip(f"{dev.spec} does not share host memory")
    from offload import zoo
    model = offload.load(zoo.path("jet_cnn"), device=dev)
    reference = offload.load(zoo.path("jet_cnn"))
    aligned = offload.empty((4, 1, 40, 40))
    # contiguous but 4 bytes past a page boundary: copied
    plain = offload.empty(4 * 40 * 40 + 1)[1:].reshape(4, 1, 40, 40)
    strided = np.zeros((4, 1, 40, 80), np.float32)[..., ::2]  # not contiguous: copied
    for k, x in enumerate([aligned, plain, aligned, strided, aligned]):
        x[...] = zoo.sample_input("jet_cnn", 4, seed=k)
        model.reset_stats()
        y = model(x)
        expected = 0 if x is aligned else 4 * 1600 * 4
        assert model.stats["copy_in_bytes"] == expected, (k, model.stats)
        np.testing.assert_allclose(y, reference(x), rtol=1e-4, atol=1e-5)
