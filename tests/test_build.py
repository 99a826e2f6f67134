"""The built extension itself: it must run on the process's shared libstdc++. A static copy linked into _C (the GPU
machines' toolchain links -static-libstdc++) keeps its own locale ids: there the first kernel error message holding a
number (a shape) came out cut off at the number, or crashed the process."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from mltoolkit import _ext

pytestmark = pytest.mark.skipif(_ext.cpp_unavailable() is not None, reason=str(_ext.cpp_unavailable()))


def test_extension_links_the_shared_libstdcxx():
    if shutil.which("readelf") is None:
        pytest.skip("readelf not installed")
    (so,) = glob.glob(os.path.join(os.path.dirname(_ext._C.__file__), "_C*.so"))
    needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in needed, f"{so} does not link libstdc++.so dynamically:\n{needed}"


def test_error_message_with_numbers_is_whole():
    # In a child process: the failure this guards against was a segfault.
    code = ("import torch, mltoolkit._C as C\n"
            "try:\n"
            "    C.norm_forward_cpu(torch.randn(2, 3, 8), None, None, None, 1e-5, False)\n"
            "except RuntimeError as e:\n"
            "    print(str(e).splitlines()[0])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    assert "(2, 3, 8)" in run.stdout, run.stdout
