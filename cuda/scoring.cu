// The fused LM-head scoring (docs/architecture.md §8): the logits of a chunk of
// prediction rows are made by a GEMM (`z = h · Wᵀ`, src/ops/cuda/scoring.rs), and these
// kernels turn them into log-probabilities, per-response statistics and, in the backward,
// the logits' gradient, without ever holding more than one chunk of logits.
//
// Contracts (llm.c style: what each kernel reads, what it overwrites, what it accumulates):
//
//   scoring_rows_{f32,bf16}      reads z [rows, vocab] (one chunk) and targets[row0 + r];
//                                OVERWRITES lse[row0 + r] and logp[row0 + r] for r < rows.
//                                One read of each logit: an online max and sum (fp32), with
//                                16-byte loads between an unaligned head and tail of each row.
//                                A target >= vocab traps.
//   scoring_response_stats       reads logp [rows] and spans [responses][3] = (start, len,
//                                has_eos); OVERWRITES stats [responses][3] = (S, A, E) in
//                                fp64: S = Σ logp over the span, A = S / len, E = the last
//                                row's logp when has_eos, else NaN (read has_eos, not E).
//   scoring_row_coef             reads spans and grads [responses][3] = (dL/dS, dL/dA, dL/dE)
//                                in fp64; OVERWRITES coef[t] = scale * dL/dlogp_t for every
//                                row t of a span (docs/losses.md §1: dS + dA / n, plus dE at
//                                the last row of a response that ends with EOS; scale is a
//                                micro-batch's share of its step), computed in fp64 as the
//                                CPU computes it, rounded once to fp32. Rows of no span are
//                                left alone.
//   scoring_backward_{f32,bf16}  reads z [rows, vocab] (the chunk's recomputed logits),
//                                targets, lse and coef at row0 + r; OVERWRITES z in place with
//                                dL/dz = coef * (onehot(target) - exp(z - lse)).
//
// The unfused baseline of the benchmarks (the ordinary way: materialized fp32 logits, a
// log-softmax, a gather), kept beside the fused kernels so that both are measured alike:
//
//   scoring_unfused_log_softmax  reads logits [rows, vocab] (fp32) three times (max, sum,
//                                write); OVERWRITES out [rows, vocab] with log_softmax.
//   scoring_unfused_gather       reads logprobs [rows, vocab] at targets[r]; OVERWRITES
//                                logp[r].
//
// Launches: one block per row (rows kernels) or per response (the others), any block size
// (partial warps included), grid-stride over what a grid does not cover. Every sum is in a
// fixed order that depends only on blockDim, so results are the same bit for bit from run to
// run. Row indices are int (a batch has fewer than 2^31 rows); element offsets are 64-bit
// (a chunk of 65,536 rows of 32,000 logits has 2^31 elements).
#include "reduce.cuh"

