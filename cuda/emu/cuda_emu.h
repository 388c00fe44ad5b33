// The CUDA execution model on the host (docs/cuda.md, "Kernels that run everywhere").
//
// Kernel sources include this (through cuda/contralign.cuh) when they are compiled by the host
// C++ compiler. runtime.cpp runs each block's threads as fibers on one OS thread: a thread
// runs without interruption from one scheduling point (__syncthreads, a warp collective, its
// end) to the next, and between scheduling points the threads run in an order shuffled by
// the launch's seed, so that a missing barrier gives wrong results instead of hiding behind
// lockstep execution. See cuda/README.md for the whole contract.
#pragma once

#ifdef __CUDACC__
#error "cuda/emu emulates CUDA on the host; nvcc compiles the kernels natively"
#endif

#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <type_traits>
#include <utility>

// ---- Qualifiers ---------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// build.rs rewrites every `__shared__` declaration of the kernel sources before the host
// compiler sees them (cuda/README.md): `__shared__ T x[N];` becomes
// `auto& x = ::contralign_emu::shared_variable<T[N], 0>([] {});`, a slot in the block's
// shared-memory arena, and `extern __shared__ T x[];` a pointer to the block's dynamic shared
// memory. A `__shared__` that reaches the compiler was outside such a declaration.
#define __shared__ _Pragma("GCC error \"__shared__ is only supported in declarations (cuda/README.md)\"")

// ---- Vector and index types ---------------------------------------------------------------

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
    float x, y;
};
struct float3 {
    float x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return {x, y, z, w};
}

namespace contralign_emu {

// The current thread's coordinates and block's shared memory. The scheduler rewrites them
// before it resumes a fiber; kernels see the coordinates through the read-only macros below.
// `inline thread_local` with a constant initializer lets every translation unit read them
// directly, without TLS wrapper calls.
namespace detail {
inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline thread_local dim3 block_dim;
inline thread_local dim3 grid_dim;
// The launch's dynamic shared memory (`extern __shared__`), 256-byte aligned.
inline thread_local unsigned char* dynamic_shared;
// Numbers the blocks run on this OS thread, from 1: a shared-variable slot filled in an
// earlier block is stale.
inline thread_local std::uint64_t block_serial;
}  // namespace detail

// The entry points of runtime.cpp that kernels reach through the intrinsics below.
namespace rt {
enum class BarrierMode : int { Plain, Count, And, Or };
enum class WarpOp : int {
    Sync,
    ShflIdx,
    ShflUp,
    ShflDown,
    ShflXor,
    All,
    Any,
    Ballot,
    ReduceAddU,
    ReduceMinU,
    ReduceMaxU,
    ReduceAddI,
    ReduceMinI,
    ReduceMaxI,
};
// Waits until every live thread of the block arrives; returns the mode's reduction of the
// predicates.
int barrier(BarrierMode mode, int predicate);
// Deposits `value`, waits until every live lane named in `mask` arrives at the same
// collective, and returns this lane's result. A lane reading from a lane that does not take
// part gets all-ones bits (NaN for floats): undefined on a GPU, so made conspicuous here.
std::uint64_t warp_collective(WarpOp op, unsigned int mask, std::uint64_t value, unsigned int arg,
                              int width);
// The lanes of the calling warp that exist and have not returned.
unsigned int active_mask();
// Ends the launch with an error message (printf-style); never returns.
[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));
// Where one `__shared__` declaration's variable lives in the block numbered `block`.
struct SharedSlot {
    std::uint64_t block;
    void* address;
};
// Gives `slot` `bytes` of the current block's static shared memory.
void allocate_shared(SharedSlot& slot, std::size_t bytes, std::size_t align);
// An atomic read-modify-write of `bytes` at `address`, for the memory probe (emu/probe.h):
// counted as a read and a write, and never a race with another atomic.
void atomic_access(const void* address, unsigned bytes);
// Adds a warp-wide operation's FLOPs to the launch's count (every lane calls it; lane 0
// counts).
void count_warp_flops(std::uint64_t flops);
// A kernel's vector access of `bytes` (8 or 16: ld/st.global.v2/v4 on a GPU) between device
// memory and a thread's `local` copy. Fails the launch, naming `what`, unless `device` is
// aligned to `bytes`, as a GPU faults; the memory probe sees one access of `bytes`. Out of
// line and outside the probe's instrumentation, which would see the pieces that the host
// compiler cuts a copy into.
void vector_load(void* local, const void* device, unsigned bytes, const char* what);
void vector_store(void* device, const void* local, unsigned bytes, const char* what);
}  // namespace rt

