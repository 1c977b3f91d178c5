// CUDA kernels for the PEDRO gather-scale ops. Grid: (token, column block); one slot
// load per block, base tokens (slot < 0) exit at once and keep their exact bits.
// fp32 math, one rounding on store. No torch headers (see pedro_kernels.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "pedro_kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 2;  // columns per thread; small blocks keep decode (T ~ 1) parallel
constexpr int kCols = kThreads * kPerThread;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, typename I>
__global__ void scale3_kernel(T* __restrict__ x, int64_t x_stride, const T* __restrict__ vec,
                              int64_t vec_stride, const I* __restrict__ slot, int64_t slot_stride,
                              int64_t q_size, int64_t kv_size, int64_t q_col, int64_t k_col,
                              int64_t v_col) {
  const int64_t t = blockIdx.x;
  const int64_t s = static_cast<int64_t>(slot[t * slot_stride]);
  if (s < 0) return;  // base token
  T* xr = x + t * x_stride;
  const T* vr = vec + s * vec_stride;
  const int64_t n = q_size + 2 * kv_size;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t c = static_cast<int64_t>(blockIdx.y) * kCols + i * kThreads + threadIdx.x;
    if (c >= n) break;
    int64_t vc;  // vector column, or -1 when this range is not scaled
    if (c < q_size) {
      vc = q_col < 0 ? -1 : q_col + c;
    } else if (c < q_size + kv_size) {
      vc = k_col < 0 ? -1 : k_col + (c - q_size);
    } else {
      vc = v_col < 0 ? -1 : v_col + (c - q_size - kv_size);
    }
    if (vc >= 0) xr[c] = from_f<T>(to_f(xr[c]) * to_f(vr[vc]));
  }
}

template <typename T, typename I>
__global__ void silu_mul_kernel(T* __restrict__ out, int64_t out_stride,
                                const T* __restrict__ gu, int64_t gu_stride,
                                const T* __restrict__ vec, int64_t vec_stride,
                                const I* __restrict__ slot, int64_t slot_stride, int64_t D,
                                int64_t col) {
  const int64_t t = blockIdx.x;
  const int64_t s = static_cast<int64_t>(slot[t * slot_stride]);
  const T* gr = gu + t * gu_stride;
  // Base token, or col < 0 (target off): factor 1.
  const T* vr = (s >= 0 && col >= 0) ? vec + s * vec_stride + col : nullptr;
  T* orow = out + t * out_stride;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t c = static_cast<int64_t>(blockIdx.y) * kCols + i * kThreads + threadIdx.x;
    if (c >= D) break;
    const float g = to_f(gr[c]);
    float y = g / (1.0f + expf(-g)) * to_f(gr[D + c]);
    if (vr != nullptr) y *= to_f(vr[c]);
    orow[c] = from_f<T>(y);
  }
}

}  // namespace

// Like AT_DISPATCH: binds scalar_t (element) and index_t (slot) and runs the lambda.
#define PEDRO_DISPATCH_INDEX(is_i64, ...) \
  if (is_i64) {                           \
    using index_t = int64_t;              \
    __VA_ARGS__();                        \
  } else {                                \
    using index_t = int32_t;              \
    __VA_ARGS__();                        \
  }

#define PEDRO_DISPATCH(dtype, is_i64, ...)                 \
  switch (dtype) {                                         \
    case PEDRO_F32: {                                      \
      using scalar_t = float;                              \
      PEDRO_DISPATCH_INDEX(is_i64, __VA_ARGS__) break;     \
    }                                                      \
    case PEDRO_F16: {                                      \
      using scalar_t = __half;                             \
      PEDRO_DISPATCH_INDEX(is_i64, __VA_ARGS__) break;     \
    }                                                      \
    case PEDRO_BF16: {                                     \
      using scalar_t = __nv_bfloat16;                      \
      PEDRO_DISPATCH_INDEX(is_i64, __VA_ARGS__) break;     \
    }                                                      \
    default:                                               \
      return cudaErrorInvalidValue;                        \
  }

extern "C" cudaError_t pedro_scale3(void* x, int64_t x_stride, const void* vec,
                                    int64_t vec_stride, const void* slot, int slot_is_i64,
                                    int64_t slot_stride, int64_t T, int64_t q_size,
                                    int64_t kv_size, int64_t q_col, int64_t k_col,
                                    int64_t v_col, int dtype, cudaStream_t stream) {
  const int64_t n = q_size + 2 * kv_size;
  if (T <= 0 || n <= 0) return cudaSuccess;  // empty batch: no launch
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((n + kCols - 1) / kCols));
  PEDRO_DISPATCH(dtype, slot_is_i64, [&] {
    scale3_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
        static_cast<scalar_t*>(x), x_stride, static_cast<const scalar_t*>(vec), vec_stride,
        static_cast<const index_t*>(slot), slot_stride, q_size, kv_size, q_col, k_col, v_col);
  });
  return cudaGetLastError();
}

extern "C" cudaError_t pedro_silu_mul_scaled(void* out, int64_t out_stride, const void* gate_up,
                                             int64_t gu_stride, const void* vec,
                                             int64_t vec_stride, const void* slot,
                                             int slot_is_i64, int64_t slot_stride, int64_t T,
                                             int64_t D, int64_t col, int dtype,
                                             cudaStream_t stream) {
  if (T <= 0 || D <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((D + kCols - 1) / kCols));
  PEDRO_DISPATCH(dtype, slot_is_i64, [&] {
    silu_mul_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
        static_cast<scalar_t*>(out), out_stride, static_cast<const scalar_t*>(gate_up),
        gu_stride, static_cast<const scalar_t*>(vec), vec_stride,
        static_cast<const index_t*>(slot), slot_stride, D, col);
  });
  return cudaGetLastError();
}
