// RMSNorm fused with the residual add that precedes it in a pre-norm block:
//   h = x + residual,  y = w * h / sqrt(mean(h²) + eps)
// with fp32 statistics whatever the storage. One block per row (grid-stride over rows), its
// threads over 16-byte chunks of the row.
//
// The forward stores h (the residual stream for the next block) and the row's 1/rms; h is
// rounded to the storage type before the statistics are taken, so that the backward, which
// reads the stored h, differentiates the function the forward computed. (The backward sums
// h² in chunks of 4 elements, a bf16 forward in chunks of 8: the two 1/rms may differ in
// their last bit.)
//
// The backward returns dh = d(loss)/dh (plus the gradient arriving through the residual
// stream, when given), taking 1/rms again from the stored h, and accumulates dw in two
// deterministic passes: each block sums its rows into its own row of
// `dw_partial [gridDim.x, d]`, then `rmsnorm_dw_reduce_*` adds those rows into dw (fp32 or
// bf16) in block order (or writes their sum over a fresh dw).
#include "contralign.cuh"
#include "reduce.cuh"

namespace {

// Each thread takes chunks of P = Pack128<T>::size elements of a row (RowChunks), 16-byte
// accesses where every buffer is aligned and d a multiple of P.
//
// `residual` may be null (h = x); `h_out` may be null (h is not stored) or alias x or
// residual: every element is read and written by the same thread.
template <class T>
__device__ void rmsnorm_forward(const T* x, const T* residual, const T* __restrict__ w, T* h_out,
                                T* __restrict__ y, float* __restrict__ rstd, int rows, int d,
                                float eps) {
    constexpr int P = Pack128<T>::size;
    __shared__ float scratch[33];
    const RowChunks<P> row(d, aligned128(x) && aligned128(w) &&
                                  (residual == nullptr || aligned128(residual)) &&
                                  (h_out == nullptr || aligned128(h_out)) && aligned128(y));
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long base = static_cast<long long>(r) * d;
        float squares = 0.0f;
        for (int c = threadIdx.x; c < row.chunks; c += blockDim.x) {
            float h[P];
            row.load(x + base, c, h);
            if (residual != nullptr) {
                float res[P];
                row.load(residual + base, c, res);
                CONTRALIGN_UNROLL
                for (int k = 0; k < P; ++k) h[k] += res[k];
            }
            CONTRALIGN_UNROLL
            for (int k = 0; k < P; ++k) h[k] = to_f32(from_f32<T>(h[k]));
            if (h_out != nullptr) row.store(h_out + base, c, h);
            // Past the chunk's count, h is 0 and adds nothing.
            CONTRALIGN_UNROLL
            for (int k = 0; k < P; ++k) squares += h[k] * h[k];
        }
        const float inv_rms = rsqrtf(block_sum(squares, scratch) / d + eps);
        if (threadIdx.x == 0) rstd[r] = inv_rms;
        for (int c = threadIdx.x; c < row.chunks; c += blockDim.x) {
            float h[P], wj[P];
            if (h_out != nullptr) {
                row.load(h_out + base, c, h);
            } else {
                row.load(x + base, c, h);
                if (residual != nullptr) {
                    float res[P];
                    row.load(residual + base, c, res);
                    CONTRALIGN_UNROLL
                    for (int k = 0; k < P; ++k) h[k] = to_f32(from_f32<T>(h[k] + res[k]));
                }
            }
            row.load(w, c, wj);
            float out[P];
            CONTRALIGN_UNROLL
            for (int k = 0; k < P; ++k) out[k] = wj[k] * (h[k] * inv_rms);
            row.store(y + base, c, out);
        }
    }
}

// dh_j = r (w_j dy_j - h_j r² mean_i(w_i dy_i h_i)) + dh_in_j;  dw_j += dy_j h_j r, where
// r = 1/rms(h) is taken again from h here: the first pass over a row sums h² and w dy h, the
// second writes dh and the partial row (a separate launch for r would read h once more).
// `dh_in` may be null; `dh` may alias dh_in or dy. Chunks of 4 elements: 16 bytes of the fp32
// partial rows, 8 of a bf16 row, so that a warp's lanes cover consecutive bytes of both.
template <class T>
__device__ void rmsnorm_backward(const T* __restrict__ h, const T* __restrict__ w, const T* dy,
                                 const T* dh_in, T* dh, float* __restrict__ dw_partial,
                                 int rows, int d, float eps) {
    constexpr int P = Pack128<float>::size;
    __shared__ float scratch[33];
    float* partial = dw_partial + static_cast<long long>(blockIdx.x) * d;
    const RowChunks<P> row(d, aligned128(h) && aligned128(w) && aligned128(dy) &&
                                  (dh_in == nullptr || aligned128(dh_in)) && aligned128(dh) &&
                                  aligned128(dw_partial));
    const float zeros[P] = {};
    for (int c = threadIdx.x; c < row.chunks; c += blockDim.x) row.store(partial, c, zeros);
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long base = static_cast<long long>(r) * d;
        // dy, h and w at chunk c.
        auto load = [&](int c, float (&g)[P], float (&hj)[P], float (&wj)[P]) {
            row.load(dy + base, c, g);
            row.load(h + base, c, hj);
            row.load(w, c, wj);
        };
        float squares = 0.0f, proj = 0.0f;
        for (int c = threadIdx.x; c < row.chunks; c += blockDim.x) {
            float g[P], hj[P], wj[P];
            load(c, g, hj, wj);
            CONTRALIGN_UNROLL
            for (int k = 0; k < P; ++k) {
                squares += hj[k] * hj[k];
                proj += wj[k] * g[k] * hj[k];
            }
        }
        const float inv_rms = rsqrtf(block_sum(squares, scratch) / d + eps);
        const float coef = inv_rms * inv_rms * block_sum(proj, scratch) / d;
        for (int c = threadIdx.x; c < row.chunks; c += blockDim.x) {
            float g[P], hj[P], wj[P], part[P], out[P];
            load(c, g, hj, wj);
            // Only this thread touches these columns of this block's partial row.
            row.load(partial, c, part);
            CONTRALIGN_UNROLL
            for (int k = 0; k < P; ++k) {
                part[k] += g[k] * hj[k] * inv_rms;
                out[k] = inv_rms * (wj[k] * g[k] - hj[k] * coef);
            }
            row.store(partial, c, part);
            if (dh_in != nullptr) {
                float extra[P];
                row.load(dh_in + base, c, extra);
                CONTRALIGN_UNROLL
                for (int k = 0; k < P; ++k) out[k] += extra[k];
            }
            row.store(dh + base, c, out);
        }
    }
}

}  // namespace

