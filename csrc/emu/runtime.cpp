// The CUDA execution model on the CPU, for running the project's kernels in tests.
//
// A launch runs the blocks of the grid one after another (in a fixed shuffled order: real hardware
// promises none). Every thread of a block is a fiber on the launching OS thread, switched at
// __syncthreads, __syncwarp and warp collectives (shuffles, ldmatrix, mma), which resolve once
// every lane of the mask has arrived. Kernel translation units are compiled with
// -fsanitize=thread, but instead of ThreadSanitizer's runtime the __tsan_* hooks below receive
// every load and store of kernel code, and check them:
//   * shared memory: per-byte shadow of the last write and the reads since the last barrier, so a
//     read of a byte never written in the block, a write-read / read-write / write-write pair of
//     two threads with no __syncthreads between them (or __syncwarp, within one warp), a touch of
//     a cp.async destination before its wait, or an access outside the launch's shared memory is
//     an error;
//   * global memory: every byte written in a launch remembers its writer, so two blocks writing
//     (or one writing and another reading) the same byte, a plain access to a location updated
//     atomically, or threads of one block racing there between barriers, is an error.
// Shared memory is poisoned (0xff bytes: NaN in fp32/fp16/bf16) at every block start, device
// allocations too. Faults are collected and thrown as one c10::Error after the launch.
#include "cuda.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulator's fibers switch x86-64 stacks"
#endif

// The emulator's own code is not instrumented (the hooks would see its accesses).
#define EMU_RUNTIME __attribute__((no_sanitize_thread, noinline))
#define EMU_INLINE __attribute__((no_sanitize_thread, always_inline)) inline

// Saves the callee-saved registers and the stack pointer to *save_sp, loads load_sp, restores.
extern "C" void sinklora_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl sinklora_emu_switch
  .hidden sinklora_emu_switch
  .type sinklora_emu_switch, @function
sinklora_emu_switch:
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
  .size sinklora_emu_switch, .-sinklora_emu_switch
)");

namespace sinklora_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread, below a guard page
constexpr size_t kSmemGuard = 1024;          // bytes either side of shared memory that trap
constexpr int kMaxFaults = 8;                // reported per launch (all are counted)

enum class State : uint8_t { kRunnable, kAtBarrier, kInCollective, kDone };
enum class Collective : uint8_t { kShfl, kShflXor, kSyncwarp, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBF16 };
const char* collective_name(Collective c) {
  switch (c) {
    case Collective::kShfl: return "__shfl_sync";
    case Collective::kShflXor: return "__shfl_xor_sync";
    case Collective::kSyncwarp: return "__syncwarp";
    case Collective::kLdmatrix: return "ldmatrix.x4";
    case Collective::kLdmatrixTrans: return "ldmatrix.x4.trans";
    case Collective::kMmaF16: return "mma.m16n8k16.f16";
    case Collective::kMmaBF16: return "mma.m16n8k16.bf16";
  }
  return "?";
}

struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;
  bool pred;
};

struct EmuThread {
  void* sp = nullptr;
  char* stack = nullptr;
  uint3 idx{};
  int tid = 0, warp = 0, lane = 0;
  State state = State::kDone;
  const void* site = nullptr;  // where it waits
  std::vector<PendingCopy> uncommitted;
  std::deque<std::vector<PendingCopy>> groups;  // committed, oldest first
};

struct LaneSlot {
  uint32_t in[10];
  uint32_t out[4];
  int param;
  const void* site;
};
struct Warp {
  int arrived = 0;
  Collective kind{};
  unsigned mask = 0;
  uint32_t sync_epoch = 0;  // completed __syncwarp calls
  LaneSlot lane[32];
};

// Shadow of one byte of shared memory. Epochs are the block's barrier count + 1 (0: never).
constexpr uint16_t kManyReaders = 0xffff;
struct ByteShadow {
  uint32_t write_epoch;
  uint32_t read_epoch;
  uint32_t write_wepoch;
  uint32_t read_wepoch;
  uint16_t writer;
  uint16_t reader;
  int16_t read_warp;  // the warp of every read in read_epoch, -1 when reads span warps
  uint8_t pending;    // a cp.async to this byte has not been waited for
};

struct GlobalWrite {
  uint32_t block;
  uint32_t epoch;
  uint16_t tid;
  bool atomic;
};

struct Fault {
  std::string kind;
  std::string where;
  std::string detail;
};

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0, collectives = 0, mma = 0, ldmatrix = 0,
          cp_async = 0, smem_accesses = 0, global_accesses = 0, faults = 0;
};

struct Launch {
  dim3 grid, block;
  size_t smem_bytes = 0;
  const std::function<void()>* body = nullptr;
  uint3 block_idx{};
  uint32_t block_linear = 0;
  int nthreads = 0;
  uint32_t epoch = 0;  // completed __syncthreads of the running block
  std::vector<EmuThread> threads;
  std::vector<Warp> warps;
  unsigned char* smem = nullptr;  // the running block's shared memory
  std::vector<ByteShadow> shadow;
  std::unordered_map<uintptr_t, GlobalWrite> global_writes;
  std::vector<Fault> faults;
  int64_t fault_count = 0;
};

