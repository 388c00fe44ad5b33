// Token embedding: the forward gathers rows of the table, the backward adds each token's
// gradient row into the table gradient (fp32 arithmetic, stored as the gradient's type).
//
// The backward takes the ids grouped by value (host-made, staged with the batch): `order`
// holds the token indices sorted by id, stably, and group `g` is id `unique[g]`'s tokens
// `order[starts[g]..starts[g + 1]]`. A block owns one id's row and a span of its columns; each
// thread reads its table elements once, adds that id's gradient rows in token order, and
// writes them once, rounded to the table's type. Repeated ids thus add in the CPU reference's
// order (bit for bit on f32), no atomics are needed, every table row is touched once, and
// the parallelism is (distinct ids) x d instead of d. Into a bf16 table the one rounding per
// op is the CPU's bf16 mode's.
#include "contralign.cuh"

namespace {

// Threads take 16-byte chunks of P = Pack128<T>::size elements of the output, a grid-stride
// apart, where the table and the output are aligned and d is whole chunks (a chunk then never
// spans two tokens); else single elements, a grid-stride apart.
template <class T>
__device__ void embedding_forward(const T* __restrict__ table, const unsigned* __restrict__ ids,
                                  T* __restrict__ out, long long tokens, int d,
                                  unsigned vocab) {
    constexpr int P = Pack128<T>::size;
    const bool vector = d % P == 0 && aligned128(table) && aligned128(out);
    const int width = vector ? P : 1;
    const long long units = tokens * d / width;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long u = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
         u += stride) {
        const long long i = u * width;
        const unsigned id = ids[i / d];
        // An id past the table would read another tensor's memory: fail the launch instead.
        if (id >= vocab) __trap();
        const T* row = table + static_cast<long long>(id) * d + i % d;
        if (vector) {
            store128(out + i, load128(row));
        } else {
            out[i] = *row;
        }
    }
}

// A thread owns chunk c of its block's id row (RowChunks; a block spans blockDim.x chunks), of
// P elements, P those of 16 bytes of the wider of the two types: 16-byte accesses of the
// gradient rows and of the table's row, or 8-byte ones of the bf16 one where the other is f32
// (so that a warp's lanes cover consecutive bytes of both), where the buffers are aligned and
// d is whole chunks.
template <class T, class G>
__device__ void embedding_backward(const T* __restrict__ dout, const unsigned* __restrict__ order,
                                   const unsigned* __restrict__ unique,
                                   const unsigned* __restrict__ starts, G* __restrict__ dtable,
                                   int d, unsigned vocab) {
    constexpr int P = 16 / (sizeof(T) > sizeof(G) ? sizeof(T) : sizeof(G));
    const RowChunks<P> row(d, aligned128(dout) && aligned128(dtable));
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= row.chunks) return;
    const unsigned id = unique[blockIdx.x];
    if (id >= vocab) __trap();
    G* cells = dtable + static_cast<long long>(id) * d;
    float acc[P];
    row.load(cells, c, acc);
    for (unsigned i = starts[blockIdx.x]; i < starts[blockIdx.x + 1]; ++i) {
        float grad[P];
        row.load(dout + static_cast<long long>(order[i]) * d, c, grad);
        CONTRALIGN_UNROLL
        for (int k = 0; k < P; ++k) acc[k] += grad[k];
    }
    row.store(cells, c, acc);
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

#define CONTRALIGN_EMBEDDING_BACKWARD(suffix, T, G)                                          \
    extern "C" __global__ void embedding_backward_##suffix(                                   \
        const T* dout, const unsigned* order, const unsigned* unique, const unsigned* starts, \
        G* dtable, int d, unsigned vocab) {                                                   \
        embedding_backward(dout, order, unique, starts, dtable, d, vocab);                    \
    }

CONTRALIGN_EMBEDDING_BACKWARD(f32_f32, float, float)
CONTRALIGN_KERNEL(embedding_backward_f32_f32)
CONTRALIGN_EMBEDDING_BACKWARD(f32_bf16, float, __nv_bfloat16)
CONTRALIGN_KERNEL(embedding_backward_f32_bf16)
CONTRALIGN_EMBEDDING_BACKWARD(bf16_f32, __nv_bfloat16, float)
CONTRALIGN_KERNEL(embedding_backward_bf16_f32)
CONTRALIGN_EMBEDDING_BACKWARD(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
CONTRALIGN_KERNEL(embedding_backward_bf16_bf16)
