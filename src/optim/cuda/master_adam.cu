// The master-weight Adam step of many tensors in one launch (src/optim/master_adam.py has the maths and the twin).
//
// Every tensor of the call has a row in `table` (int64, on the GPU): the addresses of its 16-bit gradient, its
// 16-bit weight, its fp32 master and fp32 moments, its element count, and the number of the first chunk it owns.
// Chunks of kChunk elements are numbered across the tensors in order, one thread block per chunk; a block finds
// its tensor by binary search over the first-chunk column, and reads and writes 4 elements per access where all
// five addresses are 16-byte aligned (one at a time where not). Each element is read and written once:
// 2 (gradient) + 12 (master, moments) bytes in, 12 + 2 (weight) out. Nothing is allocated.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 2;           // vectors (or, unaligned, elements) in flight per thread: loaded before any use
constexpr int64_t kChunk = 1 << 16;  // elements per block (a multiple of 4, so aligned tensors stay aligned)

// columns of the table (src/optim/master_adam.py builds it in this order)
enum Column { kGrad = 0, kWeight, kMaster, kExpAvg, kExpAvgSq, kNumel, kFirstChunk, kColumns };

struct Hyper {
  float lr, beta1, beta2, eps, weight_decay;
  float step_size;   // lr / (1 - beta1^t)
  float bias2_sqrt;  // sqrt(1 - beta2^t)
  bool adamw;        // decoupled weight decay
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);  // round to nearest even, as torch's .to()
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 4 consecutive elements as one load or store: 16 bytes of fp32, 8 of a 16-bit type (the address is aligned)
template <typename T> struct Bits4 { using type = uint2; };
template <> struct Bits4<float> { using type = float4; };

template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&x)[4]) {
  const typename Bits4<T>::type bits = *reinterpret_cast<const typename Bits4<T>::type*>(p);
  const T* parts = reinterpret_cast<const T*>(&bits);
#pragma unroll
  for (int j = 0; j < 4; ++j) x[j] = to_float(parts[j]);
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&x)[4]) {
  alignas(sizeof(typename Bits4<T>::type)) T parts[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) parts[j] = from_float<T>(x[j]);
  *reinterpret_cast<typename Bits4<T>::type*>(p) = *reinterpret_cast<const typename Bits4<T>::type*>(parts);
}

// One element's step (src/optim/master_adam.py has the formula); p, m, v are updated in place.
__device__ __forceinline__ void adam_element(float g, float& p, float& m, float& v, float scale, const Hyper& h) {
  g *= scale;
  if (h.weight_decay != 0.f) {
    if (h.adamw) p -= h.lr * h.weight_decay * p;
    else g += p * h.weight_decay;
  }
  m = h.beta1 * m + (1.f - h.beta1) * g;
  v = h.beta2 * v + (1.f - h.beta2) * g * g;
  const float denom = sqrtf(v) / h.bias2_sqrt + h.eps;
  p -= h.step_size * m / denom;
}

template <typename T>
struct Row {
  const T* grad;
  T* weight;
  float* master;
  float* exp_avg;
  float* exp_avg_sq;
};

// Elements [begin, end) one at a time: any alignment.
template <typename T>
__device__ void step_elements(const Row<T>& r, int64_t begin, int64_t end, float scale, const Hyper& h) {
  for (int64_t base = begin + threadIdx.x; base < end; base += kThreads * kUnroll) {
    float g[kUnroll], p[kUnroll], m[kUnroll], v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        g[u] = to_float(r.grad[i]);
        p[u] = r.master[i];
        m[u] = r.exp_avg[i];
        v[u] = r.exp_avg_sq[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        adam_element(g[u], p[u], m[u], v[u], scale, h);
        r.master[i] = p[u];
        r.exp_avg[i] = m[u];
        r.exp_avg_sq[i] = v[u];
        r.weight[i] = from_float<T>(p[u]);
      }
    }
  }
}

