// Warpgroup MMA (wgmma, sm_90a) helpers: matrix descriptors, the fences and waits around the asynchronous products,
// and the copies that fill tiles in the 64-byte swizzled layout the descriptors describe: by the block's threads
// (cp.async) or by TMA (with its mbarriers).
// Plain CUDA: the wgmma instructions themselves, whose operand lists depend on the tile width, come from the macro in
// wgmma.j2. The layouts and descriptor fields were checked on an H100 by bench/wgmma_probe.py
// (bench/results/nvidia-h100-80gb-hbm3-wgmma-probe.md).
#pragma once
#include "common.cuh"

namespace fwagen {

// A [rows][32] 16-bit tile in the 64-byte swizzle: 16-byte chunk c of row r sits at byte
// r * 64 + (c ^ (r / 2) % 4) * 16, the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_64B. The pattern repeats every eight
// rows (512 bytes), so a tile starts 512-byte aligned.
constexpr int SWIZZLE64_ROW_BYTES = 64;
constexpr int SWIZZLE64_ATOM_BYTES = 512;

__device__ __forceinline__ int swizzle64_offset(int row, int chunk) {
  return row * SWIZZLE64_ROW_BYTES + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// Bits 0-13: shared address / 16; 16-29: leading byte offset / 16 (the stride between core matrices along k); 32-45:
// stride byte offset / 16 (between groups of eight rows along m or n); 62-63: swizzle mode (0 none, 2 64 bytes).
__device__ __forceinline__ unsigned long long matrix_descriptor(const void* tile, int lbo, int sbo, int swizzle) {
  unsigned long long d = (smem_addr(tile) & 0x3FFFF) >> 4;
  d |= (unsigned long long)((lbo >> 4) & 0x3FFF) << 16;
  d |= (unsigned long long)((sbo >> 4) & 0x3FFF) << 32;
  return d | (unsigned long long)swizzle << 62;
}

// A tile in the 64-byte swizzle: LBO unused at 32 columns, SBO one swizzle atom.
__device__ __forceinline__ unsigned long long swizzle64_descriptor(const void* tile) {
  return matrix_descriptor(tile, 16, SWIZZLE64_ATOM_BYTES, 2);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}
// Accumulators written by wgmma are read only after its wait: the empty asm ties each register to this point, so that
// the compiler moves no read of them above the wait (which names no registers).
template <int J>
__device__ __forceinline__ void fence_operands(float (&d)[J][4]) {
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

// Shared-memory writes of the generic proxy (stores, cp.async) made visible to wgmma's reads, which go through the
// async proxy; a block barrier follows.
__device__ __forceinline__ void async_proxy_fence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// A CUtensorMap (cuda.h), as the host encodes it (fwagen/launch.py: cuTensorMapEncodeTiled) and passes it by value as a
// __grid_constant__ kernel parameter: the tensor memory accelerator (TMA) reads it from there.
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

// An mbarrier in shared memory that one thread arms with the bytes its TMA copies will bring (arrive_expect_tx) and every
// thread waits on by phase parity: the copies' completion, with no barrier and no fence of the block's own.
__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}
// The inits made visible to the async proxy (TMA's completions); a block barrier follows.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, int parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// One box of a 4-D tensor map (innermost coordinate first) into shared memory, in the map's swizzle, completing on
// `bar`. Coordinates past the tensor's extent read as zeros.
__device__ __forceinline__ void tma_load_4d(void* dst, const TensorMap* map, int c0, int c1, int c2, int c3,
                                            unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
}

// load_tile_async's copy (zero-filled past valid_rows, valid_cols or an invalid item) into a [ROWS][32] tile in the
// 64-byte swizzle.
template <typename T, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_async_swizzle64(T* smem, const T* base, int row_stride, int first_row,
                                                          int valid_rows, int valid_cols, bool valid_item) {
  static_assert(sizeof(T) == 2, "the 64-byte swizzle holds rows of 32 16-bit elements");
  constexpr int VEC = 8, PER_ROW = 4, CHUNKS = ROWS * PER_ROW;
  constexpr int ITERS = (CHUNKS + THREADS - 1) / THREADS;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const unsigned c = threadIdx.x + i * THREADS;
    if (CHUNKS % THREADS != 0 && c >= CHUNKS) break;
    const int r = c / PER_ROW, chunk = c % PER_ROW, col = chunk * VEC;
    const int row = first_row + r;
    const bool in = valid_item && row < valid_rows && col < valid_cols;
    cp_async16(reinterpret_cast<unsigned char*>(smem) + swizzle64_offset(r, chunk),
               in ? base + (row * row_stride + col) : base, in ? 16 : 0);
  }
}


}  // namespace fwagen
