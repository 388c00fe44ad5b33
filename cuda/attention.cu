// Flash attention over a packed token stream, forward and backward (docs/architecture.md §7;
// the CPU reference is src/ops/cpu/attention.rs).
//
// Tensors: q [T, heads, hd], k and v [T, kv_heads, hd], out [T, heads, hd], lse [T, heads]
// (natural log, fp32), dout like out. Query head h reads KV head h / (heads / kv_heads), any
// ratio. Scale 1/sqrt(hd) (passed in, times log2(e): the kernels work in base 2).
//
// Contract: every kernel *overwrites* its outputs (out, lse; delta; dq; dk, dv) and reads
// nothing else that it writes. Storage is f32 or bf16; every product and sum is fp32.
//
// The mask (AttentionLayout in src/ops/mod.rs): token t sees key s when s lies in its group's
// prompt [context_start[t], context_end[t]) or in its own segment [own_start[t], t], and, with
// a sliding window w > 0, positions[t] - positions[s] < w. Each kernel applies it per element.
//
// Tile skipping: the host (src/ops/cuda/attention.rs) derives from the layout, once per batch,
// for every query tile the key tiles it must visit (those holding at least one key that one of
// its rows sees) and the transpose, as CSR lists (`q_offsets`/`q_tiles`, `k_offsets`/
// `k_tiles`). A kernel loads and computes only the tiles in its list: a tile that the layout
// masks out entirely (a sibling response, keys past the window, later tokens) is never read.
//
// Kernels, with TILE = 32 rows (bf16) or 16 (f32) for queries and keys alike, 4 warps each:
//   attention_forward_*        grid (query tiles, heads): online softmax over the tile's key
//                              tiles; out, lse.
//   attention_backward_delta_* one warp per (token, head): delta = rowsum(dout * out).
//   attention_backward_dkdv_*  grid (key tiles, kv_heads): loops over the group's query heads
//                              and the query tiles that see the key tile, in a fixed order.
//   attention_backward_dq_*    grid (query tiles, heads): loops over the tile's key tiles.
// The backward recomputes P from lse instead of storing it and needs no atomics: each block
// owns its outputs and sums in a fixed order, so the bits are the same from run to run.
//
// Head dims up to 128 run in the kernels above; 129 to 256 in the same kernels instantiated
// with twice the accumulators (`*_d256`: correct, not tuned; their bf16 backward keeps 16
// accumulator fragments a thread and spills, tools/ptx-spills-allowed.txt).
//
// Tiles live in dynamic shared memory (under 48 KiB for head dims up to 128, no opt-in; the
// d256 kernels opt in to up to 78 KiB, within every sm_80+ GPU's limit), rows
// padded by 16 bytes so that the 16 rows of a fragment fall on different banks. Products of
// tiles go through 16 x 16 x 16 steps: WMMA (tensor cores, bf16 in, fp32 accumulate) for bf16,
// fp32 FMAs for f32 (exact enough to match the CPU's f64 reference to ~1e-6). Head dims that
// are not multiples of 16 are zero-padded in shared memory.
#include "contralign.cuh"
#include "mma.cuh"

// The layout on the device (struct AttentionLayoutArgs in src/ops/cuda/attention.rs).
struct AttentionLayoutArgs {
    const int* positions;
    const int* context_start;
    const int* context_end;
    const int* own_start;
    const int* q_offsets;  // [query tiles + 1]
    const int* q_tiles;    // key tiles of each query tile, ascending
    const int* k_offsets;  // [key tiles + 1]
    const int* k_tiles;    // query tiles of each key tile, ascending
    int tokens;
    int window;  // 0: none
};

// The shapes (struct AttentionDims in src/ops/cuda/attention.rs).
struct AttentionDims {
    int heads;
    int kv_heads;
    int head_dim;
    float scale_log2;  // log2(e) / sqrt(head_dim)
};

