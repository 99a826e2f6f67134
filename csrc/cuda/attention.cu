// CUDA attention, forward and backward, FlashAttention-2 style (Dao, "FlashAttention-2", 2023): tensor-core
// mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate) through inline PTX, ldmatrix fragments, cp.async double-buffered
// shared-memory tiles, online softmax. Contract: csrc/attention.h. No torch headers here (compile time); the tensor
// glue is attention_cuda.cpp.
//
// Every warp owns 16 (forward: 16 * MT) rows of the output tile (the M of its MMAs); the other operand's tile is
// shared by the CTA.
// Forward: a CTA owns BM = 16 * MT * NW query rows of one (sequence, head), loops over key blocks of BN rows (K and V
// prefetched one block ahead), keeps the running max / sum per row and O in registers.
// Backward, three kernels, no atomics (so always deterministic):
//   delta = rowsum(dO * O)  (one warp per row);
//   dK/dV: a CTA owns BN = 16 * NW key rows of one kv head and loops over the query blocks of every query head of its
//          GQA group, computing S^T = K Q^T and dP^T = V dO^T so that P^T and dS^T are already in the A-operand layout
//          of dV += P^T dO and dK += dS^T Q (no shared-memory round trip). For head dims over 128 the accumulators of
//          both do not fit in registers: dV and dK are then two launches of the same kernel.
//   dQ: like the forward, per query block looping over key blocks: recomputes P and dP, dQ += dS K.
// Shared memory: rows of HD elements padded by one 16-byte chunk, so a row is an odd number of chunks and the 8 row
// addresses of an ldmatrix phase hit 8 different bank groups (conflict-free, like an XOR swizzle), while addresses stay
// linear: each fragment load is a per-lane base plus an immediate (an XOR swizzle cost registers for the addresses).
// Scores are kept in the log2 domain: x = (scale * q.k + mask) * log2(e), p = exp2(x - max).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attention_launch.h"
#include "mma_ptx.h"
#include "smem_limit.h"

namespace mltoolkit::cuda_attention {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

using namespace mltoolkit::ptx;  // smem_u32, cp_async*, ldsm_x4*, mma16816, pack2

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}

// Philox4x32-10 (Random123 constants), the generator of the contract's dropout mask.
__device__ __forceinline__ uint4 philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                        uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// ------------------------------------------------------------------------------------------------------------------
// Shared-memory tiles: rows of HD elements in 16-byte chunks.

template <int HD>
struct Tile {
  static constexpr int kChunks = HD / 8;
  static constexpr int kRow = HD + 8;  // elements between rows: an odd number of 16-byte chunks
  // Element offset of chunk c of row r. Linear, so fragment addresses are a per-lane base plus immediates.
  __device__ __forceinline__ static int off(int r, int c) { return r * kRow + (c << 3); }
};

__host__ __device__ constexpr int pow2_ceil(int x) { return x <= 1 ? 1 : 2 * pow2_ceil((x + 1) / 2); }

// Rows [0, rows_valid) of a ROWS x HD tile from global memory (row stride in elements); chunks past d8 and rows past
// rows_valid are zero-filled. `any` is any valid address (never read; cp.async wants a pointer).
// Each thread keeps one chunk column (of a power-of-two count, so NT divides it) and walks down the rows: one pointer
// walk and immediate shared-memory offsets, no per-row products.
template <typename T, int HD, int ROWS, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int rows_valid, int d8_chunks,
                                          const T* any, int tid) {
  constexpr int C = Tile<HD>::kChunks;
  constexpr int CP = pow2_ceil(C);
  static_assert(NT % CP == 0, "threads must cover whole rows");
  constexpr int kStep = NT / CP;
  const int c = tid % CP, r0 = tid / CP;
  if (CP != C && c >= C) return;
  const bool cok = c < d8_chunks;
  const T* src = g + r0 * row_stride + c * 8;
  const uint32_t dst = smem_u32(s + Tile<HD>::off(r0, c));
#pragma unroll
  for (int it = 0; it < (ROWS + kStep - 1) / kStep; ++it) {
    const int r = r0 + it * kStep;
    if (ROWS % kStep == 0 || r < ROWS) {
      const bool ok = cok && r < rows_valid;
      cp_async16(dst + it * kStep * Tile<HD>::kRow * static_cast<int>(sizeof(T)), ok ? src : any, ok);
    }
    src += kStep * row_stride;
  }
}

// Fragment loads (see the PTX ISA's mma.m16n8k16 fragment layouts). Lane l supplies the address of row (l & 7) of
// 8x8 matrix l >> 3.
// A (16x16, rows row0.., columns k0..) of a row-major [m][k] tile.
template <int HD>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const void* s, int row0, int k0, int lane) {
  const int r = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c = (k0 >> 3) + (lane >> 4);
  ldsm_x4(a, smem_u32(static_cast<const uint16_t*>(s) + Tile<HD>::off(r, c)));
}
// B of two n8 tiles (n0.., n0+8..) at k-step k0 from an [n][k] tile (B = tile^T): b[0..1] tile n0, b[2..3] n0+8.
template <int HD>
__device__ __forceinline__ void ldsm_b(uint32_t (&b)[4], const void* s, int n0, int k0, int lane) {
  const int r = n0 + (lane & 7) + (lane >> 4) * 8;
  const int c = (k0 >> 3) + ((lane >> 3) & 1);
  ldsm_x4(b, smem_u32(static_cast<const uint16_t*>(s) + Tile<HD>::off(r, c)));
}
// B of two n8 tiles at k-step k0 from a [k][n] tile (B = tile), through the transposing ldmatrix.
template <int HD>
__device__ __forceinline__ void ldsm_bt(uint32_t (&b)[4], const void* s, int k0, int n0, int lane) {
  const int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c = (n0 >> 3) + (lane >> 4);
  ldsm_x4_t(b, smem_u32(static_cast<const uint16_t*>(s) + Tile<HD>::off(r, c)));
}