// The variable of one `__shared__` declaration (`Site` is a lambda type unique to the
// declaration and to each instantiation of an enclosing template): the first thread of a
// block to reach the declaration allocates it from the block's arena, which starts every
// block as all-ones bytes (NaN for floats), so that a read of what no thread of the block
// wrote shows.
template <class X, std::size_t Align, class Site>
X& shared_variable(Site) {
    static thread_local rt::SharedSlot slot;
    if (slot.block != detail::block_serial) {
        rt::allocate_shared(slot, sizeof(X), alignof(X) > Align ? alignof(X) : Align);
    }
    return *static_cast<X*>(slot.address);
}

// What CONTRALIGN_KERNEL exports for each kernel; mirrored by `KernelDesc` in
// src/ops/cuda/emu.rs.
struct KernelDesc {
    void (*entry)(void** params);
    std::uint32_t arity;
    const std::uint32_t* param_sizes;
};

// Calls `kernel` with the arguments that `params` points to, as cuLaunchKernel's
// kernelParams do: params[i] points to the value of argument i.
template <class... A, std::size_t... I>
void invoke(void (*kernel)(A...), [[maybe_unused]] void** params, std::index_sequence<I...>) {
    kernel(*static_cast<A*>(params[I])...);
}

template <class... A>
void invoke(void (*kernel)(A...), void** params) {
    invoke(kernel, params, std::index_sequence_for<A...>{});
}

template <class... A>
KernelDesc describe(void (*entry)(void**), void (*)(A...)) {
    static const std::uint32_t sizes[] = {static_cast<std::uint32_t>(sizeof(A))..., 0u};
    return KernelDesc{entry, static_cast<std::uint32_t>(sizeof...(A)), sizes};
}

template <class T>
T bits_to(std::uint64_t bits) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp collectives exchange trivially copyable values of at most 8 bytes");
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

template <class T>
std::uint64_t to_bits(const T& value) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp collectives exchange trivially copyable values of at most 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}

template <class T>
T shuffle(rt::WarpOp op, unsigned int mask, const T& var, unsigned int arg, int width) {
    return bits_to<T>(rt::warp_collective(op, mask, to_bits(var), arg, width));
}

}  // namespace contralign_emu

// `contralign_emu_run_<name>` runs the kernel from a parameter array;
// `contralign_emu_kernel_<name>` describes it (entry, arity, parameter sizes) for the Rust
// table that build.rs generates from these lines.
#define CONTRALIGN_KERNEL(name)                                                     \
    extern "C" void contralign_emu_run_##name(void** params) {                      \
        ::contralign_emu::invoke(name, params);                                     \
    }                                                                               \
    extern "C" ::contralign_emu::KernelDesc contralign_emu_kernel_##name() {        \
        return ::contralign_emu::describe(contralign_emu_run_##name, name);         \
    }

#define threadIdx (static_cast<const uint3&>(::contralign_emu::detail::thread_idx))
#define blockIdx (static_cast<const uint3&>(::contralign_emu::detail::block_idx))
#define blockDim (static_cast<const dim3&>(::contralign_emu::detail::block_dim))
#define gridDim (static_cast<const dim3&>(::contralign_emu::detail::grid_dim))
constexpr int warpSize = 32;

// ---- Synchronization ----------------------------------------------------------------------

inline void __syncthreads() { ::contralign_emu::rt::barrier(::contralign_emu::rt::BarrierMode::Plain, 0); }
inline int __syncthreads_count(int predicate) {
    return ::contralign_emu::rt::barrier(::contralign_emu::rt::BarrierMode::Count, predicate);
}
inline int __syncthreads_and(int predicate) {
    return ::contralign_emu::rt::barrier(::contralign_emu::rt::BarrierMode::And, predicate);
}
inline int __syncthreads_or(int predicate) {
    return ::contralign_emu::rt::barrier(::contralign_emu::rt::BarrierMode::Or, predicate);
}
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    ::contralign_emu::rt::warp_collective(::contralign_emu::rt::WarpOp::Sync, mask, 0, 0, warpSize);
}
// Fibers on one OS thread see each other's writes at once, and nothing runs between two
// scheduling points, so fences have nothing to order.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline unsigned int __activemask() { return ::contralign_emu::rt::active_mask(); }
[[noreturn]] inline void __trap() { ::contralign_emu::rt::fail("the kernel called __trap()"); }

