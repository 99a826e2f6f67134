// CPU 2-D convolution, forward and backward; the contract is in csrc/conv.h.
//
// Math in acc_t: float, or double for float64. fp16/bf16 inputs are widened to float once up front (x, weight, dy)
// and the results rounded back at the end; the kernels below only see float or double.
//
// Forward (non-depthwise): the indirect-GEMM micro-kernel of conv_gemm.h, Y^T[pixels x K] = col^T * W^T, with the rows
// of col^T read in place from channels-last x (one pointer per output pixel and filter tap, a zero vector in the
// padding: no im2col copy) and W^T packed in panels of output channels once per call. The epilogue act(conv + bias
// + residual) is applied to each register tile as it is stored. An NCHW x is transposed to channels-last first (one
// pass over x against R*S*K multiply-adds per element) and each finished tile transposed into NCHW y with the
// epilogue; NCHW 1x1 convolutions instead run the kernel the other way round on x's rows in place (no copy at all).
// 3x3 stride-1 convolutions with enough channels take Winograd F(2x2, 3x3) instead (fwd_winograd: 4/9 of the
// multiply-adds, the 16 transform-domain products on the same kernel).
// Tasks (pixel runs x channel panels) are handed out dynamically (parallel_tasks).
// Depthwise (C/groups == K/groups == 1) uses direct channels-last kernels, forward and backward (vectorized over c,
// blocks of pixels in registers), with the epilogue on each finished block; the NCHW forward transposes per task in
// cache (or, for big planes, runs a flat kernel along the planes' rows), the NCHW backward around the whole tensors.
//
// Backward: dx of a stride-1 convolution is the forward convolution of dy with the flipped, transposed weight, on the
// forward's kernel (dx_as_forward). Otherwise dx = col2im(W^T dy), one task per (image, group, block of input
// channels): a task owns its dx channels, so the scatter-add has no races. dW = sum over images and pixels of
// dy * col^T (NCHW: one task per (group, block of dW columns); NHWC: transposed, one task per (group, block of Kc
// rows)), each task summing over pixel tiles in a fixed order; these products run on the register-blocked kernel of
// attention_gemm.h (B packed in panels). db = sum of dy in a fixed order. Results are bitwise the same for any
// thread count: every output element is computed by one task in a fixed order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../check_util.h"
#include "../conv.h"
#include "../conv_args.h"
#include "../conv_epilogue.h"
#include "attention_gemm.h"
#include "conv_gemm.h"
#include "reused_memory.h"
#include "scratch.h"
#include "transpose.h"

// This file compiles twice: as itself with the float kernels (float16 and bfloat16 inputs accumulate in float too),
// and through conv_f64.cpp with the double ones (MLTK_CONV_F64), so that the two halves build in parallel: as one
// file it took ~250 s, the longest compile of the build on the 2-core VM and on the GPU machines. ConvAcc is this
// translation unit's accumulation type; the double unit's entry points carry an _f64 suffix, and the float unit's
// hand double inputs to them.
#ifdef MLTK_CONV_F64
#define MLTK_CONV_ENTRY(name) name##_f64
#else
#define MLTK_CONV_ENTRY(name) name
#endif

namespace mltoolkit {

#ifndef MLTK_CONV_F64
std::vector<at::Tensor> conv2d_forward_cpu_f64(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                                               std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                               int64_t groups, const std::optional<at::Tensor>& residual,
                                               const std::string& activation);
std::vector<at::Tensor> conv2d_forward_prepared_cpu_f64(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
    const std::optional<at::Tensor>& residual, const std::string& activation,
    const std::optional<at::Tensor>& prepared_panels, const std::optional<at::Tensor>& prepared_winograd);
std::vector<at::Tensor> conv2d_prepare_weight_cpu_f64(const at::Tensor& weight, int64_t groups,
                                                      std::vector<int64_t> stride, std::vector<int64_t> dilation);
std::vector<at::Tensor> conv2d_backward_cpu_f64(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                std::vector<int64_t> dilation, int64_t groups,
                                                std::vector<bool> output_mask);
#endif

namespace {

#ifdef MLTK_CONV_F64
using ConvAcc = double;
#else
using ConvAcc = float;
#endif

using cpu::transpose;
using cpu::transpose16;

using attn::gemm;
using attn::kPanel;
using attn::round_up_panel;

// Backward (attention_gemm.h kernel). Depth (Kc) chunk of one GEMM pass: a B sub-panel of kKcBytes / sizeof(T) rows
// x one panel stays in L1.
constexpr int64_t kKcBytes = 1024;
// Rows of A per pass (A block = rows x Kc chunk, in L2). Multiple of the 6-row kernel.
constexpr int64_t kRowsPerBlock = 120;
// Pixels per tile of the NCHW dx: at most this many bytes of dy (stays in L2).
constexpr int64_t kColTileBytes = 512 * 1024;
// Output pixels per tile in the NHWC dx (rows of A; multiple of the 6-row kernel).
constexpr int64_t kPixRows = 96;
// Pixels per reduction tile in dW (B panel = that many rows x one panel).
constexpr int64_t kRedPix = 256;

struct Geo : conv_args::Geometry {
  bool nhwc;
  int64_t Kc() const { return Cg * R * S; }
  int64_t PQ() const { return P * Q; }
  int64_t HW() const { return H * W; }
  // 1x1, stride 1, no padding: output pixel i is input pixel i.
  bool same_pixels() const { return R == 1 && S == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0; }
};

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

at::MemoryFormat layout_of(const char* fn, const char* name, const at::Tensor& t) {
  at::MemoryFormat fmt = t.suggest_memory_format();
  if (t.is_contiguous(fmt)) return fmt;
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(false, fn, ": ", name, " must be contiguous in NCHW or channels_last memory format, got strides ",
              shape_str(t.strides()), " for shape ", shape_str(t.sizes()));
}

Geo check_args(const char* fn, const at::Tensor& x, const at::Tensor& weight, const std::vector<int64_t>& stride,
               const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups) {
  TORCH_CHECK(x.defined(), fn, ": x must be a tensor, got an undefined one");
  TORCH_CHECK(weight.defined(), fn, ": weight must be a tensor, got an undefined one");
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(weight.device().is_cpu(), fn, ": weight must be a CPU tensor, got device ", weight.device());
  TORCH_CHECK(x.layout() == at::kStrided, fn, ": x must be a dense (strided) tensor, got layout ", x.layout());
  TORCH_CHECK(weight.layout() == at::kStrided, fn, ": weight must be a dense (strided) tensor, got layout ",
              weight.layout());
  TORCH_CHECK(supported_dtype(x.scalar_type()), fn,
              ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), fn, ": weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  Geo g{conv_args::check(fn, x, weight, stride, padding, dilation, groups), false};
  g.nhwc = layout_of(fn, "x", x) == at::MemoryFormat::ChannelsLast;
  layout_of(fn, "weight", weight);
  return g;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Whether the double translation unit takes this call (an undefined tensor stays here, where the checks name it).
[[maybe_unused]] bool is_double(const at::Tensor& t) { return t.defined() && t.scalar_type() == at::kDouble; }

at::MemoryFormat fmt_of(const Geo& g) {
  return g.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Weight as (K, Cg*R*S) in (c, r, s) order, or in (r, s, c) order for NHWC.
at::Tensor weight_rows(const at::Tensor& weight, at::ScalarType acc, bool rsc) {
  at::Tensor w = weight.to(acc);
  return rsc ? w.permute({0, 2, 3, 1}).contiguous() : w.contiguous();
}

// Tasks per parallel chunk so that one chunk does at least ~256K multiply-adds.
int64_t grain_for(int64_t macs_per_task) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, macs_per_task));
}

// Runs task(t, scratch) for t in [0, ntasks) on the intra-op threads, each thread claiming the next run of tasks
// from a shared counter rather than a fixed share: on a machine shared with other processes a thread that loses its
// core for a while no longer holds the others up at the end. The runs shrink as the work does (guided scheduling:
// a run is the remaining tasks / (2 x threads)), so that a thread walks long stretches of consecutive tasks, which
// read and write consecutive memory: claimed one at a time, the two threads' tasks interleaved and the hardware
// prefetchers lost the streams (a 1x1 layer with 32 input and 16 output channels at 112 x 112 ran 1.2x faster on
// two threads than on one; 2026-11-27). Each task owns its outputs, so the results do not depend on which thread
// ran it. make_scratch() builds one thread's buffers.
template <typename MakeScratch, typename Task>
void parallel_tasks(int64_t ntasks, const MakeScratch& make_scratch, const Task& task) {
  std::atomic<int64_t> next{0};
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    int64_t start = next.load(std::memory_order_relaxed), run = 0;
    for (;;) {
      do {
        if (start >= ntasks) return;
        run = std::max<int64_t>(1, (ntasks - start) / (2 * nth));
      } while (!next.compare_exchange_weak(start, start + run, std::memory_order_relaxed));
      for (int64_t t = start; t < start + run; ++t) task(t, scratch);
      start = next.load(std::memory_order_relaxed);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Forward

// Valid q range for one filter column: iw = q*sw + off in [0, W).
inline void q_range(int64_t off, int64_t sw, int64_t W, int64_t Q, int64_t& qlo, int64_t& qhi) {
  if (sw == 1) {  // no divisions on the common path (this runs once per im2col run)
    qlo = std::max<int64_t>(0, -off);
    qhi = std::max(qlo, std::min(Q, W - off));
    return;
  }
  qlo = off < 0 ? (-off + sw - 1) / sw : 0;
  qhi = W - 1 - off < 0 ? 0 : std::min(Q, (W - 1 - off) / sw + 1);
  if (qhi < qlo) qhi = qlo;
}

// A tile of output pixels [p0, p0 + pc) cut into runs that lie in one output row (and in one B panel of `split`
// columns), so that im2col / col2im move whole runs of x's rows instead of testing every element.
// p0 counts pixels across images (n * P * Q + pixel), so a tile may span images when P * Q is small.
struct Seg {
  int64_t j0, len, ih0, iw0;  // tile column, run length, input row and column of the run's first tap (0, 0)
  int64_t n, pix;             // image and output pixel of the run's start
};

void make_segs(const Geo& g, int64_t p0, int64_t pc, int64_t split, std::vector<Seg>& segs) {
  segs.clear();
  const int64_t PQ = g.PQ();
  for (int64_t j = 0; j < pc;) {
    const int64_t n = (p0 + j) / PQ, pix = (p0 + j) % PQ, oh = pix / g.Q, ow = pix % g.Q;
    const int64_t len = std::min({g.Q - ow, pc - j, split - j % split});
    segs.push_back({j, len, oh * g.sh - g.ph, ow * g.sw - g.pw, n, pix});
    j += len;
  }
}

// dst[t * ds] = row(ih0 + r*dh)[iw0 + s*dw + t*sw] for t < len, zero outside x.
template <typename T>
inline void copy_run(const Geo& g, const T* xc, const Seg& sg, int64_t r, int64_t s, T* dst, int64_t ds) {
  const int64_t ih = sg.ih0 + r * g.dh;
  if (ih < 0 || ih >= g.H) {
    for (int64_t t = 0; t < sg.len; ++t) dst[t * ds] = T(0);
    return;
  }
  const int64_t off = sg.iw0 + s * g.dw;
  int64_t lo, hi;
  q_range(off, g.sw, g.W, sg.len, lo, hi);
  const T* xr = xc + ih * g.W + off;
  if (g.sw == 1 && ds == 1 && lo == 0 && hi == sg.len && sg.len * int64_t(sizeof(T)) == 64) {
    std::memcpy(dst, xr, 64);  // the common case, a whole panel row from inside x: two vector moves
    return;
  }
  for (int64_t t = 0; t < lo; ++t) dst[t * ds] = T(0);
  if (g.sw == 1 && ds == 1) {
    for (int64_t t = lo; t < hi; ++t) dst[t] = xr[t];
  } else {
    for (int64_t t = lo; t < hi; ++t) dst[t * ds] = xr[t * g.sw];
  }
  for (int64_t t = hi; t < sg.len; ++t) dst[t * ds] = T(0);
}

// Rows [p0, p0 + pc) of col^T for NHWC x, columns [i0, i1) of the (r, s, c) order: dst row j = pixel p0 + j,
// counted across images (n * P * Q + pixel).
template <typename T>
void im2col_rows_nhwc(const Geo& g, const T* x, int64_t gg, int64_t p0, int64_t pc, int64_t i0, int64_t i1,
                      T* dst) {
  const int64_t ld = i1 - i0, rs0 = i0 / g.Cg, rs1 = (i1 - 1) / g.Cg;
  for (int64_t j = 0; j < pc; ++j) {
    const int64_t n = (p0 + j) / g.PQ(), pix = (p0 + j) % g.PQ();
    const int64_t ih0 = (pix / g.Q) * g.sh - g.ph, iw0 = (pix % g.Q) * g.sw - g.pw;
    T* row = dst + j * ld;
    for (int64_t rs = rs0; rs <= rs1; ++rs) {
      const int64_t r = rs / g.S, s = rs % g.S, ih = ih0 + r * g.dh, iw = iw0 + s * g.dw;
      const int64_t c0 = std::max(i0, rs * g.Cg) - rs * g.Cg, c1 = std::min(i1, (rs + 1) * g.Cg) - rs * g.Cg;
      T* d = row + rs * g.Cg + c0 - i0;
      if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
        std::memcpy(d, x + ((n * g.H + ih) * g.W + iw) * g.C + gg * g.Cg + c0, (c1 - c0) * sizeof(T));
      else
        std::memset(d, 0, (c1 - c0) * sizeof(T));
    }
  }
}

// Whether the forward GEMM's taps are the filter's rows (S*Cg elements each) rather than its R*S pixels: when a
// pixel's channels are less than a cache line, a pass over them would be too short.
bool filter_row_taps(const Geo& g, size_t elem) { return g.S > 1 && g.Cg * int64_t(elem) < 64; }

// Every cache line of [begin, end).
template <typename T>
inline void prefetch_span(const T* begin, const T* end) {
  const uintptr_t e = reinterpret_cast<uintptr_t>(end);
  for (uintptr_t a = reinterpret_cast<uintptr_t>(begin) & ~uintptr_t(63); a < e; a += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
}

// A whole vector to p (aligned to the vector's size) with a non-temporal store: to memory without reading the line
// first and without keeping it in cache. The caller ends its stores with stream_fence().
template <typename T>
inline void stream_store(T* p, const convk::Vec<T>& v) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, __m512(v));
  else _mm512_stream_pd(p, __m512d(v));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, __m256(v));
  else _mm256_stream_pd(p, __m256d(v));
#else
  v.store(p);
#endif
}

// Orders a thread's non-temporal stores before whatever follows (they are weakly ordered).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Depth chunk of the forward: the packed weights of one chunk (taps x channels x one panel) stay in L2 while the
// pixel blocks of a task stream past them.
constexpr int64_t kBChunkBytes = 256 * 1024;
// Blocks of convk::kMR output pixels per forward task.
constexpr int64_t kBlocksPerTask = 8;
// Images of at most this many output pixels (32 x 32) run their pixels in tap order (fwd_igemm's by_taps); from
// 56 x 56 up the padding's share is ~1% and the gain within noise.
constexpr int64_t kByTapsPixels = 1024;

// An NCHW x (geometry g: N, C, H, W) copied channels-last, so that the kernels read C-vectors in place: one pass
// over x against R*S*K multiply-adds per element. The copy's memory comes from the reused-memory pool: a fresh
// allocation of an activation's size was mapped and page-faulted on every call (38 MB for 96 channels at 112 x 112,
// batch 8).
template <typename T>
at::Tensor channels_last_copy(const Geo& g, const T* x) {
  constexpr int64_t B = 64;
  const int64_t HW = g.HW(), nb = (HW + B - 1) / B;
  at::Tensor copy = empty_reusing_memory({g.N * g.C * HW}, at::TensorOptions(c10::CppTypeToScalarType<T>::value));
  T* const xt = copy.mutable_data_ptr<T>();
  parallel_tasks(g.N * nb, [] { return 0; }, [&](int64_t t, int) {
    const int64_t n = t / nb, hw0 = (t % nb) * B;
    transpose(x + n * g.C * HW + hw0, HW, xt + (n * HW + hw0) * g.C, g.C, g.C, std::min(B, HW - hw0));
  });
  return copy;
}

// y (NCHW) = act(yl + res) for yl channels-last (res NCHW, or null), by blocks of pixels transposed in cache.
template <typename T>
void to_nchw_epilogue(const Geo& g, const T* yl, const T* res, Act act, T* y) {
  constexpr int64_t B = 64;
  const int64_t PQ = g.PQ(), nb = (PQ + B - 1) / B;
  const bool plain = !res && act == Act::kNone;
  parallel_tasks(g.N * nb, [&] { return std::vector<T>(plain ? 0 : g.K * B); }, [&](int64_t t, std::vector<T>& tmp) {
    const int64_t n = t / nb, p0 = (t % nb) * B, len = std::min(B, PQ - p0);
    const T* src = yl + (n * PQ + p0) * g.K;
    if (plain) {
      transpose(src, g.K, y + n * g.K * PQ + p0, PQ, len, g.K);
      return;
    }
    transpose(src, g.K, tmp.data(), B, len, g.K);
    for (int64_t k = 0; k < g.K; ++k) {
      const int64_t off = (n * g.K + k) * PQ + p0;
      convk::epilogue_row<T>(y + off, tmp.data() + k * B, len, T(0), res ? res + off : nullptr, act);
    }
  });
}

// W^T in panels of Pn output channels: panel (gg, j) row (r, s, c) = w[gg * Kg + j * Pn + lane][(r, s, c)], zero
// past Kg, from the weight's rows w (K, Kc) in their own memory order, (r, s, c) if w_rsc, else (c, r, s): the latter
// are reordered per 16 rows in cache on the way (a kernel reading B rows R*S apart ran ~10% slower): transposed whole
// (16 x 16 register blocks) into tmp, whose rows (c, r, s) are then copied to the panel rows (r, s, c). Transposing
// each row's (Cg x RS) block first, as before, ran the 9-wide 3x3 blocks through at::vec's generic edge loop: 2.7x
// the time of packing channels-last weights (1.75 vs 0.65 ms for a 512 -> 512 3x3 weight, 2 threads).
// Panels of Pn output channels per group, and the sizes of the two weight layouts the forward derives (packed on
// each call, or prepared once: conv2d_prepare_weight_cpu, checked against these by check_prepared).
int64_t panel_count(const Geo& g, int64_t Pn) { return (g.Kg + Pn - 1) / Pn; }
int64_t panels_numel(const Geo& g, int64_t Pn) { return g.G * panel_count(g, Pn) * g.Kc() * Pn; }
int64_t winograd_numel(const Geo& g, int64_t Pn) { return 16 * panel_count(g, Pn) * g.C * Pn; }  // one group

template <typename T>
std::unique_ptr<T[]> pack_weight_panels(const Geo& g, const T* w, bool w_rsc, int64_t Pn) {
  constexpr int64_t B = 16;
  const int64_t Kc = g.Kc(), RS = g.R * g.S, npan = panel_count(g, Pn);
  std::unique_ptr<T[]> bw(new T[panels_numel(g, Pn)]);  // every element is written below
  auto make_tmp = [&] { return std::vector<T>(w_rsc ? 0 : B * Kc); };
  parallel_tasks(g.G * npan, make_tmp, [&](int64_t u, std::vector<T>& tmp) {
    const int64_t gg = u / npan, j0 = (u % npan) * Pn, jl = std::min(Pn, g.Kg - j0);
    T* panel = bw.get() + u * Kc * Pn;
    for (int64_t k0 = 0; k0 < jl; k0 += B) {
      const int64_t kl = std::min(B, jl - k0);
      const T* src = w + (gg * g.Kg + j0 + k0) * Kc;
      if (w_rsc) {
        transpose(src, Kc, panel + k0, Pn, kl, Kc);
        continue;
      }
      transpose(src, Kc, tmp.data(), B, kl, Kc);  // tmp[(c, rs) * B + i] = w row k0 + i at (c, rs)
      const T* t = tmp.data();
      for (int64_t c = 0; c < g.Cg; ++c)
        for (int64_t rs = 0; rs < RS; ++rs, t += B) {
          T* dst = panel + (rs * g.Cg + c) * Pn + k0;
          if (kl == B) std::memcpy(dst, t, B * sizeof(T));
          else std::copy(t, t + kl, dst);
        }
    }
    if (jl < Pn)
      for (int64_t p = 0; p < Kc; ++p) std::fill(panel + p * Pn + jl, panel + (p + 1) * Pn, T(0));
  });
  return bw;
}

// The panels of the dx-as-forward convolution (see dx_as_forward), straight from the weight's rows w (K, Kc) in
// (r, s, c) order if w_rsc, else (c, r, s): panel (gg, j) row (r, s, k) = w[gg * Kg + k][j * Pn + lane][R-1-r][S-1-s],
// zero past Cg. From (r, s, c) rows each panel row is a contiguous piece of one weight row.
template <typename T>
std::unique_ptr<T[]> pack_dx_panels(const Geo& g, const T* w, bool w_rsc, int64_t Pn) {
  const int64_t Kc = g.Kc(), RS = g.R * g.S, npan = (g.Cg + Pn - 1) / Pn, rows = RS * g.Kg;
  std::unique_ptr<T[]> bw(new T[g.G * npan * rows * Pn]);
  const T* const wend = w + g.K * Kc;
  parallel_tasks(g.G * npan, [] { return std::vector<T>(16 * 16); }, [&](int64_t u, std::vector<T>& tmp) {
    const int64_t gg = u / npan, c0 = (u % npan) * Pn, cl = std::min(Pn, g.Cg - c0);
    T* panel = bw.get() + u * rows * Pn;
    auto dst_row = [&](int64_t rs, int64_t k) { return panel + ((RS - 1 - rs) * g.Kg + k) * Pn; };  // tap RS-1-rs
    for (int64_t k = 0; k < g.Kg; ++k) {
      const T* wr = w + (gg * g.Kg + k) * Kc;
      int64_t c = 0;
      if (!w_rsc && RS <= 16) {
        // (c, r, s) rows: 16 input channels' taps (16 rows RS apart, read 16 wide: the columns past RS belong to the
        // next channel) transposed in registers, its first RS rows kept. Through at::vec's generic loop for the
        // narrow blocks (or a strided gather) the packing took as long as the 7 x 7 layers' multiply-adds.
        for (; c + 16 <= cl && wr + (c0 + c + 15) * RS + 16 <= wend; c += 16) {
          transpose16(wr + (c0 + c) * RS, RS, tmp.data(), 16);
          for (int64_t rs = 0; rs < RS; ++rs) std::copy_n(tmp.data() + rs * 16, 16, dst_row(rs, k) + c);
        }
      }
      for (int64_t rs = 0; rs < RS; ++rs) {
        T* dst = dst_row(rs, k);
        if (w_rsc) std::copy(wr + rs * g.Cg + c0, wr + rs * g.Cg + c0 + cl, dst);
        else
          for (int64_t cc = c; cc < cl; ++cc) dst[cc] = wr[(c0 + cc) * RS + rs];
        std::fill(dst + cl, dst + Pn, T(0));
      }
    }
  });
  return bw;
}

// Forward of every non-depthwise convolution, both layouts: the indirect GEMM of conv_gemm.h over channels-last x
// (the input itself, or an NHWC copy of an NCHW input), y = act(conv + bias + residual) applied to each tile as it
// leaves the registers (NHWC y) or as it is transposed into y (NCHW y, through a per-task buffer).
// Tasks: (group, run of kBlocksPerTask x kMR output pixels counted across images, panels of Pn output channels).
// Small Cg (the RGB stem, see filter_row_taps): the taps are the filter's rows instead, each a run of S*Cg elements,
// read in place where the run lies inside x, else copied with its zeros into a per-pixel row (the borders; every
// pixel for groups or dilation).
// pack(Pn): the weight in panels of Pn output channels, rows in (r, s, c) order (pack_weight_panels).
template <typename T, int NR, typename Pack>
void fwd_igemm(const Geo& g, const T* x, const Pack& pack, const T* bias, const T* res, Act act, T* y) {
  constexpr int64_t MR = convk::igemm_rows<NR>(), Pn = NR * convk::Vec<T>::size();
  const int64_t Kc = g.Kc(), RS = g.R * g.S, PQ = g.PQ(), NPQ = g.N * PQ;
  const int64_t npan = panel_count(g, Pn), Kgp = npan * Pn;
  const auto bw = pack(Pn);  // owned (packed now) or borrowed (prepared): both have get()
  std::vector<T> bias_p(bias ? g.G * Kgp : 0, T(0));  // zero-padded per group, so that whole panels can be loaded
  for (int64_t k = 0; bias && k < g.K; ++k) bias_p[(k / g.Kg) * Kgp + k % g.Kg] = bias[k];
  const bool row_taps = filter_row_taps(g, sizeof(T));
  // Output pixel i reads input pixel i, rows C apart: no divisions per block.
  const bool pointwise = g.same_pixels() && !row_taps;
  const int64_t ntaps = row_taps ? g.R : RS, cdim = row_taps ? g.S * g.Cg : g.Cg;
  // A filter row's S taps are one run of x when its pixels are adjacent and their channels are all of x's.
  const bool adjacent = g.dw == 1 && g.Cg == g.C;
  const int64_t ldb = Pn, tap_stride = cdim * Pn;  // B row of (tap, channel)
  const int64_t nch = std::max<int64_t>(1, (ntaps * cdim * Pn * int64_t(sizeof(T)) + kBChunkBytes - 1) / kBChunkBytes);
  const int64_t kc = (cdim + nch - 1) / nch;
  const int64_t SB = kBlocksPerTask * MR, nsb = (NPQ + SB - 1) / SB;
  // Panels per task: all of those whose weights fit the chunk budget together (1x1 layers with few input channels),
  // so that the task's rows of x are read from memory once, not once per panel.
  const int64_t ppt = std::clamp<int64_t>(kBChunkBytes / (Kc * Pn * int64_t(sizeof(T))), 1, npan);
  const int64_t npg = (npan + ppt - 1) / ppt;
  const std::vector<T> zero(cdim, T(0));
  // Small images: the output pixels in the order of the taps that land inside x (interior, each edge, each corner;
  // across images), so that a block's pixels mostly drop the same taps. In pixel order a block of 6 straddled the
  // rows of a 7-wide image and kept a tap unless all six pixels missed it: 15% of the multiply-adds at 7 x 7 (6% at
  // 14 x 14, 3% at 28 x 28) fell on the zero padding. The tiles then write their rows one by one (igemm_tile's
  // crow). Measured (batch 8, 3x3, calls interleaved in alternating order, as a fixed order favoured whichever ran
  // second by up to 15%): 512 @7 channels-last forward 1.12x faster, fwd+bwd 1.07x, NCHW 1.00-1.03x; 128 @28 within
  // noise (stride-1 layers from 14 x 14 up mostly run Winograd). The mask is only a sort key: past 64 taps its
  // first bits shift out and classes merge, which costs speed, not correctness.
  const bool by_taps = g.nhwc && !pointwise && !row_taps && PQ <= kByTapsPixels;
  std::vector<int64_t> order;
  if (by_taps) {
    std::vector<std::pair<uint64_t, int64_t>> keyed(PQ);
    for (int64_t pos = 0; pos < PQ; ++pos) {
      const int64_t ih = pos / g.Q * g.sh - g.ph, iw = pos % g.Q * g.sw - g.pw;
      uint64_t mask = 0;
      for (int64_t rr = 0; rr < g.R; ++rr)
        for (int64_t ss = 0; ss < g.S; ++ss) {
          const int64_t h = ih + rr * g.dh, w = iw + ss * g.dw;
          mask = mask << 1 | uint64_t(h >= 0 && h < g.H && w >= 0 && w < g.W);
        }
      keyed[pos] = {mask, pos};
    }
    std::stable_sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    order.reserve(NPQ);
    for (int64_t i = 0; i < PQ;) {  // each class of positions, image by image
      int64_t j = i;
      while (j < PQ && keyed[j].first == keyed[i].first) ++j;
      for (int64_t n = 0; n < g.N; ++n)
        for (int64_t k = i; k < j; ++k) order.push_back(n * PQ + keyed[k].second);
      i = j;
    }
  }
  struct Scratch {
    std::vector<const T*> ptrs;
    std::vector<int64_t> boff, nt, crow;
    std::vector<T> rows, cb, ct;
  };
  auto make_scratch = [&] {
    return Scratch{std::vector<const T*>(kBlocksPerTask * ntaps * MR), std::vector<int64_t>(kBlocksPerTask * ntaps),
                   std::vector<int64_t>(kBlocksPerTask), std::vector<int64_t>(by_taps ? SB : 0),
                   std::vector<T>(row_taps ? SB * Kc : 0), std::vector<T>(g.nhwc ? 0 : SB * Pn),
                   std::vector<T>(g.nhwc ? 0 : Pn * SB)};
  };
  parallel_tasks(g.G * nsb * npg, make_scratch, [&](int64_t t, Scratch& sc) {
    auto& [ptrs, boff, nt, crow, rows, cb, ct] = sc;
    const int64_t gg = t / (nsb * npg), p0 = ((t / npg) % nsb) * SB, pg = t % npg;
    const int64_t pc = std::min(SB, NPQ - p0), nblk = (pc + MR - 1) / MR;
    const T* xg = x + gg * g.Cg;
    // A pointers per block and tap; taps that fall in the padding for every pixel of a block are dropped.
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const T** bp = ptrs.data() + blk * ntaps * MR;
      if (pointwise) {
        const int64_t pix = p0 + blk * MR;
        for (int64_t r = 0; r < MR; ++r) bp[r] = pix + r < NPQ ? xg + (pix + r) * g.C : zero.data();
        boff[blk] = 0, nt[blk] = 1;
        continue;
      }
      // Input row and column of tap (0, 0) and image offset per pixel, stepping through the output pixels from one
      // set of divisions per block (divisions per pixel and tap cost a few percent of the whole convolution).
      int64_t ih0[MR], iw0[MR], base[MR];
      if (by_taps) {
        for (int64_t r = 0; r < MR; ++r) {
          const int64_t i = p0 + blk * MR + r;
          if (i >= NPQ) {
            ih0[r] = -(int64_t{1} << 40), iw0[r] = 0, base[r] = 0;
            continue;
          }
          const int64_t pix = order[i], n = pix / PQ, oh = pix % PQ / g.Q, ow = pix % g.Q;
          ih0[r] = oh * g.sh - g.ph, iw0[r] = ow * g.sw - g.pw, base[r] = n * g.H * g.W;
          crow[blk * MR + r] = pix * g.K;
        }
      } else {
        const int64_t pix = p0 + blk * MR;
        int64_t n = pix / PQ, oh = (pix % PQ) / g.Q, ow = pix % g.Q;
        for (int64_t r = 0; r < MR; ++r) {
          if (pix + r >= NPQ) {
            ih0[r] = -(int64_t{1} << 40), iw0[r] = 0, base[r] = 0;  // past the end: every tap reads zeros
            continue;
          }
          ih0[r] = oh * g.sh - g.ph, iw0[r] = ow * g.sw - g.pw, base[r] = n * g.H * g.W;
          if (++ow == g.Q) {
            ow = 0;
            if (++oh == g.P) oh = 0, ++n;
          }
        }
      }
      if (row_taps && adjacent && ih0[MR - 1] == ih0[0] && base[MR - 1] == base[0] &&
          iw0[MR - 1] == iw0[0] + (MR - 1) * g.sw && iw0[0] >= 0 && iw0[MR - 1] + g.S <= g.W) {
        // The block's pixels lie in one output row, their filter rows wholly inside x's columns: each filter row is
        // one run of x per pixel, sw pixels apart (the per-pixel tests below took as long as the stem's GEMM).
        int64_t n_used = 0;
        for (int64_t rr = 0; rr < g.R; ++rr) {
          const int64_t ih = ih0[0] + rr * g.dh;
          if (ih < 0 || ih >= g.H) continue;
          const T* xr = xg + (base[0] + ih * g.W + iw0[0]) * g.C;
          for (int64_t r = 0; r < MR; ++r) bp[n_used * MR + r] = xr + r * g.sw * g.C;
          boff[blk * ntaps + n_used++] = rr * tap_stride;
        }
        nt[blk] = n_used;
        continue;
      }
      if (row_taps) {
        int64_t n_used = 0;
        for (int64_t rr = 0; rr < g.R; ++rr) {
          bool any = false;
          for (int64_t r = 0; r < MR; ++r) {
            const int64_t ih = ih0[r] + rr * g.dh;
            const T* src = nullptr;
            int64_t slo = 0, shi = 0;  // the filter row's taps that land inside x
            if (ih >= 0 && ih < g.H) q_range(iw0[r], g.dw, g.W, g.S, slo, shi);
            if (shi > slo) {
              const T* xr = xg + (base[r] + ih * g.W) * g.C;  // x's row ih
              if (adjacent && slo == 0 && shi == g.S) {
                src = xr + iw0[r] * g.C;
              } else {  // short runs: plain loops, a memcpy call would cost more than the copy
                T* dst = rows.data() + (blk * MR + r) * Kc + rr * cdim;
                for (int64_t i = 0; i < cdim; ++i) dst[i] = T(0);
                for (int64_t s = slo; s < shi; ++s)
                  for (int64_t c = 0; c < g.Cg; ++c) dst[s * g.Cg + c] = xr[(iw0[r] + s * g.dw) * g.C + c];
                src = dst;
              }
            }
            any |= src != nullptr;
            bp[n_used * MR + r] = src ? src : zero.data();
          }
          if (any) boff[blk * ntaps + n_used++] = rr * tap_stride;
        }
        nt[blk] = n_used;
        continue;
      }
      int64_t n_used = 0;
      for (int64_t rr = 0; rr < g.R; ++rr)
        for (int64_t ss = 0; ss < g.S; ++ss) {
          bool any = false;
          for (int64_t r = 0; r < MR; ++r) {
            const int64_t ih = ih0[r] + rr * g.dh, iw = iw0[r] + ss * g.dw;
            const bool in = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
            any |= in;
            bp[n_used * MR + r] = in ? xg + (base[r] + ih * g.W + iw) * g.C : zero.data();
          }
          if (any) boff[blk * ntaps + n_used++] = (rr * g.S + ss) * tap_stride;
        }
      nt[blk] = n_used;
    }
    for (int64_t pan = pg * ppt; pan < std::min(npan, (pg + 1) * ppt); ++pan) {
      const int64_t j0 = pan * Pn, ncols = std::min(Pn, g.Kg - j0);
      const T* panel = bw.get() + (gg * npan + pan) * Kc * Pn;
      for (int64_t c0 = 0; c0 < cdim; c0 += kc) {
        const int64_t kl = std::min(kc, cdim - c0);
        const bool last = c0 + kl >= cdim;
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t i0 = p0 + blk * MR, mvalid = std::min(MR, pc - blk * MR);
          const T* const* ap = ptrs.data() + blk * ntaps * MR;
          const int64_t* bo = boff.data() + blk * ntaps;
          // 1x1: the next block's pixels (channel rows adjacent in x), asked for while this block computes. x streams
          // from memory once per task group (the first panel); the hardware prefetchers, given MR interleaved
          // streams a few lines long, left the broadcasts waiting (N = 8, calls interleaved one by one: 256 -> 64 at
          // 56 x 56 1.21x faster, 64 -> 256 1.11x, 512 -> 128 at 28 x 28 1.05x, 1024 -> 256 at 14 x 14 the same).
          if (pointwise && pg == 0 && pan == 0 && c0 == 0 && i0 + MR < NPQ) {
            const T* next = xg + (i0 + MR) * g.C;
            prefetch_span(next, next + (std::min(MR, NPQ - i0 - MR) - 1) * g.C + g.Cg);
          }
          if (g.nhwc) {
            const int64_t off = (by_taps ? 0 : i0 * g.K) + gg * g.Kg + j0;
            const convk::Epilogue<T> ep{bias ? bias_p.data() + gg * Kgp + j0 : nullptr, false,
                                        res ? res + off : nullptr, g.K, act};
            convk::igemm_tile<T, NR, MR>(nt[blk], ap, c0, bo, kl, panel + c0 * ldb, ldb, y + off, g.K, mvalid,
                                         ncols, c0 > 0, last ? &ep : nullptr,
                                         by_taps ? crow.data() + blk * MR : nullptr);
          } else {
            convk::igemm_tile<T, NR, MR>(nt[blk], ap, c0, bo, kl, panel + c0 * ldb, ldb,
                                         cb.data() + blk * MR * Pn, Pn, MR, Pn, c0 > 0, nullptr);
          }
        }
      }
      if (g.nhwc) continue;
      // NCHW y: the tile transposed (pixels become contiguous), then one epilogue row per output channel and image.
      transpose(cb.data(), Pn, ct.data(), SB, pc, ncols);
      for (int64_t j = 0; j < pc;) {
        const int64_t n = (p0 + j) / PQ, q0 = (p0 + j) % PQ, len = std::min(pc - j, PQ - q0);
        for (int64_t k = 0; k < ncols; ++k) {
          const int64_t kk = gg * g.Kg + j0 + k, off = (n * g.K + kk) * PQ + q0;
          convk::epilogue_row<T>(y + off, ct.data() + k * SB + j, len, bias ? bias[kk] : T(0),
                                 res ? res + off : nullptr, act);
        }
        j += len;
      }
    }
  });
}

