// Device helpers shared by the fwagen kernel templates. Plain CUDA: no template variables in here.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define FWAGEN_LOG2E 1.4426950408889634f
#define FWAGEN_LOG2E_DOUBLE 1.4426950408889634
#define FWAGEN_LN2 0.6931471805599453f
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
// The running row maximum of an online softmax before any key: the lowest finite float, not -inf, so that a
// row whose first keys are all masked with -inf computes exp2(-inf - this) = 0 and a rescale of exp2(0) = 1
// instead of exp2(-inf + inf) = NaN; the first finite logit then rescales by exp2(-huge) = 0.
#define FWAGEN_NO_MAX_YET (-3.402823466e+38f)

namespace fwagen {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats -> one 32-bit register of two 16-bit values (low half = first), as mma operands expect.
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// 2^x on the special-function unit (ex2.approx.ftz: relative error ~2^-22, exp2(-inf) = 0); exp2f's
// library path adds range handling we never need, since x <= 0 after the max subtraction.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; src_bytes = 0 fills the destination with zeros
// (used for padded rows and columns, so that padding never carries garbage into the mma).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
// 4-byte asynchronous copy (through L1: cp.async.cg takes 16 bytes only), zero-filled like cp_async16.
__device__ __forceinline__ void cp_async4(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

#if __CUDA_ARCH__ >= 900
// Four 8 x 8 tiles of 16-bit pairs from registers in mma fragment layout (lane: row lane / 4, columns 2 (lane % 4) and
// the next) into shared memory; lanes 8m to 8m + 7 give the row addresses of tile m. sm_90 and later only
// (store_pairs_16x16 stores 4 bytes at a time before).
__device__ __forceinline__ void stmatrix_x4(void* smem_row, const unsigned (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr(smem_row)),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]));
}
#endif

// d = a b + c, m16n8k16, fp32 accumulators; c kept: products that start from a term (the backward's bias and mask)
// take it without a copy.
template <typename T>
__device__ __forceinline__ void mma16816_from(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1,
                                              const float (&c)[4]);
template <>
__device__ __forceinline__ void mma16816_from<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1,
                                                      const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
template <>
__device__ __forceinline__ void mma16816_from<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                             unsigned b1, const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// d = a b + d.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  mma16816_from<T>(d, a, b0, b1, d);
}

// This thread's share of SLOTS items (threadIdx.x, + THREADS, ...): value = load(slot), then store(slot, value), in
// batches of at most MAX_BATCH slots whose loads are all issued before the first store, so that a batch waits for
// one memory round trip (a loop loading and storing slot after slot waits for one every slot, or every unrolling).
// A batch's values stay in registers: MAX_BATCH bounds them. load runs, unused, on slot 0 in place of a slot past
// SLOTS.
template <int SLOTS, int THREADS, int MAX_BATCH, typename Load, typename Store>
__device__ __forceinline__ void load_all_then_store(Load load, Store store) {
  constexpr int PER_THREAD = (SLOTS + THREADS - 1) / THREADS;
  constexpr int BATCHES = (PER_THREAD + MAX_BATCH - 1) / MAX_BATCH, BATCH = (PER_THREAD + BATCHES - 1) / BATCHES;
#pragma unroll 1
  for (int first = 0; first < PER_THREAD; first += BATCH) {
    decltype(load(0)) values[BATCH];
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
      const int slot = threadIdx.x + (first + i) * THREADS;
      values[i] = load(slot < SLOTS ? slot : 0);
    }
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
      const int slot = threadIdx.x + (first + i) * THREADS;
      if (slot < SLOTS) store(slot, values[i]);
    }
  }
}

// Copy ROWS rows of COLS (a multiple of 16 bytes' worth) elements into shared memory with row pitch PITCH,
// 16 bytes per thread per step, fully unrolled so that the chunk -> (row, column) split is compile-time
// arithmetic. Rows at or past `valid_rows` and columns at or past `valid_cols` are zero-filled. `row_stride`
// is in elements; a window's rows span less than 2^31 elements (checked by the launcher).
template <typename T, int ROWS, int COLS, int PITCH, int THREADS>
__device__ __forceinline__ void load_tile_async(T* smem, const T* base, int row_stride, int first_row,
                                                int valid_rows, int valid_cols, bool valid_item) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int PER_ROW = COLS / VEC;
  constexpr int CHUNKS = ROWS * PER_ROW;
  constexpr int ITERS = (CHUNKS + THREADS - 1) / THREADS;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const unsigned c = threadIdx.x + i * THREADS;
    if (CHUNKS % THREADS != 0 && c >= CHUNKS) break;
    const int r = c / PER_ROW, col = (c % PER_ROW) * VEC;
    const int row = first_row + r;
    const bool in = valid_item && row < valid_rows && col < valid_cols;
    cp_async16(smem + r * PITCH + col, in ? base + (row * row_stride + col) : base, in ? 16 : 0);
  }
}