extern "C" __global__ void rmsnorm_forward_f32(const float* x, const float* residual,
                                               const float* w, float* h_out, float* y,
                                               float* rstd, int rows, int d, float eps) {
    rmsnorm_forward(x, residual, w, h_out, y, rstd, rows, d, eps);
}
CONTRALIGN_KERNEL(rmsnorm_forward_f32)

extern "C" __global__ void rmsnorm_forward_bf16(const __nv_bfloat16* x,
                                                const __nv_bfloat16* residual,
                                                const __nv_bfloat16* w, __nv_bfloat16* h_out,
                                                __nv_bfloat16* y, float* rstd, int rows, int d,
                                                float eps) {
    rmsnorm_forward(x, residual, w, h_out, y, rstd, rows, d, eps);
}
CONTRALIGN_KERNEL(rmsnorm_forward_bf16)

extern "C" __global__ void rmsnorm_backward_f32(const float* h, const float* w, const float* dy,
                                                const float* dh_in, float* dh,
                                                float* dw_partial, int rows, int d, float eps) {
    rmsnorm_backward(h, w, dy, dh_in, dh, dw_partial, rows, d, eps);
}
CONTRALIGN_KERNEL(rmsnorm_backward_f32)

extern "C" __global__ void rmsnorm_backward_bf16(const __nv_bfloat16* h, const __nv_bfloat16* w,
                                                 const __nv_bfloat16* dy,
                                                 const __nv_bfloat16* dh_in, __nv_bfloat16* dh,
                                                 float* dw_partial, int rows, int d, float eps) {
    rmsnorm_backward(h, w, dy, dh_in, dh, dw_partial, rows, d, eps);
}
CONTRALIGN_KERNEL(rmsnorm_backward_bf16)

namespace {

// dw_j += sum over p of dw_partial[p, j], in order of p; `=` unless `accumulate` (a fresh
// gradient, whose old value is not read). A bf16 dw is read, added to in fp32 and rounded
// once: the bits of an fp32 copy accumulated and cast back, without the copy. Each thread
// takes chunks of 4 elements: 16 bytes of each fp32 partial row, 8 of a bf16 dw.
template <class T>
__device__ void rmsnorm_dw_reduce(const float* dw_partial, int parts, int d, T* dw,
                                  int accumulate) {
    constexpr int P = 4;
    const RowChunks<P> row(d, aligned128(dw_partial) && aligned128(dw));
    const int stride = gridDim.x * blockDim.x;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < row.chunks; c += stride) {
        float total[P] = {};
        for (int p = 0; p < parts; ++p) {
            float part[P];
            row.load(dw_partial + static_cast<long long>(p) * d, c, part);
            CONTRALIGN_UNROLL
            for (int k = 0; k < P; ++k) total[k] += part[k];
        }
        if (accumulate) {
            float old[P];
            row.load(dw, c, old);
            CONTRALIGN_UNROLL
            for (int k = 0; k < P; ++k) total[k] = old[k] + total[k];
        }
        row.store(dw, c, total);
    }
}

}  // namespace

extern "C" __global__ void rmsnorm_dw_reduce_f32(const float* dw_partial, int parts, int d,
                                                 float* dw, int accumulate) {
    rmsnorm_dw_reduce(dw_partial, parts, d, dw, accumulate);
}
CONTRALIGN_KERNEL(rmsnorm_dw_reduce_f32)

extern "C" __global__ void rmsnorm_dw_reduce_bf16(const float* dw_partial, int parts, int d,
                                                  __nv_bfloat16* dw, int accumulate) {
    rmsnorm_dw_reduce(dw_partial, parts, d, dw, accumulate);
}
CONTRALIGN_KERNEL(rmsnorm_dw_reduce_bf16)
