// Included first by every kernel file. Under nvcc it brings in the CUDA headers the kernels
// use; under the host C++ compiler it brings in the emulator (cuda/emu/, see README.md), so
// that the same source runs on a GPU and on the CPU.
//
// Every kernel is `extern "C" __global__` (an unmangled name to look up in the PTX) and is
// followed, at the start of a line, by `CONTRALIGN_KERNEL(name)`: build.rs collects those
// lines into the tables of launchable kernels, and the emulator turns each into a C entry
// point. Under nvcc the macro expands to nothing.
#pragma once

#ifdef __CUDACC__
#include <cassert>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define CONTRALIGN_KERNEL(name)
#else
#include "emu/cuda_emu.h"
#endif

// Loops over a thread's array slots (accumulators, packs) must unroll for the slots to live
// in registers.
#ifdef __CUDACC__
#define CONTRALIGN_UNROLL _Pragma("unroll")
#else
#define CONTRALIGN_UNROLL
#endif

// Element conversions shared by kernels that are templates over their storage type: values
// are loaded into fp32, computed in fp32 and rounded once when stored (docs/numerics.md §2).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// 16 bytes of elements that a thread loads or stores whole (ld.global.v4 / st.global.v4 on a
// GPU, llm.c's x128): the widest access, and the one that moves the most bytes per
// instruction. The address must be 16-byte aligned: a misaligned 16-byte access faults on a
// GPU, and fails the launch in the emulator.
template <class T>
struct alignas(16) Pack128 {
    static constexpr int size = 16 / sizeof(T);
    T v[size];
    __device__ __forceinline__ T& operator[](int i) { return v[i]; }
    __device__ __forceinline__ const T& operator[](int i) const { return v[i]; }
};

// Whether `p` may be given to load128/store128.
__device__ __forceinline__ bool aligned128(const void* p) {
    return reinterpret_cast<unsigned long long>(p) % 16 == 0;
}

template <class T>
__device__ __forceinline__ Pack128<T> load128(const T* p) {
    Pack128<T> pack;
#ifdef __CUDACC__
    const int4 bits = *reinterpret_cast<const int4*>(p);
    memcpy(&pack, &bits, 16);
#else
    ::contralign_emu::require_aligned(p, 16, "load128");
    memcpy(&pack, p, 16);
#endif
    return pack;
}

template <class T>
__device__ __forceinline__ void store128(T* p, const Pack128<T>& pack) {
#ifdef __CUDACC__
    int4 bits;
    memcpy(&bits, &pack, 16);
    *reinterpret_cast<int4*>(p) = bits;
#else
    ::contralign_emu::require_aligned(p, 16, "store128");
    memcpy(p, &pack, 16);
#endif
}

// 8 bytes of elements a thread loads or stores whole (ld.global.v2): the bf16 side of a
// kernel whose threads take 4 elements of each store, 16 bytes of the f32 ones, so that a
// warp's lanes cover consecutive bytes in every store. Aligned as Pack128 must be, to 8.
template <class T>
struct alignas(8) Pack64 {
    static constexpr int size = 8 / sizeof(T);
    T v[size];
    __device__ __forceinline__ T& operator[](int i) { return v[i]; }
    __device__ __forceinline__ const T& operator[](int i) const { return v[i]; }
};

template <class T>
__device__ __forceinline__ Pack64<T> load64(const T* p) {
    Pack64<T> pack;
#ifdef __CUDACC__
    const uint2 bits = *reinterpret_cast<const uint2*>(p);
    memcpy(&pack, &bits, 8);
#else
    ::contralign_emu::require_aligned(p, 8, "load64");
    memcpy(&pack, p, 8);
#endif
    return pack;
}

template <class T>
__device__ __forceinline__ void store64(T* p, const Pack64<T>& pack) {
#ifdef __CUDACC__
    uint2 bits;
    memcpy(&bits, &pack, 8);
    *reinterpret_cast<uint2*>(p) = bits;
#else
    ::contralign_emu::require_aligned(p, 8, "store64");
    memcpy(p, &pack, 8);
#endif
}

// W consecutive elements of a store in one access of W * sizeof(T) bytes, 16 (Pack128) or 8
// (Pack64), into or out of a thread's array.
template <int W, class T>
__device__ __forceinline__ void load_elements(const T* p, T (&out)[W]) {
    if constexpr (W * sizeof(T) == 16) {
        const Pack128<T> pack = load128(p);
        CONTRALIGN_UNROLL
        for (int k = 0; k < W; ++k) out[k] = pack[k];
    } else {
        static_assert(W * sizeof(T) == 8, "an access of 8 or 16 bytes");
        const Pack64<T> pack = load64(p);
        CONTRALIGN_UNROLL
        for (int k = 0; k < W; ++k) out[k] = pack[k];
    }
}

template <int W, class T>
__device__ __forceinline__ void store_elements(T* p, const T (&in)[W]) {
    if constexpr (W * sizeof(T) == 16) {
        Pack128<T> pack;
        CONTRALIGN_UNROLL
        for (int k = 0; k < W; ++k) pack[k] = in[k];
        store128(p, pack);
    } else {
        static_assert(W * sizeof(T) == 8, "an access of 8 or 16 bytes");
        Pack64<T> pack;
        CONTRALIGN_UNROLL
        for (int k = 0; k < W; ++k) pack[k] = in[k];
        store64(p, pack);
    }
}
