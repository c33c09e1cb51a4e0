// cuda_emu: a CPU emulator for the CUDA kernels of csrc/, so that the C++ tests can run them on a
// machine without a GPU (tests only; never part of the library).
//
// Use (one translation unit per test executable, compiled by a host C++20 compiler with
// -DPYDIFF_CUDA_EMU -ffp-contract=off -I<CUDA toolkit include dir>):
//
//   #include "emu.h"
//   // the kernel's inline-PTX helpers (compiled out of the .cu under PYDIFF_CUDA_EMU) mapped to the
//   // emulated instructions below, e.g. void ldsm_x4(...) { cuda_emu::ldmatrix_x4(...); }
//   #include "../../quant/quant_gemm_cuda.cu"
//   ... call the .cu's host entry point (pydiff::quant_gemm_cuda) and compare with a host reference.
//
// The .cu files have small `#ifdef PYDIFF_CUDA_EMU` seams (nvcc never sees them; its output is
// unchanged): the inline-PTX device primitives are left out, `extern __shared__ ... smem[]` becomes
// cuda_emu::dynamic_smem(), and `kernel<<<grid, block, smem, stream>>>(args)` becomes
// cuda_emu::launch(kernel, grid, block, smem, stream, args). Everything else -- the kernel bodies
// and the host launch code with its argument checks, alignment tests and attribute calls -- is
// compiled unchanged: the host side against the CUDA headers (their host types: __half,
// __nv_bfloat16, __nv_fp8_e4m3, uint4, float2, dim3, cudaError_t ...) and against the emulated
// runtime functions defined at the end of this file (so no libcudart is linked).
//
// Execution model
//  * A launch runs its blocks on a few worker OS threads (CUDA_EMU_WORKERS, default: the number of
//    hardware threads); each block runs on one worker, its CUDA threads as cooperative fibers
//    (user-level contexts with their own 128 KiB stacks, guard page below). A fiber runs until it
//    waits at a barrier; then the next lane of its warp runs, and when the whole warp waits at
//    __syncthreads (or has exited) the next warp, in increasing or decreasing warp order
//    (alternating between launches and blocks). A warp thus runs as far ahead of the others as
//    the barriers allow, so a missing __syncthreads shows up as wrong data (either direction).
//  * __syncthreads() is a block barrier; the warp collectives (__shfl_xor_sync, __syncwarp,
//    ldmatrix, mma) are warp barriers at which the last-arriving lane computes the result for all
//    32 lanes. Every lane of a warp must reach the same collective (else: error "divergent"), and
//    a block whose live threads all wait without a barrier completing is reported as a deadlock
//    (e.g. __syncthreads skipped by some threads, or reached after some threads exited).
//  * Dynamic shared memory (the only kind supported: no static __shared__ arrays) is filled with
//    0xFF bytes (NaN as floats, -1 as integers) at the start of every block, ends less than 16
//    bytes below a PROT_NONE page and has canaries around it, checked after every block.
//    ldmatrix / cp.async check that their shared addresses lie inside it and are 16-byte aligned,
//    as the PTX ISA requires.
//  * cp.async copies are deferred: they land when cp.async.wait_group retires their group (never
//    earlier), so reading a stage before waiting for it, or before the __syncthreads that makes the
//    other threads' copies visible, reads stale data instead of passing by luck.
//  * Arithmetic is the host's IEEE fp32/fp64 in round-to-nearest. The _rn intrinsics are exact
//    equivalents; tanhf/expf... are the host libm's (the GPU's differ by an ulp or two). Compile
//    with -ffp-contract=off: the host must not fuse a*b+c where the kernel does not (nvcc fuses
//    plain a*b+c by default, so kernels that need bit-reproducible results use explicit __fmaf_rn /
//    __fmul_rn / __fadd_rn, which this emulator reproduces exactly).
//  * A fault on a guard page (out-of-bounds access to a cuda_emu::Buffer, shared memory or a fiber
//    stack) prints the address and the block / thread before aborting. Other emulator errors
//    (misaligned ldmatrix, divergent collectives, ...) also abort with a message.
//  * Not emulated: partial warps (blocks must be whole warps), shuffles with partial masks or
//    widths below 32, static shared memory, streams (a launch runs to completion before it
//    returns), and the weak memory model (a global or shared store is visible at once; only
//    cp.async is deferred).
//
// Emulated PTX (definitions from the PTX ISA, "Warp-level matrix instructions" and "cp.async"):
//   ldmatrix.sync.aligned.m8n8.x4.shared.b16, cp.async.cg.shared.global (16 bytes, zero fill),
//   cp.async.commit_group / wait_group, wgmma.mma_async m64n128k16 f16 (shared-memory descriptors
//   without swizzle or 128-byte swizzled) with wgmma.fence / commit_group / wait_group, mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 and
//   .f32.e4m3.e4m3.f32 (the e4m3 sum of a k-step is computed exactly and rounded once to fp32;
//   hardware may round differently, tests must allow for that; a launch on a device below sm_89
//   that reaches it fails, as the kernel's __trap() would).
//
// Emulated runtime: cudaGetDevice / cudaSetDevice, cudaDeviceGetAttribute (shared-memory limits,
// multiprocessor count: Device::sms),
// cudaFuncSetAttribute (cudaFuncAttributeMaxDynamicSharedMemorySize), cudaFuncGetAttributes (ptx /
// binary version = the device's sm), cudaGetLastError / cudaPeekAtLastError, cudaGetErrorName /
// String. Devices (cuda_emu::device(i), 8 of them) default to an sm_90 with 48 KiB of shared
// memory per block, 227 KiB after opting in; a launch that asks for more dynamic shared memory than
// the kernel's opt-in allows, or for an invalid grid / block, sets cudaErrorInvalidValue /
// cudaErrorInvalidConfiguration for cudaGetLastError and runs nothing.
#pragma once

#ifndef PYDIFF_CUDA_EMU
#error "cuda_emu/emu.h: compile with -DPYDIFF_CUDA_EMU (the .cu files select their emulator seams with it)"
#endif
#if defined(__CUDACC__)
#error "cuda_emu/emu.h is for a host C++ compiler, not nvcc"
#endif

// threadIdx & co. are defined below as per-worker variables; keep the header's extern declarations out.
#define __DEVICE_LAUNCH_PARAMETERS_H__
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <math.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__) || defined(CUDA_EMU_USE_UCONTEXT)
#include <ucontext.h>
#define CUDA_EMU_UCONTEXT 1
#endif

