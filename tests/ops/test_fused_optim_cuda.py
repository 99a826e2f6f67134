"""The CUDA multi-tensor optimizer kernels (csrc/cuda/fused_optim.cu): fused AdamW, fused LAMB and the fused
global-norm clip.

Without a GPU: the launch planning (plan_chunks, chunk_offsets) and the per-thread element walk (walk_chunk) of
csrc/cuda/fused_optim_launch.h are compiled with the system C++ compiler and replayed on the host for many lists of
tensor sizes and table capacities (every chunk in exactly one launch, every element visited once by one thread,
tables within their sizes); the glue's argument checks run on fake CUDA tensors when _C was built with CUDA.
On a GPU (pytest.mark.cuda): results against the C++ CPU kernels / the plain reference and
torch.optim.AdamW(fused=True), odd sizes, unaligned storage, more tensors and chunks than one launch table holds,
half precision, determinism, bad input."""
import math
import os
import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mltoolkit
from mltoolkit import _ext
from mltoolkit.backends import table
from mltoolkit.ops import fused_lamb as lamb_ops
from mltoolkit.ops.reference.fused_adam import fused_adamw_ as reference_adamw_
from mltoolkit.ops.reference.fused_lamb import lamb_step as reference_lamb
from mltoolkit.optim import AdamW

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHUNK = 65536  # the largest chunk (kChunk); calls on smaller tensors use smaller chunks (pick_chunk)
needs_cuda_build = pytest.mark.skipif(_ext.cuda_unavailable() is not None, reason=str(_ext.cuda_unavailable()))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- host replay of the launch header (no GPU) -----------------------------------------------------------------