// The emulator's state: one launch at a time (a mutex serialises launches), all its fibers on the
// launching OS thread. The hooks read the thread-local part, so other threads' accesses pass.
Launch* g_launch = nullptr;
thread_local EmuThread* g_current = nullptr;  // the emulated thread running now (null in the scheduler)
thread_local bool g_in_runtime = false;       // the hooks ignore the emulator's own accesses
void* g_scheduler_sp = nullptr;
Stats g_stats;
DeviceProps g_props;
std::unordered_map<const void*, int> g_max_dynamic_smem;
std::map<std::string, int64_t> g_kernel_launches;
std::mutex g_launch_mutex;

char* g_stacks = nullptr;  // one mapping for every fiber stack
size_t g_stack_count = 0;
unsigned char* g_smem_alloc = nullptr;
size_t g_smem_capacity = 0;

struct RuntimeScope {
  bool prev;
  EMU_INLINE RuntimeScope() : prev(g_in_runtime) { g_in_runtime = true; }
  EMU_INLINE ~RuntimeScope() { g_in_runtime = prev; }
};

EMU_RUNTIME std::string symbol_of(const void* pc) {
  Dl_info info{};
  if (pc == nullptr || dladdr(pc, &info) == 0 || info.dli_sname == nullptr) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%p", pc);
    return buf;
  }
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
  std::free(demangled);
  char off[32];
  std::snprintf(off, sizeof off, "+0x%zx", size_t(static_cast<const char*>(pc) - static_cast<const char*>(info.dli_saddr)));
  return name + off;
}

EMU_RUNTIME std::string thread_name(int tid) {
  const auto& l = *g_launch;
  std::ostringstream s;
  const EmuThread& t = l.threads[tid];
  s << "thread (" << t.idx.x << "," << t.idx.y << "," << t.idx.z << ") [warp " << t.warp << " lane " << t.lane << "]";
  return s.str();
}

EMU_RUNTIME void fault(const std::string& kind, const std::string& detail, const void* pc) {
  Launch& l = *g_launch;
  ++l.fault_count;
  ++g_stats.faults;
  if (int(l.faults.size()) >= kMaxFaults) return;
  std::ostringstream where;
  where << "block (" << l.block_idx.x << "," << l.block_idx.y << "," << l.block_idx.z << ")";
  if (g_current != nullptr) where << " " << thread_name(g_current->tid);
  if (pc != nullptr) where << " at " << symbol_of(pc);
  l.faults.push_back({kind, where.str(), detail});
}

// ---------------------------------------------------------------------------------------------
// Fibers