// Kernel qualifiers the host headers leave undefined (__global__, __device__, __host__, __shared__
// and __forceinline__ already expand to host-compatible tokens).
#define __launch_bounds__(...)

// ================================================================ built-in variables
// Per worker OS thread; the scheduler sets them before resuming a fiber.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline constexpr int warpSize = 32;

namespace cuda_emu {

// ================================================================ devices and errors
struct Device {
  int sm = 90;                       // compute capability * 10 (cudaFuncGetAttributes' ptx/binary version)
  int smem_per_block = 48 * 1024;    // dynamic shared memory without opting in
  int smem_optin = 227 * 1024;       // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int sms = 132;                     // cudaDevAttrMultiProcessorCount
};
inline constexpr int kMaxDevices = 8;
inline Device& device(int ordinal) {
  static Device devs[kMaxDevices];
  return devs[ordinal];
}
inline int& current_device() {
  static int d = 0;
  return d;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

// Launch bookkeeping the tests may inspect.
struct LaunchRecord {
  const void* func;
  dim3 grid, block;
  size_t smem;
};
inline std::vector<LaunchRecord>& launches() {
  static std::vector<LaunchRecord> v;
  return v;
}

namespace detail {

// ================================================================ fibers
constexpr size_t kStackBytes = 128 * 1024;

#ifndef CUDA_EMU_UCONTEXT
// x86-64 System V: save the callee-saved registers, MXCSR and the x87 control word on the current
// stack, store the stack pointer in *save_sp, load load_sp, restore the same from there and return
// into the resumed context.
extern "C" void cuda_emu_switch_x86_64(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type cuda_emu_switch_x86_64, @function
cuda_emu_switch_x86_64:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch_x86_64, .-cuda_emu_switch_x86_64
)");

struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { cuda_emu_switch_x86_64(&from.sp, to.sp); }
// A fresh context whose first activation enters entry() (which must never return) on the stack
// [lo, lo + size): the frame cuda_emu_switch_x86_64 pops, with entry as its return address.
inline void make_context(Context& c, unsigned char* lo, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                          // entry's (never used) return address: rsp % 16 == 8 at entry
  *--sp = reinterpret_cast<void*>(entry);   // popped by ret
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  --sp;
  std::memset(sp, 0, 8);
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<unsigned char*>(sp) + 4, &fpucw, 2);
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, unsigned char* lo, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Copy {  // one deferred cp.async
  unsigned char* dst;
  const unsigned char* src;
  int bytes, src_bytes;
};

struct WgmmaOp {  // one issued wgmma.mma_async (deferred until wgmma.wait_group retires it)
  float* d;
  uint64_t da, db;
  int scale_d;
  double A[2][16], B[32][16];  // this thread's operand values when it was issued
};

// Asynchronous operations of one thread in commit groups (cp.async, wgmma): issue() opens, commit()
// closes a group, retire(n, run) runs the operations of all but the n most recent groups, oldest first.
template <typename Op>
struct AsyncGroups {
  std::vector<Op> open;                // issued, not yet committed
  std::deque<std::vector<Op>> groups;  // committed, oldest first
  void issue(Op op) { open.push_back(std::move(op)); }
  void commit() {
    groups.push_back(std::move(open));
    open.clear();
  }
  template <typename Run>
  void retire(size_t n, Run run) {
    while (groups.size() > n) {
      for (const Op& op : groups.front()) run(op);
      groups.pop_front();
    }
  }
  bool pending() const { return !open.empty() || !groups.empty(); }
  void clear() {
    open.clear();
    groups.clear();
  }
};

struct Fiber {
  Context ctx;
  bool done = false;
  const unsigned* wait_gen = nullptr;     // blocked until *wait_gen != wait_val (a barrier generation)
  unsigned wait_val = 0;
  const char* waits_in = nullptr;        // that barrier (diagnostics)
  AsyncGroups<Copy> copies;     // cp.async
  AsyncGroups<WgmmaOp> wgmmas;  // wgmma.mma_async
  uint64_t wg_count = 0;        // wgmma issued so far
};

constexpr size_t kLaneIn = 48, kLaneOut = 16;
struct Warp {
  unsigned arrived = 0, gen = 0;
  const char* op = nullptr;
  alignas(16) unsigned char in[2][32][kLaneIn];  // double-buffered by generation parity
  alignas(16) unsigned char out[2][32][kLaneOut];
};

struct Block {
  uint3 idx{};
  unsigned nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned bar_arrived = 0, bar_gen = 0;
  unsigned live = 0, cur = 0;
  bool reverse = false;  // warp order of the scheduler (see pick_next)
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  // the i-th wgmma of each warpgroup: its descriptors and scale-d, which every thread of the
  // warpgroup must issue alike (PTX: "the contents of a matrix descriptor must be same across all
  // the warps in the warpgroup")
  std::map<std::pair<unsigned, uint64_t>, std::tuple<uint64_t, uint64_t, int>> wgmma_issued;
};

// Memory with PROT_NONE pages on both sides: `bytes` usable bytes at the highest base address with
// base % align == offset (align: a power of two <= 4096) that keeps base + bytes at or below the
// upper guard page, i.e. less than `align` bytes before it. The bytes between the lower guard page
// and base and between base + bytes and the upper guard page hold a canary (canaries_intact()).
class GuardedRegion {
 public:
  GuardedRegion() = default;
  GuardedRegion(size_t bytes, size_t align, size_t offset) { alloc(bytes, align, offset); }
  GuardedRegion(const GuardedRegion&) = delete;
  GuardedRegion& operator=(const GuardedRegion&) = delete;
  GuardedRegion(GuardedRegion&& o) noexcept { *this = std::move(o); }
  GuardedRegion& operator=(GuardedRegion&& o) noexcept {
    std::swap(map_, o.map_);
    std::swap(map_bytes_, o.map_bytes_);
    std::swap(lo_, o.lo_);
    std::swap(hi_, o.hi_);
    std::swap(base_, o.base_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~GuardedRegion() {
    if (map_) munmap(map_, map_bytes_);
  }
  void alloc(size_t bytes, size_t align, size_t offset);
  unsigned char* base() const { return base_; }
  size_t bytes() const { return bytes_; }
  bool canaries_intact() const {
    for (unsigned char* p = lo_; p < base_; ++p)
      if (*p != kCanary) return false;
    for (unsigned char* p = base_ + bytes_; p < hi_; ++p)
      if (*p != kCanary) return false;
    return true;
  }
  static constexpr unsigned char kCanary = 0x5A;

 private:
  unsigned char* map_ = nullptr;
  size_t map_bytes_ = 0;
  unsigned char *lo_ = nullptr, *hi_ = nullptr, *base_ = nullptr;
  size_t bytes_ = 0;
};

inline size_t page_bytes() {
  static const size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

inline void GuardedRegion::alloc(size_t bytes, size_t align, size_t offset) {
  const size_t pg = page_bytes();
  if (align == 0 || (align & (align - 1)) != 0 || align > pg || offset >= align)
    fail("GuardedRegion: bad alignment %zu / offset %zu", align, offset);
  const size_t data_pages = (bytes + 2 * align + pg - 1) / pg;
  map_bytes_ = (data_pages + 2) * pg;
  void* m = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) fail("mmap of %zu bytes failed", map_bytes_);
  map_ = static_cast<unsigned char*>(m);
  lo_ = map_ + pg;
  hi_ = lo_ + data_pages * pg;
  if (mprotect(map_, pg, PROT_NONE) != 0 || mprotect(hi_, pg, PROT_NONE) != 0) fail("mprotect failed");
  uintptr_t b = reinterpret_cast<uintptr_t>(hi_) - bytes;
  b = (b & ~uintptr_t(align - 1)) + offset;
  if (b + bytes > reinterpret_cast<uintptr_t>(hi_)) b -= align;
  base_ = reinterpret_cast<unsigned char*>(b);
  bytes_ = bytes;
  std::memset(lo_, kCanary, size_t(hi_ - lo_));
}

struct Worker {
  Context main;
  Block blk;
  const std::function<void()>* body = nullptr;  // runs the kernel for the current (block, thread)
  unsigned char* stacks = nullptr;
  size_t stacks_bytes = 0;
  GuardedRegion smem;
  std::vector<unsigned char> altstack;
};
inline thread_local Worker* tl_worker = nullptr;
inline thread_local int tl_device_sm = 0;  // sm of the device the current launch runs on

inline Block& block() { return tl_worker->blk; }
inline Fiber& fiber() { return tl_worker->blk.fibers[tl_worker->blk.cur]; }

inline std::string where() {
  if (!tl_worker) return "host";
  const Block& b = tl_worker->blk;
  char buf[128];
  std::snprintf(buf, sizeof(buf), "block (%u, %u, %u), thread %u (warp %u, lane %u)", b.idx.x, b.idx.y, b.idx.z,
                b.cur, b.cur / 32, b.cur % 32);
  return buf;
}

inline void fail(const char* fmt, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "cuda_emu error [%s]: ", where().c_str());
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

inline void on_fault(int sig, siginfo_t* si, void*) {
  char buf[320];
  const int n = std::snprintf(buf, sizeof(buf),
                              "cuda_emu: %s at address %p [%s]: an out-of-bounds access (guard page) or a bad "
                              "pointer\n",
                              sig == SIGSEGV ? "segmentation fault" : "bus error", si->si_addr, where().c_str());
  if (n > 0) {
    ssize_t w = write(2, buf, size_t(n) < sizeof(buf) ? size_t(n) : sizeof(buf) - 1);
    (void)w;
  }
  signal(sig, SIG_DFL);
  raise(sig);
}
inline void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
  });
}

inline void set_thread(unsigned t) {
  threadIdx.x = t % blockDim.x;
  threadIdx.y = (t / blockDim.x) % blockDim.y;
  threadIdx.z = t / (blockDim.x * blockDim.y);
}

inline bool runnable(const Fiber& f) { return !f.done && (f.wait_gen == nullptr || *f.wait_gen != f.wait_val); }

// The fiber to run when fiber `from` blocks: the next runnable lane of its warp (wrapping around),
// else the first runnable lane of the next warp, in increasing warp order or (b.reverse) decreasing.
// So a warp runs ahead of the others until __syncthreads (or its exit) stops it, the way a warp may
// on the GPU: reading data another warp has not written yet, or overwriting data other warps still
// read, without a __syncthreads in between gives wrong results instead of passing by luck. Launches
// and blocks alternate the two warp orders. -1: nothing can run (deadlock).
inline int pick_next(const Block& b, unsigned from) {
  const unsigned nw = b.nthreads / 32, w0 = from >> 5, l0 = from & 31;
  for (unsigned i = 1; i <= 32; ++i) {
    const unsigned t = w0 * 32 + ((l0 + i) & 31);
    if (runnable(b.fibers[t])) return int(t);
  }
  for (unsigned j = 1; j < nw; ++j) {
    const unsigned w = b.reverse ? (w0 + nw - j) % nw : (w0 + j) % nw;
    for (unsigned l = 0; l < 32; ++l)
      if (runnable(b.fibers[w * 32 + l])) return int(w * 32 + l);
  }
  return -1;
}

[[noreturn]] inline void deadlock(const char* event) {
  Block& b = block();
  std::string s;
  unsigned exited = 0, at_bar = 0;
  for (unsigned t = 0; t < b.nthreads; ++t) {
    if (b.fibers[t].done) ++exited;
    else if (b.fibers[t].waits_in && std::strcmp(b.fibers[t].waits_in, "__syncthreads") == 0) ++at_bar;
  }
  for (unsigned w = 0; w < b.warps.size(); ++w)
    if (b.warps[w].arrived)
      s += " warp " + std::to_string(w) + ": " + std::to_string(b.warps[w].arrived) + " lanes in " + b.warps[w].op +
           ";";
  fail("deadlock after %s: every live thread waits and no barrier can complete (%u threads at __syncthreads, %u "
       "exited;%s)",
       event, at_bar, exited, s.c_str());
}

// Switch to the next runnable fiber (see pick_next); returns when this fiber is resumed.
inline void yield(const char* event) {
  Block& b = block();
  const unsigned from = b.cur;
  const int to = pick_next(b, from);
  if (to < 0) deadlock(event);
  if (unsigned(to) == from) return;
  b.cur = unsigned(to);
  set_thread(unsigned(to));
  switch_context(b.fibers[from].ctx, b.fibers[unsigned(to)].ctx);
}

// Block until the barrier generation `gen` moves on.
inline void wait_on(const unsigned& gen, const char* what) {
  Fiber& f = fiber();
  f.wait_gen = &gen;
  f.wait_val = gen;
  f.waits_in = what;
  while (gen == f.wait_val) yield(what);
  f.wait_gen = nullptr;
  f.waits_in = nullptr;
}

inline void block_barrier() {
  Block& b = block();
  if (++b.bar_arrived == b.nthreads) {
    b.bar_arrived = 0;
    ++b.bar_gen;
    return;
  }
  wait_on(b.bar_gen, "__syncthreads");
}

// A warp-synchronous operation: every lane contributes `in`; the last lane to arrive runs
// compute(ins[32], outs[32]); every lane returns its outs[lane].
template <typename Out, typename In, typename F>
inline Out warp_collective(const char* op, const In& in, F&& compute) {
  static_assert(sizeof(In) <= kLaneIn && sizeof(Out) <= kLaneOut, "warp_collective: lane payload too large");
  static_assert(std::is_trivially_copyable_v<In> && std::is_trivially_copyable_v<Out>);
  Block& b = block();
  const unsigned lane = b.cur & 31;
  Warp& w = b.warps[b.cur >> 5];
  const unsigned ph = w.gen & 1;
  if (w.arrived == 0) w.op = op;
  else if (std::strcmp(w.op, op) != 0)
    fail("divergent warp: this lane reached %s while %u lanes of its warp wait in %s", op, w.arrived, w.op);
  std::memcpy(w.in[ph][lane], &in, sizeof(In));
  if (++w.arrived == 32) {
    In ins[32];
    Out outs[32];
    for (int l = 0; l < 32; ++l) std::memcpy(&ins[l], w.in[ph][l], sizeof(In));
    compute(ins, outs);
    for (int l = 0; l < 32; ++l) std::memcpy(w.out[ph][l], &outs[l], sizeof(Out));
    w.arrived = 0;
    ++w.gen;
  } else {
    wait_on(w.gen, op);
  }
  Out r;
  std::memcpy(&r, w.out[ph][lane], sizeof(Out));
  return r;
}

inline void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const Block& b = block();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < b.smem || c + bytes > b.smem + b.smem_bytes)
    fail("%s: address %p (%zu bytes) is outside the block's dynamic shared memory [%p, +%zu)", what, p, bytes,
         static_cast<const void*>(b.smem), b.smem_bytes);
  if (reinterpret_cast<uintptr_t>(p) % align != 0)
    fail("%s: shared address %p is not %zu-byte aligned", what, p, align);
}

