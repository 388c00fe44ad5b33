// Mixture-of-experts dispatch on the device (docs/architecture.md §6, docs/model.md §4): the
// router's softmax + top-k + renormalize, the (token, slot) rows counted and permuted into
// expert order, the row moves between token order and expert order, the backward into the
// router logits, and the load-balancing sums. The CPU reference is src/ops/moe.rs; the
// routing arithmetic here is the same f64 arithmetic in the same order (uncontracted), so the
// choices and weights match it.
//
// A slot is `t * k + j`, the j-th expert of token t; a row is a position in expert order
// (expert by expert, and within an expert in slot order, so in token order: stable).
#include "contralign.cuh"
#include "reduce.cuh"

// The most experts per token the router kernels keep in registers.
#define MOE_MAX_K 4

// Softmax of each token's `experts` logits in f64 (`probs`), its `k` most probable experts by
// decreasing probability, ties to the lower index (`chosen`), and their probabilities
// renormalized over the k (`weights`, rounded once to f32). One thread per token: E is small
// (8 for Mixtral) and each thread reads its own row.
extern "C" __global__ void moe_route_f32(const float* __restrict__ logits,
                                         double* __restrict__ probs,
                                         unsigned* __restrict__ chosen,
                                         float* __restrict__ weights, long long tokens,
                                         int experts, int k) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         t < tokens; t += stride) {
        const float* z = logits + t * experts;
        double* p = probs + t * experts;
        double max = -INFINITY;
        for (int e = 0; e < experts; ++e) max = fmax(max, static_cast<double>(z[e]));
        double sum = 0.0;
        for (int e = 0; e < experts; ++e) {
            p[e] = exp(static_cast<double>(z[e]) - max);
            sum += p[e];
        }
        for (int e = 0; e < experts; ++e) p[e] /= sum;
        unsigned top[MOE_MAX_K];
        double top_sum = 0.0;
        for (int j = 0; j < k; ++j) {
            int best = -1;
            for (int e = 0; e < experts; ++e) {
                bool taken = false;
                for (int i = 0; i < j; ++i) taken |= top[i] == static_cast<unsigned>(e);
                // Strictly greater: among equal probabilities the lowest index wins, as the
                // reference's stable sort keeps it first.
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            top[j] = static_cast<unsigned>(best);
            top_sum += p[best];
        }
        for (int j = 0; j < k; ++j) {
            chosen[t * k + j] = top[j];
            weights[t * k + j] = static_cast<float>(p[top[j]] / top_sum);
        }
    }
}
CONTRALIGN_KERNEL(moe_route_f32)

// How many of each block's slots go to each expert: `block_counts[e * gridDim.x + b]`. One
// slot per thread; the grid is exactly the slots' blocks (no grid-stride: the permutation
// kernel below must see the same blocks). Shared-memory atomics only count, so the result
// does not depend on their order.
extern "C" __global__ void moe_count(const unsigned* __restrict__ chosen,
                                     unsigned* __restrict__ block_counts, long long slots,
                                     int experts) {
    extern __shared__ unsigned counts[];
    for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    const long long slot = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (slot < slots) {
        const unsigned e = chosen[slot];
        if (e >= static_cast<unsigned>(experts)) __trap();
        atomicAdd(&counts[e], 1u);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x)
        block_counts[static_cast<long long>(e) * gridDim.x + blockIdx.x] = counts[e];
}
CONTRALIGN_KERNEL(moe_count)

// The exclusive prefix sum of `block_counts` in expert-major order: where each (expert, block)
// starts in expert order (`block_starts`), and each expert's first row (`expert_offsets`,
// `experts + 1` of them, the last the number of rows). One block: each thread sums a
// contiguous run, thread 0 scans the runs' sums in order, each thread writes its run.
extern "C" __global__ void moe_offsets(const unsigned* __restrict__ block_counts,
                                       unsigned* __restrict__ block_starts,
                                       unsigned* __restrict__ expert_offsets, int experts,
                                       int blocks) {
    __shared__ unsigned run_start[1024];
    const long long n = static_cast<long long>(experts) * blocks;
    const long long run = (n + blockDim.x - 1) / blockDim.x;
    const long long first = threadIdx.x * run;
    const long long last = first + run < n ? first + run : n;
    unsigned sum = 0;
    for (long long i = first; i < last; ++i) sum += block_counts[i];
    run_start[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned acc = 0;
        for (unsigned i = 0; i < blockDim.x; ++i) {
            const unsigned s = run_start[i];
            run_start[i] = acc;
            acc += s;
        }
        expert_offsets[experts] = acc;
    }
    __syncthreads();
    unsigned acc = run_start[threadIdx.x];
    for (long long i = first; i < last; ++i) {
        block_starts[i] = acc;
        if (i % blocks == 0) expert_offsets[i / blocks] = acc;
        acc += block_counts[i];
    }
}
CONTRALIGN_KERNEL(moe_offsets)