EMU_RUNTIME void ensure_stacks(size_t count) {
  if (count <= g_stack_count) return;
  if (g_stacks != nullptr) munmap(g_stacks, g_stack_count * kStackBytes);
  void* m = mmap(nullptr, count * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  TORCH_CHECK(m != MAP_FAILED, "CUDA emulator: cannot map ", count, " thread stacks");
  g_stacks = static_cast<char*>(m);
  g_stack_count = count;
  for (size_t i = 0; i < count; ++i) mprotect(g_stacks + i * kStackBytes, 4096, PROT_NONE);
}

EMU_INLINE bool on_a_stack(uintptr_t a) {
  return a - uintptr_t(g_stacks) < g_stack_count * kStackBytes;
}

EMU_RUNTIME void yield_to_scheduler() {
  EmuThread* self = g_current;
  g_current = nullptr;
  sinklora_emu_switch(&self->sp, g_scheduler_sp);
  g_current = self;
  g_in_runtime = true;
}

[[noreturn]] EMU_RUNTIME void fiber_main() {
  g_in_runtime = false;
  try {
    (*g_launch->body)();
  } catch (const std::exception& e) {
    g_in_runtime = true;
    fault("exception thrown in device code", e.what(), nullptr);
  }
  g_in_runtime = true;
  g_current->state = State::kDone;  // copies still in flight die with the thread (nobody can read them)
  g_current = nullptr;
  void* dead_sp = nullptr;
  sinklora_emu_switch(&dead_sp, g_scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

EMU_RUNTIME void start_fiber(EmuThread& t) {
  char* top = t.stack + kStackBytes;
  auto* sp = reinterpret_cast<uintptr_t*>(uintptr_t(top) & ~uintptr_t(15));
  *--sp = 0;                                    // fiber_main's (never used) return address
  *--sp = reinterpret_cast<uintptr_t>(&fiber_main);  // where the switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--sp = 0;        // rbp rbx r12 r13 r14 r15
  t.sp = sp;
}

// ---------------------------------------------------------------------------------------------
// Shared memory tracking

EMU_INLINE uint32_t warp_epoch_of(int tid) { return g_launch->warps[g_launch->threads[tid].warp].sync_epoch; }

// True when an access by `other` (with these epochs) and one by `tid` now are unordered.
EMU_INLINE bool unordered(int other, uint32_t other_epoch, uint32_t other_wepoch, int tid) {
  const Launch& l = *g_launch;
  if (other_epoch != l.epoch + 1 || other == tid) return false;
  if (l.threads[other].warp == l.threads[tid].warp && other_wepoch != warp_epoch_of(tid)) return false;
  return true;
}

EMU_RUNTIME void smem_touch(size_t off, size_t n, bool write, int tid, const void* pc, bool async_write = false) {
  Launch& l = *g_launch;
  ++g_stats.smem_accesses;
  const uint32_t now = l.epoch + 1;
  const uint32_t wnow = warp_epoch_of(tid);
  const int warp = l.threads[tid].warp;
  for (size_t i = off; i < off + n; ++i) {
    ByteShadow& s = l.shadow[i];
    if (s.pending && !async_write) {
      fault("shared memory: access to a cp.async destination before cp.async.wait",
            "byte " + std::to_string(i) + " (" + (write ? "write" : "read") + ")", pc);
      return;
    }
    if (!write) {
      if (s.write_epoch == 0) {
        fault("shared memory: read of a byte never written in this block",
              "byte " + std::to_string(i) + " of " + std::to_string(l.smem_bytes), pc);
        return;
      }
      if (unordered(s.writer, s.write_epoch, s.write_wepoch, tid)) {
        fault("shared memory race: read after another thread's write with no barrier between",
              "byte " + std::to_string(i) + " written by " + thread_name(s.writer), pc);
        return;
      }
      if (s.read_epoch != now) {
        s.read_epoch = now;
        s.reader = uint16_t(tid);
        s.read_warp = int16_t(warp);
      } else if (s.reader != tid) {
        s.reader = kManyReaders;
        if (s.read_warp != warp) s.read_warp = -1;
      }
      s.read_wepoch = wnow;
      continue;
    }
    if (s.write_epoch == now && unordered(s.writer, s.write_epoch, s.write_wepoch, tid)) {
      fault("shared memory race: two threads write with no barrier between",
            "byte " + std::to_string(i) + " also written by " + thread_name(s.writer), pc);
      return;
    }
    if (s.read_epoch == now) {
      const bool race = s.reader == kManyReaders
                            ? !(s.read_warp == warp && s.read_wepoch != wnow)
                            : unordered(s.reader, s.read_epoch, s.read_wepoch, tid);
      if (race) {
        fault("shared memory race: write after another thread's read with no barrier between",
              "byte " + std::to_string(i) + " read by " +
                  (s.reader == kManyReaders ? std::string("several threads") : thread_name(s.reader)),
              pc);
        return;
      }
    }
    s.write_epoch = now;
    s.writer = uint16_t(tid);
    s.write_wepoch = wnow;
  }
}

// Offset of [p, p + n) in the block's shared memory, or faults and returns SIZE_MAX.
EMU_RUNTIME size_t smem_range(const void* p, size_t n, const void* pc) {
  const Launch& l = *g_launch;
  const intptr_t off = static_cast<const unsigned char*>(p) - l.smem;
  if (off < 0 || size_t(off) + n > l.smem_bytes) {
    fault("shared memory: access outside the launch's dynamic shared memory",
          "offset " + std::to_string(off) + " size " + std::to_string(n) + " of " + std::to_string(l.smem_bytes), pc);
    return SIZE_MAX;
  }
  return size_t(off);
}

// ---------------------------------------------------------------------------------------------
// Global memory tracking

EMU_RUNTIME void global_touch(uintptr_t a, size_t n, bool write, bool atomic, int tid, const void* pc) {
  Launch& l = *g_launch;
  ++g_stats.global_accesses;
  if (!write && l.global_writes.empty()) return;
  for (size_t i = 0; i < n; ++i) {
    auto it = l.global_writes.find(a + i);
    if (it != l.global_writes.end()) {
      const GlobalWrite& w = it->second;
      const bool other_block = w.block != l.block_linear;
      const bool same_block_race = !other_block && w.tid != tid && w.epoch == l.epoch;
      if (atomic && w.atomic) {
        // atomics commute with atomics
      } else if (atomic || w.atomic) {
        if (other_block || same_block_race) {
          fault("global memory race: a plain access and an atomic update of one location in a launch",
                "address " + std::to_string(a + i) + (atomic ? " (atomic now)" : " (atomic before)"), pc);
          return;
        }
      } else if (other_block) {
        fault(write ? "global memory race: two blocks write the same byte"
                    : "global memory race: a block reads a byte another block writes in the same launch",
              "address " + std::to_string(a + i), pc);
        return;
      } else if (same_block_race) {
        fault("global memory race: two threads of a block touch a byte between barriers, one writing",
              "address " + std::to_string(a + i) + " written by " + thread_name(w.tid), pc);
        return;
      }
    }
    if (write) l.global_writes[a + i] = GlobalWrite{l.block_linear, l.epoch, uint16_t(tid), atomic};
  }
}

EMU_INLINE void on_access(const void* addr, size_t n, bool write, const void* pc) {
  if (g_current == nullptr || g_in_runtime) return;
  RuntimeScope scope;
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  const Launch& l = *g_launch;
  const uintptr_t base = reinterpret_cast<uintptr_t>(l.smem);
  if (a + n > base - kSmemGuard && a < base + l.smem_bytes + kSmemGuard) {
    const size_t off = smem_range(addr, n, pc);
    if (off != SIZE_MAX) smem_touch(off, n, write, g_current->tid, pc);
    return;
  }
  if (on_a_stack(a)) return;
  global_touch(a, n, write, false, g_current->tid, pc);
}

// ---------------------------------------------------------------------------------------------
// Warp collectives

EMU_RUNTIME void resolve(Warp& w, int warp_index);

// Lane arrives at collective `kind`; returns once every lane of the mask has arrived and the
// collective resolved (outputs in its slot).
EMU_RUNTIME LaneSlot& arrive(Collective kind, unsigned mask, const void* pc) {
  Launch& l = *g_launch;
  EmuThread& t = *g_current;
  Warp& w = l.warps[t.warp];
  ++g_stats.collectives;
  const int warp_lanes = std::min(32, l.nthreads - t.warp * 32);
  const unsigned present = warp_lanes == 32 ? 0xffffffffu : ((1u << warp_lanes) - 1);
  if ((mask & ~present) != 0 || !(mask >> t.lane & 1u)) {
    fault(std::string(collective_name(kind)) + ": mask names lanes that do not exist or omits the caller",
          "mask " + std::to_string(mask), pc);
  }
  const bool aligned = kind == Collective::kLdmatrix || kind == Collective::kLdmatrixTrans ||
                       kind == Collective::kMmaF16 || kind == Collective::kMmaBF16;
  if (w.arrived == 0) {
    w.kind = kind;
    w.mask = mask;
  } else if (w.kind != kind || w.mask != mask) {
    fault("warp divergence: lanes of one warp wait at different collectives",
          std::string(collective_name(kind)) + " here, " + collective_name(w.kind) + " elsewhere", pc);
  }
  LaneSlot& slot = w.lane[t.lane];
  slot.site = pc;
  if (aligned && w.arrived > 0) {
    for (int i = 0; i < 32; ++i) {
      if (i != t.lane && (w.mask >> i & 1u) && l.threads[t.warp * 32 + i].state == State::kInCollective &&
          w.lane[i].site != pc) {
        fault(std::string(collective_name(kind)) + ": .aligned instruction reached from different code by one warp",
              "other lane at " + symbol_of(w.lane[i].site), pc);
        break;
      }
    }
  }
  ++w.arrived;
  if (w.arrived == __builtin_popcount(mask)) {
    resolve(w, t.warp);
    w.arrived = 0;
    for (int i = 0; i < 32; ++i) {
      if ((mask >> i & 1u) && i != t.lane) l.threads[t.warp * 32 + i].state = State::kRunnable;
    }
  } else {
    t.state = State::kInCollective;
    t.site = pc;
    yield_to_scheduler();
  }
  return slot;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Fragment layouts of the PTX ISA (mma.m16n8k16 with .f16/.bf16 operands; ldmatrix .m8n8 .b16).
// groupID = lane / 4, threadID_in_group = lane % 4. The emulator's own tests compare these tables
// with CUTLASS/CuTe's MMA_Traits and Copy_Traits layouts.

// Element i (0..7; register i / 2, half i % 2) of lane's A fragment: (row, col) of the 16x16 A.
EMU_RUNTIME void mma_a_coord(int lane, int i, int& row, int& col) {
  row = lane / 4 + ((i / 2) % 2) * 8;
  col = (lane % 4) * 2 + (i % 2) + (i / 4) * 8;
}
// Element i (0..3; register i / 2, half i % 2) of lane's B fragment: (row k, col n) of the 16x8 B.
EMU_RUNTIME void mma_b_coord(int lane, int i, int& row, int& col) {
  row = (lane % 4) * 2 + (i % 2) + (i / 2) * 8;
  col = lane / 4;
}
// Accumulator i (0..3) of lane: (row, col) of the 16x8 C / D.
EMU_RUNTIME void mma_c_coord(int lane, int i, int& row, int& col) {
  row = lane / 4 + (i / 2) * 8;
  col = (lane % 4) * 2 + (i % 2);
}
// Half h of register r of lane after ldmatrix.x4: the 16-bit element `element` of the row whose
// address lane `row_lane` supplied (matrix r is rows 8r..8r+7).
EMU_RUNTIME void ldmatrix_source(int lane, int r, int h, bool trans, int& row_lane, int& element) {
  if (!trans) {
    row_lane = 8 * r + lane / 4;
    element = 2 * (lane % 4) + h;
  } else {
    row_lane = 8 * r + 2 * (lane % 4) + h;
    element = lane / 4;
  }
}

namespace {

EMU_RUNTIME float half_bits_to_float(uint16_t bits, bool bf16) {
  return bf16 ? c10::detail::f32_from_bits(bits) : c10::detail::fp16_ieee_to_fp32_value(bits);
}

EMU_RUNTIME void resolve(Warp& w, int warp_index) {
  Launch& l = *g_launch;
  switch (w.kind) {
    case Collective::kShfl:
    case Collective::kShflXor: {
      for (int i = 0; i < 32; ++i) {
        if (!(w.mask >> i & 1u)) continue;
        const int src = w.kind == Collective::kShflXor ? (i ^ w.lane[i].param) : w.lane[i].param;
        // Out-of-range or inactive sources return the caller's own value (as the hardware does).
        const bool ok = src >= 0 && src < 32 && (w.mask >> src & 1u);
        w.lane[i].out[0] = ok ? w.lane[src].in[0] : w.lane[i].in[0];
      }
      break;
    }
    case Collective::kSyncwarp:
      ++w.sync_epoch;
      break;
    case Collective::kLdmatrix:
    case Collective::kLdmatrixTrans: {
      ++g_stats.ldmatrix;
      const bool trans = w.kind == Collective::kLdmatrixTrans;
      uint16_t rows[32][8];
      for (int i = 0; i < 32; ++i) {
        const uint32_t saddr = w.lane[i].in[0];
        const int tid = warp_index * 32 + i;
        if (saddr % 16 != 0 || size_t(saddr) + 16 > l.smem_bytes) {
          fault("ldmatrix: row address not 16-byte aligned or outside shared memory",
                "lane " + std::to_string(i) + " offset " + std::to_string(saddr), w.lane[i].site);
          std::memset(rows[i], 0xff, 16);
          continue;
        }
        smem_touch(saddr, 16, false, tid, w.lane[i].site);
        std::memcpy(rows[i], l.smem + saddr, 16);
      }
      for (int lane = 0; lane < 32; ++lane) {
        for (int r = 0; r < 4; ++r) {
          uint32_t v = 0;
          for (int h = 0; h < 2; ++h) {
            int row_lane, element;
            ldmatrix_source(lane, r, h, trans, row_lane, element);
            v |= uint32_t(rows[row_lane][element]) << (16 * h);
          }
          w.lane[lane].out[r] = v;
        }
      }
      break;
    }
    case Collective::kMmaF16:
    case Collective::kMmaBF16: {
      ++g_stats.mma;
      const bool bf16 = w.kind == Collective::kMmaBF16;
      double A[16][16], B[16][8], C[16][8];
      for (int lane = 0; lane < 32; ++lane) {
        const LaneSlot& s = w.lane[lane];
        for (int i = 0; i < 8; ++i) {
          int r, c;
          mma_a_coord(lane, i, r, c);
          A[r][c] = half_bits_to_float(uint16_t(s.in[i / 2] >> (16 * (i % 2))), bf16);
        }
        for (int i = 0; i < 4; ++i) {
          int r, c;
          mma_b_coord(lane, i, r, c);
          B[r][c] = half_bits_to_float(uint16_t(s.in[4 + i / 2] >> (16 * (i % 2))), bf16);
          mma_c_coord(lane, i, r, c);
          float f;
          std::memcpy(&f, &s.in[6 + i], 4);
          C[r][c] = f;
        }
      }
      for (int lane = 0; lane < 32; ++lane) {
        for (int i = 0; i < 4; ++i) {
          int r, c;
          mma_c_coord(lane, i, r, c);
          double acc = C[r][c];
          for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][c];
          const float f = float(acc);
          std::memcpy(&w.lane[lane].out[i], &f, 4);
        }
      }
      break;
    }
  }
}

EMU_RUNTIME void complete_group(EmuThread& t, std::vector<PendingCopy>& group) {
  Launch& l = *g_launch;
  for (const PendingCopy& c : group) {
    const size_t off = size_t(c.dst - l.smem);
    for (size_t i = off; i < off + 16; ++i) l.shadow[i].pending = 0;
    if (c.pred) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
    smem_touch(off, 16, true, t.tid, nullptr, true);
  }
}

// ---------------------------------------------------------------------------------------------
// Blocks

EMU_RUNTIME std::string describe_waits() {
  const Launch& l = *g_launch;
  std::ostringstream s;
  int shown = 0;
  for (const EmuThread& t : l.threads) {
    if (t.state == State::kDone || shown >= 4) continue;
    ++shown;
    s << "\n    " << thread_name(t.tid) << " waits "
      << (t.state == State::kAtBarrier ? "at __syncthreads" : "in a warp collective") << " at " << symbol_of(t.site);
  }
  return s.str();
}

EMU_RUNTIME void run_block(Launch& l) {
  for (EmuThread& t : l.threads) {
    t.state = State::kRunnable;
    t.uncommitted.clear();
    t.groups.clear();
    start_fiber(t);
  }
  for (Warp& w : l.warps) w = Warp{};
  l.epoch = 0;
  std::memset(l.smem - kSmemGuard, 0xff, l.smem_bytes + 2 * kSmemGuard);
  std::memset(l.shadow.data(), 0, l.smem_bytes * sizeof(ByteShadow));
  ++g_stats.blocks;
  g_stats.threads += l.nthreads;
  for (;;) {
    bool ran = false, all_done = true;
    for (EmuThread& t : l.threads) {
      if (t.state == State::kRunnable) {
        ran = true;
        g_current = &t;
        g_in_runtime = false;
        sinklora_emu_switch(&g_scheduler_sp, t.sp);
        g_in_runtime = true;
      }
      all_done = all_done && t.state == State::kDone;
    }
    if (all_done) return;
    if (ran) continue;
    // Nothing runnable: a complete barrier, or a deadlock.
    const void* site = nullptr;
    bool barrier = true, same_site = true;
    for (const EmuThread& t : l.threads) {
      if (t.state == State::kDone) continue;
      if (t.state != State::kAtBarrier) barrier = false;
      if (site == nullptr) site = t.site;
      same_site = same_site && t.site == site;
    }
    if (!barrier) {
      fault("deadlock: threads wait for lanes that never arrive (divergent warp collective or a lane that exited)",
            describe_waits(), nullptr);
      return;
    }
    if (!same_site) {
      fault("barrier divergence: threads of one block wait at different __syncthreads", describe_waits(), nullptr);
      return;
    }
    ++l.epoch;
    ++g_stats.barriers;
    for (EmuThread& t : l.threads) {
      if (t.state == State::kAtBarrier) t.state = State::kRunnable;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The device API of cuda.h

EMU_RUNTIME const uint3& thread_idx() { return g_current->idx; }
EMU_RUNTIME const uint3& block_idx() { return g_launch->block_idx; }
EMU_RUNTIME const dim3& block_dim() { return g_launch->block; }
EMU_RUNTIME const dim3& grid_dim() { return g_launch->grid; }

EMU_RUNTIME void syncthreads() {
  RuntimeScope scope;
  EmuThread& t = *g_current;
  t.state = State::kAtBarrier;
  t.site = __builtin_return_address(0);
  yield_to_scheduler();
}

EMU_RUNTIME void syncwarp(unsigned mask) {
  RuntimeScope scope;
  arrive(Collective::kSyncwarp, mask, __builtin_return_address(0));
}

EMU_RUNTIME uint32_t shfl32(unsigned mask, uint32_t value, int lane_or_mask, bool xor_mode) {
  RuntimeScope scope;
  LaneSlot& slot = g_launch->warps[g_current->warp].lane[g_current->lane];
  slot.in[0] = value;
  slot.param = lane_or_mask;
  LaneSlot& out = arrive(xor_mode ? Collective::kShflXor : Collective::kShfl, mask, __builtin_return_address(0));
  return out.out[0];
}

EMU_RUNTIME float atomic_add_f32(float* address, float value) {
  RuntimeScope scope;
  const void* pc = __builtin_return_address(0);
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  if (a % 4 != 0) fault("atomicAdd: misaligned address", std::to_string(a), pc);
  const uintptr_t base = reinterpret_cast<uintptr_t>(g_launch->smem);
  if (a + 4 > base - kSmemGuard && a < base + g_launch->smem_bytes + kSmemGuard) {
    const size_t off = smem_range(address, 4, pc);
    if (off == SIZE_MAX) return 0.f;
    smem_touch(off, 4, false, g_current->tid, pc);
    smem_touch(off, 4, true, g_current->tid, pc);
  } else {
    global_touch(a, 4, true, true, g_current->tid, pc);
  }
  const float old = *address;
  *address = old + value;
  return old;
}

EMU_RUNTIME uint32_t smem_offset(const void* p) {
  const intptr_t off = static_cast<const unsigned char*>(p) - g_launch->smem;
  return static_cast<uint32_t>(off);
}
EMU_RUNTIME void* dynamic_smem() { return g_launch->smem; }

EMU_RUNTIME void cp_async_16(void* smem, const void* gmem, bool pred) {
  RuntimeScope scope;
  const void* pc = __builtin_return_address(0);
  Launch& l = *g_launch;
  EmuThread& t = *g_current;
  ++g_stats.cp_async;
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || (pred && reinterpret_cast<uintptr_t>(gmem) % 16 != 0)) {
    fault("cp.async: a 16-byte copy needs 16-byte aligned addresses", "", pc);
    return;
  }
  const size_t off = smem_range(smem, 16, pc);
  if (off == SIZE_MAX) return;
  for (size_t i = off; i < off + 16; ++i) {
    if (l.shadow[i].pending) {
      fault("cp.async: a second copy into bytes whose copy is still in flight", "byte " + std::to_string(i), pc);
      return;
    }
  }
  // The copy lands some time before the wait: check it as a write now, record it at the wait.
  smem_touch(off, 16, true, t.tid, pc);
  for (size_t i = off; i < off + 16; ++i) l.shadow[i].pending = 1;
  if (pred) global_touch(reinterpret_cast<uintptr_t>(gmem), 16, false, false, t.tid, pc);
  t.uncommitted.push_back({static_cast<unsigned char*>(smem), static_cast<const unsigned char*>(gmem), pred});
}

EMU_RUNTIME void cp_async_commit() {
  RuntimeScope scope;
  EmuThread& t = *g_current;
  t.groups.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

EMU_RUNTIME void cp_async_wait_group(int newest_in_flight) {
  RuntimeScope scope;
  EmuThread& t = *g_current;
  if (newest_in_flight < 0) {
    t.groups.push_back(std::move(t.uncommitted));
    t.uncommitted.clear();
    newest_in_flight = 0;
  }
  while (int(t.groups.size()) > newest_in_flight) {
    complete_group(t, t.groups.front());
    t.groups.pop_front();
  }
}

EMU_RUNTIME void ldmatrix_x4(uint32_t (&r)[4], uint32_t saddr, bool trans) {
  RuntimeScope scope;
  LaneSlot& slot = g_launch->warps[g_current->warp].lane[g_current->lane];
  slot.in[0] = saddr;
  LaneSlot& out = arrive(trans ? Collective::kLdmatrixTrans : Collective::kLdmatrix, 0xffffffffu,
                         __builtin_return_address(0));
  for (int i = 0; i < 4; ++i) r[i] = out.out[i];
}

EMU_RUNTIME void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type) {
  RuntimeScope scope;
  LaneSlot& slot = g_launch->warps[g_current->warp].lane[g_current->lane];
  for (int i = 0; i < 4; ++i) slot.in[i] = a[i];
  slot.in[4] = b0;
  slot.in[5] = b1;
  std::memcpy(&slot.in[6], d, 16);
  LaneSlot& out = arrive(type == MmaType::kF16 ? Collective::kMmaF16 : Collective::kMmaBF16, 0xffffffffu,
                         __builtin_return_address(0));
  std::memcpy(d, out.out, 16);
}

EMU_RUNTIME DeviceProps& device_props() { return g_props; }
EMU_RUNTIME void set_max_dynamic_smem(const void* kernel, int bytes) { g_max_dynamic_smem[kernel] = bytes; }

EMU_RUNTIME void* device_alloc(size_t bytes) {
  void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  TORCH_CHECK(p != nullptr, "CUDA emulator: out of memory allocating ", bytes, " bytes");
  std::memset(p, 0xff, bytes);
  return p;
}
EMU_RUNTIME void device_free(void* p) { std::free(p); }

EMU_RUNTIME void launch(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  RuntimeScope scope;
  const int64_t nthreads = int64_t(block.x) * block.y * block.z;
  std::string name = symbol_of(kernel);
  if (name.size() > 4 && name.compare(name.size() - 4, 4, "+0x0") == 0) name.resize(name.size() - 4);
  TORCH_CHECK(nthreads >= 1 && nthreads <= 1024 && block.z <= 64,
              "CUDA emulator: launch of ", name, " with a block of ", nthreads, " threads (1..1024 allowed)");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535,
              "CUDA emulator: launch of ", name, " with an empty or oversized grid (", grid.x, ", ", grid.y, ", ",
              grid.z, ")");
  auto limit = g_max_dynamic_smem.find(kernel);
  const size_t allowed = limit == g_max_dynamic_smem.end() ? 48 * 1024 : size_t(limit->second);
  TORCH_CHECK(smem <= allowed, "CUDA emulator: launch of ", name, " asks for ", smem,
              " bytes of dynamic shared memory, but the kernel allows ", allowed,
              " (cudaFuncSetAttribute(MaxDynamicSharedMemorySize) raises the 48 KiB default)");

  Launch l;
  l.grid = grid;
  l.block = block;
  l.smem_bytes = smem;
  l.body = &body;
  l.nthreads = int(nthreads);
  ensure_stacks(size_t(nthreads));
  if (g_smem_capacity < smem + 2 * kSmemGuard) {
    std::free(g_smem_alloc);
    g_smem_capacity = smem + 2 * kSmemGuard;
    g_smem_alloc = static_cast<unsigned char*>(std::aligned_alloc(1024, (g_smem_capacity + 1023) / 1024 * 1024));
  }
  // 128-byte alignment as the hardware's dynamic shared memory, guards either side.
  l.smem = g_smem_alloc + kSmemGuard;
  l.shadow.resize(smem);
  l.threads.resize(size_t(nthreads));
  l.warps.resize(size_t((nthreads + 31) / 32));
  for (int tid = 0; tid < nthreads; ++tid) {
    EmuThread& t = l.threads[tid];
    t.tid = tid;
    t.warp = tid / 32;
    t.lane = tid % 32;
    t.idx = uint3{unsigned(tid % block.x), unsigned(tid / block.x % block.y), unsigned(tid / (block.x * block.y))};
    t.stack = g_stacks + size_t(tid) * kStackBytes;
  }

  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  std::vector<int64_t> order(static_cast<size_t>(nblocks));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(0x5eed + uint64_t(nblocks)));
  Launch* prev = g_launch;
  g_launch = &l;
  ++g_stats.launches;
  ++g_kernel_launches[name];
  for (int64_t b : order) {
    l.block_linear = uint32_t(b);
    l.block_idx = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (int64_t(grid.x) * grid.y))};
    run_block(l);
    if (l.fault_count > 0) break;  // the first faulty block is enough
  }
  g_current = nullptr;
  g_launch = prev;
  if (l.fault_count == 0) return;
  std::ostringstream report;
  report << "CUDA emulator: " << l.fault_count << " fault(s) in " << name << " (grid " << grid.x << "x" << grid.y
         << "x" << grid.z << ", block " << block.x << "x" << block.y << "x" << block.z << ", " << smem
         << " bytes of shared memory):";
  for (const Fault& f : l.faults) report << "\n  " << f.kind << "\n    " << f.where << (f.detail.empty() ? "" : ": ") << f.detail;
  TORCH_CHECK(false, report.str());
}

// Counters since the last reset, for the tests' coverage table.
EMU_RUNTIME std::vector<int64_t> stats(bool reset) {
  std::vector<int64_t> v{g_stats.launches, g_stats.blocks,   g_stats.threads,  g_stats.barriers,
                         g_stats.collectives, g_stats.mma, g_stats.ldmatrix, g_stats.cp_async,
                         g_stats.smem_accesses, g_stats.global_accesses, g_stats.faults};
  if (reset) {
    g_stats = Stats{};
    g_kernel_launches.clear();
  }
  return v;
}

EMU_RUNTIME std::vector<std::pair<std::string, int64_t>> kernel_launches() {
  return {g_kernel_launches.begin(), g_kernel_launches.end()};
}

}  // namespace sinklora_emu

// ---------------------------------------------------------------------------------------------
// ThreadSanitizer's instrumentation interface, served by the tracker (kernel code is compiled with
// -fsanitize=thread; ThreadSanitizer's own runtime is not linked).
#define EMU_HOOK extern "C" __attribute__((no_sanitize_thread, visibility("default")))
#define EMU_ACCESS_HOOKS(n)                                                                                  \
  EMU_HOOK void __tsan_read##n(void* a) { sinklora_emu::on_access(a, n, false, __builtin_return_address(0)); } \
  EMU_HOOK void __tsan_write##n(void* a) { sinklora_emu::on_access(a, n, true, __builtin_return_address(0)); } \
  EMU_HOOK void __tsan_unaligned_read##n(void* a) {                                                          \
    sinklora_emu::on_access(a, n, false, __builtin_return_address(0));                                       \
  }                                                                                                          \
  EMU_HOOK void __tsan_unaligned_write##n(void* a) {                                                         \
    sinklora_emu::on_access(a, n, true, __builtin_return_address(0));                                        \
  }                                                                                                          \
  EMU_HOOK void __tsan_volatile_read##n(void* a) {                                                           \
    sinklora_emu::on_access(a, n, false, __builtin_return_address(0));                                       \
  }                                                                                                          \
  EMU_HOOK void __tsan_volatile_write##n(void* a) {                                                          \
    sinklora_emu::on_access(a, n, true, __builtin_return_address(0));                                        \
  }
