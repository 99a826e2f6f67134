// Host replay of the CUDA convolution kernels' data movement (csrc/cuda/conv.cu), built by
// tests/ops/test_conv_cuda_emulation.py with the system C++ compiler: no GPU needed.
//
// The kernels keep their index math in csrc/cuda/conv_index.h; this program runs that same code for every thread of
// every CTA: the cp.async copies into the (swizzled) shared-memory stages, the ldmatrix row addresses of every lane,
// the accumulator -> staging -> global mapping of the epilogue, the split-K partials and their final sum. ldmatrix
// (plain and .trans) and mma.sync.m16n8k16 are emulated from their definitions in the PTX ISA ("Warp-level matrix
// load instruction: ldmatrix", "Matrix Fragments for mma.m16n8k16 with floating point type"), written here without
// looking at the kernels' fragment code. Results are compared exactly (small-integer data, exact in fp32) against a
// direct convolution / its transposed and weight-gradient forms, per layout. It also checks that no shared-memory
// element is written twice per stage, that every output element is written exactly once, that every ldmatrix phase
// and every 8-lane group of cp.async stores hits 8 distinct 16-byte bank groups, and FastDiv against division.
//
//   conv_cuda_emulator [cases]      exit 0 when every check passes; prints one line per failure
#include "cuda/conv_index.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

using namespace mltoolkit::cuda_conv::idx;

namespace {

int failures = 0;
int printed[4096];  // failures printed per source line: at most 3 each
#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      if (printed[__LINE__ % 4096]++ < 3) {                \
        std::printf("FAIL line %d: ", __LINE__);           \
        std::printf(__VA_ARGS__);                          \
        std::printf("\n");                                 \
      }                                                    \
      ++failures;                                          \
    }                                                      \
  } while (0)

