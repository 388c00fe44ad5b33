// 16 x 16 x 16 tile products of shared memory into fp32 accumulators, shared by the
// kernels that multiply tiles (attention.cu, moe_gemm.cu).
#pragma once

#include "contralign.cuh"

// `Mma<T>` multiplies 16 x 16 blocks of shared memory into an fp32 accumulator held by one
// warp: nn (a row-major, b row-major), nt (b read transposed: b[j][k]), tn (a read transposed:
// a[k][i]). Leading dimensions are in elements; pointers 32-byte aligned, leading dimensions
// multiples of 16 bytes (WMMA's rules). The element layout of an accumulator is the
// implementation's, so kernels touch accumulators only through these functions.

template <class T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
    using T = __nv_bfloat16;
    using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
    template <class L>
    using A = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, L>;
    template <class L>
    using B = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, L>;

    static __device__ __forceinline__ void zero(Acc& c) { nvcuda::wmma::fill_fragment(c, 0.0f); }

    template <class La, class Lb>
    static __device__ __forceinline__ void mma(Acc& c, const T* a, int lda, const T* b, int ldb) {
        A<La> fa;
        B<Lb> fb;
        nvcuda::wmma::load_matrix_sync(fa, a, lda);
        nvcuda::wmma::load_matrix_sync(fb, b, ldb);
        nvcuda::wmma::mma_sync(c, fa, fb, c);
    }
    static __device__ __forceinline__ void nn(Acc& c, const T* a, int lda, const T* b, int ldb) {
        mma<nvcuda::wmma::row_major, nvcuda::wmma::row_major>(c, a, lda, b, ldb);
    }
    static __device__ __forceinline__ void nt(Acc& c, const T* a, int lda, const T* b, int ldb) {
        mma<nvcuda::wmma::row_major, nvcuda::wmma::col_major>(c, a, lda, b, ldb);
    }
    static __device__ __forceinline__ void tn(Acc& c, const T* a, int lda, const T* b, int ldb) {
        mma<nvcuda::wmma::col_major, nvcuda::wmma::row_major>(c, a, lda, b, ldb);
    }
    // Row-major fp32 store and load; the caller orders them against other lanes' accesses.
    static __device__ __forceinline__ void store(float* p, const Acc& c, int ld) {
        nvcuda::wmma::store_matrix_sync(p, c, ld, nvcuda::wmma::mem_row_major);
    }
    static __device__ __forceinline__ void load(Acc& c, const float* p, int ld) {
        nvcuda::wmma::load_matrix_sync(c, p, ld, nvcuda::wmma::mem_row_major);
    }
};

// fp32: lane l holds elements e = l + 32 i (i < 8) of the 16 x 16 block, row e / 16, column
// e % 16. The 16 lanes of a row read one a value (a broadcast) and 16 consecutive b values.
template <>
struct Mma<float> {
    using T = float;
    struct Acc {
        float x[8];
    };

    static __device__ __forceinline__ int lane() { return static_cast<int>(threadIdx.x % 32); }

    static __device__ __forceinline__ void zero(Acc& c) {
CONTRALIGN_UNROLL
        for (int i = 0; i < 8; ++i) c.x[i] = 0.0f;
    }
    // c[r][col] += sum_k a(r, k) b(k, col), a(r, k) = a[r * ar + k * ak], b likewise.
    static __device__ __forceinline__ void mma(Acc& c, const T* a, int ar, int ak, const T* b,
                                               int bk, int bc) {
        const int col = lane() % 16;
CONTRALIGN_UNROLL
        for (int i = 0; i < 8; ++i) {
            const int r = lane() / 16 + 2 * i;
            float acc = c.x[i];
CONTRALIGN_UNROLL
            for (int k = 0; k < 16; ++k) acc = fmaf(a[r * ar + k * ak], b[k * bk + col * bc], acc);
            c.x[i] = acc;
        }
    }
    static __device__ __forceinline__ void nn(Acc& c, const T* a, int lda, const T* b, int ldb) {
        mma(c, a, lda, 1, b, ldb, 1);
    }
    static __device__ __forceinline__ void nt(Acc& c, const T* a, int lda, const T* b, int ldb) {
        mma(c, a, lda, 1, b, 1, ldb);
    }
    static __device__ __forceinline__ void tn(Acc& c, const T* a, int lda, const T* b, int ldb) {
        mma(c, a, 1, lda, b, ldb, 1);
    }
    static __device__ __forceinline__ void store(float* p, const Acc& c, int ld) {
CONTRALIGN_UNROLL
        for (int i = 0; i < 8; ++i) p[(lane() / 16 + 2 * i) * ld + lane() % 16] = c.x[i];
    }
    static __device__ __forceinline__ void load(Acc& c, const float* p, int ld) {
CONTRALIGN_UNROLL
        for (int i = 0; i < 8; ++i) c.x[i] = p[(lane() / 16 + 2 * i) * ld + lane() % 16];
    }
};