namespace {

using LayoutArgs = AttentionLayoutArgs;
using Dims = AttentionDims;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLn2 = 0.6931471805599453f;

// What a query row needs to test its keys: its mask ranges and position. Rows past the
// stream see nothing.
struct RowMask {
    int context_start, context_end, own_start, self, position;
};

__device__ __forceinline__ bool sees(const RowMask& r, int key, int key_position, int window) {
    const bool in_range = (key >= r.context_start && key < r.context_end) ||
                          (key >= r.own_start && key <= r.self);
    return in_range && (window == 0 || r.position - key_position < window);
}

// Rows of a query or key tile, and how the 16 x 16 fragments of a tile product spread over
// the warps: fragment f of a (rows x cols) product is (f / (cols / 16), f % (cols / 16)), and
// warp w owns fragments w, w + 4, ...
template <class T>
struct Tile {
    static constexpr int kRows = sizeof(T) == 2 ? 32 : 16;
    // Row strides in shared memory: 16 bytes of padding.
    static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
    static constexpr int kScoreLd = kRows + 4;
};

// The accumulators each warp keeps of a (rows x head_dim) product for head dims up to
// kMaxDim: 128 for the kernels of every model this engine targets, 256 for the wide kernels
// (`*_d256`) that make the other head dims correct.
template <class T, int kMaxDim>
struct Slots {
    static constexpr int kN = (Tile<T>::kRows / 16) * (kMaxDim / 16) / kWarps;
};

__device__ __forceinline__ int padded_dim(int head_dim) { return (head_dim + 15) / 16 * 16; }

// Bytes of each shared-memory region, in the order carve() lays them out; 128-byte aligned.
__device__ __forceinline__ size_t align128(size_t n) { return (n + 127) / 128 * 128; }

// Copies rows [row0, row0 + kRows) of one head of x (row stride `stride` elements) into a
// shared tile of `ld` columns; columns past head_dim and rows past `tokens` become zeros.
// 16-byte loads where every row starts 16-byte aligned.
template <class T>
__device__ void load_tile(T* tile, int ld, const T* x, long long stride, int row0, int tokens,
                          int head_dim) {
    constexpr int rows = Tile<T>::kRows;
    const int dp = padded_dim(head_dim);
    constexpr int per_vec = 16 / static_cast<int>(sizeof(T));
    if (head_dim % per_vec == 0 && (stride * static_cast<long long>(sizeof(T))) % 16 == 0) {
        const int vecs = dp / per_vec;
        for (int i = threadIdx.x; i < rows * vecs; i += blockDim.x) {
            const int r = i / vecs, c = (i % vecs) * per_vec;
            // load128/store128 rather than raw uint4 accesses, which the emulator's host
            // compiler splits into narrower ones whose alignment checks a misaligned 16-byte
            // access would pass.
            Pack128<T> value;
            if (row0 + r < tokens && c < head_dim) {
                value = load128(x + (row0 + r) * stride + c);
            } else {
                for (int e = 0; e < per_vec; ++e) value[e] = from_f32<T>(0.0f);
            }
            store128(tile + r * ld + c, value);
        }
    } else {
        for (int i = threadIdx.x; i < rows * dp; i += blockDim.x) {
            const int r = i / dp, c = i % dp;
            tile[r * ld + c] = row0 + r < tokens && c < head_dim ? x[(row0 + r) * stride + c]
                                                                 : from_f32<T>(0.0f);
        }
    }
}

__device__ __forceinline__ RowMask row_mask(const LayoutArgs& L, int t) {
    if (t >= L.tokens) return RowMask{0, 0, 0, -1, 0};
    return RowMask{L.context_start[t], L.context_end[t], L.own_start[t], t, L.positions[t]};
}

// Positions of the keys of one tile (keys past the stream get one that no window admits,
// and no range contains them anyway).
__device__ __forceinline__ void load_key_positions(int* key_pos, const LayoutArgs& L, int key0,
                                                   int rows) {
    for (int i = threadIdx.x; i < rows; i += blockDim.x) {
        key_pos[i] = key0 + i < L.tokens ? L.positions[key0 + i] : 0;
    }
}

// Writes the accumulators of a (kRows x head_dim) product, times `scale_of_row(r)`, to rows
// [row0, ...) of one head of y (row stride `stride`), through the warp's 16 x 16 scratch.
template <class T, class M, int kN, class Scale>
__device__ void write_rows(T* y, long long stride, int row0, int tokens, int head_dim,
                           const typename M::Acc (&acc)[kN], float* scratch,
                           Scale scale_of_row) {
    constexpr int P = Pack128<T>::size;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int col_frags = padded_dim(head_dim) / 16;
    const int frags = (Tile<T>::kRows / 16) * col_frags;
    // Rows of whole chunks from an aligned start keep every chunk aligned.
    const bool vector = head_dim % P == 0 && stride % P == 0 && aligned128(y);
CONTRALIGN_UNROLL
    for (int s = 0; s < kN; ++s) {
        const int f = warp + kWarps * s;
        if (f >= frags) break;
        const int fr = f / col_frags, fc = f % col_frags;
        M::store(scratch, acc[s], 16);
        __syncwarp();
        // A lane's chunk: P consecutive columns of a fragment row, one 16-byte store.
        for (int e = lane * P; e < 256; e += 32 * P) {
            const int r = fr * 16 + e / 16, c = fc * 16 + e % 16;
            if (row0 + r < tokens && c < head_dim) {
                const float scale = scale_of_row(r);
                float values[P];
CONTRALIGN_UNROLL
                for (int k = 0; k < P; ++k) values[k] = scratch[e + k] * scale;
                store_chunk(y + (row0 + r) * stride + c, chunk_count<P>(head_dim, c), vector,
                            values);
            }
        }
        __syncwarp();
    }
}

// c = a b^T for two (kRows x head) tiles of shared memory (leading dimension ld), into the
// fp32 tile c (leading dimension Tile<T>::kScoreLd). bf16: one 16 x 16 fragment per warp.
// f32: one dot product per element over every thread of the block, since a 16-row tile has
// too few fragments to keep four warps busy.
template <class T>
__device__ void tile_product_nt(const T* a, const T* b, float* c, int ld, int dp) {
    constexpr int R = Tile<T>::kRows;
    constexpr int kSld = Tile<T>::kScoreLd;
    if constexpr (sizeof(T) == 4) {
        for (int e = threadIdx.x; e < R * R; e += blockDim.x) {
            const int r = e / R, col = e % R;
            float acc = 0.0f;
            for (int k = 0; k < dp; ++k) acc = fmaf(a[r * ld + k], b[col * ld + k], acc);
            c[r * kSld + col] = acc;
        }
    } else {
        using M = Mma<T>;
        for (int f = threadIdx.x / 32; f < (R / 16) * (R / 16); f += kWarps) {
            const int fr = f / (R / 16), fc = f % (R / 16);
            typename M::Acc acc;
            M::zero(acc);
            for (int kk = 0; kk < dp; kk += 16) {
                M::nt(acc, a + fr * 16 * ld + kk, ld, b + fc * 16 * ld + kk, ld);
            }
            M::store(c + fr * 16 * kSld + fc * 16, acc, kSld);
        }
    }
}

// ---- Forward --------------------------------------------------------------------------

template <class T, int kMaxDim>
__device__ void attention_forward(const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, T* __restrict__ out,
                                  float* __restrict__ lse, LayoutArgs L, Dims D) {
    using M = Mma<T>;
    constexpr int R = Tile<T>::kRows;
    constexpr int kN = Slots<T, kMaxDim>::kN;
    constexpr int kTpr = kThreads / R;  // threads per query row in the softmax
    constexpr int kSld = Tile<T>::kScoreLd;
    extern __shared__ __align__(128) unsigned char smem[];
    const int dp = padded_dim(D.head_dim);
    const int ld = dp + Tile<T>::kPad;
    const int qt = blockIdx.x, h = blockIdx.y;
    const int kvh = h / (D.heads / D.kv_heads);
    const int row0 = qt * R;
    const int warp = threadIdx.x / 32;

    unsigned char* p = smem;
    T* qs = reinterpret_cast<T*>(p);
    p += align128(sizeof(T) * R * ld);
    T* ks = reinterpret_cast<T*>(p);
    p += align128(sizeof(T) * R * ld);
    T* vs = reinterpret_cast<T*>(p);
    p += align128(sizeof(T) * R * ld);
    float* scores = reinterpret_cast<float*>(p);  // P (as T) overwrites each row in place
    p += align128(sizeof(float) * R * kSld);
    float* scratch = reinterpret_cast<float*>(p) + warp * 256;
    p += align128(sizeof(float) * 256 * kWarps);
    float* alpha = reinterpret_cast<float*>(p);
    float* row_sum = alpha + R;
    int* key_pos = reinterpret_cast<int*>(row_sum + R);
    T* probs = reinterpret_cast<T*>(scores);
    constexpr int kPld = kSld * static_cast<int>(sizeof(float) / sizeof(T));

    const long long q_stride = static_cast<long long>(D.heads) * D.head_dim;
    const long long kv_stride = static_cast<long long>(D.kv_heads) * D.head_dim;
    load_tile(qs, ld, q + static_cast<long long>(h) * D.head_dim, q_stride, row0, L.tokens,
              D.head_dim);

    // The softmax row of this thread and its running max (base 2) and sum.
    const int my_row = threadIdx.x / kTpr, my_part = threadIdx.x % kTpr;
    const RowMask mask = row_mask(L, row0 + my_row);
    float m = -INFINITY, l = 0.0f;

    typename M::Acc acc[kN];
CONTRALIGN_UNROLL
    for (int s = 0; s < kN; ++s) M::zero(acc[s]);
    const int col_frags = dp / 16;
    const int out_frags = (R / 16) * col_frags;

    for (int i = L.q_offsets[qt]; i < L.q_offsets[qt + 1]; ++i) {
        const int key0 = L.q_tiles[i] * R;
        load_tile(ks, ld, k + static_cast<long long>(kvh) * D.head_dim, kv_stride, key0,
                  L.tokens, D.head_dim);
        load_tile(vs, ld, v + static_cast<long long>(kvh) * D.head_dim, kv_stride, key0,
                  L.tokens, D.head_dim);
        load_key_positions(key_pos, L, key0, R);
        __syncthreads();
        // S = Q K^T.
        tile_product_nt<T>(qs, ks, scores, ld, dp);
        __syncthreads();
        // Online softmax of this thread's columns my_part, my_part + kTpr, ...
        float s_vals[R / kTpr];
        float tile_max = -INFINITY;
CONTRALIGN_UNROLL
        for (int j = 0; j < R / kTpr; ++j) {
            const int col = my_part + kTpr * j;
            const bool visible = sees(mask, key0 + col, key_pos[col], L.window);
            s_vals[j] = visible ? scores[my_row * kSld + col] * D.scale_log2 : -INFINITY;
            tile_max = fmaxf(tile_max, s_vals[j]);
        }
CONTRALIGN_UNROLL
        for (int o = 1; o < kTpr; o *= 2) {
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
        }
        const float m_new = fmaxf(m, tile_max);
        // A row that has seen nothing yet keeps m = -inf and p = 0.
        const float a = m_new == -INFINITY ? 1.0f : exp2f(m - m_new);
        float sum = 0.0f;
CONTRALIGN_UNROLL
        for (int j = 0; j < R / kTpr; ++j) {
            const float pj = m_new == -INFINITY ? 0.0f : exp2f(s_vals[j] - m_new);
            // The sum takes the probabilities as the product below sees them.
            const T stored = from_f32<T>(pj);
            sum += to_f32(stored);
            probs[my_row * kPld + my_part + kTpr * j] = stored;
        }
CONTRALIGN_UNROLL
        for (int o = 1; o < kTpr; o *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        m = m_new;
        l = l * a + sum;
        if (my_part == 0) alpha[my_row] = a;
        __syncthreads();
        // O = diag(alpha) O + P V.
CONTRALIGN_UNROLL
        for (int s = 0; s < kN; ++s) {
            const int f = warp + kWarps * s;
            if (f >= out_frags) break;
            const int fr = f / col_frags, fc = f % col_frags;
            bool rescale = false;
            for (int r = 0; r < 16; ++r) rescale |= alpha[fr * 16 + r] != 1.0f;
            if (rescale) {
                M::store(scratch, acc[s], 16);
                __syncwarp();
                for (int e = threadIdx.x % 32; e < 256; e += 32) {
                    scratch[e] *= alpha[fr * 16 + e / 16];
                }
                __syncwarp();
                M::load(acc[s], scratch, 16);
            }
            for (int kk = 0; kk < R; kk += 16) {
                M::nn(acc[s], probs + fr * 16 * kPld + kk, kPld, vs + kk * ld + fc * 16, ld);
            }
        }
        __syncthreads();
    }
    if (my_part == 0) row_sum[my_row] = l;
    __syncthreads();
    write_rows<T, M, kN>(out + static_cast<long long>(h) * D.head_dim, q_stride, row0,
                         L.tokens, D.head_dim, acc, scratch, [row_sum](int r) {
                             return row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
                         });
    if (my_part == 0 && row0 + my_row < L.tokens) {
        lse[static_cast<long long>(row0 + my_row) * D.heads + h] =
            l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
    }
}

// ---- Backward -------------------------------------------------------------------------

// delta[t, h] = sum_c dout[t, h, c] out[t, h, c], one warp per (t, h), lanes over the row's
// chunks (RowChunks) in a fixed order.
template <class T>
__device__ void attention_backward_delta(const T* __restrict__ out, const T* __restrict__ dout,
                                         float* __restrict__ delta, long long rows, int head_dim) {
    constexpr int P = Pack128<T>::size;
    const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
    const int lane = threadIdx.x % 32;
    const RowChunks<P> dims(head_dim, aligned128(out) && aligned128(dout));
    for (long long row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < rows;
         row += warps) {
        float sum = 0.0f;
        for (int c = lane; c < dims.chunks; c += 32) {
            float o[P], g[P];
            dims.load(out + row * head_dim, c, o);
            dims.load(dout + row * head_dim, c, g);
            // Past the chunk's count both are 0 and add nothing.
CONTRALIGN_UNROLL
            for (int k = 0; k < P; ++k) sum += o[k] * g[k];
        }
CONTRALIGN_UNROLL
        for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) delta[row] = sum;
    }
}

// Shared memory of the backward kernels: Q, dO, K, V tiles, S/P and dP/dS, per-row values.
template <class T>
struct BackwardSmem {
    T* qs;
    T* dos;
    T* ks;
    T* vs;
    float* scores;  // P (as T) overwrites it in place
    float* dscores; // dS (as T) overwrites it in place
    float* lse2;    // lse * log2(e) of the query rows
    float* delta;
    int* key_pos;
    float* scratch;  // the warp's 16 x 16 (aliases qs: only used after the last product)
    int ld;
};

template <class T>
__device__ __forceinline__ BackwardSmem<T> carve_backward(unsigned char* p, int head_dim) {
    constexpr int R = Tile<T>::kRows;
    BackwardSmem<T> s;
    s.ld = padded_dim(head_dim) + Tile<T>::kPad;
    const size_t tile_bytes = align128(sizeof(T) * R * s.ld);
    s.qs = reinterpret_cast<T*>(p);
    s.dos = reinterpret_cast<T*>(p + tile_bytes);
    s.ks = reinterpret_cast<T*>(p + 2 * tile_bytes);
    s.vs = reinterpret_cast<T*>(p + 3 * tile_bytes);
    p += 4 * tile_bytes;
    s.scores = reinterpret_cast<float*>(p);
    p += align128(sizeof(float) * R * Tile<T>::kScoreLd);
    s.dscores = reinterpret_cast<float*>(p);
    p += align128(sizeof(float) * R * Tile<T>::kScoreLd);
    s.lse2 = reinterpret_cast<float*>(p);
    s.delta = s.lse2 + R;
    s.key_pos = reinterpret_cast<int*>(s.delta + R);
    s.scratch = reinterpret_cast<float*>(s.qs) + (threadIdx.x / 32) * 256;
    return s;
}

// For one (query tile, key tile) pair whose Q, dO, K, V, lse2, delta and key positions are
// in shared memory: S = Q K^T and dP = dO V^T, then P = exp2(S scale - lse2) under the mask
// and dS = P (dP - delta), stored as T over S and dP. Ends with a barrier.
template <class T>
__device__ void probabilities_and_score_grads(const BackwardSmem<T>& s, const LayoutArgs& L,
                                              const Dims& D, int row0, int key0) {
    constexpr int R = Tile<T>::kRows;
    constexpr int kSld = Tile<T>::kScoreLd;
    constexpr int kPld = kSld * static_cast<int>(sizeof(float) / sizeof(T));
    const int dp = padded_dim(D.head_dim);
    tile_product_nt<T>(s.qs, s.ks, s.scores, s.ld, dp);
    tile_product_nt<T>(s.dos, s.vs, s.dscores, s.ld, dp);
    __syncthreads();
    // Every element is read before any is overwritten (bf16 P shares bytes with other
    // threads' fp32 S): read, barrier, write.
    constexpr int per_thread = R * R / kThreads;
    float p_vals[per_thread], ds_vals[per_thread];
CONTRALIGN_UNROLL
    for (int j = 0; j < per_thread; ++j) {
        const int e = threadIdx.x + kThreads * j;
        const int r = e / R, col = e % R;
        const RowMask mask = row_mask(L, row0 + r);
        const bool visible = sees(mask, key0 + col, s.key_pos[col], L.window);
        const float pj =
            visible ? exp2f(s.scores[r * kSld + col] * D.scale_log2 - s.lse2[r]) : 0.0f;
        const float pt = to_f32(from_f32<T>(pj));
        p_vals[j] = pt;
        ds_vals[j] = pt * (s.dscores[r * kSld + col] - s.delta[r]);
    }
    __syncthreads();
    T* probs = reinterpret_cast<T*>(s.scores);
    T* dprobs = reinterpret_cast<T*>(s.dscores);
CONTRALIGN_UNROLL
    for (int j = 0; j < per_thread; ++j) {
        const int e = threadIdx.x + kThreads * j;
        const int r = e / R, col = e % R;
        probs[r * kPld + col] = from_f32<T>(p_vals[j]);
        dprobs[r * kPld + col] = from_f32<T>(ds_vals[j]);
    }
    __syncthreads();
}

// lse (natural log) and delta of the query rows of one tile and head, into shared memory.
template <class T>
__device__ void load_row_stats(const BackwardSmem<T>& s, const float* lse, const float* delta,
                               const LayoutArgs& L, const Dims& D, int row0, int h) {
    constexpr int R = Tile<T>::kRows;
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
        const long long i = static_cast<long long>(row0 + r) * D.heads + h;
        const bool valid = row0 + r < L.tokens;
        s.lse2[r] = valid ? lse[i] * 1.4426950408889634f : 0.0f;
        s.delta[r] = valid ? delta[i] : 0.0f;
    }
}

