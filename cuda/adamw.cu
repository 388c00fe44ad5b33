// AdamW in one fused pass over a flat store: parameters in f32 or bf16, gradients and both
// moments f32 or bf16 (bf16 only beside bf16 parameters). The update is PyTorch's (decoupled
// weight decay, bias correction) and the arithmetic is the CPU reference's
// (src/ops/optimizer.rs, `FlatStores::update`) operation for operation in fp32, as PyTorch
// computes AdamW for fp32 tensors (its formula; not its exact operation order: PyTorch's
// `lerp_` and `addcdiv_` group the terms otherwise), each operation rounded once (no
// contraction into fma), so the CPU computes the same bits. fp32 rather than double: the
// double update's main loop took 36 fp64 operations and 10 conversions an element (sm_80
// SASS; two divisions and a square root among them), about 11 ps an element on an A100's fp64
// units (32 a multiprocessor, half its fp32 ones), against the 7 ps in which it moves the 14
// bytes an element of an all-bf16 update; the fp32 update's 26 fp32 operations take about 3.
// The next limit is the issue rate, which the hashes of the stochastic roundings dominate
// (64-bit multiplies and shifts, on 32-bit integer units): an element hashes once and its
// three stores share the hash's bits (below). The all-bf16 loop (8 elements a pass) is 1654
// sm_80 SASS instructions, 635 of them integer, the divisions' and square roots' slow paths
// included, against 2419 and 1223 with a hash a store.
// The per-step factors come from the host (`AdamWStep`, rounded to fp32 by the same Rust code
// as the CPU's).
//
// `clip`, when not null, is grad_norm_finish's `[norm, coef]` (cuda/grad_norm.cu), read on the
// device so that the host never waits for the norm: a non-finite norm or coef skips the update
// (the step is dropped on the device, parameters and moments untouched; grad_norm makes coef
// NaN for a step whose loss was not finite), and each gradient is
// scaled by coef in fp32 (the CPU's bf16-rounding mode rounds its coef to f32 first). That folds
// clip_grad_norm_'s pass over the gradients into this one.
//
// bf16 parameters take one of two forms:
//   - with an fp32 master copy (`master` not null): the master is updated as an f32 tensor and
//     the bf16 copy is the master rounded to nearest;
//   - without: the updated fp32 value is rounded to bf16 stochastically, up with
//     probability equal to its distance from the lower neighbour over the gap, so that updates
//     smaller than a bf16 ulp still move the weights on average.
// bf16 moments are computed in fp32 as f32 moments are, used unrounded in this step's update,
// and stored rounded stochastically. Element i draws one hash a step, bits = mix64(stream ^ i)
// with stream = mix64(mix64(seed) ^ step), whose 16-bit fields are its three stores' draws:
// the top 16 bits the weight's, the next m's, the next v's (docs/numerics.md §4). One hash
// rather than one a store: each is about 20 integer instructions, and an all-bf16 update
// issues enough of them to approach the time its bytes take. i is the element's index in the
// flat store, which names its tensor and its place in it, so a run is deterministic per seed
// and the CPU's bf16-rounding mode draws the same bits.
#include "contralign.cuh"

// Matches `AdamWStep` in src/ops/cuda/kernels.rs field for field (`StepFactors` of
// src/ops/optimizer.rs, then the seed and the step).
struct AdamWStep {
    float beta1;
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float eps;
    float step_size;   // lr / (1 - beta1^t)
    float bias2_sqrt;  // sqrt(1 - beta2^t)
    float decay;       // 1 - lr * weight_decay
    unsigned long long seed;
    unsigned long long step;
};

namespace {

// The new moments of one element, and the parameter's new value from `p`.
struct Updated {
    float m;
    float v;
    float p;
};

__device__ __forceinline__ Updated adamw_update(const AdamWStep& s, float p, float g, float m,
                                                float v) {
    Updated u;
    u.m = __fadd_rn(__fmul_rn(s.beta1, m), __fmul_rn(s.one_minus_beta1, g));
    u.v = __fadd_rn(__fmul_rn(s.beta2, v), __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(u.v), s.bias2_sqrt), s.eps);
    u.p = __fsub_rn(__fmul_rn(p, s.decay), __fdiv_rn(__fmul_rn(s.step_size, u.m), denom));
    return u;
}

// splitmix64's finalizer: a bijection of 64-bit words that mixes every input bit into every
// output bit.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// This step's random stream: element i's bits are mix64(stream ^ i).
__device__ __forceinline__ unsigned long long step_stream(const AdamWStep& s) {
    return mix64(mix64(s.seed) ^ s.step);
}

