"""Where the kernel sources are: ``kernels/`` at the repository root, installed into the wheel as
``offload/kernels``. An installed package reads its own copy; a source checkout (and the editable
install, whose modules are the checkout's files) reads the repository's folder."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find_kernel_dir() -> Path:
    installed, checkout = _PACKAGE / "kernels", _PACKAGE.parent.parent / "kernels"
    if not (installed / "dialect.h").is_file() and (checkout / "dialect.h").is_file():
        return checkout
    return installed  # where a broken install is reported from (reading a source names the path)


KERNEL_DIR = _find_kernel_dir()
HLS_DIR = KERNEL_DIR / "hls"