[[noreturn]] inline void fiber_exit();
inline void fiber_entry() {
  (*tl_worker->body)();
  fiber_exit();
}
inline void fiber_exit() {
  Block& b = block();
  Fiber& f = fiber();
  if (f.copies.pending())
    fail("thread exits with cp.async copies still pending (no cp.async.wait_group 0 after the last commit)");
  if (f.wgmmas.pending())
    fail("thread exits with wgmma operations still pending (no wgmma.wait_group 0 after the last commit)");
  f.done = true;
  if (--b.live == 0) switch_context(f.ctx, tl_worker->main);
  else yield("a thread exited");
  fail("an exited thread was resumed");
}

inline void run_block(Worker& w, uint3 idx, bool reverse) {
  Block& b = w.blk;
  b.idx = idx;
  b.bar_arrived = b.bar_gen = 0;
  b.live = b.nthreads;
  b.reverse = reverse;
  for (auto& wp : b.warps) {
    wp.arrived = wp.gen = 0;
    wp.op = nullptr;
  }
  std::memset(b.smem, 0xFF, b.smem_bytes);  // "uninitialised" shared memory: NaN floats, -1 integers
  b.wgmma_issued.clear();
  const size_t slot = kStackBytes + page_bytes();
  for (unsigned t = 0; t < b.nthreads; ++t) {
    Fiber& f = b.fibers[t];
    f.done = false;
    f.wait_gen = nullptr;
    f.waits_in = nullptr;
    f.copies.clear();
    f.wgmmas.clear();
    f.wg_count = 0;
    make_context(f.ctx, w.stacks + t * slot + page_bytes(), kStackBytes, fiber_entry);
  }
  blockIdx = idx;
  b.cur = reverse ? b.nthreads - 32 : 0;  // lane 0 of the first warp in the block's warp order
  set_thread(b.cur);
  switch_context(w.main, b.fibers[b.cur].ctx);
  if (!w.smem.canaries_intact()) fail("shared memory written below its start or past its end");
}

}  // namespace detail

