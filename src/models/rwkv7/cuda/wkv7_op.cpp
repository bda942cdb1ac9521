// Torch binding of the WKV-7 kernels (wkv7_cuda.cu): checks every input, allocates outputs and what the backward pass
// needs on the inputs' device and stream, and launches. The autograd Function around it is in
// src/models/rwkv7/wkv_cuda.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <string>
#include <vector>

#include "wkv7.h"

namespace {

// Messages are assembled from strings: on the GPU machine (torch 2.11, CUDA 13) streaming an integer into a
// std::ostream from inside an extension crashed the process, so no number goes through operator<<.
std::string shape_text(torch::IntArrayRef shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

void check_tensor(const torch::Tensor& x, const char* name, const torch::Tensor& r, torch::ScalarType dtype,
                  torch::IntArrayRef shape) {
  TORCH_CHECK(x.is_cuda(), "wkv7_cuda: ", name, " must be a CUDA tensor, got one on ", x.device().str());
  TORCH_CHECK(x.device() == r.device(), "wkv7_cuda: ", name, " is on ", x.device().str(), " but r is on ",
              r.device().str());
  TORCH_CHECK(x.scalar_type() == dtype, "wkv7_cuda: ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.sizes() == shape, "wkv7_cuda: ", name, " must have shape ", shape_text(shape), ", got ",
              shape_text(x.sizes()));
  TORCH_CHECK(x.is_contiguous(), "wkv7_cuda: ", name, " must be contiguous");
}

wkv7::IoType io_type(const torch::Tensor& r) {
  const auto t = r.scalar_type();
  TORCH_CHECK(t == torch::kFloat32 || t == torch::kBFloat16, "wkv7_cuda: r must be float32 or bfloat16, got ", t);
  return t == torch::kFloat32 ? wkv7::IoType::kFloat : wkv7::IoType::kBFloat16;
}

// Checks r, w, k, v, a, b (one dtype, (B, T, H, kHeadSize), contiguous) and returns the sizes.
wkv7::Dims check_inputs(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k,
                        const torch::Tensor& v, const torch::Tensor& a, const torch::Tensor& b) {
  TORCH_CHECK(r.dim() == 4, "wkv7_cuda: r must be (B, T, H, N), got shape ", shape_text(r.sizes()));
  io_type(r);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  TORCH_CHECK(N == wkv7::kHeadSize, "wkv7_cuda: the kernel is built for head size ",
              std::to_string(wkv7::kHeadSize), ", got r of shape ", shape_text(r.sizes()));
  TORCH_CHECK(B > 0 && T > 0 && H > 0, "wkv7_cuda: B, T and H must be positive, got r of shape ",
              shape_text(r.sizes()));
  TORCH_CHECK(B * H <= std::numeric_limits<int32_t>::max(), "wkv7_cuda: B * H blocks exceed the grid, r of shape ",
              shape_text(r.sizes()));
  const char* names[] = {"r", "w", "k", "v", "a", "b"};
  const torch::Tensor* tensors[] = {&r, &w, &k, &v, &a, &b};
  for (int i = 0; i < 6; ++i) check_tensor(*tensors[i], names[i], r, r.scalar_type(), r.sizes());
  return {B, T, H};
}

wkv7::Inputs inputs_of(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k,
                       const torch::Tensor& v, const torch::Tensor& a, const torch::Tensor& b) {
  return {r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr()};
}

// (B, H, N, N): a state's shape.
std::vector<int64_t> state_shape(const wkv7::Dims& d) { return {d.B, d.H, wkv7::kHeadSize, wkv7::kHeadSize}; }

// -> (y (B, T, H, N) in r's dtype, sT (B, H, N, N) fp32, sa (B, T, H, N) fp32, states (B, H, chunks, N, N) fp32);
// the last two are for `backward`.
std::vector<torch::Tensor> forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor a, torch::Tensor b, torch::Tensor s0) {
  const wkv7::Dims d = check_inputs(r, w, k, v, a, b);
  check_tensor(s0, "s0", r, torch::kFloat32, state_shape(d));
  const c10::cuda::CUDAGuard guard(r.device());
  const auto fp32 = s0.options();
  auto y = torch::empty_like(r);
  auto sT = torch::empty_like(s0);
  auto sa = torch::empty(r.sizes(), fp32);
  auto states = torch::empty({d.B, d.H, wkv7::chunk_count(d.T), wkv7::kHeadSize, wkv7::kHeadSize}, fp32);
  const cudaError_t err = wkv7::forward(io_type(r), d, inputs_of(r, w, k, v, a, b), s0.data_ptr<float>(),
                                        y.data_ptr(), sT.data_ptr<float>(), sa.data_ptr<float>(),
                                        states.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wkv7_cuda forward: kernel launch failed: ", cudaGetErrorString(err));
  return {y, sT, sa, states};
}

// s0 as given to `forward`, sa and states as it returned them -> (dr, dw, dk, dv, da, db (B, T, H, N) in r's dtype,
// ds0 (B, H, N, N) fp32).
std::vector<torch::Tensor> backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor a, torch::Tensor b, torch::Tensor s0, torch::Tensor sa,
                                    torch::Tensor states, torch::Tensor dy, torch::Tensor dsT) {
  const wkv7::Dims d = check_inputs(r, w, k, v, a, b);
  check_tensor(s0, "s0", r, torch::kFloat32, state_shape(d));
  check_tensor(sa, "sa", r, torch::kFloat32, r.sizes());
  check_tensor(states, "states", r, torch::kFloat32,
               {d.B, d.H, wkv7::chunk_count(d.T), wkv7::kHeadSize, wkv7::kHeadSize});
  check_tensor(dy, "dy", r, r.scalar_type(), r.sizes());
  check_tensor(dsT, "dsT", r, torch::kFloat32, state_shape(d));
  const c10::cuda::CUDAGuard guard(r.device());
  std::vector<torch::Tensor> grads;
  for (int i = 0; i < 6; ++i) grads.push_back(torch::empty_like(r));
  auto ds0 = torch::empty_like(dsT);
  const wkv7::Gradients out{grads[0].data_ptr(), grads[1].data_ptr(), grads[2].data_ptr(),
                            grads[3].data_ptr(), grads[4].data_ptr(), grads[5].data_ptr()};
  const cudaError_t err = wkv7::backward(io_type(r), d, inputs_of(r, w, k, v, a, b), s0.data_ptr<float>(),
                                         sa.data_ptr<float>(), states.data_ptr<float>(), dy.data_ptr(),
                                         dsT.data_ptr<float>(), out, ds0.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wkv7_cuda backward: kernel launch failed: ", cudaGetErrorString(err));
  grads.push_back(ds0);
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "WKV-7 forward: (r, w, k, v, a, b, s0) -> (y, sT, sa, states)");
  m.def("backward", &backward,
        "WKV-7 backward: (r, w, k, v, a, b, s0, sa, states, dy, dsT) -> (dr, dw, dk, dv, da, db, ds0)");
}
