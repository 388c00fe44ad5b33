// acc += x, element-wise in fp32: the accumulation of gradients that reach a tensor along two
// paths (the residual stream, a tied embedding). 16-byte packs a grid-stride apart, then the
// elements past the last whole pack (or every element, when a buffer is not 16-byte aligned).
#include "contralign.cuh"

extern "C" __global__ void add_assign_f32(float* __restrict__ acc, const float* __restrict__ x,
                                          long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long packs = aligned128(acc) && aligned128(x) ? n / 4 : 0;
    for (long long p = first; p < packs; p += stride) {
        Pack128<float> a = load128(acc + 4 * p);
        const Pack128<float> b = load128(x + 4 * p);
        for (int k = 0; k < 4; ++k) a[k] += b[k];
        store128(acc + 4 * p, a);
    }
    for (long long i = packs * 4 + first; i < n; i += stride) acc[i] += x[i];
}
CONTRALIGN_KERNEL(add_assign_f32)
