// Registers the PEDRO kernels as torch custom ops: torch.ops.vllm_pedro.{scale_qkv_, scale_,
// silu_and_mul_scaled}. All three mutate their first argument and return nothing (vLLM's
// convention for out-variant ops), so CUDA graphs and torch.compile see fixed buffers.
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "pedro_kernels.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return PEDRO_F32;
    case at::kHalf: return PEDRO_F16;
    case at::kBFloat16: return PEDRO_BF16;
    default:
      TORCH_CHECK(false, "vllm_pedro: unsupported dtype ", t.scalar_type(),
                  " (want float32, float16 or bfloat16)");
  }
  return -1;
}

// Shape/dtype/device checks only: nothing here reads tensor values (no host sync).
void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "vllm_pedro: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "vllm_pedro: ", name, " must be 2-D, got ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "vllm_pedro: ", name,
              " needs a contiguous last dim");
}

void check_common(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& slot_idx,
                  const char* name) {
  check_rows(x, name);
  check_rows(vectors, "vectors");
  TORCH_CHECK(vectors.scalar_type() == x.scalar_type(), "vllm_pedro: vectors dtype ",
              vectors.scalar_type(), " != ", name, " dtype ", x.scalar_type());
  TORCH_CHECK(vectors.device() == x.device() && slot_idx.device() == x.device(),
              "vllm_pedro: ", name, ", vectors and slot_idx must be on one device");
  TORCH_CHECK(slot_idx.dim() == 1 && (slot_idx.scalar_type() == at::kInt ||
                                      slot_idx.scalar_type() == at::kLong),
              "vllm_pedro: slot_idx must be a 1-D int32/int64 tensor");
  TORCH_CHECK(slot_idx.size(0) >= x.size(0), "vllm_pedro: slot_idx has ", slot_idx.size(0),
              " entries for ", x.size(0), " tokens");
}

void check_col(int64_t col, int64_t width, const at::Tensor& vectors, const char* name) {
  TORCH_CHECK(col < 0 || col + width <= vectors.size(1), "vllm_pedro: ", name, " columns [",
              col, ", ", col + width, ") exceed vectors width ", vectors.size(1));
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "vllm_pedro ", op, ": ", cudaGetErrorString(err));
}

}  // namespace

void scale_qkv_(at::Tensor& qkv, const at::Tensor& vectors, const at::Tensor& slot_idx,
                int64_t q_size, int64_t kv_size, int64_t q_col, int64_t k_col, int64_t v_col) {
  check_common(qkv, vectors, slot_idx, "qkv");
  TORCH_CHECK(q_size >= 0 && kv_size >= 0 && qkv.size(1) == q_size + 2 * kv_size,
              "vllm_pedro: qkv width ", qkv.size(1), " != q_size + 2*kv_size");
  check_col(q_col, q_size, vectors, "q");
  check_col(k_col, kv_size, vectors, "k");
  check_col(v_col, kv_size, vectors, "v");
  if (qkv.size(0) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(qkv.device());
  check_launch(pedro_scale3(qkv.data_ptr(), qkv.stride(0), vectors.data_ptr(), vectors.stride(0),
                            slot_idx.data_ptr(), slot_idx.scalar_type() == at::kLong,
                            slot_idx.stride(0), qkv.size(0), q_size, kv_size, q_col, k_col,
                            v_col, dtype_code(qkv), c10::cuda::getCurrentCUDAStream()),
               "scale_qkv_");
}

void scale_(at::Tensor& x, const at::Tensor& vectors, const at::Tensor& slot_idx, int64_t col) {
  check_common(x, vectors, slot_idx, "x");
  check_col(col, x.size(1), vectors, "x");
  if (x.size(0) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  check_launch(pedro_scale3(x.data_ptr(), x.stride(0), vectors.data_ptr(), vectors.stride(0),
                            slot_idx.data_ptr(), slot_idx.scalar_type() == at::kLong,
                            slot_idx.stride(0), x.size(0), x.size(1), 0, col, -1, -1,
                            dtype_code(x), c10::cuda::getCurrentCUDAStream()),
               "scale_");
}

void silu_and_mul_scaled(at::Tensor& out, const at::Tensor& gate_up, const at::Tensor& vectors,
                         const at::Tensor& slot_idx, int64_t col) {
  check_common(gate_up, vectors, slot_idx, "gate_up");
  check_rows(out, "out");
  const int64_t D = out.size(1);
  TORCH_CHECK(out.scalar_type() == gate_up.scalar_type() && out.device() == gate_up.device(),
              "vllm_pedro: out must match gate_up's dtype and device");
  TORCH_CHECK(gate_up.size(1) == 2 * D && out.size(0) == gate_up.size(0),
              "vllm_pedro: out ", out.sizes(), " does not fit gate_up ", gate_up.sizes());
  check_col(col, D, vectors, "up");
  if (out.size(0) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(out.device());
  check_launch(pedro_silu_mul_scaled(out.data_ptr(), out.stride(0), gate_up.data_ptr(),
                                     gate_up.stride(0), vectors.data_ptr(), vectors.stride(0),
                                     slot_idx.data_ptr(), slot_idx.scalar_type() == at::kLong,
                                     slot_idx.stride(0), out.size(0), D, col, dtype_code(out),
                                     c10::cuda::getCurrentCUDAStream()),
               "silu_and_mul_scaled");
}

TORCH_LIBRARY(vllm_pedro, m) {
  m.def("scale_qkv_(Tensor(a!) qkv, Tensor vectors, Tensor slot_idx, int q_size, int kv_size, "
        "int q_col, int k_col, int v_col) -> ()");
  m.def("scale_(Tensor(a!) x, Tensor vectors, Tensor slot_idx, int col) -> ()");
  m.def("silu_and_mul_scaled(Tensor(a!) out, Tensor gate_up, Tensor vectors, Tensor slot_idx, "
        "int col) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_pedro, CUDA, m) {
  m.impl("scale_qkv_", &scale_qkv_);
  m.impl("scale_", &scale_);
  m.impl("silu_and_mul_scaled", &silu_and_mul_scaled);
}

// Built by setup.py as the module vllm_pedro._C: importing it runs the registrations above.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>
#define PEDRO_CAT_(a, b) a##b
#define PEDRO_CAT(a, b) PEDRO_CAT_(a, b)
#define PEDRO_STR_(a) #a
#define PEDRO_STR(a) PEDRO_STR_(a)
PyMODINIT_FUNC PEDRO_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, PEDRO_STR(TORCH_EXTENSION_NAME),
                                      nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
#endif