// Each slot's row in expert order (`slot_row`), and for each row its token (`row_token`) and
// routing weight (`row_weight`). A slot's rank among its block's earlier slots of the same
// expert keeps the order stable. The launch matches `moe_count`'s (same grid and block).
extern "C" __global__ void moe_permute_index(const unsigned* __restrict__ chosen,
                                             const float* __restrict__ weights,
                                             const unsigned* __restrict__ block_starts,
                                             unsigned* __restrict__ slot_row,
                                             unsigned* __restrict__ row_token,
                                             float* __restrict__ row_weight, long long slots,
                                             int k) {
    extern __shared__ unsigned ids[];
    const long long slot = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const unsigned e = slot < slots ? chosen[slot] : 0xffffffffu;
    ids[threadIdx.x] = e;
    __syncthreads();
    if (slot >= slots) return;
    unsigned rank = 0;
    for (unsigned i = 0; i < threadIdx.x; ++i) rank += ids[i] == e;
    const unsigned row =
        block_starts[static_cast<long long>(e) * gridDim.x + blockIdx.x] + rank;
    slot_row[slot] = row;
    row_token[row] = static_cast<unsigned>(slot / k);
    row_weight[row] = weights[slot];
}
CONTRALIGN_KERNEL(moe_permute_index)

// The row moves and the slot dots are templates over the storage type T (f32 or bf16): each
// value is loaded into fp32, computed there and rounded to T once when stored.

// `out[i] = s_i · x[src_row[i]]` for rows of `d`, `s_i = scale[i]` or 1 without `scale`
// (the CPU's `s * v` in f32, bit for bit, then rounded to T). One block per row
// (grid-stride), 16-byte packs where the rows allow them.
template <class T>
__device__ void moe_gather(const T* __restrict__ x, const unsigned* __restrict__ src_row,
                           const float* __restrict__ scale, T* __restrict__ out,
                           long long rows, int d, unsigned src_rows) {
    constexpr int per = Pack128<T>::size;
    const bool packed = d % per == 0 && aligned128(x) && aligned128(out);
    for (long long i = blockIdx.x; i < rows; i += gridDim.x) {
        const unsigned r = src_row[i];
        if (r >= src_rows) __trap();
        const float s = scale ? scale[i] : 1.0f;
        const T* src = x + static_cast<long long>(r) * d;
        T* dst = out + i * d;
        const int packs = packed ? d / per : 0;
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
            Pack128<T> v = load128(src + per * p);
            for (int c = 0; c < per; ++c) v[c] = from_f32<T>(s * to_f32(v[c]));
            store128(dst + per * p, v);
        }
        for (int c = packs * per + threadIdx.x; c < d; c += blockDim.x)
            dst[c] = from_f32<T>(s * to_f32(src[c]));
    }
}

// The token's slots ordered by expert (insertion sort of at most MOE_MAX_K).
__device__ __forceinline__ void slots_by_expert(const unsigned* chosen, long long t, int k,
                                                int* order) {
    for (int j = 0; j < k; ++j) {
        int i = j;
        while (i > 0 && chosen[t * k + order[i - 1]] > chosen[t * k + j]) {
            order[i] = order[i - 1];
            --i;
        }
        order[i] = j;
    }
}