// Stores a warp's 16 x HD fp32 accumulator tile (C-fragment layout, times mul) to global rows [row0, row0 + 16) that
// are < rows_valid, staging it through the warp's own 16 rows of shared tile s for 16-byte coalesced stores.
template <typename T, int HD>
__device__ __forceinline__ void store_rows(const float (&acc)[HD / 8][4], float mul, T* s, int srow0, T* g,
                                           int64_t row_stride, int rows_valid, int d8_chunks, int lane) {
  const int gr = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int nt = 0; nt < HD / 8; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = srow0 + gr + h * 8;
      *reinterpret_cast<uint32_t*>(s + Tile<HD>::off(r, nt) + 2 * tq) =
          pack2<T>(acc[nt][2 * h] * mul, acc[nt][2 * h + 1] * mul);
    }
  }
  __syncwarp();
  constexpr int C = Tile<HD>::kChunks;
#pragma unroll
  for (int idx = lane; idx < 16 * C; idx += 32) {
    const int r = idx / C, c = idx % C;
    if (r < rows_valid && c < d8_chunks) {
      *reinterpret_cast<uint4*>(g + r * row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(s + Tile<HD>::off(srow0 + r, c));
    }
  }
}

// One logical sequence of a (batch entry or varlen sequence, head) program.
struct Seq {
  int bb;     // batch index for the strides (0 with varlen)
  int q_off;  // first row in the packed tensors
  int k_off;
  int lq, lk;
  int diag;  // bottom_right ? lk - lq : 0
};

__device__ __forceinline__ Seq make_seq(const Params& p, int b) {
  Seq s;
  if (p.cu_q != nullptr) {
    s.bb = 0;
    s.q_off = p.cu_q[b];
    s.k_off = p.cu_k[b];
    s.lq = p.cu_q[b + 1] - s.q_off;
    s.lk = p.cu_k[b + 1] - s.k_off;
  } else {
    s.bb = b;
    s.q_off = s.k_off = 0;
    s.lq = p.lq;
    s.lk = p.lk;
  }
  s.diag = p.bottom_right ? s.lk - s.lq : 0;
  return s;
}

// The window / bounds rule of the contract for query i, key j (local indices).
__device__ __forceinline__ bool allowed(const Params& p, const Seq& s, int i, int j) {
  return j < s.lk && (p.window_left < 0 || j >= i + s.diag - p.window_left) &&
         (p.window_right < 0 || j <= i + s.diag + p.window_right);
}

// True when every (i, j) of rows [m0, m0 + bm) x columns [n0, n0 + bn) passes allowed() (rows past lq included;
// they are never stored).
__device__ __forceinline__ bool block_full(const Params& p, const Seq& s, int m0, int bm, int n0, int bn) {
  return n0 + bn <= s.lk && (p.window_left < 0 || n0 >= m0 + bm - 1 + s.diag - p.window_left) &&
         (p.window_right < 0 || n0 + bn - 1 <= m0 + s.diag + p.window_right);
}

// Key blocks [*lo, *hi) that rows [m0, m1) may see.
__device__ __forceinline__ void key_blocks(const Params& p, const Seq& s, int m0, int m1, int bn, int* lo, int* hi) {
  int jlo = 0, jhi = s.lk;
  if (p.window_left >= 0) jlo = max(0, m0 + s.diag - p.window_left);
  if (p.window_right >= 0) jhi = min(s.lk, m1 - 1 + s.diag + p.window_right + 1);
  *lo = jlo / bn;
  *hi = jhi > jlo ? (jhi + bn - 1) / bn : *lo;
}

// Score of element (i, j) in the log2 domain, or -inf where the window / bounds remove it.
template <typename T>
__device__ __forceinline__ float score(const Params& p, const Seq& s, const T* mask, float acc, float scale_log2,
                                       int i, int j, bool check) {
  float x = acc * scale_log2;
  if (mask != nullptr && i < s.lq && j < s.lk) {
    x += to_float(mask[i * p.mask_i + j * p.mask_j]) * kLog2e;
  }
  if (check && !allowed(p, s, i, j)) x = -kInf;
  return x;
}

// Keep decisions of columns j, j + 1 (j even) of row i: words (j & 3) and (j & 3) + 1 of one Philox draw.
__device__ __forceinline__ void keep_pair(const Params& p, uint32_t bh, int i, int j, bool* k0, bool* k1) {
  const uint4 u = philox(static_cast<uint32_t>(j) >> 2, static_cast<uint32_t>(i), bh, 0u,
                         static_cast<uint32_t>(p.seed), static_cast<uint32_t>(p.seed >> 32));
  const bool hi = (j & 2) != 0;
  *k0 = (hi ? u.z : u.x) >= p.dropout_threshold;
  *k1 = (hi ? u.w : u.y) >= p.dropout_threshold;
}

__device__ __forceinline__ bool keep_one(const Params& p, uint32_t bh, int i, int j) {
  const uint4 u = philox(static_cast<uint32_t>(j) >> 2, static_cast<uint32_t>(i), bh, 0u,
                         static_cast<uint32_t>(p.seed), static_cast<uint32_t>(p.seed >> 32));
  const int w = j & 3;
  const uint32_t word = w == 0 ? u.x : w == 1 ? u.y : w == 2 ? u.z : u.w;
  return word >= p.dropout_threshold;
}

// ------------------------------------------------------------------------------------------------------------------
// Forward. Grid (query blocks, Hq, nseq). Each warp owns MT m16 tiles (16 * MT consecutive query rows): every K / V
// fragment read from shared memory then feeds MT MMAs. kQRegs: Q fragments stay in registers for the whole key loop.

