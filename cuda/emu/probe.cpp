// The memory probe (probe.h): ThreadSanitizer's compiler entry points, implemented for the
// emulator. This file and runtime.cpp are compiled without the instrumentation.
//
// Outside a probed launch an entry point only checks the alignment a GPU faults on. In a
// probed launch (`t_probe` set) each access inside a registered device buffer is counted
// (sectors, warp-wide requests, widths), and with racecheck each access to shared memory or
// to a device buffer is checked against the earlier accesses of the same bytes: two threads
// of a block that touch a byte in the same barrier interval (one of them writing), or two
// blocks of the launch that touch it (one writing), race unless both accesses are atomics.

#include "probe.h"

#include "cuda_emu.h"

#include <algorithm>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace contralign_emu {
namespace rt {
// runtime.cpp: whether the calling OS thread is running a launch.
bool in_launch();
}  // namespace rt

namespace probe {
namespace {

enum class Kind : std::uint8_t { Read, Write };

struct Range {
    std::uintptr_t start;
    std::uintptr_t end;
};

// Every registered device buffer, sorted by start, and the watched ranges; launches take a
// copy.
std::mutex g_registry_mutex;
std::vector<Range> g_registry;
std::vector<Range> g_watched;

// One access as racecheck remembers it. `block` is the block's linear index plus one (0: no
// access).
struct Access {
    std::uint64_t block;
    std::uint32_t epoch;
    std::uint32_t warp_epoch;
    std::uint16_t thread;
    bool atomic;
};

// What racecheck knows about one byte: its last writer and a reader since then; and when
// other threads read it unordered with that reader, the latest interval's first of them
// (`other`), whether more threads of its warp did (`other_many`), of other warps of its block
// and barrier interval (`others_mixed`), or of other blocks (`others_foreign`).
struct Shadow {
    Access writer{};
    Access reader{};
    bool others = false;
    bool other_many = false;
    bool others_mixed = false;
    bool others_foreign = false;
    Access other{};
};

// A warp-wide request: the `occurrence`-th execution, by lanes of warp `who`, of the access at
// `pc` in one `interval` between the warp's reconvergence points (barriers and warp-wide
// collectives, which the lanes reach together). Counting executions from the last such point
// keeps lanes that ran a loop fewer times (a shorter last chunk) from pairing every later
// access with their neighbours' earlier ones. Also the count itself: `who` a thread,
// `occurrence` 0.
struct RequestKey {
    std::uintptr_t pc;
    std::uint32_t who;
    std::uint32_t occurrence;
    std::uint64_t interval;
    bool operator==(const RequestKey& o) const {
        return pc == o.pc && who == o.who && occurrence == o.occurrence &&
               interval == o.interval;
    }
};

struct RequestKeyHash {
    std::size_t operator()(const RequestKey& k) const {
        std::uint64_t h = k.pc * 0x9e3779b97f4a7c15ull;
        h ^= (std::uint64_t{k.who} << 32 | k.occurrence) + 0x632be59bd9b4e019ull + (h << 6) +
             (h >> 2);
        h ^= k.interval * 0xbf58476d1ce4e5b9ull + (h << 6) + (h >> 2);
        return static_cast<std::size_t>(h);
    }
};

using Pieces = std::vector<std::pair<std::uintptr_t, std::uint32_t>>;

struct Probe {
    std::uint32_t flags = 0;
    std::vector<Range> globals;
    std::vector<Range> watched;
    std::size_t last_hit = 0;
    std::uintptr_t static_start = 0, static_end = 0, dynamic_start = 0, dynamic_end = 0;
    unsigned thread = 0;
    std::uint64_t block = 0;
    contralign_emu_traffic traffic{};
    // Bit 0: first accessed by a read; bit 1: written.
    std::unordered_map<std::uint64_t, std::uint8_t> sectors;
    std::unordered_map<RequestKey, std::uint32_t, RequestKeyHash> occurrences;
    std::unordered_map<RequestKey, Pieces, RequestKeyHash> requests;
    std::uint32_t epoch = 0;
    std::vector<std::uint32_t> warp_epochs;
    std::unordered_map<std::uintptr_t, Shadow> shared_shadow;
    std::unordered_map<std::uintptr_t, Shadow> global_shadow;

