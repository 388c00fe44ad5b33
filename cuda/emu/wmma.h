// The WMMA API (mma.h) for the emulator: bf16/f16 inputs, fp32 accumulation, any M x N x K
// the kernels name (the GPU supports m16n16k16, m32n8k16 and m8n32k16 for these types).
//
// How a GPU spreads a fragment over its warp's lanes is unspecified, so kernels may only
// touch `x[i]` uniformly (the same operation on every element). Here every lane holds the
// whole matrix, row-major, which satisfies every kernel that keeps to that rule. The *_sync
// calls are warp collectives over all 32 lanes, as on the GPU; they also check the pointer
// and leading-dimension alignment that the GPU requires (256-bit pointers, 16-byte ldm).
// Included by cuda_emu.h.
#pragma once

#include <cstdint>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <class Use, int M, int N, int K>
struct shape;
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};

template <class L>
constexpr bool is_col_major() {
    return std::is_same<L, col_major>::value;
}

// The arrival of all 32 lanes, then the alignment checks the GPU would fault on.
template <class T>
void enter(const char* what, const T* ptr, unsigned ldm) {
    __syncwarp();
    if (reinterpret_cast<std::uintptr_t>(ptr) % 32 != 0) {
        ::contralign_emu::rt::fail("wmma::%s: pointer %p is not 256-bit aligned", what,
                                   static_cast<const void*>(ptr));
    }
    if ((ldm * sizeof(T)) % 16 != 0) {
        ::contralign_emu::rt::fail("wmma::%s: ldm %u is not a multiple of 16 bytes", what, ldm);
    }
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static constexpr int rows = detail::shape<Use, M, N, K>::rows;
    static constexpr int cols = detail::shape<Use, M, N, K>::cols;
    enum { num_elements = rows * cols };
    // Row-major, whatever the memory layout it was loaded from.
    T x[num_elements];
};

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& value) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = value;
}

template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm) {
    static_assert(!std::is_void<Layout>::value, "matrix_a/matrix_b fragments carry a layout");
    detail::enter("load_matrix_sync", ptr, ldm);
    using F = fragment<Use, M, N, K, T, Layout>;
    for (int r = 0; r < F::rows; ++r) {
        for (int c = 0; c < F::cols; ++c) {
            f.x[r * F::cols + c] =
                detail::is_col_major<Layout>() ? ptr[c * ldm + r] : ptr[r * ldm + c];
        }
    }
}

template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* ptr, unsigned ldm,
                      layout_t layout) {
    detail::enter("load_matrix_sync", ptr, ldm);
    for (int r = 0; r < M; ++r) {
        for (int c = 0; c < N; ++c) {
            f.x[r * N + c] = layout == mem_col_major ? ptr[c * ldm + r] : ptr[r * ldm + c];
        }
    }
}

template <int M, int N, int K, class T>
void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout) {
    detail::enter("store_matrix_sync", ptr, ldm);
    // Every lane holds the whole tile here; lane 0 stores it, so that racecheck does not see
    // 32 lanes writing the same bytes (on a GPU each lane stores its own part).
    const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if (linear % 32 != 0) return;
    for (int r = 0; r < M; ++r) {
        for (int c = 0; c < N; ++c) {
            (layout == mem_col_major ? ptr[c * ldm + r] : ptr[r * ldm + c]) = f.x[r * N + c];
        }
    }
}

// d = a * b + c with products exact in fp32 (bf16 and f16 products fit) and fp32 sums in
// k order; d may be c.
template <int M, int N, int K, class Tin, class La, class Lb, class Tacc>
void mma_sync(fragment<accumulator, M, N, K, Tacc>& d,
              const fragment<matrix_a, M, N, K, Tin, La>& a,
              const fragment<matrix_b, M, N, K, Tin, Lb>& b,
              const fragment<accumulator, M, N, K, Tacc>& c) {
    __syncwarp();
    ::contralign_emu::rt::count_warp_flops(2ull * M * N * K);
    for (int i = 0; i < M; ++i) {
        for (int j = 0; j < N; ++j) {
            float acc = static_cast<float>(c.x[i * N + j]);
            for (int k = 0; k < K; ++k) {
                acc += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
            }
            d.x[i * N + j] = static_cast<Tacc>(acc);
        }
    }
}

}  // namespace wmma
}  // namespace nvcuda