template <typename T, int HD, int NW, int MT, int BN, bool kQRegs, bool kExtras>
__global__ void __launch_bounds__(NW * 32) _attention_fwd_kernel(const Params p) {
  constexpr int WM = 16 * MT, BM = WM * NW, NT = NW * 32, KS = HD / 16, NS = BN / 8, NO = HD / 8;
  constexpr int R = Tile<HD>::kRow;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * R;  // [2][BN][R]
  T* sV = sK + 2 * BN * R;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, tq = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (p.hq / p.hkv);
  const Seq s = make_seq(p, b);
  const int d8c = p.d8 / 8;
  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k);
  const T* vg = static_cast<const T*>(p.v);
  const T* qb = qg + s.bb * p.q_st.b + h * p.q_st.h + s.q_off * p.q_st.l;
  const T* kb = kg + s.bb * p.k_st.b + hk * p.k_st.h + s.k_off * p.k_st.l;
  const T* vb = vg + s.bb * p.v_st.b + hk * p.v_st.h + s.k_off * p.v_st.l;
  T* ob = static_cast<T*>(p.out) + s.bb * p.out_st.b + h * p.out_st.h + s.q_off * p.out_st.l;
  float* lseb = p.lse + (static_cast<int64_t>(s.bb) * p.hq + h) * p.lq + s.q_off;
  const T* maskb =
      !kExtras || p.mask == nullptr ? nullptr : static_cast<const T*>(p.mask) + s.bb * p.mask_b + h * p.mask_h;
  const float scale_log2 = p.scale * kLog2e;
  const bool dropout = kExtras && p.dropout_p > 0.f;
  const uint32_t bh = static_cast<uint32_t>(b) * static_cast<uint32_t>(p.hq) + static_cast<uint32_t>(h);
  const int wrow = warp * WM;  // this warp's first row in the block

  for (int mb = blockIdx.x; mb * BM < s.lq; mb += gridDim.x) {
    const int m0 = mb * BM;
    const int mrows = min(BM, s.lq - m0);
    int nb_lo, nb_hi;
    key_blocks(p, s, m0, m0 + mrows, BN, &nb_lo, &nb_hi);

    float o[MT][NO][4];
    float mx[MT][2], lsum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NO; ++nt) o[mt][nt][0] = o[mt][nt][1] = o[mt][nt][2] = o[mt][nt][3] = 0.f;
      mx[mt][0] = mx[mt][1] = -kInf;
      lsum[mt][0] = lsum[mt][1] = 0.f;
    }

    if (nb_lo < nb_hi) {
      load_tile<T, HD, BM, NT>(sQ, qb + m0 * p.q_st.l, p.q_st.l, mrows, d8c, qg, tid);
      {
        const int n0 = nb_lo * BN;
        load_tile<T, HD, BN, NT>(sK, kb + n0 * p.k_st.l, p.k_st.l, s.lk - n0, d8c, kg, tid);
        load_tile<T, HD, BN, NT>(sV, vb + n0 * p.v_st.l, p.v_st.l, s.lk - n0, d8c, vg, tid);
      }
      cp_async_commit();
      uint32_t qf[kQRegs ? MT : 1][kQRegs ? KS : 1][4];

      for (int nb = nb_lo; nb < nb_hi; ++nb) {
        const int buf = (nb - nb_lo) & 1;
        if (nb + 1 < nb_hi) {
          const int n1 = (nb + 1) * BN;
          load_tile<T, HD, BN, NT>(sK + (buf ^ 1) * BN * R, kb + n1 * p.k_st.l, p.k_st.l, s.lk - n1, d8c, kg, tid);
          load_tile<T, HD, BN, NT>(sV + (buf ^ 1) * BN * R, vb + n1 * p.v_st.l, p.v_st.l, s.lk - n1, d8c, vg, tid);
          cp_async_commit();
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();
        const T* k_s = sK + buf * BN * R;
        const T* v_s = sV + buf * BN * R;
        if constexpr (kQRegs) {
          if (nb == nb_lo) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
              for (int kk = 0; kk < KS; ++kk) ldsm_a<HD>(qf[mt][kk], sQ, wrow + mt * 16, kk * 16, lane);
            }
          }
        }

        // S = Q K^T
        float sc[MT][NS][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int nt = 0; nt < NS; ++nt) sc[mt][nt][0] = sc[mt][nt][1] = sc[mt][nt][2] = sc[mt][nt][3] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          uint32_t a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            if constexpr (kQRegs) {
#pragma unroll
              for (int x = 0; x < 4; ++x) a[mt][x] = qf[mt][kk][x];
            } else {
              ldsm_a<HD>(a[mt], sQ, wrow + mt * 16, kk * 16, lane);
            }
          }
#pragma unroll
          for (int np = 0; np < NS / 2; ++np) {
            uint32_t bf[4];
            ldsm_b<HD>(bf, k_s, np * 16, kk * 16, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              mma16816<T>(sc[mt][2 * np], a[mt], bf[0], bf[1]);
              mma16816<T>(sc[mt][2 * np + 1], a[mt], bf[2], bf[3]);
            }
          }
        }

        // Online softmax over this block.
        const int n0 = nb * BN;
        const bool check = !block_full(p, s, m0, BM, n0, BN);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int i0 = m0 + wrow + mt * 16 + gr;
#pragma unroll
          for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = i0 + (e >> 1) * 8, j = n0 + nt * 8 + 2 * tq + (e & 1);
              sc[mt][nt][e] = score<T>(p, s, maskb, sc[mt][nt][e], scale_log2, i, j, check);
            }
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float m = mx[mt][r];
#pragma unroll
            for (int nt = 0; nt < NS; ++nt) m = fmaxf(m, fmaxf(sc[mt][nt][2 * r], sc[mt][nt][2 * r + 1]));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            // A row with nothing allowed so far keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
            const float mu = m == -kInf ? 0.f : m;
            const float alpha = exp2f(mx[mt][r] - mu);
            mx[mt][r] = m;
            float rs = 0.f;
