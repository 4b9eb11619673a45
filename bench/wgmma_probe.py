"""Warpgroup MMA (wgmma) on head-dim-32 attention tiles, against mma.sync: the evidence for a wgmma kernel's design.

Usage: python3 bench/wgmma_probe.py   (an H100 or H200; CuPy compiles the probes for sm_90a)

Not part of the package (fwagen's kernels use mma.sync). It checks that the shared-memory layouts and descriptors
below give correct products, then times the tile loop of an attention kernel both ways, with and without an online
softmax, with what fwagen's tiled kernels add to each tile (float32 bias and mask terms, block barriers), and with
some of the exponentials computed on the FMA pipe. The products, A always from registers in mma.sync's fragment layout (`ldmatrix` of a [row][d] tile):
- S = Q K^T, 64 x 64, k = 32: B is K as a kernel stores it, [key][d], "K-major";
- O = P V, 64 x 32, k = 64: B is V as stored, [key][d], "MN-major", transposed by the instruction (imm-trans-b = 1).
Layouts of a [64][32] bf16 tile (rows of 64 bytes), with the descriptor's leading and stride byte offsets (LBO, SBO):
- 0: 64-byte swizzle (16-byte chunk c of row r at c ^ (r / 2) % 4), SBO 512 (eight rows); LBO unused at 32 columns;
- 1: no swizzle, 8 x 16-byte core matrices, core (r / 8, c) at (r / 8) * 512 + c * 128;
- 2: no swizzle, core (r / 8, c) at (r / 8) * 128 + c * 1024.
For both products and both unswizzled layouts LBO is the stride between core matrices along k and SBO along m or n
(for O = P V, k runs over V's rows). Results: bench/results/nvidia-h100-80gb-hbm3-wgmma-probe.md.
"""
from __future__ import annotations

import cupy as cp
import torch

from fwagen.render import environment, template_dir
from fwagen.timing import interleaved, matmul_tflops

# (layout, LBO, SBO, swizzle mode of the descriptor: 2 = 64 bytes, 0 = none) that give correct products.
S_LAYOUTS = [(0, 16, 512, 2), (1, 128, 512, 0), (2, 1024, 128, 0)]
O_LAYOUTS = [(0, 16, 512, 2), (1, 512, 128, 0), (2, 128, 1024, 0)]
REPS = 4096  # tile iterations a warpgroup in the timing loops


def wgmma_function(name: str, n: int, transpose_b: int) -> str:
    """A device function issuing wgmma m64n{n}k16, f32 += bf16 x bf16, A from registers, B by descriptor: the macro
    fwagen's templates use (templates/wgmma.j2)."""
    macro = environment().from_string('{% from "wgmma.j2" import wgmma_rs %}{{ wgmma_rs(name, n, "bf16", trans) }}')
    return macro.render(name=name, n=n, trans=transpose_b)


