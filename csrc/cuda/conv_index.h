// Index math of the CUDA convolution kernels (conv.cu): which global element each thread copies, where it lands in
// shared memory, which shared-memory row each lane hands to ldmatrix, which output element each accumulator holds.
// All of it is plain __host__ __device__ C++ so that tests/ops/conv_cuda_emulator.cpp replays the kernels' data
// movement on the host, with ldmatrix / mma.sync semantics written from the PTX ISA, against a direct convolution.
//
// Implicit GEMM views (per group g; "activation" tensors are (N, C, H, W) in NCHW or NHWC):
//   forward  y[m, n] = sum_{(r,s,c)} x[gather(m, r, s), g*Cg + c] * w[g*Kg + n, r, s, c]     m = (img, p, q), n < Kg
//   dgrad    dx[m, n] = sum_{(r,s,k)} dy[gather^T(m, r, s), g*Kg + k] * w[g*Kg + k, n, r, s]  m = (img, h, w), n < Cg
//   wgrad    dw[g*Kg + k, (r,s,c)] = sum_t dy[t, g*Kg + k] * x[gather(t, r, s), g*Cg + c]       t = (img, p, q)
// gather(m, r, s) = (p*sh - ph + r*dh, q*sw - pw + s*dw); gather^T(m, r, s) = ((h + ph - r*dh) / sh, ...) where the
// division is exact (else the tap does not contribute).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MLTK_HD __host__ __device__ __forceinline__
#else
#define MLTK_HD inline
#endif