    bool is_global(std::uintptr_t a) {
        if (last_hit < globals.size() && a >= globals[last_hit].start && a < globals[last_hit].end) {
            return true;
        }
        auto it = std::upper_bound(globals.begin(), globals.end(), a,
                                   [](std::uintptr_t v, const Range& r) { return v < r.start; });
        if (it == globals.begin()) return false;
        --it;
        if (a >= it->end) return false;
        last_hit = static_cast<std::size_t>(it - globals.begin());
        return true;
    }

    void count(std::uintptr_t a, std::uint32_t size, Kind kind, std::uintptr_t pc) {
        if (kind == Kind::Read) {
            for (const Range& w : watched) {
                const std::uintptr_t lo = std::max(a, w.start), hi = std::min(a + size, w.end);
                if (lo < hi) traffic.watched_read_bytes += hi - lo;
            }
        }
        for (std::uint64_t s = a >> 5; s <= (a + size - 1) >> 5; ++s) {
            auto [it, inserted] = sectors.try_emplace(s, kind == Kind::Read ? 1 : 0);
            if (kind == Kind::Write) it->second |= 2;
        }
        const int width = size == 1 ? 0 : size == 2 ? 1 : size == 4 ? 2 : size == 8 ? 3
                        : size == 16 ? 4 : 5;
        ++traffic.accesses_by_width[width];
        const std::uint64_t interval = std::uint64_t{epoch} << 32 | warp_epochs[thread / 32];
        const std::uint32_t occurrence = occurrences[RequestKey{pc, thread, 0, interval}]++;
        requests[RequestKey{pc, thread / 32, occurrence, interval}].emplace_back(a, size);
    }

    void close_requests() {
        std::vector<std::uint64_t> ids;
        for (auto& [key, pieces] : requests) {
            ids.clear();
            for (const auto& [a, size] : pieces) {
                for (std::uint64_t s = a >> 5; s <= (a + size - 1) >> 5; ++s) ids.push_back(s);
            }
            std::sort(ids.begin(), ids.end());
            const std::size_t touched =
                static_cast<std::size_t>(std::unique(ids.begin(), ids.end()) - ids.begin());
            // The distinct bytes asked for: the union of the pieces.
            std::sort(pieces.begin(), pieces.end());
            std::uint64_t bytes = 0;
            std::uintptr_t covered = 0;
            for (const auto& [a, size] : pieces) {
                const std::uintptr_t end = a + size;
                if (end <= covered) continue;
                bytes += end - std::max(a, covered);
                covered = end;
            }
            ++traffic.requests;
            traffic.request_sectors += touched;
            traffic.min_sectors += (bytes + 31) / 32;
        }
        requests.clear();
        occurrences.clear();
    }

    Access now(bool atomic) const {
        return Access{block + 1, epoch, warp_epochs[thread / 32],
                      static_cast<std::uint16_t>(thread), atomic};
    }

    // Whether `a` and `b` (b the later) may happen in either order and are not both atomic,
    // if they were made by different threads.
    static bool unordered_threads(const Access& a, const Access& b) {
        if (a.atomic && b.atomic) return false;
        if (a.block != b.block) return true;
        if (a.epoch != b.epoch) return false;
        return a.thread / 32 != b.thread / 32 || a.warp_epoch == b.warp_epoch;
    }

    // The same for the threads that made them.
    static bool unordered(const Access& a, const Access& b) {
        const bool same_thread = a.block == b.block && a.thread == b.thread;
        return !same_thread && unordered_threads(a, b);
    }