#pragma unroll
            for (int nt = 0; nt < NS; ++nt) {
              sc[mt][nt][2 * r] = exp2f(sc[mt][nt][2 * r] - mu);
              sc[mt][nt][2 * r + 1] = exp2f(sc[mt][nt][2 * r + 1] - mu);
              rs += sc[mt][nt][2 * r] + sc[mt][nt][2 * r + 1];
            }
            lsum[mt][r] = lsum[mt][r] * alpha + rs;
#pragma unroll
            for (int nt = 0; nt < NO; ++nt) {
              o[mt][nt][2 * r] *= alpha;
              o[mt][nt][2 * r + 1] *= alpha;
            }
          }
          if (dropout) {  // the sum above is of the undropped p; 1 / (1 - p) is applied at the end
#pragma unroll
            for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                bool k0, k1;
                keep_pair(p, bh, i0 + r * 8, n0 + nt * 8 + 2 * tq, &k0, &k1);
                if (!k0) sc[mt][nt][2 * r] = 0.f;
                if (!k1) sc[mt][nt][2 * r + 1] = 0.f;
              }
            }
          }
        }

        // O += P V
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = pack2<T>(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
            a[mt][1] = pack2<T>(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
            a[mt][2] = pack2<T>(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
            a[mt][3] = pack2<T>(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
          }
#pragma unroll
          for (int np = 0; np < NO / 2; ++np) {
            uint32_t bf[4];
            ldsm_bt<HD>(bf, v_s, kk * 16, np * 16, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              mma16816<T>(o[mt][2 * np], a[mt], bf[0], bf[1]);
              mma16816<T>(o[mt][2 * np + 1], a[mt], bf[2], bf[3]);
            }
          }
        }
        __syncthreads();  // the next iteration's prefetch overwrites this buffer
      }
    }

    // Epilogue: out = O / l (0 for rows with nothing allowed), lse = ln(sum exp(s)) (+inf for those rows).
    // Each warp stages its rows through its own rows of sQ, which only it has read.
    const float drop_scale = dropout ? p.dropout_scale : 1.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float inv[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float l = lsum[mt][r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inv[r] = l > 0.f ? drop_scale / l : 0.f;
        const int i = m0 + wrow + mt * 16 + gr + r * 8;
        if (tq == 0 && i < s.lq) lseb[i] = l > 0.f ? mx[mt][r] * kLn2 + __logf(l) : kInf;
      }
#pragma unroll
      for (int nt = 0; nt < NO; ++nt) {
        o[mt][nt][0] *= inv[0];
        o[mt][nt][1] *= inv[0];
        o[mt][nt][2] *= inv[1];
        o[mt][nt][3] *= inv[1];
      }
      const int r0 = wrow + mt * 16;
      store_rows<T, HD>(o[mt], 1.f, sQ, r0, ob + (m0 + r0) * p.out_st.l, p.out_st.l, mrows - r0, d8c, lane);
    }
    __syncthreads();  // the next query block reloads sQ
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Backward, step 1: delta[b, h, i] = sum_d dout * out (float32), one warp per row.