// `out[t] = Σ_j s_tj · y[slot_row[t k + j]]` over t's slots in expert order, starting from 0:
// the CPU's row-by-row scatter-add in expert order, addition for addition, in fp32, rounded
// to T once. `s` is the slot's weight (`weights`, per slot) or 1. One block per token
// (grid-stride).
template <class T>
__device__ void moe_unpermute(const T* __restrict__ y, const unsigned* __restrict__ slot_row,
                              const unsigned* __restrict__ chosen,
                              const float* __restrict__ weights, T* __restrict__ out,
                              long long tokens, int k, int d) {
    constexpr int per = Pack128<T>::size;
    const bool packed = d % per == 0 && aligned128(y) && aligned128(out);
    for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
        int order[MOE_MAX_K];
        slots_by_expert(chosen, t, k, order);
        const T* src[MOE_MAX_K];
        float s[MOE_MAX_K];
        for (int j = 0; j < k; ++j) {
            const long long slot = t * k + order[j];
            src[j] = y + static_cast<long long>(slot_row[slot]) * d;
            s[j] = weights ? weights[slot] : 1.0f;
        }
        T* dst = out + t * d;
        const int packs = packed ? d / per : 0;
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
            float acc[per];
            for (int c = 0; c < per; ++c) acc[c] = 0.0f;
            for (int j = 0; j < k; ++j) {
                const Pack128<T> v = load128(src[j] + per * p);
                for (int c = 0; c < per; ++c) acc[c] += s[j] * to_f32(v[c]);
            }
            Pack128<T> result;
            for (int c = 0; c < per; ++c) result[c] = from_f32<T>(acc[c]);
            store128(dst + per * p, result);
        }
        for (int c = packs * per + threadIdx.x; c < d; c += blockDim.x) {
            float acc = 0.0f;
            for (int j = 0; j < k; ++j) acc += s[j] * to_f32(src[j][c]);
            dst[c] = from_f32<T>(acc);
        }
    }
}

// `dL/dweight` of each slot: `dout[t] · y[slot_row[slot]]`, products and sums in f64 (each
// thread its chunks of columns (RowChunks), then the block's fixed tree). One block per slot
// (grid-stride).
template <class T>
__device__ void moe_slot_dots(const T* __restrict__ dout, const T* __restrict__ y,
                              const unsigned* __restrict__ slot_row,
                              double* __restrict__ d_weights, long long slots, int k, int d) {
    constexpr int P = Pack128<T>::size;
    __shared__ double scratch[33];
    const RowChunks<P> row(d, aligned128(dout) && aligned128(y));
    for (long long slot = blockIdx.x; slot < slots; slot += gridDim.x) {
        const T* a = dout + (slot / k) * d;
        const T* b = y + static_cast<long long>(slot_row[slot]) * d;
        double acc = 0.0;
        for (int c = threadIdx.x; c < row.chunks; c += blockDim.x) {
            float av[P], bv[P];
            row.load(a, c, av);
            row.load(b, c, bv);
            // Past the chunk's count both are 0 and add nothing.
            CONTRALIGN_UNROLL
            for (int e = 0; e < P; ++e) acc += static_cast<double>(av[e]) * bv[e];
        }
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) d_weights[slot] = acc;
    }
}

#define CONTRALIGN_MOE_ROW_KERNELS(suffix, T)                                                   \
    extern "C" __global__ void moe_gather_##suffix(const T* x, const unsigned* src_row,         \
                                                   const float* scale, T* out, long long rows,  \
                                                   int d, unsigned src_rows) {              \
        moe_gather<T>(x, src_row, scale, out, rows, d, src_rows);                               \
    }                                                                                          \
    extern "C" __global__ void moe_unpermute_##suffix(const T* y, const unsigned* slot_row,     \
                                                      const unsigned* chosen,                  \
                                                      const float* weights, T* out,            \
                                                      long long tokens, int k, int d) {        \
        moe_unpermute<T>(y, slot_row, chosen, weights, out, tokens, k, d);                      \
    }                                                                                          \
    extern "C" __global__ void moe_slot_dots_##suffix(const T* dout, const T* y,                \
                                                      const unsigned* slot_row,                \
                                                      double* d_weights, long long slots,      \
                                                      int k, int d) {                          \
        moe_slot_dots<T>(dout, y, slot_row, d_weights, slots, k, d);                            \
    }