// Depth chunk of the NCHW 1x1 forward: a chunk of x's rows for one panel of pixels stays in L2 while the blocks of
// output channels stream past it.
constexpr int64_t kPointwiseChunkBytes = 64 * 1024;

// NCHW 1x1 convolution, stride 1, no padding: Y[n] (K x HW) = W (K x C) * X[n] (C x HW) per group, the kernel of
// conv_gemm.h the other way round: rows of the weight are A, rows of x are read in place as B (a panel of pixels,
// row stride H*W), rows of y are written in place with the epilogue (bias per row). Nothing is packed or
// transposed, which matters here: a 1x1 layer does only K multiply-adds per element of x. Tasks: (image, group,
// panel of kMaxNR vectors of pixels); the last panel of an image is as narrow as its pixels allow (14x14: 196 =
// 3 x 64 + 4) and is copied into a zero-padded buffer, as it would read past the image.
template <typename T, int NR>
void pointwise_panel(const Geo& g, const T* const* wrows, const T* b, int64_t ldb, int64_t ncols, int64_t kc,
                     const T* bias, const T* res, Act act, T* y) {
  constexpr int64_t MR = convk::kMR;
  const int64_t HW = g.HW(), nkb = (g.Kg + MR - 1) / MR, boff = 0;
  for (int64_t c0 = 0; c0 < g.Cg; c0 += kc) {
    const int64_t kl = std::min(kc, g.Cg - c0);
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t off = kb * MR * HW;
      const convk::Epilogue<T> ep{bias ? bias + kb * MR : nullptr, true, res ? res + off : nullptr, HW, act};
      convk::igemm_tile<T, NR>(1, wrows + kb * MR, c0, &boff, kl, b + c0 * ldb, ldb, y + off, HW,
                               std::min(MR, g.Kg - kb * MR), ncols, c0 > 0, c0 + kl >= g.Cg ? &ep : nullptr);
    }
  }
}