HOST_CHECK = r"""
#include "fused_optim_launch.h"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace mltoolkit::cuda_optim;

static int failures = 0;
#define EXPECT(cond, ...) do { if (!(cond)) { if (++failures < 20) { std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
  std::printf(__VA_ARGS__); std::printf("\n"); } } } while (0)

static void check_plan(const std::vector<int64_t>& numel, int max_tensors, int max_entries, int64_t chunk) {
  const auto plan = plan_chunks(numel, max_tensors, max_entries, chunk);
  const auto off = chunk_offsets(numel, chunk);
  EXPECT(off.size() == numel.size() + 1, "offsets size");
  // Every (tensor, chunk) exactly once and in list order; slots name the right tensor; tables within their sizes.
  size_t t = 0;
  int64_t c = 0, seen = 0;
  auto skip_empty = [&] { while (t < numel.size() && c >= num_chunks(numel[t], chunk)) { ++t; c = 0; } };
  skip_empty();
  for (const auto& L : plan) {
    EXPECT(!L.entries.empty(), "empty launch");
    EXPECT(int(L.entries.size()) <= max_entries, "launch of %zu entries > %d", L.entries.size(), max_entries);
    EXPECT(int(L.tensors.size()) <= max_tensors, "launch of %zu tensors > %d", L.tensors.size(), max_tensors);
    std::vector<int> used(L.tensors.size(), 0);
    for (const auto& e : L.entries) {
      EXPECT(e.slot >= 0 && size_t(e.slot) < L.tensors.size(), "slot %d out of range", e.slot);
      if (e.slot < 0 || size_t(e.slot) >= L.tensors.size()) return;
      used[e.slot] = 1;
      EXPECT(t < numel.size() && size_t(L.tensors[e.slot]) == t && e.chunk == c,
             "entry (tensor %d, chunk %d), expected (%zu, %lld)", L.tensors[e.slot], e.chunk, t, (long long)c);
      const int64_t begin = int64_t(e.chunk) * chunk;
      EXPECT(begin < numel[L.tensors[e.slot]], "chunk past the end");
      EXPECT(off[t] + c < off.back(), "partial slot out of range");
      ++c;
      ++seen;
      skip_empty();
    }
    for (size_t k = 0; k < used.size(); ++k) EXPECT(used[k], "slot %zu has no entry", k);
    for (size_t k = 1; k < L.tensors.size(); ++k) EXPECT(L.tensors[k] > L.tensors[k - 1], "tensors out of order");
  }
  EXPECT(t == numel.size(), "plan ends at tensor %zu of %zu", t, numel.size());
  EXPECT(seen == off.back(), "%lld entries for %lld chunks", (long long)seen, (long long)off.back());
}

template <int V>
static void check_walk(int64_t n, bool vec_ok) {
  std::vector<int> hits(n, 0);
  int64_t vec_elems = 0;
  for (int tid = 0; tid < kThreads; ++tid) {
    walk_chunk<V>(
        n, vec_ok, tid,
        [&](int64_t i) {
          EXPECT(i % V == 0 && i + V <= n, "vector at %lld (V %d, n %lld)", (long long)i, V, (long long)n);
          for (int j = 0; j < V && i + j < n; ++j) ++hits[i + j];
          vec_elems += V;
        },
        [&](int64_t i) {
          EXPECT(i >= 0 && i < n, "element %lld of %lld", (long long)i, (long long)n);
          if (i >= 0 && i < n) ++hits[i];
        });
  }
  for (int64_t i = 0; i < n; ++i) EXPECT(hits[i] == 1, "element %lld of %lld visited %d times (V %d, vec %d)",
                                         (long long)i, (long long)n, hits[i], V, int(vec_ok));
  EXPECT(vec_elems == (vec_ok ? n / V * V : 0), "vector elements %lld", (long long)vec_elems);
}

int main() {
  static_assert(kChunk % (kThreads * 8) == 0, "chunk of whole vectors");
  // chunk_len: full chunks, then the rest
  EXPECT(chunk_len(kChunk * 3 + 5, kChunk * 3, kChunk) == 5 && chunk_len(kChunk * 3, kChunk * 2, kChunk) == kChunk,
         "chunk_len");
  // pick_chunk: kChunk for large tensors, ~8 chunks a tensor for mid-size ones, never below kMinChunk
  EXPECT(pick_chunk({}) == kChunk && pick_chunk({0, 0}) == kChunk, "pick_chunk of nothing");
  EXPECT(pick_chunk(std::vector<int64_t>(200, 500000)) == kChunk, "pick_chunk 100M / 200");
  EXPECT(pick_chunk(std::vector<int64_t>(200, 50000)) == 8192, "pick_chunk 10M / 200: %lld",
         (long long)pick_chunk(std::vector<int64_t>(200, 50000)));
  EXPECT(pick_chunk({1, 7, 0}) == kMinChunk, "pick_chunk of tiny tensors");
  EXPECT(num_chunks(0) == 0 && num_chunks(1) == 1 && num_chunks(kChunk) == 1 && num_chunks(kChunk + 1) == 2, "nc");
  // The kernels' real capacities and tiny ones (every boundary case is reached quickly).
  const int caps[][2] = {{kAdamMaxTensors, kMaxEntries}, {kLambMaxTensors, kMaxEntries},
                         {kClipMaxTensors, kMaxEntries}, {1, 1}, {2, 3}, {3, 2}, {5, 7}};
  std::mt19937_64 rng(12345);
  for (int trial = 0; trial < 400; ++trial) {
    const int n = int(rng() % 90);
    std::vector<int64_t> numel(n);
    for (auto& x : numel) {
      switch (rng() % 6) {
        case 0: x = 0; break;
        case 1: x = int64_t(rng() % 5) * kChunk; break;
        case 2: x = int64_t(rng() % 5) * kChunk + int64_t(rng() % 3) - 1; break;
        default: x = int64_t(rng() % 3000) + 1;
      }
      if (x < 0) x = 0;
    }
    const int64_t picked = pick_chunk(numel);
    EXPECT(picked % kMinChunk == 0 && picked >= kMinChunk && picked <= kChunk, "pick_chunk %lld", (long long)picked);
    for (const auto& cap : caps) check_plan(numel, cap[0], cap[1], trial % 3 == 0 ? kChunk : trial % 3 == 1 ? 1000
                                                                                                           : picked);
  }
  // Over one table: 200 tensors (> every tensor capacity), one tensor of 1000 chunks (> kMaxEntries).
  check_plan(std::vector<int64_t>(200, 12345), kAdamMaxTensors, kMaxEntries, kChunk);
  check_plan({7, 1000 * kChunk + 3, 0, 1, 2 * kChunk}, kLambMaxTensors, kMaxEntries, kChunk);
  check_plan({}, kAdamMaxTensors, kMaxEntries, kChunk);
  check_plan({0, 0}, kAdamMaxTensors, kMaxEntries, kChunk);
  const auto p1 = plan_chunks({1000 * kChunk + 3}, kLambMaxTensors, kMaxEntries);
  EXPECT(p1.size() == 4 && p1[3].entries.size() == 1001 - 3 * kMaxEntries, "a long tensor over 4 launches");
  // Element walks: chunk lengths around the vector and thread boundaries, all vector widths, both paths.
  const int64_t lens[] = {1, 2, 3, 4, 7, 8, 9, 97, 123, 511, 512, 513, 2047, 2048, 4095, 4097, 65535, kChunk};
  for (int64_t len : lens) {
    for (bool vec_ok : {true, false}) {
      check_walk<2>(len, vec_ok);
      check_walk<4>(len, vec_ok);
      check_walk<8>(len, vec_ok);
    }
  }
  if (failures) { std::printf("%d failures\n", failures); return 1; }
  std::printf("ok\n");
  return 0;
}
"""