template <class T, int kMaxDim>
__device__ void attention_backward_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                                        const T* __restrict__ v, const float* __restrict__ lse,
                                        const float* __restrict__ delta,
                                        const T* __restrict__ dout, T* __restrict__ dk,
                                        T* __restrict__ dv, LayoutArgs L, Dims D) {
    using M = Mma<T>;
    constexpr int R = Tile<T>::kRows;
    constexpr int kN = Slots<T, kMaxDim>::kN;
    constexpr int kPld = Tile<T>::kScoreLd * static_cast<int>(sizeof(float) / sizeof(T));
    extern __shared__ __align__(128) unsigned char smem[];
    const BackwardSmem<T> s = carve_backward<T>(smem, D.head_dim);
    const int kt = blockIdx.x, kvh = blockIdx.y;
    const int group = D.heads / D.kv_heads;
    const int key0 = kt * R;
    const int warp = threadIdx.x / 32;
    const int dp = padded_dim(D.head_dim);
    const int col_frags = dp / 16;
    const int out_frags = (R / 16) * col_frags;
    const long long q_stride = static_cast<long long>(D.heads) * D.head_dim;
    const long long kv_stride = static_cast<long long>(D.kv_heads) * D.head_dim;

    load_tile(s.ks, s.ld, k + static_cast<long long>(kvh) * D.head_dim, kv_stride, key0,
              L.tokens, D.head_dim);
    load_tile(s.vs, s.ld, v + static_cast<long long>(kvh) * D.head_dim, kv_stride, key0,
              L.tokens, D.head_dim);
    load_key_positions(s.key_pos, L, key0, R);
    typename M::Acc dk_acc[kN], dv_acc[kN];
CONTRALIGN_UNROLL
    for (int j = 0; j < kN; ++j) {
        M::zero(dk_acc[j]);
        M::zero(dv_acc[j]);
    }
    const T* probs = reinterpret_cast<const T*>(s.scores);
    const T* dprobs = reinterpret_cast<const T*>(s.dscores);
    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (int i = L.k_offsets[kt]; i < L.k_offsets[kt + 1]; ++i) {
            const int row0 = L.k_tiles[i] * R;
            load_tile(s.qs, s.ld, q + static_cast<long long>(h) * D.head_dim, q_stride, row0,
                      L.tokens, D.head_dim);
            load_tile(s.dos, s.ld, dout + static_cast<long long>(h) * D.head_dim, q_stride, row0,
                      L.tokens, D.head_dim);
            load_row_stats(s, lse, delta, L, D, row0, h);
            __syncthreads();
            probabilities_and_score_grads(s, L, D, row0, key0);
            // dV += P^T dO, dK += dS^T Q (scaled when written).
CONTRALIGN_UNROLL
            for (int j = 0; j < kN; ++j) {
                const int f = warp + kWarps * j;
                if (f >= out_frags) break;
                const int fr = f / col_frags, fc = f % col_frags;
                for (int kk = 0; kk < R; kk += 16) {
                    M::tn(dv_acc[j], probs + kk * kPld + fr * 16, kPld, s.dos + kk * s.ld + fc * 16,
                          s.ld);
                    M::tn(dk_acc[j], dprobs + kk * kPld + fr * 16, kPld,
                          s.qs + kk * s.ld + fc * 16, s.ld);
                }
            }
            __syncthreads();
        }
    }
    const float scale = D.scale_log2 * kLn2;
    write_rows<T, M, kN>(dk + static_cast<long long>(kvh) * D.head_dim, kv_stride, key0,
                         L.tokens, D.head_dim, dk_acc, s.scratch, [scale](int) { return scale; });
    write_rows<T, M, kN>(dv + static_cast<long long>(kvh) * D.head_dim, kv_stride, key0,
                         L.tokens, D.head_dim, dv_acc, s.scratch, [](int) { return 1.0f; });
}