std::mt19937 rng(12345);
int rnd(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

struct Conv {
  int n, c, h, w, k, g, r, s, sh, sw, ph, pw, dh, dw, p, q;
  int cg() const { return c / g; }
  int kg() const { return k / g; }
  std::string str() const {
    char b[200];
    std::snprintf(b, sizeof b, "N%d C%d H%d W%d K%d g%d R%d S%d stride(%d,%d) pad(%d,%d) dil(%d,%d)", n, c, h, w, k, g,
                  r, s, sh, sw, ph, pw, dh, dw);
    return b;
  }
};

bool finish(Conv& cv) {
  const int hp = cv.h + 2 * cv.ph - cv.dh * (cv.r - 1) - 1, wp = cv.w + 2 * cv.pw - cv.dw * (cv.s - 1) - 1;
  if (hp < 0 || wp < 0) return false;
  cv.p = hp / cv.sh + 1;
  cv.q = wp / cv.sw + 1;
  return true;
}

// Tensors in NHWC (x: N,H,W,C; y/dy: N,P,Q,K) or NCHW; weight (K, Cg, R, S) logical, stored as needed.
struct Data {
  std::vector<float> x, wt, dy;  // x and dy in the layout under test; wt as (K, Cg, R, S)
};

float val() { return static_cast<float>(rnd(-2, 2)); }

size_t xo(const Conv& cv, bool nhwc, int n, int c, int h, int w) {
  return static_cast<size_t>(act_offset(nhwc, n, c, h, w, cv.c, cv.h, cv.w));
}
size_t yo(const Conv& cv, bool nhwc, int n, int k, int p, int q) {
  return static_cast<size_t>(act_offset(nhwc, n, k, p, q, cv.k, cv.p, cv.q));
}
float W(const Conv& cv, const Data& d, int k, int c, int r, int s) {
  return d.wt[((static_cast<size_t>(k) * cv.cg() + c) * cv.r + r) * cv.s + s];
}

// Direct references, written from the convolution's definition (not from conv_index.h).
std::vector<double> ref_forward(const Conv& cv, const Data& d, bool nhwc) {
  std::vector<double> y(static_cast<size_t>(cv.n) * cv.k * cv.p * cv.q, 0.0);
  for (int n = 0; n < cv.n; ++n)
    for (int k = 0; k < cv.k; ++k)
      for (int p = 0; p < cv.p; ++p)
        for (int q = 0; q < cv.q; ++q) {
          double acc = 0;
          const int gg = k / cv.kg();
          for (int c = 0; c < cv.cg(); ++c)
            for (int r = 0; r < cv.r; ++r)
              for (int s = 0; s < cv.s; ++s) {
                const int ih = p * cv.sh - cv.ph + r * cv.dh, iw = q * cv.sw - cv.pw + s * cv.dw;
                if (ih < 0 || ih >= cv.h || iw < 0 || iw >= cv.w) continue;
                acc += d.x[xo(cv, nhwc, n, gg * cv.cg() + c, ih, iw)] * W(cv, d, k, c, r, s);
              }
          y[yo(cv, nhwc, n, k, p, q)] = acc;
        }
  return y;
}

std::vector<double> ref_dgrad(const Conv& cv, const Data& d, bool nhwc) {
  std::vector<double> dx(static_cast<size_t>(cv.n) * cv.c * cv.h * cv.w, 0.0);
  for (int n = 0; n < cv.n; ++n)
    for (int k = 0; k < cv.k; ++k)
      for (int p = 0; p < cv.p; ++p)
        for (int q = 0; q < cv.q; ++q) {
          const int gg = k / cv.kg();
          const double g = d.dy[yo(cv, nhwc, n, k, p, q)];
          for (int c = 0; c < cv.cg(); ++c)
            for (int r = 0; r < cv.r; ++r)
              for (int s = 0; s < cv.s; ++s) {
                const int ih = p * cv.sh - cv.ph + r * cv.dh, iw = q * cv.sw - cv.pw + s * cv.dw;
                if (ih < 0 || ih >= cv.h || iw < 0 || iw >= cv.w) continue;
                dx[xo(cv, nhwc, n, gg * cv.cg() + c, ih, iw)] += g * W(cv, d, k, c, r, s);
              }
        }
  return dx;
}

// dw as (K, Cg, R, S).
std::vector<double> ref_wgrad(const Conv& cv, const Data& d, bool nhwc) {
  std::vector<double> dw(static_cast<size_t>(cv.k) * cv.cg() * cv.r * cv.s, 0.0);
  for (int n = 0; n < cv.n; ++n)
    for (int k = 0; k < cv.k; ++k)
      for (int p = 0; p < cv.p; ++p)
        for (int q = 0; q < cv.q; ++q) {
          const int gg = k / cv.kg();
          const double g = d.dy[yo(cv, nhwc, n, k, p, q)];
          for (int c = 0; c < cv.cg(); ++c)
            for (int r = 0; r < cv.r; ++r)
              for (int s = 0; s < cv.s; ++s) {
                const int ih = p * cv.sh - cv.ph + r * cv.dh, iw = q * cv.sw - cv.pw + s * cv.dw;
                if (ih < 0 || ih >= cv.h || iw < 0 || iw >= cv.w) continue;
                dw[((static_cast<size_t>(k) * cv.cg() + c) * cv.r + r) * cv.s + s] +=
                    g * d.x[xo(cv, nhwc, n, gg * cv.cg() + c, ih, iw)];
              }
        }
  return dw;
}

Data make_data(const Conv& cv, bool nhwc) {
  Data d;
  d.x.resize(static_cast<size_t>(cv.n) * cv.c * cv.h * cv.w);
  for (auto& v : d.x) v = val();
  d.wt.resize(static_cast<size_t>(cv.k) * cv.cg() * cv.r * cv.s);
  for (auto& v : d.wt) v = val();
  d.dy.resize(static_cast<size_t>(cv.n) * cv.k * cv.p * cv.q);
  for (auto& v : d.dy) v = val();
  (void)nhwc;
  return d;
}

// ---- PTX semantics ------------------------------------------------------------------------------------------------

// A 32-bit register of two 16-bit elements, low half first (held as floats).
struct Reg {
  float lo = 0, hi = 0;
};

// ldmatrix.sync.aligned.m8n8.x4[.trans].b16: addr[l] is the element offset of row (l % 8) of matrix (l / 8). Without
// .trans, lane t receives row t/4, elements 2*(t%4) and 2*(t%4)+1 of each matrix (one register per matrix); with
// .trans the matrix is read column-major: lane t receives elements (2*(t%4), t/4) and (2*(t%4)+1, t/4).
void ldmatrix_x4(const std::vector<float>& smem, const int (&addr)[32], bool trans, Reg (&out)[32][4]) {
  for (int j = 0; j < 4; ++j) {
    auto m = [&](int row, int col) { return smem.at(static_cast<size_t>(addr[8 * j + row] + col)); };
    for (int t = 0; t < 32; ++t) {
      if (!trans) {
        out[t][j] = {m(t / 4, 2 * (t % 4)), m(t / 4, 2 * (t % 4) + 1)};
      } else {
        out[t][j] = {m(2 * (t % 4), t / 4), m(2 * (t % 4) + 1, t / 4)};
      }
    }
  }
}

// Bank groups: the 8 row addresses of each 8x8 matrix (one phase) must fall in 8 distinct 16-byte groups of the
// 128-byte bank window.
void check_banks(const int (&addr)[32], const char* what) {
  for (int j = 0; j < 4; ++j) {
    int seen = 0;
    for (int i = 0; i < 8; ++i) seen |= 1 << ((addr[8 * j + i] * 2 / 16) % 8);
    EXPECT(seen == 0xff, "%s: ldmatrix phase %d has bank conflicts", what, j);
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: fragment layouts of the PTX ISA, groupID = lane >> 2,
// threadID_in_group = lane % 4. A: a0..a7 in 4 registers, row = groupID for a0,a1,a4,a5 else groupID + 8,
// col = tig*2 + (i & 1) (+8 for i >= 4). B: b0..b3 in 2 registers, row = tig*2 + (i & 1) (+8 for i >= 2),
// col = groupID. C/D: c0..c3, row = groupID (+8 for i >= 2), col = tig*2 + (i & 1).
void mma(float (&c)[32][4], const Reg (&a)[32][4], const Reg (&b)[32][2]) {
  double A[16][16], B[16][8], D[16][8];
  for (int t = 0; t < 32; ++t) {
    const int gid = t >> 2, tig = t % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? gid : gid + 8;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      const Reg& rg = a[t][i / 2];
      A[row][col] = (i & 1) ? rg.hi : rg.lo;
    }
    for (int i = 0; i < 4; ++i) {
      const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      const Reg& rg = b[t][i / 2];
      B[row][gid] = (i & 1) ? rg.hi : rg.lo;
    }
    for (int i = 0; i < 4; ++i) D[gid + (i >= 2 ? 8 : 0)][tig * 2 + (i & 1)] = c[t][i];
  }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 16; ++k) D[m][n] += A[m][k] * B[k][n];
  for (int t = 0; t < 32; ++t) {
    const int gid = t >> 2, tig = t % 4;
    for (int i = 0; i < 4; ++i) c[t][i] = static_cast<float>(D[gid + (i >= 2 ? 8 : 0)][tig * 2 + (i & 1)]);
  }
}

// 16-byte stores of 8 consecutive lanes (one phase) into 8 distinct bank groups.
void check_store_banks(const std::vector<int>& elem_offsets, const char* what) {
  for (size_t base = 0; base + 8 <= elem_offsets.size(); base += 8) {
    int seen = 0;
    for (int i = 0; i < 8; ++i) seen |= 1 << ((elem_offsets[base + i] * 2 / 16) % 8);
    EXPECT(seen == 0xff, "%s: copy phase at lane %zu has bank conflicts", what, base % 32);
  }
}

// ---- tensor-core forward / dgrad ----------------------------------------------------------------------------------

// The kernel _conv2d_tc_kernel<T, BN> for one problem. a: gathered tensor NHWC; b: (groups*ng, R, S, cr);
// returns out (rows, groups*ng) without epilogue (bias added to check its indexing).
template <int BN>
std::vector<double> run_tc(const Gather& geo, int rows, int cr, int ng, int groups, const std::vector<float>& a,
                           const std::vector<float>& b, const std::vector<float>& bias, bool check_conflicts) {
  using C = TcCfg<BN>;
  const int out_c = groups * ng;
  std::vector<double> out(static_cast<size_t>(rows) * out_c, 0.0);
  std::vector<int> written(out.size(), 0);
  const int n_tiles = (ng + BN - 1) / BN, m_tiles = (rows + kBM - 1) / kBM;
  const int iters = tap_iters(geo.r, geo.s, cr);
  const int64_t b_row_len = static_cast<int64_t>(geo.r) * geo.s * cr;
  for (int grp = 0; grp < groups; ++grp) {
    for (int bx = 0; bx < m_tiles * n_tiles; ++bx) {
      const int m0 = bx / n_tiles * kBM, n0 = bx % n_tiles * BN;
      std::vector<float> sa(kStages * kBM * kBK, -999.f), sb(kStages * BN * kBK, -999.f);
      static float acc[8][32][C::kMI][C::kNI][4];
      for (auto& wv : acc)
        for (auto& lv : wv)
          for (auto& mv : lv)
            for (auto& nv : mv)
              for (float& e : nv) e = 0.f;
      TapIter ld;
      for (int it = 0; it < iters; ++it, ld.next(geo.s, cr)) {
        const int stage = it % kStages;
        std::vector<int> wa(kBM * kBK, 0), wb(BN * kBK, 0);
        std::vector<int> store_offsets(C::kASlots * kThreads);  // [copy][thread]: one instruction per copy
        for (int tid = 0; tid < kThreads; ++tid) {
          const int chunk = copy_chunk(tid), c = ld.c0 + chunk * 8;
          for (int j = 0; j < C::kASlots; ++j) {
            const Row rw = make_row(geo, m0 + copy_row(tid, j), rows);
            const int64_t off = c < cr ? nhwc_tap_offset(geo, rw, ld.r, ld.s, c) : -1;
            const int dst = swz32(copy_row(tid, j), chunk);
            store_offsets[j * kThreads + tid] = dst;
            for (int e = 0; e < 8; ++e) {
              sa[stage * kBM * kBK + dst + e] = off >= 0 ? a.at(static_cast<size_t>(grp * cr + off + e)) : 0.f;
              ++wa.at(dst + e);
            }
          }
          for (int j = 0; j < C::kBSlots; ++j) {
            const int n = n0 + copy_row(tid, j);
            const bool ok = c < cr && n < ng;
            const int64_t src =
                (grp * ng + (n < ng ? n : 0)) * b_row_len + chunk * 8 + (ld.r * geo.s + ld.s) * cr + ld.c0;
            const int dst = swz32(copy_row(tid, j), chunk);
            for (int e = 0; e < 8; ++e) {
              sb[stage * BN * kBK + dst + e] = ok ? b.at(static_cast<size_t>(src + e)) : 0.f;
              ++wb.at(dst + e);
            }
          }
        }
        for (int v : wa) EXPECT(v == 1, "A stage element written %d times", v);
        for (int v : wb) EXPECT(v == 1, "B stage element written %d times", v);
        if (check_conflicts && it == 0) check_store_banks(store_offsets, "tc A copies");
        const std::vector<float> sa_st(sa.begin() + stage * kBM * kBK, sa.begin() + (stage + 1) * kBM * kBK);
        const std::vector<float> sb_st(sb.begin() + stage * BN * kBK, sb.begin() + (stage + 1) * BN * kBK);
        for (int warp = 0; warp < 8; ++warp) {
          const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
          for (int kk = 0; kk < kBK / 16; ++kk) {
            Reg af[C::kMI][32][4], bf[C::kNI / 2][32][4];
            for (int mi = 0; mi < C::kMI; ++mi) {
              int addr[32];
              for (int l = 0; l < 32; ++l) addr[l] = swz32(ldsm_a_row(l, wm * C::kWM + mi * 16), ldsm_a_chunk(l, kk));
              if (check_conflicts) check_banks(addr, "tc A ldmatrix");
              ldmatrix_x4(sa_st, addr, false, af[mi]);
            }
            for (int nj = 0; nj < C::kNI / 2; ++nj) {
              int addr[32];
              for (int l = 0; l < 32; ++l) addr[l] = swz32(ldsm_b_row(l, wn * C::kWN + nj * 16), ldsm_b_chunk(l, kk));
              if (check_conflicts) check_banks(addr, "tc B ldmatrix");
              ldmatrix_x4(sb_st, addr, false, bf[nj]);
            }
            for (int mi = 0; mi < C::kMI; ++mi)
              for (int ni = 0; ni < C::kNI; ++ni) {
                Reg bb[32][2];
                float cc[32][4];
                for (int l = 0; l < 32; ++l) {
                  bb[l][0] = bf[ni / 2][l][(ni & 1) * 2];
                  bb[l][1] = bf[ni / 2][l][(ni & 1) * 2 + 1];
                  for (int i = 0; i < 4; ++i) cc[l][i] = acc[warp][l][mi][ni][i];
                }
                mma(cc, af[mi], bb);
                for (int l = 0; l < 32; ++l)
                  for (int i = 0; i < 4; ++i) acc[warp][l][mi][ni][i] = cc[l][i];
              }
          }
        }
      }
      // Epilogue: staging, then 8-column chunks.
      std::vector<float> stg(kBM * C::kEpiLd, -999.f);
      std::vector<int> ws(kBM * C::kEpiLd, 0);
      for (int warp = 0; warp < 8; ++warp) {
        const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
        for (int l = 0; l < 32; ++l)
          for (int mi = 0; mi < C::kMI; ++mi)
            for (int ni = 0; ni < C::kNI; ++ni)
              for (int h = 0; h < 2; ++h) {
                const int row = wm * C::kWM + mi * 16 + acc_row(l, 2 * h);
                const int col = wn * C::kWN + ni * 8 + acc_col(l, 2 * h);
                EXPECT(acc_col(l, 2 * h + 1) == acc_col(l, 2 * h) + 1 && acc_row(l, 2 * h + 1) == acc_row(l, 2 * h),
                       "acc pair");
                stg[row * C::kEpiLd + col] = acc[warp][l][mi][ni][2 * h];
                stg[row * C::kEpiLd + col + 1] = acc[warp][l][mi][ni][2 * h + 1];
                ++ws[row * C::kEpiLd + col];
                ++ws[row * C::kEpiLd + col + 1];
              }
      }
      for (int row = 0; row < kBM; ++row)
        for (int col = 0; col < BN; ++col) EXPECT(ws[row * C::kEpiLd + col] == 1, "staging element written != once");
      for (int tid = 0; tid < kThreads; ++tid)
        for (int j = 0; j < C::kEpiSlots; ++j) {
          const int row = epi_row<BN>(tid, j), ch = epi_chunk<BN>(tid, j);
          const int m = m0 + row, n = n0 + ch * 8;
          if (m >= rows || n >= ng) continue;
          const int col = grp * ng + n;
          const int64_t off = static_cast<int64_t>(m) * out_c + col;
          for (int i = 0; i < 8; ++i) {
            out.at(off + i) = stg[row * C::kEpiLd + ch * 8 + i] + (bias.empty() ? 0.f : bias[col + i]);
            ++written.at(off + i);
          }
        }
    }
  }
  for (int v : written) EXPECT(v == 1, "tc output element written %d times", v);
  return out;
}

Gather forward_geo(const Conv& cv) {
  Gather g;
  g.in_h = cv.h, g.in_w = cv.w, g.in_c = cv.c, g.out_h = cv.p, g.out_w = cv.q, g.r = cv.r, g.s = cv.s;
  g.sh = cv.sh, g.sw = cv.sw, g.ph = cv.ph, g.pw = cv.pw, g.dh = cv.dh, g.dw = cv.dw;
  g.transposed = false;
  return g;
}
Gather dgrad_geo(const Conv& cv) {
  Gather g = forward_geo(cv);
  g.in_h = cv.p, g.in_w = cv.q, g.in_c = cv.k, g.out_h = cv.h, g.out_w = cv.w;
  g.transposed = true;
  return g;
}

void compare(const std::vector<double>& got, const std::vector<double>& want, const std::string& what) {
  EXPECT(got.size() == want.size(), "%s: size %zu vs %zu", what.c_str(), got.size(), want.size());
  int bad = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (got[i] != want[i]) {
      if (bad++ < 3) EXPECT(false, "%s: element %zu = %g, expected %g", what.c_str(), i, got[i], want[i]);
    }
  }
  if (bad > 3) EXPECT(false, "%s: %d elements differ", what.c_str(), bad);
}