SOURCE = r"""
#include "wgmma.cuh"  // fwagen's descriptors, fences and waits, and its ldmatrix, mma.sync, packing and exponential
using namespace fwagen;
typedef __nv_bfloat16 T;
__device__ __forceinline__ unsigned long long make_desc(const void* p, int lbo, int sbo, int swizzle) {
  return matrix_descriptor(p, lbo, sbo, swizzle);
}
// A flat accumulator array as the [n / 8][4] quads the wgmma functions take.
template <int J> __device__ __forceinline__ float (&as_quads(float* c))[J][4] {
  return *reinterpret_cast<float(*)[J][4]>(c);
}
WGMMA_FUNCTIONS
// The j-th group of four accumulators (one m16n8 tile) of a flat array, as mma16816 takes it.
__device__ __forceinline__ float (&quad(float* c, int j))[4] { return *reinterpret_cast<float(*)[4]>(c + 4 * j); }
// Byte offset of 16-byte chunk c (0-3) of row r of a [rows][32] bf16 tile in layout 0, 1 or 2 (see the docstring).
__device__ __forceinline__ int tile_offset(int layout, int r, int c, int rows) {
  if (layout == 0) return r * 64 + ((c ^ ((r >> 1) & 3)) * 16);
  if (layout == 1) return (r / 8) * 512 + c * 128 + (r % 8) * 16;
  return (r / 8) * 128 + c * (rows / 8) * 128 + (r % 8) * 16;
}
// Byte step of the descriptor's address for 16 more columns (S: chunks 2kk, 2kk + 1) or 16 more rows (O: V's keys).
__device__ __forceinline__ int k_step_s(int layout) { return layout == 0 ? 32 : (layout == 1 ? 256 : 2048); }
__device__ __forceinline__ int k_step_o(int layout) { return layout == 0 ? 1024 : (layout == 1 ? 1024 : 256); }
// Rows [64][32] of `src` into a padded [64][PITCH] tile (for ldmatrix) or `layout`.
template <int COLS, int PITCH>
__device__ __forceinline__ void load_padded(T* dst, const T* src) {
  for (int i = threadIdx.x; i < 64 * COLS / 8; i += blockDim.x)
    *reinterpret_cast<uint4*>(dst + (i / (COLS / 8)) * PITCH + (i % (COLS / 8)) * 8) =
        reinterpret_cast<const uint4*>(src)[i];
}
__device__ __forceinline__ void load_laid_out(unsigned char* dst, const T* src, int layout) {
  for (int i = threadIdx.x; i < 64 * 4; i += blockDim.x)
    *reinterpret_cast<uint4*>(dst + tile_offset(layout, i / 4, i % 4, 64)) = reinterpret_cast<const uint4*>(src)[i];
}
// Accumulator layout (per warp as mma.sync's C): c[4j + e] is row 16 warp + lane / 4 (+ 8 for e >= 2), column
// 8j + 2 (lane % 4) + e % 2.
template <int COLS>
__device__ __forceinline__ void store_accumulators(float* out, const float* c) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j = 0; j < COLS / 8; ++j)
    for (int e = 0; e < 4; ++e)
      out[(warp * 16 + lane / 4 + (e >= 2 ? 8 : 0)) * COLS + j * 8 + (lane % 4) * 2 + (e & 1)] = c[4 * j + e];
}

// One product checked: S = Q K^T (a: Q, 64 x 32; b: K, K-major; 64 x 64 out) or O = P V (a: P, 64 x 64; b: V,
// MN-major; 64 x 32 out).
template <bool S>
__device__ void check_product(const T* a_src, const T* b_src, float* out, int layout, int lbo, int sbo, int swizzle) {
  constexpr int A_COLS = S ? 32 : 64, PITCH = A_COLS + 8, OUT_COLS = S ? 64 : 32;
  __shared__ __align__(1024) unsigned char sb[32768];  // 4 KB used: a wrong stride still reads in bounds
  __shared__ __align__(128) T sa[64 * PITCH];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_laid_out(sb, b_src, layout);
  load_padded<A_COLS, PITCH>(sa, a_src);
  async_proxy_fence();
  __syncthreads();
  unsigned a[A_COLS / 16][4];
  for (int kk = 0; kk < A_COLS / 16; ++kk)
    ldmatrix_x4(a[kk], sa + (warp * 16 + lane % 16) * PITCH + kk * 16 + (lane / 16) * 8);
  float c[OUT_COLS / 2];
  wgmma_fence();
  for (int kk = 0; kk < A_COLS / 16; ++kk) {
    if constexpr (S)
      mma_s(as_quads<OUT_COLS / 8>(c), a[kk], make_desc(sb + kk * k_step_s(layout), lbo, sbo, swizzle), kk);
    else
      mma_o(as_quads<OUT_COLS / 8>(c), a[kk], make_desc(sb + kk * k_step_o(layout), lbo, sbo, swizzle), kk);
  }
  wgmma_commit();
  wgmma_wait<0>();
  store_accumulators<OUT_COLS>(out, c);
}

#define CHECK(name, s) \
  extern "C" __global__ void __launch_bounds__(128) name(const T* a, const T* b, float* out, int layout, int lbo, \
                                                         int sbo, int swizzle) \
  { check_product<s>(a, b, out, layout, lbo, sbo, swizzle); }
CHECK(check_s, true)
CHECK(check_o, false)

// The online softmax of the 16 rows x 64 keys a thread's warp holds (32 scores a thread, rows g and g + 8), P packed
// as the A fragments of P V, O's rows rescaled: what an attention kernel does between its two products.
// 2^x for x <= 0 on the FMA and integer pipes, not the MUFU: x = i + f, i by the round-to-nearest magic constant,
// 2^f (|f| <= 1/2) by a degree-4 polynomial (relative error ~4e-6, below bf16's and fp16's rounding of P).
__device__ __forceinline__ float exp2_poly(float x) {
  x = fmaxf(x, -125.f);
  const float j = x + 12582912.f;  // 1.5 * 2^23: rounds x to an integer in j's low mantissa bits
  const float f = x - (j - 12582912.f);
  float p = fmaf(f, 1.3333558e-3f, 9.6181291e-3f);
  p = fmaf(f, p, 5.5504109e-2f);
  p = fmaf(f, p, 2.4022651e-1f);
  p = fmaf(f, p, 6.9314718e-1f);
  p = fmaf(f, p, 1.f);
  return __int_as_float(__float_as_int(p) + ((__float_as_int(j) - 0x4B400000) << 23));
}
template <int POLY>  // of a row's 16 exponentials a thread takes, how many exp2_poly computes
__device__ __forceinline__ void softmax_step(float (&c)[32], float (&o)[16], float (&m)[2], float (&l)[2],
                                             unsigned (&pa)[4][4]) {
  const float scale_log2 = 0.25f;
  for (int r = 0; r < 2; ++r) {
    float mx = m[r];
    for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(c[4 * j + 2 * r], c[4 * j + 2 * r + 1]) * scale_log2);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float alpha = fast_exp2(m[r] - mx);
    float sum = 0.f;
    for (int j = 0; j < 8; ++j)
      for (int e = 0; e < 2; ++e) {
        const float x = fmaf(c[4 * j + 2 * r + e], scale_log2, -mx);
        const float p = 2 * j + e < POLY ? exp2_poly(x) : fast_exp2(x);
        c[4 * j + 2 * r + e] = p;
        sum += p;
      }
    l[r] = l[r] * alpha + sum;
    m[r] = mx;
    for (int i = 0; i < 16; ++i)
      if ((i / 2) % 2 == r) o[i] *= alpha;
  }
  for (int kk = 0; kk < 4; ++kk)
    for (int x = 0; x < 4; ++x) pa[kk][x] = pack2<T>(c[8 * kk + 2 * x], c[8 * kk + 2 * x + 1]);
}

// P (as P V's A fragments) from S: its online softmax, or S scaled and packed (the products alone).
template <bool SOFTMAX, int POLY>
__device__ __forceinline__ void p_from_s(float (&c)[32], float (&o)[16], float (&m)[2], float (&l)[2],
                                         unsigned (&pa)[4][4]) {
  if (SOFTMAX) {
    softmax_step<POLY>(c, o, m, l, pa);
  } else {
    for (int kk = 0; kk < 4; ++kk)
      for (int x = 0; x < 4; ++x) pa[kk][x] = pack2<T>(c[8 * kk + 2 * x] * 1e-3f, c[8 * kk + 2 * x + 1] * 1e-3f);
  }
}

// Each block (one warpgroup) repeats S = Q K^T and O += P V on tiles resident in shared memory (layout 0); P is S
// scaled and packed (SOFTMAX = false) or its online softmax (true).
template <bool SOFTMAX, int POLY = 0>
__device__ void loop_wgmma(const T* q, const T* k, const T* v, float* out, int reps) {
  __shared__ __align__(1024) unsigned char sk[64 * 64];
  __shared__ __align__(1024) unsigned char sv[64 * 64];
  __shared__ __align__(128) T sq[64 * 40];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_laid_out(sk, k, 0);
  load_laid_out(sv, v, 0);
  load_padded<32, 40>(sq, q);
  async_proxy_fence();
  __syncthreads();
  unsigned a[2][4];
  for (int kk = 0; kk < 2; ++kk) ldmatrix_x4(a[kk], sq + (warp * 16 + lane % 16) * 40 + kk * 16 + (lane / 16) * 8);
  float o[16] = {}, m[2] = {-1e30f, -1e30f}, l[2] = {};
  for (int r = 0; r < reps; ++r) {
    float c[32];
    wgmma_fence();
    for (int kk = 0; kk < 2; ++kk) mma_s(as_quads<8>(c), a[kk], make_desc(sk + kk * 32, 16, 512, 2), kk);
    wgmma_commit();
    wgmma_wait<0>();
    unsigned pa[4][4];
    p_from_s<SOFTMAX, POLY>(c, o, m, l, pa);
    wgmma_fence();
    for (int kk = 0; kk < 4; ++kk) mma_o(as_quads<4>(o), pa[kk], make_desc(sv + kk * 1024, 16, 512, 2), 1);
    wgmma_commit();
    if (SOFTMAX) wgmma_wait<0>();  // the next softmax rescales o
  }
  wgmma_wait<0>();
  float sum = l[0] + l[1];
  for (int i = 0; i < 16; ++i) sum += o[i];
  out[blockIdx.x * 128 + threadIdx.x] = sum;
}

// The same with mma.sync: each warp its 16 rows, B fragments by ldmatrix from padded tiles. ADDS float32 terms
// (fwagen's streamed bias and mask tiles, [64][72]; here both read from one tile, 48 KB of static shared memory
// holding no more) start the scores, read from shared memory at every tile, and SYNCS barriers a tile stand for a
// kernel's two a step (its tiles loaded, then free): what each costs in steady state.
template <bool SOFTMAX, int ADDS = 0, int SYNCS = 0, int POLY = 0>
__device__ void loop_mma(const T* q, const T* k, const T* v, float* out, int reps) {
  __shared__ __align__(128) T sk[64 * 40];
  __shared__ __align__(128) T sv[64 * 40];
  __shared__ __align__(128) T sq[64 * 40];
  __shared__ __align__(16) float sadd[64 * 72];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_padded<32, 40>(sk, k);
  load_padded<32, 40>(sv, v);
  load_padded<32, 40>(sq, q);
  for (int i = threadIdx.x; i < 64 * 72; i += blockDim.x) sadd[i] = 0.01f * (i % 7);
  __syncthreads();
  unsigned a[2][4];
  for (int kk = 0; kk < 2; ++kk) ldmatrix_x4(a[kk], sq + (warp * 16 + lane % 16) * 40 + kk * 16 + (lane / 16) * 8);
  float o[16] = {}, m[2] = {-1e30f, -1e30f}, l[2] = {};
  for (int r = 0; r < reps; ++r) {
    if (SYNCS > 0) __syncthreads();
    asm volatile("" ::: "memory");  // the terms are read at every tile, as a kernel's new tiles would be
    float c[32] = {};
#pragma unroll
    for (int j = 0; j < 8 * (ADDS > 0); ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int at = (warp * 16 + lane / 4 + 8 * half) * 72 + j * 8 + (lane % 4) * 2;
        float2 x = *reinterpret_cast<const float2*>(&sadd[at]);
        if (ADDS > 1) {
          const float2 y = *reinterpret_cast<const float2*>(&sadd[at ^ 8]);
          x.x += y.x, x.y += y.y;
        }
        c[4 * j + 2 * half] = x.x, c[4 * j + 2 * half + 1] = x.y;
      }
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        unsigned b[4];
        ldmatrix_x4(b, sk + (jj * 16 + (lane / 16) * 8 + lane % 8) * 40 + kk * 16 + ((lane / 8) % 2) * 8);
        mma16816<T>(quad(c, 2 * jj), a[kk], b[0], b[1]);
        mma16816<T>(quad(c, 2 * jj + 1), a[kk], b[2], b[3]);
      }
    unsigned pa[4][4];
    p_from_s<SOFTMAX, POLY>(c, o, m, l, pa);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        unsigned b[4];
        ldmatrix_x4_trans(b, sv + (kk * 16 + lane % 16) * 40 + jj * 16 + (lane / 16) * 8);
        mma16816<T>(quad(o, 2 * jj), pa[kk], b[0], b[1]);
        mma16816<T>(quad(o, 2 * jj + 1), pa[kk], b[2], b[3]);
      }
    if (SYNCS > 1) __syncthreads();
  }
  float sum = l[0] + l[1];
  for (int i = 0; i < 16; ++i) sum += o[i];
  out[blockIdx.x * 128 + threadIdx.x] = sum;
}

#define LOOP(name, body) \
  extern "C" __global__ void __launch_bounds__(128) name(const T* q, const T* k, const T* v, float* out, int reps) \
  { body(q, k, v, out, reps); }
LOOP(wgmma_products, loop_wgmma<false>)
LOOP(wgmma_softmax, loop_wgmma<true>)
LOOP(mma_products, loop_mma<false>)
LOOP(mma_softmax, loop_mma<true>)
LOOP(mma_softmax_bias, (loop_mma<true, 1>))
LOOP(mma_softmax_bias_mask, (loop_mma<true, 2>))
LOOP(mma_softmax_bias_mask_2_syncs, (loop_mma<true, 2, 2>))
LOOP(wgmma_softmax_poly_quarter, (loop_wgmma<true, 4>))
LOOP(wgmma_softmax_poly_half, (loop_wgmma<true, 8>))
LOOP(mma_softmax_poly_quarter, (loop_mma<true, 0, 0, 4>))
LOOP(mma_softmax_poly_half, (loop_mma<true, 0, 0, 8>))
"""


