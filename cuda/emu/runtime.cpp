// The emulator's scheduler: runs a launch's blocks one after another on the calling OS thread,
// each block's threads as fibers (stackful coroutines), and exposes the C launch ABI that
// src/ops/cuda/emu.rs calls. See cuda/README.md for the model and its guarantees.

#include "cuda_emu.h"
#include "probe.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdlib>
#include <string>
#include <vector>

// Fibers switch with a few instructions of assembly on x86-64; elsewhere (or when built with
// -DCONTRALIGN_EMU_UCONTEXT, to test that path) with ucontext, which also saves and restores
// the signal mask through a system call on every switch and is several times slower.
#if defined(__x86_64__) && !defined(CONTRALIGN_EMU_UCONTEXT)
#define CONTRALIGN_EMU_ASM_SWITCH 1
#else
#define CONTRALIGN_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

namespace {
// The GPU's limits on shared memory per block: 48 KiB of static shared memory; 48 KiB of
// static and dynamic together unless the kernel opted in (cuFuncSetAttribute with
// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES); with the opt-in, static plus the opted-in
// dynamic size up to the architecture's maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin:
// 163 KiB on an A100, 227 KiB on an H100).
constexpr std::size_t kMaxStaticShared = 48 * 1024;
constexpr std::size_t kDefaultShared = 48 * 1024;
constexpr std::size_t kArenaDynamicShared = 227 * 1024;

// The opt-in maximum of an architecture (80 or 90); 0 for one the emulator does not know.
std::size_t opt_in_shared(std::uint32_t arch) {
    switch (arch) {
        case 80: return 163 * 1024;
        case 90: return 227 * 1024;
        default: return 0;
    }
}
}  // namespace

#if CONTRALIGN_EMU_ASM_SWITCH
extern "C" {
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save,
// and continues on the stack `next` (a pointer saved by an earlier switch or set up by
// start_fiber).
void contralign_emu_switch(void** save, void* next);
// The first code a fiber runs: aligns the stack and calls contralign_emu_fiber_main.
void contralign_emu_fiber_entry();
}
asm(R"(
    .text
    .globl contralign_emu_switch
    .hidden contralign_emu_switch
    .type contralign_emu_switch, @function
    .p2align 4
contralign_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size contralign_emu_switch, .-contralign_emu_switch

    .globl contralign_emu_fiber_entry
    .hidden contralign_emu_fiber_entry
    .type contralign_emu_fiber_entry, @function
    .p2align 4
contralign_emu_fiber_entry:
    .cfi_startproc
    .cfi_undefined rip
    andq $-16, %rsp
    call contralign_emu_fiber_main
    ud2
    .cfi_endproc
    .size contralign_emu_fiber_entry, .-contralign_emu_fiber_entry
)");
#endif

extern "C" [[noreturn]] __attribute__((visibility("hidden"))) void contralign_emu_fiber_main();

namespace contralign_emu {
namespace rt {
namespace {

enum class State : std::uint8_t { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
#if CONTRALIGN_EMU_ASM_SWITCH
    void* sp;
#else
    ucontext_t context;
#endif
    State state;
    uint3 tid;
    unsigned lane;
    unsigned warp;
    // At a barrier: the predicate in, the reduction out.
    int predicate;
    int barrier_result;
    // At a warp collective: what this lane asked for, and its result.
    WarpOp op;
    unsigned mask;
    unsigned arg;
    int width;
    std::uint64_t value;
    std::uint64_t result;
};

// Fiber stacks, reused across blocks and launches of one OS thread. Each stack has a guard
// page below it, so an overflow faults instead of corrupting its neighbour.
class StackPool {
public:
    // 128 KiB: kernels keep small register-like arrays and WMMA fragments (1 KiB each) on
    // the stack; printf needs a few KiB.
    static constexpr std::size_t kStackBytes = 128 * 1024;

    ~StackPool() {
        if (base_ != nullptr) munmap(base_, count_ * slot_);
    }