template <typename T>
void fwd_pointwise_nchw(const Geo& g, const T* x, const T* w, const T* bias, const T* res, Act act, T* y) {
  constexpr int64_t MR = convk::kMR, W = convk::Vec<T>::size(), Pn = convk::kMaxNR * W;
  const int64_t HW = g.HW(), np = (HW + Pn - 1) / Pn, nkb = (g.Kg + MR - 1) / MR;
  const int64_t nch = std::max<int64_t>(1, (g.Cg * Pn * int64_t(sizeof(T)) + kPointwiseChunkBytes - 1) /
                                               kPointwiseChunkBytes);
  const int64_t kc = (g.Cg + nch - 1) / nch;
  const std::vector<T> zero(g.Cg, T(0));
  std::vector<const T*> wrows(g.G * nkb * MR);  // weight rows per block of output channels, zeros past Kg
  for (int64_t gg = 0; gg < g.G; ++gg)
    for (int64_t k = 0; k < nkb * MR; ++k)
      wrows[gg * nkb * MR + k] = k < g.Kg ? w + (gg * g.Kg + k) * g.Cg : zero.data();
  parallel_tasks(g.N * g.G * np, [] { return std::vector<T>(); }, [&](int64_t t, std::vector<T>& tail) {
    const int64_t n = t / (g.G * np), gg = (t / np) % g.G, p0 = (t % np) * Pn, ncols = std::min(Pn, HW - p0);
    const int64_t k0 = gg * g.Kg, off = (n * g.K + k0) * HW + p0;
    const T* const* wr = wrows.data() + gg * nkb * MR;
    const T* b = x + (n * g.C + gg * g.Cg) * HW + p0;
    const T* bb = bias ? bias + k0 : nullptr;
    const T* rr = res ? res + off : nullptr;
    if (ncols == Pn) {
      pointwise_panel<T, convk::kMaxNR>(g, wr, b, HW, ncols, kc, bb, rr, act, y + off);
      return;
    }
    const int64_t nr = (ncols + W - 1) / W, wide = nr * W;
    tail.assign(g.Cg * wide, T(0));
    for (int64_t c = 0; c < g.Cg; ++c) std::copy(b + c * HW, b + c * HW + ncols, tail.data() + c * wide);
    if (nr == 1) pointwise_panel<T, 1>(g, wr, tail.data(), wide, ncols, kc, bb, rr, act, y + off);
    else if (nr == 2) pointwise_panel<T, 2>(g, wr, tail.data(), wide, ncols, kc, bb, rr, act, y + off);
    else if (nr == 3) pointwise_panel<T, std::min(3, convk::kMaxNR)>(g, wr, tail.data(), wide, ncols, kc, bb, rr,
                                                                     act, y + off);
    else pointwise_panel<T, convk::kMaxNR>(g, wr, tail.data(), wide, ncols, kc, bb, rr, act, y + off);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Winograd F(2x2, 3x3) forward (Lavin & Gray): for 3x3 stride-1 convolutions, each 2x2 block of output pixels (a
// tile) comes from the 4x4 input patch under it as Y = A^T [(G g G^T) . (B^T d B)] A, i.e. 16 products per input
// channel where the direct convolution has 36: the multiply-adds become 16 GEMMs, one per point xi of the 4x4
// transform, M[xi] (tiles x K) = V[xi] (tiles x C) * U[xi] (C x K), on the kernel of conv_gemm.h, with 4/9 of the
// direct convolution's flops. The transforms are additions (and halvings in G), vectorized over channels: V is made
// per task from channels-last x, M is turned into y with the epilogue while it is in cache. Rounding: about twice
// the direct convolution's error (|U| <= 3/2 |g|, sums of 4x4 instead of 3x3 terms), far inside the fp32 tolerances.
// Tasks: blocks of tiles counted across images, all output channels (the input transform is made once).
constexpr int64_t kWinoBlocks = 16;            // at most this many blocks of convk::kMR tiles per task
constexpr int64_t kWinoMBytes = 512 * 1024;    // M (tiles x 16 x K) per task
constexpr int64_t kWinoVBytes = 384 * 1024;    // V's chunk (tiles x 16 x channels) per task
constexpr int64_t kWinoMinChunk = 128;         // input channels per chunk when there are that many

// Whether a convolution takes the Winograd path: 3x3, stride 1, no dilation, one group, enough channels for the
// GEMMs to dominate the transforms (winograd_eligible), and Winograd's 16 products per 2x2 tile of output pixels
// (odd sizes lose a row and a column of outputs per image: 7x7 needs 16 tiles for 49 pixels) few enough against
// the direct kernel's 9 per pixel (winograd_ok). Transforming
// the weight on each call (16 x C x K values written) costs as much as the multiply-adds it saves on small images:
// then Winograd needs at most half the direct products; with the transform prepared once (inference, see
// conv2d_prepare_weight_cpu) two thirds, which admits 7x7 images (256 against 441 products per channel pair; the
// 512 -> 512 layer of ResNet-50 measured ~18% faster per image, its transform ~2.3 ms a call).
bool winograd_eligible(const Geo& g) {
  return g.R == 3 && g.S == 3 && g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && g.G == 1 && g.C >= 32 &&
         g.K >= 32;
}

// The Winograd tiles of a layer: TP x TQ per image, each 2 x 2 output pixels; count in all, tile tt of image
// image(tt) at output pixel (p0(tt), q0(tt)).
struct WinoTiles {
  int64_t TP, TQ, count;
  explicit WinoTiles(const Geo& g) : TP((g.P + 1) / 2), TQ((g.Q + 1) / 2), count(g.N * TP * TQ) {}
  int64_t image(int64_t tt) const { return tt / (TP * TQ); }
  int64_t p0(int64_t tt) const { return ((tt / TQ) % TP) * 2; }
  int64_t q0(int64_t tt) const { return (tt % TQ) * 2; }
};

bool winograd_ok(const Geo& g, bool transform_ready) {
  const WinoTiles wt(g);
  const int64_t tiles = wt.TP * wt.TQ, direct = 9 * g.P * g.Q;
  return g.nhwc && winograd_eligible(g) && (transform_ready ? 3 * 16 * tiles <= 2 * direct : 2 * 16 * tiles <= direct);
}

// U[xi][pan][c][lane] = (G g G^T)[xi] of the 3x3 filter of output channel pan * Pn + lane, input channel c, from the
// direct panels bw (pack_weight_panels: row (r, s, c)). G = [1 0 0; 1/2 1/2 1/2;
// 1/2 -1/2 1/2; 0 0 1].
template <typename T, int NR>
std::unique_ptr<T[]> winograd_weights(const Geo& g, const T* bw) {
  using V = convk::Vec<T>;
  constexpr int64_t W = V::size(), Pn = NR * W;
  const int64_t C = g.C, npan = panel_count(g, Pn), Kc = g.Kc();
  std::unique_ptr<T[]> u(new T[winograd_numel(g, Pn)]);
  parallel_tasks(npan * C, [] { return 0; }, [&](int64_t t, int) {
    const int64_t pan = t / C, c = t % C;
    const T* panel = bw + pan * Kc * Pn;
    const V half(T(0.5));
    for (int64_t v = 0; v < NR; ++v) {
      V gr[3][3], tmp[4][3];
      for (int64_t r = 0; r < 3; ++r)
        for (int64_t s = 0; s < 3; ++s)
          gr[r][s] = V::loadu(panel + ((r * 3 + s) * C + c) * Pn + v * W);
      for (int64_t s = 0; s < 3; ++s) {
        tmp[0][s] = gr[0][s];
        tmp[1][s] = (gr[0][s] + gr[1][s] + gr[2][s]) * half;
        tmp[2][s] = (gr[0][s] - gr[1][s] + gr[2][s]) * half;
        tmp[3][s] = gr[2][s];
      }
      for (int64_t i = 0; i < 4; ++i) {
        const V row[4] = {tmp[i][0], (tmp[i][0] + tmp[i][1] + tmp[i][2]) * half,
                          (tmp[i][0] - tmp[i][1] + tmp[i][2]) * half, tmp[i][2]};
        for (int64_t j = 0; j < 4; ++j) row[j].store(u.get() + (((i * 4 + j) * npan + pan) * C + c) * Pn + v * W);
      }
    }
  });
  return u;
}

// V = B^T d B of tile tt for channels [c0, c0 + cl), B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], channel vectors
// up to cc (zeros past cl, and everywhere for a tile past the last, tt >= nt): point xi at vt + xi * xstride.
template <typename T>
void winograd_input_tile(const Geo& g, const T* x, int64_t tt, int64_t nt, int64_t c0, int64_t cl, int64_t cc, T* vt,
                         int64_t xstride) {
  using V = convk::Vec<T>;
  constexpr int64_t W = V::size();
  const WinoTiles wt(g);
  const int64_t n = wt.image(tt), ih0 = wt.p0(tt) - g.ph, iw0 = wt.q0(tt) - g.pw;
  // The patch's pixels, null where it hangs over x's border (or past the last tile).
  const T* px[4][4];
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t ih = ih0 + i, iw = iw0 + j;
      px[i][j] = tt < nt && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W ? x + ((n * g.H + ih) * g.W + iw) * g.C + c0
                                                                      : nullptr;
    }
  for (int64_t c = 0; c < cc; c += W) {
    const int64_t len = std::min<int64_t>(W, cl - c);
    auto load = [&](int64_t i, int64_t j) {
      if (!px[i][j] || len <= 0) return V(T(0));
      return len == W ? V::loadu(px[i][j] + c) : V::loadu(px[i][j] + c, len);
    };
    V s[4][4];  // B^T d, one column of d at a time
    for (int64_t j = 0; j < 4; ++j) {
      const V d0 = load(0, j), d1 = load(1, j), d2 = load(2, j), d3 = load(3, j);
      s[0][j] = d0 - d2, s[1][j] = d1 + d2, s[2][j] = d2 - d1, s[3][j] = d1 - d3;
    }
    for (int64_t i = 0; i < 4; ++i) {
      (s[i][0] - s[i][2]).store(vt + (i * 4 + 0) * xstride + c);
      (s[i][1] + s[i][2]).store(vt + (i * 4 + 1) * xstride + c);
      (s[i][2] - s[i][1]).store(vt + (i * 4 + 2) * xstride + c);
      (s[i][1] - s[i][3]).store(vt + (i * 4 + 3) * xstride + c);
    }
  }
}

// Y = A^T M A of tile tt, A^T = [1 1 1 0; 0 1 -1 -1], for output channels [k0, k0 + kn): point xi of M at
// m + xi * mstride, channel k0 + j at [j] (readable in whole vectors); then + bias_p[j] (zero-padded), the residual
// and the activation, for the output pixels inside y (channels-last).
template <typename T>
void winograd_output_tile(const Geo& g, int64_t tt, const T* m, int64_t mstride, int64_t k0, int64_t kn,
                          const T* bias_p, const T* res, Act act, T* y) {
  using V = convk::Vec<T>;
  constexpr int64_t W = V::size();
  const WinoTiles wt(g);
  const int64_t K = g.K, n = wt.image(tt), p0 = wt.p0(tt), q0 = wt.q0(tt);
  for (int64_t j = 0; j < kn; j += W) {
    const int64_t len = std::min<int64_t>(W, kn - j);
    V s[2][4];  // A^T m, one column of m at a time
    for (int64_t c = 0; c < 4; ++c) {
      const V m0 = V::loadu(m + c * mstride + j), m1 = V::loadu(m + (4 + c) * mstride + j);
      const V m2 = V::loadu(m + (8 + c) * mstride + j), m3 = V::loadu(m + (12 + c) * mstride + j);
      s[0][c] = m0 + m1 + m2, s[1][c] = m1 - m2 - m3;
    }
    const V vb = V::loadu(bias_p + j);
    for (int64_t a = 0; a < 2; ++a) {
      const V o[2] = {s[a][0] + s[a][1] + s[a][2], s[a][1] - s[a][2] - s[a][3]};
      for (int64_t b = 0; b < 2; ++b) {
        const int64_t p = p0 + a, q = q0 + b;
        if (p >= g.P || q >= g.Q) continue;
        const int64_t off = ((n * g.P + p) * g.Q + q) * K + k0 + j;
        V val = o[b] + vb;
        if (res) val = val + (len == W ? V::loadu(res + off) : V::loadu(res + off, len));
        val = convk::apply_vector_act<T>(act, val);
        if (len == W) val.store(y + off);
        else val.store(y + off, len);
      }
    }
  }
}

// V of fwd_winograd_by_panels: a row per (point xi, tile) of the cp channels (C rounded up to vectors), row stride
// vs (a cache line more), NTp tiles (NT rounded up to kernel blocks of kMR).
template <typename T>
struct WinoPanelsV {
  int64_t NT, NTp, cp, vs;
  explicit WinoPanelsV(const Geo& g)
      : NT(WinoTiles(g).count), NTp((NT + convk::kMR - 1) / convk::kMR * convk::kMR),
        cp((g.C + convk::Vec<T>::size() - 1) / convk::Vec<T>::size() * convk::Vec<T>::size()),
        vs(cp + 64 / int64_t(sizeof(T))) {}
  int64_t bytes() const { return 16 * NTp * vs * int64_t(sizeof(T)); }
};

// Winograd for small images with many channels (ResNet's 7x7 and 14x14 layers): the input transforms of all tiles
// first (V, every channel), then tasks of output-channel panels, each reading only its panels of U, once. The
// tasks of fwd_winograd (blocks of tiles, all output channels) would each read the whole U again: 10 times its 16 MB
// per call for a 512 -> 512 layer on 8 images of 7x7, more than the multiply-adds' time from L3 / memory.
template <typename T, int NR>
void fwd_winograd_by_panels(const Geo& g, const T* x, const T* u, const T* bias, const T* res, Act act, T* y) {
  constexpr int64_t MR = convk::kMR, W = convk::Vec<T>::size(), Pn = NR * W, pad = 64 / int64_t(sizeof(T));
  const int64_t C = g.C, K = g.K, npan = panel_count(g, Pn), Kp = npan * Pn;
  const WinoPanelsV<T> lay(g);
  const int64_t NT = lay.NT, NTp = lay.NTp, cp = lay.cp, vs = lay.vs;
  const KeptScratch scratch("conv2d_forward_cpu", lay.bytes());  // every value written first
  T* const v = scratch.as<T>();
  std::vector<T> bias_p(Kp, T(0));
  if (bias) std::copy(bias, bias + K, bias_p.begin());
  constexpr int64_t kTilesPerTask = 16;
  parallel_tasks((NTp + kTilesPerTask - 1) / kTilesPerTask, [] { return 0; }, [&](int64_t task, int) {
    for (int64_t t = task * kTilesPerTask; t < std::min(NTp, (task + 1) * kTilesPerTask); ++t)
      winograd_input_tile<T>(g, x, t, NT, 0, C, cp, v + t * vs, NTp * vs);
  });
  std::vector<const T*> rows(16 * NTp);
  for (int64_t i = 0; i < 16 * NTp; ++i) rows[i] = v + i * vs;
  // Tasks: (panel, block of tiles); blocks only as many as the threads need, M (tiles x 16 x Pn) within kWinoMBytes.
  const int64_t ms = 16 * Pn + pad;
  const int64_t want = (2 * at::get_num_threads() + npan - 1) / npan;
  const int64_t by_m = (NTp * ms * int64_t(sizeof(T)) + kWinoMBytes - 1) / kWinoMBytes;
  const int64_t ntb = std::max<int64_t>({1, want, by_m});
  const int64_t TB = ((NTp + ntb - 1) / ntb + MR - 1) / MR * MR, nblk = (NTp + TB - 1) / TB;
  const int64_t boff = 0;
  parallel_tasks(npan * nblk, [&] { return std::vector<T>(TB * ms); }, [&](int64_t task, std::vector<T>& m) {
    const int64_t pan = task / nblk, t0 = (task % nblk) * TB, nt = std::min(TB, NTp - t0);
    for (int64_t xi = 0; xi < 16; ++xi) {
      const T* ub = u + (xi * npan + pan) * C * Pn;
      for (int64_t b = 0; b < nt; b += MR)
        convk::igemm_tile<T, NR>(1, rows.data() + xi * NTp + t0 + b, 0, &boff, C, ub, Pn, m.data() + b * ms + xi * Pn,
                                 ms, MR, Pn, false, nullptr);
    }
    const int64_t k0 = pan * Pn, kn = std::min(Pn, K - k0);
    for (int64_t t = 0; t < std::min(nt, NT - t0); ++t)
      winograd_output_tile<T>(g, t0 + t, m.data() + t * ms, Pn, k0, kn, bias_p.data() + k0, res, act, y);
  });
}

// Whether fwd_winograd_by_panels suits this layer: U (16 x C x Kp) large enough that
// fwd_winograd's tasks re-reading it would cost (kWinoPanelsMinU), V small enough to stay in the caches
// (kWinoPanelsMaxV).
constexpr int64_t kWinoPanelsMinU = 2 * 1024 * 1024;
constexpr int64_t kWinoPanelsMaxV = 8 * 1024 * 1024;

template <typename T, int NR>
bool winograd_by_panels(const Geo& g) {
  constexpr int64_t Pn = NR * convk::Vec<T>::size();
  return winograd_numel(g, Pn) * int64_t(sizeof(T)) >= kWinoPanelsMinU && WinoPanelsV<T>(g).bytes() <= kWinoPanelsMaxV;
}

template <typename T, int NR>
void fwd_winograd(const Geo& g, const T* x, const T* u, const T* bias, const T* res, Act act, T* y) {
  if (winograd_by_panels<T, NR>(g)) {
    fwd_winograd_by_panels<T, NR>(g, x, u, bias, res, act, y);
    return;
  }
  constexpr int64_t MR = convk::kMR, W = convk::Vec<T>::size(), Pn = NR * W, pad = 64 / int64_t(sizeof(T));
  const int64_t C = g.C, K = g.K, npan = panel_count(g, Pn), Kp = npan * Pn;  // (one group: Kg = K)
  const int64_t NT = WinoTiles(g).count;
  std::vector<T> bias_p(Kp, T(0));
  if (bias) std::copy(bias, bias + K, bias_p.begin());
  // A task is a block of TB tiles, all output channels: M (TB x 16 x Kp) within kWinoMBytes, then input channels in
  // chunks whose V (TB x 16 x cc) is within kWinoVBytes. V and M hold a tile's 16 points together, so that its
  // transforms touch neighbouring rows; the tile stride is padded by a cache line so that the kMR rows of a kernel
  // block do not fall into one cache set.
  // TB also leaves room for V chunks of at least kWinoMinChunk channels: shorter kernel passes cost more than the
  // tiles save.
  const int64_t ms = 16 * Kp + pad, cmin = std::min<int64_t>(kWinoMinChunk, (C + W - 1) / W * W);
  const int64_t tb_m = kWinoMBytes / (ms * int64_t(sizeof(T)));
  const int64_t tb_v = kWinoVBytes / ((16 * cmin + pad) * int64_t(sizeof(T)));
  const int64_t TB = std::clamp<int64_t>(std::min(tb_m, tb_v) / MR, 1, kWinoBlocks) * MR;
  const int64_t cmax = std::max<int64_t>(W, (kWinoVBytes / (TB * int64_t(sizeof(T))) - pad) / 16 / W * W);
  const int64_t nch = (C + cmax - 1) / cmax, cc = ((C + nch - 1) / nch + W - 1) / W * W, vs = 16 * cc + pad;
  struct Scratch {
    std::vector<T> v, m;
    std::vector<const T*> rows;
  };
  auto make_scratch = [&] {
    return Scratch{std::vector<T>(TB * vs), std::vector<T>(TB * ms), std::vector<const T*>(16 * TB)};
  };
  const int64_t boff = 0;
  parallel_tasks((NT + TB - 1) / TB, make_scratch, [&](int64_t task, Scratch& sc) {
    const int64_t t0 = task * TB, nt = std::min(TB, NT - t0);
    for (int64_t xi = 0; xi < 16; ++xi)
      for (int64_t t = 0; t < TB; ++t) sc.rows[xi * TB + t] = sc.v.data() + t * vs + xi * cc;
    for (int64_t c0 = 0; c0 < C; c0 += cc) {
      const int64_t cl = std::min(cc, C - c0);
      for (int64_t t = 0; t < TB; ++t) winograd_input_tile<T>(g, x, t0 + t, NT, c0, cl, cc, sc.v.data() + t * vs, cc);
      for (int64_t pan = 0; pan < npan; ++pan)
        for (int64_t xi = 0; xi < 16; ++xi) {
          const T* ub = u + ((xi * npan + pan) * C + c0) * Pn;
          for (int64_t b = 0; b < (nt + MR - 1) / MR; ++b)
            convk::igemm_tile<T, NR>(1, sc.rows.data() + xi * TB + b * MR, 0, &boff, cl, ub, Pn,
                                     sc.m.data() + b * MR * ms + xi * Kp + pan * Pn, ms, MR, Pn, c0 > 0, nullptr);
        }
    }
    for (int64_t t = 0; t < nt; ++t)
      winograd_output_tile<T>(g, t0 + t, sc.m.data() + t * ms, Kp, 0, K, bias_p.data(), res, act, y);
  });
}

// The panel width (in vectors) of fwd_igemm for this weight: the widest whose panels waste the fewest vector
// columns past the group's channels (144 channels = 9 vectors: 3 panels of 3, not 4 + 4 + 1 with 3 vectors of
// zeros computed; narrower panels for small groups).
template <typename T>
int64_t igemm_panel_vectors(const Geo& g) {
  constexpr int64_t W = convk::Vec<T>::size();
  const int64_t vectors = (g.Kg + W - 1) / W;
  int64_t best = std::min<int64_t>(convk::kMaxNR, vectors);
  auto computed = [&](int64_t nr) { return (vectors + nr - 1) / nr * nr; };
  for (int64_t nr = best - 1; nr >= 2; --nr)
    if (computed(nr) < computed(best)) best = nr;
  return best;
}

// wino_u: the prepared Winograd transform of the weight (winograd_weights at kMaxNR), or null to make it here.
template <typename T, typename Pack>
void fwd_gemm(const Geo& g, const T* x, const Pack& pack, const T* wino_u, const T* bias, const T* res, Act act,
              T* y) {
  constexpr int64_t W = convk::Vec<T>::size();
  if (winograd_ok(g, wino_u != nullptr)) {
    constexpr int NR = convk::kMaxNR;
    std::unique_ptr<T[]> made;
    if (!wino_u) {
      made = winograd_weights<T, NR>(g, pack(NR * W).get());
      wino_u = made.get();
    }
    fwd_winograd<T, NR>(g, x, wino_u, bias, res, act, y);
    return;
  }
  const int64_t nr = igemm_panel_vectors<T>(g);
  if (nr >= 4) fwd_igemm<T, std::min(4, convk::kMaxNR)>(g, x, pack, bias, res, act, y);
  else if (nr == 3) fwd_igemm<T, std::min(3, convk::kMaxNR)>(g, x, pack, bias, res, act, y);
  else if (nr == 2) fwd_igemm<T, 2>(g, x, pack, bias, res, act, y);
  else fwd_igemm<T, 1>(g, x, pack, bias, res, act, y);
}

// Depthwise (C/groups == K/groups == 1), direct, channels-last: vectorized over c, each kernel tap's weight vector
// loaded once per block of kDwB pixels and the block's accumulators kept in registers over all taps (dw_block). The
// same block kernel runs the forward's generic case (a block = kDwB consecutive output pixels of one row, read from a
// zero-padded ring of rows) and dx (a block = kDwB input pixels of one row and one phase mod the stride, which share
// their taps); the forward's 3x3 / 5x5 stride-1 / 2 layers run the row kernels (dw_block_rows) on x in place. NCHW:
// see fwd_depthwise_ring (per-task staging) and fwd_depthwise_nchw_flat (big planes).
constexpr int kDwB = 8;

template <typename T>
__attribute__((noinline)) void dw_act_pass(Act act, T* out, int64_t ld, int64_t B, int64_t C) {
  cpu::with_act(act, [&](auto a) {
    constexpr Act A = decltype(a)::value;
    for (int64_t j = 0; j < B; ++j)
      cpu::map_vectors(out + j * ld, C, [](convk::Vec<T> v) { return convk::apply_vector_act<T>(A, v); });
  });
}

// One channel vector (n lanes; Full: n == L) of dw_block, its B accumulators in registers.
template <typename T, int B, bool Full>
inline __attribute__((always_inline)) void dw_vec(int64_t c, int64_t n, int64_t nt, const T* const* sp,
                                                  const T* const* wp, int64_t sld, const T* init, T* out, int64_t ld,
                                                  const T* res, bool vact, Act act, int64_t shift) {
  using V = convk::Vec<T>;
  const V v0 = init ? (Full ? V::loadu(init + c) : V::loadu(init + c, n)) : V(T(0));
  V acc[B];
#pragma GCC unroll 16
  for (int j = 0; j < B; ++j) acc[j] = v0;
  for (int64_t t = 0; t < nt; ++t) {
    const V wv = Full ? V::loadu(wp[t] + c) : V::loadu(wp[t] + c, n);
    const T* s = sp[t] + shift + c;
#pragma GCC unroll 16
    for (int j = 0; j < B; ++j)
      acc[j] = at::vec::fmadd(wv, Full ? V::loadu(s + j * sld) : V::loadu(s + j * sld, n), acc[j]);
  }
#pragma GCC unroll 16
  for (int j = 0; j < B; ++j) {
    T* o = out + j * ld + c;
    V v = acc[j];
    if (res) v = v + (Full ? V::loadu(res + j * ld + c) : V::loadu(res + j * ld + c, n));
    if (vact) v = convk::apply_vector_act<T>(act, v);
    if (Full) v.store(o);
    else v.store(o, n);
  }
}

// out[j * ld + c] = epilogue(init[c] + sum over taps t of wp[t][c] * sp[t][shift + j * sld + c]) for j < B, c < C;
// init may be null (zero); res (same strides as out) and act as in the forward's epilogue.
template <typename T, int B>
void dw_block(int64_t C, int64_t nt, const T* const* sp, const T* const* wp, int64_t sld, const T* init, T* out,
              int64_t ld, const T* res, Act act, int64_t shift = 0) {
  constexpr int64_t L = convk::Vec<T>::size();
  const bool vact = convk::vector_act(act);
  int64_t c = 0;
  for (; c + L <= C; c += L) dw_vec<T, B, true>(c, L, nt, sp, wp, sld, init, out, ld, res, vact, act, shift);
  if (c < C) dw_vec<T, B, false>(c, C - c, nt, sp, wp, sld, init, out, ld, res, vact, act, shift);
  // The activations with exp / erf / tanh in a second pass over the stored block: calls inside the loops above
  // would keep the accumulators out of registers.
  if (!vact) dw_act_pass<T>(act, out, ld, B, C);
}

// Channels per block (a multiple of the vector width) such that `pixels` pixels of a block take about kDwBlockBytes:
// a quarter of the 1 MB L2 of the dev machine (Zen 4) was fastest on EfficientNet's depthwise layers (16 KB, L1-sized,
// was 2-3x slower: too little work per block of pixels).
constexpr int64_t kDwBlockBytes = 256 * 1024;
template <typename T>
int64_t dw_channel_block(int64_t C, int64_t pixels) {
  constexpr int64_t L = convk::Vec<T>::size();
  const int64_t fit = (kDwBlockBytes / int64_t(sizeof(T)) / std::max<int64_t>(1, pixels)) / L * L;
  return std::min(std::max(fit, L), (C + L - 1) / L * L);
}

// dw_block<T, b>(args...) for a run-time b in [1, kDwB].
template <typename T, typename... Args>
void dw_block_n(int64_t b, Args... args) {
  switch (b) {
    case 1: return dw_block<T, 1>(args...);
    case 2: return dw_block<T, 2>(args...);
    case 3: return dw_block<T, 3>(args...);
    case 4: return dw_block<T, 4>(args...);
    case 5: return dw_block<T, 5>(args...);
    case 6: return dw_block<T, 6>(args...);
    case 7: return dw_block<T, 7>(args...);
    default: return dw_block<T, kDwB>(args...);
  }
}

// The forward's block for S taps per kernel row at stride SW (dilation 1): B output pixels of PR consecutive output
// rows (PR = 1, or 2 where stride and dilation are 1 in height and both rows read all their kernel rows). Input
// rows rows[0 .. nr + PR - 2] (pointers into the padded ring or x: column k of the block at rows[i][shift + k * cb]);
// input row i feeds output row h with kernel row i - h (weights wrows[i - h]). Each input column vector is loaded
// once per input row and used by every output of the block that reads it, the row's weight vectors in registers.
// Two rows: from 56 x 56 up a row of input pixels (all channels) does not stay in L1 between the output rows that
// read it, so one row at a time missed L1 R times per input row (R + 1 per two output rows with pairs). The sums run
// in the same order either way: the same bits. out and res: the second row ldr after the first.
// nt: y's lines written with non-temporal stores (whole aligned vectors), the activation applied in registers.
// Interior: every column of the block lies inside the row (kl <= 0, kh >= the block's width): no test per column, and
// the column pointer steps by cb, which keeps the k loop in registers (with the tests, GCC kept the per-column offsets
// in vector registers, reloaded the shared input columns once per use and spilled accumulators on the edge paths).
template <typename T, int B, int S, int SW, int PR, bool Full, bool Interior>
inline __attribute__((always_inline)) void dw_vec_rows(int64_t c, int64_t n, int64_t nr, const T* const* rows,
                                                       const T* const* wrows, int64_t wld, int64_t cb, const T* init,
                                                       T* out, int64_t ld, int64_t ldr, const T* res, bool vact,
                                                       bool nt, Act act, int64_t shift, int64_t kl, int64_t kh) {
  using V = convk::Vec<T>;
  auto load = [&](const T* p) { return Full ? V::loadu(p) : V::loadu(p, n); };
  const V v0 = init ? load(init + c) : V(T(0));
  V acc0[B], acc1[B];
#pragma GCC unroll 16
  for (int j = 0; j < B; ++j) acc0[j] = v0, acc1[j] = v0;
  // Input row i with kernel row i for the first output row (First) and kernel row i - 1 for the second (Second).
  auto row = [&](auto first, auto second, int64_t i) __attribute__((always_inline)) {
    constexpr bool First = decltype(first)::value, Second = decltype(second)::value;
    V w0[S], w1[S];
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {  // w_t rows are wld (= C) apart
      if (First) w0[s] = load(wrows[i] + s * wld + c);
      if (Second) w1[s] = load(wrows[i - 1] + s * wld + c);
    }
    const T* xr = rows[i] + shift + c;
#pragma GCC unroll 64
    for (int k = 0; k < (B - 1) * SW + S; ++k, xr += cb) {
      if (!Interior && (k < kl || k >= kh)) continue;  // columns in the padding: zero, no multiply-adds
      const V xv = load(xr);
#pragma GCC unroll 16
      for (int j = 0; j < B; ++j) {
        const int s = k - j * SW;
        if (s < 0 || s >= S) continue;
        if (First) acc0[j] = at::vec::fmadd(w0[s], xv, acc0[j]);
        if (Second) acc1[j] = at::vec::fmadd(w1[s], xv, acc1[j]);
      }
    }
  };
  if constexpr (PR == 1) {
    for (int64_t i = 0; i < nr; ++i) row(std::true_type{}, std::false_type{}, i);
  } else {
    row(std::true_type{}, std::false_type{}, 0);
    for (int64_t i = 1; i < nr; ++i) row(std::true_type{}, std::true_type{}, i);
    row(std::false_type{}, std::true_type{}, nr);
  }
#pragma GCC unroll 16
  for (int j = 0; j < B; ++j)
#pragma GCC unroll 2
    for (int h = 0; h < PR; ++h) {
      T* o = out + h * ldr + j * ld + c;
      V v = h == 0 ? acc0[j] : acc1[j];
      if (res) v = v + load(res + h * ldr + j * ld + c);
      if (vact || nt) v = convk::apply_vector_act<T>(act, v);
      if (nt && Full) stream_store<T>(o, v);
      else if (Full) v.store(o);
      else v.store(o, n);
    }
}

template <typename T, int B, int S, int SW, int PR>
void dw_block_rows(int64_t C, int64_t nr, const T* const* rows, const T* const* wrows, int64_t wld, int64_t cb,
                   const T* init, T* out, int64_t ld, int64_t ldr, const T* res, bool nt, Act act, int64_t shift,
                   int64_t kl, int64_t kh) {
  constexpr int64_t L = convk::Vec<T>::size();
  const bool vact = convk::vector_act(act);
  int64_t c = 0;
  if (kl <= 0 && kh >= (B - 1) * SW + S) {
    for (; c + L <= C; c += L)
      dw_vec_rows<T, B, S, SW, PR, true, true>(c, L, nr, rows, wrows, wld, cb, init, out, ld, ldr, res, vact, nt, act,
                                               shift, kl, kh);
  } else {
    for (; c + L <= C; c += L)
      dw_vec_rows<T, B, S, SW, PR, true, false>(c, L, nr, rows, wrows, wld, cb, init, out, ld, ldr, res, vact, nt, act,
                                                shift, kl, kh);
  }
  if (c < C)
    dw_vec_rows<T, B, S, SW, PR, false, false>(c, C - c, nr, rows, wrows, wld, cb, init, out, ld, ldr, res, vact, nt,
                                               act, shift, kl, kh);
  if (!vact && !nt)
    for (int h = 0; h < PR; ++h) dw_act_pass<T>(act, out + h * ldr, ld, B, C);
}

// Output pixels per row-kernel block. With 16 vector registers (AVX2) a two-row block of 8 pixels holds 16
// accumulators beside its 2 * S weight vectors and spilled them (seen in the profile); 4 fit. Measured on the 2-core
// AVX2 VM (2026-11-28): as fast or faster on EfficientNet's shapes (batch 1, 144 @56: 0.51 -> 0.31 ms; the others
// within noise), and conv.cpp compiles in 94 s instead of ~185 s (half the instances).
constexpr int kDwRowB = convk::Vec<float>::size() >= 16 ? kDwB : 4;

// dw_block_rows<T, b, S, SW, PR>(args...) for a run-time b in [1, kDwRowB].
template <typename T, int S, int SW, int PR, int B = kDwRowB, typename... Args>
void dw_block_rows_n(int64_t b, Args... args) {
  if constexpr (B == 1) {
    (void)b;
    return dw_block_rows<T, 1, S, SW, PR>(args...);
  } else {
    if (b >= B) return dw_block_rows<T, B, S, SW, PR>(args...);
    return dw_block_rows_n<T, S, SW, PR, B - 1>(b, args...);
  }
}

// Channels-last row kernels on x and y beyond 3/4 of the dev machine's 32 MB L3 (from DRAM): from there the kernel
// ran at ~40 GB/s, 0.7-0.8x oneDNN, on 144 @56 (N = 8, 29 MB). Two remedies, each measured with the providers' calls
// in random order in one process (2-core VM, float32, batch 8):
// - Software prefetch of the next pass's new rows of x, block by block: the hardware prefetchers lost the R + 1 row
//   streams. 1.15-1.3x on 144 @56 and 32 @112 (stride 1) in runs of repeated calls; further ahead was no better.
// - Non-temporal stores of y (the epilogue in registers, every activation): no read of y's lines before the write and
//   no dirty lines evicting the rows of x still in use. Stride 1: 144 @56 0.71-1.09 -> 0.40-0.55 ms (oneDNN
//   0.49-0.65), 32 @112 0.89-1.05 -> 0.40-0.51 (0.57-0.71). Stride 2 wants both, each alone gained little: 96 @112
//   1.52 -> 1.17 ms (oneDNN 1.12), 144 @56 5x5 (N = 16) 1.26 -> 1.02 (1.11). MobileNetV2 after optimize(),
//   channels-last, batch 8: 2.5-4% faster; EfficientNet-B0 within noise (its squeeze-excitation re-reads y at once).
// Below the threshold y stays in cache for the next layer, and prefetching data in L3 only paid the instructions
// (144 @56 s2, 18 MB: 0.87x).
constexpr int64_t kDwDramBytes = 24 << 20;

// Which specialised row kernel serves (S, sw, dw): 0 = none (the generic dw_block). None in double: the row kernels
// are unrolled per block width, kernel width, stride and row count (62 instances with 8-pixel blocks, 1.3 MB of code
// in double), and conv_f64.cpp compiled in 157 s with them, 45 s without (2026-11-28, 2-core AVX2 VM), for a type
// used mostly in gradchecks; double depthwise convolutions run the generic kernel (through the ring, vectorized).
template <typename T>
constexpr bool kDwRowKernels = !std::is_same_v<T, double>;
template <typename T>
int dw_row_kind(const Geo& g) {
  if (!kDwRowKernels<T> || g.dw != 1) return 0;
  if (g.S == 3) return g.sw == 1 ? 1 : g.sw == 2 ? 2 : 0;
  if (g.S == 5) return g.sw == 1 ? 3 : g.sw == 2 ? 4 : 0;
  return 0;
}

// w_t: (R*S, C). Tasks: (image, block of cb channels), all output rows. The input rows a row of outputs reads are
// copied (cb channels wide, zero-padded to the left and right) into a small ring of rows that stays in L2 and is
// refilled sh rows per output row; every output pixel then runs in register blocks of kDwB, padding included.
// kNchw: x, res and y are NCHW; a task first transposes its (cb channels x H*W) block of x into a channels-last
// buffer in cache (and the residual's block likewise), fills the ring from there, writes the finished outputs (bias,
// residual, act: the same arithmetic as channels-last, so both layouts give the same bits) into a (P*Q x cb) buffer
// and transposes that into y's planes: one read of x and one write of y, the transposes in whole 16 x 16 blocks.
template <typename T, bool kNchw>
void fwd_depthwise_ring(const Geo& g, const T* x, const T* w_t, const T* b, const T* res, Act act, T* y) {
  const int64_t C = g.C, RS = g.R * g.S;
  const int64_t Wp = (g.Q - 1) * g.sw + (g.S - 1) * g.dw + 1;  // padded row: columns -pw .. Wp - pw - 1
  const int64_t span = (g.R - 1) * g.dh + 1;                    // input rows one output row reads
  const int64_t HW = g.HW(), PQ = g.PQ();
  const int64_t staged = kNchw ? HW + PQ * (res ? 2 : 1) : 0;   // pixels of the NCHW staging buffers
  const int64_t cb = dw_channel_block<T>(C, span * Wp + staged), ncb = (C + cb - 1) / cb;
  const int64_t wcols = std::clamp<int64_t>(Wp - g.pw, 0, g.W);  // input columns the ring holds
  const int kind = dw_row_kind<T>(g);
  // The row kernels read x (or the staging buffer) in place, skipping the padding columns; only the generic kernel
  // (other kernel widths, strides, dilation) goes through the ring. In place was 1.2-1.6x faster than reading the
  // ring on EfficientNet-B0's channels-last layers from 28 x 28 down (the copy's stores cost more than the loads it
  // saves), within noise (+-10%) at 56 x 56 and 112 x 112.
  const bool direct = kind != 0;
  const bool pairs = direct && g.sh == 1 && g.dh == 1;
  // Channels-last x and y beyond kDwDramBytes together (from DRAM): the row kernels prefetch the next pass's
  // rows of x and write y with non-temporal stores where every channel vector is whole and aligned.
  const bool from_dram = direct && !kNchw && g.N * (g.HW() + g.PQ()) * C * int64_t(sizeof(T)) > kDwDramBytes;
  const bool stream = from_dram && C % convk::Vec<T>::size() == 0 &&
                      reinterpret_cast<uintptr_t>(y) % sizeof(convk::Vec<T>) == 0;
  at::parallel_for(0, g.N * ncb, grain_for(g.PQ() * cb * RS), [&](int64_t begin, int64_t end) {
    using V = convk::Vec<T>;
    constexpr int64_t L = V::size();
    std::vector<const T*> sp(RS), wp(RS), rp_(g.R + 1), wr_(g.R);
    std::unique_ptr<T[]> ring(direct ? nullptr : new T[span * Wp * cb]);
    // Staged pixels sld apart: for wide blocks one vector more than cb, so that loads from xloc and stores to oloc
    // do not fall on the same address mod 4 KB (cb = 512 floats ran 1.4x slower on 7 x 7 planes without it). Narrow
    // blocks stay dense: padding 16 floats to 32 doubled the buffers (beyond L2 at 56 x 56) and ran 1.15-1.3x slower
    // on 144 @56 and 96 @112.
    constexpr int64_t L_ = convk::Vec<T>::size();
    const int64_t sld = cb * int64_t(sizeof(T)) >= 512 ? cb + L_ : cb;
    std::unique_ptr<T[]> stage(kNchw ? new T[staged * sld + L_] : nullptr);
    T* const xloc = stage.get();
    T* const oloc = kNchw ? xloc + HW * sld + L_ : nullptr;
    T* const rloc = kNchw && res ? oloc + PQ * sld : nullptr;
    std::vector<int64_t> tag(span);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / ncb, c0 = task % ncb * cb, nc = std::min(cb, C - c0);
      const T* bc = b ? b + c0 : nullptr;
      // The task's input pixels, channel vectors xld apart.
      const T* xs;
      int64_t xld;
      if constexpr (kNchw) {
        transpose<T>(x + (n * C + c0) * HW, HW, xloc, sld, nc, HW);
        if (res) transpose<T>(res + (n * C + c0) * PQ, PQ, rloc, sld, nc, PQ);
        xs = xloc, xld = sld;
      } else {
        xs = x + n * HW * C + c0, xld = C;
      }
      std::fill(tag.begin(), tag.end(), INT64_MIN);
      for (int64_t p = 0, pr = 1; p < g.P; p += pr) {
        // Rows p and p + 1 together (pr = 2) where both read all R input rows (row kernels, stride and dilation 1 in
        // height): input rows p - ph .. p - ph + R.
        pr = pairs && p + 1 < g.P && p - g.ph >= 0 && p + 1 - g.ph + g.R - 1 < g.H ? 2 : 1;
        int64_t nt = 0, nr = 0;
        for (int64_t r = 0; r < g.R + pr - 1; ++r) {
          const int64_t ih = p * g.sh - g.ph + r * g.dh;
          if (ih < 0 || ih >= g.H) continue;
          if (r == g.R) {  // a pair's last input row: the second output row's last kernel row
            rp_[nr] = xs + ih * g.W * xld;
            continue;
          }
          if (direct) {
            rp_[nr] = xs + ih * g.W * xld, wr_[nr++] = w_t + r * g.S * C + c0;
            continue;
          }
          const int64_t slot = ih % span;
          T* rr = ring.get() + slot * Wp * cb;
          if (tag[slot] != ih) {
            tag[slot] = ih;
            auto zero = [&](int64_t j0, int64_t j1) {
              for (int64_t j = j0; j < j1; ++j)
                for (int64_t c = 0; c < nc; c += L) V(T(0)).store(rr + j * cb + c, std::min(L, nc - c));
            };
            zero(0, std::min(g.pw, Wp));
            const T* xr = xs + ih * g.W * xld;
            for (int64_t j = 0; j < wcols; ++j) {
              const T* src = xr + j * xld;
              T* d = rr + (j + g.pw) * cb;
              int64_t c = 0;
              for (; c + L <= nc; c += L) V::loadu(src + c).store(d + c);
              if (c < nc) V::loadu(src + c, nc - c).store(d + c, nc - c);
            }
            zero(std::min(g.pw + wcols, Wp), Wp);
          }
          rp_[nr] = rr, wr_[nr++] = w_t + r * g.S * C + c0;
          for (int64_t s = 0; s < g.S; ++s) {
            sp[nt] = rr + s * g.dw * cb;
            wp[nt++] = w_t + (r * g.S + s) * C + c0;
          }
        }
        // This row's (rows') outputs: in place (channels-last, pixels C apart) or staged (pixels cb apart).
        const int64_t ld = kNchw ? sld : C;
        const int64_t row = kNchw ? p * g.Q * sld : ((n * g.P + p) * g.Q) * C + c0;
        T* const obase = kNchw ? oloc + row : y + row;
        const T* rbase = !res ? nullptr : kNchw ? rloc + row : res + row;
        const int64_t block = direct ? kDwRowB : kDwB;
        for (int64_t q = 0; q < g.Q; q += block) {
          const int64_t bq = std::min<int64_t>(block, g.Q - q);
          T* out = obase + q * ld;
          const T* rsd = rbase ? rbase + q * ld : nullptr;
          // Row kernels: column k of the block is input column q * sw - pw + k, valid for k in [kl, kh).
          const int64_t iw0 = q * g.sw - g.pw;
          const int64_t kl = direct ? std::max<int64_t>(0, -iw0) : 0, kh = direct ? g.W - iw0 : INT64_MAX;
          const int64_t shift = direct ? iw0 * xld : q * g.sw * cb, cs = direct ? xld : cb;
          const T* const* rw = rp_.data();
          const T* const* ww = wr_.data();
          // The row kernels for PR output rows per pass (the second row Q pixels after the first), else dw_block.
          auto rows_kernel = [&](auto rows_per_pass) {
            constexpr int PR = decltype(rows_per_pass)::value;
            const int64_t lr = g.Q * ld;
            switch (kind) {
              case 1:
                return dw_block_rows_n<T, 3, 1, PR>(bq, nc, nr, rw, ww, C, cs, bc, out, ld, lr, rsd, stream, act, shift,
                                                 kl, kh);
              case 2:
                return dw_block_rows_n<T, 3, 2, PR>(bq, nc, nr, rw, ww, C, cs, bc, out, ld, lr, rsd, stream, act, shift,
                                                 kl, kh);
              case 3:
                return dw_block_rows_n<T, 5, 1, PR>(bq, nc, nr, rw, ww, C, cs, bc, out, ld, lr, rsd, stream, act, shift,
                                                 kl, kh);
              default:
                return dw_block_rows_n<T, 5, 2, PR>(bq, nc, nr, rw, ww, C, cs, bc, out, ld, lr, rsd, stream, act, shift,
                                                 kl, kh);
            }
          };
          if (from_dram) {
            // The rows the window advances by (pr * sh past the last row this pass reads), this block's columns.
            const int64_t last = p * g.sh - g.ph + (g.R - 1) * g.dh + pr - 1;
            const int64_t j0 = std::max<int64_t>(0, iw0), j1 = std::min<int64_t>(g.W, iw0 + (bq - 1) * g.sw + g.S);
            for (int64_t ih = std::max<int64_t>(0, last + 1); ih <= last + pr * g.sh && ih < g.H; ++ih) {
              const T* xr = xs + ih * g.W * xld;
              if (nc == C) prefetch_span(xr + j0 * xld, xr + j1 * xld);  // contiguous pixels
              else
                for (int64_t j = j0; j < j1; ++j) prefetch_span(xr + j * xld, xr + j * xld + nc);
            }
          }
          if (kind == 0) {
            dw_block_n<T>(bq, nc, nt, sp.data(), wp.data(), g.sw * cb, bc, out, ld, rsd, act, q * g.sw * cb);
          } else if constexpr (kDwRowKernels<T>) {
            if (pr == 2)
              rows_kernel(std::integral_constant<int, 2>{});
            else
              rows_kernel(std::integral_constant<int, 1>{});
          }
        }
      }
      if constexpr (kNchw) transpose<T>(oloc, sld, y + (n * C + c0) * PQ, PQ, PQ, nc);
    }
    if (stream) stream_fence();  // before the join
  });
}

template <typename T>
void fwd_depthwise_nhwc(const Geo& g, const T* x, const T* w_t, const T* b, const T* res, Act act, T* y) {
  fwd_depthwise_ring<T, false>(g, x, w_t, b, res, act, y);
}

bool dx_as_forward(const Geo& g);

// Swapped geometry for the channels-last copies of an NCHW dy / dx (C = K, H = P, W = Q), for the transposes.
Geo out_geo(const Geo& g) {
  Geo o = g;
  o.C = g.K, o.H = g.P, o.W = g.Q, o.K = g.C, o.P = g.H, o.Q = g.W;
  return o;
}



// Flat block of the NCHW depthwise forward: out[f + i * L + l] = init + sum over taps t (in order) of wt[t] *
// tp[t][f + i * L + l] for i < B, all L lanes (the callers pad their buffers for whole vectors).
template <typename T, int B>
inline void dwn_flat(int64_t f, int64_t nt, const T* const* tp, const T* wt, T init, T* out) {
  using V = convk::Vec<T>;
  constexpr int64_t L = V::size();
  V acc[B];
#pragma GCC unroll 16
  for (int i = 0; i < B; ++i) acc[i] = V(init);
  for (int64_t t = 0; t < nt; ++t) {
    const V w(wt[t]);
    const T* s = tp[t] + f;
#pragma GCC unroll 16
    for (int i = 0; i < B; ++i) acc[i] = at::vec::fmadd(w, V::loadu(s + i * L), acc[i]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < B; ++i) acc[i].store(out + f + i * L);
}

constexpr int kDwnB = 8;

template <typename T>
void dwn_flat_n(int64_t b, int64_t f, int64_t nt, const T* const* tp, const T* wt, T init, T* out) {
  switch (b) {
    case 1: return dwn_flat<T, 1>(f, nt, tp, wt, init, out);
    case 2: return dwn_flat<T, 2>(f, nt, tp, wt, init, out);
    case 3: return dwn_flat<T, 3>(f, nt, tp, wt, init, out);
    case 4: return dwn_flat<T, 4>(f, nt, tp, wt, init, out);
    case 5: return dwn_flat<T, 5>(f, nt, tp, wt, init, out);
    case 6: return dwn_flat<T, 6>(f, nt, tp, wt, init, out);
    case 7: return dwn_flat<T, 7>(f, nt, tp, wt, init, out);
    default: return dwn_flat<T, kDwnB>(f, nt, tp, wt, init, out);
  }
}

// Sub-plane bytes per stripe of output rows (the sh * sw phase planes of the padded input; stays in L2).
constexpr int64_t kDwnStripeBytes = 128 * 1024;

// NCHW, direct, without transposes: one task per (image, channel) plane. The zero-padded input plane is split by
// phase mod the stride into sh * sw sub-planes, sub[ph][pw][i][j] = x[i * sh + ph - pad_h][j * sw + pw - pad_w],
// each with row pitch Wq = Q + (S - 1) * dw / sw; every tap (r, s) is then a constant offset into one sub-plane and
// the output, taken flat over rows of pitch Wq (the Wq - Q extra columns computed and dropped), is a 1-D
// convolution vectorized over consecutive flat positions (no lane waste on narrow planes, no gathers at stride 2).
// Taps run in (r, s) order from the bias, padding included, as in the channels-last kernel: both layouts give the
// same bits. The epilogue copies the rows out of the flat buffer with residual and act.
template <typename T>
void fwd_depthwise_nchw_flat(const Geo& g, const T* x, const T* w_t, const T* b, const T* res, Act act, T* y) {
  using V = convk::Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t C = g.C, RS = g.R * g.S, sh = g.sh, sw = g.sw, nph = sh * sw;
  const int64_t amax = (g.R - 1) * g.dh / sh, bmax = (g.S - 1) * g.dw / sw;
  const int64_t Wq = g.Q + bmax;
  // Output rows per stripe: its sub-planes (Ps + amax rows each) take about kDwnStripeBytes.
  const int64_t Ps = std::clamp<int64_t>(kDwnStripeBytes / int64_t(sizeof(T)) / (nph * Wq) - amax, 1, g.P);
  const int64_t Hs = Ps + amax;
  const int64_t flat_max = (Ps - 1) * Wq + g.Q;
  const int64_t flat_pad = (flat_max + L - 1) / L * L;
  const int64_t spitch = Hs * Wq + L;              // a sub-plane and the overhang of the last vectors (zeros)
  const int64_t tmp_len = (Wq * sw + 2 * L - 1) / (2 * L) * (2 * L) + 2 * L;
  at::parallel_for(0, g.N * C, grain_for(g.PQ() * RS), [&](int64_t begin, int64_t end) {
    std::unique_ptr<T[]> subs(new T[nph * spitch]), out(new T[flat_pad]), tmp(new T[tmp_len]);
    std::fill(subs.get(), subs.get() + nph * spitch, T(0));
    std::fill(tmp.get(), tmp.get() + tmp_len, T(0));
    std::vector<const T*> tp(RS);
    std::vector<T> wt(RS);
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t s = 0; s < g.S; ++s) {
        const int64_t vr = r * g.dh, vc = s * g.dw;
        tp[r * g.S + s] = subs.get() + ((vr % sh) * sw + vc % sw) * spitch + (vr / sh) * Wq + vc / sw;
      }
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % C;
      const T* xp = x + task * g.HW();
      const T bias = b ? b[c] : T(0);
      for (int64_t t = 0; t < RS; ++t) wt[t] = w_t[t * C + c];
      for (int64_t p0 = 0; p0 < g.P; p0 += Ps) {
        const int64_t np = std::min(Ps, g.P - p0), rows = np + amax;
        // Sub-planes of this stripe: sub-row i holds input row (p0 + i) * sh + ph - pad_h.
        for (int64_t fh = 0; fh < sh; ++fh)
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t ih = (p0 + i) * sh + fh - g.ph;
            T* d0 = subs.get() + fh * sw * spitch + i * Wq;
            if (ih < 0 || ih >= g.H) {
              for (int64_t fw = 0; fw < sw; ++fw) std::fill(d0 + fw * spitch, d0 + fw * spitch + Wq, T(0));
              continue;
            }
            const T* xr = xp + ih * g.W;
            // Padded row columns k = 0 .. Wq * sw - 1 hold x[k - pad_w] (zero outside [0, W)).
            const int64_t klen = Wq * sw, k0 = std::min(g.pw, klen), k1 = std::clamp(g.W + g.pw, k0, klen);
            T* dst = sw == 1 ? d0 : tmp.get();
            std::fill(dst, dst + k0, T(0));
            int64_t k = k0;
            for (; k + L <= k1; k += L) V::loadu(xr + k - g.pw).store(dst + k);
            if (k < k1) V::loadu(xr + k - g.pw, k1 - k).store(dst + k, k1 - k);
            std::fill(dst + k1, dst + klen, T(0));
            if (sw == 1) continue;
            if (sw == 2) {
              // Stores run past Wq into the next sub-row (rewritten next) or the last one's overhang.
              for (int64_t j = 0; j < Wq; j += L) {
                auto eo = at::vec::deinterleave2(V::loadu(dst + 2 * j), V::loadu(dst + 2 * j + L));
                eo.first.store(d0 + j);
                eo.second.store(d0 + spitch + j);
              }
            } else {
              for (int64_t fw = 0; fw < sw; ++fw)
                for (int64_t j = 0; j < Wq; ++j) d0[fw * spitch + j] = dst[j * sw + fw];
            }
          }
        const int64_t flat = (np - 1) * Wq + g.Q, nv = (flat + L - 1) / L;
        for (int64_t v = 0; v < nv; v += kDwnB)
          dwn_flat_n<T>(std::min<int64_t>(kDwnB, nv - v), v * L, RS, tp.data(), wt.data(), bias, out.get());
        // Epilogue: rows of Q out of the flat buffer.
        T* yp = y + task * g.PQ() + p0 * g.Q;
        const T* rp = res ? res + task * g.PQ() + p0 * g.Q : nullptr;
        for (int64_t p = 0; p < np; ++p) {
          const T* src = out.get() + p * Wq;
          T* o = yp + p * g.Q;
          const T* rr = rp ? rp + p * g.Q : nullptr;
          if (!rr && act == Act::kNone) {
            std::memcpy(o, src, g.Q * sizeof(T));
            continue;
          }
          for (int64_t q = 0; q < g.Q; q += L) {
            const int64_t n = std::min(L, g.Q - q);
            V v = V::loadu(src + q, n);
            if (rr) v = v + V::loadu(rr + q, n);
            v = convk::apply_vector_act<T>(act, v);
            v.store(o + q, n);
          }
        }
      }
    }
  });
}

