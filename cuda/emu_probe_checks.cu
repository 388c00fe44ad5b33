// Kernels that check the emulator's memory probe and limits (tests/emu_model.rs): copies whose
// coalescing the probe must measure, kernels with races that racecheck must report, and
// launches that a GPU would refuse. Several are wrong on purpose; none is used by the model.
#include "contralign.cuh"

// out[i] = in[i]: each warp reads 128 contiguous bytes.
extern "C" __global__ void probe_copy(const float* in, float* out, long long n) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i];
}
CONTRALIGN_KERNEL(probe_copy)

// out[i] = in[i * stride]: lanes of a warp read `stride` floats apart.
extern "C" __global__ void probe_strided_copy(const float* in, float* out, long long n,
                                              int stride) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i * stride];
}
CONTRALIGN_KERNEL(probe_strided_copy)

// The copy with 16-byte loads and stores from `offset` floats into both buffers (a misaligned
// start when offset % 4 != 0).
extern "C" __global__ void probe_copy128(const float* in, float* out, long long packs,
                                         int offset) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < packs) store128(out + offset + 4 * i, load128(in + offset + 4 * i));
}
CONTRALIGN_KERNEL(probe_copy128)

// The copy with each thread's 4 consecutive floats loaded one at a time, then stored one at a
// time: 4-byte accesses 16 bytes apart across a warp's lanes, which a GPU does not merge into
// 16-byte ones (it cannot prove the alignment).
extern "C" __global__ void probe_copy_quads_by_element(const float* in, float* out,
                                                       long long quads) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= quads) return;
    float quad[4];
    for (int k = 0; k < 4; ++k) quad[k] = in[4 * i + k];
    for (int k = 0; k < 4; ++k) out[4 * i + k] = quad[k];
}
CONTRALIGN_KERNEL(probe_copy_quads_by_element)

// Each thread writes its slot of shared memory and reads its neighbour's; `sync` puts the
// barrier between, as it must be.
extern "C" __global__ void probe_shared_neighbour(const float* in, float* out, int sync) {
    __shared__ float slots[1024];
    const unsigned t = threadIdx.x;
    slots[t] = in[blockIdx.x * blockDim.x + t];
    if (sync) __syncthreads();
    out[blockIdx.x * blockDim.x + t] = slots[(t + 1) % blockDim.x];
}
CONTRALIGN_KERNEL(probe_shared_neighbour)

// Thread 0 of every block adds its block's value into out[0]: with `atomic` through
// atomicAdd, otherwise with a plain read-modify-write (a race between blocks).
extern "C" __global__ void probe_block_sum(const float* in, float* out, int atomic) {
    if (threadIdx.x != 0) return;
    if (atomic) {
        atomicAdd(out, in[blockIdx.x]);
    } else {
        out[0] += in[blockIdx.x];
    }
}
CONTRALIGN_KERNEL(probe_block_sum)

// 32 KiB of static shared memory, touched; out[0] = a sum over it (one thread).
extern "C" __global__ void probe_static_shared(float* out) {
    __shared__ float a[8192];
    if (threadIdx.x != 0) return;
    float total = 0.0f;
    for (int i = 0; i < 8192; ++i) {
        a[i] = 1.0f;
        total += a[i];
    }
    out[0] = total;
}
CONTRALIGN_KERNEL(probe_static_shared)

// Fills `floats` floats of dynamic shared memory and sums them into out[0] (one thread).
extern "C" __global__ void probe_dynamic_shared(float* out, int floats) {
    extern __shared__ float buffer[];
    if (threadIdx.x != 0) return;
    float total = 0.0f;
    for (int i = 0; i < floats; ++i) {
        buffer[i] = 1.0f;
        total += buffer[i];
    }
    out[0] = total;
}
CONTRALIGN_KERNEL(probe_dynamic_shared)

// a * b + c as written and through fmaf: with -fmad=false (the PTX) and -ffp-contract=off (the
// emulator) the first is two roundings on both, the second one.
extern "C" __global__ void fp_contraction_probe(const float* a, const float* b, const float* c,
                                                float* plain, float* fused, long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        plain[i] = a[i] * b[i] + c[i];
        fused[i] = fmaf(a[i], b[i], c[i]);
    }
}
CONTRALIGN_KERNEL(fp_contraction_probe)