template <int BN>
void check_tc(const Conv& cv, bool conflicts) {
  const Data d = make_data(cv, true);
  // forward: b = (K, R, S, Cg)
  std::vector<float> b(static_cast<size_t>(cv.k) * cv.r * cv.s * cv.cg());
  for (int k = 0; k < cv.k; ++k)
    for (int c = 0; c < cv.cg(); ++c)
      for (int r = 0; r < cv.r; ++r)
        for (int s = 0; s < cv.s; ++s)
          b[((static_cast<size_t>(k) * cv.r + r) * cv.s + s) * cv.cg() + c] = W(cv, d, k, c, r, s);
  std::vector<float> bias(cv.k);
  for (auto& v : bias) v = val();
  std::vector<double> want = ref_forward(cv, d, true);
  for (size_t i = 0; i < want.size(); ++i) want[i] += bias[i % cv.k];
  compare(run_tc<BN>(forward_geo(cv), cv.n * cv.p * cv.q, cv.cg(), cv.kg(), cv.g, d.x, b, bias, conflicts), want,
          "tc forward BN=" + std::to_string(BN) + " " + cv.str());
  // dgrad: b = (g, Cg, R, S, Kg)
  std::vector<float> bt(b.size());
  for (int gg = 0; gg < cv.g; ++gg)
    for (int c = 0; c < cv.cg(); ++c)
      for (int r = 0; r < cv.r; ++r)
        for (int s = 0; s < cv.s; ++s)
          for (int k = 0; k < cv.kg(); ++k)
            bt[(((static_cast<size_t>(gg) * cv.cg() + c) * cv.r + r) * cv.s + s) * cv.kg() + k] =
                W(cv, d, gg * cv.kg() + k, c, r, s);
  compare(run_tc<BN>(dgrad_geo(cv), cv.n * cv.h * cv.w, cv.kg(), cv.cg(), cv.g, d.dy, bt, {}, false),
          ref_dgrad(cv, d, true), "tc dgrad BN=" + std::to_string(BN) + " " + cv.str());
}