// NCHW depthwise forward: the staged channels-last kernel while its buffers for the narrowest channel block (one
// vector) stay within kDwnStageMax bytes, else (big planes: 112 x 112 at stride 1) the flat per-plane kernel.
// Measured on EfficientNet-B0's layers (batch 8, one thread, dev VM): staged 1.2-1.8x F.conv2d from 56 x 56 down to
// 7 x 7; at 112 x 112 stride 1 the staged buffers (1.6 MB at 16 channels) fall out of L2 and flat ran 2.5x faster.
constexpr int64_t kDwnStageMax = 1024 * 1024;
template <typename T>
void fwd_depthwise_nchw(const Geo& g, const T* x, const T* w_t, const T* b, const T* res, Act act, T* y) {
  constexpr int64_t L = convk::Vec<T>::size();
  if ((g.HW() + g.PQ()) * L * int64_t(sizeof(T)) > kDwnStageMax)
    fwd_depthwise_nchw_flat<T>(g, x, w_t, b, res, act, y);
  else
    fwd_depthwise_ring<T, true>(g, x, w_t, b, res, act, y);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward

// Whether an NCHW weight gradient runs on channels-last copies of x and dy (from the reused-memory pool) rather than
// in place: for inputs from 28 x 28 up with at least 16 channels, except strided 1x1 layers (whose channels-last
// im2col gathers every other pixel). Measured on ResNet-50's layers (batch 8, 2 threads, 2026-11-27), in place ->
// through copies, the copies included: 3x3 64 @56 8.4 -> 5.3 ms (oneDNN 5.2), 3x3 128 @28 5.9 -> 5.2, 3x3 128 s2 @56
// 6.9 -> 6.0, 1x1 64 -> 256 @56 5.7 -> 4.6, 256 -> 64 @56 4.4 -> 3.9, 128 -> 512 @28 4.1 -> 3.5; in place stayed
// faster from 14 x 14 down (3x3 512 @7 5.3 against 6.3), on 1x1 256 -> 512 s2 @56 (5.3 against 8.0) and on the RGB
// stem (11.8 against 15.1).
bool nchw_weight_grad_via_channels_last(const Geo& g) {
  const bool strided_pointwise = g.R == 1 && g.S == 1 && (g.sh > 1 || g.sw > 1);
  return g.Cg >= 16 && g.HW() >= 28 * 28 && !strided_pointwise;
}

// dW (K, Kc) in (c, r, s) order (NCHW) or (r, s, c) order (NHWC).
template <typename T>
void bwd_weight(const Geo& g, const T* x, const T* dy, T* dw) {
  constexpr int64_t Pn = kPanel<T>;
  const int64_t Kc = g.Kc(), PQ = g.PQ(), HW = g.HW();
  const int64_t nb = 4 * Pn;
  const int64_t ncb = (Kc + nb - 1) / nb;
  const int64_t tp = std::min<int64_t>(kRedPix, PQ);
  const int64_t ntiles = (PQ + tp - 1) / tp;
  at::parallel_for(0, g.G * ncb, grain_for(g.N * PQ * g.Kg * nb), [&](int64_t begin, int64_t end) {
    std::vector<T> bp(tp * nb), cb(g.Kg * nb);
    std::vector<int64_t> ihb(tp), iwb(tp), cr(nb), cs(nb), cc(nb);
    std::vector<Seg> segs;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t gg = t / ncb, j0 = (t % ncb) * nb, jl = std::min(nb, Kc - j0);
      for (int64_t jj = 0; jj < nb; ++jj) {
        const int64_t jc = std::min(j0 + jj, Kc - 1);
        if (g.nhwc) {
          cc[jj] = jc % g.Cg, cr[jj] = (jc / g.Cg) / g.S, cs[jj] = (jc / g.Cg) % g.S;
        } else {
          cc[jj] = jc / (g.R * g.S), cr[jj] = (jc / g.S) % g.R, cs[jj] = jc % g.S;
        }
      }
      bool first = true;
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t tile = 0; tile < ntiles; ++tile) {
          const int64_t p0 = tile * tp, pc = std::min(tp, PQ - p0);
          for (int64_t j = 0; j < pc; ++j) {
            ihb[j] = ((p0 + j) / g.Q) * g.sh - g.ph;
            iwb[j] = ((p0 + j) % g.Q) * g.sw - g.pw;
          }
          if (!g.nhwc) make_segs(g, p0, pc, pc, segs);
          // B(p = pixel, j = dW column), panels of Pn columns, panel stride tp * Pn.
          for (int64_t jp = 0; jp < nb; jp += Pn) {
            T* panel = bp.data() + (jp / Pn) * tp * Pn;
            if (g.nhwc) {
              const T* xn = x + n * HW * g.C + gg * g.Cg;
              for (int64_t p = 0; p < pc; ++p) {
                T* dst = panel + p * Pn;
                for (int64_t jj = 0; jj < Pn; ++jj) {
                  const int64_t j = jp + jj;
                  const int64_t ih = ihb[p] + cr[j] * g.dh, iw = iwb[p] + cs[j] * g.dw;
                  dst[jj] = (j < jl && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) ? xn[(ih * g.W + iw) * g.C + cc[j]]
                                                                                   : T(0);
                }
              }
            } else {
              for (int64_t jj = 0; jj < Pn; ++jj) {
                const int64_t j = jp + jj;
                if (j >= jl) {
                  for (int64_t p = 0; p < pc; ++p) panel[p * Pn + jj] = T(0);
                  continue;
                }
                const T* xc = x + (n * g.C + gg * g.Cg + cc[j]) * HW;
                for (const Seg& sg : segs) copy_run(g, xc, sg, cr[j], cs[j], panel + sg.j0 * Pn + jj, Pn);
              }
            }
          }
          if (g.nhwc)
            gemm<T>(g.Kg, jl, pc, dy + (n * PQ + p0) * g.K + gg * g.Kg, 1, g.K, bp.data(), tp * Pn, cb.data(), nb,
                    !first);
          else
            gemm<T>(g.Kg, jl, pc, dy + (n * g.K + gg * g.Kg) * PQ + p0, PQ, 1, bp.data(), tp * Pn, cb.data(), nb,
                    !first);
          first = false;
        }
      }
      for (int64_t k = 0; k < g.Kg; ++k)
        std::memcpy(dw + (gg * g.Kg + k) * Kc + j0, cb.data() + k * nb, jl * sizeof(T));
    }
  });
}

