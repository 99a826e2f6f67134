"""Test set-up. Without a GPU, Triton kernels run on the CPU through the interpreter, which must be switched on
before triton is first imported."""
import os


def _gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


if not _gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch's OpenMP threads wait passively at the end of a parallel region instead of spinning: with pytest-xdist
# workers sharing the cores, libgomp's default spin burnt the time the other workers needed (the suite on the
# 2-core VM: 544-574 s -> 380-421 s). libgomp reads this when torch loads it, so before `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Inductor's graph caches key a compiled graph on the graph, not on our ops' fake kernels: after a change to a fake
# kernel's output shape, a warm cache replays the old shape. (Generated-code caches stay on: keyed on the code.)
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# float32 references on the GPU in full float32: cuDNN convolutions default to TF32 (10-bit mantissa), which is
# further from the exact result than our float32 kernels are.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))
        if "slow" in item.keywords and os.environ.get("MLTK_SLOW_TESTS") != "1":
            item.add_marker(pytest.mark.skip(reason="slow; set MLTK_SLOW_TESTS=1"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