namespace {

// A running log-sum-exp: `s` is the sum of exp(x - m) over the values seen, `m` their
// maximum, and `t` the target's logit where this thread saw it (0 elsewhere: adding zeros is
// exact, so the block's sum of `t` is the target logit bit for bit).
struct Lse {
    float m;
    float s;
    float t;
};

__device__ __forceinline__ Lse lse_empty() { return Lse{-INFINITY, 0.0f, 0.0f}; }

// Folds `count` values (at most 8) into the running state: one rescale at most per call.
__device__ __forceinline__ void lse_add(Lse& a, const float* x, int count) {
    float top = x[0];
    for (int i = 1; i < count; ++i) top = fmaxf(top, x[i]);
    if (top > a.m) {
        a.s *= expf(a.m - top);
        a.m = top;
    }
    // NaN logits fail every comparison above and poison the sum here: they show in the result.
    for (int i = 0; i < count; ++i) a.s += expf(x[i] - a.m);
}

__device__ __forceinline__ Lse lse_combine(Lse a, Lse b) {
    if (a.m == -INFINITY) return Lse{b.m, b.s, a.t + b.t};
    if (b.m == -INFINITY) return Lse{a.m, a.s, a.t + b.t};
    const float m = fmaxf(a.m, b.m);
    return Lse{m, a.s * expf(a.m - m) + b.s * expf(b.m - m), a.t + b.t};
}

// An Lse of the lane `offset` lanes down (reduce.cuh's warp_reduce shuffles through it).
__device__ __forceinline__ Lse shuffle_down(unsigned mask, Lse v, unsigned offset) {
    return Lse{__shfl_down_sync(mask, v.m, offset), __shfl_down_sync(mask, v.s, offset),
               __shfl_down_sync(mask, v.t, offset)};
}

struct LseCombine {
    __device__ __forceinline__ Lse operator()(Lse a, Lse b) const { return lse_combine(a, b); }
};

// The block's combined state, returned to every thread; `scratch` holds at least 33 states
// and is free again on return.
__device__ __forceinline__ Lse block_combine(Lse v, Lse* scratch) {
    return block_reduce(v, scratch, lse_empty(), LseCombine{});
}

// 16 bytes of storage (4 floats or 8 bf16) through load128/store128, which check the
// alignment in the emulator: a raw float4 or uint4 access there is split by the host compiler
// into narrower ones, whose own alignment checks would let a misaligned 16-byte access pass.
template <class T>
struct Vec16 {
    static constexpr int N = Pack128<T>::size;
    __device__ static void load(const T* p, float* out) {
        const Pack128<T> v = load128(p);
        for (int i = 0; i < N; ++i) out[i] = to_f32(v[i]);
    }
    __device__ static void store(T* p, const float* in) {
        Pack128<T> v;
        for (int i = 0; i < N; ++i) v[i] = from_f32<T>(in[i]);
        store128(p, v);
    }
};

// How a row of `vocab` elements starting at `row` splits into a scalar head (up to the first
// 16-byte boundary), whole 16-byte vectors, and a scalar tail.
template <class T>
struct RowSplit {
    int head;
    int vectors;
    int tail_start;
    __device__ RowSplit(const T* row, int vocab) {
        constexpr int n = Vec16<T>::N;
        const unsigned misalign = static_cast<unsigned>(reinterpret_cast<unsigned long long>(row) % 16);
        head = misalign == 0 ? 0 : static_cast<int>((16 - misalign) / sizeof(T));
        if (head > vocab) head = vocab;
        vectors = (vocab - head) / n;
        tail_start = head + vectors * n;
    }
};

template <class T>
__device__ void scoring_rows(const T* __restrict__ z, int rows, int vocab,
                             const unsigned* __restrict__ targets, long long row0,
                             float* __restrict__ lse, float* __restrict__ logp) {
    __shared__ Lse scratch[33];
    constexpr int n = Vec16<T>::N;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = z + static_cast<long long>(r) * vocab;
        const unsigned target = targets[row0 + r];
        if (target >= static_cast<unsigned>(vocab)) __trap();
        const RowSplit<T> split(row, vocab);
        Lse state = lse_empty();
        float x[n];
        // The head and the tail: one element per thread.
        for (int j = threadIdx.x; j < split.head; j += blockDim.x) {
            x[0] = to_f32(row[j]);
            if (static_cast<unsigned>(j) == target) state.t = x[0];
            lse_add(state, x, 1);
        }
        for (int v = threadIdx.x; v < split.vectors; v += blockDim.x) {
            const int first = split.head + v * n;
            Vec16<T>::load(row + first, x);
            const unsigned offset = target - static_cast<unsigned>(first);
            if (offset < static_cast<unsigned>(n)) state.t = x[offset];
            lse_add(state, x, n);
        }
        for (int j = split.tail_start + threadIdx.x; j < vocab; j += blockDim.x) {
            x[0] = to_f32(row[j]);
            if (static_cast<unsigned>(j) == target) state.t = x[0];
            lse_add(state, x, 1);
        }
        const Lse total = block_combine(state, scratch);
        if (threadIdx.x == 0) {
            const float log_s = logf(total.s);
            lse[row0 + r] = total.m + log_s;
            // (t - m) first: exact when t is near the maximum, the usual case for a target.
            logp[row0 + r] = (total.t - total.m) - log_s;
        }
    }
}

template <class T>
__device__ void scoring_backward(T* z, int rows, int vocab, const unsigned* __restrict__ targets,
                                 const float* __restrict__ lse, const float* __restrict__ coef,
                                 long long row0) {
    constexpr int n = Vec16<T>::N;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        T* row = z + static_cast<long long>(r) * vocab;
        const unsigned target = targets[row0 + r];
        if (target >= static_cast<unsigned>(vocab)) __trap();
        const float l = lse[row0 + r];
        const float g = coef[row0 + r];
        const RowSplit<T> split(row, vocab);
        // Every element is read and written by the same thread: in place needs no barrier.
        auto grad = [&](float x, int j) {
            const float onehot = static_cast<unsigned>(j) == target ? 1.0f : 0.0f;
            return g * (onehot - expf(x - l));
        };
        for (int j = threadIdx.x; j < split.head; j += blockDim.x)
            row[j] = from_f32<T>(grad(to_f32(row[j]), j));
        float x[n];
        for (int v = threadIdx.x; v < split.vectors; v += blockDim.x) {
            const int first = split.head + v * n;
            Vec16<T>::load(row + first, x);
            for (int i = 0; i < n; ++i) x[i] = grad(x[i], first + i);
            Vec16<T>::store(row + first, x);
        }
        for (int j = split.tail_start + threadIdx.x; j < vocab; j += blockDim.x)
            row[j] = from_f32<T>(grad(to_f32(row[j]), j));
    }
}

