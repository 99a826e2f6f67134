"""The CUDA 8-bit AdamW kernel (csrc/cuda/fused_adam8bit.cu, glue fused_adam8bit_cuda.cpp).

Without a GPU: the launch planning (a8_plan) and the block -> tensor lookup (a8_find_slot) of
csrc/cuda/fused_adam8bit_launch.h are compiled with the system C++ compiler and replayed on the host for many lists
of tensor sizes (every block of every non-empty tensor visited exactly once, by a CTA that finds its tensor and
block right, with tables within their size). On a GPU (pytest.mark.cuda): codes, absmax and float32 params equal to
the C++ CPU kernel's bit for bit on the same inputs (several steps, odd sizes, more tensors than one launch table
holds, more blocks than the grid, subnormal moments, NaN gradients); bf16 / fp16 params equal the C++ kernel's
float32 result rounded to the dtype; determinism; the backend choice; bad input names the argument."""
import os
import random
import shutil
import subprocess

import pytest
import torch

from mltoolkit import _ext
from mltoolkit.backends import table
from mltoolkit.ops.fused_adam8bit import STATE_KEYS, new_state, quantization_maps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = [(1,), (7,), (97,), (123, 5), (256,), (257,), (0,), (33, 17), (100_000,)]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- host replay of the launch header (no GPU) -----------------------------------------------------------------

HOST_CHECK = r"""
#include "fused_adam8bit_launch.h"

#include <cstdio>
#include <random>
#include <vector>

using namespace mltoolkit::cuda_adam8bit;

static int failures = 0;
#define EXPECT(cond, ...) do { if (!(cond)) { if (++failures < 20) { std::printf("FAIL line %d: ", __LINE__); \
  std::printf(__VA_ARGS__); std::printf("\n"); } } } while (0)

// Replays the kernel's block walk: launches from a8_plan, block_off as the launcher fills it, CTAs c = 0..grid-1
// taking global blocks c, c + grid, ..., each finding its slot with a8_find_slot.
static void check(const std::vector<int64_t>& numel, int max_tensors, int64_t grid_cap) {
  const auto plan = a8_plan(numel, max_tensors);
  std::vector<std::vector<int>> seen(numel.size());
  for (size_t t = 0; t < numel.size(); ++t) seen[t].assign(a8_num_blocks(numel[t]), 0);
  size_t next = 0;  // tensors come in list order
  for (const auto& L : plan) {
    EXPECT(!L.empty() && int(L.size()) <= max_tensors, "launch of %zu tensors (max %d)", L.size(), max_tensors);
    std::vector<int64_t> off(L.size() + 1, 0);
    for (size_t k = 0; k < L.size(); ++k) {
      EXPECT(L[k] >= int(next), "tensor %d out of order", L[k]);
      EXPECT(numel[L[k]] > 0, "empty tensor %d in a launch", L[k]);
      next = L[k] + 1;
      off[k + 1] = off[k] + a8_num_blocks(numel[L[k]]);
    }
    const int64_t total = off[L.size()];
    const int64_t grid = total < grid_cap ? total : grid_cap;
    for (int64_t c = 0; c < grid; ++c) {
      for (int64_t b = c; b < total; b += grid) {
        const int s = a8_find_slot(off.data(), int(L.size()), b);
        EXPECT(s >= 0 && s < int(L.size()), "slot %d out of range", s);
        if (s < 0 || s >= int(L.size())) return;
        EXPECT(off[s] <= b && b < off[s + 1], "block %lld given slot %d [%lld, %lld)", (long long)b, s,
               (long long)off[s], (long long)off[s + 1]);
        const int64_t blk = b - off[s];
        const int t = L[s];
        EXPECT(blk >= 0 && blk < int64_t(seen[t].size()), "block %lld of tensor %d out of range", (long long)blk, t);
        if (blk < 0 || blk >= int64_t(seen[t].size())) return;
        ++seen[t][blk];
        // the block's live threads: elements blk * 256 + tid < numel, at least one, at most 256
        const int64_t live = numel[t] - blk * kA8Block < kA8Block ? numel[t] - blk * kA8Block : kA8Block;
        EXPECT(live >= 1 && live <= kA8Block, "block with %lld live elements", (long long)live);
      }
    }
  }
  for (size_t t = 0; t < numel.size(); ++t)
    for (size_t b = 0; b < seen[t].size(); ++b) EXPECT(seen[t][b] == 1, "tensor %zu block %zu seen %d times", t, b,
                                                       seen[t][b]);
}

int main() {
  std::mt19937_64 rng(0);
  check({}, kA8MaxTensors, 1024);
  check({0, 0}, kA8MaxTensors, 1024);
  check({1}, kA8MaxTensors, 1024);
  check({256, 257, 0, 1, 512, 513}, kA8MaxTensors, 1024);
  check({256, 257, 0, 1, 512, 513}, 1, 1);
  check({256, 257, 0, 1, 512, 513}, 2, 3);
  check({1000003}, kA8MaxTensors, 1056);
  for (int it = 0; it < 300; ++it) {
    const int n = int(rng() % 120);
    std::vector<int64_t> numel(n);
    for (auto& x : numel) {
      const int kind = int(rng() % 4);
      x = kind == 0 ? 0 : kind == 1 ? int64_t(rng() % 300) : kind == 2 ? int64_t(rng() % 5000)
                                                                      : int64_t(rng() % 200000);
    }
    check(numel, 1 + int(rng() % kA8MaxTensors), 1 + int64_t(rng() % 2000));
  }
  // a8_find_slot on offsets with empty slots (the launcher never makes them, but the search keeps its promise)
  const std::vector<int64_t> off = {0, 3, 3, 7, 7, 7, 10};
  for (int64_t b = 0; b < 10; ++b) {
    const int s = a8_find_slot(off.data(), 6, b);
    EXPECT(off[s] <= b && b < off[s + 1], "block %lld slot %d", (long long)b, s);
  }
  std::printf("failures: %d\n", failures);
  return failures == 0 ? 0 : 1;
}
"""


