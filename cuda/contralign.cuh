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
// instruction; or 8 (ld.global.v2): the bf16 side of a kernel whose threads take 4 elements
// of each store, 16 bytes of the f32 ones, so that a warp's lanes cover consecutive bytes in
// every store. The address must be aligned to the pack's size: a misaligned vector access
// faults on a GPU, and fails the launch in the emulator.
template <class T, int kBytes>
struct alignas(kBytes) Pack {
    static constexpr int size = kBytes / sizeof(T);
    T v[size];
    __device__ __forceinline__ T& operator[](int i) { return v[i]; }
    __device__ __forceinline__ const T& operator[](int i) const { return v[i]; }
};
template <class T>
using Pack128 = Pack<T, 16>;

// Whether `p` may be given to load128/store128.
__device__ __forceinline__ bool aligned128(const void* p) {
    return reinterpret_cast<unsigned long long>(p) % 16 == 0;
}

#ifdef __CUDACC__
// The vector type of one access of kBytes.
template <int kBytes>
struct PackBits;
template <>
struct PackBits<16> {
    using type = int4;
};
template <>
struct PackBits<8> {
    using type = uint2;
};
#endif

// `what` names the access in the emulator's failure ("load128: misaligned 16-byte access").
template <int kBytes, class T>
__device__ __forceinline__ Pack<T, kBytes> load_pack(const T* p, const char* what) {
    Pack<T, kBytes> pack;
#ifdef __CUDACC__
    using Bits = typename PackBits<kBytes>::type;
    const Bits bits = *reinterpret_cast<const Bits*>(p);
    memcpy(&pack, &bits, kBytes);
#else
    ::contralign_emu::rt::vector_load(&pack, p, kBytes, what);
#endif
    return pack;
}

template <int kBytes, class T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kBytes>& pack, const char* what) {
#ifdef __CUDACC__
    using Bits = typename PackBits<kBytes>::type;
    Bits bits;
    memcpy(&bits, &pack, kBytes);
    *reinterpret_cast<Bits*>(p) = bits;
#else
    ::contralign_emu::rt::vector_store(p, &pack, kBytes, what);
#endif
}

template <class T>
__device__ __forceinline__ Pack128<T> load128(const T* p) {
    return load_pack<16>(p, "load128");
}

template <class T>
__device__ __forceinline__ void store128(T* p, const Pack128<T>& pack) {
    store_pack<16>(p, pack, "store128");
}

// W consecutive elements of a store in one access of W * sizeof(T) bytes, a Pack of 16 or 8
// bytes, into or out of a thread's array.
template <int W, class T>
__device__ __forceinline__ void load_elements(const T* p, T (&out)[W]) {
    constexpr int kBytes = W * sizeof(T);
    static_assert(kBytes == 8 || kBytes == 16, "an access of 8 or 16 bytes");
    const Pack<T, kBytes> pack = load_pack<kBytes>(p, "load_elements");
    CONTRALIGN_UNROLL
    for (int k = 0; k < W; ++k) out[k] = pack[k];
}

template <int W, class T>
__device__ __forceinline__ void store_elements(T* p, const T (&in)[W]) {
    constexpr int kBytes = W * sizeof(T);
    static_assert(kBytes == 8 || kBytes == 16, "an access of 8 or 16 bytes");
    Pack<T, kBytes> pack;
    CONTRALIGN_UNROLL
    for (int k = 0; k < W; ++k) pack[k] = in[k];
    store_pack<kBytes>(p, pack, "store_elements");
}

// P consecutive elements of a store, loaded into fp32 or stored from it, in accesses of 16
// bytes (P * sizeof(T) a multiple of 16), or one of 8 (the bf16 side of a 4-element chunk).
template <int P, class T>
struct ChunkAccess {
    static constexpr int bytes = P * sizeof(T) < 16 ? P * sizeof(T) : 16;
    static constexpr int elements = bytes / sizeof(T);
    static_assert(P % elements == 0, "whole accesses");
};

template <int P, class T>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[P]) {
    constexpr int E = ChunkAccess<P, T>::elements;
    CONTRALIGN_UNROLL
    for (int k = 0; k < P; k += E) {
        T part[E];
        load_elements<E>(p + k, part);
        CONTRALIGN_UNROLL
        for (int i = 0; i < E; ++i) out[k + i] = to_f32(part[i]);
    }
}