// Small weights (Kc x Kg up to kSplitPixelsFloats, one group): the pixels split into a fixed number of chunks, each
// task summing its chunk's tiles into its own full-size partial dW^T, the partials then added in chunk order (the
// same bits for any thread count). dy is then packed once and x read once, where bwd_weight_nhwc's tasks pack every
// tile of dy once per block (a 1x1 256 -> 64 layer at 56 x 56, batch 8: six times); a 1x1 stride-1 layer reads x in
// place as A. 2 threads, batch 8, 2026-11-27: 1x1 256 -> 64 @ 56 3.5-3.7 -> 2.3-2.8 ms (oneDNN 2.4-2.7), 64 -> 256
// 4.1-5.0 -> 3.0 (3.75), 3x3 64 @ 56 5.8 -> 4.8-5.0 (4.4-4.9); 3x3 128 @ 28 (147K floats) ran slower split (5.5 vs
// 4.9: its partials no longer stay in cache), hence the bound.
constexpr int64_t kSplitPixelsFloats = 64 * 1024;
constexpr int64_t kPixelChunks = 16;
template <typename T>
void bwd_weight_nhwc_split_pixels(const Geo& g, const T* x, const T* dy, T* dw) {
  constexpr int64_t Pn = kPanel<T>;
  const int64_t Kc = g.Kc(), Kgp = round_up_panel<T>(g.Kg), NPQ = g.N * g.PQ();
  const int64_t tp = std::min<int64_t>(kRedPix, NPQ), ntiles = (NPQ + tp - 1) / tp;
  const int64_t nchunk = std::min(kPixelChunks, ntiles);
  const bool in_place = g.same_pixels();
  // Every chunk's first tile overwrites its partial (nchunk <= ntiles): no zero-fill.
  std::unique_ptr<T[]> parts(new T[nchunk * Kc * Kgp]);
  at::parallel_for(0, nchunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> a(in_place ? 0 : tp * Kc), bp(tp * Kgp);
    for (int64_t ch = begin; ch < end; ++ch) {
      T* cb = parts.get() + ch * Kc * Kgp;
      const int64_t t0 = ch * ntiles / nchunk, t1 = (ch + 1) * ntiles / nchunk;
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t p0 = tile * tp, pc = std::min(tp, NPQ - p0);
        const T* ap = in_place ? x + p0 * g.C : a.data();
        const int64_t lda = in_place ? g.C : Kc;
        if (!in_place) im2col_rows_nhwc(g, x, 0, p0, pc, 0, Kc, a.data());
        attn::pack_rows<T, T>(dy + p0 * g.K, g.K, pc, g.Kg, bp.data(), tp * Pn);
        for (int64_t m0 = 0; m0 < Kc; m0 += kRowsPerBlock) {
          const int64_t mm = std::min(kRowsPerBlock, Kc - m0);
          gemm<T>(mm, g.Kg, pc, ap + m0, 1, lda, bp.data(), tp * Pn, cb + m0 * Kgp, Kgp, tile > t0);
        }
      }
    }
  });
  at::parallel_for(0, Kc, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t k = 0; k < g.Kg; ++k) {
        T v = parts[i * Kgp + k];
        for (int64_t ch = 1; ch < nchunk; ++ch) v += parts[(ch * Kc + i) * Kgp + k];
        dw[k * Kc + i] = v;
      }
  });
}

