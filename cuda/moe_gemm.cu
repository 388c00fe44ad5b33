// The experts' projections over rows in expert order (docs/architecture.md §6): each expert's
// contiguous rows times its own weight, the rows of each expert read on the device from
// `offsets` (E + 1 of them, moe_offsets' expert_offsets), so that the host never needs them.
// The CPU reference is the per-expert loop of src/ops/cpu (`expert_matmul`).
//
//   moe_gemm_forward_*    y[r] = x[r] · W_eᵀ   x [R, K], W_e [N, K], y [R, N]   (overwrites y)
//   moe_gemm_input_*      dx[r] = dy[r] · W_e  dy [R, K], W_e [K, N], dx [R, N] (overwrites dx)
//   moe_gemm_weight_*_*   dW_e += dy_eᵀ · x_e  dy [R, M], x [R, N], dW_e [M, N]
//                         (or dW_e = dy_eᵀ · x_e with `accumulate` 0)
//
// where r runs over expert e's rows. Expert e's weight (or gradient) is at `w + e * w_stride`:
// the flat parameter store lays the experts out at one stride. An expert without rows leaves
// its gradient as it was when accumulating, and gets zeros when not. Not accumulating is how
// a step writes gradients it has not written yet (docs/cuda.md, "Fresh gradients"): their
// old bytes are neither zeroed first nor read.
//
// Tiling: blocks of 4 warps own a 64 x 64 tile of the output; each warp a 32 x 32 quadrant of
// 2 x 2 fragments (`Mma` of mma.cuh: WMMA, tensor cores with fp32 accumulation, for bf16;
// FMAs for f32). K advances in steps of 32, both operands staged in shared memory by 16-byte
// loads where the rows allow them, rows padded by 16 bytes so that a fragment's rows fall on
// different banks. The products accumulate in fp32 and are rounded once when stored (for the
// weight gradient: once, after adding the old value).
//
// Grids. Forward and input: grid.x walks the experts' row tiles, expert e having
// ceil(n_e / 64) of them, at most ceil(R / 64) + E in all (the host launches that many); a
// block past the last exits before any barrier. grid.y is the output's column tiles. The
// weight gradient: (column tiles, row tiles, experts); a block loops over its expert's rows.
// Each output element belongs to one block and is summed in a fixed order: the bits do not
// depend on the schedule.
#include "contralign.cuh"
#include "mma.cuh"

namespace {

constexpr int kTile = 64;  // output rows and columns of a block
constexpr int kStep = 32;  // K per shared-memory stage
constexpr int kThreads = 128;
// Output columns a thread writes at once (Quadrant::write).
constexpr int kOutChunk = 4;
// Blocks per SM the register budget is set for (128 registers a thread): ptxas's own choice
// on sm_90, 64, spills the input gradient's accumulators.
constexpr int kMinBlocks = 4;

// Shared-memory layout of one stage and of the fp32 output tile (which reuses it).
template <class T>
struct Stage {
    static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
    static constexpr int kRowLd = kStep + kPad;  // a [64][32] operand, rows along M or N
    static constexpr int kColLd = kTile + kPad;  // a [32][64] operand, rows along K
    static constexpr int kOperandBytes = kTile * kRowLd * static_cast<int>(sizeof(T));
    static constexpr int kOutLd = kTile + 4;
    static constexpr int kOutBytes = kTile * kOutLd * 4;
    static constexpr int kBytes =
        2 * kOperandBytes > kOutBytes ? 2 * kOperandBytes : kOutBytes;
};
static_assert(Stage<float>::kRowLd * kTile >= Stage<float>::kColLd * kStep, "operand size");
static_assert(Stage<__nv_bfloat16>::kRowLd * kTile >= Stage<__nv_bfloat16>::kColLd * kStep,
              "operand size");

// Copies a `rows` x `cols` block of row-major `src` (row stride `src_ld` elements) into
// `dst` (row stride `ld`); elements at or past `valid_rows` / `valid_cols` become zeros and
// are not read. 16-byte loads where the rows start 16-byte aligned.
template <class T>
__device__ __forceinline__ void stage(T* dst, int ld, const T* src, long long src_ld, int rows,
                                      int cols, int valid_rows, int valid_cols) {
    constexpr int per_vec = 16 / static_cast<int>(sizeof(T));
    const bool vec_ok = src_ld % per_vec == 0 && aligned128(src);
    const int vecs = cols / per_vec;
    for (int i = threadIdx.x; i < rows * vecs; i += blockDim.x) {
        const int r = i / vecs, c = (i % vecs) * per_vec;
        T* out = dst + r * ld + c;
        const T* in = src + r * src_ld + c;
        if (vec_ok && r < valid_rows && c + per_vec <= valid_cols) {
            store128(out, load128(in));
        } else {
            Pack128<T> v;
            for (int j = 0; j < per_vec; ++j) {
                v[j] = r < valid_rows && c + j < valid_cols ? in[j] : from_f32<T>(0.0f);
            }
            store128(out, v);
        }
    }
}

// The accumulators of a block: warp w owns rows 32 (w / 2) .. and columns 32 (w % 2) ...
template <class T>
struct Quadrant {
    typename Mma<T>::Acc acc[2][2];

