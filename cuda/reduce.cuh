// Deterministic sums over a warp and over a block, for kernels that reduce in fp32: the order
// of the additions depends only on blockDim, never on scheduling, so a result is the same bit
// for bit from run to run. Blocks are 1-D and of any size (partial last warps included).
#pragma once

#include "contralign.cuh"

// The sum of `v` over the first `lanes` lanes of the calling warp, in lane 0 (the other lanes
// get partial sums). Every lane of the first `lanes` must call it.
__device__ __forceinline__ float warp_sum(float v, unsigned lanes) {
    const unsigned mask = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
    const unsigned lane = threadIdx.x % 32;
    for (unsigned offset = 16; offset > 0; offset /= 2) {
        const float other = __shfl_down_sync(mask, v, offset);
        // A source lane past the end does not exist: its value is undefined.
        if (lane + offset < lanes) v += other;
    }
    return v;
}

// The sum of `v` over the block, returned to every thread. `scratch` is shared memory of at
// least 33 floats; it is free again when the call returns (the last barrier sees to that), so
// one scratch array serves any number of calls.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const unsigned warp = threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    const unsigned warps = (blockDim.x + 31) / 32;
    const unsigned left = blockDim.x - warp * 32;
    v = warp_sum(v, left < 32 ? left : 32);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < warps ? scratch[lane] : 0.0f;
        w = warp_sum(w, blockDim.x < 32 ? blockDim.x : 32);
        if (lane == 0) scratch[32] = w;
    }
    __syncthreads();
    const float total = scratch[32];
    __syncthreads();
    return total;
}

// As `warp_sum` and `block_sum`, in fp64 (`scratch`: shared memory of at least 33 doubles).
__device__ __forceinline__ double warp_sum(double v, unsigned lanes) {
    const unsigned mask = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
    const unsigned lane = threadIdx.x % 32;
    for (unsigned offset = 16; offset > 0; offset /= 2) {
        const double other = __shfl_down_sync(mask, v, offset);
        if (lane + offset < lanes) v += other;
    }
    return v;
}

__device__ __forceinline__ double block_sum(double v, double* scratch) {
    const unsigned warp = threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    const unsigned warps = (blockDim.x + 31) / 32;
    const unsigned left = blockDim.x - warp * 32;
    v = warp_sum(v, left < 32 ? left : 32);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = lane < warps ? scratch[lane] : 0.0;
        w = warp_sum(w, blockDim.x < 32 ? blockDim.x : 32);
        if (lane == 0) scratch[32] = w;
    }
    __syncthreads();
    const double total = scratch[32];
    __syncthreads();
    return total;
}