template <typename T>
__global__ void __launch_bounds__(256) _attention_bwd_delta_kernel(const Params p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.hq * p.lq;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  const T* dog = static_cast<const T*>(p.dout);
  const T* og = static_cast<const T*>(p.out);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows;
       row += warps) {
    const int64_t l = row % p.lq, bh = row / p.lq;
    const int64_t h = bh % p.hq, b = bh / p.hq;
    const T* dr = dog + b * p.dout_st.b + h * p.dout_st.h + l * p.dout_st.l;
    const T* orow = og + b * p.out_st.b + h * p.out_st.h + l * p.out_st.l;
    float acc = 0.f;
    for (int c = lane; c < p.d8 / 8; c += 32) {
      const uint4 x = *reinterpret_cast<const uint4*>(dr + c * 8);
      const uint4 y = *reinterpret_cast<const uint4*>(orow + c * 8);
      const T* xs = reinterpret_cast<const T*>(&x);
      const T* ys = reinterpret_cast<const T*>(&y);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += to_float(xs[e]) * to_float(ys[e]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) p.delta[row] = acc;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Backward, step 2: dK and/or dV. Grid (key blocks, Hkv, nseq). A CTA owns BN = 16 * NW key rows, each warp 16 of
// them; it loops over (query head of the group, query block of BM rows), Q / dO / lse / delta prefetched one step
// ahead.

template <typename T, int HD, int NW, int BM, bool kDK, bool kDV, bool kExtras>
__global__ void __launch_bounds__(NW * 32) _attention_bwd_dkdv_kernel(const Params p) {
  constexpr int BN = 16 * NW, NT = NW * 32, KS = HD / 16, NS = BM / 8, NO = HD / 8;
  constexpr int R = Tile<HD>::kRow;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * R;
  T* sQ = sV + BN * R;       // [2][BM][R]
  T* sdO = sQ + 2 * BM * R;  // [2][BM][R]
  float* sL = reinterpret_cast<float*>(sdO + 2 * BM * R);  // [2][BM] lse * log2(e)
  float* sD = sL + 2 * BM;                                 // [2][BM] delta

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, tq = lane & 3;
  const int hk = blockIdx.y, b = blockIdx.z, group = p.hq / p.hkv;
  const Seq s = make_seq(p, b);
  const int d8c = p.d8 / 8;
  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k);
  const T* vg = static_cast<const T*>(p.v);
  const T* dog = static_cast<const T*>(p.dout);
  const T* kb = kg + s.bb * p.k_st.b + hk * p.k_st.h + s.k_off * p.k_st.l;
  const T* vb = vg + s.bb * p.v_st.b + hk * p.v_st.h + s.k_off * p.v_st.l;
  const float scale_log2 = p.scale * kLog2e;
  const bool dropout = kExtras && p.dropout_p > 0.f;
  const float drop_scale = dropout ? p.dropout_scale : 1.f;

  for (int nb = blockIdx.x; nb * BN < s.lk; nb += gridDim.x) {
    const int n0 = nb * BN;
    const int nrows = min(BN, s.lk - n0);
    // Query rows that see any key of this block: j in [i + diag - wl, i + diag + wr].
    int ilo = 0, ihi = s.lq;
    if (p.window_right >= 0) ilo = max(0, n0 - s.diag - p.window_right);
    if (p.window_left >= 0) ihi = min(s.lq, n0 + nrows - 1 - s.diag + p.window_left + 1);
    const int mb_lo = ilo / BM;
    const int nqb = ihi > ilo ? (ihi + BM - 1) / BM - mb_lo : 0;
    const int total = group * nqb;

    float dk[kDK ? NO : 1][4], dv[kDV ? NO : 1][4];
#pragma unroll
    for (int nt = 0; nt < (kDK ? NO : 1); ++nt) dk[nt][0] = dk[nt][1] = dk[nt][2] = dk[nt][3] = 0.f;
#pragma unroll
    for (int nt = 0; nt < (kDV ? NO : 1); ++nt) dv[nt][0] = dv[nt][1] = dv[nt][2] = dv[nt][3] = 0.f;

    // Step `it` = (query head group * hk + it / nqb, query block mb_lo + it % nqb).
    auto load_step = [&](int it, int st) {
      const int h = hk * group + it / nqb;
      const int m0 = (mb_lo + it % nqb) * BM;
      const int rows = min(BM, s.lq - m0);
      const T* qb = qg + s.bb * p.q_st.b + h * p.q_st.h + (s.q_off + m0) * p.q_st.l;
      const T* dob = dog + s.bb * p.dout_st.b + h * p.dout_st.h + (s.q_off + m0) * p.dout_st.l;
      load_tile<T, HD, BM, NT>(sQ + st * BM * R, qb, p.q_st.l, rows, d8c, qg, tid);
      load_tile<T, HD, BM, NT>(sdO + st * BM * R, dob, p.dout_st.l, rows, d8c, dog, tid);
      const int64_t stat = (static_cast<int64_t>(s.bb) * p.hq + h) * p.lq + s.q_off + m0;
      for (int x = tid; x < BM; x += NT) {
        // Rows past the sequence get lse = +inf: their p is exactly 0.
        sL[st * BM + x] = x < rows ? p.lse[stat + x] * kLog2e : kInf;
        sD[st * BM + x] = x < rows ? p.delta[stat + x] : 0.f;
      }
    };

    if (total > 0) {
      load_tile<T, HD, BN, NT>(sK, kb + n0 * p.k_st.l, p.k_st.l, nrows, d8c, kg, tid);
      if constexpr (kDK) load_tile<T, HD, BN, NT>(sV, vb + n0 * p.v_st.l, p.v_st.l, nrows, d8c, vg, tid);
      load_step(0, 0);
      cp_async_commit();

      for (int it = 0; it < total; ++it) {
        const int st = it & 1;
        if (it + 1 < total) {
          load_step(it + 1, st ^ 1);
          cp_async_commit();
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();
        const int h = hk * group + it / nqb;
        const int m0 = (mb_lo + it % nqb) * BM;
        const T* q_s = sQ + st * BM * R;
        const T* do_s = sdO + st * BM * R;
        const float* l_s = sL + st * BM;
        const float* d_s = sD + st * BM;
        const T* maskb =
            !kExtras || p.mask == nullptr ? nullptr : static_cast<const T*>(p.mask) + s.bb * p.mask_b + h * p.mask_h;
        const uint32_t bh = static_cast<uint32_t>(b) * static_cast<uint32_t>(p.hq) + static_cast<uint32_t>(h);

        // S^T = K Q^T: rows = this warp's 16 keys, columns = BM queries.
        float sc[NS][4];
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          uint32_t a[4];
          ldsm_a<HD>(a, sK, warp * 16, kk * 16, lane);
#pragma unroll
          for (int np = 0; np < NS / 2; ++np) {
            uint32_t bf[4];
            ldsm_b<HD>(bf, q_s, np * 16, kk * 16, lane);
            mma16816<T>(sc[2 * np], a, bf[0], bf[1]);
            mma16816<T>(sc[2 * np + 1], a, bf[2], bf[3]);
          }
        }
        // P^T (the softmax of the forward, from lse).
        const bool check = !block_full(p, s, m0, BM, n0, BN);
        const int j0 = n0 + warp * 16 + gr;
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int il = nt * 8 + 2 * tq + (e & 1);
            const int i = m0 + il, j = j0 + (e >> 1) * 8;
            const float x = score<T>(p, s, maskb, sc[nt][e], scale_log2, i, j, check);
            sc[nt][e] = exp2f(x - l_s[il]);
          }
        }

        // dP^T = V dO^T (only dK needs it).
        float dp[kDK ? NS : 1][4];
        if constexpr (kDK) {
#pragma unroll
          for (int nt = 0; nt < NS; ++nt) dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
#pragma unroll
          for (int kk = 0; kk < KS; ++kk) {
            uint32_t a[4];
            ldsm_a<HD>(a, sV, warp * 16, kk * 16, lane);
#pragma unroll
            for (int np = 0; np < NS / 2; ++np) {
              uint32_t bf[4];
              ldsm_b<HD>(bf, do_s, np * 16, kk * 16, lane);
              mma16816<T>(dp[2 * np], a, bf[0], bf[1]);
              mma16816<T>(dp[2 * np + 1], a, bf[2], bf[3]);
            }
          }
        }

        // With dropout (mask M = keep / (1 - p)): dV uses P * M; dS = P * (dP * M - delta).
        float pm[kDV ? NS : 1][4];
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float mval = 1.f;
            if (dropout) {
              const int i = m0 + nt * 8 + 2 * tq + (e & 1), j = j0 + (e >> 1) * 8;
              mval = keep_one(p, bh, i, j) ? drop_scale : 0.f;
            }
            if constexpr (kDV) pm[nt][e] = sc[nt][e] * mval;
            if constexpr (kDK) {
              const int il = nt * 8 + 2 * tq + (e & 1);
              dp[nt][e] = sc[nt][e] * (dp[nt][e] * mval - d_s[il]);  // now dS^T
            }
          }
        }

        // dV += (P M)^T dO, dK += dS^T Q: A from the score fragments, B = dO / Q tiles ([query][d], transposed).
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          if constexpr (kDV) {
            const uint32_t a[4] = {pack2<T>(pm[2 * kk][0], pm[2 * kk][1]), pack2<T>(pm[2 * kk][2], pm[2 * kk][3]),
                                   pack2<T>(pm[2 * kk + 1][0], pm[2 * kk + 1][1]),
                                   pack2<T>(pm[2 * kk + 1][2], pm[2 * kk + 1][3])};
#pragma unroll
            for (int np = 0; np < NO / 2; ++np) {
              uint32_t bf[4];
              ldsm_bt<HD>(bf, do_s, kk * 16, np * 16, lane);
              mma16816<T>(dv[2 * np], a, bf[0], bf[1]);
              mma16816<T>(dv[2 * np + 1], a, bf[2], bf[3]);
            }
          }
          if constexpr (kDK) {
            const uint32_t a[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                                   pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                   pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int np = 0; np < NO / 2; ++np) {
              uint32_t bf[4];
              ldsm_bt<HD>(bf, q_s, kk * 16, np * 16, lane);
              mma16816<T>(dk[2 * np], a, bf[0], bf[1]);
              mma16816<T>(dk[2 * np + 1], a, bf[2], bf[3]);
            }
          }
        }
        __syncthreads();  // the next step's prefetch overwrites this stage
      }
    }

    // Epilogue (zeros for keys no query sees). Each warp stages through its own rows of sK / sV, which only it reads.
    const int wrows = nrows - warp * 16;
    if constexpr (kDK) {
      T* g = static_cast<T*>(p.dk) + s.bb * p.dk_st.b + hk * p.dk_st.h + (s.k_off + n0 + warp * 16) * p.dk_st.l;
      store_rows<T, HD>(dk, p.scale, sK, warp * 16, g, p.dk_st.l, wrows, d8c, lane);
    }
    if constexpr (kDV) {
      T* g = static_cast<T*>(p.dv) + s.bb * p.dv_st.b + hk * p.dv_st.h + (s.k_off + n0 + warp * 16) * p.dv_st.l;
      store_rows<T, HD>(dv, 1.f, sV, warp * 16, g, p.dv_st.l, wrows, d8c, lane);
    }
    __syncthreads();  // the next key block reloads sK / sV
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Backward, step 3: dQ. Grid (query blocks, Hq, nseq); like the forward, with P recomputed from lse.
// kARegs: the Q and dO fragments live in registers for the whole key loop.