    // Makes room for n stacks; false when the memory cannot be mapped.
    bool reserve(unsigned n) {
        if (n <= count_) return true;
        if (base_ != nullptr) munmap(base_, count_ * slot_);
        base_ = nullptr;
        count_ = 0;
        const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
        slot_ = kStackBytes + page;
        void* memory = mmap(nullptr, n * slot_, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (memory == MAP_FAILED) return false;
        base_ = static_cast<char*>(memory);
        count_ = n;
        for (unsigned i = 0; i < n; ++i) mprotect(base_ + i * slot_, page, PROT_NONE);
        return true;
    }

    char* low(unsigned i) const { return base_ + i * slot_ + (slot_ - kStackBytes); }

    // The top of stack i, moved down by a different number of cache lines for neighbouring
    // fibers: with page-aligned tops, every fiber's hot frames would compete for the same
    // few cache sets.
    char* high(unsigned i) const { return base_ + (i + 1) * slot_ - (i % 64) * 64; }

private:
    char* base_ = nullptr;
    unsigned count_ = 0;
    std::size_t slot_ = 0;
};

// A 256-byte-aligned buffer that grows on demand; per OS thread, reused across launches.
class Arena {
public:
    ~Arena() { std::free(data_); }

    // At least `bytes` long (and never null for 0 bytes); null when the memory cannot be had.
    unsigned char* reserve(std::size_t bytes) {
        if (bytes > capacity_ || data_ == nullptr) {
            std::free(data_);
            capacity_ = (bytes + 255) / 256 * 256 + 256;
            data_ = static_cast<unsigned char*>(std::aligned_alloc(256, capacity_));
            if (data_ == nullptr) capacity_ = 0;
        }
        return data_;
    }

private:
    unsigned char* data_ = nullptr;
    std::size_t capacity_ = 0;
};

// One launch; lives on the launching thread's stack during contralign_emu_launch_with.
struct Block {
    void (*entry)(void**);
    void** params;
    // Static shared memory plus `dynamic_reserved` (the launch's dynamic size, or the size
    // the kernel opted in to) may not pass `shared_limit` (see opt_in_shared).
    std::size_t shared_limit;
    std::size_t dynamic_reserved;
    // Static shared memory: the arena, the bytes the current block has allocated, and the
    // most any block of the launch has (what the next block must poison).
    unsigned char* static_shared;
    std::size_t static_used;
    std::size_t static_high;
    Fiber* fibers;
    unsigned n;
    unsigned live;        // fibers that have not returned
    unsigned at_barrier;  // fibers waiting at __syncthreads*
    BarrierMode barrier_mode;
    Fiber* current;
#if CONTRALIGN_EMU_ASM_SWITCH
    void* scheduler_sp;
#else
    ucontext_t scheduler_context;
#endif
    bool failed;
    std::string error;
};

thread_local Block* t_block = nullptr;
thread_local StackPool t_stacks;
thread_local Arena t_static_shared;
thread_local Arena t_dynamic_shared;

// splitmix64: seeds the per-pass shuffles from (seed, block, pass).
std::uint64_t mix(std::uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

void start_fiber(Fiber& f, char* low, char* high) {
#if CONTRALIGN_EMU_ASM_SWITCH
    (void)low;
    void** sp = reinterpret_cast<void**>(reinterpret_cast<std::uintptr_t>(high) & ~std::uintptr_t{15});
    *--sp = nullptr;  // keeps the entry's frame 16-byte aligned, as if it had been called
    *--sp = reinterpret_cast<void*>(&contralign_emu_fiber_entry);  // where the first switch "returns"
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15 popped by that switch
    f.sp = sp;
#else
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = low;
    f.context.uc_stack.ss_size = static_cast<std::size_t>(high - low);
    f.context.uc_link = nullptr;
    makecontext(&f.context, reinterpret_cast<void (*)()>(&contralign_emu_fiber_main), 0);
#endif
}

void resume(Block& b, Fiber& f) {
    b.current = &f;
    detail::thread_idx = f.tid;
    probe::resumed(static_cast<unsigned>(&f - b.fibers));
#if CONTRALIGN_EMU_ASM_SWITCH
    contralign_emu_switch(&b.scheduler_sp, f.sp);
#else
    swapcontext(&b.scheduler_context, &f.context);
#endif
}

// Called on a fiber: back to the scheduler until it resumes this fiber.
void yield(Block& b, Fiber& f) {
#if CONTRALIGN_EMU_ASM_SWITCH
    contralign_emu_switch(&f.sp, b.scheduler_sp);
#else
    swapcontext(&f.context, &b.scheduler_context);
#endif
}

const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::Sync: return "__syncwarp";
        case WarpOp::ShflIdx: return "__shfl_sync";
        case WarpOp::ShflUp: return "__shfl_up_sync";
        case WarpOp::ShflDown: return "__shfl_down_sync";
        case WarpOp::ShflXor: return "__shfl_xor_sync";
        case WarpOp::All: return "__all_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::ReduceAddU:
        case WarpOp::ReduceAddI: return "__reduce_add_sync";
        case WarpOp::ReduceMinU:
        case WarpOp::ReduceMinI: return "__reduce_min_sync";
        case WarpOp::ReduceMaxU:
        case WarpOp::ReduceMaxI: return "__reduce_max_sync";
    }
    return "?";
}

const char* barrier_name(BarrierMode mode) {
    switch (mode) {
        case BarrierMode::Plain: return "__syncthreads";
        case BarrierMode::Count: return "__syncthreads_count";
        case BarrierMode::And: return "__syncthreads_and";
        case BarrierMode::Or: return "__syncthreads_or";
    }
    return "?";
}

std::string describe_thread(const Fiber& f) {
    char buffer[96];
    std::snprintf(buffer, sizeof buffer, "thread (%u,%u,%u) (warp %u lane %u)", f.tid.x, f.tid.y,
                  f.tid.z, f.warp, f.lane);
    return buffer;
}

// Called on a fiber: records the error and leaves this fiber for good; the scheduler ends
// the launch. Takes a plain string because the caller's frame is never unwound: a
// std::string argument would leak.
[[noreturn]] void fail_current(Block& b, const char* message) {
    Fiber& f = *b.current;
    b.failed = true;
    b.error = describe_thread(f) + ": " + message;
    f.state = State::Done;
    yield(b, f);
    std::abort();  // never resumed
}

void release_barrier_if_complete(Block& b) {
    if (b.at_barrier == 0 || b.at_barrier != b.live) return;
    int count = 0;
    for (unsigned i = 0; i < b.n; ++i) {
        if (b.fibers[i].state == State::AtBarrier && b.fibers[i].predicate != 0) ++count;
    }
    int result = 0;
    switch (b.barrier_mode) {
        case BarrierMode::Plain: break;
        case BarrierMode::Count: result = count; break;
        case BarrierMode::And: result = count == static_cast<int>(b.at_barrier); break;
        case BarrierMode::Or: result = count > 0; break;
    }
    for (unsigned i = 0; i < b.n; ++i) {
        Fiber& f = b.fibers[i];
        if (f.state == State::AtBarrier) {
            f.state = State::Runnable;
            f.barrier_result = result;
        }
    }
    b.at_barrier = 0;
    probe::barrier_released();
}

unsigned source_lane(const Fiber& f) {
    const unsigned width = static_cast<unsigned>(f.width);
    const unsigned lane = f.lane;
    const unsigned segment = lane & ~(width - 1);
    switch (f.op) {
        case WarpOp::ShflIdx: return segment + (f.arg & (width - 1));
        case WarpOp::ShflUp: return lane - segment >= f.arg ? lane - f.arg : lane;
        case WarpOp::ShflDown:
            return std::uint64_t{lane - segment} + f.arg < width ? lane + f.arg : lane;
        case WarpOp::ShflXor: {
            // A lane may read from its own or an earlier segment; a later one gives its own.
            const std::uint64_t src = lane ^ f.arg;
            return src < segment + width ? static_cast<unsigned>(src) : lane;
        }
        default: return lane;
    }
}

// Completes the collective of the lanes named in `mask` of `warp` if all of its live lanes
// have arrived; returns whether it did.
bool complete_warp_collective(Block& b, unsigned warp, unsigned mask) {
    Fiber* lanes = b.fibers + warp * 32;
    const unsigned lane_count = b.n - warp * 32 < 32 ? b.n - warp * 32 : 32;
    unsigned group = 0;
    for (unsigned l = 0; l < lane_count; ++l) {
        if (!(mask >> l & 1u) || lanes[l].state == State::Done) continue;
        if (lanes[l].state != State::AtWarp) return false;
        group |= 1u << l;
    }
    // Lanes that do not exist (a partial last warp) count as returned.
    const Fiber* first = nullptr;
    for (unsigned l = 0; l < lane_count; ++l) {
        if (!(group >> l & 1u)) continue;
        const Fiber& f = lanes[l];
        if (first == nullptr) {
            first = &f;
        } else if (f.op != first->op || f.mask != first->mask) {
            char buffer[256];
            std::snprintf(buffer, sizeof buffer,
                          "warp collectives do not match: lane %u calls %s with mask 0x%08x, "
                          "lane %u calls %s with mask 0x%08x",
                          first->lane, op_name(first->op), first->mask, f.lane, op_name(f.op),
                          f.mask);
            fail_current(b, buffer);
        }
    }
    std::uint64_t ballot = 0;
    std::uint64_t sum = 0;
    std::uint32_t min_u = 0xffffffffu, max_u = 0;
    std::int32_t min_i = INT32_MAX, max_i = INT32_MIN;
    for (unsigned l = 0; l < lane_count; ++l) {
        if (!(group >> l & 1u)) continue;
        const std::uint64_t v = lanes[l].value;
        if (v != 0) ballot |= 1ull << l;
        sum += v;
        const std::uint32_t u = static_cast<std::uint32_t>(v);
        const std::int32_t i = static_cast<std::int32_t>(u);
        min_u = u < min_u ? u : min_u;
        max_u = u > max_u ? u : max_u;
        min_i = i < min_i ? i : min_i;
        max_i = i > max_i ? i : max_i;
    }
    for (unsigned l = 0; l < lane_count; ++l) {
        if (!(group >> l & 1u)) continue;
        Fiber& f = lanes[l];
        switch (f.op) {
            case WarpOp::Sync: f.result = 0; break;
            case WarpOp::ShflIdx:
            case WarpOp::ShflUp:
            case WarpOp::ShflDown:
            case WarpOp::ShflXor: {
                const unsigned src = source_lane(f);
                f.result = src < 32 && (group >> src & 1u) ? lanes[src].value : ~std::uint64_t{0};
                break;
            }
            case WarpOp::All: f.result = ballot == group; break;
            case WarpOp::Any: f.result = ballot != 0; break;
            case WarpOp::Ballot: f.result = ballot; break;
            case WarpOp::ReduceAddU:
            case WarpOp::ReduceAddI: f.result = static_cast<std::uint32_t>(sum); break;
            case WarpOp::ReduceMinU: f.result = min_u; break;
            case WarpOp::ReduceMaxU: f.result = max_u; break;
            case WarpOp::ReduceMinI: f.result = static_cast<std::uint32_t>(min_i); break;
            case WarpOp::ReduceMaxI: f.result = static_cast<std::uint32_t>(max_i); break;
        }
    }
    for (unsigned l = 0; l < lane_count; ++l) {
        if (group >> l & 1u) lanes[l].state = State::Runnable;
    }
    probe::warp_synced(warp);
    return true;
}

// After a lane returned: collectives that waited only for it may now be complete.
void complete_warp_after_exit(Block& b, unsigned warp) {
    const unsigned first = warp * 32;
    const unsigned end = b.n - first < 32 ? b.n : first + 32;
    for (unsigned i = first; i < end; ++i) {
        if (b.fibers[i].state == State::AtWarp) complete_warp_collective(b, warp, b.fibers[i].mask);
    }
}

std::string describe_deadlock(const Block& b) {
    std::string text = "deadlock: every thread waits;";
    unsigned shown = 0;
    for (unsigned i = 0; i < b.n && shown < 4; ++i) {
        const Fiber& f = b.fibers[i];
        if (f.state == State::AtBarrier) {
            text += " " + describe_thread(f) + " at " + barrier_name(b.barrier_mode) + ";";
            ++shown;
        } else if (f.state == State::AtWarp) {
            char buffer[64];
            std::snprintf(buffer, sizeof buffer, " at %s (mask 0x%08x);", op_name(f.op), f.mask);
            text += " " + describe_thread(f) + buffer;
            ++shown;
        }
    }
    return text + " ...";
}

// Runs every thread of the block at detail::block_idx to its end; false on an error.
bool run_block(Block& b, std::uint64_t seed, std::uint64_t block_linear,
               std::vector<unsigned>& order) {
    const dim3 dim = detail::block_dim;
    for (unsigned i = 0; i < b.n; ++i) {
        Fiber& f = b.fibers[i];
        f.state = State::Runnable;
        f.tid = {i % dim.x, (i / dim.x) % dim.y, i / (dim.x * dim.y)};
        f.lane = i % 32;
        f.warp = i / 32;
        start_fiber(f, t_stacks.low(i), t_stacks.high(i));
    }
    b.live = b.n;
    b.at_barrier = 0;
    // Each block's schedule depends only on the seed and the block.
    for (unsigned i = 0; i < b.n; ++i) order[i] = i;
    for (std::uint64_t pass = 0; b.live > 0; ++pass) {
        // A fresh shuffle of the running order for every pass: which thread's writes
        // another sees, absent a barrier, depends on the seed and differs between passes.
        std::uint64_t state = mix(seed ^ mix(block_linear ^ mix(pass)));
        for (unsigned i = b.n - 1; i > 0; --i) {
            state = mix(state);
            const unsigned j = static_cast<unsigned>(state % (i + 1));
            std::swap(order[i], order[j]);
        }
        bool ran = false;
        for (unsigned i : order) {
            Fiber& f = b.fibers[i];
            if (f.state != State::Runnable) continue;
            resume(b, f);
            if (b.failed) return false;
            ran = true;
        }
        if (!ran) {
            b.error = describe_deadlock(b);
            return false;
        }
    }
    return true;
}

}  // namespace

int barrier(BarrierMode mode, int predicate) {
    Block& b = *t_block;
    Fiber& f = *b.current;
    if (b.at_barrier == 0) {
        b.barrier_mode = mode;
    } else if (b.barrier_mode != mode) {
        char buffer[128];
        std::snprintf(buffer, sizeof buffer, "waits at %s while other threads wait at %s",
                      barrier_name(mode), barrier_name(b.barrier_mode));
        fail_current(b, buffer);
    }
    f.state = State::AtBarrier;
    f.predicate = predicate;
    ++b.at_barrier;
    release_barrier_if_complete(b);
    yield(b, f);
    return f.barrier_result;
}

std::uint64_t warp_collective(WarpOp op, unsigned mask, std::uint64_t value, unsigned arg,
                              int width) {
    Block& b = *t_block;
    Fiber& f = *b.current;
    if (!(mask >> f.lane & 1u)) {
        char buffer[128];
        std::snprintf(buffer, sizeof buffer, "%s with mask 0x%08x, which leaves out the calling lane",
                      op_name(op), mask);
        fail_current(b, buffer);
    }
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
        char buffer[96];
        std::snprintf(buffer, sizeof buffer, "%s with width %d (a power of two up to 32)",
                      op_name(op), width);
        fail_current(b, buffer);
    }
    f.state = State::AtWarp;
    f.op = op;
    f.mask = mask;
    f.arg = arg;
    f.width = width;
    f.value = value;
    complete_warp_collective(b, f.warp, mask);
    // Even the lane that completed the collective goes back to the scheduler, so that the
    // order in which lanes continue is shuffled too.
    yield(b, f);
    return f.result;
}

unsigned active_mask() {
    const Block& b = *t_block;
    const unsigned first = b.current->warp * 32;
    unsigned mask = 0;
    for (unsigned l = 0; l < 32 && first + l < b.n; ++l) {
        if (b.fibers[first + l].state != State::Done) mask |= 1u << l;
    }
    return mask;
}

void allocate_shared(SharedSlot& slot, std::size_t bytes, std::size_t align) {
    Block* b = t_block;
    if (b == nullptr) {
        std::fprintf(stderr,
                     "contralign emulator: a __shared__ variable outside a kernel launch "
                     "(at namespace scope?)\n");
        std::abort();
    }
    const std::size_t offset = (b->static_used + align - 1) / align * align;
    if (offset + bytes > kMaxStaticShared) {
        fail("more than %zu bytes of static __shared__ memory", kMaxStaticShared);
    }
    if (offset + bytes + b->dynamic_reserved > b->shared_limit) {
        fail("%zu bytes of static and %zu of dynamic shared memory: more than the %zu bytes "
             "a block may have",
             offset + bytes, b->dynamic_reserved, b->shared_limit);
    }
    b->static_used = offset + bytes;
    if (b->static_used > b->static_high) {
        std::memset(b->static_shared + b->static_high, 0xff, b->static_used - b->static_high);
        b->static_high = b->static_used;
    }
    slot.block = detail::block_serial;
    slot.address = b->static_shared + offset;
}

bool in_launch() { return t_block != nullptr; }

void atomic_access(const void* address, unsigned bytes) {
    // Called from the out-of-line atomic: its return address identifies the atomic, not the
    // kernel's call site, which is enough to tell requests apart by their occurrence.
    probe::atomic_access(address, bytes,
                         reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)));
}

