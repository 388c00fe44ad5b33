// acc += x, element-wise in fp32: the accumulation of gradients that reach a tensor along two
// paths (the residual stream, a tied embedding).
#include "contralign.cuh"

extern "C" __global__ void add_assign_f32(float* __restrict__ acc, const float* __restrict__ x,
                                          long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        acc[i] += x[i];
    }
}
CONTRALIGN_KERNEL(add_assign_f32)