// ================================================================ shared memory
// The block's dynamic shared memory (the emulator seam for `extern __shared__ unsigned char smem[]`).
inline unsigned char* dynamic_smem() { return detail::block().smem; }

// ================================================================ PTX instructions
// ldmatrix.sync.aligned.m8n8.x4.shared.b16 r, [p]: lanes 8j .. 8j + 7 give the row addresses (16
// bytes each, 16-byte aligned) of 8x8 b16 matrix j; lane L receives in r[j] the 32 bits at byte
// 4 (L % 4) of row L / 4 of matrix j.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  detail::check_smem(p, 16, 16, "ldmatrix row address");
  struct Out {
    uint32_t r[4];
  };
  const Out o = detail::warp_collective<Out>("ldmatrix.x4", p, [](const void* const (&rows)[32], Out (&outs)[32]) {
    for (int l = 0; l < 32; ++l)
      for (int j = 0; j < 4; ++j)
        std::memcpy(&outs[l].r[j], static_cast<const unsigned char*>(rows[8 * j + l / 4]) + 4 * (l % 4), 4);
  });
  for (int j = 0; j < 4; ++j) r[j] = o.r[j];
}

// cp.async.cg.shared.global [dst], [src], bytes, src_bytes: copies src_bytes bytes and zero-fills the
// rest of the `bytes` (4, 8 or 16; dst and src aligned to it). Deferred: lands when wait_group
// retires its commit group.
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) detail::fail("cp.async: cp-size %d is not 4, 8 or 16", bytes);
  if (src_bytes < 0 || src_bytes > bytes) detail::fail("cp.async: src-size %d outside [0, %d]", src_bytes, bytes);
  detail::check_smem(dst, size_t(bytes), size_t(bytes), "cp.async destination");
  if (reinterpret_cast<uintptr_t>(src) % unsigned(bytes) != 0)
    detail::fail("cp.async: global source %p is not %d-byte aligned", src, bytes);
  detail::fiber().copies.issue(
      {static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), bytes, src_bytes});
}
inline void cp_async_commit() { detail::fiber().copies.commit(); }
// cp.async.wait_group n: all but the n most recent committed groups of this thread have landed.
inline void cp_async_wait(int n) {
  detail::fiber().copies.retire(size_t(n), [](const detail::Copy& c) {
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, size_t(c.src_bytes));
    std::memset(c.dst + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
  });
}

