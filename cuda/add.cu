// acc += x, element-wise, the sum in fp32 and stored once in the tensors' type: the
// accumulation of gradients that reach a tensor along two paths (the residual stream, a tied
// embedding). For bf16 the result is round-to-nearest(f32(acc) + f32(x)), the same bits as
// casting both to f32, adding and casting back, in one pass instead of four. 16-byte packs a
// grid-stride apart, then the elements past the last whole pack (or every element, when a
// buffer is not 16-byte aligned).
#include "contralign.cuh"

namespace {

template <class T>
__device__ __forceinline__ T add_one(T a, T b) {
    return from_f32<T>(to_f32(a) + to_f32(b));
}

template <class T>
__device__ void add_assign(T* __restrict__ acc, const T* __restrict__ x, long long n) {
    constexpr int P = Pack128<T>::size;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long packs = aligned128(acc) && aligned128(x) ? n / P : 0;
    for (long long p = first; p < packs; p += stride) {
        Pack128<T> a = load128(acc + p * P);
        const Pack128<T> b = load128(x + p * P);
        for (int k = 0; k < P; ++k) a[k] = add_one(a[k], b[k]);
        store128(acc + p * P, a);
    }
    for (long long i = packs * P + first; i < n; i += stride) acc[i] = add_one(acc[i], x[i]);
}

}  // namespace

extern "C" __global__ void add_assign_f32(float* __restrict__ acc, const float* __restrict__ x,
                                          long long n) {
    add_assign(acc, x, n);
}
CONTRALIGN_KERNEL(add_assign_f32)

extern "C" __global__ void add_assign_bf16(__nv_bfloat16* __restrict__ acc,
                                           const __nv_bfloat16* __restrict__ x, long long n) {
    add_assign(acc, x, n);
}
CONTRALIGN_KERNEL(add_assign_bf16)