def module() -> cp.RawModule:
    functions = wgmma_function("mma_s", 64, 0) + wgmma_function("mma_o", 32, 1)
    options = ("-arch=sm_90a", "-std=c++17", f"-I{template_dir()}")
    return cp.RawModule(code=SOURCE.replace("WGMMA_FUNCTIONS", functions), options=options, backend="nvrtc")


def pointer(t: torch.Tensor) -> cp.uint64:
    return cp.uint64(t.data_ptr())


def check_layouts(mod: cp.RawModule, q, k, p, v) -> None:
    for label, kernel, a, b, layouts, expected in (
            ("S = Q K^T", "check_s", q, k, S_LAYOUTS, q.float() @ k.float().T),
            ("O = P V", "check_o", p, v, O_LAYOUTS, p.float() @ v.float())):
        for layout, lbo, sbo, swizzle in layouts:
            out = torch.full(expected.shape, float("nan"), device="cuda")
            mod.get_function(kernel)((1,), (128,), (pointer(a), pointer(b), pointer(out), cp.int32(layout),
                                                    cp.int32(lbo), cp.int32(sbo), cp.int32(swizzle)))
            error = (out - expected).abs().max().item()
            print(f"{label}: layout {layout}, LBO {lbo}, SBO {sbo}, swizzle {swizzle}: max error {error:.2g}")
            assert error < 1e-3, "a layout the docstring calls correct is not"