EMU_ACCESS_HOOKS(1)
EMU_ACCESS_HOOKS(2)
EMU_ACCESS_HOOKS(4)
EMU_ACCESS_HOOKS(8)
EMU_ACCESS_HOOKS(16)
EMU_HOOK void __tsan_read_range(void* a, unsigned long n) {
  sinklora_emu::on_access(a, n, false, __builtin_return_address(0));
}
EMU_HOOK void __tsan_write_range(void* a, unsigned long n) {
  sinklora_emu::on_access(a, n, true, __builtin_return_address(0));
}
EMU_HOOK void __tsan_init() {}
EMU_HOOK void __tsan_func_entry(void*) {}
EMU_HOOK void __tsan_func_exit() {}
EMU_HOOK void __tsan_vptr_update(void** vptr, void* value) { (void)vptr, (void)value; }
EMU_HOOK void __tsan_vptr_read(void** vptr) { (void)vptr; }
EMU_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
EMU_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// Host code of the instrumented units (torch's headers, std::atomic) uses real atomics.
#define EMU_ATOMIC_HOOKS(bits, T)                                                                             \
  EMU_HOOK T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  EMU_HOOK void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  EMU_HOOK T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                                        \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                           \
  EMU_HOOK T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                                       \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                           \
  EMU_HOOK T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) {                                       \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                           \
  EMU_HOOK T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) {                                       \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                           \
  EMU_HOOK T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) {                                        \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                         \
  }                                                                                                           \
  EMU_HOOK T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) {                                       \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                           \
  EMU_HOOK T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) {                                      \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                           \
  EMU_HOOK int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {            \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
  }                                                                                                           \
  EMU_HOOK int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {              \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
  }                                                                                                           \
  EMU_HOOK T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                  \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                         \
    return c;                                                                                                 \
  }
EMU_ATOMIC_HOOKS(8, uint8_t)
EMU_ATOMIC_HOOKS(16, uint16_t)
EMU_ATOMIC_HOOKS(32, uint32_t)
EMU_ATOMIC_HOOKS(64, uint64_t)