// The same tile copy in two halves, for a tile whose shared-memory rows are still in use when its load should start:
// fetch_tile_to_registers issues the global loads (16 bytes a thread per step, zeros where load_tile_async
// zero-fills), store_tile_from_registers writes them to shared memory once the rows are free.
template <typename T, int ROWS, int COLS, int THREADS>
struct TileInRegisters {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int PER_ROW = COLS / VEC;
  static constexpr int CHUNKS = ROWS * PER_ROW;
  static constexpr int ITERS = (CHUNKS + THREADS - 1) / THREADS;
  uint4 chunk[ITERS];
};

template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void fetch_tile_to_registers(TileInRegisters<T, ROWS, COLS, THREADS>& tile, const T* base,
                                                        int row_stride, int valid_rows, int valid_cols) {
  using Tile = TileInRegisters<T, ROWS, COLS, THREADS>;
#pragma unroll
  for (int i = 0; i < Tile::ITERS; ++i) {
    const unsigned c = threadIdx.x + i * THREADS;
    const int r = c / Tile::PER_ROW, col = (c % Tile::PER_ROW) * Tile::VEC;
    const bool in = (Tile::CHUNKS % THREADS == 0 || c < Tile::CHUNKS) && r < valid_rows && col < valid_cols;
    tile.chunk[i] = in ? __ldg(reinterpret_cast<const uint4*>(base + r * row_stride + col)) : make_uint4(0, 0, 0, 0);
  }
}

template <int PITCH, typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void store_tile_from_registers(T* smem, const TileInRegisters<T, ROWS, COLS, THREADS>& tile) {
  using Tile = TileInRegisters<T, ROWS, COLS, THREADS>;
#pragma unroll
  for (int i = 0; i < Tile::ITERS; ++i) {
    const unsigned c = threadIdx.x + i * THREADS;
    if (Tile::CHUNKS % THREADS != 0 && c >= Tile::CHUNKS) break;
    *reinterpret_cast<uint4*>(smem + (c / Tile::PER_ROW) * PITCH + (c % Tile::PER_ROW) * Tile::VEC) = tile.chunk[i];
  }
}

// Copy a ROWS x COLS block of a row-major float matrix with MATRIX_COLS columns (rows from first_row, columns from
// first_col) into shared memory with row pitch SPITCH floats. Elements at or past `valid` in either direction are
// zero-filled. 16-byte copies where every row starts 16-byte aligned (MATRIX_COLS % 4 == 0), else 4-byte ones.
template <int ROWS, int COLS, int SPITCH, int MATRIX_COLS, int THREADS>
__device__ __forceinline__ void load_float_tile_async(float* smem, const float* matrix, int first_row, int first_col,
                                                      int valid) {
  constexpr int VEC = MATRIX_COLS % 4 == 0 ? 4 : 1;
  constexpr int PER_ROW = COLS / VEC;
  constexpr int CHUNKS = ROWS * PER_ROW;
  constexpr int ITERS = (CHUNKS + THREADS - 1) / THREADS;
  static_assert(COLS % VEC == 0 && SPITCH % 4 == 0, "16-byte aligned shared rows");
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const unsigned c = threadIdx.x + i * THREADS;
    if (CHUNKS % THREADS != 0 && c >= CHUNKS) break;
    const int r = c / PER_ROW, col = (c % PER_ROW) * VEC;
    const int row = first_row + r, matrix_col = first_col + col;
    const bool in = row < valid && matrix_col < valid;
    const float* src = in ? matrix + (long long)row * MATRIX_COLS + matrix_col : matrix;
    if constexpr (VEC == 4)
      cp_async16(smem + r * SPITCH + col, src, in ? 16 : 0);
    else
      cp_async4(smem + r * SPITCH + col, src, in ? 4 : 0);
  }
}

// Copy COUNT consecutive floats (src[0..COUNT), those at or past `valid` zero-filled) into shared memory.
template <int COUNT, int THREADS>
__device__ __forceinline__ void load_floats_async(float* smem, const float* src, int valid) {
  constexpr int ITERS = (COUNT + THREADS - 1) / THREADS;  // unrolled: no loop bounds to compute at run time
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int i = threadIdx.x + it * THREADS;
    if (COUNT % THREADS != 0 && i >= COUNT) break;
    cp_async4(smem + i, i < valid ? src + i : src, i < valid ? 4 : 0);
  }
}

}  // namespace fwagen
