// Casts between f32 and bf16 storage. f32 -> bf16 rounds to nearest even (NaN stays NaN);
// bf16 -> f32 is exact.
#include "contralign.cuh"

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ in,
                                            __nv_bfloat16* __restrict__ out, long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        out[i] = __float2bfloat16_rn(in[i]);
    }
}
CONTRALIGN_KERNEL(cast_f32_to_bf16)

extern "C" __global__ void cast_bf16_to_f32(const __nv_bfloat16* __restrict__ in,
                                            float* __restrict__ out, long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        out[i] = __bfloat162float(in[i]);
    }
}
CONTRALIGN_KERNEL(cast_bf16_to_f32)