namespace detail {
struct MmaIn {
  uint32_t a[4], b[2], c[4];
};
struct MmaOut {
  uint32_t d[4];
};
// The m16n8k32 fragments of 8-bit A (16 x 32, row-major) and B (32 x 8, column-major) held by the
// 32 lanes -> A[m][k], Bt[n][k]. PTX ISA (gid = lane >> 2, tig = lane & 3, a_i = byte i % 4 of
// register i / 4): A: row gid for a0..a3 and a8..a11, gid + 8 for a4..a7 and a12..a15; column
// 4 tig + (i % 4) for i < 8, + 16 for i >= 8. B: row (k) 4 tig + (i % 4) for b0..b3, + 16 for
// b4..b7; column gid.
template <typename T, typename Dec>
inline void gather_m16n8k32(const MmaIn (&in)[32], T (&A)[16][32], T (&Bt)[8][32], Dec dec) {
  for (int l = 0; l < 32; ++l) {
    const int gid = l >> 2, tig = l & 3;
    for (int i = 0; i < 16; ++i) {
      const uint8_t v = uint8_t(in[l].a[i / 4] >> (8 * (i % 4)));
      A[gid + 8 * ((i / 4) & 1)][4 * tig + (i % 4) + 16 * (i / 8)] = dec(v);
    }
    for (int i = 0; i < 8; ++i) {
      const uint8_t v = uint8_t(in[l].b[i / 4] >> (8 * (i % 4)));
      Bt[gid][4 * tig + (i % 4) + 16 * (i / 4)] = dec(v);
    }
  }
}
// A (16 x 64) and B^T (8 x 64) of a 4-bit m16n8k64 MMA (PTX ISA, "Matrix fragments for
// mma.m16n8k64", .s4 / .u4): element i of a register is bits 4i .. 4i + 3; a0 = (row gid,
// k = 8 tig + i), a1 = (gid + 8, same k), a2 = (gid, 32 + 8 tig + i), a3 = (gid + 8, 32 + 8 tig + i);
// b0 = (k = 8 tig + i, n = gid), b1 = (k = 32 + 8 tig + i, gid).
template <typename T, typename Dec>
inline void gather_m16n8k64_4bit(const MmaIn (&in)[32], T (&A)[16][64], T (&Bt)[8][64], Dec dec) {
  for (int l = 0; l < 32; ++l) {
    const int gid = l >> 2, tig = l & 3;
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 8; ++i)
        A[gid + 8 * (r & 1)][8 * tig + i + 32 * (r >> 1)] = dec(uint8_t((in[l].a[r] >> (4 * i)) & 15u));
    for (int r = 0; r < 2; ++r)
      for (int i = 0; i < 8; ++i) Bt[gid][8 * tig + i + 32 * r] = dec(uint8_t((in[l].b[r] >> (4 * i)) & 15u));
  }
}
// C/D (16 x 8): c0, c1 at row gid, columns 2 tig, 2 tig + 1; c2, c3 at row gid + 8.
inline int mma_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
inline int mma_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// e4m3 (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; S.1111.111 is NaN, no infinities).
inline double e4m3_value(uint8_t v) {
  const int e = (v >> 3) & 15, m = v & 7;
  double x;
  if (e == 15 && m == 7) x = NAN;
  else if (e == 0) x = std::ldexp(double(m), -9);
  else x = std::ldexp(double(8 + m), e - 10);
  return (v & 0x80) ? -x : x;
}
}  // namespace detail

namespace detail {
// An integer m16n8kK MMA, d = A B + c with int32 wrap-around accumulation, on the A (16 x K) and
// B^T (8 x K) matrices that gather(ins, A, Bt) assembles from the 32 lanes' registers.
template <int K, typename Gather>
inline void int_mma(const char* op, int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const int (&c)[4],
                    Gather gather) {
  MmaIn in;
  for (int i = 0; i < 4; ++i) {
    in.a[i] = a[i];
    in.c[i] = uint32_t(c[i]);
  }
  in.b[0] = b[0];
  in.b[1] = b[1];
  const MmaOut o = warp_collective<MmaOut>(op, in, [gather](const MmaIn (&ins)[32], MmaOut (&outs)[32]) {
    int32_t A[16][K], Bt[8][K];
    gather(ins, A, Bt);
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) {
        const int r = mma_row(l, i), n = mma_col(l, i);
        int32_t s = 0;
        for (int k = 0; k < K; ++k) s += A[r][k] * Bt[n][k];  // |s| <= 32 * 2^14 (s8), 64 * 64 (s4)
        outs[l].d[i] = ins[l].c[i] + uint32_t(s);
      }
  });
  for (int i = 0; i < 4; ++i) d[i] = int(o.d[i]);
}
}  // namespace detail

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 d, a, b, c (int32 wrap-around accumulation).
inline void mma_m16n8k32_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const int (&c)[4]) {
  detail::int_mma<32>("mma.m16n8k32.s8", d, a, b, c,
                      [](const detail::MmaIn (&ins)[32], int32_t (&A)[16][32], int32_t (&Bt)[8][32]) {
                        detail::gather_m16n8k32(ins, A, Bt, [](uint8_t v) { return int32_t(int8_t(v)); });
                      });
}

// mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 d, a, b, c (sm_80+; int32 wrap-around accumulation).
inline void mma_m16n8k64_s4(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const int (&c)[4]) {
  if (detail::tl_device_sm < 80)
    detail::fail("mma .s4 needs sm_80+, the launch's device is sm_%d", detail::tl_device_sm);
  detail::int_mma<64>("mma.m16n8k64.s4", d, a, b, c,
                      [](const detail::MmaIn (&ins)[32], int32_t (&A)[16][64], int32_t (&Bt)[8][64]) {
                        detail::gather_m16n8k64_4bit(ins, A, Bt,
                                                     [](uint8_t v) { return int32_t(v) - ((v & 8) ? 16 : 0); });
                      });
}

// mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 d, a, b, c (sm_89+): the exact k-step sum
// plus c, rounded once to fp32.
inline void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  if (detail::tl_device_sm < 89)
    detail::fail("mma .e4m3 needs sm_89+, the launch's device is sm_%d", detail::tl_device_sm);
  detail::MmaIn in;
  for (int i = 0; i < 4; ++i) {
    in.a[i] = a[i];
    std::memcpy(&in.c[i], &c[i], 4);
  }
  in.b[0] = b[0];
  in.b[1] = b[1];
  const detail::MmaOut o = detail::warp_collective<detail::MmaOut>(
      "mma.m16n8k32.e4m3", in, [](const detail::MmaIn (&ins)[32], detail::MmaOut (&outs)[32]) {
        double A[16][32], Bt[8][32];
        detail::gather_m16n8k32(ins, A, Bt, detail::e4m3_value);
        for (int l = 0; l < 32; ++l)
          for (int i = 0; i < 4; ++i) {
            const int r = detail::mma_row(l, i), n = detail::mma_col(l, i);
            float cf;
            std::memcpy(&cf, &ins[l].c[i], 4);
            double s = double(cf);  // products of e4m3 values and their sums are exact in double
            for (int k = 0; k < 32; ++k) s += A[r][k] * Bt[n][k];
            const float df = float(s);
            std::memcpy(&outs[l].d[i], &df, 4);
          }
      });
  for (int i = 0; i < 4; ++i) std::memcpy(&d[i], &o.d[i], 4);
}

// ================================================================ warpgroup MMA (sm_90a)
// wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 d, a-desc, b-desc, scale-d, 1, 1, 0, 0: A (64 x 16)
// and B (16 x 128, stored as 128 x 16) in shared memory, both K-major, without swizzle or with the
// 128-byte swizzle (layout type 1, see wgmma_operands), described by
// 64-bit matrix descriptors (PTX ISA, "Matrix Descriptor Format": start address, leading-dimension
// byte offset LBO = distance between core matrices adjacent along K, stride-dimension byte offset
// SBO = distance between 8-row blocks, in 16-byte units in bits 0-13, 16-29, 32-45; base offset bits
// 49-51 must be 0 here, layout type in bits 62-63). A core matrix is 8 rows x 16 bytes (8 f16),
// its rows 16 bytes apart. Accumulators (PTX ISA, "wgmma D fragment", warp q of the warpgroup,
// gid = lane >> 2, tig = lane & 3): d[4 j + 2 h + e] = D[16 q + gid + 8 h][8 j + 2 tig + e].
// Deferred like cp.async: d is written only when wgmma.wait_group retires the commit group, so
// reading d too early gives wrong results; the operands this thread's part reads are recorded when
// the instruction is issued and read again at the wait: if shared memory changed in between (the
// tiles overwritten before the wait, or still being written by other threads when it was issued,
// i.e. a missing barrier), the emulator stops with an error; so does a wgmma whose descriptors or
// scale-d differ between the threads of its warpgroup. The k-step sum is exact (double) plus d,
// rounded once.
// Shared addresses in descriptors are offsets from the block's dynamic shared memory (smem_offset).
inline uint32_t smem_offset(const void* p) {
  detail::check_smem(p, 1, 1, "shared address");
  return uint32_t(static_cast<const unsigned char*>(p) - detail::block().smem);
}
inline void wgmma_fence() {}
inline void fence_proxy_async() {}
namespace detail {
// The operand values the calling thread's accumulators depend on: A rows 16 q + gid (+ 8), B rows
// (columns of D) 8 j + 2 tig + e, k = 0..15, decoded from the descriptors.
inline void wgmma_operands(const WgmmaOp& op, double (&A)[2][16], double (&B)[32][16]) {
  const unsigned t = threadIdx.x, lane = t & 31, q = (t >> 5) & 3, gid = lane >> 2, tig = lane & 3;
  auto elem = [](uint64_t desc, int row, int k) {
    const unsigned mode = unsigned(desc >> 62);
    if (((desc >> 49) & 7) != 0 || mode > 1)
      fail("wgmma: descriptor %#llx has a base offset or a 64 / 32-byte swizzle (not emulated)",
           (unsigned long long)desc);
    const size_t start = size_t(desc & 0x3FFF) << 4, lbo = size_t((desc >> 16) & 0x3FFF) << 4,
                 sbo = size_t((desc >> 32) & 0x3FFF) << 4;
    size_t off;
    if (mode == 0) {
      off = start + size_t(row >> 3) * sbo + size_t(k >> 3) * lbo + size_t(row & 7) * 16 + size_t(k & 7) * 2;
    } else {
      // 128-byte swizzle, K-major: rows of 128 bytes, 8-row atoms SBO apart (LBO unused); the 16-byte
      // chunk bits 4-6 of the address are XORed with its bits 7-9 (the row within the atom). The
      // address is the offset in the block's shared memory, whose base the emulator puts at 0 (a
      // kernel aligns its tiles to 1024 bytes, as the hardware's absolute-address XOR requires).
      if (sbo != 1024) fail("wgmma: 128-byte swizzle descriptor %#llx with SBO %zu (emulated: 1024)",
                            (unsigned long long)desc, sbo);
      off = start + size_t(row >> 3) * sbo + size_t(row & 7) * 128 + size_t(k) * 2;
      off ^= ((off >> 7) & 7) << 4;
    }
    const unsigned char* p = block().smem + off;
    check_smem(p, 2, 2, "wgmma operand");
    __half_raw h;
    std::memcpy(&h.x, p, 2);
    return double(__half2float(__half(h)));
  };
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 16; ++k) A[h][k] = elem(op.da, int(16 * q + gid + 8 * h), k);
  for (int j = 0; j < 16; ++j)
    for (int e = 0; e < 2; ++e)
      for (int k = 0; k < 16; ++k) B[2 * j + e][k] = elem(op.db, int(8 * j + 2 * tig + e), k);
}
}  // namespace detail
inline void wgmma_m64n128k16_f16(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  if (detail::tl_device_sm != 90)
    detail::fail("wgmma needs sm_90a, the launch's device is sm_%d", detail::tl_device_sm);
  if (blockDim.x % 128 != 0 || blockDim.y != 1 || blockDim.z != 1)
    detail::fail("wgmma: the block (%u x %u x %u) is not made of whole warpgroups", blockDim.x, blockDim.y, blockDim.z);
  {
    detail::Block& b = detail::block();
    const auto key = std::make_pair(unsigned(threadIdx.x / 128), detail::fiber().wg_count++);
    const auto val = std::make_tuple(da, db, scale_d != 0);
    auto it = b.wgmma_issued.find(key);
    if (it == b.wgmma_issued.end()) b.wgmma_issued.emplace(key, val);
    else if (it->second != val)
      detail::fail("wgmma #%llu of warpgroup %u: descriptors / scale-d differ between its threads",
                   (unsigned long long)key.second, key.first);
  }
  detail::WgmmaOp op{d, da, db, scale_d, {}, {}};
  detail::wgmma_operands(op, op.A, op.B);
  detail::fiber().wgmmas.issue(op);
}
inline void wgmma_commit() { detail::fiber().wgmmas.commit(); }
namespace detail {
inline void wgmma_run(const WgmmaOp& op) {
  double A[2][16], B[32][16];
  wgmma_operands(op, A, B);
  if (std::memcmp(A, op.A, sizeof(A)) != 0 || std::memcmp(B, op.B, sizeof(B)) != 0)
    fail("wgmma: its shared-memory operands changed between issue and wgmma.wait_group (overwritten too early, "
         "or not yet complete when it was issued: a missing barrier)");
  for (int j = 0; j < 16; ++j)
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 2; ++e) {
        float& D = op.d[4 * j + 2 * h + e];
        double s = op.scale_d ? double(D) : 0.0;
        for (int k = 0; k < 16; ++k) s += A[h][k] * B[2 * j + e][k];
        D = float(s);
      }
}
}  // namespace detail
// wgmma.wait_group n: all but the n most recent committed groups of this thread have completed.
inline void wgmma_wait(int n) { detail::fiber().wgmmas.retire(size_t(n), detail::wgmma_run); }