// A GPU faults on a misaligned vector access.
static void require_aligned(const void* device, unsigned bytes, const char* what) {
    if (reinterpret_cast<std::uintptr_t>(device) % bytes != 0) {
        fail("%s: misaligned %u-byte access at %p (a GPU faults: misaligned address)", what,
             bytes, device);
    }
}

void vector_load(void* local, const void* device, unsigned bytes, const char* what) {
    require_aligned(device, bytes, what);
    probe::vector_access(device, bytes, false,
                         reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)));
    std::memcpy(local, device, bytes);
}

void vector_store(void* device, const void* local, unsigned bytes, const char* what) {
    require_aligned(device, bytes, what);
    probe::vector_access(device, bytes, true,
                         reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)));
    std::memcpy(device, local, bytes);
}

void count_warp_flops(std::uint64_t flops) {
    if (t_block != nullptr && t_block->current->lane == 0) probe::count_flops(flops);
}

void fail(const char* fmt, ...) {
    char message[512];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    fail_current(*t_block, message);
}

}  // namespace rt
}  // namespace contralign_emu

using contralign_emu::rt::Block;
using contralign_emu::rt::State;

extern "C" void contralign_emu_fiber_main() {
    Block& b = *contralign_emu::rt::t_block;
    b.entry(b.params);
    auto& f = *b.current;
    f.state = State::Done;
    --b.live;
    contralign_emu::rt::release_barrier_if_complete(b);
    contralign_emu::rt::complete_warp_after_exit(b, f.warp);
    contralign_emu::rt::yield(b, f);
    std::abort();  // a returned fiber is never resumed
}