def test_launch_plan_host_replay(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "check.cpp"
    src.write_text(HOST_CHECK)
    exe = tmp_path / "check"
    subprocess.run([cxx, "-std=c++17", "-O1", "-DMLTK_A8_PLAN_ONLY", "-I", os.path.join(ROOT, "csrc", "cuda"),
                    str(src), "-o", str(exe)], check=True, capture_output=True, timeout=120)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_registered_after_cpp():
    names = [b.name for b in table("fused_adamw8bit").backends]
    assert names.index("cuda") < names.index("triton") < names.index("reference")
    assert table("fused_adamw8bit").select([torch.randn(10)], [torch.randn(10)]).name in ("cpp", "reference")


def test_glue_checks_without_gpu():
    """The glue's first checks run before any CUDA call, so they work on a CUDA build without a GPU."""
    if _ext.cuda_unavailable() is not None or not hasattr(_ext._C, "fused_adamw8bit_cuda"):
        pytest.skip(str(_ext.cuda_unavailable() or "mltoolkit._C predates fused_adamw8bit_cuda"))
    params, states, steps = _setup([(300,)], torch.float32)
    lists = [[s[k] for s in states] for k in STATE_KEYS]
    qs, qu = quantization_maps()
    hp = (1e-3, 0.9, 0.999, 0.0, 1e-8, False)
    with pytest.raises(RuntimeError, match="fused_adamw8bit_cuda: params\\[0\\] must be a CUDA tensor"):
        _ext._C.fused_adamw8bit_cuda(params, [torch.randn(300)], *lists, steps, qs, qu, *hp)
    with pytest.raises(RuntimeError, match="fused_adamw8bit_cuda: params, grads, .* must have one length"):
        _ext._C.fused_adamw8bit_cuda(params, [], *lists, steps, qs, qu, *hp)
    assert steps[0].item() == 0.0  # nothing was stepped


# ---- on a GPU ----------------------------------------------------------------------------------------------------

def _need_cuda_kernel():
    why = table("fused_adamw8bit").get("cuda").available()
    if why:
        pytest.skip(why)
    if table("fused_adamw8bit").get("cpp").available():
        pytest.skip("the C++ CPU kernel (the oracle here) is unavailable")


def _setup(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    return params, [new_state(p) for p in params], [torch.tensor(0.0) for _ in params]


def _args(params, grads, states, steps, device, hp):
    qs, qu = quantization_maps(device)
    return (params, grads, *[[s[k] for s in states] for k in STATE_KEYS], steps, qs, qu, *hp)


def _cuda_vs_cpp(shapes, dtype=torch.float32, n_steps=3, hp=(1e-2, 0.9, 0.999, 1e-2, 1e-8, False), grad_fn=None):
    """Steps the CUDA kernel on the GPU and, from the same inputs each step, the C++ kernel on float32 CPU copies:
    codes, absmax and steps must be equal, params equal to the CPU result rounded to dtype."""
    params, states, steps = _setup(shapes, dtype)
    dp = [p.cuda() for p in params]
    ds = [{k: v.cuda() for k, v in s.items()} for s in states]
    dsteps = [s.clone() for s in steps]
    g = torch.Generator().manual_seed(1)
    for _ in range(n_steps):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        if grad_fn is not None:
            grads = [grad_fn(x) for x in grads]
        grads = [x.to(dtype) for x in grads]
        # the CPU oracle starts from the GPU's current state
        cp = [p.cpu().float() for p in dp]
        cs = [{k: v.cpu().clone() for k, v in s.items()} for s in ds]
        csteps = [s.clone() for s in dsteps]
        _ext._C.fused_adamw8bit_cpu(*_args(cp, [x.float() for x in grads], cs, csteps, "cpu", hp))
        _ext._C.fused_adamw8bit_cuda(*_args(dp, [x.cuda() for x in grads], ds, dsteps, "cuda", hp))
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(dp, cp)):
            torch.testing.assert_close(a.cpu(), b.to(dtype), rtol=0, atol=0, equal_nan=True, msg=f"params[{i}]")
        for i, (sa, sb) in enumerate(zip(ds, cs)):
            for k in ("exp_avg_codes", "exp_avg_sq_codes"):
                ca, cb = sa[k].cpu(), sb[k]
                assert torch.equal(ca, cb), f"{k}[{i}]: {(ca != cb).sum().item()} of {ca.numel()} codes differ"
            for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                torch.testing.assert_close(sa[k].cpu(), sb[k], rtol=0, atol=0, equal_nan=True, msg=f"{k}[{i}]")
        assert [s.item() for s in dsteps] == [s.item() for s in csteps]
    return dp, ds


@pytest.mark.cuda
@pytest.mark.parametrize("hp", [(1e-2, 0.9, 0.999, 1e-2, 1e-8, False), (1e-3, 0.9, 0.999, 0.0, 1e-8, True),
                                (1e-1, 0.3, 0.9, 0.1, 1e-6, False)], ids=["wd", "maximize", "big_w"])
def test_cuda_matches_cpp_float32(hp):
    _need_cuda_kernel()
    _cuda_vs_cpp(SHAPES, hp=hp)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_cpp_half(dtype):
    _need_cuda_kernel()
    _cuda_vs_cpp(SHAPES, dtype=dtype)


@pytest.mark.cuda
def test_cuda_many_tensors_and_blocks():
    """More tensors than one launch table (40) holds and more blocks than the grid (8 CTAs per SM)."""
    _need_cuda_kernel()
    rnd = random.Random(0)
    shapes = [(rnd.choice([0, 1, 255, 256, 257, rnd.randrange(1, 3000)]),) for _ in range(97)] + [(1_000_003,)]
    _cuda_vs_cpp(shapes, n_steps=2)


@pytest.mark.cuda
def test_cuda_subnormal_and_nan():
    """Subnormal moments (the kernel's arithmetic must not flush them as --use_fast_math's -ftz would) and a NaN
    gradient (its block's absmax becomes NaN, its codes 0, as on the CPU)."""
    _need_cuda_kernel()
    _cuda_vs_cpp([(300,), (513,)], grad_fn=lambda x: x * 1e-38)

    def with_nan(x):
        x = x.clone()
        x.view(-1)[5] = float("nan")
        return x

    _cuda_vs_cpp([(300,)], n_steps=2, grad_fn=with_nan)


@pytest.mark.cuda
def test_cuda_deterministic_and_selected():
    _need_cuda_kernel()
    shapes = [(1000,), (70_000,)]
    runs = []
    for _ in range(2):
        params, states, steps = _setup(shapes, torch.float32)
        params = [p.cuda() for p in params]
        states = [{k: v.cuda() for k, v in s.items()} for s in states]
        grads = [torch.ones_like(p) * 0.1 for p in params]
        assert table("fused_adamw8bit").select(params, grads).name == "cuda"
        for _ in range(3):
            torch.ops.mltoolkit.fused_adamw8bit_(*_args(params, grads, states, steps, "cuda",
                                                        (1e-2, 0.9, 0.999, 1e-2, 1e-8, False)))
        runs.append((params, states))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    for sa, sb in zip(runs[0][1], runs[1][1]):
        for k in STATE_KEYS:
            assert torch.equal(sa[k], sb[k])


@pytest.mark.cuda
def test_cuda_optimizer_trains():
    _need_cuda_kernel()
    from mltoolkit.optim import AdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1)).cuda()
    opt = AdamW(model.parameters(), lr=1e-2, state_bits=8, min_8bit_size=1024)
    x = torch.randn(256, 64, device="cuda")
    y = x[:, :1] * 2
    first = None
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


