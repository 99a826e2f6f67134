"""The CUDA convolution kernels' index math, replayed on the host (no GPU): tests/ops/conv_cuda_emulator.cpp runs the
__host__ __device__ functions of csrc/cuda/conv_index.h for every thread of every CTA, with ldmatrix and
mma.sync.m16n8k16 emulated from the PTX ISA, and compares against a direct convolution (forward, dgrad, wgrad; both
tensor-core tile widths; the SIMT and depthwise gathers in both layouts), plus shared-memory bank conflicts and the
FastDiv divisions. Built with the system C++ compiler."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "tests", "ops", "conv_cuda_emulator.cpp")


def test_conv_cuda_index_math(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "conv_cuda_emulator"
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(ROOT, "csrc"),
                            SOURCE, "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe), "12"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.startswith("ok:"), run.stdout
