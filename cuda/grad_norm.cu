// The global L2 norm of all gradients (f32 or bf16, as many buffers as there are) and
// clip_grad_norm_'s scaling, leaving the norm on the device:
//
//   grad_norm_{f32,bf16}       one launch: every block sums the squares of its share of every
//                              buffer into partials[blockIdx.x]; the block that finishes last
//                              sums the partials and writes [norm, coef] with
//                              coef = min(1, max_norm / (norm + 1e-6)) (1 when max_norm <= 0),
//                              or coef = NaN when `drop` is set, which it resets;
//   flag_nonfinite_f64         sets `drop` when a value is not finite: a micro-batch's loss or
//                              load-balancing sums that make the step's loss non-finite, so
//                              that the AdamW kernels (which skip a step whose norm or coef
//                              is not finite) drop the step without the host reading the loss;
//   grad_clip_scale_{f32,bf16} multiplies every buffer by coef when coef < 1 and finite (the
//                              AdamW kernels fold this in instead: cuda/adamw.cu).
//
// The last block is found as in CUDA's threadFenceReduction sample: each block publishes its
// partial, fences, and counts itself done on `done`; the block that counts gridDim.x reads
// them all. Partials are written and read with atomics, which are coherent across blocks
// (and which the emulator's racecheck knows are not a race), and the last block resets
// `done` for the next launch. Sums are fp32 in a fixed order (each thread's elements in turn,
// reduce.cuh's tree, then the partials in block order whichever block is last), so the norm
// is the same bit for bit for a given grid and block.
//
// A thread takes 16-byte packs of a buffer a grid-stride apart, then the elements past the
// last whole pack (every element, when the buffer is not 16-byte aligned) one at a time.
#include "contralign.cuh"
#include "reduce.cuh"

namespace {

// Visits the n elements at g a grid-stride apart as `chunk(p, count, vector)` (load_chunk's
// arguments): whole 16-byte packs, then the elements past the last one (every element, when g
// is not 16-byte aligned) one at a time.
template <class T, class Chunk>
__device__ __forceinline__ void visit_packs(T* g, long long n, long long first, long long stride,
                                            Chunk chunk) {
    constexpr int P = Pack128<T>::size;
    const long long packs = aligned128(g) ? n / P : 0;
    for (long long p = first; p < packs; p += stride) chunk(g + p * P, P, true);
    for (long long i = packs * P + first; i < n; i += stride) chunk(g + i, 1, false);
}

template <class T>
__device__ __forceinline__ float sum_squares(const T* g, long long n, long long first,
                                             long long stride) {
    constexpr int P = Pack128<T>::size;
    float squares = 0.0f;
    visit_packs(g, n, first, stride, [&](const T* p, int count, bool vector) {
        float x[P];
        load_chunk(p, count, vector, x);
        // Past `count`, x is 0 and adds nothing.
        CONTRALIGN_UNROLL
        for (int k = 0; k < P; ++k) squares += x[k] * x[k];
    });
    return squares;
}

}  // namespace

template <class T>
__device__ __forceinline__ void grad_norm(const T* const* buffers, const long long* lens,
                                          int count, float* partials, unsigned* done,
                                          unsigned* drop, float max_norm, float* out) {
    __shared__ float scratch[33];
    __shared__ bool last;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    float squares = 0.0f;
    for (int k = 0; k < count; ++k) squares += sum_squares(buffers[k], lens[k], first, stride);
    const float total = block_sum(squares, scratch);
    if (threadIdx.x == 0) {
        atomicExch(&partials[blockIdx.x], total);
        __threadfence();
        last = atomicAdd(done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    float sum = 0.0f;
    for (unsigned p = threadIdx.x; p < gridDim.x; p += blockDim.x) {
        sum += atomicAdd(&partials[p], 0.0f);
    }
    const float all = block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        const float norm = sqrtf(all);
        const float coef = max_norm / (norm + 1e-6f);
        out[0] = norm;
        out[1] = max_norm > 0.0f && coef < 1.0f ? coef : 1.0f;
        if (atomicExch(drop, 0u) != 0u) out[1] = NAN;
        atomicExch(done, 0u);
    }
}

extern "C" __global__ void grad_norm_f32(const float* const* buffers, const long long* lens,
                                         int count, float* partials, unsigned* done,
                                         unsigned* drop, float max_norm, float* out) {
    grad_norm(buffers, lens, count, partials, done, drop, max_norm, out);
}
CONTRALIGN_KERNEL(grad_norm_f32)

extern "C" __global__ void grad_norm_bf16(const __nv_bfloat16* const* buffers,
                                          const long long* lens, int count, float* partials,
                                          unsigned* done, unsigned* drop, float max_norm,
                                          float* out) {
    grad_norm(buffers, lens, count, partials, done, drop, max_norm, out);
}
CONTRALIGN_KERNEL(grad_norm_bf16)

extern "C" __global__ void flag_nonfinite_f64(const double* values, int n, unsigned* drop) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        if (!isfinite(values[i])) atomicExch(drop, 1u);
    }
}
CONTRALIGN_KERNEL(flag_nonfinite_f64)

template <class T>
__device__ __forceinline__ void grad_clip_scale(T* const* buffers, const long long* lens,
                                                int count, const float* norm_and_coef) {
    const float coef = norm_and_coef[1];
    // A dropped step (NaN coef) leaves its gradients as they are, as AdamW leaves the weights.
    if (coef == 1.0f || !isfinite(coef)) return;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    constexpr int P = Pack128<T>::size;
    for (int k = 0; k < count; ++k) {
        visit_packs(buffers[k], lens[k], first, stride, [&](T* p, int n, bool vector) {
            float x[P];
            load_chunk(p, n, vector, x);
            CONTRALIGN_UNROLL
            for (int e = 0; e < P; ++e) x[e] *= coef;
            store_chunk(p, n, vector, x);
        });
    }
}

extern "C" __global__ void grad_clip_scale_f32(float* const* buffers, const long long* lens,
                                               int count, const float* norm_and_coef) {
    grad_clip_scale(buffers, lens, count, norm_and_coef);
}
CONTRALIGN_KERNEL(grad_clip_scale_f32)

extern "C" __global__ void grad_clip_scale_bf16(__nv_bfloat16* const* buffers,
                                                const long long* lens, int count,
                                                const float* norm_and_coef) {
    grad_clip_scale(buffers, lens, count, norm_and_coef);
}
CONTRALIGN_KERNEL(grad_clip_scale_bf16)
