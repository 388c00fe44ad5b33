// Deterministic sums over a warp and over a block, for kernels that reduce in fp32 (or fp64:
// `T` is float or double): the order of the additions depends only on blockDim, never on
// scheduling, so a result is the same bit for bit from run to run. Blocks are 1-D and of any
// size (partial last warps included).
#pragma once

#include "contralign.cuh"

// The sum of `v` over the first `lanes` lanes of the calling warp, in lane 0 (the other lanes
// get partial sums). Every lane of the first `lanes` must call it.
template <class T>
__device__ __forceinline__ T warp_sum(T v, unsigned lanes) {
    const unsigned mask = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
    const unsigned lane = threadIdx.x % 32;
    for (unsigned offset = 16; offset > 0; offset /= 2) {
        const T other = __shfl_down_sync(mask, v, offset);
        // A source lane past the end does not exist: its value is undefined.
        if (lane + offset < lanes) v += other;
    }
    return v;
}

// The sum of `v` over the block, returned to every thread. `scratch` is shared memory of at
// least 33 elements; it is free again when the call returns (the last barrier sees to that), so
// one scratch array serves any number of calls.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    const unsigned warp = threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    const unsigned warps = (blockDim.x + 31) / 32;
    const unsigned left = blockDim.x - warp * 32;
    v = warp_sum(v, left < 32 ? left : 32);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T w = lane < warps ? scratch[lane] : T(0);
        w = warp_sum(w, blockDim.x < 32 ? blockDim.x : 32);
        if (lane == 0) scratch[32] = w;
    }
    __syncthreads();
    const T total = scratch[32];
    __syncthreads();
    return total;
}

