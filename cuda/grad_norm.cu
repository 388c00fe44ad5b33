// The global L2 norm of all gradients (f32 or bf16, as many buffers as there are) and
// clip_grad_norm_'s scaling, in three launches that leave the norm on the device:
//
//   grad_norm_partial  every block sums the squares of its share of every buffer into
//                      partials[blockIdx.x];
//   grad_norm_finish   one block sums the partials and writes [norm, coef] with
//                      coef = min(1, max_norm / (norm + 1e-6)) (1 when max_norm <= 0);
//   grad_clip_scale    multiplies every buffer by coef when coef < 1.
//
// Sums are fp32 in a fixed order (each thread's elements in turn, then reduce.cuh's tree), so
// the norm is the same bit for bit for a given grid and block.
#include "contralign.cuh"
#include "reduce.cuh"

template <class T>
__device__ __forceinline__ void grad_norm_partial(const T* const* buffers, const long long* lens,
                                                  int count, float* partials) {
    __shared__ float scratch[33];
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    float squares = 0.0f;
    for (int k = 0; k < count; ++k) {
        const T* g = buffers[k];
        for (long long i = first; i < lens[k]; i += stride) {
            const float x = to_f32(g[i]);
            squares += x * x;
        }
    }
    const float total = block_sum(squares, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

extern "C" __global__ void grad_norm_partial_f32(const float* const* buffers,
                                                 const long long* lens, int count,
                                                 float* partials) {
    grad_norm_partial(buffers, lens, count, partials);
}
CONTRALIGN_KERNEL(grad_norm_partial_f32)

extern "C" __global__ void grad_norm_partial_bf16(const __nv_bfloat16* const* buffers,
                                                  const long long* lens, int count,
                                                  float* partials) {
    grad_norm_partial(buffers, lens, count, partials);
}
CONTRALIGN_KERNEL(grad_norm_partial_bf16)

// Launched with one block.
extern "C" __global__ void grad_norm_finish(const float* partials, int parts, float max_norm,
                                            float* out) {
    __shared__ float scratch[33];
    float sum = 0.0f;
    for (int p = threadIdx.x; p < parts; p += blockDim.x) sum += partials[p];
    const float total = block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        const float norm = sqrtf(total);
        const float coef = max_norm / (norm + 1e-6f);
        out[0] = norm;
        out[1] = max_norm > 0.0f && coef < 1.0f ? coef : 1.0f;
    }
}
CONTRALIGN_KERNEL(grad_norm_finish)

template <class T>
__device__ __forceinline__ void grad_clip_scale(T* const* buffers, const long long* lens,
                                                int count, const float* norm_and_coef) {
    const float coef = norm_and_coef[1];
    if (coef == 1.0f) return;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    for (int k = 0; k < count; ++k) {
        T* g = buffers[k];
        for (long long i = first; i < lens[k]; i += stride) g[i] = from_f32<T>(to_f32(g[i]) * coef);
    }
}

extern "C" __global__ void grad_clip_scale_f32(float* const* buffers, const long long* lens,
                                               int count, const float* norm_and_coef) {
    grad_clip_scale(buffers, lens, count, norm_and_coef);
}
CONTRALIGN_KERNEL(grad_clip_scale_f32)

extern "C" __global__ void grad_clip_scale_bf16(__nv_bfloat16* const* buffers,
                                                const long long* lens, int count,
                                                const float* norm_and_coef) {
    grad_clip_scale(buffers, lens, count, norm_and_coef);
}
CONTRALIGN_KERNEL(grad_clip_scale_bf16)