// ---- tensor-core wgrad --------------------------------------------------------------------------------------------

template <int BN>
void check_tc_wgrad(const Conv& cv, bool conflicts) {
  using C = TcCfg<BN>;
  constexpr int kAChunks = kBM / 8, kBChunks = BN / 8;
  const Data d = make_data(cv, true);
  const Gather geo = forward_geo(cv);
  const int cg = cv.cg(), kg = cv.kg(), kc = cv.r * cv.s * cg, pixels = cv.n * cv.p * cv.q;
  const FastDiv div_pq(cv.p * cv.q), div_q(cv.q);
  const int64_t blocks = static_cast<int64_t>((kc + kBM - 1) / kBM) * ((kg + BN - 1) / BN) * cv.g;
  const int splits = reduction_splits(blocks, pixels, rnd(0, 1) ? 256 : 8);  // small minimum: several splits
  const int slen = split_len(pixels, splits, kBK);
  const int n_tiles = (kg + BN - 1) / BN, m_tiles = (kc + kBM - 1) / kBM;
  std::vector<float> ws(static_cast<size_t>(splits) * cv.g * kc * kg, -999.f);
  std::vector<int> wsw(ws.size(), 0);
  for (int split = 0; split < splits; ++split)
    for (int grp = 0; grp < cv.g; ++grp)
      for (int bx = 0; bx < m_tiles * n_tiles; ++bx) {
        const int m0 = bx / n_tiles * kBM, n0 = bx % n_tiles * BN;
        const int t_begin = split * slen, t_end = std::min(pixels, t_begin + slen);
        const int iters = t_end > t_begin ? (t_end - t_begin + kBK - 1) / kBK : 0;
        static float acc[8][32][C::kMI][C::kNI][4];
        for (auto& wv : acc)
          for (auto& lv : wv)
            for (auto& mv : lv)
              for (auto& nv : mv)
                for (float& e : nv) e = 0.f;
        for (int it = 0; it < iters; ++it) {
          const int t0 = t_begin + it * kBK;
          std::vector<float> sa(kBK * kBM, -999.f), sb(kBK * BN, -999.f);
          std::vector<int> wa(sa.size(), 0), wb(sb.size(), 0);
          std::vector<int> store_offsets(C::kASlots * kThreads);
          for (int tid = 0; tid < kThreads; ++tid) {
            const int a_chunk = wide_chunk(tid, 0, kAChunks);
            const int ia = m0 + a_chunk * 8;
            const bool a_ok = ia < kc;
            const Rsc rsc = split_rsc(a_ok ? ia : 0, cv.s, cg);
            for (int j = 0; j < C::kASlots; ++j) {
              EXPECT(wide_chunk(tid, j, kAChunks) == a_chunk, "wgrad A chunk not fixed per thread");
              const int row = wide_row(tid, j, kAChunks), t = t0 + row;
              int64_t off = -1;
              if (a_ok && t < t_end) {
                const Pix px = split_pix(t, div_pq, div_q);
                off = x_tap_offset(geo, true, px.img, px.p, px.q, rsc.r, rsc.s, 0);
              }
              const int dst = swz_wide(row, a_chunk, kAChunks);
              store_offsets[j * kThreads + tid] = dst;
              for (int e = 0; e < 8; ++e) {
                sa[dst + e] = off >= 0 ? d.x.at(static_cast<size_t>(off + grp * cg + rsc.c + e)) : 0.f;
                ++wa[dst + e];
              }
            }
            const int b_chunk = wide_chunk(tid, 0, kBChunks);
            const bool b_ok = n0 + b_chunk * 8 < kg;
            for (int j = 0; j < C::kBSlots; ++j) {
              EXPECT(wide_chunk(tid, j, kBChunks) == b_chunk, "wgrad B chunk not fixed per thread");
              const int row = wide_row(tid, j, kBChunks), t = t0 + row;
              const bool ok = b_ok && t < t_end;
              const int dst = swz_wide(row, b_chunk, kBChunks);
              for (int e = 0; e < 8; ++e) {
                sb[dst + e] = ok ? d.dy.at(static_cast<size_t>(t) * cv.k + grp * kg + n0 + b_chunk * 8 + e) : 0.f;
                ++wb[dst + e];
              }
            }
          }
          for (int v : wa) EXPECT(v == 1, "wgrad A stage element written %d times", v);
          for (int v : wb) EXPECT(v == 1, "wgrad B stage element written %d times", v);
          if (conflicts && it == 0) check_store_banks(store_offsets, "wgrad A copies");
          for (int warp = 0; warp < 8; ++warp) {
            const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
            for (int kk = 0; kk < kBK / 16; ++kk) {
              Reg af[C::kMI][32][4], bf[C::kNI / 2][32][4];
              for (int mi = 0; mi < C::kMI; ++mi) {
                int addr[32];
                for (int l = 0; l < 32; ++l)
                  addr[l] = swz_wide(ldsm_at_row(l, kk), ldsm_at_chunk(l, wm * C::kWM + mi * 16), kAChunks);
                if (conflicts) check_banks(addr, "wgrad A ldmatrix.trans");
                ldmatrix_x4(sa, addr, true, af[mi]);
              }
              for (int nj = 0; nj < C::kNI / 2; ++nj) {
                int addr[32];
                for (int l = 0; l < 32; ++l)
                  addr[l] = swz_wide(ldsm_bt_row(l, kk), ldsm_bt_chunk(l, wn * C::kWN + nj * 16), kBChunks);
                if (conflicts) check_banks(addr, "wgrad B ldmatrix.trans");
                ldmatrix_x4(sb, addr, true, bf[nj]);
              }
              for (int mi = 0; mi < C::kMI; ++mi)
                for (int ni = 0; ni < C::kNI; ++ni) {
                  Reg bb[32][2];
                  float cc[32][4];
                  for (int l = 0; l < 32; ++l) {
                    bb[l][0] = bf[ni / 2][l][(ni & 1) * 2];
                    bb[l][1] = bf[ni / 2][l][(ni & 1) * 2 + 1];
                    for (int i = 0; i < 4; ++i) cc[l][i] = acc[warp][l][mi][ni][i];
                  }
                  mma(cc, af[mi], bb);
                  for (int l = 0; l < 32; ++l)
                    for (int i = 0; i < 4; ++i) acc[warp][l][mi][ni][i] = cc[l][i];
                }
            }
          }
        }
        const size_t base = (static_cast<size_t>(split) * cv.g + grp) * kc * kg;
        for (int warp = 0; warp < 8; ++warp) {
          const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
          for (int l = 0; l < 32; ++l)
            for (int mi = 0; mi < C::kMI; ++mi)
              for (int ni = 0; ni < C::kNI; ++ni)
                for (int h = 0; h < 2; ++h) {
                  const int i = m0 + wm * C::kWM + mi * 16 + acc_row(l, 2 * h);
                  const int k = n0 + wn * C::kWN + ni * 8 + acc_col(l, 2 * h);
                  if (i < kc && k < kg) {
                    ws.at(base + static_cast<size_t>(i) * kg + k) = acc[warp][l][mi][ni][2 * h];
                    ws.at(base + static_cast<size_t>(i) * kg + k + 1) = acc[warp][l][mi][ni][2 * h + 1];
                    ++wsw[base + static_cast<size_t>(i) * kg + k];
                    ++wsw[base + static_cast<size_t>(i) * kg + k + 1];
                  }
                }
        }
      }
  for (int v : wsw) EXPECT(v == 1, "wgrad partial written %d times", v);
  // _split_sum_kernel with ik: dw (K, kc) with kc in (r, s, c) order.
  const int64_t count = static_cast<int64_t>(cv.k) * kc;
  std::vector<double> got(count);
  for (int64_t e = 0; e < count; ++e) {
    double sum = 0;
    for (int sp = 0; sp < splits; ++sp) sum += ws[sp * count + ik_source(e, kg, kc)];
    got[e] = sum;
  }
  const std::vector<double> ref = ref_wgrad(cv, d, true);  // (K, Cg, R, S)
  std::vector<double> want(count);
  for (int k = 0; k < cv.k; ++k)
    for (int c = 0; c < cg; ++c)
      for (int r = 0; r < cv.r; ++r)
        for (int s = 0; s < cv.s; ++s)
          want[static_cast<size_t>(k) * kc + (r * cv.s + s) * cg + c] =
              ref[((static_cast<size_t>(k) * cg + c) * cv.r + r) * cv.s + s];
  compare(got, want, "tc wgrad BN=" + std::to_string(BN) + " splits=" + std::to_string(splits) + " " + cv.str());
}