// NHWC dW, transposed orientation: dW^T[Kc x Kg] = sum over pixels of col^T(pixel, Kc)^T * dy(pixel, Kg), with A read
// from im2col rows built by memcpy of C-vectors and B = dy rows packed as they are. One task per (group, block of
// Kc rows); each sums over the batch and pixel tiles in a fixed order.
template <typename T>
void bwd_weight_nhwc(const Geo& g, const T* x, const T* dy, T* dw) {
  constexpr int64_t Pn = kPanel<T>;
  const int64_t Kc = g.Kc(), PQ = g.PQ(), Kgp = round_up_panel<T>(g.Kg);
  if (g.G == 1 && Kc * Kgp <= kSplitPixelsFloats && g.N * PQ >= 2 * kRedPix)
    return bwd_weight_nhwc_split_pixels<T>(g, x, dy, dw);
  const int64_t per = (4 * at::get_num_threads() + g.G - 1) / g.G;
  const int64_t mb = std::max<int64_t>(std::min<int64_t>(Kc, 48), (Kc + per - 1) / per);
  const int64_t nmb = (Kc + mb - 1) / mb;
  const int64_t NPQ = g.N * PQ;
  const int64_t tp = std::min<int64_t>(kRedPix, NPQ);
  const int64_t ntiles = (NPQ + tp - 1) / tp;
  at::parallel_for(0, g.G * nmb, grain_for(NPQ * g.Kg * mb), [&](int64_t begin, int64_t end) {
    std::vector<T> a(tp * mb), bp(tp * Kgp), cb(mb * Kgp);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t gg = t / nmb, i0 = (t % nmb) * mb, ml = std::min(mb, Kc - i0);
      bool first = true;
      {
        for (int64_t tile = 0; tile < ntiles; ++tile) {
          const int64_t p0 = tile * tp, pc = std::min(tp, NPQ - p0);
          im2col_rows_nhwc(g, x, gg, p0, pc, i0, i0 + ml, a.data());
          attn::pack_rows<T, T>(dy + p0 * g.K + gg * g.Kg, g.K, pc, g.Kg, bp.data(), tp * Pn);
          for (int64_t m0 = 0; m0 < ml; m0 += kRowsPerBlock) {
            const int64_t mm = std::min(kRowsPerBlock, ml - m0);
            gemm<T>(mm, g.Kg, pc, a.data() + m0, 1, ml, bp.data(), tp * Pn, cb.data() + m0 * Kgp, Kgp, !first);
          }
          first = false;
        }
      }
      transpose(cb.data(), Kgp, dw + gg * g.Kg * Kc + i0, Kc, ml, g.Kg);  // dw[k][i0 + i] = cb[i][k]
    }
  });
}

// Channel block of the dx tasks: enough tasks to keep every thread busy.
int64_t dx_channel_block(const Geo& g) {
  const int64_t want = 4 * at::get_num_threads();
  const int64_t per = (want + g.N * g.G - 1) / (g.N * g.G);
  return std::max<int64_t>(1, (g.Cg + per - 1) / per);
}

// dx (zeroed, x's layout) += col2im(W^T dy). w: (K, Kc) in (c, r, s) order (NCHW) or (r, s, c) order (NHWC).
template <typename T>
void bwd_input(const Geo& g, const T* dy, const T* w, T* dx) {
  constexpr int64_t Pn = kPanel<T>;
  const int64_t Kc = g.Kc(), PQ = g.PQ(), HW = g.HW(), RS = g.R * g.S;
  const int64_t kcb = kKcBytes / int64_t(sizeof(T));
  const int64_t cbk = dx_channel_block(g);
  const int64_t ncb = (g.Cg + cbk - 1) / cbk;
  const int64_t tasks = g.N * g.G * ncb;
  if (!g.nhwc) {
    int64_t tp = (kColTileBytes / 2 / int64_t(sizeof(T))) / g.Kg / Pn * Pn;
    tp = std::clamp<int64_t>(tp, Pn, 16 * Pn);
    tp = std::min(tp, round_up_panel<T>(PQ));
    const int64_t ntiles = (PQ + tp - 1) / tp;
    at::parallel_for(0, tasks, grain_for(PQ * g.Kg * cbk * RS), [&](int64_t begin, int64_t end) {
      std::vector<T> bp(g.Kg * tp), cb(std::min(kRowsPerBlock, cbk * RS) * tp);
      std::vector<Seg> segs;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / (g.G * ncb), gg = (t / ncb) % g.G, c0 = (t % ncb) * cbk;
        const int64_t cn = std::min(cbk, g.Cg - c0), m = cn * RS;
        const T* a = w + gg * g.Kg * Kc + c0 * RS;
        for (int64_t tile = 0; tile < ntiles; ++tile) {
          const int64_t p0 = tile * tp, pc = std::min(tp, PQ - p0);
          attn::pack_rows<T, T>(dy + (n * g.K + gg * g.Kg) * PQ + p0, PQ, g.Kg, pc, bp.data(), g.Kg * Pn);
          make_segs(g, p0, pc, pc, segs);
          // Rows of dcol in blocks, each scattered into dx while it is still in cache.
          for (int64_t m0 = 0; m0 < m; m0 += kRowsPerBlock) {
          const int64_t mm = std::min(kRowsPerBlock, m - m0);
          for (int64_t k0 = 0; k0 < g.Kg; k0 += kcb) {
            const int64_t kl = std::min(kcb, g.Kg - k0);
            gemm<T>(mm, pc, kl, a + m0 + k0 * Kc, 1, Kc, bp.data() + k0 * Pn, g.Kg * Pn, cb.data(), tp, k0 > 0);
          }
          for (int64_t i = m0; i < m0 + mm; ++i) {
            const int64_t c = i / RS, r = (i / g.S) % g.R, s = i % g.S;
            T* dxc = dx + (n * g.C + gg * g.Cg + c0 + c) * HW;
            const T* ci = cb.data() + (i - m0) * tp;
            for (const Seg& sg : segs) {
              const int64_t ih = sg.ih0 + r * g.dh;
              if (ih < 0 || ih >= g.H) continue;
              const int64_t off = sg.iw0 + s * g.dw;
              int64_t lo, hi;
              q_range(off, g.sw, g.W, sg.len, lo, hi);
              T* dr = dxc + ih * g.W + off;
              const T* src = ci + sg.j0;
              if (g.sw == 1)
                for (int64_t t = lo; t < hi; ++t) dr[t] += src[t];
              else
                for (int64_t t = lo; t < hi; ++t) dr[t * g.sw] += src[t];
            }
          }
          }
        }
      }
    });
  } else {
    const int64_t tp = std::min<int64_t>(kPixRows, PQ);
    const int64_t ntiles = (PQ + tp - 1) / tp;
    const int64_t ncolp = round_up_panel<T>(RS * cbk);
    // B(p = k, j = (rs, cc)) = w[(gg*Kg + k), rs, c0 + cc], panels of Pn columns, packed once per (group, channel
    // block) and shared by the images.
    std::vector<T> wp(g.G * ncb * g.Kg * ncolp);
    const int64_t npan = ncolp / Pn;
    at::parallel_for(0, g.G * ncb * npan, grain_for(g.Kg * Pn), [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v) {
        const int64_t u = v / npan, jp = (v % npan) * Pn;
        const int64_t gg = u / ncb, c0 = (u % ncb) * cbk, cn = std::min(cbk, g.Cg - c0), ncol = RS * cn;
        T* panel = wp.data() + u * g.Kg * ncolp + (jp / Pn) * g.Kg * Pn;
        int64_t offs[kPanel<T>];
        const int64_t jl = std::max<int64_t>(0, std::min(Pn, ncol - jp));
        for (int64_t jj = 0; jj < jl; ++jj) offs[jj] = ((jp + jj) / cn) * g.Cg + c0 + (jp + jj) % cn;
        const T* wg = w + gg * g.Kg * Kc;
        for (int64_t k = 0; k < g.Kg; ++k) {
          T* d = panel + k * Pn;
          const T* wr = wg + k * Kc;
          for (int64_t jj = 0; jj < jl; ++jj) d[jj] = wr[offs[jj]];
          for (int64_t jj = jl; jj < Pn; ++jj) d[jj] = T(0);
        }
      }
    });
    at::parallel_for(0, tasks, grain_for(PQ * g.Kg * cbk * RS), [&](int64_t begin, int64_t end) {
      std::vector<T> cb(tp * ncolp);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / (g.G * ncb), gg = (t / ncb) % g.G, c0 = (t % ncb) * cbk;
        const int64_t cn = std::min(cbk, g.Cg - c0), ncol = RS * cn;
        const T* bw = wp.data() + (gg * ncb + c0 / cbk) * g.Kg * ncolp;
        for (int64_t tile = 0; tile < ntiles; ++tile) {
          const int64_t p0 = tile * tp, pc = std::min(tp, PQ - p0);
          const T* a = dy + (n * PQ + p0) * g.K + gg * g.Kg;
          for (int64_t k0 = 0; k0 < g.Kg; k0 += kcb) {
            const int64_t kl = std::min(kcb, g.Kg - k0);
            gemm<T>(pc, ncol, kl, a + k0, g.K, 1, bw + k0 * Pn, g.Kg * Pn, cb.data(), ncolp, k0 > 0);
          }
          for (int64_t j = 0; j < pc; ++j) {
            const int64_t pix = p0 + j, ih0 = (pix / g.Q) * g.sh - g.ph, iw0 = (pix % g.Q) * g.sw - g.pw;
            for (int64_t r = 0; r < g.R; ++r) {
              const int64_t ih = ih0 + r * g.dh;
              if (ih < 0 || ih >= g.H) continue;
              for (int64_t s = 0; s < g.S; ++s) {
                const int64_t iw = iw0 + s * g.dw;
                if (iw < 0 || iw >= g.W) continue;
                T* __restrict__ d = dx + ((n * g.H + ih) * g.W + iw) * g.C + gg * g.Cg + c0;
                const T* __restrict__ src = cb.data() + j * ncolp + (r * g.S + s) * cn;
                for (int64_t c = 0; c < cn; ++c) d[c] += src[c];
              }
            }
          }
        }
      }
    });
  }
}

// Depthwise (C/groups == K/groups == 1) backward, direct, channels-last (an NCHW dy / x is transposed to channels-last
// first and dx transposed back). w and dw: (R*S, C).
// dx: one task per input row (it owns its pixels); a pixel gathers dy * w over the taps that reach it; pixels of one
// phase mod the stride share their taps, so blocks of kDwB of them run on dw_block.
// dW: see bwd_depthwise_dw_nhwc. Fixed orders everywhere: deterministic for any thread count.
// dx_nchw: dx is NCHW, each finished row of a task transposed into it from a row buffer (no channels-last dx).
template <typename T>
void bwd_depthwise_dx_nhwc(const Geo& g, const T* dy, const T* w, T* dx, bool dx_nchw = false) {
  const int64_t C = g.C, RS = g.R * g.S;
  auto floordiv = [](int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };
  // Tasks: (image, block of cb channels), all input rows (dy's rows stay in L1 between them).
  const int64_t cb = dw_channel_block<T>(C, (g.R + g.sh - 1) / g.sh * g.Q), ncb = (C + cb - 1) / cb;
  at::parallel_for(0, g.N * ncb, grain_for(g.HW() * cb * RS / (g.sh * g.sw)), [&](int64_t begin, int64_t end) {
    std::vector<const T*> sp(RS), wp(RS);
    std::vector<T> rowbuf(dx_nchw ? g.W * cb : 0);
    const int64_t opix = dx_nchw ? cb : C;  // pixel stride of the output
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / ncb, c0 = task % ncb * cb, nc = std::min(cb, C - c0);
      for (int64_t ih = 0; ih < g.H; ++ih) {
      const int64_t t = n * g.H + ih;
      for (int64_t ph = 0; ph < g.sw; ++ph) {
        for (int64_t iw = ph; iw < g.W;) {
          // Block of kDwB pixels iw + j * sw: interior when every phase-matching tap is in range for its first and
          // last pixel.
          const int64_t last = iw + (kDwB - 1) * g.sw;
          bool block = last < g.W;
          int64_t nt = 0;
          for (int64_t r = 0; r < g.R; ++r) {
            const int64_t hh = ih + g.ph - r * g.dh;
            if (hh < 0 || hh % g.sh != 0 || hh / g.sh >= g.P) continue;
            const int64_t p = hh / g.sh;
            for (int64_t s = 0; s < g.S; ++s) {
              const int64_t ww = iw + g.pw - s * g.dw;
              if (((ww % g.sw) + g.sw) % g.sw != 0) continue;
              const int64_t q0 = floordiv(ww, g.sw);
              const bool ok0 = q0 >= 0 && q0 < g.Q;
              if (block && !(ok0 && q0 + kDwB - 1 < g.Q)) block = false;
              if (!block && !ok0) continue;
              sp[nt] = dy + ((n * g.P + p) * g.Q + q0) * C + c0;
              wp[nt++] = w + (r * g.S + s) * C + c0;
            }
          }
          T* o = dx_nchw ? rowbuf.data() + iw * cb : dx + (t * g.W + iw) * C + c0;
          if (block) {
            dw_block<T, kDwB>(nc, nt, sp.data(), wp.data(), C, nullptr, o, g.sw * opix, nullptr, Act::kNone);
            iw += kDwB * g.sw;
          } else {
            dw_block<T, 1>(nc, nt, sp.data(), wp.data(), 0, nullptr, o, 0, nullptr, Act::kNone);
            iw += g.sw;
          }
        }
      }
      if (dx_nchw) transpose(rowbuf.data(), cb, dx + ((n * C + c0) * g.H + ih) * g.W, g.HW(), g.W, nc);
      }
    }
  });
}

// out[i] = part[0][i] + part[1][i] + ... (nparts partials of len values, len apart), added in part order: the fixed-
// chunk reductions give the same bits for any thread count.
template <typename T>
void sum_partials(const T* part, int64_t nparts, int64_t len, T* out) {
  at::parallel_for(0, len, 4096, [&](int64_t begin, int64_t end) {
    std::copy(part + begin, part + end, out + begin);
    for (int64_t p = 1; p < nparts; ++p)
      for (int64_t i = begin; i < end; ++i) out[i] += part[p * len + i];
  });
}

// f(std::integral_constant<int, n>) for a run-time n in [1, 7]: the depthwise dW kernels' tile widths (kernel
// columns), and with_tile: f(nr, ns as constants) for nr in [1, 3] kernel rows and ns in [1, 7] columns.
template <typename F>
void with_columns(int64_t n, F&& f) {
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    default: return f(std::integral_constant<int, 7>{});
  }
}
template <typename F>
void with_tile(int64_t nr, int64_t ns, F&& f) {
  with_columns(ns, [&](auto cols) {
    switch (nr) {
      case 1: return f(std::integral_constant<int, 1>{}, cols);
      case 2: return f(std::integral_constant<int, 2>{}, cols);
      default: return f(std::integral_constant<int, 3>{}, cols);
    }
  });
}