// The 16 random bits of one store (0 weights, 1 m, 2 v) in an element's bits.
__device__ __forceinline__ unsigned store_draw(unsigned long long bits, int store) {
    return static_cast<unsigned>(bits >> (48 - 16 * store)) & 0xffffu;
}

// x rounded to one of its two bf16 neighbours, up with probability (x - lower) / (upper -
// lower): adding 16 uniform bits (`draw`) below bf16's last bit carries into it with that
// probability. Infinities and NaN are rounded as usual.
__device__ __forceinline__ __nv_bfloat16 bf16_stochastic(float x, unsigned draw) {
    const unsigned bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) return __float2bfloat16_rn(x);
    const unsigned rounded = bits + draw;
    return __ushort_as_bfloat16(static_cast<unsigned short>(rounded >> 16));
}

// A moment as its store keeps it: f32 as computed, bf16 rounded stochastically.
__device__ __forceinline__ void store_moment(float* slot, float x, unsigned) { *slot = x; }
__device__ __forceinline__ void store_moment(__nv_bfloat16* slot, float x, unsigned draw) {
    *slot = bf16_stochastic(x, draw);
}

// Whether the step goes ahead, and the gradient's factor.
__device__ __forceinline__ bool clip_factor(const float* clip, float* coef) {
    *coef = 1.0f;
    if (clip == nullptr) return true;
    if (!isfinite(clip[0]) || !isfinite(clip[1])) return false;
    *coef = clip[1];
    return true;
}

__device__ __forceinline__ float clipped(float g, float coef) {
    return coef == 1.0f ? g : __fmul_rn(g, coef);
}

// One element of an f32 store: its moments and parameter updated in place.
__device__ __forceinline__ void adamw_f32_element(const AdamWStep& s, float coef, float& param,
                                                  float grad, float& m, float& v) {
    const Updated u = adamw_update(s, param, clipped(grad, coef), m, v);
    m = u.m;
    v = u.v;
    param = u.p;
}

// Element i of a bf16 store, from `old` (its master value, or the bf16 parameter): its
// moments updated in place, the parameter written to `param` and, with a master, `*master`.
// `stream` is step_stream's; the hash is left out where nothing draws from it (f32 moments
// beside a master).
template <class G, class M>
__device__ __forceinline__ void adamw_bf16_element(const AdamWStep& s,
                                                   unsigned long long stream, float coef,
                                                   long long i, float old, G grad, M& m, M& v,
                                                   __nv_bfloat16& param, float* master) {
    const Updated u = adamw_update(s, old, clipped(to_f32(grad), coef), to_f32(m), to_f32(v));
    const unsigned long long bits = mix64(stream ^ static_cast<unsigned long long>(i));
    store_moment(&m, u.m, store_draw(bits, 1));
    store_moment(&v, u.v, store_draw(bits, 2));
    if (master != nullptr) {
        *master = u.p;
        param = __float2bfloat16_rn(u.p);
    } else {
        param = bf16_stochastic(u.p, store_draw(bits, 0));
    }
}

// The whole groups of `w` elements that every store may move in one access each (none when
// one of them is not 16-byte aligned: then every element goes alone).
__device__ __forceinline__ long long whole_groups(int w, long long n, const void* a,
                                                  const void* b, const void* c, const void* d,
                                                  const void* e) {
    const bool aligned = aligned128(a) && aligned128(b) && aligned128(c) && aligned128(d) &&
                         (e == nullptr || aligned128(e));
    return aligned ? n / w : 0;
}