// ---- SIMT and depthwise index math ----------------------------------------------------------------------------------

// The SIMT forward / dgrad GEMM element by element through simt_a_offset, make_rowpix and act_offset.
void check_simt(const Conv& cv, bool nhwc) {
  const Data d = make_data(cv, nhwc);
  for (int mode = 0; mode < 2; ++mode) {
    const bool dgrad = mode == 1;
    const Gather geo = dgrad ? dgrad_geo(cv) : forward_geo(cv);
    const int cr = dgrad ? cv.kg() : cv.cg(), ng = dgrad ? cv.cg() : cv.kg(), out_c = dgrad ? cv.c : cv.k;
    const int rows = cv.n * geo.out_h * geo.out_w, kr_total = cr * cv.r * cv.s;
    const std::vector<float>& a = dgrad ? d.dy : d.x;
    // weight matrix (groups * ng, kr) in the layout's kr order, as the glue lays it out
    std::vector<float> b(static_cast<size_t>(cv.g) * ng * kr_total);
    for (int gg = 0; gg < cv.g; ++gg)
      for (int n = 0; n < ng; ++n)
        for (int c = 0; c < cr; ++c)
          for (int r = 0; r < cv.r; ++r)
            for (int s = 0; s < cv.s; ++s) {
              const int kr = nhwc ? (r * cv.s + s) * cr + c : (c * cv.r + r) * cv.s + s;
              b[(static_cast<size_t>(gg) * ng + n) * kr_total + kr] =
                  dgrad ? W(cv, d, gg * cv.kg() + c, n, r, s) : W(cv, d, gg * cv.kg() + n, c, r, s);
            }
    std::vector<double> out(static_cast<size_t>(rows) * out_c, 0.0);
    for (int gg = 0; gg < cv.g; ++gg)
      for (int m = 0; m < rows + 3; ++m) {  // rows past the end must read nothing
        const RowPix rp = make_rowpix(geo, m, rows);
        for (int n = 0; n < ng; ++n) {
          double acc = 0;
          for (int kr = 0; kr < kr_total; ++kr) {
            const int64_t off = simt_a_offset(geo, nhwc, rp, kr, cr, gg * cr);
            if (m >= rows) {
              EXPECT(off < 0, "row past the end reads element %lld", static_cast<long long>(off));
              continue;
            }
            if (off >= 0) acc += a.at(static_cast<size_t>(off)) * b[(static_cast<size_t>(gg) * ng + n) * kr_total + kr];
          }
          if (m < rows) {
            const int64_t o = act_offset(nhwc, rp.img, gg * ng + n, rp.oh, rp.ow, out_c, geo.out_h, geo.out_w);
            out.at(static_cast<size_t>(o)) = acc;
          }
        }
      }
    compare(out, dgrad ? ref_dgrad(cv, d, nhwc) : ref_forward(cv, d, nhwc),
            std::string("simt ") + (dgrad ? "dgrad " : "forward ") + (nhwc ? "NHWC " : "NCHW ") + cv.str());
  }
  // wgrad: columns i through split_col, rows of dy through act_offset, x through x_tap_offset.
  const Gather geo = forward_geo(cv);
  const int cg = cv.cg(), kg = cv.kg(), kc = cg * cv.r * cv.s, pq = cv.p * cv.q;
  std::vector<double> got(static_cast<size_t>(cv.k) * kc, 0.0);
  for (int gg = 0; gg < cv.g; ++gg)
    for (int k = 0; k < kg; ++k)
      for (int i = 0; i < kc; ++i) {
        const Crs crs = split_col(i, nhwc, cv.r, cv.s, cg);
        double acc = 0;
        for (int t = 0; t < cv.n * pq; ++t) {
          const int img = t / pq, pix = t % pq, pp = pix / cv.q, qq = pix % cv.q;
          const int64_t off = x_tap_offset(geo, nhwc, img, pp, qq, crs.r, crs.s, gg * cg + crs.c);
          if (off < 0) continue;
          acc += d.dy[static_cast<size_t>(act_offset(nhwc, img, gg * kg + k, pp, qq, cv.k, cv.p, cv.q))] * d.x[off];
        }
        got[static_cast<size_t>(gg * kg + k) * kc + i] = acc;
      }
  const std::vector<double> ref = ref_wgrad(cv, d, nhwc);
  std::vector<double> want(got.size());
  for (int k = 0; k < cv.k; ++k)
    for (int c = 0; c < cg; ++c)
      for (int r = 0; r < cv.r; ++r)
        for (int s = 0; s < cv.s; ++s) {
          const int i = nhwc ? (r * cv.s + s) * cg + c : (c * cv.r + r) * cv.s + s;
          want[static_cast<size_t>(k) * kc + i] = ref[((static_cast<size_t>(k) * cg + c) * cv.r + r) * cv.s + s];
        }
  compare(got, want, std::string("simt wgrad ") + (nhwc ? "NHWC " : "NCHW ") + cv.str());
}