def time_loops(mod: cp.RawModule, q, k, v) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(sms * 8 * 128, device="cuda")
    print(f"\nbf16 matmul (torch, 8192^3): {matmul_tflops('bfloat16'):.0f} TFLOP/s")
    print("| loop | warpgroups a multiprocessor | ms | matrix TFLOP/s |\n|---|---:|---:|---:|")
    for loop in ("wgmma_products", "mma_products", "wgmma_softmax", "mma_softmax", "mma_softmax_bias",
                 "mma_softmax_bias_mask", "mma_softmax_bias_mask_2_syncs", "wgmma_softmax_poly_quarter",
                 "wgmma_softmax_poly_half", "mma_softmax_poly_quarter", "mma_softmax_poly_half"):
        function = mod.get_function(loop)
        calls = {per_sm: (lambda blocks=sms * per_sm: function(
            (blocks,), (128,), (pointer(q), pointer(k), pointer(v), pointer(out), cp.int32(REPS))))
            for per_sm in (1, 2, 4, 8)}
        timings = interleaved(calls, rounds=10, warmup=2, flush_l2=False)
        for per_sm, timing in timings.items():
            flops = sms * per_sm * REPS * 2 * (64 * 64 * 32 + 64 * 32 * 64)
            print(f"| {loop} | {per_sm} | {timing.median_ms:.3f} | {flops / timing.median_ms / 1e9:.0f} |")


def main() -> None:
    print(torch.cuda.get_device_name())
    torch.manual_seed(0)
    q, k, v = (torch.randn(64, 32, device="cuda").bfloat16() for _ in range(3))
    p = torch.rand(64, 64, device="cuda").bfloat16()
    mod = module()
    check_layouts(mod, q, k, p, v)
    time_loops(mod, q, k, v)


if __name__ == "__main__":
    main()