// A failed device assert fails the launch (cudaErrorAssert on a GPU) instead of aborting the
// process.
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e)                                                                              \
    ((e) ? (void)0                                                                             \
         : ::contralign_emu::rt::fail("assertion `%s` failed at %s:%d", #e, __FILE__, __LINE__))
#endif

// ---- Warp shuffles, votes and reductions --------------------------------------------------

template <class T>
T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize) {
    return ::contralign_emu::shuffle(::contralign_emu::rt::WarpOp::ShflIdx, mask, var,
                                     static_cast<unsigned int>(src_lane), width);
}
template <class T>
T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
    return ::contralign_emu::shuffle(::contralign_emu::rt::WarpOp::ShflUp, mask, var, delta,
                                     width);
}
template <class T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
    return ::contralign_emu::shuffle(::contralign_emu::rt::WarpOp::ShflDown, mask, var, delta,
                                     width);
}
template <class T>
T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize) {
    return ::contralign_emu::shuffle(::contralign_emu::rt::WarpOp::ShflXor, mask, var,
                                     static_cast<unsigned int>(lane_mask), width);
}
inline int __all_sync(unsigned int mask, int predicate) {
    return static_cast<int>(::contralign_emu::rt::warp_collective(
        ::contralign_emu::rt::WarpOp::All, mask, predicate != 0, 0, warpSize));
}
inline int __any_sync(unsigned int mask, int predicate) {
    return static_cast<int>(::contralign_emu::rt::warp_collective(
        ::contralign_emu::rt::WarpOp::Any, mask, predicate != 0, 0, warpSize));
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    return static_cast<unsigned int>(::contralign_emu::rt::warp_collective(
        ::contralign_emu::rt::WarpOp::Ballot, mask, predicate != 0, 0, warpSize));
}

#define CONTRALIGN_EMU_WARP_REDUCE(fn, op_u, op_i)                                         \
    inline unsigned int fn(unsigned int mask, unsigned int value) {                        \
        return static_cast<unsigned int>(::contralign_emu::rt::warp_collective(            \
            ::contralign_emu::rt::WarpOp::op_u, mask, value, 0, warpSize));                \
    }                                                                                      \
    inline int fn(unsigned int mask, int value) {                                          \
        return static_cast<int>(::contralign_emu::rt::warp_collective(                     \
            ::contralign_emu::rt::WarpOp::op_i, mask, static_cast<unsigned int>(value), 0, \
            warpSize));                                                                    \
    }
CONTRALIGN_EMU_WARP_REDUCE(__reduce_add_sync, ReduceAddU, ReduceAddI)
CONTRALIGN_EMU_WARP_REDUCE(__reduce_min_sync, ReduceMinU, ReduceMinI)
CONTRALIGN_EMU_WARP_REDUCE(__reduce_max_sync, ReduceMaxU, ReduceMaxI)
#undef CONTRALIGN_EMU_WARP_REDUCE

// ---- Atomics ------------------------------------------------------------------------------
// Blocks of a launch run one after another on one OS thread and fibers are never preempted,
// so a plain read-modify-write is atomic.

namespace contralign_emu {
// Out of line and outside the memory probe's instrumentation (which would see a plain read
// and write, and might see the read moved before a branch): the probe hears of the access
// through rt::atomic_access instead.
template <class T>
__attribute__((noinline, no_sanitize("thread"))) T atomic_update(T* address, T value,
                                                                  T (*update)(T, T)) {
    rt::atomic_access(address, sizeof(T));
    T old = *address;
    *address = update(old, value);
    return old;
}
template <class T>
__attribute__((noinline, no_sanitize("thread"))) T atomic_cas(T* address, T compare, T value) {
    rt::atomic_access(address, sizeof(T));
    T old = *address;
    if (old == compare) *address = value;
    return old;
}
}  // namespace contralign_emu
#define CONTRALIGN_EMU_ATOMIC(fn, T, expr)                                                \
    inline T fn(T* address, T value) {                                                    \
        return ::contralign_emu::atomic_update<T>(address, value,                         \
                                                  [](T a, T b) -> T { return expr; });   \
    }
CONTRALIGN_EMU_ATOMIC(atomicAdd, int, a + b)
CONTRALIGN_EMU_ATOMIC(atomicAdd, unsigned int, a + b)
CONTRALIGN_EMU_ATOMIC(atomicAdd, unsigned long long, a + b)
CONTRALIGN_EMU_ATOMIC(atomicAdd, float, a + b)
CONTRALIGN_EMU_ATOMIC(atomicAdd, double, a + b)
CONTRALIGN_EMU_ATOMIC(atomicSub, int, a - b)
CONTRALIGN_EMU_ATOMIC(atomicSub, unsigned int, a - b)
CONTRALIGN_EMU_ATOMIC(atomicMax, int, a > b ? a : b)
CONTRALIGN_EMU_ATOMIC(atomicMax, unsigned int, a > b ? a : b)
CONTRALIGN_EMU_ATOMIC(atomicMax, unsigned long long, a > b ? a : b)
CONTRALIGN_EMU_ATOMIC(atomicMin, int, a < b ? a : b)
CONTRALIGN_EMU_ATOMIC(atomicMin, unsigned int, a < b ? a : b)
CONTRALIGN_EMU_ATOMIC(atomicMin, unsigned long long, a < b ? a : b)
CONTRALIGN_EMU_ATOMIC(atomicExch, int, ((void)a, b))
CONTRALIGN_EMU_ATOMIC(atomicExch, unsigned int, ((void)a, b))
CONTRALIGN_EMU_ATOMIC(atomicExch, unsigned long long, ((void)a, b))
CONTRALIGN_EMU_ATOMIC(atomicExch, float, ((void)a, b))
#undef CONTRALIGN_EMU_ATOMIC

