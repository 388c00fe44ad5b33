// Token embedding: the forward gathers rows of the table, the backward adds each token's
// gradient row into the table gradient (fp32).
//
// The backward gives each thread whole columns and walks the tokens in order, so repeated ids
// accumulate in the same order as the CPU reference's sequential scatter (bit for bit on f32)
// and no atomics are needed. Its parallelism is the width d (a few thousand threads for a
// Mistral), which is enough for an op that runs once per step.
#include "contralign.cuh"

namespace {

template <class T>
__device__ void embedding_forward(const T* __restrict__ table, const unsigned* __restrict__ ids,
                                  T* __restrict__ out, long long tokens, int d,
                                  unsigned vocab) {
    const long long n = tokens * d;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const unsigned id = ids[i / d];
        // An id past the table would read another tensor's memory: fail the launch instead.
        if (id >= vocab) __trap();
        out[i] = table[static_cast<long long>(id) * d + i % d];
    }
}

template <class T>
__device__ void embedding_backward(const T* __restrict__ dout, const unsigned* __restrict__ ids,
                                   float* __restrict__ dtable, long long tokens, int d,
                                   unsigned vocab) {
    const int stride = gridDim.x * blockDim.x;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        for (long long t = 0; t < tokens; ++t) {
            const unsigned id = ids[t];
            if (id >= vocab) __trap();
            dtable[static_cast<long long>(id) * d + j] += to_f32(dout[t * d + j]);
        }
    }
}

}  // namespace

extern "C" __global__ void embedding_forward_f32(const float* table, const unsigned* ids,
                                                 float* out, long long tokens, int d,
                                                 unsigned vocab) {
    embedding_forward(table, ids, out, tokens, d, vocab);
}
CONTRALIGN_KERNEL(embedding_forward_f32)

extern "C" __global__ void embedding_forward_bf16(const __nv_bfloat16* table,
                                                  const unsigned* ids, __nv_bfloat16* out,
                                                  long long tokens, int d, unsigned vocab) {
    embedding_forward(table, ids, out, tokens, d, vocab);
}
CONTRALIGN_KERNEL(embedding_forward_bf16)

extern "C" __global__ void embedding_backward_f32(const float* dout, const unsigned* ids,
                                                  float* dtable, long long tokens, int d,
                                                  unsigned vocab) {
    embedding_backward(dout, ids, dtable, tokens, d, vocab);
}
CONTRALIGN_KERNEL(embedding_backward_f32)

extern "C" __global__ void embedding_backward_bf16(const __nv_bfloat16* dout, const unsigned* ids,
                                                   float* dtable, long long tokens, int d,
                                                   unsigned vocab) {
    embedding_backward(dout, ids, dtable, tokens, d, vocab);
}
CONTRALIGN_KERNEL(embedding_backward_bf16)
