// Torch binding of the WKV kernels (wkv_cuda.cu): checks every input, allocates outputs and scratch on
// the inputs' device and stream, and launches. The autograd Function around it is in src/models/rwkv4/wkv_cuda.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>
#include <vector>

#include "wkv.h"

namespace {

wkv::IoType io_type(const torch::Tensor& k) {
  const auto t = k.scalar_type();
  TORCH_CHECK(t == torch::kFloat32 || t == torch::kFloat16 || t == torch::kBFloat16,
              "wkv_cuda: k must be float32, float16 or bfloat16, got ", t);
  return t == torch::kFloat32 ? wkv::IoType::kFloat : t == torch::kFloat16 ? wkv::IoType::kHalf : wkv::IoType::kBFloat16;
}

// Messages are assembled from strings: on the GPU machine (torch 2.11, CUDA 13) streaming an integer into
// a std::ostream from inside an extension crashed the process, so no number goes through operator<<.
std::string shape_text(torch::IntArrayRef shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

void check_tensor(const torch::Tensor& x, const char* name, const torch::Tensor& k, torch::ScalarType dtype,
                  torch::IntArrayRef shape) {
  TORCH_CHECK(x.is_cuda(), "wkv_cuda: ", name, " must be a CUDA tensor, got one on ", x.device().str());
  TORCH_CHECK(x.device() == k.device(), "wkv_cuda: ", name, " is on ", x.device().str(), " but k is on ",
              k.device().str());
  TORCH_CHECK(x.scalar_type() == dtype, "wkv_cuda: ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.sizes() == shape, "wkv_cuda: ", name, " must have shape ", shape_text(shape), ", got ",
              shape_text(x.sizes()));
  TORCH_CHECK(x.is_contiguous(), "wkv_cuda: ", name, " must be contiguous");
}

// Checks w, u, k, v, state (and gy, gstate in backward) and returns the sizes.
wkv::Dims check_inputs(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k,
                       const torch::Tensor& v, const torch::Tensor& state) {
  TORCH_CHECK(k.dim() == 3, "wkv_cuda: k must be (B, T, C), got shape ", shape_text(k.sizes()));
  io_type(k);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  TORCH_CHECK(B > 0 && C > 0, "wkv_cuda: B and C must be positive, got k of shape ", shape_text(k.sizes()));
  const std::vector<int64_t> btc{B, T, C}, channels{C}, states{B, C, 3};
  check_tensor(k, "k", k, k.scalar_type(), btc);
  check_tensor(v, "v", k, k.scalar_type(), btc);
  check_tensor(w, "w", k, torch::kFloat32, channels);
  check_tensor(u, "u", k, torch::kFloat32, channels);
  check_tensor(state, "state", k, torch::kFloat32, states);
  return {B, T, C};
}

// -> (y (B, T, C) in k's dtype, state_out (B, C, 3) fp32). w is -exp(time_decay).
std::vector<torch::Tensor> forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor state) {
  const wkv::Dims d = check_inputs(w, u, k, v, state);
  const c10::cuda::CUDAGuard guard(k.device());
  auto y = torch::empty_like(k);
  if (d.T == 0) return {y, state.clone()};
  auto state_out = torch::empty_like(state);
  auto scratch = torch::empty({wkv::forward_scratch_floats(d)}, state.options());
  const cudaError_t err = wkv::forward(io_type(k), d, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(),
                                       v.data_ptr(), state.data_ptr<float>(), y.data_ptr(), state_out.data_ptr<float>(),
                                       scratch.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wkv_cuda forward: kernel launch failed: ", cudaGetErrorString(err));
  return {y, state_out};
}

// -> (gw, gu (C,) fp32, gk, gv (B, T, C) in k's dtype, gstate (B, C, 3) fp32). gstate_out[..., 2] is ignored.
std::vector<torch::Tensor> backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor state, torch::Tensor gy, torch::Tensor gstate_out) {
  const wkv::Dims d = check_inputs(w, u, k, v, state);
  check_tensor(gy, "gy", k, k.scalar_type(), k.sizes());
  check_tensor(gstate_out, "gstate_out", k, torch::kFloat32, state.sizes());
  const c10::cuda::CUDAGuard guard(k.device());
  auto gk = torch::empty_like(k);
  auto gv = torch::empty_like(v);
  if (d.T == 0) return {torch::zeros_like(w), torch::zeros_like(u), gk, gv, gstate_out.clone()};
  auto gw = torch::empty_like(w);
  auto gu = torch::empty_like(u);
  auto gstate_in = torch::empty_like(state);
  auto scratch = torch::empty({wkv::backward_scratch_floats(d)}, state.options());
  const cudaError_t err = wkv::backward(
      io_type(k), d, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(), state.data_ptr<float>(),
      gy.data_ptr(), gstate_out.data_ptr<float>(), gw.data_ptr<float>(), gu.data_ptr<float>(), gk.data_ptr(),
      gv.data_ptr(), gstate_in.data_ptr<float>(), scratch.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wkv_cuda backward: kernel launch failed: ", cudaGetErrorString(err));
  return {gw, gu, gk, gv, gstate_in};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "WKV forward: (w, u, k, v, state) -> (y, state_out)");
  m.def("backward", &backward, "WKV backward: (w, u, k, v, state, gy, gstate_out) -> (gw, gu, gk, gv, gstate_in)");
}