template <typename T, int HD, int NW, int BN, bool kARegs, bool kExtras>
__global__ void __launch_bounds__(NW * 32) _attention_bwd_dq_kernel(const Params p) {
  constexpr int BM = 16 * NW, NT = NW * 32, KS = HD / 16, NS = BN / 8, NO = HD / 8;
  constexpr int R = Tile<HD>::kRow;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * R;
  T* sK = sdO + BM * R;  // [2][BN][R]
  T* sV = sK + 2 * BN * R;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, tq = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (p.hq / p.hkv);
  const Seq s = make_seq(p, b);
  const int d8c = p.d8 / 8;
  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k);
  const T* vg = static_cast<const T*>(p.v);
  const T* dog = static_cast<const T*>(p.dout);
  const T* qb = qg + s.bb * p.q_st.b + h * p.q_st.h + s.q_off * p.q_st.l;
  const T* dob = dog + s.bb * p.dout_st.b + h * p.dout_st.h + s.q_off * p.dout_st.l;
  const T* kb = kg + s.bb * p.k_st.b + hk * p.k_st.h + s.k_off * p.k_st.l;
  const T* vb = vg + s.bb * p.v_st.b + hk * p.v_st.h + s.k_off * p.v_st.l;
  T* dqb = static_cast<T*>(p.dq) + s.bb * p.dq_st.b + h * p.dq_st.h + s.q_off * p.dq_st.l;
  const int64_t stat0 = (static_cast<int64_t>(s.bb) * p.hq + h) * p.lq + s.q_off;
  const T* maskb =
      !kExtras || p.mask == nullptr ? nullptr : static_cast<const T*>(p.mask) + s.bb * p.mask_b + h * p.mask_h;
  const float scale_log2 = p.scale * kLog2e;
  const bool dropout = kExtras && p.dropout_p > 0.f;
  const float drop_scale = dropout ? p.dropout_scale : 1.f;
  const uint32_t bh = static_cast<uint32_t>(b) * static_cast<uint32_t>(p.hq) + static_cast<uint32_t>(h);

  for (int mb = blockIdx.x; mb * BM < s.lq; mb += gridDim.x) {
    const int m0 = mb * BM;
    const int mrows = min(BM, s.lq - m0);
    int nb_lo, nb_hi;
    key_blocks(p, s, m0, m0 + mrows, BN, &nb_lo, &nb_hi);
    const int i0 = m0 + warp * 16 + gr;
    float lse2[2], dlt[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = i0 + r * 8;
      lse2[r] = i < s.lq ? p.lse[stat0 + i] * kLog2e : kInf;
      dlt[r] = i < s.lq ? p.delta[stat0 + i] : 0.f;
    }

    float dq[NO][4];
#pragma unroll
    for (int nt = 0; nt < NO; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.f;

    if (nb_lo < nb_hi) {
      load_tile<T, HD, BM, NT>(sQ, qb + m0 * p.q_st.l, p.q_st.l, mrows, d8c, qg, tid);
      load_tile<T, HD, BM, NT>(sdO, dob + m0 * p.dout_st.l, p.dout_st.l, mrows, d8c, dog, tid);
      {
        const int n0 = nb_lo * BN;
        load_tile<T, HD, BN, NT>(sK, kb + n0 * p.k_st.l, p.k_st.l, s.lk - n0, d8c, kg, tid);
        load_tile<T, HD, BN, NT>(sV, vb + n0 * p.v_st.l, p.v_st.l, s.lk - n0, d8c, vg, tid);
      }
      cp_async_commit();
      uint32_t qf[kARegs ? KS : 1][4], df[kARegs ? KS : 1][4];

      for (int nb = nb_lo; nb < nb_hi; ++nb) {
        const int buf = (nb - nb_lo) & 1;
        if (nb + 1 < nb_hi) {
          const int n1 = (nb + 1) * BN;
          load_tile<T, HD, BN, NT>(sK + (buf ^ 1) * BN * R, kb + n1 * p.k_st.l, p.k_st.l, s.lk - n1, d8c, kg, tid);
          load_tile<T, HD, BN, NT>(sV + (buf ^ 1) * BN * R, vb + n1 * p.v_st.l, p.v_st.l, s.lk - n1, d8c, vg, tid);
          cp_async_commit();
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();
        const T* k_s = sK + buf * BN * R;
        const T* v_s = sV + buf * BN * R;
        if constexpr (kARegs) {
          if (nb == nb_lo) {
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
              ldsm_a<HD>(qf[kk], sQ, warp * 16, kk * 16, lane);
              ldsm_a<HD>(df[kk], sdO, warp * 16, kk * 16, lane);
            }
          }
        }

        // S = Q K^T and dP = dO V^T.
        float sc[NS][4], dp[NS][4];
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
          sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
          dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          uint32_t a[4], ad[4];
          if constexpr (kARegs) {
#pragma unroll
            for (int x = 0; x < 4; ++x) {
              a[x] = qf[kk][x];
              ad[x] = df[kk][x];
            }
          } else {
            ldsm_a<HD>(a, sQ, warp * 16, kk * 16, lane);
            ldsm_a<HD>(ad, sdO, warp * 16, kk * 16, lane);
          }
#pragma unroll
          for (int np = 0; np < NS / 2; ++np) {
            uint32_t bf[4];
            ldsm_b<HD>(bf, k_s, np * 16, kk * 16, lane);
            mma16816<T>(sc[2 * np], a, bf[0], bf[1]);
            mma16816<T>(sc[2 * np + 1], a, bf[2], bf[3]);
            ldsm_b<HD>(bf, v_s, np * 16, kk * 16, lane);
            mma16816<T>(dp[2 * np], ad, bf[0], bf[1]);
            mma16816<T>(dp[2 * np + 1], ad, bf[2], bf[3]);
          }
        }

        // dS = P * (dP * M - delta), into dp.
        const int n0 = nb * BN;
        const bool check = !block_full(p, s, m0, BM, n0, BN);
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int i = i0 + r * 8, j = n0 + nt * 8 + 2 * tq;
            float m0v = 1.f, m1v = 1.f;
            if (dropout) {
              bool k0, k1;
              keep_pair(p, bh, i, j, &k0, &k1);
              m0v = k0 ? drop_scale : 0.f;
              m1v = k1 ? drop_scale : 0.f;
            }
            const float p0 = exp2f(score<T>(p, s, maskb, sc[nt][2 * r], scale_log2, i, j, check) - lse2[r]);
            const float p1 = exp2f(score<T>(p, s, maskb, sc[nt][2 * r + 1], scale_log2, i, j + 1, check) - lse2[r]);
            dp[nt][2 * r] = p0 * (dp[nt][2 * r] * m0v - dlt[r]);
            dp[nt][2 * r + 1] = p1 * (dp[nt][2 * r + 1] * m1v - dlt[r]);
          }
        }

        // dQ += dS K (K tile [key][d] as B, transposed).
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          const uint32_t a[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                                 pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                 pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
          for (int np = 0; np < NO / 2; ++np) {
            uint32_t bf[4];
            ldsm_bt<HD>(bf, k_s, kk * 16, np * 16, lane);
            mma16816<T>(dq[2 * np], a, bf[0], bf[1]);
            mma16816<T>(dq[2 * np + 1], a, bf[2], bf[3]);
          }
        }
        __syncthreads();  // the next iteration's prefetch overwrites this buffer
      }
    }

    store_rows<T, HD>(dq, p.scale, sQ, warp * 16, dqb + (m0 + warp * 16) * p.dq_st.l, p.dq_st.l,
                      mrows - warp * 16, d8c, lane);
    __syncthreads();  // the next query block reloads sQ
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Host side.