// Each thread updates W consecutive elements at a time (a grid-stride apart), one access per
// store: W = 8 when every store is bf16 (16 bytes each), else 4 (16 bytes of an f32 store, 8
// of a bf16 one), so that a warp's lanes read and write consecutive bytes in every store.
// kMaster: `master` is given (not null).
template <int W, bool kMaster, class G, class M>
__device__ __forceinline__ void adamw_bf16_body(__nv_bfloat16* __restrict__ param,
                                                float* __restrict__ master,
                                                const G* __restrict__ grad, M* __restrict__ m,
                                                M* __restrict__ v, long long n, float coef,
                                                const AdamWStep& s) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const unsigned long long stream = step_stream(s);
    const long long groups = whole_groups(W, n, param, grad, m, v, kMaster ? master : nullptr);
    for (long long e = first; e < groups; e += stride) {
        const long long i = e * W;
        G g[W];
        M mm[W], vv[W];
        __nv_bfloat16 pp[W];
        float ww[W];
        load_elements<W>(grad + i, g);
        load_elements<W>(m + i, mm);
        load_elements<W>(v + i, vv);
        // With a master the bf16 copy is only written.
        if constexpr (kMaster) {
            load_elements<W>(master + i, ww);
        } else {
            load_elements<W>(param + i, pp);
        }
        CONTRALIGN_UNROLL
        for (int k = 0; k < W; ++k) {
            const float old = kMaster ? ww[k] : __bfloat162float(pp[k]);
            adamw_bf16_element(s, stream, coef, i + k, old, g[k], mm[k], vv[k], pp[k],
                               kMaster ? &ww[k] : nullptr);
        }
        store_elements<W>(m + i, mm);
        store_elements<W>(v + i, vv);
        store_elements<W>(param + i, pp);
        if constexpr (kMaster) store_elements<W>(master + i, ww);
    }
    for (long long i = groups * W + first; i < n; i += stride) {
        const float old = kMaster ? master[i] : __bfloat162float(param[i]);
        adamw_bf16_element(s, stream, coef, i, old, grad[i], m[i], v[i], param[i],
                           kMaster ? &master[i] : nullptr);
    }
}

template <class G, class M>
__device__ __forceinline__ void adamw_bf16(__nv_bfloat16* param, float* master, const G* grad,
                                           M* m, M* v, long long n, const float* clip,
                                           const AdamWStep& s) {
    float coef;
    if (!clip_factor(clip, &coef)) return;
    // Without a master every store is bf16 when the gradients and moments are.
    constexpr int kWidth = sizeof(G) == 2 && sizeof(M) == 2 ? 8 : 4;
    if (master != nullptr) {
        adamw_bf16_body<4, true>(param, master, grad, m, v, n, coef, s);
    } else {
        adamw_bf16_body<kWidth, false>(param, master, grad, m, v, n, coef, s);
    }
}

}  // namespace

extern "C" __global__ void adamw_f32(float* __restrict__ param, const float* __restrict__ grad,
                                     float* __restrict__ m, float* __restrict__ v, long long n,
                                     const float* __restrict__ clip, AdamWStep s) {
    float coef;
    if (!clip_factor(clip, &coef)) return;
    constexpr int W = 4;  // 16 bytes of each store
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long groups = whole_groups(W, n, param, grad, m, v, nullptr);
    for (long long e = first; e < groups; e += stride) {
        const long long i = e * W;
        float p[W], g[W], mm[W], vv[W];
        load_elements<W>(param + i, p);
        load_elements<W>(grad + i, g);
        load_elements<W>(m + i, mm);
        load_elements<W>(v + i, vv);
        CONTRALIGN_UNROLL
        for (int k = 0; k < W; ++k) adamw_f32_element(s, coef, p[k], g[k], mm[k], vv[k]);
        store_elements<W>(param + i, p);
        store_elements<W>(m + i, mm);
        store_elements<W>(v + i, vv);
    }
    for (long long i = groups * W + first; i < n; i += stride) {
        adamw_f32_element(s, coef, param[i], grad[i], m[i], v[i]);
    }
}
CONTRALIGN_KERNEL(adamw_f32)

// One bf16-weight kernel per gradient type G and moment type M (suffix g<G>_m<M>).
#define CONTRALIGN_ADAMW_BF16(suffix, G, M)                                                     \
    extern "C" __global__ void adamw_bf16_##suffix(__nv_bfloat16* param, float* master,         \
                                                   const G* grad, M* m, M* v, long long n,      \
                                                   const float* clip, AdamWStep s) {            \
        adamw_bf16(param, master, grad, m, v, n, clip, s);                                      \
    }

CONTRALIGN_ADAMW_BF16(gf32_mf32, float, float)
CONTRALIGN_ADAMW_BF16(gf32_mbf16, float, __nv_bfloat16)
CONTRALIGN_ADAMW_BF16(gbf16_mf32, __nv_bfloat16, float)
CONTRALIGN_ADAMW_BF16(gbf16_mbf16, __nv_bfloat16, __nv_bfloat16)
CONTRALIGN_KERNEL(adamw_bf16_gf32_mf32)
CONTRALIGN_KERNEL(adamw_bf16_gf32_mbf16)
CONTRALIGN_KERNEL(adamw_bf16_gbf16_mf32)
CONTRALIGN_KERNEL(adamw_bf16_gbf16_mbf16)