    [[noreturn]] void report(std::uintptr_t a, const Access& earlier,
                             Kind earlier_kind, const Access& later, Kind later_kind) const {
        const auto thread_of = [](const Access& x) {
            const dim3 d = detail::block_dim;
            char text[48];
            std::snprintf(text, sizeof text, "(%u,%u,%u)", x.thread % d.x, x.thread / d.x % d.y,
                          x.thread / (d.x * d.y));
            return std::string(text);
        };
        const auto block_of = [](const Access& x) {
            const dim3 g = detail::grid_dim;
            const std::uint64_t linear = x.block - 1;
            char text[64];
            std::snprintf(text, sizeof text, "(%llu,%llu,%llu)",
                          static_cast<unsigned long long>(linear % g.x),
                          static_cast<unsigned long long>(linear / g.x % g.y),
                          static_cast<unsigned long long>(linear / (std::uint64_t{g.x} * g.y)));
            return std::string(text);
        };
        const char* what[] = {"read", "written"};
        std::string where;
        char text[96];
        if (a >= static_start && a < static_end) {
            std::snprintf(text, sizeof text, "static shared memory, byte %zu", a - static_start);
        } else if (a >= dynamic_start && a < dynamic_end) {
            std::snprintf(text, sizeof text, "dynamic shared memory, byte %zu", a - dynamic_start);
        } else {
            std::snprintf(text, sizeof text, "global memory at %p", reinterpret_cast<void*>(a));
        }
        where = text;
        std::string message = std::string("racecheck: ") + where + " is " +
                              what[static_cast<int>(later_kind)] + " by thread " +
                              thread_of(later);
        if (earlier.block != later.block) {
            message += " of block " + block_of(later) + " and " +
                       what[static_cast<int>(earlier_kind)] + " by thread " + thread_of(earlier) +
                       " of block " + block_of(earlier) +
                       " in the same launch: blocks are unordered (use atomics, or another launch)";
        } else {
            message += std::string(" and ") + what[static_cast<int>(earlier_kind)] +
                       " by thread " + thread_of(earlier) +
                       " between the same barriers (a __syncthreads or __syncwarp is missing)";
        }
        rt::fail("%s", message.c_str());
    }

    void check(std::unordered_map<std::uintptr_t, Shadow>& shadow, std::uintptr_t a,
               std::uint32_t size, Kind kind, bool atomic) {
        const Access cur = now(atomic);
        for (std::uintptr_t byte = a; byte < a + size; ++byte) {
            Shadow& s = shadow[byte];
            if (s.writer.block != 0 && unordered(s.writer, cur)) {
                report(byte, s.writer, Kind::Write, cur, kind);
            }
            if (kind == Kind::Write) {
                if (s.reader.block != 0 && unordered(s.reader, cur)) {
                    report(byte, s.reader, Kind::Read, cur, kind);
                }
                // The other readers. Readers in two warps of this thread's interval include
                // one of another warp than this thread's.
                if (s.others) {
                    const bool race =
                        s.others_foreign ||
                        (s.others_mixed ? cur.block == s.other.block && cur.epoch == s.other.epoch
                         : s.other_many ? unordered_threads(s.other, cur)
                                        : unordered(s.other, cur));
                    if (race) report(byte, s.other, Kind::Read, cur, kind);
                }
                s.writer = cur;
                s.reader = Access{};
                s.others = false;
                s.others_foreign = false;
            } else if (s.reader.block == 0 || !unordered(s.reader, cur)) {
                // The stored reader is this thread, or ordered before it: keep the later one.
                const bool same = s.reader.block == cur.block && s.reader.thread == cur.thread;
                if (!same) s.others = false;
                s.reader = cur;
            } else if (!s.others || (cur.block == s.other.block && cur.epoch != s.other.epoch)) {
                // The first other reader, or one of a later interval, which earlier others
                // are ordered before.
                s.others = true;
                s.other = cur;
                s.other_many = false;
                s.others_mixed = false;
            } else if (cur.block != s.other.block) {
                s.others_foreign = true;
            } else if (cur.thread / 32 != s.other.thread / 32) {
                s.others_mixed = true;
            } else if (cur.thread != s.other.thread) {
                s.other_many = true;
            }
        }
    }

