// Kernels that check the emulator itself (tests/emulator.rs): correct kernels whose results
// must be exact, deliberately broken ones (a missing __syncthreads, a missing __syncwarp)
// whose results must be wrong under every seed, and kernels that must fail their launch.
// They are ordinary CUDA and compile to PTX like every other kernel file.
#include "contralign.cuh"

namespace {

__device__ __forceinline__ unsigned linear_thread() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }
__device__ __forceinline__ unsigned linear_block() {
    return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}

// Sums x[block * per_block ..][..per_block] into out[block]: a strided pass per thread, then a
// tree over shared memory that works for any thread count. With Sync false the barriers are
// gone and threads read partial sums that others have not written yet.
template <bool Sync>
__device__ void block_sum(float* sums, const float* x, float* out, int per_block) {
    const unsigned t = linear_thread();
    const unsigned n = block_threads();
    const float* row = x + static_cast<long long>(linear_block()) * per_block;
    float v = 0.0f;
    for (int i = static_cast<int>(t); i < per_block; i += static_cast<int>(n)) v += row[i];
    sums[t] = v;
    if (Sync) __syncthreads();
    unsigned span = 1;
    while (span < n) span <<= 1;
    for (unsigned stride = span / 2; stride > 0; stride /= 2) {
        if (t < stride && t + stride < n) sums[t] += sums[t + stride];
        if (Sync) __syncthreads();
    }
    if (t == 0) out[linear_block()] = sums[0];
}

}  // namespace

extern "C" __global__ void block_sum_static(const float* x, float* out, int per_block) {
    __shared__ float sums[1024];
    block_sum<true>(sums, x, out, per_block);
}
CONTRALIGN_KERNEL(block_sum_static)

// The same with dynamic shared memory: one float per thread.
extern "C" __global__ void block_sum_dynamic(const float* x, float* out, int per_block) {
    extern __shared__ float sums[];
    block_sum<true>(sums, x, out, per_block);
}
CONTRALIGN_KERNEL(block_sum_dynamic)

// Broken on purpose: block_sum_static without its barriers.
extern "C" __global__ void block_sum_no_barrier(const float* x, float* out, int per_block) {
    __shared__ float sums[1024];
    block_sum<false>(sums, x, out, per_block);
}
CONTRALIGN_KERNEL(block_sum_no_barrier)

namespace {

// Each lane publishes its value in shared memory and reads its neighbour's within its half
// warp. With Sync false nothing orders the write before the neighbour's read: on Volta and
// later the lanes of a warp need not run in lockstep.
template <bool Sync>
__device__ void warp_exchange(const float* x, float* out) {
    __shared__ float slots[1024];
    const unsigned t = linear_thread();
    const unsigned lane = t % 32;
    const unsigned half_mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    const unsigned g = linear_block() * block_threads() + t;
    slots[t] = x[g];
    if (Sync) __syncwarp(half_mask);
    const unsigned neighbour = (t & ~15u) | ((lane + 1) % 16);
    out[g] = slots[neighbour];
}

}  // namespace

// Needs a block of whole warps.
extern "C" __global__ void warp_exchange_synced(const float* x, float* out) {
    warp_exchange<true>(x, out);
}
CONTRALIGN_KERNEL(warp_exchange_synced)

// Broken on purpose: warp_exchange_synced without its __syncwarp.
extern "C" __global__ void warp_exchange_unsynced(const float* x, float* out) {
    warp_exchange<false>(x, out);
}
CONTRALIGN_KERNEL(warp_exchange_unsynced)

// Sums of x per block through warp shuffles: __shfl_down_sync within each warp (masked to the
// lanes that exist in a partial last warp), then the warps' sums through shared memory.
extern "C" __global__ void block_sum_shuffle(const int* x, int* out) {
    __shared__ int warp_sums[32];
    const unsigned t = linear_thread();
    const unsigned n = block_threads();
    const unsigned lane = t % 32;
    const unsigned warp = t / 32;
    const unsigned lanes = min(32u, n - warp * 32);
    const unsigned mask = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    int v = x[linear_block() * n + t];
    for (unsigned offset = 16; offset > 0; offset /= 2) {
        const int other = __shfl_down_sync(mask, v, offset);
        if (lane + offset < lanes) v += other;
    }
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const unsigned warps = (n + 31) / 32;
        int s = lane < warps ? warp_sums[lane] : 0;
        s = __reduce_add_sync(mask, s);
        if (lane == 0) out[linear_block()] = s;
    }
}
CONTRALIGN_KERNEL(block_sum_shuffle)

// Every warp collective with its exact result per thread, 12 ints each (tests/emulator.rs
// recomputes them): shuffles by index, up, down and xor over segments of `width` lanes, votes,
// and reductions. The full masks in a partial last warp name lanes that do not exist, which
// is undefined on a GPU; the tests use it to check the emulator's rule for it.
extern "C" __global__ void warp_collectives(const int* x, int* out, int width) {
    const unsigned t = linear_thread();
    const unsigned g = linear_block() * block_threads() + t;
    const unsigned lane = t % 32;
    const int v = x[g];
    int* o = out + 12 * static_cast<long long>(g);
    const unsigned full = 0xffffffffu;
    o[0] = __shfl_sync(full, v, static_cast<int>(lane * 7 + 3), width);
    o[1] = __shfl_up_sync(full, v, 3, width);
    o[2] = __shfl_down_sync(full, v, 5, width);
    o[3] = __shfl_xor_sync(full, v, 6, width);
    o[4] = __all_sync(full, v > -90);
    o[5] = __any_sync(full, v > 90);
    o[6] = static_cast<int>(__ballot_sync(full, v & 1));
    o[7] = __reduce_add_sync(full, v);
    o[8] = __reduce_min_sync(full, v);
    o[9] = static_cast<int>(__reduce_max_sync(full, static_cast<unsigned>(v)));
    // Half-warp groups with their own masks run as separate collectives.
    const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    o[10] = __shfl_sync(half, v, 0, 16);
    o[11] = static_cast<int>(__activemask());
}
CONTRALIGN_KERNEL(warp_collectives)

