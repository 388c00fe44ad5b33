// RMSNorm fused with the residual add that precedes it in a pre-norm block:
//   h = x + residual,  y = w * h / sqrt(mean(h²) + eps)
// with fp32 statistics whatever the storage. One block per row (grid-stride over rows).
//
// The forward stores h (the residual stream for the next block) and the row's 1/rms; h is
// rounded to the storage type before the statistics are taken, so that the backward, which
// reads the stored h, differentiates exactly the function the forward computed.
//
// The backward returns dh = d(loss)/dh (plus the gradient arriving through the residual
// stream, when given) and accumulates dw in two deterministic passes: each block sums its
// rows into its own row of `dw_partial [gridDim.x, d]`, then `rmsnorm_dw_reduce` adds those
// rows into dw in block order.
#include "contralign.cuh"
#include "reduce.cuh"

namespace {

// `residual` may be null (h = x); `h_out` may be null (h is not stored) or alias x or
// residual: every element is read and written by the same thread. `y` may be null: only the
// row's 1/rms is wanted (a backward's recomputation), and the second pass is skipped.
template <class T>
__device__ void rmsnorm_forward(const T* x, const T* residual, const T* __restrict__ w, T* h_out,
                                T* __restrict__ y, float* __restrict__ rstd, int rows, int d,
                                float eps) {
    __shared__ float scratch[33];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long base = static_cast<long long>(r) * d;
        float squares = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float h = to_f32(x[base + j]);
            if (residual != nullptr) h += to_f32(residual[base + j]);
            const T stored = from_f32<T>(h);
            if (h_out != nullptr) h_out[base + j] = stored;
            h = to_f32(stored);
            squares += h * h;
        }
        const float inv_rms = rsqrtf(block_sum(squares, scratch) / d + eps);
        if (threadIdx.x == 0) rstd[r] = inv_rms;
        if (y == nullptr) continue;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float h;
            if (h_out != nullptr) {
                h = to_f32(h_out[base + j]);
            } else {
                h = to_f32(x[base + j]);
                if (residual != nullptr) h = to_f32(from_f32<T>(h + to_f32(residual[base + j])));
            }
            y[base + j] = from_f32<T>(to_f32(w[j]) * (h * inv_rms));
        }
    }
}

// dh_j = r (w_j dy_j - h_j r² mean_i(w_i dy_i h_i)) + dh_in_j;  dw_j += dy_j h_j r.
// `dh_in` may be null; `dh` may alias dh_in or dy.
template <class T>
__device__ void rmsnorm_backward(const T* __restrict__ h, const T* __restrict__ w,
                                 const float* __restrict__ rstd, const T* dy, const T* dh_in,
                                 T* dh, float* __restrict__ dw_partial, int rows, int d) {
    __shared__ float scratch[33];
    float* partial = dw_partial + static_cast<long long>(blockIdx.x) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) partial[j] = 0.0f;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long base = static_cast<long long>(r) * d;
        const float inv_rms = rstd[r];
        float proj = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float g = to_f32(dy[base + j]);
            const float hj = to_f32(h[base + j]);
            proj += to_f32(w[j]) * g * hj;
            // Only this thread touches column j of this block's partial row.
            partial[j] += g * hj * inv_rms;
        }
        const float c = inv_rms * inv_rms * block_sum(proj, scratch) / d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float g = inv_rms * (to_f32(w[j]) * to_f32(dy[base + j]) - to_f32(h[base + j]) * c);
            if (dh_in != nullptr) g += to_f32(dh_in[base + j]);
            dh[base + j] = from_f32<T>(g);
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

extern "C" __global__ void rmsnorm_backward_f32(const float* h, const float* w, const float* rstd,
                                                const float* dy, const float* dh_in, float* dh,
                                                float* dw_partial, int rows, int d) {
    rmsnorm_backward(h, w, rstd, dy, dh_in, dh, dw_partial, rows, d);
}
CONTRALIGN_KERNEL(rmsnorm_backward_f32)

extern "C" __global__ void rmsnorm_backward_bf16(const __nv_bfloat16* h, const __nv_bfloat16* w,
                                                 const float* rstd, const __nv_bfloat16* dy,
                                                 const __nv_bfloat16* dh_in, __nv_bfloat16* dh,
                                                 float* dw_partial, int rows, int d) {
    rmsnorm_backward(h, w, rstd, dy, dh_in, dh, dw_partial, rows, d);
}
CONTRALIGN_KERNEL(rmsnorm_backward_bf16)

// dw_j += sum over p of dw_partial[p, j], in order of p.
extern "C" __global__ void rmsnorm_dw_reduce(const float* dw_partial, int parts, int d,
                                             float* dw) {
    const int stride = gridDim.x * blockDim.x;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        float total = 0.0f;
        for (int p = 0; p < parts; ++p) total += dw_partial[static_cast<long long>(p) * d + j];
        dw[j] += total;
    }
}
CONTRALIGN_KERNEL(rmsnorm_dw_reduce)