namespace {

void set_error(char* error, std::size_t error_len, const std::string& message) {
    if (error_len == 0) return;
    std::snprintf(error, error_len, "%s", message.c_str());
}

std::uint64_t gcd(std::uint64_t a, std::uint64_t b) {
    while (b != 0) {
        const std::uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

}  // namespace

// The launch ABI (cuda/README.md). `entry` is a kernel's contralign_emu_run_<name>, `params`
// its cuLaunchKernel-style argument array, `options` the architecture, the kernel's opt-in to
// more dynamic shared memory and the probe (emu/probe.h); `traffic`, when not null, receives
// what the probe counted. Returns 0, or 1 with a message in `error`.
extern "C" int contralign_emu_launch_with(void (*entry)(void**), void** params, dim3 grid,
                                          dim3 block, std::uint32_t dynamic_shared_bytes,
                                          std::uint64_t seed,
                                          const contralign_emu_options* options,
                                          contralign_emu_traffic* traffic, char* error,
                                          std::size_t error_len) {
    namespace rt = contralign_emu::rt;
    namespace detail = contralign_emu::detail;
    namespace probe = contralign_emu::probe;
    if (traffic != nullptr) *traffic = contralign_emu_traffic{};
    const std::uint64_t threads = std::uint64_t{block.x} * block.y * block.z;
    char message[320];
    if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
        block.z > 64 || threads > 1024) {
        std::snprintf(message, sizeof message,
                      "block (%u,%u,%u): each dimension at least 1, at most (1024,1024,64), "
                      "and at most 1024 threads",
                      block.x, block.y, block.z);
        set_error(error, error_len, message);
        return 1;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
        grid.z > 65535) {
        std::snprintf(message, sizeof message,
                      "grid (%u,%u,%u): each dimension at least 1, at most (2^31-1,65535,65535)",
                      grid.x, grid.y, grid.z);
        set_error(error, error_len, message);
        return 1;
    }
    const std::size_t opt_in = opt_in_shared(options->arch);
    if (opt_in == 0) {
        std::snprintf(message, sizeof message, "unknown architecture sm_%u (sm_80 or sm_90)",
                      options->arch);
        set_error(error, error_len, message);
        return 1;
    }
    if (options->max_dynamic_shared > opt_in) {
        std::snprintf(message, sizeof message,
                      "the kernel opted in to %u bytes of dynamic shared memory; sm_%u allows at "
                      "most %zu per block",
                      options->max_dynamic_shared, options->arch, opt_in);
        set_error(error, error_len, message);
        return 1;
    }
    const std::size_t max_dynamic =
        options->max_dynamic_shared == 0 ? kDefaultShared : options->max_dynamic_shared;
    if (dynamic_shared_bytes > max_dynamic) {
        std::snprintf(message, sizeof message,
                      "%u bytes of dynamic shared memory; at most %zu on sm_%u%s",
                      dynamic_shared_bytes, max_dynamic, options->arch,
                      options->max_dynamic_shared == 0
                          ? " unless the kernel opts in to more (cuFuncSetAttribute, "
                            "emu::set_max_dynamic_shared)"
                          : ", the size the kernel opted in to");
        set_error(error, error_len, message);
        return 1;
    }
    if (rt::t_block != nullptr) {
        set_error(error, error_len, "an emulated kernel cannot launch kernels");
        return 1;
    }
    const unsigned n = static_cast<unsigned>(threads);
    unsigned char* static_shared = rt::t_static_shared.reserve(kMaxStaticShared);
    unsigned char* dynamic_shared = rt::t_dynamic_shared.reserve(kArenaDynamicShared);
    if (!rt::t_stacks.reserve(n) || static_shared == nullptr || dynamic_shared == nullptr) {
        set_error(error, error_len, "out of memory for the fiber stacks or shared memory");
        return 1;
    }

    std::vector<rt::Fiber> fibers(n);
    std::vector<unsigned> order(n);
    Block b{};
    b.entry = entry;
    b.params = params;
    b.shared_limit = options->max_dynamic_shared == 0 ? kDefaultShared : opt_in;
    b.dynamic_reserved =
        options->max_dynamic_shared == 0 ? dynamic_shared_bytes : options->max_dynamic_shared;
    b.fibers = fibers.data();
    b.n = n;
    b.static_shared = static_shared;
    detail::block_dim = block;
    detail::grid_dim = grid;
    detail::dynamic_shared = dynamic_shared;
    rt::t_block = &b;
    probe::begin_launch(options->probe, static_shared, kMaxStaticShared, dynamic_shared,
                        dynamic_shared_bytes, n);

    // Blocks run in an order that depends on the seed, k -> (a k + c) mod count with a
    // coprime to count: a kernel that assumes an order between blocks fails under some seed.
    const std::uint64_t count = std::uint64_t{grid.x} * grid.y * grid.z;
    std::uint64_t a = rt::mix(seed) % count;
    if (a == 0) a = 1;
    while (gcd(a, count) != 1) a = a + 1 == count ? 1 : a + 1;
    const std::uint64_t c = rt::mix(~seed) % count;
    bool ok = true;
    for (std::uint64_t k = 0; k < count && ok; ++k) {
        const std::uint64_t linear =
            static_cast<std::uint64_t>((static_cast<unsigned __int128>(a) * k + c) % count);
        detail::block_idx = {static_cast<unsigned>(linear % grid.x),
                             static_cast<unsigned>(linear / grid.x % grid.y),
                             static_cast<unsigned>(linear / (std::uint64_t{grid.x} * grid.y))};
        // Shared memory starts as all-ones bytes (NaN for floats) in every block, so that
        // reading what no thread of the block wrote shows, and results do not depend on what
        // earlier blocks or launches left there.
        ++detail::block_serial;
        std::memset(static_shared, 0xff, b.static_high);
        b.static_used = 0;
        std::memset(dynamic_shared, 0xff, dynamic_shared_bytes);
        probe::begin_block(linear);
        ok = rt::run_block(b, seed, linear, order);
        probe::end_block();
    }
    probe::end_launch(ok ? traffic : nullptr);
    rt::t_block = nullptr;
    if (!ok) {
        const uint3 idx = detail::block_idx;
        std::snprintf(message, sizeof message, "block (%u,%u,%u), ", idx.x, idx.y, idx.z);
        set_error(error, error_len, message + b.error);
        return 1;
    }
    return 0;
}