template <class T, int kMaxDim>
__device__ void attention_backward_dq(const T* __restrict__ q, const T* __restrict__ k,
                                      const T* __restrict__ v, const float* __restrict__ lse,
                                      const float* __restrict__ delta, const T* __restrict__ dout,
                                      T* __restrict__ dq, LayoutArgs L, Dims D) {
    using M = Mma<T>;
    constexpr int R = Tile<T>::kRows;
    constexpr int kN = Slots<T, kMaxDim>::kN;
    constexpr int kPld = Tile<T>::kScoreLd * static_cast<int>(sizeof(float) / sizeof(T));
    extern __shared__ __align__(128) unsigned char smem[];
    const BackwardSmem<T> s = carve_backward<T>(smem, D.head_dim);
    const int qt = blockIdx.x, h = blockIdx.y;
    const int kvh = h / (D.heads / D.kv_heads);
    const int row0 = qt * R;
    const int warp = threadIdx.x / 32;
    const int dp = padded_dim(D.head_dim);
    const int col_frags = dp / 16;
    const int out_frags = (R / 16) * col_frags;
    const long long q_stride = static_cast<long long>(D.heads) * D.head_dim;
    const long long kv_stride = static_cast<long long>(D.kv_heads) * D.head_dim;

    load_tile(s.qs, s.ld, q + static_cast<long long>(h) * D.head_dim, q_stride, row0, L.tokens,
              D.head_dim);
    load_tile(s.dos, s.ld, dout + static_cast<long long>(h) * D.head_dim, q_stride, row0,
              L.tokens, D.head_dim);
    load_row_stats(s, lse, delta, L, D, row0, h);
    typename M::Acc dq_acc[kN];
CONTRALIGN_UNROLL
    for (int j = 0; j < kN; ++j) M::zero(dq_acc[j]);
    const T* dprobs = reinterpret_cast<const T*>(s.dscores);
    for (int i = L.q_offsets[qt]; i < L.q_offsets[qt + 1]; ++i) {
        const int key0 = L.q_tiles[i] * R;
        load_tile(s.ks, s.ld, k + static_cast<long long>(kvh) * D.head_dim, kv_stride, key0,
                  L.tokens, D.head_dim);
        load_tile(s.vs, s.ld, v + static_cast<long long>(kvh) * D.head_dim, kv_stride, key0,
                  L.tokens, D.head_dim);
        load_key_positions(s.key_pos, L, key0, R);
        __syncthreads();
        probabilities_and_score_grads(s, L, D, row0, key0);
        // dQ += dS K (scaled when written).
CONTRALIGN_UNROLL
        for (int j = 0; j < kN; ++j) {
            const int f = warp + kWarps * j;
            if (f >= out_frags) break;
            const int fr = f / col_frags, fc = f % col_frags;
            for (int kk = 0; kk < R; kk += 16) {
                M::nn(dq_acc[j], dprobs + fr * 16 * kPld + kk, kPld, s.ks + kk * s.ld + fc * 16,
                      s.ld);
            }
        }
        __syncthreads();
    }
    const float scale = D.scale_log2 * kLn2;
    write_rows<T, M, kN>(dq + static_cast<long long>(h) * D.head_dim, q_stride, row0,
                         L.tokens, D.head_dim, dq_acc, s.scratch, [scale](int) { return scale; });
}

}  // namespace