// Elements [begin, begin + 4 n4) four at a time: every address 16-byte aligned at begin.
template <typename T>
__device__ void step_vectors(const Row<T>& r, int64_t begin, int64_t n4, float scale, const Hyper& h) {
  for (int64_t base = threadIdx.x; base < n4; base += kThreads * kUnroll) {
    float g[kUnroll][4], p[kUnroll][4], m[kUnroll][4], v[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = begin + 4 * (base + u * kThreads);
      if (base + u * kThreads < n4) {
        load4(r.grad + i, g[u]);
        load4(r.master + i, p[u]);
        load4(r.exp_avg + i, m[u]);
        load4(r.exp_avg_sq + i, v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = begin + 4 * (base + u * kThreads);
      if (base + u * kThreads < n4) {
#pragma unroll
        for (int j = 0; j < 4; ++j) adam_element(g[u][j], p[u][j], m[u][j], v[u][j], scale, h);
        store4(r.master + i, p[u]);
        store4(r.exp_avg + i, m[u]);
        store4(r.exp_avg_sq + i, v[u]);
        store4(r.weight + i, p[u]);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
master_adam_kernel(const int64_t* __restrict__ table, int n_tensors, const float* __restrict__ clip, Hyper h) {
  const int64_t chunk = blockIdx.x;
  int lo = 0, hi = n_tensors - 1;  // the last tensor whose first chunk is <= this chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid * kColumns + kFirstChunk] <= chunk) lo = mid; else hi = mid - 1;
  }
  const int64_t* row = table + lo * kColumns;
  const Row<T> r{reinterpret_cast<const T*>(row[kGrad]), reinterpret_cast<T*>(row[kWeight]),
                 reinterpret_cast<float*>(row[kMaster]), reinterpret_cast<float*>(row[kExpAvg]),
                 reinterpret_cast<float*>(row[kExpAvgSq])};
  const int64_t begin = (chunk - row[kFirstChunk]) * kChunk;
  const int64_t end = row[kNumel] < begin + kChunk ? row[kNumel] : begin + kChunk;
  const float scale = *clip;
  // torch's allocations are aligned far beyond 16 bytes; a view at an odd offset takes the element path
  const bool aligned = ((row[kGrad] | row[kWeight] | row[kMaster] | row[kExpAvg] | row[kExpAvgSq]) & 15) == 0;
  if (aligned) {
    const int64_t n4 = (end - begin) / 4;
    step_vectors(r, begin, n4, scale, h);
    step_elements(r, begin + 4 * n4, end, scale, h);  // the last 0-3 elements of a tensor
  } else {
    step_elements(r, begin, end, scale, h);
  }
}

template <typename T>
void launch(const torch::Tensor& table, int64_t n_chunks, const torch::Tensor& clip, const Hyper& h) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  master_adam_kernel<T><<<static_cast<unsigned int>(n_chunks), kThreads, 0, stream>>>(
      table.data_ptr<int64_t>(), static_cast<int>(table.size(0)), clip.data_ptr<float>(), h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Messages hold no streamed integers: on the GPU machine (torch 2.11, CUDA 13) streaming an integer into a
// std::ostream from inside an extension crashed the process (see src/models/rwkv4/cuda/wkv_op.cpp).
void step(const torch::Tensor& table, const torch::Tensor& weight_like, int64_t n_chunks, const torch::Tensor& clip,
          double lr, double beta1, double beta2, double eps, double weight_decay, bool adamw, double step_size,
          double bias2_sqrt) {
  TORCH_CHECK(weight_like.is_cuda(), "master_adam: the weights must be CUDA tensors");
  TORCH_CHECK(table.device() == weight_like.device() && clip.device() == weight_like.device(),
              "master_adam: the address table and the clipping coefficient must be on the weights' device");
  TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.dim() == 2 && table.size(1) == kColumns &&
              table.is_contiguous(), "master_adam: the address table must be a contiguous int64 [tensors, 7]");
  TORCH_CHECK(table.size(0) > 0 && table.size(0) <= INT32_MAX, "master_adam: the table must have 1 to 2^31-1 rows");
  TORCH_CHECK(n_chunks > 0 && n_chunks <= INT32_MAX, "master_adam: the chunk count must be in 1 to 2^31-1");
  TORCH_CHECK(clip.scalar_type() == torch::kFloat32 && clip.numel() == 1,
              "master_adam: the clipping coefficient must be one float32 value");
  const Hyper h{static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
                static_cast<float>(weight_decay), static_cast<float>(step_size), static_cast<float>(bias2_sqrt),
                adamw};
  const c10::cuda::CUDAGuard guard(weight_like.device());
  switch (weight_like.scalar_type()) {
    case torch::kFloat32: launch<float>(table, n_chunks, clip, h); break;
    case torch::kFloat16: launch<__half>(table, n_chunks, clip, h); break;
    case torch::kBFloat16: launch<__nv_bfloat16>(table, n_chunks, clip, h); break;
    default: TORCH_CHECK(false, "master_adam: the weights must be float32, float16 or bfloat16");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("chunk_elements", []() { return kChunk; }, "elements per chunk (one thread block)");
  m.def("step", &step, "one master-weight Adam step over the tensors of an address table");
}