// Tile configurations per padded head dim, chosen to keep the fp32 accumulators in registers without spills.
template <int HD>
struct Cfg {
  // forward: NW warps x MT m16 tiles of query rows, BN keys per step
  static constexpr int kFwdNW = HD <= 128 ? 4 : 8;
  static constexpr int kFwdMT = HD <= 128 ? 2 : 1;
  static constexpr int kFwdBN = HD <= 64 ? 64 : 32;
  static constexpr bool kFwdQRegs = HD <= 64;
  // dK/dV: NW warps x 16 key rows, BM queries per step; dK and dV in one launch up to HD 128
  static constexpr int kKvNW = HD <= 128 ? 8 : 4;
  static constexpr int kKvBM = HD <= 64 ? 64 : 32;
  static constexpr bool kKvFused = HD <= 128;
  // dQ: NW warps x 16 query rows, BN keys per step
  static constexpr int kDqNW = HD <= 128 ? 8 : 4;
  static constexpr int kDqBN = HD <= 128 ? 64 : 32;
  static constexpr bool kDqARegs = HD <= 64;
};

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Raises the kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <typename K>
LaunchStatus prepare(K kernel, int smem) {
  return cuda_util::raise_smem_limit<LaunchStatus>(
      kernel, smem, "the attention kernel for this head dim needs more shared memory per block than this GPU offers");
}