// ================================================================ launch
namespace detail {
inline std::map<std::pair<int, const void*>, int>& func_max_dyn_smem() {
  static std::map<std::pair<int, const void*>, int> m;
  return m;
}
inline std::mutex& api_mutex() {
  static std::mutex m;
  return m;
}

inline void run_grid(const void* func, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  const int dev = current_device();
  int limit = device(dev).smem_per_block;
  {
    std::lock_guard<std::mutex> lk(api_mutex());
    auto it = func_max_dyn_smem().find({dev, func});
    if (it != func_max_dyn_smem().end()) limit = std::max(limit, it->second);
  }
  if (smem > size_t(limit)) {
    last_error() = cudaErrorInvalidValue;
    return;
  }
  if (nthreads % 32 != 0)
    fail("launch: the emulator needs whole warps (block of %llu threads)", (unsigned long long)nthreads);
  const uint64_t launch_seq = launches().size();
  launches().push_back({func, grid, block, smem});
  install_fault_handler();

  unsigned nworkers = std::max(1u, std::thread::hardware_concurrency());
  if (const char* e = std::getenv("CUDA_EMU_WORKERS")) nworkers = unsigned(std::max(1, std::atoi(e)));
  nworkers = unsigned(std::min<uint64_t>(nworkers, nblocks));
  std::atomic<uint64_t> next{0};
  const int sm = device(dev).sm;
  auto work = [&] {
    Worker w;
    tl_worker = &w;
    tl_device_sm = sm;
    blockDim = block;
    gridDim = grid;
    w.altstack.resize(64 * 1024);
    stack_t ss;
    ss.ss_sp = w.altstack.data();
    ss.ss_size = w.altstack.size();
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
    const size_t pg = page_bytes(), slot = kStackBytes + pg;
    w.stacks_bytes = size_t(nthreads) * slot;
    void* m = mmap(nullptr, w.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fail("mmap of the fiber stacks failed");
    w.stacks = static_cast<unsigned char*>(m);
    for (uint64_t t = 0; t < nthreads; ++t) mprotect(w.stacks + t * slot, pg, PROT_NONE);  // guard below each stack
    w.smem.alloc(smem, 16, 0);
    w.body = &body;
    Block& b = w.blk;
    b.nthreads = unsigned(nthreads);
    b.fibers.resize(nthreads);
    b.warps.resize(nthreads / 32);
    b.smem = w.smem.base();
    b.smem_bytes = smem;
    for (uint64_t i; (i = next.fetch_add(1)) < nblocks;) {
      const uint3 idx{unsigned(i % grid.x), unsigned((i / grid.x) % grid.y), unsigned(i / (uint64_t(grid.x) * grid.y))};
      run_block(w, idx, ((launch_seq + i) & 1) != 0);
    }
    munmap(w.stacks, w.stacks_bytes);
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
    tl_worker = nullptr;
  };
  if (nworkers == 1) {
    work();
  } else {
    std::vector<std::thread> ths;
    for (unsigned i = 0; i < nworkers; ++i) ths.emplace_back(work);
    for (auto& t : ths) t.join();
  }
}
}  // namespace detail

// The emulator seam for kernel<<<grid, block, smem, stream>>>(args...): runs the grid to completion
// before returning (the stream is ignored); launch errors go to cudaGetLastError.
template <typename... P, typename... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "cuda_emu::launch: wrong number of kernel arguments");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  detail::run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, body);
}

// ================================================================ test memory
// Device-memory stand-in for tests: `bytes` bytes at a base address with base % align == offset,
// ending less than `align` bytes before an inaccessible page (exactly at it when the sizes allow:
// use the element size as `align` to catch reads one element past the end), with another
// inaccessible page below. The slack around the data holds a canary. Accesses past the end fault
// (reported with block / thread); intact() is false after writes into the slack.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t bytes, size_t align = 16, size_t offset = 0) : r_(bytes, align, offset) {}
  unsigned char* data() const { return r_.base(); }
  size_t size() const { return r_.bytes(); }
  template <typename T> T* as() const { return reinterpret_cast<T*>(r_.base()); }
  void fill(unsigned char v) { std::memset(r_.base(), v, r_.bytes()); }
  void copy_from(const void* src, size_t n) {
    if (n > r_.bytes()) detail::fail("Buffer::copy_from: %zu bytes into %zu", n, r_.bytes());
    if (n) std::memcpy(r_.base(), src, n);
  }
  bool intact() const { return r_.canaries_intact(); }

 private:
  detail::GuardedRegion r_;
};

}  // namespace cuda_emu

