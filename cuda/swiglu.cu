// SwiGLU, the MLP's gate: out = silu(gate) * up, and its backward, which also writes out
// again when given somewhere to (a backward that did not keep the forward's: the down
// projection's weight gradient needs it, and this pass reads gate and up anyway, where a
// separate recomputation would read them once more). Element-wise and memory bound: each
// thread handles 16-byte packs (load128/store128) a grid-stride apart, then the elements
// past the last whole pack (or every element, when a buffer is not 16-byte aligned) one at a
// time, computing in fp32 whatever the storage type (f32, or bf16 as the GPU backend stores
// activations).
#include "contralign.cuh"

namespace {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <class T>
__device__ __forceinline__ T swiglu_one(T gate, T up) {
    const float g = to_f32(gate);
    return from_f32<T>(g * sigmoid(g) * to_f32(up));
}

template <class T>
__device__ void swiglu_forward(const T* __restrict__ gate, const T* __restrict__ up,
                               T* __restrict__ out, long long n) {
    constexpr int P = Pack128<T>::size;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long packs = aligned128(gate) && aligned128(up) && aligned128(out) ? n / P : 0;
    for (long long p = first; p < packs; p += stride) {
        const Pack128<T> g = load128(gate + p * P);
        const Pack128<T> u = load128(up + p * P);
        Pack128<T> o;
        for (int k = 0; k < P; ++k) o[k] = swiglu_one(g[k], u[k]);
        store128(out + p * P, o);
    }
    for (long long i = packs * P + first; i < n; i += stride) out[i] = swiglu_one(gate[i], up[i]);
}

// d/dgate [g s(g) u] = u s (1 + g (1 - s)); d/dup = g s.
template <class T>
__device__ __forceinline__ void swiglu_grad(T gate, T up, T dout, T& dgate, T& dup) {
    const float g = to_f32(gate);
    const float u = to_f32(up);
    const float dy = to_f32(dout);
    const float s = sigmoid(g);
    dgate = from_f32<T>(dy * u * s * (1.0f + g * (1.0f - s)));
    dup = from_f32<T>(dy * g * s);
}

// `out` may be null: the forward's output was kept, and is not written.
template <class T>
__device__ void swiglu_backward(const T* __restrict__ gate, const T* __restrict__ up,
                                const T* __restrict__ dout, T* __restrict__ dgate,
                                T* __restrict__ dup, T* __restrict__ out, long long n) {
    constexpr int P = Pack128<T>::size;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const bool aligned = aligned128(gate) && aligned128(up) && aligned128(dout) &&
                         aligned128(dgate) && aligned128(dup) &&
                         (out == nullptr || aligned128(out));
    const long long packs = aligned ? n / P : 0;
    for (long long p = first; p < packs; p += stride) {
        const Pack128<T> g = load128(gate + p * P);
        const Pack128<T> u = load128(up + p * P);
        const Pack128<T> dy = load128(dout + p * P);
        Pack128<T> dg, du;
        for (int k = 0; k < P; ++k) swiglu_grad(g[k], u[k], dy[k], dg[k], du[k]);
        store128(dgate + p * P, dg);
        store128(dup + p * P, du);
        if (out != nullptr) {
            Pack128<T> o;
            for (int k = 0; k < P; ++k) o[k] = swiglu_one(g[k], u[k]);
            store128(out + p * P, o);
        }
    }
    for (long long i = packs * P + first; i < n; i += stride) {
        swiglu_grad(gate[i], up[i], dout[i], dgate[i], dup[i]);
        if (out != nullptr) out[i] = swiglu_one(gate[i], up[i]);
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
                                               float* out, long long n) {
    swiglu_backward(gate, up, dout, dgate, dup, out, n);
}
CONTRALIGN_KERNEL(swiglu_backward_f32)

extern "C" __global__ void swiglu_backward_bf16(const __nv_bfloat16* gate,
                                                const __nv_bfloat16* up,
                                                const __nv_bfloat16* dout, __nv_bfloat16* dgate,
                                                __nv_bfloat16* dup, __nv_bfloat16* out,
                                                long long n) {
    swiglu_backward(gate, up, dout, dgate, dup, out, n);
}
CONTRALIGN_KERNEL(swiglu_backward_bf16)
