// Rotary position embedding in place, in Mistral's rotate-half convention: in each head of
// width hd, element j and element j + hd/2 (j < hd/2) are rotated by the angle
// pos * theta^(-2j/hd); `inverse` rotates by the opposite angle, which is the backward. An odd
// head width leaves its last element alone, as the CPU reference does.
//
// One block per token (grid-stride), threads over j, heads in the inner loop: the angle is the
// same for every head, so its sine and cosine are computed once per (token, j). They are
// computed in double (positions reach 10^5 rad, where an fp32 angle would be off by 10^-2)
// and rounded to fp32 for the rotation itself.
#include "contralign.cuh"

namespace {

template <class T>
__device__ void rope(T* __restrict__ x, const unsigned* __restrict__ positions, int tokens,
                     int heads, int head_dim, double theta, int inverse) {
    const int half = head_dim / 2;
    for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
        const double pos = positions[t];
        for (int j = threadIdx.x; j < half; j += blockDim.x) {
            // As the CPU reference computes it, so that the angles agree to the last bit.
            const double inv_freq = 1.0 / pow(theta, static_cast<double>(2 * j) / head_dim);
            const double angle = pos * inv_freq;
            const float c = static_cast<float>(cos(angle));
            const float s = static_cast<float>(inverse ? -sin(angle) : sin(angle));
            T* row = x + static_cast<long long>(t) * heads * head_dim;
            for (int h = 0; h < heads; ++h) {
                T* head = row + static_cast<long long>(h) * head_dim;
                const float a = to_f32(head[j]);
                const float b = to_f32(head[j + half]);
                head[j] = from_f32<T>(a * c - b * s);
                head[j + half] = from_f32<T>(b * c + a * s);
            }
        }
    }
}

}  // namespace

extern "C" __global__ void rope_f32(float* x, const unsigned* positions, int tokens, int heads,
                                    int head_dim, double theta, int inverse) {
    rope(x, positions, tokens, heads, head_dim, theta, inverse);
}
CONTRALIGN_KERNEL(rope_f32)

extern "C" __global__ void rope_bf16(__nv_bfloat16* x, const unsigned* positions, int tokens,
                                     int heads, int head_dim, double theta, int inverse) {
    rope(x, positions, tokens, heads, head_dim, theta, inverse);
}
CONTRALIGN_KERNEL(rope_bf16)