// ================================================================ device built-in functions
inline void __syncthreads() { cuda_emu::detail::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  if (mask != 0xFFFFFFFFu) cuda_emu::detail::fail("__syncwarp: only the full mask is emulated");
  struct None {
    char c;
  };
  cuda_emu::detail::warp_collective<None>("__syncwarp", None{0}, [](const None (&)[32], None (&)[32]) {});
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "__shfl_xor_sync: 4- or 8-byte types");
  if (mask != 0xFFFFFFFFu) cuda_emu::detail::fail("__shfl_xor_sync: only the full mask is emulated");
  if (width != 32) cuda_emu::detail::fail("__shfl_xor_sync: only width 32 is emulated");
  struct In {
    T v;
    int m;
  };
  struct Out {
    T v;
  };
  auto exchange = [](const In (&ins)[32], Out (&outs)[32]) {
    for (int l = 0; l < 32; ++l) {
      if (ins[l].m != ins[0].m)
        cuda_emu::detail::fail("__shfl_xor_sync: lanes disagree on the lane mask (divergent warp?)");
      outs[l].v = ins[(l ^ ins[l].m) & 31].v;
    }
  };
  return cuda_emu::detail::warp_collective<Out>("__shfl_xor_sync", In{var, lane_mask}, exchange).v;
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "__shfl_sync: 4- or 8-byte types");
  if (mask != 0xFFFFFFFFu || width != 32) cuda_emu::detail::fail("__shfl_sync: only the full mask and width 32");
  struct In {
    T v;
    int s;
  };
  struct Out {
    T v;
  };
  auto exchange = [](const In (&ins)[32], Out (&outs)[32]) {
    for (int l = 0; l < 32; ++l) outs[l].v = ins[ins[l].s & 31].v;
  };
  return cuda_emu::detail::warp_collective<Out>("__shfl_sync", In{var, src_lane}, exchange).v;
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "__shfl_up_sync: 4- or 8-byte types");
  if (mask != 0xFFFFFFFFu || width != 32) cuda_emu::detail::fail("__shfl_up_sync: only the full mask and width 32");
  struct In {
    T v;
    unsigned d;
  };
  struct Out {
    T v;
  };
  auto exchange = [](const In (&ins)[32], Out (&outs)[32]) {  // lanes below delta keep their own value
    for (unsigned l = 0; l < 32; ++l) {
      if (ins[l].d != ins[0].d) cuda_emu::detail::fail("__shfl_up_sync: lanes disagree on delta (divergent warp?)");
      outs[l].v = l >= ins[l].d ? ins[l - ins[l].d].v : ins[l].v;
    }
  };
  return cuda_emu::detail::warp_collective<Out>("__shfl_up_sync", In{var, delta}, exchange).v;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xFFFFFFFFu) cuda_emu::detail::fail("__ballot_sync: only the full mask is emulated");
  struct In {
    int p;
  };
  struct Out {
    unsigned b;
  };
  auto vote = [](const In (&ins)[32], Out (&outs)[32]) {
    unsigned b = 0;
    for (int l = 0; l < 32; ++l) b |= unsigned(ins[l].p != 0) << l;
    for (int l = 0; l < 32; ++l) outs[l].b = b;
  };
  return cuda_emu::detail::warp_collective<Out>("__ballot_sync", In{pred}, vote).b;
}
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "__shfl_down_sync: 4- or 8-byte types");
  if (mask != 0xFFFFFFFFu || width != 32) cuda_emu::detail::fail("__shfl_down_sync: only the full mask and width 32");
  struct In {
    T v;
    unsigned d;
  };
  struct Out {
    T v;
  };
  auto exchange = [](const In (&ins)[32], Out (&outs)[32]) {
    for (int l = 0; l < 32; ++l) {
      if (ins[l].d != ins[0].d)
        cuda_emu::detail::fail("__shfl_down_sync: lanes disagree on the delta (divergent warp?)");
      const unsigned src = unsigned(l) + ins[l].d;
      outs[l].v = src < 32 ? ins[src].v : ins[l].v;  // lanes past the end keep their own value
    }
  };
  return cuda_emu::detail::warp_collective<Out>("__shfl_down_sync", In{var, delta}, exchange).v;
}
inline int atomicMax(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
// (stores are visible at once here; the fence only orders the worker threads' accesses)
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline float atomicAdd(float* p, float v) {
  std::atomic_ref<float> a(*p);
  float old = a.load();
  while (!a.compare_exchange_weak(old, old + v)) {
  }
  return old;
}
[[noreturn]] inline void __trap() { cuda_emu::detail::fail("__trap()"); }
template <typename T> inline T __ldg(const T* p) { return *p; }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __int2float_rn(int v) { return float(v); }
inline int __float2int_rn(float v) { return int(std::nearbyint(v)); }
inline float __double2float_rn(double v) { return float(v); }
inline long long __double2ll_rn(double v) { return static_cast<long long>(std::nearbyint(v)); }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }

// ================================================================ emulated CUDA runtime
// (definitions of the C API declared by cuda_runtime_api.h; one translation unit per executable)
extern "C" cudaError_t cudaGetDevice(int* d) {
  *d = cuda_emu::current_device();
  return cudaSuccess;
}
extern "C" cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= cuda_emu::kMaxDevices) return cudaErrorInvalidDevice;
  cuda_emu::current_device() = d;
  return cudaSuccess;
}
extern "C" cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int dev) {
  if (dev < 0 || dev >= cuda_emu::kMaxDevices) return cudaErrorInvalidDevice;
  const cuda_emu::Device& d = cuda_emu::device(dev);
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = d.smem_per_block; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.sm / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.sm % 10; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    default: cuda_emu::detail::fail("cudaDeviceGetAttribute: attribute %d is not emulated", int(attr));
  }
}
extern "C" cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize)
    cuda_emu::detail::fail("cudaFuncSetAttribute: attribute %d is not emulated", int(attr));
  const int dev = cuda_emu::current_device();
  if (value < 0 || value > cuda_emu::device(dev).smem_optin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(cuda_emu::detail::api_mutex());
  cuda_emu::detail::func_max_dyn_smem()[{dev, func}] = value;
  return cudaSuccess;
}
extern "C" cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void* func) {
  std::memset(attr, 0, sizeof(*attr));
  const int dev = cuda_emu::current_device();
  attr->ptxVersion = cuda_emu::device(dev).sm;
  attr->binaryVersion = cuda_emu::device(dev).sm;
  attr->maxThreadsPerBlock = 1024;
  std::lock_guard<std::mutex> lk(cuda_emu::detail::api_mutex());
  auto it = cuda_emu::detail::func_max_dyn_smem().find({dev, func});
  attr->maxDynamicSharedSizeBytes =
      it != cuda_emu::detail::func_max_dyn_smem().end() ? it->second : cuda_emu::device(dev).smem_per_block;
  return cudaSuccess;
}
// The C++ overloads taking a kernel pointer (cuda_runtime.h declares them for nvcc only).
template <class T>
inline cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, T* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, enum cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
extern "C" cudaError_t cudaGetLastError(void) {
  const cudaError_t e = cuda_emu::last_error();
  cuda_emu::last_error() = cudaSuccess;
  return e;
}
extern "C" cudaError_t cudaPeekAtLastError(void) { return cuda_emu::last_error(); }
extern "C" const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    default: return "cudaError(other)";
  }
}
extern "C" const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
