// Rotary position embedding in place, in Mistral's rotate-half convention: in each head of
// width hd, element j and element j + hd/2 (j < hd/2) are rotated by the angle
// pos * theta^(-2j/hd); `inverse` rotates by the opposite angle, which is the backward. An odd
// head width leaves its last element alone, as the CPU reference does.
//
// One block per token (grid-stride). Its threads first compute the token's angles, one per j,
// into shared memory (the angle is the same for every head): in double (positions reach 10^5
// rad, where an fp32 angle would be off by 10^-2), rounded to fp32 for the rotation itself.
// Then its threads take (head, chunk) pairs: a chunk is P = Pack128<T>::size consecutive j
// and the P elements half a head further, in 16-byte accesses where x is aligned and a half
// head is whole chunks. The dynamic shared memory holds 2 * (head_dim / 2) floats.
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
    const bool vector = half % P == 0 && head_dim % P == 0 && aligned128(x);
    const int chunks = (half + P - 1) / P;
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
        for (int item = threadIdx.x; item < heads * chunks; item += blockDim.x) {
            const int j = item % chunks * P;
            const int count = chunk_count<P>(half, j);
            T* head = row + static_cast<long long>(item / chunks) * head_dim;
            float a[P], b[P], ra[P], rb[P];
            load_chunk(head + j, count, vector, a);
            load_chunk(head + j + half, count, vector, b);
            CONTRALIGN_UNROLL
            for (int k = 0; k < P; ++k) {
                const float c = k < count ? cosines[j + k] : 0.0f;
                const float s = k < count ? sines[j + k] : 0.0f;
                ra[k] = a[k] * c - b[k] * s;
                rb[k] = b[k] * c + a[k] * s;
            }
            store_chunk(head + j, count, vector, ra);
            store_chunk(head + j + half, count, vector, rb);
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