inline int atomicCAS(int* a, int c, int v) { return ::contralign_emu::atomic_cas(a, c, v); }
inline unsigned int atomicCAS(unsigned int* a, unsigned int c, unsigned int v) {
    return ::contralign_emu::atomic_cas(a, c, v);
}
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c,
                                    unsigned long long v) {
    return ::contralign_emu::atomic_cas(a, c, v);
}

// ---- Math ---------------------------------------------------------------------------------
// The fast-math intrinsics are exact here: a GPU result within their documented error of the
// exact one passes the same tests. glibc's math.h declares its own __expf, __logf, ... (not
// exported), so those names are macros rather than functions.

namespace contralign_emu {
inline void sincos_f32(float x, float* s, float* c) {
    *s = ::sinf(x);
    *c = ::cosf(x);
}
}  // namespace contralign_emu
#define __expf(x) ::expf(x)
#define __exp10f(x) ::powf(10.0f, (x))
#define __logf(x) ::logf(x)
#define __log2f(x) ::log2f(x)
#define __log10f(x) ::log10f(x)
#define __powf(x, y) ::powf((x), (y))
#define __sinf(x) ::sinf(x)
#define __cosf(x) ::cosf(x)
#define __tanf(x) ::tanf(x)
#define __sincosf(x, s, c) ::contralign_emu::sincos_f32((x), (s), (c))

inline float rsqrtf(float x) { return 1.0f / ::sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / ::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return ::sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / ::sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return ::fmaf(a, b, c); }
// The double forms, which kernels use where a result must match the CPU bit for bit (nvcc
// would otherwise contract a * b + c into an fma).
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double x) { return ::sqrt(x); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }

inline int __float_as_int(float x) { return contralign_emu::bits_to<int>(contralign_emu::to_bits(x)); }
inline unsigned int __float_as_uint(float x) {
    return contralign_emu::bits_to<unsigned int>(contralign_emu::to_bits(x));
}
inline float __int_as_float(int x) { return contralign_emu::bits_to<float>(contralign_emu::to_bits(x)); }
inline float __uint_as_float(unsigned int x) {
    return contralign_emu::bits_to<float>(contralign_emu::to_bits(x));
}
inline long long __double_as_longlong(double x) {
    return contralign_emu::bits_to<long long>(contralign_emu::to_bits(x));
}
inline double __longlong_as_double(long long x) {
    return contralign_emu::bits_to<double>(contralign_emu::to_bits(x));
}
// Conversions to integers: round to nearest even (the default rounding mode), toward zero,
// down, up.
inline int __float2int_rn(float x) { return static_cast<int>(::nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(::floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(::ceilf(x)); }
inline unsigned int __float2uint_rn(float x) { return static_cast<unsigned int>(::nearbyintf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned int x) { return static_cast<float>(x); }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) {
    return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}

template <class T>
T __ldg(const T* p) {
    return *p;
}

// CUDA's global min/max overloads.
#define CONTRALIGN_EMU_MINMAX(T)                           \
    inline T min(T a, T b) { return b < a ? b : a; }       \
    inline T max(T a, T b) { return a < b ? b : a; }
CONTRALIGN_EMU_MINMAX(int)
CONTRALIGN_EMU_MINMAX(unsigned int)
CONTRALIGN_EMU_MINMAX(long)
CONTRALIGN_EMU_MINMAX(unsigned long)
CONTRALIGN_EMU_MINMAX(long long)
CONTRALIGN_EMU_MINMAX(unsigned long long)
#undef CONTRALIGN_EMU_MINMAX
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned int>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned int>(b)); }
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned int>(a), b); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned int>(b)); }
// fminf/fmaxf semantics: a NaN operand yields the other one.
inline float min(float a, float b) { return ::fminf(a, b); }
inline float max(float a, float b) { return ::fmaxf(a, b); }
inline double min(double a, double b) { return ::fmin(a, b); }
inline double max(double a, double b) { return ::fmax(a, b); }

#include "half_types.h"
#include "wmma.h"
