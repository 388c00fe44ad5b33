// The emulator's memory probe (cuda/README.md, "Traffic, races and limits"): what
// runtime.cpp tells probe.cpp about a launch, and the C structs both share with
// src/ops/cuda/emu.rs.
//
// The kernel files are compiled with ThreadSanitizer's instrumentation (-fsanitize=thread,
// without its runtime): the compiler calls __tsan_read4(address), __tsan_write2(address), ...
// before every load and store it emits. probe.cpp defines those entry points. Outside a probed
// launch they only check the alignment that a GPU would fault on; in a probed launch they
// count the global-memory traffic of the launch and look for races between threads.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

// What to do in a launch; mirrored by `LaunchOptions` in src/ops/cuda/emu.rs.
struct contralign_emu_options {
    // 80 or 90: the architecture whose limits the launch must fit.
    std::uint32_t arch;
    // The kernel's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, or 0 for the default (48 KiB
    // of static and dynamic shared memory together).
    std::uint32_t max_dynamic_shared;
    // Bit 0: count the global-memory traffic; bit 1: report races.
    std::uint32_t probe;
};

// The global-memory traffic of one launch; mirrored by `Traffic` in src/ops/cuda/emu.rs.
// An access is one load or store of a thread as the kernel makes it: a scalar one as the
// compiler emits it, a vector one (load_pack/store_pack in cuda/contralign.cuh) whole, as a
// GPU's ld/st.global.v2/v4; consecutive scalar accesses stay apart, as on a GPU, which cannot
// merge loads whose alignment it does not know. A warp-wide request is the accesses that the
// lanes of a warp make at the same instruction for the same time, counted from the warp's
// last barrier or collective.
struct contralign_emu_traffic {
    // Distinct 32-byte sectors whose first access was a read (fetched from DRAM), and distinct
    // sectors written (written back).
    std::uint64_t read_sectors;
    std::uint64_t write_sectors;
    // Warp-wide requests; the sectors they touched, summed over requests; the fewest sectors
    // that could hold the distinct bytes each request asked for, summed likewise.
    std::uint64_t requests;
    std::uint64_t request_sectors;
    std::uint64_t min_sectors;
    // Per-thread accesses of 1, 2, 4, 8, 16 bytes, and of other sizes.
    std::uint64_t accesses_by_width[6];
    // Floating-point operations of WMMA mma_sync calls (2 M N K per warp).
    std::uint64_t flops;
    // Bytes read inside the watched ranges (contralign_emu_watch), every access counted:
    // what a kernel loads from one buffer, re-reads included.
    std::uint64_t watched_read_bytes;
};

// Device buffers: the probe counts and checks only accesses inside a registered range.
void contralign_emu_register_global(const void* start, std::size_t bytes);
void contralign_emu_unregister_global(const void* start);
// The ranges whose reads the probe counts into watched_read_bytes, replacing the earlier
// ones (`count` 0 clears them); taken by each counting launch as it begins.
void contralign_emu_watch(const void* const* starts, const std::size_t* bytes, std::size_t count);
}

namespace contralign_emu {
namespace probe {

constexpr std::uint32_t kCount = 1;
constexpr std::uint32_t kRacecheck = 2;

// The runtime's side, in launch order. begin_launch returns false with a message when the
// probe cannot run (out of memory).
void begin_launch(std::uint32_t flags, const unsigned char* static_shared,
                  std::size_t static_bytes, const unsigned char* dynamic_shared,
                  std::size_t dynamic_bytes, unsigned threads);
void begin_block(std::uint64_t block_linear);
// The runtime resumes the fiber of thread `thread` (linear in the block).
void resumed(unsigned thread);
// Every thread of the block passed a barrier; the lanes of `warp` completed a collective.
void barrier_released();
void warp_synced(unsigned warp);
void end_block();
// Fills `out` (when not null) and forgets the launch.
void end_launch(contralign_emu_traffic* out);
// An atomic read-modify-write by the calling fiber, made at `pc`.
void atomic_access(const void* address, unsigned bytes, std::uintptr_t pc);
// A vector load or store of `bytes` by the calling fiber, made at `pc`: one access.
void vector_access(const void* address, unsigned bytes, bool write, std::uintptr_t pc);
// Adds to the launch's FLOPs (called by lane 0 of a warp).
void count_flops(std::uint64_t flops);
bool active();

}  // namespace probe
}  // namespace contralign_emu