// Depthwise forward / dgrad through tap_base and tap as the direct kernels use them.
void check_depthwise(Conv cv) {
  cv.k = cv.c;
  cv.g = cv.c;
  const Data d = make_data(cv, false);
  for (int mode = 0; mode < 2; ++mode) {
    const bool dgrad = mode == 1;
    const Gather g = dgrad ? dgrad_geo(cv) : forward_geo(cv);
    const std::vector<float>& in = dgrad ? d.dy : d.x;
    std::vector<double> out(static_cast<size_t>(cv.n) * cv.c * g.out_h * g.out_w);
    for (int n = 0; n < cv.n; ++n)
      for (int c = 0; c < cv.c; ++c)
        for (int oh = 0; oh < g.out_h; ++oh)
          for (int ow = 0; ow < g.out_w; ++ow) {
            const int bh = tap_base(oh, g.sh, g.ph, g.transposed), bw = tap_base(ow, g.sw, g.pw, g.transposed);
            double acc = 0;
            for (int r = 0; r < g.r; ++r) {
              const int ih = tap(bh, r, g.sh, g.dh, g.in_h, g.transposed);
              if (ih < 0) continue;
              for (int s = 0; s < g.s; ++s) {
                const int iw = tap(bw, s, g.sw, g.dw, g.in_w, g.transposed);
                if (iw < 0) continue;
                acc += in[((static_cast<size_t>(n) * cv.c + c) * g.in_h + ih) * g.in_w + iw] * W(cv, d, c, 0, r, s);
              }
            }
            out[((static_cast<size_t>(n) * cv.c + c) * g.out_h + oh) * g.out_w + ow] = acc;
          }
    compare(out, dgrad ? ref_dgrad(cv, d, false) : ref_forward(cv, d, false),
            std::string("depthwise ") + (dgrad ? "dgrad " : "forward ") + cv.str());
  }
}