    void access(std::uintptr_t a, std::uint32_t size, Kind kind, std::uintptr_t pc,
                bool atomic = false) {
        if ((a >= static_start && a < static_end) || (a >= dynamic_start && a < dynamic_end)) {
            if (flags & kRacecheck) check(shared_shadow, a, size, kind, atomic);
            return;
        }
        if (!is_global(a)) return;
        if (flags & kCount) count(a, size, kind, pc);
        if (flags & kRacecheck) check(global_shadow, a, size, kind, atomic);
    }
};

// Only ever set on the OS thread that runs the launch; initial-exec keeps the test in every
// entry point to one load.
__attribute__((tls_model("initial-exec"))) thread_local Probe* t_probe = nullptr;
thread_local Probe t_storage;

[[noreturn]] void misaligned(const void* a, unsigned size, Kind kind) {
    rt::fail("misaligned %u-byte %s at %p (a GPU faults: misaligned address)", size,
             kind == Kind::Read ? "load" : "store", a);
}

inline void on_access(const void* a, unsigned size, Kind kind, bool aligned, std::uintptr_t pc) {
    const auto address = reinterpret_cast<std::uintptr_t>(a);
    if (aligned && (address & (size - 1)) != 0 && rt::in_launch()) misaligned(a, size, kind);
    Probe* p = t_probe;
    if (p != nullptr) p->access(address, size, kind, pc);
}

// A copy of `size` bytes, seen as accesses of at most 16 aligned bytes.
void on_range(const void* a, std::size_t size, Kind kind, std::uintptr_t pc) {
    Probe* p = t_probe;
    if (p == nullptr) return;
    auto address = reinterpret_cast<std::uintptr_t>(a);
    const std::uintptr_t end = address + size;
    while (address < end) {
        const std::uintptr_t next = std::min(end, (address & ~std::uintptr_t{15}) + 16);
        p->access(address, static_cast<std::uint32_t>(next - address), kind, pc);
        address = next;
    }
}

}  // namespace

void begin_launch(std::uint32_t flags, const unsigned char* static_shared,
                  std::size_t static_bytes, const unsigned char* dynamic_shared,
                  std::size_t dynamic_bytes, unsigned threads) {
    if (flags == 0) return;
    Probe& p = t_storage;
    p = Probe{};
    p.flags = flags;
    {
        std::lock_guard<std::mutex> lock(g_registry_mutex);
        p.globals = g_registry;
        p.watched = g_watched;
    }
    p.static_start = reinterpret_cast<std::uintptr_t>(static_shared);
    p.static_end = p.static_start + static_bytes;
    p.dynamic_start = reinterpret_cast<std::uintptr_t>(dynamic_shared);
    p.dynamic_end = p.dynamic_start + dynamic_bytes;
    p.warp_epochs.assign((threads + 31) / 32, 0);
    t_probe = &p;
}

void begin_block(std::uint64_t block_linear) {
    Probe* p = t_probe;
    if (p == nullptr) return;
    p->block = block_linear;
    p->epoch = 0;
    std::fill(p->warp_epochs.begin(), p->warp_epochs.end(), 0);
    p->shared_shadow.clear();
}

void resumed(unsigned thread) {
    if (Probe* p = t_probe) p->thread = thread;
}

void barrier_released() {
    if (Probe* p = t_probe) ++p->epoch;
}

void warp_synced(unsigned warp) {
    if (Probe* p = t_probe) ++p->warp_epochs[warp];
}

void end_block() {
    if (Probe* p = t_probe) p->close_requests();
}

void end_launch(contralign_emu_traffic* out) {
    Probe* p = t_probe;
    if (p == nullptr) {
        if (out != nullptr) *out = contralign_emu_traffic{};
        return;
    }
    if (out != nullptr) {
        *out = p->traffic;
        for (const auto& [sector, state] : p->sectors) {
            out->read_sectors += state & 1;
            out->write_sectors += state >> 1 & 1;
        }
    }
    t_probe = nullptr;
    t_storage = Probe{};
}

void atomic_access(const void* address, unsigned bytes, std::uintptr_t pc) {
    Probe* p = t_probe;
    if (p == nullptr) return;
    const auto a = reinterpret_cast<std::uintptr_t>(address);
    p->access(a, bytes, Kind::Read, pc, true);
    p->access(a, bytes, Kind::Write, pc, true);
}

void count_flops(std::uint64_t flops) {
    if (Probe* p = t_probe) p->traffic.flops += flops;
}

void vector_access(const void* address, unsigned bytes, bool write, std::uintptr_t pc) {
    if (Probe* p = t_probe) {
        p->access(reinterpret_cast<std::uintptr_t>(address), bytes,
                  write ? Kind::Write : Kind::Read, pc);
    }
}

bool active() { return t_probe != nullptr; }

}  // namespace probe
}  // namespace contralign_emu