namespace mltoolkit::cuda_conv::idx {

// ---- geometry -----------------------------------------------------------------------------------------------------

// n / d for 0 <= n < 2^31 by a multiply-high (Granlund-Montgomery round-up method): the wgrad gather splits a
// pixel index into (img, p, q) for every row of every k-step, where two hardware divisions would cost more than
// the loads.
struct FastDiv {
  uint32_t d = 1, mul = 1, shift = 0;
  FastDiv() = default;
  explicit FastDiv(int divisor) : d(static_cast<uint32_t>(divisor)) {
    while ((uint64_t{1} << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  MLTK_HD int div(int n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(static_cast<uint32_t>(n), mul);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * mul) >> 32);
#endif
    return static_cast<int>((hi + static_cast<uint32_t>(n)) >> shift);
  }
};

// The tensor a GEMM gathers its rows from (x, or dy for dgrad), seen from the output pixels the rows enumerate.
struct Gather {
  int in_h = 1, in_w = 1, in_c = 1;  // gathered tensor (N, in_c, in_h, in_w)
  int out_h = 1, out_w = 1;          // output pixels: GEMM row m = (img, oh, ow)
  int r = 1, s = 1;                  // kernel taps
  int sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  bool transposed = false;  // dgrad: output o reads input (o + pad - tap*dil) / stride
};

// Tap base of output coordinate o along one dimension (see tap()).
MLTK_HD int tap_base(int o, int stride, int pad, bool transposed) {
  return transposed ? o + pad : o * stride - pad;
}

// Input coordinate that a row with tap base `base` reads through tap t along one dimension, or -1. A base of
// kNoRow or below (rows past the end) makes every tap invalid in both directions.
constexpr int kNoRow = -(1 << 29);
MLTK_HD int tap(int base, int t, int stride, int dil, int in_size, bool transposed) {
  if (!transposed) {
    const int i = base + t * dil;
    return i >= 0 && i < in_size ? i : -1;
  }
  int v = base - t * dil;
  if (v < 0) return -1;
  if (stride != 1) {
    if (v % stride != 0) return -1;
    v /= stride;
  }
  return v < in_size ? v : -1;
}

// One GEMM row (output pixel) of an NHWC gather: the image's first element and the tap bases.
struct Row {
  int64_t img = 0;
  int bh = kNoRow, bw = kNoRow;
};

MLTK_HD Row make_row(const Gather& g, int m, int rows) {
  Row rw;
  if (m < rows) {
    const int hw = g.out_h * g.out_w;
    const int img = m / hw, pix = m - img * hw, oh = pix / g.out_w, ow = pix - oh * g.out_w;
    rw.img = static_cast<int64_t>(img) * g.in_h * g.in_w * g.in_c;
    rw.bh = tap_base(oh, g.sh, g.ph, g.transposed);
    rw.bw = tap_base(ow, g.sw, g.pw, g.transposed);
  }
  return rw;
}

// Element offset (from the gathered tensor's base) of channel `ch` of the pixel that row `rw` reads through tap
// (r, s) in an NHWC tensor, or -1 when the tap falls outside the input (zero padding) or the row is past the end.
MLTK_HD int64_t nhwc_tap_offset(const Gather& g, const Row& rw, int r, int s, int ch) {
  const int ih = tap(rw.bh, r, g.sh, g.dh, g.in_h, g.transposed);
  const int iw = tap(rw.bw, s, g.sw, g.dw, g.in_w, g.transposed);
  if (ih < 0 || iw < 0) return -1;
  return rw.img + ((ih * g.in_w + iw) * g.in_c + ch);  // within an image: int32 (the glue checks C*H*W < 2^31)
}

// Element offset of (img, ch, h, w) in an (N, C, H, W) tensor of either layout.
MLTK_HD int64_t act_offset(bool nhwc, int img, int ch, int h, int w, int C, int H, int W) {
  return nhwc ? ((static_cast<int64_t>(img) * H + h) * W + w) * C + ch
              : ((static_cast<int64_t>(img) * C + ch) * H + h) * W + w;
}

// ---- SIMT implicit GEMM (any dtype, either layout) ------------------------------------------------------------------

// One GEMM row (output pixel) with its coordinates; rows past the end get invalid tap bases.
struct RowPix {
  int img = 0, oh = 0, ow = 0;
  int bh = kNoRow, bw = kNoRow;
};
MLTK_HD RowPix make_rowpix(const Gather& g, int m, int rows) {
  RowPix rp;
  if (m < rows) {
    const int hw = g.out_h * g.out_w;
    rp.img = m / hw;
    const int pix = m - rp.img * hw;
    rp.oh = pix / g.out_w;
    rp.ow = pix - rp.oh * g.out_w;
    rp.bh = tap_base(rp.oh, g.sh, g.ph, g.transposed);
    rp.bw = tap_base(rp.ow, g.sw, g.pw, g.transposed);
  }
  return rp;
}

// Offset of the gathered element (row, kr) of the forward / dgrad GEMM, or -1 (padding, row past the end). kr runs
// over (c, r, s) for NCHW and (r, s, c) for NHWC (the weight matrix is laid out to match); channels of the group
// start at ch0.
MLTK_HD int64_t simt_a_offset(const Gather& g, bool nhwc, const RowPix& rp, int kr, int cr, int ch0) {
  const int rs_n = g.r * g.s;
  int c, rs;
  if (nhwc) {
    rs = kr / cr;
    c = kr - rs * cr;
  } else {
    c = kr / rs_n;
    rs = kr - c * rs_n;
  }
  const int r = rs / g.s, s = rs - (rs / g.s) * g.s;
  const int ih = tap(rp.bh, r, g.sh, g.dh, g.in_h, g.transposed);
  const int iw = tap(rp.bw, s, g.sw, g.dw, g.in_w, g.transposed);
  if (ih < 0 || iw < 0) return -1;
  return act_offset(nhwc, rp.img, ch0 + c, ih, iw, g.in_c, g.in_h, g.in_w);
}

// The (c, r, s) of wgrad column i: (c, r, s) order for NCHW, (r, s, c) for NHWC.
struct Crs {
  int c = 0, r = 0, s = 0;
};
MLTK_HD Crs split_col(int i, bool nhwc, int R, int S, int cg) {
  Crs x;
  int rs;
  if (nhwc) {
    rs = i / cg;
    x.c = i - rs * cg;
  } else {
    x.c = i / (R * S);
    rs = i - x.c * R * S;
  }
  x.r = rs / S;
  x.s = rs - x.r * S;
  return x;
}

// Offset of x at the pixel that output pixel (img, p, q) reads through tap (r, s), channel ch, or -1 (padding).
MLTK_HD int64_t x_tap_offset(const Gather& g, bool nhwc, int img, int p, int q, int r, int s, int ch) {
  const int ih = tap(tap_base(p, g.sh, g.ph, false), r, g.sh, g.dh, g.in_h, false);
  const int iw = tap(tap_base(q, g.sw, g.pw, false), s, g.sw, g.dw, g.in_w, false);
  if (ih < 0 || iw < 0) return -1;
  return act_offset(nhwc, img, ch, ih, iw, g.in_c, g.in_h, g.in_w);
}

// ---- tensor-core implicit GEMM (forward and dgrad): CTA tile kBM x BN x kBK, kStages-deep cp.async ring -------------
// Shared-memory operand tiles are [rows][kBK] 16-bit elements, rows of four 16-byte chunks, A rows = GEMM rows (output
// pixels), B rows = GEMM columns (output channels), both K-contiguous, so plain ldmatrix yields the mma fragments.

constexpr int kBM = 128, kBK = 32, kThreads = 256, kStages = 4;

template <int BN>
struct TcCfg {
  static_assert(BN == 128 || BN == 64, "tile width");
  static constexpr int kWarpsN = BN == 128 ? 4 : 2;
  static constexpr int kWarpsM = kThreads / 32 / kWarpsN;
  static constexpr int kWM = kBM / kWarpsM, kWN = BN / kWarpsN;  // warp tile: 64x32 or 32x32
  static constexpr int kMI = kWM / 16, kNI = kWN / 8;             // m16 / n8 MMA tiles per warp
  static constexpr int kASlots = kBM * (kBK / 8) / kThreads;      // 16-byte copies per thread per stage
  static constexpr int kBSlots = BN * (kBK / 8) / kThreads;
  static constexpr int kStageElems = (kBM + BN) * kBK;
  static constexpr int kEpiLd = BN + 8;  // fp32 staging row: +8 floats puts rows gr and gr+1 8 banks apart
  static constexpr int kEpiSlots = kBM * (BN / 8) / kThreads;
  static constexpr int kPipeBytes = kStages * kStageElems * 2;
  static constexpr int kEpiBytes = kBM * kEpiLd * 4;
  static constexpr int kSmemBytes = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
};

// Element offset of 16-byte chunk c (0..3) of row r in a [rows][32] tile. XOR swizzle: rows are 64 bytes, so rows
// r and r+2 would share banks; chunk ^ ((r >> 1) & 3) gives the 8 rows of an ldmatrix phase (and 8 consecutive
// copies) 8 distinct 16-byte bank groups.
MLTK_HD int swz32(int r, int c) { return r * kBK + ((c ^ ((r >> 1) & 3)) << 3); }

// Copy j of thread tid in a [rows][32] tile: row and chunk.
MLTK_HD int copy_row(int tid, int j) { return (tid >> 2) + j * (kThreads / 4); }
MLTK_HD int copy_chunk(int tid) { return tid & 3; }

// ldmatrix.x4 row addresses (lane l gives row l & 7 of 8x8 matrix l >> 3); PTX ISA "mma.m16n8k16 fragment layouts":
// A fragment (16x16 at rows row0.., k-step kk of the 32-wide tile) from a row-major [m][k] tile: matrices
// (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15) = registers a0a1, a2a3, a4a5, a6a7.
MLTK_HD int ldsm_a_row(int lane, int row0) { return row0 + (lane & 7) + ((lane >> 3) & 1) * 8; }
MLTK_HD int ldsm_a_chunk(int lane, int kk) { return kk * 2 + (lane >> 4); }
// B fragments of two n8 tiles (n0.., n0+8..) from an [n][k] tile: matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
// (n 8-15, k 0-7), (n 8-15, k 8-15) = b0b1 and b2b3 of tile n0, then of tile n0+8.
MLTK_HD int ldsm_b_row(int lane, int n0) { return n0 + (lane & 7) + (lane >> 4) * 8; }
MLTK_HD int ldsm_b_chunk(int lane, int kk) { return kk * 2 + ((lane >> 3) & 1); }

// Accumulator i (0..3) of an m16n8 tile in lane l: row and column (c0 c1 on row l/4, c2 c3 eight rows below).
MLTK_HD int acc_row(int lane, int i) { return (lane >> 2) + (i >> 1) * 8; }
MLTK_HD int acc_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

// Epilogue copy j of thread tid: a row of the fp32 staging tile and a chunk of 8 columns.
template <int BN>
MLTK_HD int epi_row(int tid, int j) { return (tid + j * kThreads) / (BN / 8); }
template <int BN>
MLTK_HD int epi_chunk(int tid, int j) { return (tid + j * kThreads) % (BN / 8); }

// The reduction loop of the tensor-core forward/dgrad: taps (r, s) outer, channel blocks of kBK inner.
struct TapIter {
  int r = 0, s = 0, c0 = 0;
  MLTK_HD void next(int S, int channels) {
    c0 += kBK;
    if (c0 >= channels) {
      c0 = 0;
      if (++s == S) {
        s = 0;
        ++r;
      }
    }
  }
};
MLTK_HD int tap_iters(int R, int S, int channels) { return R * S * ((channels + kBK - 1) / kBK); }

// ---- tensor-core wgrad: rows = (r, s, c) of the weight, columns = k, reduction over output pixels -------------------
// Shared-memory tiles are pixel-major ([kBK pixels][128 (r,s,c)] of x and [kBK][BN k] of dy), so both operands come
// through ldmatrix.trans. Rows of 8 or 16 chunks: chunk ^ (row & 7) gives an ldmatrix phase (8 consecutive pixel rows,
// one chunk) 8 distinct bank groups.
MLTK_HD int swz_wide(int r, int c, int chunks) { return r * chunks * 8 + ((c ^ (r & 7)) << 3); }

// Copy j of thread tid in a [kBK][chunks*8] tile.
MLTK_HD int wide_row(int tid, int j, int chunks) { return (tid + j * kThreads) / chunks; }
MLTK_HD int wide_chunk(int tid, int j, int chunks) { return (tid + j * kThreads) % chunks; }

// ldmatrix.x4.trans addresses. A fragment (rows m0.. of the GEMM = chunk m0/8 of the x tile, k-step kk): matrices
// (m 0-7, t 0-7), (m 8-15, t 0-7), (m 0-7, t 8-15), (m 8-15, t 8-15) are the transposes of the 8x8 blocks at pixel
// rows t and chunks m0/8 + {0, 1}.
MLTK_HD int ldsm_at_row(int lane, int kk) { return kk * 16 + (lane >> 4) * 8 + (lane & 7); }
MLTK_HD int ldsm_at_chunk(int lane, int m0) { return (m0 >> 3) + ((lane >> 3) & 1); }
// B fragments of two n8 tiles from the [t][k] dy tile: matrices (t 0-7, n 0-7), (t 8-15, n 0-7), (t 0-7, n 8-15),
// (t 8-15, n 8-15).
MLTK_HD int ldsm_bt_row(int lane, int kk) { return kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7); }
MLTK_HD int ldsm_bt_chunk(int lane, int n0) { return (n0 >> 3) + (lane >> 4); }

// The (r, s, c) of GEMM row i = (r*S + s)*Cg + c of the wgrad (c fastest, as in a channels_last weight).
struct Rsc {
  int r = 0, s = 0, c = 0;
};
MLTK_HD Rsc split_rsc(int i, int S, int Cg) {
  const int rs = i / Cg;
  return {rs / S, rs - (rs / S) * S, i - rs * Cg};
}

// Pixel t of the wgrad reduction as (img, p, q).
struct Pix {
  int img = 0, p = 0, q = 0;
};
MLTK_HD Pix split_pix(int t, const FastDiv& pq, const FastDiv& q) {
  Pix x;
  x.img = pq.div(t);
  const int rem = t - x.img * static_cast<int>(pq.d);
  x.p = q.div(rem);
  x.q = rem - x.p * static_cast<int>(q.d);
  return x;
}

// Element of the [groups][kc][kg] partials (tensor-core wgrad) that feeds element e of the [groups * kg][kc] weight
// gradient.
MLTK_HD int64_t ik_source(int64_t e, int kg, int kc) {
  const int64_t gk = e / kc, i = e - gk * kc, grp = gk / kg, k = gk - grp * kg;
  return (grp * kc + i) * kg + k;
}

// Split-K of the reductions over pixels (wgrad, bias grad): a count that depends only on the shape (never on the
// device), so that results are reproducible; each split sums a fixed range of pixels and the final sum runs over the
// splits in order. Enough splits for ~2 waves of a 132-SM GPU, each at least min_pixels long, at most 128.
MLTK_HD int reduction_splits(int64_t blocks, int64_t pixels, int min_pixels) {
  const int64_t want = (264 + blocks - 1) / blocks;
  const int64_t most = pixels / min_pixels;
  int64_t s = want < most ? want : most;
  s = s < 1 ? 1 : s > 128 ? 128 : s;
  return static_cast<int>(s);
}
// Pixels per split: a multiple of `unit`.
MLTK_HD int split_len(int64_t pixels, int splits, int unit) {
  const int64_t per = (pixels + splits - 1) / splits;
  return static_cast<int>((per + unit - 1) / unit * unit);
}

}  // namespace mltoolkit::cuda_conv::idx