struct Max {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

}  // namespace

extern "C" __global__ void scoring_unfused_log_softmax(const float* logits, float* out, int rows,
                                                       int vocab) {
    __shared__ float scratch[33];
    __shared__ double sum_scratch[33];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long base = static_cast<long long>(r) * vocab;
        float m = -INFINITY;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, logits[base + j]);
        m = block_reduce(m, scratch, -INFINITY, Max{});
        float s = 0.0f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(logits[base + j] - m);
        const float lse = m + logf(static_cast<float>(block_sum(static_cast<double>(s), sum_scratch)));
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) out[base + j] = logits[base + j] - lse;
    }
}
CONTRALIGN_KERNEL(scoring_unfused_log_softmax)

extern "C" __global__ void scoring_unfused_gather(const float* logprobs, int rows, int vocab,
                                                  const unsigned* targets, float* logp) {
    const int stride = gridDim.x * blockDim.x;
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += stride) {
        if (targets[r] >= static_cast<unsigned>(vocab)) __trap();
        logp[r] = logprobs[static_cast<long long>(r) * vocab + targets[r]];
    }
}
CONTRALIGN_KERNEL(scoring_unfused_gather)

extern "C" __global__ void scoring_rows_f32(const float* z, int rows, int vocab,
                                            const unsigned* targets, long long row0, float* lse,
                                            float* logp) {
    scoring_rows(z, rows, vocab, targets, row0, lse, logp);
}
CONTRALIGN_KERNEL(scoring_rows_f32)

extern "C" __global__ void scoring_rows_bf16(const __nv_bfloat16* z, int rows, int vocab,
                                             const unsigned* targets, long long row0, float* lse,
                                             float* logp) {
    scoring_rows(z, rows, vocab, targets, row0, lse, logp);
}
CONTRALIGN_KERNEL(scoring_rows_bf16)

extern "C" __global__ void scoring_response_stats(const float* logp, const int* spans,
                                                  int responses, double* stats) {
    __shared__ double scratch[33];
    for (int i = blockIdx.x; i < responses; i += gridDim.x) {
        const int start = spans[3 * i];
        const int len = spans[3 * i + 1];
        double sum = 0.0;
        for (int j = threadIdx.x; j < len; j += blockDim.x) sum += logp[start + j];
        const double total = block_sum(sum, scratch);
        if (threadIdx.x == 0) {
            stats[3 * i] = total;
            stats[3 * i + 1] = total / len;
            stats[3 * i + 2] = spans[3 * i + 2] != 0 ? static_cast<double>(logp[start + len - 1])
                                                     : __longlong_as_double(0x7ff8000000000000ll);
        }
    }
}
CONTRALIGN_KERNEL(scoring_response_stats)

extern "C" __global__ void scoring_row_coef(const int* spans, const double* grads, int responses,
                                            double scale, float* coef) {
    for (int i = blockIdx.x; i < responses; i += gridDim.x) {
        const int start = spans[3 * i];
        const int len = spans[3 * i + 1];
        const bool eos = spans[3 * i + 2] != 0;
        const double per_token = grads[3 * i] + grads[3 * i + 1] / len;
        for (int j = threadIdx.x; j < len; j += blockDim.x) {
            double c = per_token;
            if (eos && j == len - 1) c += grads[3 * i + 2];
            coef[start + j] = static_cast<float>(c * scale);
        }
    }
}
CONTRALIGN_KERNEL(scoring_row_coef)

extern "C" __global__ void scoring_backward_f32(float* z, int rows, int vocab,
                                                const unsigned* targets, const float* lse,
                                                const float* coef, long long row0) {
    scoring_backward(z, rows, vocab, targets, lse, coef, row0);
}
CONTRALIGN_KERNEL(scoring_backward_f32)

extern "C" __global__ void scoring_backward_bf16(__nv_bfloat16* z, int rows, int vocab,
                                                 const unsigned* targets, const float* lse,
                                                 const float* coef, long long row0) {
    scoring_backward(z, rows, vocab, targets, lse, coef, row0);
}
CONTRALIGN_KERNEL(scoring_backward_bf16)