using contralign_emu::probe::Kind;
using contralign_emu::probe::on_access;
using contralign_emu::probe::on_range;

extern "C" {

void contralign_emu_register_global(const void* start, std::size_t bytes) {
    using contralign_emu::probe::Range;
    const auto a = reinterpret_cast<std::uintptr_t>(start);
    std::lock_guard<std::mutex> lock(contralign_emu::probe::g_registry_mutex);
    auto& r = contralign_emu::probe::g_registry;
    const Range range{a, a + bytes};
    r.insert(std::upper_bound(r.begin(), r.end(), range,
                              [](const Range& x, const Range& y) { return x.start < y.start; }),
             range);
}

void contralign_emu_unregister_global(const void* start) {
    const auto a = reinterpret_cast<std::uintptr_t>(start);
    std::lock_guard<std::mutex> lock(contralign_emu::probe::g_registry_mutex);
    auto& r = contralign_emu::probe::g_registry;
    r.erase(std::remove_if(r.begin(), r.end(), [a](const auto& x) { return x.start == a; }),
            r.end());
}

void contralign_emu_watch(const void* const* starts, const std::size_t* bytes, std::size_t count) {
    using contralign_emu::probe::Range;
    std::lock_guard<std::mutex> lock(contralign_emu::probe::g_registry_mutex);
    auto& w = contralign_emu::probe::g_watched;
    w.clear();
    for (std::size_t i = 0; i < count; ++i) {
        const auto a = reinterpret_cast<std::uintptr_t>(starts[i]);
        w.push_back(Range{a, a + bytes[i]});
    }
}

// ThreadSanitizer's compiler ABI (what -fsanitize=thread emits calls to).
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}

#define CONTRALIGN_EMU_TSAN_ACCESS(size)                                                    \
    void __tsan_read##size(void* a) {                                                       \
        on_access(a, size, Kind::Read, true,                                                \
                  reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)));           \
    }                                                                                       \
    void __tsan_write##size(void* a) {                                                      \
        on_access(a, size, Kind::Write, true,                                               \
                  reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)));           \
    }                                                                                       \
    void __tsan_unaligned_read##size(void* a) {                                             \
        on_access(a, size, Kind::Read, false,                                               \
                  reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)));           \
    }                                                                                       \
    void __tsan_unaligned_write##size(void* a) {                                            \
        on_access(a, size, Kind::Write, false,                                              \
                  reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)));           \
    }
CONTRALIGN_EMU_TSAN_ACCESS(1)
CONTRALIGN_EMU_TSAN_ACCESS(2)
CONTRALIGN_EMU_TSAN_ACCESS(4)
CONTRALIGN_EMU_TSAN_ACCESS(8)
CONTRALIGN_EMU_TSAN_ACCESS(16)
#undef CONTRALIGN_EMU_TSAN_ACCESS

void __tsan_read_range(void* a, unsigned long size) {
    on_range(a, size, Kind::Read, reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)));
}
void __tsan_write_range(void* a, unsigned long size) {
    on_range(a, size, Kind::Write, reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)));
}

// Clang's instrumentation replaces the memory intrinsics with these.
void* __tsan_memcpy(void* dst, const void* src, unsigned long size) {
    const auto pc = reinterpret_cast<std::uintptr_t>(__builtin_return_address(0));
    on_range(src, size, Kind::Read, pc);
    on_range(dst, size, Kind::Write, pc);
    return std::memcpy(dst, src, size);
}
void* __tsan_memmove(void* dst, const void* src, unsigned long size) {
    const auto pc = reinterpret_cast<std::uintptr_t>(__builtin_return_address(0));
    on_range(src, size, Kind::Read, pc);
    on_range(dst, size, Kind::Write, pc);
    return std::memmove(dst, src, size);
}
void* __tsan_memset(void* dst, int value, unsigned long size) {
    on_range(dst, size, Kind::Write, reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)));
    return std::memset(dst, value, size);
}
}
