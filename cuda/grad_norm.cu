// The global L2 norm of all gradients (fp32, as many buffers as the model has tensors) and
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

extern "C" __global__ void grad_norm_partial(const float* const* buffers, const long long* lens,
                                             int count, float* partials) {
    __shared__ float scratch[33];
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    float squares = 0.0f;
    for (int k = 0; k < count; ++k) {
        const float* g = buffers[k];
        for (long long i = first; i < lens[k]; i += stride) squares += g[i] * g[i];
    }
    const float total = block_sum(squares, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}
CONTRALIGN_KERNEL(grad_norm_partial)

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

extern "C" __global__ void grad_clip_scale(float* const* buffers, const long long* lens,
                                           int count, const float* norm_and_coef) {
    const float coef = norm_and_coef[1];
    if (coef == 1.0f) return;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    for (int k = 0; k < count; ++k) {
        float* g = buffers[k];
        for (long long i = first; i < lens[k]; i += stride) g[i] *= coef;
    }
}
CONTRALIGN_KERNEL(grad_clip_scale)
