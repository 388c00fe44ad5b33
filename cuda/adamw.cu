// AdamW in one fused pass per tensor: fp32 gradients, fp32 moments, and parameters in f32 or
// bf16. The update is PyTorch's (decoupled weight decay, bias correction) and the arithmetic is
// the CPU reference's (src/train/optimizer.rs) operation for operation in double, without
// contraction into fma, so an f32 tensor gets exactly the CPU's result. The per-step constants
// come from the host (`AdamWStep`, computed by the same Rust code as the CPU's).
//
// `clip`, when not null, is grad_norm_finish's `[norm, coef]` (cuda/grad_norm.cu), read on the
// device so that the host never waits for the norm: a non-finite norm skips the update (the
// step is dropped on the device, parameters and moments untouched), and each gradient is
// scaled by coef first, rounded to fp32 as the CPU's clipping rounds it. That folds
// clip_grad_norm_'s pass over the gradients into this one.
//
// bf16 parameters take one of two forms:
//   - with an fp32 master copy (`master` not null): the master is updated as an f32 tensor and
//     the bf16 copy is the master rounded to nearest;
//   - without: the updated value (rounded to fp32) is rounded to bf16 stochastically, up with
//     probability equal to its distance from the lower neighbour over the gap, so that updates
//     smaller than a bf16 ulp still move the weights on average. The random bits are a hash of
//     (seed, step, index): a run is deterministic per seed.
#include "contralign.cuh"

// Matches `AdamWStep` in src/ops/cuda/kernels.rs field for field.
struct AdamWStep {
    double beta1;
    double one_minus_beta1;
    double beta2;
    double one_minus_beta2;
    double eps;
    double step_size;   // lr / (1 - beta1^t)
    double bias2_sqrt;  // sqrt(1 - beta2^t)
    double decay;       // 1 - lr * weight_decay
    unsigned long long seed;
    unsigned long long step;
};

namespace {

// Updates m[i] and v[i] and returns the new value of parameter p.
__device__ __forceinline__ double adamw_update(const AdamWStep& s, double p, float g, float* m,
                                               float* v, long long i) {
    const double gd = g;
    const float mi = static_cast<float>(
        __dadd_rn(__dmul_rn(s.beta1, m[i]), __dmul_rn(s.one_minus_beta1, gd)));
    const float vi = static_cast<float>(
        __dadd_rn(__dmul_rn(s.beta2, v[i]), __dmul_rn(__dmul_rn(s.one_minus_beta2, gd), gd)));
    m[i] = mi;
    v[i] = vi;
    const double denom = __dadd_rn(__ddiv_rn(__dsqrt_rn(vi), s.bias2_sqrt), s.eps);
    return __dsub_rn(__dmul_rn(p, s.decay), __ddiv_rn(__dmul_rn(s.step_size, mi), denom));
}

// splitmix64's finalizer: a bijection of 64-bit words that mixes every input bit into every
// output bit.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// x rounded to one of its two bf16 neighbours, up with probability (x - lower) / (upper -
// lower): adding 16 uniform bits below bf16's last bit carries into it with that probability.
// Infinities and NaN are rounded as usual.
__device__ __forceinline__ __nv_bfloat16 bf16_stochastic(float x, unsigned long long random) {
    const unsigned bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) return __float2bfloat16_rn(x);
    const unsigned rounded = bits + static_cast<unsigned>(random >> 48);
    return __ushort_as_bfloat16(static_cast<unsigned short>(rounded >> 16));
}

// Whether the step goes ahead, and the gradient's factor.
__device__ __forceinline__ bool clip_factor(const float* clip, double* coef) {
    *coef = 1.0;
    if (clip == nullptr) return true;
    if (!isfinite(clip[0])) return false;
    *coef = clip[1];
    return true;
}

__device__ __forceinline__ float clipped(float g, double coef) {
    return coef == 1.0 ? g : static_cast<float>(__dmul_rn(static_cast<double>(g), coef));
}

}  // namespace

extern "C" __global__ void adamw_f32(float* __restrict__ param, const float* __restrict__ grad,
                                     float* __restrict__ m, float* __restrict__ v, long long n,
                                     const float* __restrict__ clip, AdamWStep s) {
    double coef;
    if (!clip_factor(clip, &coef)) return;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        param[i] = static_cast<float>(adamw_update(s, param[i], clipped(grad[i], coef), m, v, i));
    }
}
CONTRALIGN_KERNEL(adamw_f32)

extern "C" __global__ void adamw_bf16(__nv_bfloat16* __restrict__ param,
                                      float* __restrict__ master,
                                      const float* __restrict__ grad, float* __restrict__ m,
                                      float* __restrict__ v, long long n,
                                      const float* __restrict__ clip, AdamWStep s) {
    double coef;
    if (!clip_factor(clip, &coef)) return;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const unsigned long long stream = mix64(mix64(s.seed) ^ s.step);
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        if (master != nullptr) {
            const float p =
                static_cast<float>(adamw_update(s, master[i], clipped(grad[i], coef), m, v, i));
            master[i] = p;
            param[i] = __float2bfloat16_rn(p);
        } else {
            const double old = __bfloat162float(param[i]);
            const float p =
                static_cast<float>(adamw_update(s, old, clipped(grad[i], coef), m, v, i));
            param[i] = bf16_stochastic(p, mix64(stream ^ static_cast<unsigned long long>(i)));
        }
    }
}
CONTRALIGN_KERNEL(adamw_bf16)
