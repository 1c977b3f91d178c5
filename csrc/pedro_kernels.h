// Launchers for the PEDRO gather-scale kernels: plain C, raw pointers, no torch headers,
// so pedro_kernels.cu compiles with nvcc alone. torch_bindings.cpp wraps them as ops.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

// Element type codes (torch_bindings.cpp maps torch dtypes onto these).
enum PedroDType : int { PEDRO_F32 = 0, PEDRO_F16 = 1, PEDRO_BF16 = 2 };

// extern "C": a signature drift between this header and the .cu is a compile error,
// not a silent overload that fails at link/load time.
extern "C" {

// x[t, c] *= vec[slot[t], col(c)] for slot[t] >= 0, where columns [0, q_size) map to
// q_col + c, [q_size, q_size + kv_size) to k_col + ..., the rest to v_col + ...;
// a range with col < 0 is left alone. scale_ is this with kv_size = 0.
cudaError_t pedro_scale3(void* x, int64_t x_stride, const void* vec, int64_t vec_stride,
                         const void* slot, int slot_is_i64, int64_t slot_stride, int64_t T,
                         int64_t q_size, int64_t kv_size, int64_t q_col, int64_t k_col,
                         int64_t v_col, int dtype, cudaStream_t stream);

// out[t, c] = silu(gate_up[t, c]) * gate_up[t, D + c] * (slot[t] >= 0 ? vec[slot[t], col + c] : 1)
cudaError_t pedro_silu_mul_scaled(void* out, int64_t out_stride, const void* gate_up,
                                  int64_t gu_stride, const void* vec, int64_t vec_stride,
                                  const void* slot, int slot_is_i64, int64_t slot_stride,
                                  int64_t T, int64_t D, int64_t col, int dtype,
                                  cudaStream_t stream);
}