    __device__ __forceinline__ int row(int i) const {
        return (threadIdx.x / 32) / 2 * 32 + 16 * i;
    }
    __device__ __forceinline__ int col(int j) const {
        return (threadIdx.x / 32) % 2 * 32 + 16 * j;
    }
    __device__ __forceinline__ void zero() {
CONTRALIGN_UNROLL
        for (int i = 0; i < 2; ++i)
CONTRALIGN_UNROLL
            for (int j = 0; j < 2; ++j) Mma<T>::zero(acc[i][j]);
    }
    // One stage's products: `product(acc, kk, row, col)` for each fragment (its first row and
    // column in the tile) and each 16-wide step `kk` of the stage's K.
    template <class Product>
    __device__ __forceinline__ void multiply(Product product) {
CONTRALIGN_UNROLL
        for (int kk = 0; kk < kStep; kk += 16) {
CONTRALIGN_UNROLL
            for (int i = 0; i < 2; ++i) {
CONTRALIGN_UNROLL
                for (int j = 0; j < 2; ++j) product(acc[i][j], kk, row(i), col(j));
            }
        }
    }
    // After the last product: the 64 x 64 tile through shared fp32 (leading dimension
    // Stage<T>::kOutLd, over the operands, behind barriers on both sides), then
    // `write(r, col, count, values)` for each chunk of kOutChunk columns in its first `rows` x
    // `cols` (`count` of them below `cols`), consecutive threads on consecutive chunks: 16
    // bytes of an f32 output, 8 of a bf16 one.
    template <class Write>
    __device__ __forceinline__ void write(unsigned char* smem, int rows, int cols,
                                          Write write) const {
        float* out = reinterpret_cast<float*>(smem);
        __syncthreads();
CONTRALIGN_UNROLL
        for (int i = 0; i < 2; ++i)
CONTRALIGN_UNROLL
            for (int j = 0; j < 2; ++j)
                Mma<T>::store(out + row(i) * Stage<T>::kOutLd + col(j), acc[i][j],
                              Stage<T>::kOutLd);
        __syncthreads();
        constexpr int kChunks = kTile / kOutChunk;
        for (int i = threadIdx.x; i < kTile * kChunks; i += blockDim.x) {
            const int r = i / kChunks, c = i % kChunks * kOutChunk;
            if (r >= rows || c >= cols) continue;
            float values[kOutChunk];
CONTRALIGN_UNROLL
            for (int k = 0; k < kOutChunk; ++k) values[k] = out[r * Stage<T>::kOutLd + c + k];
            write(r, c, chunk_count<kOutChunk>(cols, c), values);
        }
    }
};

// Which expert's rows block `tile` covers, and where they start: false past the last tile.
__device__ __forceinline__ bool find_row_tile(const unsigned* offsets, int experts, int tile,
                                              int* expert, int* row0, int* rows) {
    for (int e = 0; e < experts; ++e) {
        const int n = static_cast<int>(offsets[e + 1] - offsets[e]);
        const int tiles = (n + kTile - 1) / kTile;
        if (tile < tiles) {
            *expert = e;
            *row0 = static_cast<int>(offsets[e]) + tile * kTile;
            *rows = n - tile * kTile < kTile ? n - tile * kTile : kTile;
            return true;
        }
        tile -= tiles;
    }
    return false;
}

// c[r] = a[r] · op(W_e) over one row tile of one expert: kWeightRows, W_e is [N, K] (a
// projection's forward); otherwise [K, N] (its input gradient).
template <class T, bool kWeightRows>
__device__ void expert_rows_gemm(const T* __restrict__ a, const T* __restrict__ w,
                                 long long w_stride, T* __restrict__ c,
                                 const unsigned* __restrict__ offsets, int experts, int K,
                                 int N) {
    using S = Stage<T>;
    __shared__ __align__(128) unsigned char smem[Stage<T>::kBytes];
    int e, row0, rows;
    if (!find_row_tile(offsets, experts, blockIdx.x, &e, &row0, &rows)) return;
    const int n0 = blockIdx.y * kTile;
    const T* we = w + e * w_stride;
    T* as = reinterpret_cast<T*>(smem);
    T* bs = reinterpret_cast<T*>(smem + S::kOperandBytes);
    Quadrant<T> q;
    q.zero();
    for (int k0 = 0; k0 < K; k0 += kStep) {
        __syncthreads();
        stage(as, S::kRowLd, a + static_cast<long long>(row0) * K + k0, K, kTile, kStep, rows,
              K - k0);
        if (kWeightRows) {
            stage(bs, S::kRowLd, we + static_cast<long long>(n0) * K + k0, K, kTile, kStep,
                  N - n0, K - k0);
        } else {
            stage(bs, S::kColLd, we + static_cast<long long>(k0) * N + n0, N, kStep, kTile,
                  K - k0, N - n0);
        }
        __syncthreads();
        q.multiply([&](typename Mma<T>::Acc& acc, int kk, int row, int col) {
            const T* ap = as + row * S::kRowLd + kk;
            if (kWeightRows) {
                Mma<T>::nt(acc, ap, S::kRowLd, bs + col * S::kRowLd + kk, S::kRowLd);
            } else {
                Mma<T>::nn(acc, ap, S::kRowLd, bs + kk * S::kColLd + col, S::kColLd);
            }
        });
    }
    // Rows of whole chunks from an aligned start keep every chunk aligned.
    const bool vector = N % kOutChunk == 0 && aligned128(c);
    q.write(smem, rows, N - n0, [&](int r, int col, int count, const float (&values)[kOutChunk]) {
        store_chunk(c + static_cast<long long>(row0 + r) * N + n0 + col, count, vector, values);
    });
}

// dW_e [M, N] += dy_eᵀ · x_e over expert e's rows (`=` unless `accumulate`), one 64 x 64
// tile of dW_e.
template <class T, class G>
__device__ void expert_weight_gemm(const T* __restrict__ dy, const T* __restrict__ x,
                                   G* __restrict__ dw, long long w_stride,
                                   const unsigned* __restrict__ offsets, int M, int N,
                                   bool accumulate) {
    using S = Stage<T>;
    __shared__ __align__(128) unsigned char smem[Stage<T>::kBytes];
    const int e = blockIdx.z;
    const int begin = static_cast<int>(offsets[e]);
    const int rows = static_cast<int>(offsets[e + 1]) - begin;
    if (rows == 0 && accumulate) return;
    const int m0 = blockIdx.y * kTile, n0 = blockIdx.x * kTile;
    T* as = reinterpret_cast<T*>(smem);
    T* bs = reinterpret_cast<T*>(smem + S::kOperandBytes);
    Quadrant<T> q;
    q.zero();
    for (int k0 = 0; k0 < rows; k0 += kStep) {
        const long long r0 = begin + k0;
        __syncthreads();
        stage(as, S::kColLd, dy + r0 * M + m0, M, kStep, kTile, rows - k0, M - m0);
        stage(bs, S::kColLd, x + r0 * N + n0, N, kStep, kTile, rows - k0, N - n0);
        __syncthreads();
        q.multiply([&](typename Mma<T>::Acc& acc, int kk, int row, int col) {
            Mma<T>::tn(acc, as + kk * S::kColLd + row, S::kColLd, bs + kk * S::kColLd + col,
                       S::kColLd);
        });
    }
    G* dwe = dw + e * w_stride;
    const bool vector = N % kOutChunk == 0 && aligned128(dwe);
    q.write(smem, M - m0, N - n0, [&](int r, int col, int count, const float (&values)[kOutChunk]) {
        G* p = dwe + static_cast<long long>(m0 + r) * N + n0 + col;
        if (!accumulate) {
            store_chunk(p, count, vector, values);
            return;
        }
        float sum[kOutChunk];
        load_chunk(p, count, vector, sum);
CONTRALIGN_UNROLL
        for (int k = 0; k < kOutChunk; ++k) sum[k] += values[k];
        store_chunk(p, count, vector, sum);
    });
}

}  // namespace