// Taps of the depthwise dW: acc[r][s] += dy[t][q][c..] * x[row(t, r)][q * sw + s * dw - pw][c..] over output rows t
// and their pixels q.
//
// dw_wgrad_run: one tile of kernel rows r0 .. r0 + NR - 1 and columns s0 .. s0 + NS - 1 over the output rows
// [t0, t1) and pixels [qlo, qhi), NC whole channel vectors from c: all NC x NR x NS sums in registers over all the
// rows (loaded from and stored back to part, the (R*S, C) partial of the rows' chunk), dy loaded once per pixel and
// vector for all the taps. The x value of (t, r, q, s) is read in place at xrow[(t - t0) * R + r] + xoff +
// ((q - qlo) * sw + s * dw) * C + lane (a row outside x is a row of zeros), the caller choosing tiles whose taps all
// lie inside x for the pixels: every load is a whole vector and the loops have no tests.
template <typename T, int NR, int NS, int NC>
void dw_wgrad_run(const Geo& g, const T* dy, const T* const* xrow, int64_t xoff, int64_t t0, int64_t t1, int64_t r0,
                  int64_t s0, int64_t qlo, int64_t qhi, int64_t c, T* part) {
  using V = convk::Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t C = g.C, xs = g.sw * C, xd = g.dw * C, x0 = xoff + s0 * xd;
  T* const pp = part + (r0 * g.S + s0) * C + c;
  V acc[NC][NR][NS];
#pragma GCC unroll 8
  for (int v = 0; v < NC; ++v)
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
      for (int k = 0; k < NS; ++k) acc[v][i][k] = V::loadu(pp + (i * g.S + k) * C + v * L);
  for (int64_t t = t0; t < t1; ++t) {
    const T* xr[NR];
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) xr[i] = xrow[(t - t0) * g.R + r0 + i] + x0;
    const T* dyr = dy + (t * g.Q + qlo) * C + c;
    for (int64_t q = 0; q < qhi - qlo; ++q) {
#pragma GCC unroll 8
      for (int v = 0; v < NC; ++v) {
        const V d = V::loadu(dyr + q * C + v * L);
#pragma GCC unroll 8
        for (int i = 0; i < NR; ++i) {
          const T* xp = xr[i] + q * xs + v * L;
#pragma GCC unroll 8
          for (int k = 0; k < NS; ++k) acc[v][i][k] = at::vec::fmadd(d, V::loadu(xp + k * xd), acc[v][i][k]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NC; ++v)
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
      for (int k = 0; k < NS; ++k) acc[v][i][k].store(pp + (i * g.S + k) * C + v * L);
}

// The same sums for one partial channel vector (n < L lanes, the end of C), x read in place: one kernel column at a
// time over the pixels where it lies inside x, its NR sums in registers.
template <typename T, int NR>
void dw_wgrad_partial(const Geo& g, const T* dy, const T* const* xrow, int64_t t0, int64_t t1, int64_t r0, int64_t s0,
                      int64_t ns, int64_t c, int64_t n, T* part) {
  using V = convk::Vec<T>;
  const int64_t C = g.C, xs = g.sw * C;
  for (int64_t k = 0; k < ns; ++k) {
    int64_t qlo, qhi;
    q_range((s0 + k) * g.dw - g.pw, g.sw, g.W, g.Q, qlo, qhi);
    const int64_t off = ((s0 + k) * g.dw - g.pw) * C + c;
    T* const pp = part + (r0 * g.S + s0 + k) * C + c;
    V acc[NR];
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) acc[i] = V::loadu(pp + i * g.S * C, n);
    for (int64_t t = t0; t < t1; ++t) {
      const T* dyr = dy + t * g.Q * C + c;
      for (int64_t q = qlo; q < qhi; ++q) {
        const V d = V::loadu(dyr + q * C, n);
#pragma GCC unroll 8
        for (int i = 0; i < NR; ++i)
          acc[i] = at::vec::fmadd(d, V::loadu(xrow[(t - t0) * g.R + r0 + i] + off + q * xs, n), acc[i]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) acc[i].store(pp + i * g.S * C, n);
  }
}

// One group of output rows [t0, t1) for a block of channels [c1, c2) (whole vectors up to cw): where each (t, r)
// reads x (rows[(t - t0) * R + r]: x's row, or a row of zeros), and the pixels whose taps all lie inside x ([qa, qb)).
template <typename T>
struct DwGradGroup {
  int64_t t0, t1, c1, c2, cw, qa, qb;
  const T* const* rows;
};

// One tile (NR kernel rows, NS columns from s0) over a group, two whole vectors at a time where the sums fit in
// registers (twice the independent chains, and a pass over the rows brings in two lines of every pixel): the
// interior pixels with all the taps, then each border pixel (q < qa or q >= qb) with the run of the tile's columns
// that lies inside x for it, x read in place either way; then a partial vector's pixels.
template <typename T, int NR, int NS>
void dw_wgrad_tile(const Geo& g, const T* dy, const DwGradGroup<T>& gr, int64_t r0, int64_t s0, T* part) {
  constexpr int64_t L = convk::Vec<T>::size();
  constexpr int NC = NR * NS <= 9 ? 2 : 1;
  auto pixels = [&](int64_t qlo, int64_t qhi, int64_t k0, int64_t nk) {
    const int64_t x0 = (qlo * g.sw - g.pw) * g.C;
    int64_t c = gr.c1;
    with_columns(nk, [&](auto cols) {
      constexpr int K = decltype(cols)::value;
      for (; NC == 2 && c + 2 * L <= gr.cw; c += 2 * L)
        dw_wgrad_run<T, NR, K, NC>(g, dy, gr.rows, x0 + c, gr.t0, gr.t1, r0, k0, qlo, qhi, c, part);
      for (; c < gr.cw; c += L)
        dw_wgrad_run<T, NR, K, 1>(g, dy, gr.rows, x0 + c, gr.t0, gr.t1, r0, k0, qlo, qhi, c, part);
    });
  };
  auto border = [&](int64_t q) {  // the tile's columns s0 + k with iw = q * sw + (s0 + k) * dw - pw in [0, W)
    int64_t k0 = 0, k1 = NS;
    while (k0 < NS && q * g.sw + (s0 + k0) * g.dw - g.pw < 0) ++k0;
    while (k1 > k0 && q * g.sw + (s0 + k1 - 1) * g.dw - g.pw >= g.W) --k1;
    if (k0 < k1) pixels(q, q + 1, s0 + k0, k1 - k0);
  };
  if (gr.qa < gr.qb) pixels(gr.qa, gr.qb, s0, NS);
  for (int64_t q = 0; q < gr.qa; ++q) border(q);
  for (int64_t q = std::max(gr.qa, gr.qb); q < g.Q; ++q) border(q);
  if (gr.cw < gr.c2) dw_wgrad_partial<T, NR>(g, dy, gr.rows, gr.t0, gr.t1, r0, s0, NS, gr.cw, gr.c2 - gr.cw, part);
}

// Bytes of x's and dy's rows one group of output rows touches per channel block (they stay in L2 while each
// channel vector of the block sweeps them).
constexpr int64_t kDwGradGroupBytes = 256 * 1024;
// Output pixels per chunk of the depthwise dW at least (fewer, larger chunks for small layers: each chunk's partial
// is loaded and stored once per group of rows and channel vector, and added up at the end).
constexpr int64_t kDwGradChunkPixels = 1024;

// dW: the rows (image, output row) cut into chunks (a function of the shape only), each summed in order into its own
// partial (R*S, C), the partials added in chunk order: the same bits for any thread count. Tasks: (chunk, block of
// channels). A task walks its rows in groups; per group the taps run in tiles of at most 3 kernel rows x 7 columns
// (dw_wgrad_tile: 3x3 is one tile), their sums in registers over the group.
template <typename T>
void bwd_depthwise_dw_nhwc(const Geo& g, const T* x, const T* dy, T* dw) {
  constexpr int64_t L = convk::Vec<T>::size();
  const int64_t C = g.C, RS = g.R * g.S, rows = g.N * g.P;
  const int64_t nchunks = std::clamp<int64_t>(rows * g.Q / kDwGradChunkPixels, 1, std::min<int64_t>(rows, 8));
  std::vector<T> part(nchunks * RS * C, T(0));
  // Pixels [qa, qb) have every tap inside x.
  int64_t qa = 0, qb = g.Q;
  for (int64_t s = 0; s < g.S; ++s) {
    int64_t lo, hi;
    q_range(s * g.dw - g.pw, g.sw, g.W, g.Q, lo, hi);
    qa = std::max(qa, lo), qb = std::min(qb, hi);
  }
  qa = std::min(qa, g.Q), qb = std::max(qb, qa);  // a tap may miss x for every pixel (images narrower than it)
  // Channel blocks: whole pixels where a group of rows fits (x and dy then stream in memory order); narrower where
  // there are fewer chunks than 4 tasks per thread (small images), but at least 4 vectors.
  const int64_t row_pixels = g.sh * g.W + g.Q;  // x and dy pixels one more output row brings in
  const int64_t want = (4 * at::get_num_threads() + nchunks - 1) / nchunks;
  const int64_t cb = std::min(dw_channel_block<T>(C, g.R * g.W + g.Q),
                              std::max(4 * L, ((C + want - 1) / want + L - 1) / L * L));
  const int64_t ncb = (C + cb - 1) / cb;
  const int64_t group = std::max<int64_t>(1, kDwGradGroupBytes / int64_t(sizeof(T)) / (row_pixels * cb));
  const std::vector<T> zero(g.W * C, T(0));
  at::parallel_for(0, nchunks * ncb, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> rowp(group * g.R);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ch = task / ncb, c1 = task % ncb * cb, c2 = std::min(C, c1 + cb);
      T* acc = part.data() + ch * RS * C;
      const int64_t tb = ch * rows / nchunks, te = (ch + 1) * rows / nchunks;
      for (int64_t t0 = tb; t0 < te; t0 += group) {
        const int64_t t1 = std::min(te, t0 + group);
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t r = 0; r < g.R; ++r) {
            const int64_t img = t / g.P, ih = t % g.P * g.sh - g.ph + r * g.dh;
            rowp[(t - t0) * g.R + r] = ih >= 0 && ih < g.H ? x + (img * g.H + ih) * g.W * C : zero.data();
          }
        const DwGradGroup<T> gr{t0, t1, c1, c2, c1 + (c2 - c1) / L * L, qa, qb, rowp.data()};
        for (int64_t r0 = 0; r0 < g.R; r0 += 3)
          for (int64_t s0 = 0; s0 < g.S; s0 += 7)
            with_tile(std::min<int64_t>(g.R - r0, 3), std::min<int64_t>(g.S - s0, 7), [&](auto rows, auto cols) {
              dw_wgrad_tile<T, decltype(rows)::value, decltype(cols)::value>(g, dy, gr, r0, s0, acc);
            });
      }
    }
  });
  sum_partials(part.data(), nchunks, RS * C, dw);
}

// NCHW depthwise dW of a layer with stride 1 or 2 in width, direct (no channels-last copies of x and dy): one task
// per channel, its images in order. Each x plane is copied into a zero-padded buffer of hp rows x wp columns (entry
// (i, j) = x[i - ph][j - pw]), so that tap (r, s) of output pixel (p, q) reads entry
// (p * sh + r * dh, q * sw + s * dw).
// Stride 2 works on x's grid: dy's rows are spread to its even columns (zeros between), so that for L positions
// j = q * sw the taps again read contiguous runs; half the multiply-adds are of zeros, which costs less than
// splitting x's columns by parity (and the lanes were mostly idle anyway: the kernels wait on memory).
// dw_wgrad_plane: one tile of kernel rows r0 .. r0 + NR - 1, columns s0 .. s0 + NS - 1 over one plane, the sums
// (vectors over positions j, added across lanes at the end) in registers over the plane's rows; dy loaded once per
// vector of positions for all the tile's taps. dgrid: dy's rows on x's grid (J = Q * sw positions, dld apart).
template <typename T, int NR, int NS>
void dw_wgrad_plane(const Geo& g, const T* buf, int64_t wp, const T* dgrid, int64_t dld, int64_t r0, int64_t s0,
                    T* vacc) {
  using V = convk::Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t J = g.Q * g.sw;
  V acc[NR][NS];
#pragma GCC unroll 8
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
    for (int k = 0; k < NS; ++k) acc[i][k] = V::loadu(vacc + ((r0 + i) * g.S + s0 + k) * L);
  for (int64_t p = 0; p < g.P; ++p) {
    const T* dr = dgrid + p * dld;
    const T* xr = buf + (p * g.sh + r0 * g.dh) * wp + s0 * g.dw;
    for (int64_t j = 0; j < J; j += L) {
      const V d = V::loadu(dr + j, std::min(L, J - j));  // lanes past J: zero
#pragma GCC unroll 8
      for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
        for (int k = 0; k < NS; ++k)
          acc[i][k] = at::vec::fmadd(d, V::loadu(xr + i * g.dh * wp + k * g.dw + j), acc[i][k]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
    for (int k = 0; k < NS; ++k) acc[i][k].store(vacc + ((r0 + i) * g.S + s0 + k) * L);
}

// Whether the NCHW depthwise dW runs on the planes directly: stride 1 or 2 in width, rows of at least a vector of
// positions (narrower rows would leave most lanes idle: the channels-last path takes them).
template <typename T>
bool dw_wgrad_nchw_direct(const Geo& g) {
  return g.sw <= 2 && g.Q * g.sw >= convk::Vec<T>::size();
}

template <typename T>
void bwd_depthwise_dw_nchw(const Geo& g, const T* x, const T* dy, T* dw) {
  using V = convk::Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t C = g.C, RS = g.R * g.S, J = g.Q * g.sw;
  const int64_t hp = (g.P - 1) * g.sh + (g.R - 1) * g.dh + 1;  // padded rows the taps reach
  // Padded columns: the last vector of positions reads up to J rounded up to L, + the widest tap.
  const int64_t wp = (J + L - 1) / L * L + (g.S - 1) * g.dw;
  const int64_t dld = (J + L - 1) / L * L;  // row pitch of the spread dy (stride 2)
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(hp * wp), vacc(RS * L), spread(g.sw == 2 ? g.P * dld + L : 0);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(vacc.begin(), vacc.end(), T(0));
      for (int64_t n = 0; n < g.N; ++n) {
        const T* xp = x + (n * C + c) * g.HW();
        for (int64_t i = 0; i < hp; ++i) {  // row i: zeros, x's row i - ph at column pw, zeros
          T* row = buf.data() + i * wp;
          const int64_t ih = i - g.ph;
          const int64_t lo = std::min(g.pw, wp);
          const int64_t hi = ih >= 0 && ih < g.H ? std::clamp<int64_t>(g.W + g.pw, lo, wp) : lo;
          std::fill(row, row + lo, T(0));
          if (hi > lo) std::memcpy(row + lo, xp + ih * g.W + (lo - g.pw), (hi - lo) * sizeof(T));
          std::fill(row + hi, row + wp, T(0));
        }
        const T* dgrid = dy + (n * C + c) * g.PQ();
        int64_t ld = g.Q;
        if (g.sw == 2) {  // dy's rows spread to the even positions, a vector at a time
          for (int64_t p = 0; p < g.P; ++p) {
            const T* src = dgrid + p * g.Q;
            T* dst = spread.data() + p * dld;
            for (int64_t q = 0; q < g.Q; q += L) {
              const auto [lo, hi] = at::vec::interleave2(V::loadu(src + q, std::min(L, g.Q - q)), V(T(0)));
              lo.store(dst + 2 * q);
              hi.store(dst + 2 * q + L, std::min(L, 2 * g.Q - 2 * q - L));
            }
          }
          dgrid = spread.data(), ld = dld;
        }
        for (int64_t r0 = 0; r0 < g.R; r0 += 3)
          for (int64_t s0 = 0; s0 < g.S; s0 += 7)
            with_tile(std::min<int64_t>(g.R - r0, 3), std::min<int64_t>(g.S - s0, 7), [&](auto rows, auto cols) {
              dw_wgrad_plane<T, decltype(rows)::value, decltype(cols)::value>(g, buf.data(), wp, dgrid, ld, r0, s0,
                                                                               vacc.data());
            });
      }
      for (int64_t t = 0; t < RS; ++t) {  // lanes added in a fixed order
        T sum = 0;
        for (int64_t l = 0; l < L; ++l) sum += vacc[t * L + l];
        dw[t * C + c] = sum;
      }
    }
  });
}

// x may be null (no dW), dx / dw null when not wanted. NCHW: dW on the planes in place where their rows are wide
// enough (bwd_depthwise_dw_nchw) and dx of a stride-1 layer by the NCHW forward kernel on dy, so that a stride-1
// layer's backward copies nothing (the copies cost more than the kernels: 144 channels at 56 x 56); otherwise
// through channels-last copies of x and dy, dx transposed into NCHW row by row as the kernel finishes them.
template <typename T>
void bwd_depthwise(const Geo& g, const T* x, const T* dy, const T* w, T* dx, T* dw) {
  const bool dw_in_place = !g.nhwc && dw_wgrad_nchw_direct<T>(g);
  const bool dx_fwd = dx && dx_as_forward(g);
  at::Tensor xt, dyt;  // channels-last copies (NCHW), from the reused-memory pool
  const T* xl = x;
  const T* dyl = dy;
  if (!g.nhwc && ((dw && !dw_in_place) || (dx && !dx_fwd))) {
    dyt = channels_last_copy<T>(out_geo(g), dy);
    dyl = dyt.const_data_ptr<T>();
    if (dw && !dw_in_place) {
      xt = channels_last_copy<T>(g, x);
      xl = xt.const_data_ptr<T>();
    }
  }
  // dW first: it reads x and dy while dy is still in cache (the layer after produced it), where dx's writes (as large
  // as x) would evict it first. Forward + backward, batch 8, median of 20 alternating, 2026-11-27: 144 channels @56
  // s2 1.80 -> 1.72 ms channels-last, 4.29 -> 4.10 NCHW; 96 @112 s2 5.16 -> 4.95; others within noise.
  if (dw && dw_in_place) bwd_depthwise_dw_nchw<T>(g, x, dy, dw);
  else if (dw) bwd_depthwise_dw_nhwc<T>(g, xl, dyl, dw);
  if (dx_fwd) {
    // Stride 1: dx is the forward depthwise convolution of dy with the kernel flipped in (r, s), padding d*(R-1) - p.
    Geo gd = out_geo(g);
    gd.ph = g.dh * (g.R - 1) - g.ph, gd.pw = g.dw * (g.S - 1) - g.pw;
    const int64_t RS = g.R * g.S;
    std::unique_ptr<T[]> wf(new T[RS * g.C]);
    for (int64_t i = 0; i < RS; ++i) std::memcpy(wf.get() + (RS - 1 - i) * g.C, w + i * g.C, g.C * sizeof(T));
    if (g.nhwc) fwd_depthwise_nhwc<T>(gd, dy, wf.get(), nullptr, nullptr, Act::kNone, dx);
    else fwd_depthwise_nchw<T>(gd, dy, wf.get(), nullptr, nullptr, Act::kNone, dx);
  } else if (dx) {
    bwd_depthwise_dx_nhwc<T>(g, dyl, w, dx, !g.nhwc);
  }
}

template <typename T>
void bwd_bias(const Geo& g, const T* dy, T* db) {
  using V = convk::Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t PQ = g.PQ();
  if (!g.nhwc) {
    // Per channel: its planes summed in 4 vectors of lanes (a float sum does not vectorize by itself: one add after
    // another, 4 cycles each), the lanes added in a fixed order at the end.
    at::parallel_for(0, g.K, grain_for(g.N * PQ), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        V acc[4] = {V(T(0)), V(T(0)), V(T(0)), V(T(0))};
        for (int64_t n = 0; n < g.N; ++n) {
          const T* row = dy + (n * g.K + k) * PQ;
          int64_t j = 0;
          for (; j + 4 * L <= PQ; j += 4 * L)
            for (int u = 0; u < 4; ++u) acc[u] = acc[u] + V::loadu(row + j + u * L);
          for (int u = 0; j < PQ; j += L, ++u) acc[u] = acc[u] + V::loadu(row + j, std::min(L, PQ - j));
        }
        T lanes[4 * L];
        for (int u = 0; u < 4; ++u) acc[u].store(lanes + u * L);
        T sum = 0;
        for (int64_t i = 0; i < 4 * L; ++i) sum += lanes[i];
        db[k] = sum;
      }
    });
  } else {
    // Fixed chunks of pixels (a function of the shape only), each summed into its own partial over the channels, the
    // partials added in chunk order: the same bits for any thread count.
    const int64_t rows = g.N * PQ, nchunks = std::clamp<int64_t>(rows / 256, 1, 8);
    std::vector<T> part(nchunks * g.K, T(0));
    at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        T* __restrict__ acc = part.data() + ch * g.K;
        for (int64_t i = ch * rows / nchunks; i < (ch + 1) * rows / nchunks; ++i) {
          const T* __restrict__ row = dy + i * g.K;
          for (int64_t k = 0; k < g.K; ++k) acc[k] += row[k];
        }
      }
    });
    sum_partials(part.data(), nchunks, g.K, db);
  }
}

// The weight's rows (K, Kc) in its own memory order, without a permuting copy: (r, s, c) for a channels-last weight
// (and 1x1, where the orders agree), else (c, r, s). Sets w_rsc to the order.
at::Tensor natural_weight_rows(const char* fn, const Geo& g, const at::Tensor& weight, at::ScalarType acc,
                               bool& w_rsc) {
  w_rsc = layout_of(fn, "weight", weight) == at::MemoryFormat::ChannelsLast || g.R * g.S == 1;
  return weight_rows(weight, acc, w_rsc);
}

// Whether an NCHW convolution runs on fwd_pointwise_nchw: 1x1, stride 1, no padding, and images large enough for
// its panels of pixels (which stop at the image's end) to be at least 7/8 full: 7x7 images (49 = 64 - 15 pixels with
// AVX-512) take the transposing path, whose pixel runs span images.
template <typename T>
bool pointwise_nchw(const Geo& g) {
  constexpr int64_t W = convk::Vec<T>::size(), Pn = convk::kMaxNR * W;
  const int64_t HW = g.HW(), width = HW / Pn * Pn + (HW % Pn + W - 1) / W * W;
  return !g.nhwc && g.same_pixels() && 8 * HW >= 7 * width;
}

// A 1x1 convolution with a stride and no padding; subsampled(g): the same convolution on the pixels it reads (stride
// 1 on P x Q images).
bool strided_pointwise(const Geo& g) {
  return g.R == 1 && g.S == 1 && g.ph == 0 && g.pw == 0 && (g.sh > 1 || g.sw > 1);
}