void check_fastdiv() {
  for (int d = 1; d < 3000; ++d) {
    const FastDiv f(d);
    for (int i = 0; i < 200; ++i) {
      const int n = i < 100 ? rnd(0, 100000) : rnd(0, 0x7fffffff);
      EXPECT(f.div(n) == n / d, "FastDiv(%d).div(%d) = %d", d, n, f.div(n));
    }
    EXPECT(f.div(0x7fffffff) == 0x7fffffff / d, "FastDiv(%d) at 2^31-1", d);
  }
  for (int i = 0; i < 20000; ++i) {
    const int d = rnd(1, 0x7fffffff), n = rnd(0, 0x7fffffff);
    EXPECT(FastDiv(d).div(n) == n / d, "FastDiv(%d).div(%d)", d, n);
  }
}

Conv random_conv(int cmul, int kmul, int max_g) {
  for (;;) {
    Conv cv{};
    cv.g = rnd(1, max_g);
    cv.c = cv.g * cmul * rnd(1, 5);
    cv.k = cv.g * kmul * rnd(1, 18);
    cv.n = rnd(1, 3);
    cv.h = rnd(1, 11);
    cv.w = rnd(1, 11);
    cv.r = rnd(1, 4);
    cv.s = rnd(1, 4);
    cv.sh = rnd(1, 3);
    cv.sw = rnd(1, 3);
    cv.ph = rnd(0, 3);
    cv.pw = rnd(0, 3);
    cv.dh = rnd(1, 2);
    cv.dw = rnd(1, 2);
    if (finish(cv)) return cv;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 12;
  check_fastdiv();
  // Fixed corners: a 3x3 ResNet-like layer over several tiles (rows past 128, 2 column tiles, 3 channel blocks with
  // a ragged one), 1x1, strided dgrad, grouped.
  std::vector<Conv> tc = {{2, 72, 9, 10, 136, 1, 3, 3, 1, 1, 1, 1, 1, 1, 0, 0},
                          {1, 16, 5, 7, 24, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0},
                          {2, 16, 7, 8, 8, 1, 3, 2, 2, 3, 1, 0, 1, 2, 0, 0},
                          {1, 48, 6, 5, 32, 2, 2, 3, 2, 1, 1, 2, 2, 1, 0, 0}};
  for (auto& cv : tc) finish(cv);
  for (int i = 0; i < cases; ++i) tc.push_back(random_conv(8, 8, 3));
  bool first = true;
  for (const Conv& cv : tc) {
    check_tc<128>(cv, first);
    check_tc<64>(cv, first);
    check_tc_wgrad<128>(cv, first);
    check_tc_wgrad<64>(cv, first);
    first = false;
  }
  for (int i = 0; i < 3 * cases; ++i) {
    const Conv cv = random_conv(rnd(1, 3), rnd(1, 3), 3);
    check_simt(cv, false);
    check_simt(cv, true);
    check_depthwise(cv);
  }
  std::printf("%s: %d failures (%zu tensor-core shapes, %d SIMT/depthwise shapes)\n", failures ? "FAILED" : "ok",
              failures, tc.size(), 3 * cases);
  return failures ? 1 : 0;
}