// The tile kernels for head dims up to D.
#define CONTRALIGN_ATTENTION_TILE_KERNELS(suffix, T, D)                                        \
    extern "C" __global__ void __launch_bounds__(kThreads)                                      \
        attention_forward_##suffix(const T* q, const T* k, const T* v, T* out, float* lse,      \
                                   AttentionLayoutArgs layout, AttentionDims dims) {            \
        attention_forward<T, D>(q, k, v, out, lse, layout, dims);                               \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(kThreads) attention_backward_dkdv_##suffix(    \
        const T* q, const T* k, const T* v, const float* lse, const float* delta,               \
        const T* dout, T* dk, T* dv, AttentionLayoutArgs layout, AttentionDims dims) {          \
        attention_backward_dkdv<T, D>(q, k, v, lse, delta, dout, dk, dv, layout, dims);         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(kThreads) attention_backward_dq_##suffix(      \
        const T* q, const T* k, const T* v, const float* lse, const float* delta,               \
        const T* dout, T* dq, AttentionLayoutArgs layout, AttentionDims dims) {                 \
        attention_backward_dq<T, D>(q, k, v, lse, delta, dout, dq, layout, dims);               \
    }

#define CONTRALIGN_ATTENTION_DELTA_KERNEL(suffix, T)                                            \
    extern "C" __global__ void attention_backward_delta_##suffix(                               \
        const T* out, const T* dout, float* delta, long long rows, int head_dim) {              \
        attention_backward_delta<T>(out, dout, delta, rows, head_dim);                          \
    }