// Grid dimension x: blocks of rows over the longest sequence (the kernels loop past it).
unsigned grid_x(int max_rows, int block_rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(cdiv(max_rows, block_rows), 1 << 30)));
}

// kExtras: the kernels compiled with the additive mask and dropout (without them, those paths cost no registers).
template <typename T, int HD, bool kExtras>
LaunchStatus forward_hd(const Params& p, cudaStream_t stream) {
  using C = Cfg<HD>;
  constexpr int NW = C::kFwdNW, MT = C::kFwdMT, BN = C::kFwdBN, BM = 16 * MT * NW;
  auto kernel = _attention_fwd_kernel<T, HD, NW, MT, BN, C::kFwdQRegs, kExtras>;
  const int smem = (BM + 4 * BN) * Tile<HD>::kRow * static_cast<int>(sizeof(T));
  LaunchStatus st = prepare(kernel, smem);
  if (!st.ok()) return st;
  const dim3 grid(grid_x(p.max_lq, BM), p.hq, p.nseq);
  kernel<<<grid, NW * 32, smem, stream>>>(p);
  st.cuda = cudaGetLastError();
  return st;
}

template <typename T, int HD, bool kDK, bool kDV, bool kExtras>
LaunchStatus dkdv_hd(const Params& p, cudaStream_t stream) {
  using C = Cfg<HD>;
  constexpr int NW = C::kKvNW, BM = C::kKvBM, BN = 16 * NW;
  auto kernel = _attention_bwd_dkdv_kernel<T, HD, NW, BM, kDK, kDV, kExtras>;
  const int smem = (2 * BN + 4 * BM) * Tile<HD>::kRow * static_cast<int>(sizeof(T)) + 4 * BM * 4;
  LaunchStatus st = prepare(kernel, smem);
  if (!st.ok()) return st;
  const dim3 grid(grid_x(p.max_lk, BN), p.hkv, p.nseq);
  kernel<<<grid, NW * 32, smem, stream>>>(p);
  st.cuda = cudaGetLastError();
  return st;
}

template <typename T, int HD, bool kExtras>
LaunchStatus backward_hd(const Params& p, cudaStream_t stream) {
  using C = Cfg<HD>;
  LaunchStatus st;
  {
    const int64_t rows = static_cast<int64_t>(p.batch) * p.hq * p.lq;
    const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(cdiv(rows, 8), 1 << 20)));
    _attention_bwd_delta_kernel<T><<<blocks, 256, 0, stream>>>(p);
    if ((st.cuda = cudaGetLastError()) != cudaSuccess) return st;
  }
  if constexpr (C::kKvFused) {
    st = dkdv_hd<T, HD, true, true, kExtras>(p, stream);
  } else {
    st = dkdv_hd<T, HD, false, true, kExtras>(p, stream);
    if (st.ok()) st = dkdv_hd<T, HD, true, false, kExtras>(p, stream);
  }
  if (!st.ok()) return st;
  constexpr int NW = C::kDqNW, BN = C::kDqBN, BM = 16 * NW;
  auto kernel = _attention_bwd_dq_kernel<T, HD, NW, BN, C::kDqARegs, kExtras>;
  const int smem = (2 * BM + 4 * BN) * Tile<HD>::kRow * static_cast<int>(sizeof(T));
  st = prepare(kernel, smem);
  if (!st.ok()) return st;
  const dim3 grid(grid_x(p.max_lq, BM), p.hq, p.nseq);
  kernel<<<grid, NW * 32, smem, stream>>>(p);
  st.cuda = cudaGetLastError();
  return st;
}

bool extras(const Params& p) { return p.mask != nullptr || p.dropout_p > 0.f; }

// The compiled head dims; d8 goes to the smallest one that holds it.
template <typename T, template <typename, int> class F>
LaunchStatus dispatch_hd(const Params& p, cudaStream_t stream) {
  if (p.d8 <= 32) return F<T, 32>::run(p, stream);
  if (p.d8 <= 64) return F<T, 64>::run(p, stream);
  if (p.d8 <= 96) return F<T, 96>::run(p, stream);
  if (p.d8 <= 128) return F<T, 128>::run(p, stream);
  if (p.d8 <= 192) return F<T, 192>::run(p, stream);
  if (p.d8 <= 256) return F<T, 256>::run(p, stream);
  LaunchStatus st;
  st.what = "head dim over 256 is not supported by the CUDA kernel";
  return st;
}

template <typename T, int HD>
struct Fwd {
  static LaunchStatus run(const Params& p, cudaStream_t s) {
    return extras(p) ? forward_hd<T, HD, true>(p, s) : forward_hd<T, HD, false>(p, s);
  }
};
template <typename T, int HD>
struct Bwd {
  static LaunchStatus run(const Params& p, cudaStream_t s) {
    return extras(p) ? backward_hd<T, HD, true>(p, s) : backward_hd<T, HD, false>(p, s);
  }
};

}  // namespace

LaunchStatus attention_forward(const Params& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat16 ? dispatch_hd<__half, Fwd>(p, stream)
                                    : dispatch_hd<__nv_bfloat16, Fwd>(p, stream);
}

LaunchStatus attention_backward(const Params& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat16 ? dispatch_hd<__half, Bwd>(p, stream)
                                    : dispatch_hd<__nv_bfloat16, Bwd>(p, stream);
}

}  // namespace mltoolkit::cuda_attention
