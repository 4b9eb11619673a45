// The arguments of a split backward kernel (dQ blocks, then dK/dV blocks; see bwd_entry.j2) in one struct, so that
// the two block functions take them whole. Plain CUDA.
#pragma once

namespace fwagen {

template <typename T, typename Lse>
struct SplitBackwardArgs {
  const T *q, *k, *v, *o, *dout;
  long long q_sb, q_sh, k_sb, k_sh, v_sb, v_sh, o_sb, o_sh, g_sb, g_sh;  // window and head strides (elements)
  int q_sn, k_sn, v_sn, o_sn, g_sn;                                      // token strides
  const Lse* lse;
  const float *delta, *bias, *mask;  // delta: rowsum(dO * O), for the kernels that take it precomputed
  T *dq, *dk, *dv;
  float* dbias_partial;
  int windows, heads, mask_windows, splits;
  float scale;
};

}  // namespace fwagen