def test_launch_plan_and_element_walk_on_host(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src, exe = tmp_path / "plan_check.cpp", tmp_path / "plan_check"
    src.write_text(HOST_CHECK)
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", "-DMLTK_OPTIM_PLAN_ONLY", "-I",
                            os.path.join(ROOT, "csrc", "cuda"), str(src), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-4000:] + run.stderr[-2000:]


# ---- argument checks on fake CUDA tensors (a CUDA build, no GPU needed) ----------------------------------------

def _fake_cuda(*shape, dtype=torch.float32):
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(*shape, device="cuda", dtype=dtype)


def test_backend_question_for_cuda_tensors():
    """The cuda backend's `supports`, asked in C++ (fused_adamw_unsupported), on fake CUDA tensors: no GPU needed."""
    from mltoolkit.ops.fused_adam import FUSED_ADAMW

    if _ext.cpp_unavailable():
        pytest.skip(_ext.cpp_unavailable())
    ask = FUSED_ADAMW.get("cuda").supports
    x, h = _fake_cuda(5), _fake_cuda(5, dtype=torch.float16)
    assert ask([x], [x], [x], [x]) is None and ask([h], [h]) is None
    assert ask([torch.zeros(5)], [x]) == "needs CUDA tensors, got params[0] on cpu"
    assert ask([_fake_cuda(5, dtype=torch.float64)], [x]) == \
        "float32 / float16 / bfloat16 only, got params[0] of Double"
    assert ask([x, x], [x, h]) == "grads / state of params[1] are not in its dtype, device and strides"
    assert ask([x], [x], [x], [_fake_cuda(6)]) == "grads / state of params[0] are not in its dtype, device and strides"
    assert ask([_fake_cuda(3, 4)[:, :2]], [x]) == "params[0] is not dense"
    assert ask([x], [x, x]) == "the tensor lists differ in length"


