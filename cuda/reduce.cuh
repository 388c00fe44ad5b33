// Deterministic reductions over a warp and over a block: sums for kernels that reduce in fp32
// or fp64 (`T` float or double), and any associative combination of a state (the scoring's
// running log-sum-exp). The order of the combinations depends only on blockDim, never on
// scheduling, so a result is the same bit for bit from run to run. Blocks are 1-D and of any
// size (partial last warps included).
#pragma once

#include "contralign.cuh"

// `v` of the lane `offset` lanes down the warp. A struct that warp_reduce combines overloads
// it beside its own type (argument-dependent lookup finds it), shuffling field by field.
template <class T>
__device__ __forceinline__ T shuffle_down(unsigned mask, T v, unsigned offset) {
    return __shfl_down_sync(mask, v, offset);
}

struct Add {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const {
        return a + b;
    }
};

// `combine` over the first `lanes` lanes of the calling warp, in lane 0 (the other lanes get
// partial results), a lane's value always on the left of a later lane's. Every lane of the
// first `lanes` must call it.
template <class T, class Combine>
__device__ __forceinline__ T warp_reduce(T v, unsigned lanes, Combine combine) {
    const unsigned mask = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
    const unsigned lane = threadIdx.x % 32;
    for (unsigned offset = 16; offset > 0; offset /= 2) {
        const T other = shuffle_down(mask, v, offset);
        // A source lane past the end does not exist: its value is undefined.
        if (lane + offset < lanes) v = combine(v, other);
    }
    return v;
}

// `combine` over the block, returned to every thread; `empty` is its identity. `scratch` is
// shared memory of at least 33 elements; it is free again when the call returns (the last
// barrier sees to that), so one scratch array serves any number of calls.
template <class T, class Combine>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T empty, Combine combine) {
    const unsigned warp = threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    const unsigned warps = (blockDim.x + 31) / 32;
    const unsigned left = blockDim.x - warp * 32;
    v = warp_reduce(v, left < 32 ? left : 32, combine);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T w = lane < warps ? scratch[lane] : empty;
        w = warp_reduce(w, blockDim.x < 32 ? blockDim.x : 32, combine);
        if (lane == 0) scratch[32] = w;
    }
    __syncthreads();
    const T total = scratch[32];
    __syncthreads();
    return total;
}

// The sum of `v` over the first `lanes` lanes of the calling warp, in lane 0.
template <class T>
__device__ __forceinline__ T warp_sum(T v, unsigned lanes) {
    return warp_reduce(v, lanes, Add{});
}

// The sum of `v` over the block, returned to every thread (`scratch` as block_reduce's).
template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    return block_reduce(v, scratch, T(0), Add{});
}