CONTRALIGN_ATTENTION_TILE_KERNELS(f32, float, 128)
CONTRALIGN_ATTENTION_TILE_KERNELS(bf16, __nv_bfloat16, 128)
CONTRALIGN_ATTENTION_TILE_KERNELS(f32_d256, float, 256)
CONTRALIGN_ATTENTION_TILE_KERNELS(bf16_d256, __nv_bfloat16, 256)
CONTRALIGN_ATTENTION_DELTA_KERNEL(f32, float)
CONTRALIGN_ATTENTION_DELTA_KERNEL(bf16, __nv_bfloat16)
#undef CONTRALIGN_ATTENTION_TILE_KERNELS
#undef CONTRALIGN_ATTENTION_DELTA_KERNEL

CONTRALIGN_KERNEL(attention_forward_f32)
CONTRALIGN_KERNEL(attention_backward_delta_f32)
CONTRALIGN_KERNEL(attention_backward_dkdv_f32)
CONTRALIGN_KERNEL(attention_backward_dq_f32)
CONTRALIGN_KERNEL(attention_forward_bf16)
CONTRALIGN_KERNEL(attention_backward_delta_bf16)
CONTRALIGN_KERNEL(attention_backward_dkdv_bf16)
CONTRALIGN_KERNEL(attention_backward_dq_bf16)
CONTRALIGN_KERNEL(attention_forward_f32_d256)
CONTRALIGN_KERNEL(attention_backward_dkdv_f32_d256)
CONTRALIGN_KERNEL(attention_backward_dq_f32_d256)
CONTRALIGN_KERNEL(attention_forward_bf16_d256)
CONTRALIGN_KERNEL(attention_backward_dkdv_bf16_d256)
CONTRALIGN_KERNEL(attention_backward_dq_bf16_d256)
