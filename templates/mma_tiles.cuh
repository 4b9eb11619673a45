// Warp-level tile products on tensor cores (mma.sync m16n8k16, fp32 accumulation) shared by the backward
// templates. Plain CUDA: every size is a template argument. Tiles in shared memory are [row][DP] with row pitch
// PITCH elements; accumulators are in the mma's C layout (lane: rows lane / 4 and lane / 4 + 8, columns
// 2 * (lane % 4) and the next one of each 8-column group).
#pragma once
#include "common.cuh"

namespace fwagen {

// The A-operand fragments of 16 rows of a [row][DP] tile (one 16-column slice per kk).
template <int DP, int PITCH, typename T>
__device__ __forceinline__ void load_row_fragments(unsigned (&a)[DP / 16][4], const T* rows, int lane) {
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) ldmatrix_x4(a[kk], rows + (lane % 16) * PITCH + kk * 16 + (lane / 16) * 8);
}

// s (16 x COLS) = init + 16 rows, as loaded by load_row_fragments, * the COLS rows of a [row][DP] tile, transposed.
// The first products read init where it is (mma16816_from), so that a term the scores share (the backward's bias and
// mask) costs neither an add nor a copy.
template <typename T, int DP, int PITCH, int COLS>
__device__ __forceinline__ void fragments_times_cols_from(float (&s)[COLS / 8][4], const float (&init)[COLS / 8][4],
                                                          const unsigned (&a)[DP / 16][4], const T* cols, int lane) {
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
#pragma unroll
    for (int jj = 0; jj < COLS / 16; ++jj) {
      unsigned b[4];
      ldmatrix_x4(b, cols + (jj * 16 + (lane / 16) * 8 + lane % 8) * PITCH + kk * 16 + ((lane / 8) % 2) * 8);
      if (kk == 0) {
        mma16816_from<T>(s[2 * jj], a[kk], b[0], b[1], init[2 * jj]);
        mma16816_from<T>(s[2 * jj + 1], a[kk], b[2], b[3], init[2 * jj + 1]);
      } else {
        mma16816<T>(s[2 * jj], a[kk], b[0], b[1]);
        mma16816<T>(s[2 * jj + 1], a[kk], b[2], b[3]);
      }
    }
  }
}