CONTRALIGN_MOE_ROW_KERNELS(f32, float)
CONTRALIGN_KERNEL(moe_gather_f32)
CONTRALIGN_KERNEL(moe_unpermute_f32)
CONTRALIGN_KERNEL(moe_slot_dots_f32)
CONTRALIGN_MOE_ROW_KERNELS(bf16, __nv_bfloat16)
CONTRALIGN_KERNEL(moe_gather_bf16)
CONTRALIGN_KERNEL(moe_unpermute_bf16)
CONTRALIGN_KERNEL(moe_slot_dots_bf16)

// `dL/dz [T, E]` through the renormalized top-k softmax, the reference's f64 arithmetic in its
// order: `dp_e = direct_e + Σ_{j: chosen_j = e} (g_j − Σ_i g_i w_i) / Σ_i p_chosen_i`, then
// `dz_e = p_e (dp_e − Σ p dp)`. `direct_e = ((coef E) (C_e / W)) / W · row_weight_t` from the
// load-balancing sums `balance = [C_0..C_E-1, P_0..P_E-1, W]` when given. One thread per token.
extern "C" __global__ void moe_route_backward_f32(
    const double* __restrict__ probs, const unsigned* __restrict__ chosen,
    const double* __restrict__ d_weights, const double* __restrict__ balance,
    const double* __restrict__ row_weights, double coef, float* __restrict__ dz,
    long long tokens, int experts, int k) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         t < tokens; t += stride) {
        const double* p = probs + t * experts;
        const unsigned* top = chosen + t * k;
        const double* g = d_weights + t * k;
        double top_sum = 0.0;
        for (int j = 0; j < k; ++j) top_sum += p[top[j]];
        double mean_grad = 0.0;
        for (int j = 0; j < k; ++j) mean_grad += g[j] * (p[top[j]] / top_sum);
        const double total = balance ? balance[2 * experts] : 0.0;
        double centre = 0.0;
        for (int pass = 0; pass < 2; ++pass) {
            for (int e = 0; e < experts; ++e) {
                double dp = balance ? coef * experts * (balance[e] / total) / total *
                                          row_weights[t]
                                    : 0.0;
                for (int j = 0; j < k; ++j)
                    if (top[j] == static_cast<unsigned>(e)) dp += (g[j] - mean_grad) / top_sum;
                if (pass == 0) {
                    centre += p[e] * dp;
                } else {
                    dz[t * experts + e] = static_cast<float>(p[e] * (dp - centre));
                }
            }
        }
    }
}
CONTRALIGN_KERNEL(moe_route_backward_f32)

// One block's share of the load-balancing sums over its tokens: for each expert the weight of
// the rows that chose it and the weighted probability, and the total weight, in the order of
// `balance` (above); `partials[b * (2E + 1) + q]`, fixed-order f64 block sums.
extern "C" __global__ void moe_balance_partial(const double* __restrict__ probs,
                                               const unsigned* __restrict__ chosen,
                                               const double* __restrict__ row_weights,
                                               double* __restrict__ partials, long long tokens,
                                               int experts, int k) {
    __shared__ double scratch[33];
    const long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const bool live = t < tokens;
    const double w = live ? row_weights[t] : 0.0;
    const int quantities = 2 * experts + 1;
    for (int q = 0; q < quantities; ++q) {
        double v = 0.0;
        if (live) {
            if (q < experts) {
                for (int j = 0; j < k; ++j)
                    if (chosen[t * k + j] == static_cast<unsigned>(q)) v = w;
            } else if (q < 2 * experts) {
                v = w * probs[t * experts + (q - experts)];
            } else {
                v = w;
            }
        }
        v = block_sum(v, scratch);
        if (threadIdx.x == 0) partials[static_cast<long long>(blockIdx.x) * quantities + q] = v;
    }
}
CONTRALIGN_KERNEL(moe_balance_partial)

// `balance[q] += Σ_b partials[b][q]`, the blocks in order: one thread per quantity.
extern "C" __global__ void moe_balance_finish(const double* __restrict__ partials,
                                              double* __restrict__ balance, int blocks,
                                              int quantities) {
    for (int q = threadIdx.x; q < quantities; q += blockDim.x) {
        double sum = 0.0;
        for (int b = 0; b < blocks; ++b)
            sum += partials[static_cast<long long>(b) * quantities + q];
        balance[q] += sum;
    }
}
CONTRALIGN_KERNEL(moe_balance_finish)
