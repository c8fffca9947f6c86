"""The package finds its kernel sources wherever it runs from: kernels/ at the repository root is
installed into the wheel as offload/kernels; a source checkout or editable install reads the root."""

from pathlib import Path

import offload
from offload import _resources
from offload.drivers import _kernels

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_sources_are_found():
    for name in (*_kernels.PROGRAMS, "dialect.h", "common.h"):
        assert (_resources.KERNEL_DIR / name).is_file(), name
    for name in ("dense.cpp", "conv2d.cpp", "pool.cpp", "offload_hls.h", "ap_types/ap_fixed.h"):
        assert (_resources.HLS_DIR / name).is_file(), name


def test_installed_package_reads_its_own_copy():
    package = Path(offload.__file__).resolve().parent
    if package == ROOT / "src" / "offload":  # source checkout / editable install
        assert _resources.KERNEL_DIR == ROOT / "kernels"
    else:  # a wheel: the sources travel inside the package and match the repository's
        assert _resources.KERNEL_DIR == package / "kernels"
        for source in (ROOT / "kernels").rglob("*"):
            if source.is_file():
                copy = package / "kernels" / source.relative_to(ROOT / "kernels")
                assert copy.read_bytes() == source.read_bytes(), copy


def test_fpga_modules_live_in_their_subpackage():
    from offload.fpga import fixed_point, hls_csim, pyxrt_emu, quant  # noqa: F401
    top = {p.stem for p in Path(offload.__file__).parent.glob("*.py")}
    assert not top & {"quant", "fixed_point", "hls_csim", "pyxrt_emu"}