Geo subsampled(const Geo& g) {
  Geo gs = g;
  gs.H = g.P, gs.W = g.Q, gs.sh = gs.sw = 1;
  return gs;
}

// y = act(conv(x) + bias + residual) for a non-depthwise convolution: x (acc type, in y's layout g.nhwc) is read
// channels-last by the GEMM, so an NCHW x is transposed first, except for the pointwise case that reads it in place
// (with the weight's rows w, (K, Cg)). pack(Pn): the weight's panels (fwd_igemm).
template <typename T, typename Pack>
void forward_gemm(const Geo& g, const at::Tensor& xa, const T* w, const Pack& pack, const T* wino_u, const T* bias,
                  const T* res, Act act, T* y) {
  if (g.nhwc) {
    fwd_gemm<T>(g, xa.data_ptr<T>(), pack, wino_u, bias, res, act, y);
  } else if (pointwise_nchw<T>(g)) {
    fwd_pointwise_nchw<T>(g, xa.data_ptr<T>(), w, bias, res, act, y);
  } else if (const Geo gs = subsampled(g); strided_pointwise(g) && pointwise_nchw<T>(gs)) {
    // A strided 1x1 convolution reads one pixel in sh x sw: gathered into a compact NCHW x (a quarter of x for
    // stride 2, as ResNet's downsampling shortcuts), they make a stride-1 1x1 convolution for the pointwise
    // kernel, instead of transposing all of x to channels-last.
    const at::Tensor xs = xa.slice(2, 0, g.H, g.sh).slice(3, 0, g.W, g.sw).contiguous();
    fwd_pointwise_nchw<T>(gs, xs.data_ptr<T>(), w, bias, res, act, y);
  } else {
    const at::Tensor xt = channels_last_copy<T>(g, xa.data_ptr<T>());
    Geo gl = g;
    gl.nhwc = true;
    if (!winograd_ok(gl, wino_u != nullptr)) {
      fwd_gemm<T>(g, xt.data_ptr<T>(), pack, wino_u, bias, res, act, y);
      return;
    }
    // Winograd writes channels-last: conv + bias into a channels-last buffer, then one transposing pass into y that
    // adds the residual and applies the activation.
    at::Tensor yt = empty_reusing_memory({g.N, g.K, g.P, g.Q}, xa.options(), at::MemoryFormat::ChannelsLast);
    fwd_gemm<T>(gl, xt.data_ptr<T>(), pack, wino_u, bias, nullptr, Act::kNone, yt.data_ptr<T>());
    to_nchw_epilogue<T>(g, yt.data_ptr<T>(), res, act, y);
  }
}

// dx of a stride-1 convolution is a forward convolution of dy, with the weight flipped in (r, s) and transposed per
// group (K and C swapped) and padding d*(R-1) - p: it runs on the forward's kernel. Needs p <= d*(R-1) per dim.
bool dx_as_forward(const Geo& g) {
  return g.sh == 1 && g.sw == 1 && g.ph <= g.dh * (g.R - 1) && g.pw <= g.dw * (g.S - 1);
}

at::Tensor dx_by_forward(const char* fn, const Geo& g, const at::Tensor& dya, const at::Tensor& weight,
                         at::ScalarType acc) {
  Geo gd = g;
  gd.C = g.K, gd.H = g.P, gd.W = g.Q, gd.K = g.C, gd.Cg = g.Kg, gd.Kg = g.Cg;
  gd.ph = g.dh * (g.R - 1) - g.ph, gd.pw = g.dw * (g.S - 1) - g.pw, gd.P = g.H, gd.Q = g.W;
  bool w_rsc = false;
  const at::Tensor wa = natural_weight_rows(fn, g, weight, acc, w_rsc);
  // The pointwise NCHW kernel reads the weight's rows in place: here the transposed (C, Kg) per group.
  const bool pointwise = pointwise_nchw<ConvAcc>(gd);
  const at::Tensor wt = pointwise ? wa.reshape({g.G, g.Kg, g.Cg}).transpose(1, 2).contiguous() : at::Tensor();
  at::Tensor dx = empty_reusing_memory({g.N, g.C, g.H, g.W}, dya.options(), fmt_of(g));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto pack = [&](int64_t Pn) { return pack_dx_panels<T>(g, wa.data_ptr<T>(), w_rsc, Pn); };
    forward_gemm<T>(gd, dya, wt.defined() ? wt.data_ptr<T>() : nullptr, pack, nullptr, nullptr, nullptr, Act::kNone,
                    dx.data_ptr<T>());
  };
  run(ConvAcc{});
  return dx;
}

// Weight layouts made once for inference (conv2d_prepare_weight_cpu), each checked against what this forward would
// make: fwd_igemm's panels and the Winograd transform.
struct Prepared {
  const void* panels = nullptr;
  int64_t panel_width = 0;
  const void* winograd = nullptr;
};

Prepared check_prepared(const char* fn, const Geo& g, at::ScalarType acc, const std::optional<at::Tensor>& panels,
                        const std::optional<at::Tensor>& winograd) {
  Prepared p;
  const int64_t W = convk::Vec<ConvAcc>::size();
  auto check = [&](const at::Tensor& t, const char* name, int64_t numel) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == acc && t.is_contiguous() && t.numel() == numel, fn, ": ",
                name, " does not match this weight (", numel, " contiguous ", acc, " CPU values expected, got ",
                t.numel(), " ", t.scalar_type(), " on ", t.device(), "): make it with conv2d_prepare_weight_cpu");
    return t.data_ptr();
  };
  if (panels.has_value() && panels->defined()) {
    const int64_t nr = igemm_panel_vectors<ConvAcc>(g);
    p.panel_width = nr * W;
    p.panels = check(*panels, "prepared_panels", panels_numel(g, p.panel_width));
  }
  if (winograd.has_value() && winograd->defined()) {
    TORCH_CHECK(winograd_eligible(g), fn, ": prepared_winograd given for a convolution that Winograd does not run "
                "(3x3, stride 1, dilation 1, one group, C and K >= 32)");
    const int64_t Pn = convk::kMaxNR * W;
    p.winograd = check(*winograd, "prepared_winograd", winograd_numel(g, Pn));
  }
  return p;
}

// Panels for one forward: packed now, or the prepared ones when they have the width asked for.
template <typename T>
struct Panels {
  std::unique_ptr<T[]> owned;
  const T* data;
  const T* get() const { return data; }
};

std::vector<at::Tensor> conv2d_forward(const char* fn, const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                                       std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                                       const std::optional<at::Tensor>& residual, const std::string& activation,
                                       const std::optional<at::Tensor>& prepared_panels,
                                       const std::optional<at::Tensor>& prepared_winograd) {
  const Geo g = check_args(fn, x, weight, stride, padding, dilation, groups);
  const Act act = parse_activation(fn, activation);
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device().is_cpu(), fn, ": residual must be a CPU tensor, got device ", r.device());
    TORCH_CHECK(r.scalar_type() == x.scalar_type(), fn, ": residual must have x's dtype ", x.scalar_type(),
                ", got ", r.scalar_type());
    TORCH_CHECK(r.dim() == 4 && r.size(0) == g.N && r.size(1) == g.K && r.size(2) == g.P && r.size(3) == g.Q, fn,
                ": residual must have the output's shape (N, K, P, Q) = (", g.N, ", ", g.K, ", ", g.P, ", ", g.Q,
                "), got ", shape_str(r.sizes()));
  }
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), fn, ": bias must be a CPU tensor, got device ", b.device());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), fn, ": bias must have x's dtype ", x.scalar_type(), ", got ",
                b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == g.K, fn, ": bias must have shape (K,) = (", g.K, ",), got ",
                shape_str(b.sizes()));
  }
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::MemoryFormat fmt = fmt_of(g);
  const bool depthwise = g.Cg == 1 && g.Kg == 1;
  const Prepared prepared = check_prepared(fn, g, acc, prepared_panels, prepared_winograd);
  const at::Tensor xa = x.to(acc).contiguous(fmt);
  const at::Tensor ba = has_bias ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor ra = has_residual ? residual->to(acc).contiguous(fmt) : at::Tensor();
  at::Tensor y = empty_reusing_memory({g.N, g.K, g.P, g.Q}, x.options().dtype(acc), fmt);
  if (g.N == 0) return {y.to(x.scalar_type())};
  bool w_rsc = false;
  at::Tensor wa;
  if (depthwise)
    wa = weight.to(acc).contiguous().reshape({g.K, g.R * g.S});
  else
    wa = natural_weight_rows(fn, g, weight, acc, w_rsc);
  if (depthwise) wa = wa.t().contiguous();  // (R*S, C)
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* bp = has_bias ? ba.data_ptr<T>() : nullptr;
    const T* rp = has_residual ? ra.data_ptr<T>() : nullptr;
    if (depthwise && g.nhwc)
      fwd_depthwise_nhwc<T>(g, xa.data_ptr<T>(), wa.data_ptr<T>(), bp, rp, act, y.data_ptr<T>());
    else if (depthwise)
      fwd_depthwise_nchw<T>(g, xa.data_ptr<T>(), wa.data_ptr<T>(), bp, rp, act, y.data_ptr<T>());
    else
      forward_gemm<T>(
          g, xa, wa.data_ptr<T>(),
          [&](int64_t Pn) {
            if (prepared.panels && Pn == prepared.panel_width)
              return Panels<T>{nullptr, static_cast<const T*>(prepared.panels)};
            std::unique_ptr<T[]> packed = pack_weight_panels<T>(g, wa.data_ptr<T>(), w_rsc, Pn);
            const T* data = packed.get();
            return Panels<T>{std::move(packed), data};
          },
          static_cast<const T*>(prepared.winograd), bp, rp, act, y.data_ptr<T>());
  };
  run(ConvAcc{});
  if (x.scalar_type() != acc) y = y.to(x.scalar_type());
  return {y};
}

}  // namespace

std::vector<at::Tensor> MLTK_CONV_ENTRY(conv2d_forward_cpu)(const at::Tensor& x, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                            std::vector<int64_t> dilation, int64_t groups,
                                                            const std::optional<at::Tensor>& residual,
                                                            const std::string& activation) {
#ifndef MLTK_CONV_F64
  if (is_double(x))
    return conv2d_forward_cpu_f64(x, weight, bias, std::move(stride), std::move(padding), std::move(dilation), groups,
                                  residual, activation);
#endif
  return conv2d_forward("conv2d_forward_cpu", x, weight, bias, std::move(stride), std::move(padding),
                        std::move(dilation), groups, residual, activation, std::nullopt, std::nullopt);
}

std::vector<at::Tensor> MLTK_CONV_ENTRY(conv2d_forward_prepared_cpu)(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
    const std::optional<at::Tensor>& residual, const std::string& activation,
    const std::optional<at::Tensor>& prepared_panels, const std::optional<at::Tensor>& prepared_winograd) {
#ifndef MLTK_CONV_F64
  if (is_double(x))
    return conv2d_forward_prepared_cpu_f64(x, weight, bias, std::move(stride), std::move(padding),
                                           std::move(dilation), groups, residual, activation, prepared_panels,
                                           prepared_winograd);
#endif
  return conv2d_forward("conv2d_forward_prepared_cpu", x, weight, bias, std::move(stride), std::move(padding),
                        std::move(dilation), groups, residual, activation, prepared_panels, prepared_winograd);
}

std::vector<at::Tensor> MLTK_CONV_ENTRY(conv2d_prepare_weight_cpu)(const at::Tensor& weight, int64_t groups,
                                                                   std::vector<int64_t> stride,
                                                                   std::vector<int64_t> dilation) {
#ifndef MLTK_CONV_F64
  if (is_double(weight))
    return conv2d_prepare_weight_cpu_f64(weight, groups, std::move(stride), std::move(dilation));
#endif
  constexpr const char* fn = "conv2d_prepare_weight_cpu";
  TORCH_CHECK(weight.defined() && weight.device().is_cpu() && weight.layout() == at::kStrided, fn,
              ": weight must be a dense CPU tensor");
  TORCH_CHECK(supported_dtype(weight.scalar_type()), fn, ": weight must be float32, float64, float16 or bfloat16, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4, fn, ": weight must be 4-D (K, C / groups, R, S), got ", shape_str(weight.sizes()));
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, fn, ": groups must be >= 1 and divide K = ",
              weight.size(0), ", got ", groups);
  Geo g{};
  g.K = weight.size(0), g.Cg = weight.size(1), g.R = weight.size(2), g.S = weight.size(3);
  g.G = groups, g.Kg = g.K / groups, g.C = g.Cg * groups;
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2, fn, ": stride and dilation must have 2 elements");
  g.sh = stride[0], g.sw = stride[1], g.dh = dilation[0], g.dw = dilation[1];
  const at::ScalarType acc = acc_type(weight.scalar_type());
  if (g.Cg == 1 && g.Kg == 1) return {at::Tensor(), at::Tensor()};  // depthwise: its kernels read the weight itself
  bool w_rsc = false;
  const at::Tensor wa = natural_weight_rows(fn, g, weight, acc, w_rsc);
  at::Tensor panels, winograd;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    constexpr int64_t W = convk::Vec<T>::size();
    auto as_tensor = [&](std::unique_ptr<T[]> data, int64_t numel) {
      at::Tensor t = at::empty({numel}, weight.options().dtype(acc));
      std::copy(data.get(), data.get() + numel, t.data_ptr<T>());
      return t;
    };
    const int64_t Pn = igemm_panel_vectors<T>(g) * W;
    panels = as_tensor(pack_weight_panels<T>(g, wa.data_ptr<T>(), w_rsc, Pn), panels_numel(g, Pn));
    if (winograd_eligible(g)) {
      constexpr int64_t Pw = convk::kMaxNR * W;
      const std::unique_ptr<T[]> direct = pack_weight_panels<T>(g, wa.data_ptr<T>(), w_rsc, Pw);
      winograd = as_tensor(winograd_weights<T, convk::kMaxNR>(g, direct.get()), winograd_numel(g, Pw));
    }
  };
  run(ConvAcc{});
  return {panels, winograd};
}

std::vector<at::Tensor> MLTK_CONV_ENTRY(conv2d_backward_cpu)(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& weight, std::vector<int64_t> stride,
                                                             std::vector<int64_t> padding,
                                                             std::vector<int64_t> dilation, int64_t groups,
                                                             std::vector<bool> output_mask) {
#ifndef MLTK_CONV_F64
  if (is_double(x))
    return conv2d_backward_cpu_f64(dy, x, weight, std::move(stride), std::move(padding), std::move(dilation), groups,
                                   std::move(output_mask));
#endif
  constexpr const char* fn = "conv2d_backward_cpu";
  const Geo g = check_args(fn, x, weight, stride, padding, dilation, groups);
  TORCH_CHECK(output_mask.size() == 3, fn, ": output_mask must have 3 elements (x, weight, bias), got ",
              output_mask.size());
  TORCH_CHECK(dy.defined(), fn, ": dy must be a tensor, got an undefined one");
  TORCH_CHECK(dy.device().is_cpu(), fn, ": dy must be a CPU tensor, got device ", dy.device());
  TORCH_CHECK(dy.layout() == at::kStrided, fn, ": dy must be a dense (strided) tensor, got layout ", dy.layout());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), fn, ": dy must have x's dtype ", x.scalar_type(), ", got ",
              dy.scalar_type());
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == g.N && dy.size(1) == g.K && dy.size(2) == g.P && dy.size(3) == g.Q, fn,
              ": dy must have shape (N, K, P, Q) = (", g.N, ", ", g.K, ", ", g.P, ", ", g.Q, "), got ",
              shape_str(dy.sizes()));
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::MemoryFormat fmt = fmt_of(g);
  // dy may arrive in any strides (expanded from .sum().backward(), or in the other layout): make it x's layout.
  const at::Tensor dya = dy.to(acc).contiguous(fmt);
  at::Tensor dx, dw, db;
  if (g.N == 0) {  // empty batch: the sums are empty
    if (output_mask[0]) dx = empty_reusing_memory(x.sizes(), x.options(), fmt);
    if (output_mask[1])
      dw = at::empty(weight.sizes(), weight.options(), layout_of(fn, "weight", weight)).zero_();
    if (output_mask[2]) db = at::empty({g.K}, x.options()).zero_();
    return {dx, dw, db};
  }
  const bool depthwise = g.Cg == 1 && g.Kg == 1;
  if (depthwise && (output_mask[0] || output_mask[1])) {
    const at::Tensor xa = output_mask[1] ? x.to(acc).contiguous(fmt) : at::Tensor();
    at::Tensor wa = weight.to(acc).contiguous().reshape({g.K, g.R * g.S});
    wa = wa.t().contiguous();  // (R*S, C)
    at::Tensor dwa = output_mask[1] ? at::empty_like(wa) : at::Tensor();
    if (output_mask[0]) dx = empty_reusing_memory({g.N, g.C, g.H, g.W}, x.options().dtype(acc), fmt);
    using T = ConvAcc;
    bwd_depthwise<T>(g, output_mask[1] ? xa.data_ptr<T>() : nullptr, dya.data_ptr<T>(), wa.data_ptr<T>(),
                     output_mask[0] ? dx.data_ptr<T>() : nullptr, output_mask[1] ? dwa.data_ptr<T>() : nullptr);
    if (output_mask[0] && x.scalar_type() != acc) dx = dx.to(x.scalar_type());
    if (output_mask[1]) {
      const at::Tensor src = dwa.t().reshape({g.K, 1, g.R, g.S});
      dw = at::empty(weight.sizes(), weight.options(), layout_of(fn, "weight", weight));
      dw.copy_(src);
    }
  } else if (output_mask[0] || output_mask[1]) {
    const bool dx_fwd = output_mask[0] && dx_as_forward(g);
    const at::Tensor xa = output_mask[1] ? x.to(acc).contiguous(fmt) : at::Tensor();
    const at::Tensor wa = output_mask[0] && !dx_fwd ? weight_rows(weight, acc, g.nhwc) : at::Tensor();
    at::Tensor dwa = output_mask[1] ? at::empty({g.K, g.Kc()}, x.options().dtype(acc)) : at::Tensor();
    if (dx_fwd) dx = dx_by_forward(fn, g, dya, weight, acc);
    else if (output_mask[0]) dx = empty_reusing_memory({g.N, g.C, g.H, g.W}, x.options().dtype(acc), fmt).zero_();
    const bool dw_rsc = output_mask[1] && (g.nhwc || nchw_weight_grad_via_channels_last(g));
    auto weight_grad = [&](auto zero) {
      using T = decltype(zero);
      if (g.nhwc) return bwd_weight_nhwc<T>(g, xa.data_ptr<T>(), dya.data_ptr<T>(), dwa.data_ptr<T>());
      if (!dw_rsc) return bwd_weight<T>(g, xa.data_ptr<T>(), dya.data_ptr<T>(), dwa.data_ptr<T>());
      // Channels-last copies of x and dy, then the channels-last kernel.
      const at::Tensor xt = channels_last_copy<T>(g, xa.data_ptr<T>());
      const at::Tensor dyt = channels_last_copy<T>(out_geo(g), dya.data_ptr<T>());
      Geo gc = g;
      gc.nhwc = true;
      bwd_weight_nhwc<T>(gc, xt.data_ptr<T>(), dyt.data_ptr<T>(), dwa.data_ptr<T>());
    };
    using T = ConvAcc;
    if (output_mask[1]) weight_grad(T(0));
    if (output_mask[0] && !dx_fwd) bwd_input<T>(g, dya.data_ptr<T>(), wa.data_ptr<T>(), dx.data_ptr<T>());
    if (output_mask[0] && x.scalar_type() != acc) dx = dx.to(x.scalar_type());
    if (output_mask[1]) {
      const at::Tensor src = dw_rsc ? dwa.view({g.K, g.R, g.S, g.Cg}).permute({0, 3, 1, 2})
                                    : dwa.view({g.K, g.Cg, g.R, g.S});
      const at::MemoryFormat wfmt = layout_of(fn, "weight", weight);
      dw = at::empty(weight.sizes(), weight.options(), wfmt);
      dw.copy_(src);
    }
  }
  if (output_mask[2]) {
    at::Tensor dba = at::empty({g.K}, x.options().dtype(acc));
    bwd_bias<ConvAcc>(g, dya.data_ptr<ConvAcc>(), dba.data_ptr<ConvAcc>());
    db = x.scalar_type() != acc ? dba.to(x.scalar_type()) : dba;
  }
  return {dx, dw, db};
}

}  // namespace mltoolkit