@needs_cuda_build
def test_glue_checks_name_the_argument():
    C = _ext._C
    x = _fake_cuda(5)
    s = [torch.tensor(0.0)]
    hp = (1e-3, 0.9, 0.999, 0.0, 1e-8, False, False)
    adam = lambda p, g, m, v, ms=(), steps=s, ams=False: C.fused_adamw_cuda(  # noqa: E731
        p, g, m, v, list(ms), steps, *hp[:5], ams, False)
    lamb = lambda p, g, m, v: C.fused_lamb_cuda(p, g, m, v, 1e-3, 0.9, 0.999, 1e-6, 0.0, 1, True, True, True, 0.0)  # noqa: E731
    cases = [
        (lambda: adam([torch.zeros(5)], [x], [x], [x]), r"fused_adamw_cuda: params\[0\] must be a CUDA tensor"),
        (lambda: adam([x], [_fake_cuda(5, dtype=torch.float16)], [x], [x]),
         r"fused_adamw_cuda: grads\[0\] must have params\[0\]'s dtype"),
        (lambda: adam([x], [x], [_fake_cuda(6)], [x]), r"exp_avgs\[0\] must have params\[0\]'s shape \(5,\)"),
        (lambda: adam([_fake_cuda(4, dtype=torch.float64)] * 1, [x], [x], [x]), r"params\[0\] must be float32"),
        (lambda: adam([x], [x], [x], [x], ams=True), "amsgrad needs max_exp_avg_sqs"),
        (lambda: adam([x], [x], [x], [x], steps=[torch.zeros(2)]), r"state_steps\[0\] must be a one-element"),
        (lambda: adam([x, x], [x], [x], [x], steps=s * 2), "must have one length"),
        (lambda: adam([_fake_cuda(3, 4)[:, :2]], [x], [x], [x]), r"params\[0\] must be non-overlapping and dense"),
        (lambda: lamb([x], [x], [x], [_fake_cuda(5, dtype=torch.float64)]), r"exp_avg_sqs\[0\] has dtype"),
        (lambda: lamb([_fake_cuda(5, dtype=torch.float16)], [x], [x], [x]), r"params\[0\] must be float32 or float64"),
        (lambda: lamb([x], [_fake_cuda(6)], [x], [x]), r"grads\[0\] has shape \(6,\) but params\[0\] has \(5,\)"),
        (lambda: lamb([_fake_cuda(3, 4)[:, :2]], [x], [x], [x]), r"params\[0\] must be non-overlapping and dense"),
        (lambda: C.fused_lamb_cuda([x], [x], [x], [x], 1e-3, 0.9, 0.999, 1e-6, 0.0, 0, True, True, True, 0.0),
         "step must be >= 1"),
        (lambda: C.fused_clip_grad_norm_cuda([x], 1.0, -1.0, False), "norm_type must be a finite p > 0 or inf"),
        (lambda: C.fused_clip_grad_norm_cuda([], 1.0, 2.0, False), "grads must not be empty"),
        (lambda: C.fused_clip_grad_norm_cuda([x, torch.zeros(3)], 1.0, 2.0, False),
         r"grads\[1\] must be a CUDA tensor"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


# ---- GPU -------------------------------------------------------------------------------------------------------

# Odd sizes, a 0-size tensor, exact chunk multiples, one tensor over several chunks.
SHAPES = [(1,), (7,), (97,), (123, 5), (0,), (CHUNK,), (CHUNK + 1,), (3 * CHUNK + 5,), (33, 17), (2, 4097)]


def _place(t, device, unaligned):
    """t on device; unaligned: starting one element into its storage (not 16-byte aligned: the scalar path)."""
    if not unaligned:
        return t.to(device)
    u = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:].view(t.shape)
    u.copy_(t)
    return u


def _tensors(shapes, device, dtype=torch.float32, seed=0, unaligned=(), scale=1.0, positive=False):
    """One tensor per shape; those whose index is in `unaligned` are placed off 16-byte alignment."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        t = torch.randn(s, generator=g) * scale
        out.append(_place((t.abs() if positive else t).to(dtype), device, i in unaligned))
    return out


def _adam_state(shapes, device, dtype, amsgrad, unaligned=()):
    """Unaligned tensors at different indices per list: any one unaligned pointer sends a chunk to the scalar path."""
    shifted = {i + 1 for i in unaligned}
    p = _tensors(shapes, device, dtype, 0, unaligned)
    g = _tensors(shapes, device, dtype, 1, shifted)
    m = _tensors(shapes, device, dtype, 2, scale=0.1)
    v = _tensors(shapes, device, dtype, 3, unaligned, scale=0.01, positive=True)
    vm = _tensors(shapes, device, dtype, 3, shifted, scale=0.015, positive=True) if amsgrad else []
    steps = [torch.tensor(float(i % 3)) for i in range(len(shapes))]
    return [p, g, m, v, vm, steps]


def _copy(state, device):
    return [[t.detach().to(device).clone() for t in lst] for lst in state]


@pytest.mark.cuda
@pytest.mark.parametrize("amsgrad,maximize,wd", [(False, False, 0.01), (True, False, 0.1), (False, True, 0.0),
                                                 (True, True, 0.0)])
def test_adamw_matches_cpu_kernel_and_reference(amsgrad, maximize, wd):
    _require_gpu()
    shapes = SHAPES * 4  # 40 tensors: more than one launch table (32 tensors)
    gpu = _adam_state(shapes, "cuda", torch.float32, amsgrad, unaligned={1, 7, 12})
    cpu = _copy(gpu, "cpu")
    hp = (3e-3, 0.8, 0.95, wd, 1e-6, amsgrad, maximize)
    for _ in range(3):
        _ext._C.fused_adamw_cuda(*gpu, *hp)
        reference_adamw_(*cpu, *hp)
    for name, a, b in zip(("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"), gpu, cpu):
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x.cpu(), y, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, i=i: f"{name}[{i}]: {m}")


def _require_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    if _ext.cuda_unavailable():
        pytest.skip(_ext.cuda_unavailable())


@pytest.mark.cuda
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)])
def test_adamw_optimizer_matches_torch_fused(amsgrad, maximize):
    _require_gpu()
    shapes = [(7,), (97, 3), (0,), (123, 5), (1,), (CHUNK + 3,), (64, 64)] * 6  # 42 tensors
    ours = [torch.nn.Parameter(t) for t in _tensors(shapes, "cuda")]
    theirs = [torch.nn.Parameter(t.detach().clone()) for t in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, amsgrad=amsgrad, maximize=maximize)
    opt = AdamW(ours, **kw)
    ref = torch.optim.AdamW(theirs, fused=True, **kw)
    assert table("fused_adamw").select(ours, ours, ours, ours, [], []).name == "cuda"
    g = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(10):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, device="cuda", generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adamw_half_precision_float32_math(dtype):
    _require_gpu()
    shapes = [(1,), (7,), (200,), (CHUNK + 9,), (3, 5)]
    gpu = _adam_state(shapes, "cuda", dtype, False, unaligned={2})
    up = [[t.float().cpu() for t in lst] if i < 5 else [t.clone() for t in lst] for i, lst in enumerate(gpu)]
    hp = (1e-2, 0.9, 0.999, 0.1, 1e-8, False, False)
    _ext._C.fused_adamw_cuda(*gpu, *hp)
    reference_adamw_(*up, *hp)
    for k in (0, 2, 3):
        for got, want in zip(gpu[k], up[k]):
            # float32 math, one rounding to dtype at the end: equal to the float32 result rounded
            torch.testing.assert_close(got.float().cpu(), want.to(dtype).float(), rtol=1e-2, atol=1e-3)
    assert all(s.item() == float(i % 3) + 1 for i, s in enumerate(gpu[5]))


@pytest.mark.cuda
def test_adamw_mixed_dtypes_and_permuted_layout():
    _require_gpu()
    p = [torch.randn(9, 13, device="cuda").t(), torch.randn(50, device="cuda", dtype=torch.bfloat16),
         torch.randn(70, device="cuda")]
    g = [torch.randn_like(t) for t in p]
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    s = [torch.tensor(0.0) for _ in p]
    cpu = _copy([p, g, m, v, [], s], "cpu")
    cpu = [[t.float() for t in lst] for lst in cpu]
    hp = (1e-2, 0.9, 0.999, 0.01, 1e-8, False, False)
    assert table("fused_adamw").select(p, g, m, v, [], s).name == "cuda"
    torch.ops.mltoolkit.fused_adamw_(p, g, m, v, [], s, *hp)
    reference_adamw_(*cpu, *hp)
    for got, want in zip(p, cpu[0]):
        tol = dict(rtol=1e-2, atol=1e-2) if got.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.float().cpu(), want.to(got.dtype).float(), **tol)
    assert p[0].stride() == (1, 13)


def _lamb_problem(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda scale: [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in shapes]  # noqa: E731
    state = [mk(1.0), mk(0.1), mk(0.01), [t.abs() for t in mk(0.001)]]
    return [[t.to(device) for t in lst] for lst in state]


LAMB_SHAPES = [(1,), (7,), (97,), (123, 5), (0,), (CHUNK,), (2 * CHUNK + 1,), (33, 33)] * 6  # 48 > 36 per table


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", [dict(), dict(use_trust_ratio=False), dict(max_trust_ratio=0.5),
                                  dict(bias_correction=False, grad_averaging=False, weight_decay=0.0)])
def test_lamb_matches_cpu_kernel(dtype, opts):
    _require_gpu()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
              grad_averaging=True, use_trust_ratio=True, max_trust_ratio=0.0)
    kw.update(opts)
    gpu = _lamb_problem(LAMB_SHAPES, dtype, "cuda")
    gpu[0][3].zero_()  # ||p|| = 0: trust 1
    cpu = [[t.cpu().clone() for t in lst] for lst in gpu]
    run_cpu = _ext._C.fused_lamb_cpu if _ext.cpp_unavailable() is None else reference_lamb
    args = lambda step: (kw["lr"], kw["beta1"], kw["beta2"], kw["eps"], kw["weight_decay"], step,  # noqa: E731
                         kw["bias_correction"], kw["grad_averaging"], kw["use_trust_ratio"], kw["max_trust_ratio"])
    for step in (1, 2, 3):
        _ext._C.fused_lamb_cuda(*gpu, *args(step))
        run_cpu(*cpu, *args(step))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for k, name in enumerate(("params", "grads", "exp_avgs", "exp_avg_sqs")):
        for i, (a, b) in enumerate(zip(gpu[k], cpu[k])):
            torch.testing.assert_close(a.cpu(), b, **tol, msg=lambda m, name=name, i=i: f"{name}[{i}]: {m}")


@pytest.mark.cuda
def test_lamb_deterministic_and_selected():
    _require_gpu()
    a = _lamb_problem(LAMB_SHAPES[:16], torch.float32, "cuda", seed=4)
    b = [[t.clone() for t in lst] for lst in a]
    assert table("fused_lamb").select(*a).name == "cuda"
    for state in (a, b):
        for step in (1, 2):
            torch.ops.mltoolkit.fused_lamb_(*state, 1e-2, 0.9, 0.999, 1e-6, 0.01, step, True, True, True, 0.0)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_clip_matches_torch(norm_type, dtype, max_norm):
    _require_gpu()
    shapes = [(1,), (7,), (97,), (0,), (123, 5), (CHUNK + 1,), (3 * CHUNK,)] * 10  # 70 tensors > 64 per table
    ours = _tensors(shapes, "cuda", dtype, seed=5, unaligned={1, 9})
    theirs = [t.clone() for t in ours]
    total = _ext._C.fused_clip_grad_norm_cuda(ours, max_norm, norm_type, False)
    # torch's inf norm refuses empty tensors (no identity); they add nothing to the total anyway
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in theirs if t.numel()]
    for p, t in zip(params, [t for t in theirs if t.numel()]):
        p.grad = t
    want = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    assert total.dtype == dtype and total.dim() == 0 and total.is_cuda
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(total, want, rtol=rtol, atol=0)
    for a, p in zip([t for t in ours if t.numel()], params):
        torch.testing.assert_close(a, p.grad, rtol=rtol, atol=1e-7)


@pytest.mark.cuda
def test_clip_nonfinite_and_empty():
    _require_gpu()
    g = [torch.tensor([1.0, float("inf"), 0.0, 2.0], device="cuda"), torch.ones(5, device="cuda")]
    keep = [t.clone() for t in g]
    with pytest.raises(RuntimeError, match="non-finite"):
        _ext._C.fused_clip_grad_norm_cuda(g, 1.0, 2.0, True)
    for a, b in zip(g, keep):
        assert torch.equal(a, b)
    assert math.isinf(float(_ext._C.fused_clip_grad_norm_cuda(g, 1.0, 2.0, False)))
    n = [torch.tensor([1.0, float("nan")], device="cuda")]
    assert math.isnan(float(_ext._C.fused_clip_grad_norm_cuda(n, 1.0, math.inf, False)))
    assert torch.isnan(n[0]).all()  # coef nan, as torch
    z = [torch.zeros(0, device="cuda")]
    assert float(_ext._C.fused_clip_grad_norm_cuda(z, 1.0, 2.0, False)) == 0.0
    with mltoolkit.backend("cuda"):
        x = [torch.full((10,), 3.0, device="cuda")]
        total = lamb_ops.fused_clip_grad_norm_(x, 1.0)
    torch.testing.assert_close(total.cpu(), torch.tensor(math.sqrt(90.0)))
