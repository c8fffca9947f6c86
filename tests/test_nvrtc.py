"""The CUDA driver's programs compile with NVRTC itself, the compiler CuPy's RawModule uses, from
the exact text the driver hands it and the exact options CuPy 14.2 then passes to NVRTC
(``cupy_nvrtc_options``: CCCL and CUDA include dirs, ``-ftz=true``, ``-arch=sm_90``,
``--device-as-default-execution-space``), for every tensor storage. NVRTC compiles without a GPU:
the test extra brings CUDA 13's (``nvidia-cuda-nvrtc`` 13, the wheel layout ``nvidia/cu13/lib``);
skipped, with the reason, where no NVRTC is found."""

from __future__ import annotations

import numpy as np
import pytest

from offload.drivers import cuda
from offload.drivers._cupy_emu import _kernels as emu_kernels
from offload.drivers._kernels import GEMM_GPU, PROGRAMS

STORAGES = {"float32": {}, "float16": {"STORAGE_F16": 1}, "bfloat16": {"STORAGE_BF16": 1}}


@pytest.fixture(scope="module")
def nvrtc():
    try:
        lib = emu_kernels.load_nvrtc()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"NVRTC not found: {e}")
    return lib


def test_nvrtc_is_cuda_13(nvrtc):
    assert emu_kernels.nvrtc_version()[0] == 13, (nvrtc.path, emu_kernels.nvrtc_version())
    assert "/cu13/" in nvrtc.path or "cuda-13" in nvrtc.path, nvrtc.path


def test_cupy_options_are_cupy_14_2s():
    """The order CuPy 14.2 builds (cupy/_core/core.pyx assemble_cupy_compiler_options, then
    cupy/cuda/compiler.py): the three CCCL dirs, the driver's options, CuPy's header dir, CUDA's
    headers, -ftz=true, -arch=sm_XX (cubin), --device-as-default-execution-space."""
    opts = emu_kernels.cupy_nvrtc_options(cuda.nvrtc_options({"A": 1}), "90")
    inc = emu_kernels.cupy_include_dir()
    assert opts[:3] == (f"-I{inc}/cupy/_cccl/cub", f"-I{inc}/cupy/_cccl/thrust",
                        f"-I{inc}/cupy/_cccl/libcudacxx")
    assert opts[3:6] == ("-std=c++17", "-DA=1", f"-I{inc}")
    tail = opts[6:]
    if emu_kernels.cuda_include_dir():
        assert tail[0] == f"-I{emu_kernels.cuda_include_dir()}"
        tail = tail[1:]
    assert tail == ("-ftz=true", "-arch=sm_90", "--device-as-default-execution-space")
    assert emu_kernels.cupy_nvrtc_options(())[3] == "--std=c++17"  # CuPy's default standard


def test_cupy_options_match_the_installed_cupy():
    """On a machine with CuPy (the GPU check), its own assembly agrees with ours."""
    core = pytest.importorskip("cupy._core.core")
    ours = emu_kernels.cupy_nvrtc_options(cuda.nvrtc_options({"A": 1}), "90")
    theirs = core.assemble_cupy_compiler_options(cuda.nvrtc_options({"A": 1}))
    strip = [o for o in ours if not o.startswith("-I")]
    assert [o for o in theirs if not o.startswith("-I")] == strip[:2]
    assert sum(o.startswith("-I") for o in theirs) == sum(o.startswith("-I") for o in ours)


# gemm.cl is not used by the CUDA driver (cuBLAS does its products): float32 only here (its
# 16-bit variants take minutes to reach SASS; tests/test_kernels_nvcc.py compiles them to PTX)
CASES = [(p, s) for p in PROGRAMS for s in STORAGES if p != "gemm.cl" or s == "float32"]


@pytest.mark.parametrize("program,storage", CASES)
def test_driver_programs_compile_with_nvrtc(nvrtc, program, storage):
    defines = dict(STORAGES[storage])
    if program == "gemm.cl":
        defines.update(GEMM_GPU)
    options = emu_kernels.cupy_nvrtc_options(cuda.nvrtc_options(defines))
    cubin = emu_kernels.nvrtc_compile(cuda.program_source(program), program, options)
    assert cubin[:4] == b"\x7fELF", f"{program}: NVRTC gave no cubin"
    for name in emu_kernels.parse_kernels(cuda.program_source(program)):
        assert name.encode() in cubin, f"{program}: kernel {name} missing from the cubin"


def _generated_kernels():
    """Every row of the elementwise table on float32 operands, and on int64 / bool operands
    where the row has an integer form, as the shared builders generate them."""
    from offload import elementwise as EW
    f, l, b = np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.bool_)
    for fn, row in EW.TABLE.items():
        ins = [b, f, f] if fn == "where" else [f] * row.arity
        yield fn, ins, EW.result_dtype(fn, ins, {"to": "int64"})
        if fn in ("add", "mul", "mod", "fmod", "max", "abs", "sign", "equal", "div", "copy"):
            ins = [l] * row.arity
            yield fn, ins, EW.result_dtype(fn, ins, {})
    yield "cast", [f], l
    yield "cast", [l], f
    yield "cast", [f], b
    yield "and", [b, b], b


def test_generated_elementwise_kernels_compile_with_nvrtc(nvrtc):
    """All generated elementwise kernels in one NVRTC program per storage (one compile each)."""
    from offload import elementwise as EW
    for storage, defines in STORAGES.items():
        bodies, names = [], []
        for fn, ins, out in _generated_kernels():
            name, source = EW.generate(fn, ins, out)
            body = source.split(f'#line 1 "{name}"', 1)[1]
            if name not in names:
                names.append(name)
                bodies.append(body)
        prelude = EW.generate("copy", [np.dtype(np.float32)], np.dtype(np.float32))[1]
        prelude = prelude.split('#line 1 "ew_copy_f_f"', 1)[0]
        options = emu_kernels.cupy_nvrtc_options(cuda.nvrtc_options(defines))
        cubin = emu_kernels.nvrtc_compile(prelude + "\n".join(bodies), "elementwise", options)
        assert cubin[:4] == b"\x7fELF", f"{storage}: NVRTC gave no cubin"
        missing = [n for n in names if n.encode() not in cubin]
        assert not missing, f"{storage}: kernels missing from the cubin: {missing}"


@pytest.mark.parametrize("data,index", [("i64", None), ("int", "int"), ("u8", None),
                                        (None, "int")])
def test_index_kernels_compile_for_integer_data_and_int32_indices(nvrtc, data, index):
    """index.cl as the shared builders compile it for int64/int32/bool data and int32
    indices (-DDATA_T, -DINDEX_T)."""
    defines = {k: v for k, v in (("DATA_T", data), ("INDEX_T", index)) if v}
    options = emu_kernels.cupy_nvrtc_options(cuda.nvrtc_options(defines))
    cubin = emu_kernels.nvrtc_compile(cuda.program_source("index.cl"), "index.cl", options)
    assert cubin[:4] == b"\x7fELF"
