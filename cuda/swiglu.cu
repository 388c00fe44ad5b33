// SwiGLU, the MLP's gate: out = silu(gate) * up, and its backward. Element-wise and memory
// bound: each thread handles elements a grid-stride apart, computing in fp32 whatever the
// storage type (f32, or bf16 as the GPU backend stores activations).
#include "contralign.cuh"

namespace {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <class T>
__device__ void swiglu_forward(const T* __restrict__ gate, const T* __restrict__ up,
                               T* __restrict__ out, long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const float g = to_f32(gate[i]);
        out[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
    }
}

// d/dgate [g s(g) u] = u s (1 + g (1 - s)); d/dup = g s.
template <class T>
__device__ void swiglu_backward(const T* __restrict__ gate, const T* __restrict__ up,
                                const T* __restrict__ dout, T* __restrict__ dgate,
                                T* __restrict__ dup, long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const float g = to_f32(gate[i]);
        const float u = to_f32(up[i]);
        const float dy = to_f32(dout[i]);
        const float s = sigmoid(g);
        dgate[i] = from_f32<T>(dy * u * s * (1.0f + g * (1.0f - s)));
        dup[i] = from_f32<T>(dy * g * s);
    }
}

}  // namespace

extern "C" __global__ void swiglu_forward_f32(const float* gate, const float* up, float* out,
                                              long long n) {
    swiglu_forward(gate, up, out, n);
}
CONTRALIGN_KERNEL(swiglu_forward_f32)

extern "C" __global__ void swiglu_forward_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                               __nv_bfloat16* out, long long n) {
    swiglu_forward(gate, up, out, n);
}
CONTRALIGN_KERNEL(swiglu_forward_bf16)

extern "C" __global__ void swiglu_backward_f32(const float* gate, const float* up,
                                               const float* dout, float* dgate, float* dup,
                                               long long n) {
    swiglu_backward(gate, up, dout, dgate, dup, n);
}
CONTRALIGN_KERNEL(swiglu_backward_f32)

extern "C" __global__ void swiglu_backward_bf16(const __nv_bfloat16* gate,
                                                const __nv_bfloat16* up,
                                                const __nv_bfloat16* dout, __nv_bfloat16* dgate,
                                                __nv_bfloat16* dup, long long n) {
    swiglu_backward(gate, up, dout, dgate, dup, n);
}
CONTRALIGN_KERNEL(swiglu_backward_bf16)
