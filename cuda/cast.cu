// Casts between f32 and bf16 storage. f32 -> bf16 rounds to nearest even (NaN stays NaN);
// bf16 -> f32 is exact. Each thread converts 4 elements at a time, a grid-stride apart: a
// 16-byte access on the f32 side and an 8-byte one on the bf16 side, so that the lanes of a
// warp cover consecutive bytes on both. The elements past the last whole group (or every
// element, when a buffer is not 16-byte aligned) go one at a time.
#include "contralign.cuh"

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ in,
                                            __nv_bfloat16* __restrict__ out, long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long groups = aligned128(in) && aligned128(out) ? n / 4 : 0;
    for (long long p = first; p < groups; p += stride) {
        const Pack128<float> x = load128(in + 4 * p);
        __nv_bfloat16 y[4];
        for (int k = 0; k < 4; ++k) y[k] = __float2bfloat16_rn(x[k]);
        store_elements<4>(out + 4 * p, y);
    }
    for (long long i = groups * 4 + first; i < n; i += stride) out[i] = __float2bfloat16_rn(in[i]);
}
CONTRALIGN_KERNEL(cast_f32_to_bf16)

extern "C" __global__ void cast_bf16_to_f32(const __nv_bfloat16* __restrict__ in,
                                            float* __restrict__ out, long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long groups = aligned128(in) && aligned128(out) ? n / 4 : 0;
    for (long long p = first; p < groups; p += stride) {
        __nv_bfloat16 x[4];
        load_elements<4>(in + 4 * p, x);
        Pack128<float> y;
        for (int k = 0; k < 4; ++k) y[k] = __bfloat162float(x[k]);
        store128(out + 4 * p, y);
    }
    for (long long i = groups * 4 + first; i < n; i += stride) out[i] = __bfloat162float(in[i]);
}
CONTRALIGN_KERNEL(cast_bf16_to_f32)