// s (16 x COLS) = 16 rows of a [row][DP] tile * the COLS rows of another, transposed.
template <typename T, int DP, int PITCH, int COLS>
__device__ __forceinline__ void rows_times_cols(float (&s)[COLS / 8][4], const T* rows, const T* cols, int lane) {
#pragma unroll
  for (int j = 0; j < COLS / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    unsigned a[4];
    ldmatrix_x4(a, rows + (lane % 16) * PITCH + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int jj = 0; jj < COLS / 16; ++jj) {
      unsigned b[4];
      ldmatrix_x4(b, cols + (jj * 16 + (lane / 16) * 8 + lane % 8) * PITCH + kk * 16 + ((lane / 8) % 2) * 8);
      mma16816<T>(s[2 * jj], a, b[0], b[1]);
      mma16816<T>(s[2 * jj + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x DP) += A (16 x K, accumulator layout, packed to T here) * the K rows of a [row][DP] tile.
template <typename T, int DP, int PITCH, int K>
__device__ __forceinline__ void accumulate_times_tile(float (&acc)[DP / 8][4], const float (&a)[K / 8][4],
                                                      const T* tile, int lane) {
#pragma unroll
  for (int jj = 0; jj < K / 16; ++jj) {
    unsigned pa[4] = {pack2<T>(a[2 * jj][0], a[2 * jj][1]), pack2<T>(a[2 * jj][2], a[2 * jj][3]),
                      pack2<T>(a[2 * jj + 1][0], a[2 * jj + 1][1]), pack2<T>(a[2 * jj + 1][2], a[2 * jj + 1][3])};
#pragma unroll
    for (int dd = 0; dd < DP / 16; ++dd) {
      unsigned b[4];
      ldmatrix_x4_trans(b, tile + (jj * 16 + ((lane / 8) % 2) * 8 + lane % 8) * PITCH + dd * 16 + (lane / 16) * 8);
      mma16816<T>(acc[2 * dd], pa, b[0], b[1]);
      mma16816<T>(acc[2 * dd + 1], pa, b[2], b[3]);
    }
  }
}

// acc (16 keys x DP) = the sum over ROWS rows of X^T * rows, where X is a [row][key] tile (row pitch XPITCH) read from
// key column key0 and rows a [row][DP] tile: dV = P^T dO and dK = dS^T Q of 16 keys, from P and dS staged whole.
template <typename T, int DP, int PITCH, int ROWS, int XPITCH>
__device__ __forceinline__ void transposed_times_rows(float (&acc)[DP / 8][4], const T* x, const T* rows, int key0,
                                                      int lane) {
#pragma unroll
  for (int j = 0; j < DP / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < ROWS / 16; ++kk) {
    unsigned a[4];
    ldmatrix_x4_trans(a, x + (kk * 16 + (lane / 16) * 8 + lane % 8) * XPITCH + key0 + ((lane / 8) % 2) * 8);
#pragma unroll
    for (int dd = 0; dd < DP / 16; ++dd) {
      unsigned b[4];
      ldmatrix_x4_trans(b, rows + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * PITCH + dd * 16 + (lane / 16) * 8);
      mma16816<T>(acc[2 * dd], a, b[0], b[1]);
      mma16816<T>(acc[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

// Two products of transposed_times_rows in one pass: acc0 = x0^T rows0 from key column key0 and acc1 = x1^T rows1 from
// key1. SHARED_ROWS (rows0 and rows1 one tile): each B fragment is read once for both, so 32 keys of one product cost
// a third fewer shared-memory reads than 16 keys of two.
template <typename T, int DP, int PITCH, int ROWS, int XPITCH, bool SHARED_ROWS>
__device__ __forceinline__ void transposed_times_rows_x2(float (&acc0)[DP / 8][4], float (&acc1)[DP / 8][4],
                                                         const T* x0, const T* rows0, int key0, const T* x1,
                                                         const T* rows1, int key1, int lane) {
#pragma unroll
  for (int j = 0; j < DP / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc0[j][e] = acc1[j][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < ROWS / 16; ++kk) {
    unsigned a0[4], a1[4];
    const int x_offset = (kk * 16 + (lane / 16) * 8 + lane % 8) * XPITCH + ((lane / 8) % 2) * 8;
    ldmatrix_x4_trans(a0, x0 + x_offset + key0);
    ldmatrix_x4_trans(a1, x1 + x_offset + key1);
#pragma unroll
    for (int dd = 0; dd < DP / 16; ++dd) {
      const int row_offset = (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * PITCH + dd * 16 + (lane / 16) * 8;
      unsigned b0[4], b1[4];
      ldmatrix_x4_trans(b0, rows0 + row_offset);
      if constexpr (SHARED_ROWS) {
#pragma unroll
        for (int e = 0; e < 4; ++e) b1[e] = b0[e];
      } else {
        ldmatrix_x4_trans(b1, rows1 + row_offset);
      }
      mma16816<T>(acc0[2 * dd], a0, b0[0], b0[1]);
      mma16816<T>(acc0[2 * dd + 1], a0, b0[2], b0[3]);
      mma16816<T>(acc1[2 * dd], a1, b1[0], b1[1]);
      mma16816<T>(acc1[2 * dd + 1], a1, b1[2], b1[3]);
    }
  }
}

// A 16 x 16 block of T pairs in accumulator layout (r[0]: rows g, columns 0-7; r[1]: rows g + 8, columns 0-7; r[2] and
// r[3] the same of columns 8-15) into a [row][col] shared tile of row pitch PITCH at (row0, col0): one stmatrix on
// sm_90 and later, four 4-byte stores before.
template <int PITCH, typename T>
__device__ __forceinline__ void store_pairs_16x16(T* tile, int row0, int col0, const unsigned (&r)[4], int lane) {
#if __CUDA_ARCH__ >= 900
  stmatrix_x4(tile + (row0 + ((lane / 8) % 2) * 8 + lane % 8) * PITCH + col0 + (lane / 16) * 8, r);
#else
  const int g = lane / 4, c2 = (lane % 4) * 2;
#pragma unroll
  for (int m = 0; m < 4; ++m)
    *reinterpret_cast<unsigned*>(tile + (row0 + g + (m % 2) * 8) * PITCH + col0 + (m / 2) * 8 + c2) = r[m];
#endif
}

// The diagonal of a 16 x 16 accumulator tile (two 8-column tiles), where each lane needs it: its rows g and g + 8.
// Element (row, row) sits in lane 4 (row % 8) + (row % 8) / 2. D = rowsum(dO * O) is the diagonal of dO O^T.
__device__ __forceinline__ void diagonal_to_rows(const float (&tile)[2][4], float (&diagonal)[2], int lane) {
  const int g = lane / 4, holder = 4 * g + g / 2;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float mine = g % 2 ? tile[r][2 * r + 1] : tile[r][2 * r];  // (row g + 8r, column g) where this lane holds it
    diagonal[r] = __shfl_sync(0xffffffff, mine, holder);
  }
}

// Write a 16 x DP accumulator (rows row0.., times scale) through a row stride; rows >= N and columns >= D skipped.
template <typename T, int N, int D, int DP>
__device__ __forceinline__ void store_rows(const float (&acc)[DP / 8][4], T* dst, int row_stride, int row0,
                                           float scale, int lane) {
  const int g = lane / 4, c2 = (lane % 4) * 2;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    if (row >= N) continue;
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
      const int col = j * 8 + c2;
      if (col < D)
        *reinterpret_cast<unsigned*>(dst + row * row_stride + col) =
            pack2<T>(acc[j][2 * r] * scale, acc[j][2 * r + 1] * scale);
    }
  }
}

// dV = P^T dO and dK = scale * dS^T Q of one window whose P and dS ([NP][PPITCH]) and dO and Q ([NP][PITCH]) are staged
// whole in shared memory, by NP / 16 warps. Warps [0, PAIRS) take 32 keys of dV and warps [PAIRS, 2 PAIRS) 32 keys of
// dK, so that two m tiles share each fragment of dO or Q; with an odd number of key tiles the last warp takes its 16
// keys of both. On an H100, bf16: 4-5% faster at window 12 (bwd_mma_large.cu.j2) than 16 keys of both a warp, and
// 1-2% slower at window 8, where bwd_mma.cu.j2 runs three blocks a multiprocessor and keeps the 16 keys.
template <typename T, int N, int D, int DP, int PITCH, int NP, int PPITCH>
__device__ __forceinline__ void key_gradients_from_staged(const T* sP, const T* sdS, const T* sdO, const T* sQ,
                                                          T* dv_item, T* dk_item, int g_sn, float scale, int warp,
                                                          int lane) {
  constexpr int PAIRS = NP / 32;
  float acc0[DP / 8][4], acc1[DP / 8][4];
  if (warp < 2 * PAIRS) {
    const bool is_dv = warp < PAIRS;
    const int key0 = 32 * (is_dv ? warp : warp - PAIRS);
    const T* x = is_dv ? sP : sdS;
    const T* rows = is_dv ? sdO : sQ;
    transposed_times_rows_x2<T, DP, PITCH, NP, PPITCH, true>(acc0, acc1, x, rows, key0, x, rows, key0 + 16, lane);
    T* grad = is_dv ? dv_item : dk_item;
    store_rows<T, N, D, DP>(acc0, grad, g_sn, key0, is_dv ? 1.f : scale, lane);
    store_rows<T, N, D, DP>(acc1, grad, g_sn, key0 + 16, is_dv ? 1.f : scale, lane);
  } else {
    const int key0 = 16 * warp;
    transposed_times_rows_x2<T, DP, PITCH, NP, PPITCH, false>(acc0, acc1, sP, sdO, key0, sdS, sQ, key0, lane);
    store_rows<T, N, D, DP>(acc0, dv_item, g_sn, key0, 1.f, lane);
    store_rows<T, N, D, DP>(acc1, dk_item, g_sn, key0, scale, lane);
  }
}

// Where float4 `slot` of a tile of COLS columns in accumulator order [16-row group][8-column group][lane] starts, as
// (row, column): a lane's four values are there, one column right (odd ones), and eight rows down (the last two).
template <int COLS>
__device__ __forceinline__ int2 accumulator_slot_origin(int slot) {
  const int lane = slot % 32, j = (slot / 32) % (COLS / 8), group = slot / (32 * (COLS / 8));
  return make_int2(group * 16 + lane / 4, j * 8 + (lane % 4) * 2);
}

// (bias + mask) * unit of a ROWS x COLS block of scores (query rows from row_first, key columns from col_first) into
// `add` in accumulator order, float4 a lane, so that a warp reads its part without bank conflicts. -inf on keys past
// N; queries past N get 0 (their log-sum-exp of +inf zeroes P). With unit = 1 / scale the term is in the units of
// q k^T, so that it can start the score accumulators (fragments_times_cols_from).
template <int ROWS, int COLS, int N, int THREADS, bool HAS_BIAS, bool HAS_MASK>
__device__ __forceinline__ void fill_logit_add(float* add, const float* bias_h, const float* mask_w, int row_first,
                                               int col_first, float unit) {
  // The loads of up to 16 slots (64 floats) a thread in flight at once: load_all_then_store.
  constexpr int LOADS = (HAS_BIAS ? 1 : 0) + (HAS_MASK ? 1 : 0), SLOTS = ROWS * COLS / 4;
  load_all_then_store<SLOTS, THREADS, LOADS == 0 ? SLOTS : 64 / (4 * LOADS)>(
      [&](int slot) {  // bias + mask at the slot's four scores
        const int2 origin = accumulator_slot_origin<COLS>(slot);
        float sum[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int query = row_first + origin.x + (e >= 2 ? 8 : 0), key = col_first + origin.y + (e & 1);
          sum[e] = 0.f;
          if (query < N && key < N) {
            if (HAS_BIAS) sum[e] += __ldg(bias_h + query * N + key);
            if (HAS_MASK) sum[e] += __ldg(mask_w + query * N + key);
          }
        }
        return make_float4(sum[0], sum[1], sum[2], sum[3]);
      },
      [&](int slot, float4 sum) {
        const int key = col_first + accumulator_slot_origin<COLS>(slot).y;
        const bool in0 = key < N, in1 = key + 1 < N;
        reinterpret_cast<float4*>(add)[slot] =
            make_float4(in0 ? sum.x * unit : -INFINITY, in1 ? sum.y * unit : -INFINITY,
                        in0 ? sum.z * unit : -INFINITY, in1 ? sum.w * unit : -INFINITY);
      });
}

// fill_logit_add's result for a whole window (ROWS = COLS = NP), through shared memory: the bias, then the mask, is
// copied whole by cp.async into `staging` (NP x NP floats), every copy of the block in flight at once, and rearranged
// into accumulator order there. fill_logit_add keeps at most 64 loads a thread in flight, so a block filling NP x NP
// floats waits for many L2 round trips in turn; this waits for about one a pass. Waits for every cp.async group of
// the thread (commit other loads first and they land too) and ends with `add` written by this thread only: the
// caller's next barrier makes it whole and frees `staging`.
template <int NP, int N, int THREADS, bool HAS_BIAS, bool HAS_MASK>
__device__ __forceinline__ void fill_logit_add_staged(float* add, float* staging, const float* bias_h,
                                                      const float* mask_w, float unit) {
  constexpr int PASSES = (HAS_BIAS ? 1 : 0) + (HAS_MASK ? 1 : 0);
  if constexpr (PASSES == 0) {
    // zeros and -inf: nothing to load
    fill_logit_add<NP, NP, N, THREADS, false, false>(add, bias_h, mask_w, 0, 0, unit);
  } else {
#pragma unroll
    for (int pass = 0; pass < PASSES; ++pass) {
      // The copies as a loop, not unrolled like load_float_tile_async: in a kernel near its register limit, hundreds
      // of unrolled copy addresses made ptxas spill more in the main loop.
      const float* matrix = HAS_BIAS && pass == 0 ? bias_h : mask_w;
      constexpr int VEC = N % 4 == 0 ? 4 : 1, PER_ROW = NP / VEC;
#pragma unroll 1
      for (int c = threadIdx.x; c < NP * PER_ROW; c += THREADS) {
        const int row = c / PER_ROW, col = (c % PER_ROW) * VEC;
        const bool in = row < N && col < N;
        const float* src = in ? matrix + row * N + col : matrix;
        if constexpr (VEC == 4)
          cp_async16(staging + row * NP + col, src, in ? 16 : 0);
        else
          cp_async4(staging + row * NP + col, src, in ? 4 : 0);
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();  // the whole matrix is in `staging` (zeros past N)
      // A float4 of `add` a step (rows r and r + 8, keys c and c + 1: two float2 of `staging`), not a float: a
      // quarter of the index arithmetic, which took most of the fill's time.
      const bool last = pass == PASSES - 1;
      float4* add4 = reinterpret_cast<float4*>(add);
#pragma unroll 2
      for (int slot = threadIdx.x; slot < NP * NP / 4; slot += THREADS) {
        const int2 origin = accumulator_slot_origin<NP>(slot);
        const float2 top = *reinterpret_cast<const float2*>(staging + origin.x * NP + origin.y);
        const float2 bottom = *reinterpret_cast<const float2*>(staging + (origin.x + 8) * NP + origin.y);
        float4 a = make_float4(top.x, top.y, bottom.x, bottom.y);
        if (pass > 0) {
          const float4 before = add4[slot];
          a.x += before.x, a.y += before.y, a.z += before.z, a.w += before.w;
        }
        if (last) {
          const bool in0 = origin.y < N, in1 = origin.y + 1 < N;
          a = make_float4(in0 ? a.x * unit : -INFINITY, in1 ? a.y * unit : -INFINITY, in0 ? a.z * unit : -INFINITY,
                          in1 ? a.w * unit : -INFINITY);
        }
        add4[slot] = a;
      }
      if (!last) __syncthreads();  // `staging` is read whole before the mask overwrites it
    }
  }
}

// The windows of one block of the large-window backward with a mask (bwd_mma_large.cu.j2): a contiguous share of its
// head's windows in the order (mask window, image), so that every block holds the same number of windows, give or
// take one (whole (head, mask window) pairs a block left a second wave at Swin's window 12: 64 windows on some
// multiprocessors against 62 on average), and its term is filled anew only where the mask window changes. The share
// starts at the first mask window that starts in it and wraps around to the part before: its first window is then
// image 0 (or the share's first), and at each step the blocks of a launch are at nearly the same image, so that they
// read and write nearby memory, as blocks walking every splits-th window do (shares walked in order made the
// backward 6-12% slower at windows of 49 and 64 tokens, H100).
struct MaskWindowShare {
  int start, end, steps, images, mask_windows;  // positions [end - steps, end) of the order, walked from start
  __device__ MaskWindowShare(int split, int splits, int windows, int mask_windows_)
      : mask_windows(mask_windows_) {
    const int first = (int)((long long)windows * split / splits);
    end = (int)((long long)windows * (split + 1) / splits);
    steps = end - first;
    images = windows / mask_windows;
    const int to_next_mask_window = (images - first % images) % images;
    start = first + (to_next_mask_window < steps ? to_next_mask_window : 0);
  }
  __device__ int position(int step) const {
    const int at = start + step;
    return at < end ? at : at - steps;
  }
  __device__ int mask_window(int step) const { return position(step) / images; }
  __device__ int window(int step) const {  // an int, as the kernel's `windows` is
    const int at = position(step);
    return at % images * mask_windows + at / images;
  }
};

}  // namespace fwagen