@pytest.mark.cuda
def test_cuda_bad_input():
    _need_cuda_kernel()
    params, states, steps = _setup([(300,)], torch.float32)
    params = [p.cuda() for p in params]
    lists = [[s[k].cuda() for s in states] for k in STATE_KEYS]
    qs, qu = quantization_maps("cuda")
    hp = (1e-3, 0.9, 0.999, 0.0, 1e-8, False)
    f = _ext._C.fused_adamw8bit_cuda
    with pytest.raises(RuntimeError, match="fused_adamw8bit_cuda: grads\\[0\\] must be Float"):
        f(params, [torch.randn(300, dtype=torch.float64, device="cuda")], *lists, steps, qs, qu, *hp)
    with pytest.raises(RuntimeError, match="fused_adamw8bit_cuda: exp_avg_sq_absmax\\[0\\] must have 2 elements"):
        f(params, [torch.randn(300, device="cuda")], *lists[:3], [torch.zeros(3, device="cuda")], steps, qs, qu, *hp)
    with pytest.raises(RuntimeError, match="fused_adamw8bit_cuda: exp_avg_codes\\[0\\] must be a CUDA tensor"):
        f(params, [torch.randn(300, device="cuda")], [lists[0][0].cpu()], *lists[1:], steps, qs, qu, *hp)
    with pytest.raises(RuntimeError, match="fused_adamw8bit_cuda: qmap_unsigned must be a float32 tensor"):
        f(params, [torch.randn(300, device="cuda")], *lists, steps, qs, qu.double(), *hp)
    with pytest.raises(RuntimeError, match="fused_adamw8bit_cuda: params\\[0\\] must be contiguous"):
        p = torch.randn(20, 15, device="cuda").t()
        st = new_state(p)
        f([p], [torch.randn(15, 20, device="cuda")], *[[st[k].cuda()] for k in STATE_KEYS], [torch.tensor(0.0)],
          qs, qu, *hp)