// atomicAdd from every thread: x into sum[0] (float) and a count per residue mod 7 (int).
extern "C" __global__ void atomic_adds(const float* x, float* sum, int* counts) {
    const unsigned g = linear_block() * block_threads() + linear_thread();
    atomicAdd(sum, x[g]);
    atomicAdd(&counts[g % 7], 1);
}
CONTRALIGN_KERNEL(atomic_adds)

// Every thread writes its coordinates (10 values) at its global position.
extern "C" __global__ void thread_coordinates(unsigned* out) {
    const unsigned g = linear_block() * block_threads() + linear_thread();
    unsigned* o = out + 10 * static_cast<unsigned long long>(g);
    o[0] = threadIdx.x;
    o[1] = threadIdx.y;
    o[2] = threadIdx.z;
    o[3] = blockIdx.x;
    o[4] = blockIdx.y;
    o[5] = blockIdx.z;
    o[6] = blockDim.x * blockDim.y * blockDim.z;
    o[7] = gridDim.x * gridDim.y * gridDim.z;
    o[8] = static_cast<unsigned>(__syncthreads_count(threadIdx.x % 3 == 0));
    o[9] = static_cast<unsigned>(__syncthreads_and(threadIdx.x < 1024)) +
           2u * static_cast<unsigned>(__syncthreads_or(threadIdx.x == 5));
}
CONTRALIGN_KERNEL(thread_coordinates)

// float -> bf16 and f16 (round to nearest even) and back, for every x[i].
extern "C" __global__ void convert_halves(const float* x, unsigned short* bf16, unsigned short* f16,
                                          float* bf16_back, float* f16_back, int n) {
    const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    const __nv_bfloat16 b = __float2bfloat16(x[i]);
    const __half h = __float2half(x[i]);
    bf16[i] = __bfloat16_as_ushort(b);
    f16[i] = __half_as_ushort(h);
    bf16_back[i] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(i)));
    f16_back[i] = __half2float(__ushort_as_half(static_cast<unsigned short>(i)));
}
CONTRALIGN_KERNEL(convert_halves)

// c [m, n] = a [m, k] . w [n, k]^T + c with WMMA m16n16k16: one warp per 16 x 16 tile of c,
// tiles spread over blockDim.y warps and a 2-D grid. m, n, k are multiples of 16; c is read
// and written column-major when c_col_major is set.
extern "C" __global__ void wmma_matmul_bf16(const __nv_bfloat16* a, const __nv_bfloat16* w,
                                            float* c, int m, int n, int k, int c_col_major) {
    using namespace nvcuda;
    const int tile_m = static_cast<int>(blockIdx.y * blockDim.y + threadIdx.y);
    const int tile_n = static_cast<int>(blockIdx.x);
    if (tile_m * 16 >= m || tile_n * 16 >= n) return;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    const wmma::layout_t layout = c_col_major ? wmma::mem_col_major : wmma::mem_row_major;
    float* c_tile = c_col_major ? c + tile_n * 16 * m + tile_m * 16
                                : c + tile_m * 16 * n + tile_n * 16;
    const unsigned ldc = c_col_major ? m : n;
    wmma::load_matrix_sync(acc, c_tile, ldc, layout);
    for (int kk = 0; kk < k; kk += 16) {
        wmma::load_matrix_sync(fa, a + tile_m * 16 * k + kk, k);
        wmma::load_matrix_sync(fb, w + tile_n * 16 * k + kk, k);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c_tile, acc, ldc, layout);
}
CONTRALIGN_KERNEL(wmma_matmul_bf16)

// `rounds` rounds of: read a neighbour's value, barrier, write one's own, barrier. Each
// value ends as a known integer (tests/emulator.rs), and a 1000-thread block makes a timing
// of the scheduler (benches/emulator.rs).
extern "C" __global__ void barrier_rounds(float* out, int rounds) {
    extern __shared__ __align__(16) float values[];
    const unsigned t = linear_thread();
    const unsigned n = block_threads();
    float v = static_cast<float>(t);
    values[t] = v;
    __syncthreads();
    for (int r = 0; r < rounds; ++r) {
        v += values[(t + 1) % n];
        __syncthreads();
        values[t] = v;
        __syncthreads();
    }
    out[linear_block() * n + t] = v;
}
CONTRALIGN_KERNEL(barrier_rounds)

// Kernels whose launch must fail, selected by `which`: 0 calls __trap() in one thread;
// 1 mixes __shfl_sync and __ballot_sync in one collective; 2 leaves a lane waiting at
// __syncwarp while the others wait at __syncthreads (a deadlock); 3 names a mask without
// the calling lane; 4 fails an assert.
extern "C" __global__ void failing(int which) {
    const unsigned lane = threadIdx.x % 32;
    switch (which) {
        case 0:
            if (threadIdx.x == 7) __trap();
            break;
        case 1:
            if (lane < 16) {
                (void)__shfl_sync(0xffffffffu, 1, 0);
            } else {
                (void)__ballot_sync(0xffffffffu, 1);
            }
            break;
        case 2:
            if (threadIdx.x == 0) {
                __syncwarp();
            } else {
                __syncthreads();
            }
            break;
        case 3: (void)__shfl_sync(0x1u, 1, 0); break;
        case 4: assert(threadIdx.x != 3); break;
    }
}
CONTRALIGN_KERNEL(failing)
