// Rotary position embedding in place, in Mistral's rotate-half convention: in each head of
// width hd, element j and element j + hd/2 (j < hd/2) are rotated by the angle
// pos * theta^(-2j/hd); `inverse` rotates by the opposite angle, which is the backward. An odd
// head width leaves its last element alone, as the CPU reference does.
//
// One block per token (grid-stride). Its threads first compute the token's angles, one per j,
// into shared memory (the angle is the same for every head): in double (positions reach 10^5
// rad, where an fp32 angle would be off by 10^-2), rounded to fp32 for the rotation itself.
// Then its threads take (head, chunk) pairs, where x is aligned and a half head is whole
// 16-byte chunks: P = Pack128<T>::size consecutive j and the P elements half a head further,
// in 16-byte accesses. Else they take the token's (head, j) pairs one at a time, consecutive
// threads on consecutive pairs across the heads, so that a warp's accesses stay coalesced. The
// dynamic shared memory holds 2 * (head_dim / 2) floats.
#include "contralign.cuh"

namespace {

template <class T>
__device__ void rope(T* __restrict__ x, const unsigned* __restrict__ positions, int tokens,
                     int heads, int head_dim, double theta, int inverse) {
    constexpr int P = Pack128<T>::size;
    extern __shared__ float rotation[];
    const int half = head_dim / 2;
    float* cosines = rotation;
    float* sines = rotation + half;
    // Each head and its second half start 16-byte aligned where the head width is whole chunks
    // too (an odd width's last element lies outside both halves).
    const bool vector = half % P == 0 && head_dim % P == 0 && aligned128(x);
    const int chunks = half / P;
    for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
        const double pos = positions[t];
        // The previous token's rotation is read by now.
        __syncthreads();
        for (int j = threadIdx.x; j < half; j += blockDim.x) {
            // As the CPU reference computes it, so that the angles agree to the last bit.
            const double inv_freq = 1.0 / pow(theta, static_cast<double>(2 * j) / head_dim);
            const double angle = pos * inv_freq;
            cosines[j] = static_cast<float>(cos(angle));
            sines[j] = static_cast<float>(inverse ? -sin(angle) : sin(angle));
        }
        __syncthreads();
        T* row = x + static_cast<long long>(t) * heads * head_dim;
        if (vector) {
            for (int item = threadIdx.x; item < heads * chunks; item += blockDim.x) {
                const int j = item % chunks * P;
                T* first = row + static_cast<long long>(item / chunks) * head_dim + j;
                float a[P], b[P], ra[P], rb[P];
                load_f32(first, a);
                load_f32(first + half, b);
                CONTRALIGN_UNROLL
                for (int k = 0; k < P; ++k) {
                    ra[k] = a[k] * cosines[j + k] - b[k] * sines[j + k];
                    rb[k] = b[k] * cosines[j + k] + a[k] * sines[j + k];
                }
                store_f32(first, ra);
                store_f32(first + half, rb);
            }
        } else {
            for (int q = threadIdx.x; q < heads * half; q += blockDim.x) {
                const int j = q % half;
                T* first = row + static_cast<long long>(q / half) * head_dim + j;
                const float a = to_f32(first[0]), b = to_f32(first[half]);
                first[0] = from_f32<T>(a * cosines[j] - b * sines[j]);
                first[half] = from_f32<T>(b * cosines[j] + a * sines[j]);
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