template <int P, class T>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[P]) {
    constexpr int E = ChunkAccess<P, T>::elements;
    CONTRALIGN_UNROLL
    for (int k = 0; k < P; k += E) {
        T part[E];
        CONTRALIGN_UNROLL
        for (int i = 0; i < E; ++i) part[i] = from_f32<T>(in[k + i]);
        store_elements<E>(p + k, part);
    }
}

// The elements of the chunk of P at j of a row of n: P, or fewer at the row's end.
template <int P>
__device__ __forceinline__ int chunk_count(long long n, long long j) {
    return n - j < P ? static_cast<int>(n - j) : P;
}

// A chunk of a store: `count` (at most P) consecutive elements at p, in vector accesses when
// `vector` (p 16-byte aligned) and the chunk is whole, else one element at a time; the
// elements past `count` read as 0 and are not stored. For the chunks of a row that a block's
// threads share, RowChunks below keeps a warp's accesses coalesced where vectors do not fit.
template <int P, class T>
__device__ __forceinline__ void load_chunk(const T* p, int count, bool vector, float (&out)[P]) {
    if (vector && count == P) {
        load_f32(p, out);
        return;
    }
    CONTRALIGN_UNROLL
    for (int k = 0; k < P; ++k) out[k] = k < count ? to_f32(p[k]) : 0.0f;
}

template <int P, class T>
__device__ __forceinline__ void store_chunk(T* p, int count, bool vector, const float (&in)[P]) {
    if (vector && count == P) {
        store_f32(p, in);
        return;
    }
    CONTRALIGN_UNROLL
    for (int k = 0; k < P; ++k) {
        if (k < count) p[k] = from_f32<T>(in[k]);
    }
}

// A row of n elements cut into `chunks` chunks of up to P, which a kernel's threads take by
// chunk index c (consecutive lanes, consecutive c). Where every buffer of the kernel is
// 16-byte aligned (`aligned`) and n is whole chunks, chunk c is the P consecutive elements at
// c * P, moved in 16-byte accesses (8 for the bf16 side of P = 4). Else chunk c is the
// elements c, c + chunks, c + 2 * chunks, ... moved one at a time: consecutive lanes then still
// touch consecutive elements, where P consecutive elements a lane would spread a warp's
// request over P times the sectors (coalescing 1/P on a GPU). Any element order suits the
// kernels that use it: per-element maps, and sums checked against error bounds, whose order
// (thus last bits) depends on the shape and on the alignment of the buffers. The engine's
// buffers are aligned (arena regions at multiples of 256 bytes, the flat store's spans at
// multiples of 128 elements), so a given shape always takes the same order there.
template <int P>
struct RowChunks {
    int n;
    int chunks;
    bool vector;

    __device__ __forceinline__ RowChunks(int n, bool aligned)
        : n(n), chunks((n + P - 1) / P), vector(aligned && n % P == 0) {}

    // Chunk c's elements: P, or fewer where the row is not whole chunks (the later chunks,
    // or all of them when n < 2P: n = 9 makes chunks of 5 and 4).
    __device__ __forceinline__ int count(int c) const {
        return vector ? P : (n - c + chunks - 1) / chunks;
    }

    // Chunk c of the row at `row` into fp32; the elements past count(c) read as 0.
    template <class T>
    __device__ __forceinline__ void load(const T* row, int c, float (&out)[P]) const {
        if (vector) {
            load_f32(row + c * P, out);
            return;
        }
        const int m = count(c);
        CONTRALIGN_UNROLL
        for (int k = 0; k < P; ++k) out[k] = k < m ? to_f32(row[c + k * chunks]) : 0.0f;
    }

    // Chunk c of the row at `row` from fp32, rounded to T; the elements past count(c) are
    // not stored.
    template <class T>
    __device__ __forceinline__ void store(T* row, int c, const float (&in)[P]) const {
        if (vector) {
            store_f32(row + c * P, in);
            return;
        }
        const int m = count(c);
        CONTRALIGN_UNROLL
        for (int k = 0; k < P; ++k) {
            if (k < m) row[c + k * chunks] = from_f32<T>(in[k]);
        }
    }
};