#define CONTRALIGN_MOE_GEMM_KERNELS(suffix, T)                                                  \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) moe_gemm_forward_##suffix(           \
        const T* x, const T* w, long long w_stride, T* y, const unsigned* offsets,             \
        int experts, int K, int N) {                                                           \
        expert_rows_gemm<T, true>(x, w, w_stride, y, offsets, experts, K, N);                  \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) moe_gemm_input_##suffix(             \
        const T* dy, const T* w, long long w_stride, T* dx, const unsigned* offsets,           \
        int experts, int K, int N) {                                                           \
        expert_rows_gemm<T, false>(dy, w, w_stride, dx, offsets, experts, K, N);               \
    }

#define CONTRALIGN_MOE_WEIGHT_KERNEL(suffix, T, G)                                              \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) moe_gemm_weight_##suffix(            \
        const T* dy, const T* x, G* dw, long long w_stride, const unsigned* offsets, int M,     \
        int N, int accumulate) {                                                               \
        expert_weight_gemm<T, G>(dy, x, dw, w_stride, offsets, M, N, accumulate != 0);         \
    }

CONTRALIGN_MOE_GEMM_KERNELS(f32, float)
CONTRALIGN_KERNEL(moe_gemm_forward_f32)
CONTRALIGN_KERNEL(moe_gemm_input_f32)
CONTRALIGN_MOE_GEMM_KERNELS(bf16, __nv_bfloat16)
CONTRALIGN_KERNEL(moe_gemm_forward_bf16)
CONTRALIGN_KERNEL(moe_gemm_input_bf16)
CONTRALIGN_MOE_WEIGHT_KERNEL(f32_f32, float, float)
CONTRALIGN_KERNEL(moe_gemm_weight_f32_f32)
CONTRALIGN_MOE_WEIGHT_KERNEL(bf16_f32, __nv_bfloat16, float)
CONTRALIGN_KERNEL(moe_gemm_weight_bf16_f32)
CONTRALIGN_MOE_WEIGHT_KERNEL(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
CONTRALIGN_KERNEL(moe_gemm_weight_bf16_bf16)
