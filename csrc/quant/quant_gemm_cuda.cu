// W4A4 / W8A8 quantized GEMM with a fused epilogue, CUDA kernel (sm_80+; fp8 needs sm_89+). Includes
// only CUDA headers. Definition: pydiff/reference/quant.py (quant_gemm_ref); declarations: quant.h.
// Tested without a GPU by csrc/tests/cuda_emu (CPU emulator; the `#ifdef PYDIFF_CUDA_EMU` seams).
//
//   out[m, n] = sum_g sa[m, g] sw[n, g] D[m, n, g] + sum_r lora_act[m, r] lora_up[r, n] + bias[n]
//   D[m, n, g] = sum_{k in group g} qa[m, k] qw[n, k]      (int32, exact, for int4 / int8; fp32 for fp8)
//
// Hardware path. Hopper (sm_90) has no 4-bit tensor-core MMA (mma .s4 is emulated there, ~23x slower
// than .s8), so int4 data stays packed in memory and in shared memory, is sign-extended to int8 in
// registers, and runs on the INT8 tensor cores: mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32
// (every int4 x int4 product is exact in it). int8 uses the same instruction; fp8 e4m3 uses
// mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 (sm_89+; the host side refuses fp8 with
// cudaErrorNotSupported when the kernel image was not compiled for sm_89+). SASS for sm_90a (nvcc
// 13.0): int4 and int8 -> IMMA.16832.S8.S8; fp8 -> F2FP.F16.E4M3.UNPACK_B + HMMA.16816.F32 (Hopper's
// mma.sync has no native e4m3 path, only wgmma does; e4m3 -> f16 is exact, so the result is too).
//
// Native int4 (sm_80 / 86 / 87 / 89, groups of a multiple of 64 channels): Ampere and Ada have a real
// 4-bit MMA, mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32, whose fragments are the 8-bit ones
// with twice the elements per register (element i of a register in bits 4i .. 4i + 3, lower index in
// the less significant bits). The packed layout (even channel in the low nibble) is exactly that,
// so the ldmatrix results feed the MMA as they are: no unpacking, one k-step of 64 channels per
// 32-byte slice. Hopper keeps the int8 path (.s4 is emulated there); PYDIFF_CUDA_INT4_MMA=1 / 0
// forces the choice (the tests run the native path on any GPU and on the CPU emulator).
//
// Tiling (one configuration): CTA tile 128 (M) x 128 (N), 256 threads = 8 warps as 2 (M) x 4 (N),
// warp tile 64 x 32 = 4 m16 tiles x 4 n8 tiles. The K loop walks k-tiles of 64 *bytes* per row
// (int8/fp8: 64 channels = 2 MMA k-steps; int4: 128 channels = 4 k-steps), 4-stage cp.async
// pipeline (16-byte cp.async.cg with zero-fill for rows past M / N and bytes past the row end),
// shared-memory rows padded to 80 bytes. Group scaling: the int32 (fp32 for fp8) MMA accumulators
// hold one group's partial sums; after the k-step that ends a group (K % G == 0, G % 32 == 0, so
// every group is a whole number of 32-channel k-steps) each thread folds them into fp32:
//   acc += float(D) * (sa[m, g] * sw[n, g]), D := 0.
// Epilogue: the low-rank branch (lora_act / lora_up staged through shared memory, 32 ranks at a
// time), the bias, conversion to out_dtype, bounds-checked stores. All global offsets are int64.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k32", 8-bit types; lane = 4 * gid + tig,
// gid = lane >> 2, tig = lane & 3):
//   A (16 x 32, row-major), 4 x .b32: reg0 = A[gid][4 tig .. 4 tig + 3], reg1 = A[gid + 8][same],
//       reg2 = A[gid][16 + 4 tig .. +3], reg3 = A[gid + 8][16 + 4 tig .. +3]  (byte i = element i)
//   B (32 x 8, "col": element (k, n) at qw[n][k]), 2 x .b32: reg0 = B[4 tig .. 4 tig + 3][gid],
//       reg1 = B[16 + 4 tig .. +3][gid]
//   C/D (16 x 8), 4 x 32-bit: c0 = (gid, 2 tig), c1 = (gid, 2 tig + 1), c2 = (gid + 8, 2 tig),
//       c3 = (gid + 8, 2 tig + 1)
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j .. 8j + 7 give the 8 row addresses (16 bytes
// each) of matrix j; lane L receives in register j the bytes 4 (L & 3) .. 4 (L & 3) + 3 of row L >> 2
// of matrix j. So with row addresses chosen as below, the registers are exactly the fragments above
// (8-bit data), see a_ldm_row / b_ldm_row.
// int4: a 16-byte row segment of packed data holds 32 channels (one k-step); ldmatrix gives lane
// (gid, tig) the packed bytes 4 tig .. 4 tig + 3 = channels 8 tig .. 8 tig + 7 of its row. The low
// nibbles (channels 8 tig + 2i) become the register for MMA k = 4 tig + i and the high nibbles
// (channels 8 tig + 2i + 1) the register for MMA k = 16 + 4 tig + i. This permutes the 32 channels
// of a k-step identically for A and B (it depends only on tig and i), so the dot product over the
// k-step, and hence over each group, is unchanged.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "pydiff/cuda_types.cuh"
#include "pydiff/quant.h"

namespace pydiff {
namespace {

constexpr int kBM = 128;                        // CTA rows (M)
constexpr int kBN = 128;                        // CTA cols (N)
constexpr int kBKB = 64;                        // k-tile width in bytes of a q row
constexpr int kSRow = kBKB + 16;                // smem row pitch: 80 bytes = 5 x 16 (odd), so the 8
                                                // rows of each ldmatrix 8x8 phase and each cp.async
                                                // quarter-warp hit distinct 16-byte bank groups
constexpr int kStages = 4;
constexpr int kThreads = 256;
constexpr int kStageBytes = (kBM + kBN) * kSRow;  // 20480
constexpr int kLoraR = 32;                        // ranks staged per epilogue round
constexpr int kLaPitch = kLoraR + 1;              // floats; odd pitch: 8 distinct rows -> 8 banks
constexpr int kMaxFlushSteps = 2048;             // 65536 channels: |D| <= 2^30 for int8 (power of 2)
constexpr int kSmemBytes = kStages * kStageBytes;  // 81920 (>= the epilogue's (128*33 + 32*128) * 4)
static_assert((kBM * kLaPitch + kLoraR * kBN) * 4 <= kSmemBytes, "epilogue staging must fit");

// ---------------------------------------------------------------- layout helpers (host + device,
// so tools can simulate the fragment mapping on the CPU)
// ldmatrix.x4 row address for the A operand of one m16 x (32-byte) slice: lanes 0-7 -> rows 0-7,
// bytes 0-15 (matrix 0 = reg0), lanes 8-15 -> rows 8-15, bytes 0-15 (reg1), lanes 16-23 -> rows
// 0-7, bytes 16-31 (reg2), lanes 24-31 -> rows 8-15, bytes 16-31 (reg3).
__host__ __device__ constexpr int a_ldm_row(int lane) { return lane & 15; }
__host__ __device__ constexpr int a_ldm_byte(int lane) { return (lane >> 4) * 16; }
// ldmatrix.x4 row address for the B operand of two n8 tiles x (32-byte) slice: lanes 0-7 -> n 0-7,
// bytes 0-15 (r0 = reg0 of n-tile 0), 8-15 -> n 0-7, bytes 16-31 (r1 = reg1 of n-tile 0), 16-23 ->
// n 8-15, bytes 0-15 (r2 = reg0 of n-tile 1), 24-31 -> n 8-15, bytes 16-31 (r3 = reg1 of n-tile 1).
__host__ __device__ constexpr int b_ldm_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
__host__ __device__ constexpr int b_ldm_byte(int lane) { return ((lane >> 3) & 1) * 16; }
// accumulator element i of lane -> (row, col) within the m16 x n8 tile
__host__ __device__ constexpr int acc_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
__host__ __device__ constexpr int acc_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// Four 4-bit fields in the low nibble of each byte (values 0..15) -> four sign-extended int8 bytes:
// a byte with bit 3 set gets 0xF0 or'ed in ((b & 8) * 30 = 0xF0 per byte; no carries between bytes).
__host__ __device__ inline uint32_t sext_nibbles(uint32_t v) { return v | ((v & 0x08080808u) * 30u); }
// Packed word (bytes p0..p3, two's complement nibbles, even channel low) -> int8 x4 of the low
// nibbles (channels 0, 2, 4, 6 of the 8 in the word) / of the high nibbles (channels 1, 3, 5, 7).
__host__ __device__ inline uint32_t unpack_lo(uint32_t w) { return sext_nibbles(w & 0x0F0F0F0Fu); }
__host__ __device__ inline uint32_t unpack_hi(uint32_t w) { return sext_nibbles((w >> 4) & 0x0F0F0F0Fu); }

// 8-bit data: B fragment of n-tile nt (0..3) from the two ldmatrix.x4 results br[p] (p = nt >> 1).
__host__ __device__ inline void frag8_b(const uint32_t (&br)[2][4], int nt, uint32_t (&b)[2]) {
  b[0] = br[nt >> 1][(nt & 1) * 2 + 0];
  b[1] = br[nt >> 1][(nt & 1) * 2 + 1];
}
// int4 data: one ldmatrix.x4 over a 32-byte slice = 64 channels = k-steps j = 0, 1. ar4: reg0 =
// (row gid, step 0), reg1 = (row gid + 8, step 0), reg2 = (row gid, step 1), reg3 = (row gid + 8, step 1).
__host__ __device__ inline void frag4_a(const uint32_t (&ar4)[4], int j, uint32_t (&a)[4]) {
  a[0] = unpack_lo(ar4[2 * j]);      // row gid,     MMA k = 4 tig + i      <- channels 8 tig + 2i
  a[1] = unpack_lo(ar4[2 * j + 1]);  // row gid + 8, MMA k = 4 tig + i
  a[2] = unpack_hi(ar4[2 * j]);      // row gid,     MMA k = 16 + 4 tig + i <- channels 8 tig + 2i + 1
  a[3] = unpack_hi(ar4[2 * j + 1]);  // row gid + 8, MMA k = 16 + 4 tig + i
}
// int4 B: br[p] = {n-tile 2p step 0, n-tile 2p step 1, n-tile 2p+1 step 0, n-tile 2p+1 step 1}.
__host__ __device__ inline void frag4_b(const uint32_t (&br)[2][4], int nt, int j, uint32_t (&b)[2]) {
  const uint32_t w = br[nt >> 1][(nt & 1) * 2 + j];
  b[0] = unpack_lo(w);  // MMA k = 4 tig + i      <- channel 8 tig + 2i (same map as A)
  b[1] = unpack_hi(w);  // MMA k = 16 + 4 tig + i <- channel 8 tig + 2i + 1
}

// ---------------------------------------------------------------- device primitives
// (inline PTX; left out for the CPU emulator of csrc/tests/cuda_emu, whose test driver supplies
// emulated versions of the same functions)
#ifndef PYDIFF_CUDA_EMU
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// 16 bytes global -> shared; src_bytes 0 writes zeros (the source is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_s4(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  // Not compiled for sm_89+: the host launcher refuses fp8 for such an image (never executed).
  (void)d; (void)a; (void)b;
  __trap();
#endif
}

// Hopper warpgroup MMA (sm_90a only: the instructions need the arch-specific feature set; other
// images trap, and the host never selects the kernel for them, see use_wgmma).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PYDIFF_WGMMA_ASM 1
#endif
__device__ __forceinline__ void wgmma_fence() {
#ifdef PYDIFF_WGMMA_ASM
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef PYDIFF_WGMMA_ASM
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef PYDIFF_WGMMA_ASM
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Shared-memory writes of the generic proxy (st.shared) made visible to the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
#ifdef PYDIFF_WGMMA_ASM
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// The accumulators must not be read or moved by the compiler across the wait (cf. CUTLASS's
// warpgroup_fence_operand).
__device__ __forceinline__ void fence_acc(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// D (64 x 128, fp32) = A (64 x 16, f16, K-major, descriptor da) B (16 x 128: 128 x 16 K-major, db)
// [+ D when scale_d].
__device__ __forceinline__ void wgmma_m64n128k16_f16(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
#ifdef PYDIFF_WGMMA_ASM
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(scale_d));
#else
  (void)d; (void)da; (void)db; (void)scale_d;
  __trap();
#endif
}
#endif  // PYDIFF_CUDA_EMU


template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> struct Pair;
template <> struct Pair<float> { using type = float2; };
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

// int32 group sum -> fp32. Exact via the 1.5 * 2^23 bias trick when |D| <= 2^22 is guaranteed
// (magic); else cvt.rn (exact below 2^24, correctly rounded above).
__device__ __forceinline__ float d_to_f(int d, bool magic) {
  return magic ? __fsub_rn(__int_as_float(d + 0x4B400000), 12582912.0f) : __int2float_rn(d);
}
__device__ __forceinline__ float d_to_f(float d, bool) { return d; }

struct GemmLaunch {
  QuantGemmArgs a;
  int64_t row_bytes;  // bytes of one q row: K / 2 (int4) or K
  int64_t Gn;         // groups per row
  int aligned16;      // qa and qw base pointers 16-byte aligned: cp.async; else synchronous byte loads
  int magic;          // |D| <= 2^22 for every group (see d_to_f)
  int out_pair_ok;    // N even and out 2-element aligned: paired stores
};

// One k-tile (kBKB bytes of BM rows of qa and BN rows of qw) -> shared stage. 2 x 16 bytes of A and
// 2 x 16 bytes of B per thread; chunks of rows past M/N or bytes past the row end are zero-filled.
__device__ __forceinline__ void load_tile(unsigned char* stage, const GemmLaunch& L, int64_t m0, int64_t n0,
                                          int64_t kt, int tid) {
  const unsigned char* qa = static_cast<const unsigned char*>(L.a.qa);
  const unsigned char* qw = static_cast<const unsigned char*>(L.a.qw);
#pragma unroll
  for (int op = 0; op < 2; ++op) {
    const unsigned char* base = op == 0 ? qa : qw;
    const int64_t r0 = op == 0 ? m0 : n0;
    const int64_t rows = op == 0 ? L.a.M : L.a.N;
    unsigned char* s = stage + (op == 0 ? 0 : kBM * kSRow);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads;  // 0..511: row c / 4, 16-byte column c % 4
      const int r = c >> 2, cc = c & 3;
      const int64_t grow = r0 + r;
      const int64_t kb = kt * kBKB + cc * 16;
      const bool valid = grow < rows && kb < L.row_bytes;  // row_bytes % 16 == 0: a chunk is all in or all out
      unsigned char* dst = s + r * kSRow + cc * 16;
      const unsigned char* src = valid ? base + grow * L.row_bytes + kb : base;
      if (L.aligned16) {
        cp_async16(dst, src, valid ? 16 : 0);
      } else {
        uint32_t w[4] = {0u, 0u, 0u, 0u};
        if (valid) {
#pragma unroll
          for (int b = 0; b < 16; ++b) w[b >> 2] |= uint32_t(src[b]) << (8 * (b & 3));
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }
}

// Epilogue pieces shared by both kernels (kBM x kBN tiles). Low-rank round r0: lora_act[m0 .. + kBM,
// r0 .. + kLoraR] -> la_s [kBM][kLaPitch] and lora_up[r0 .. + kLoraR, n0 .. + kBN] -> lu_s [kLoraR][kBN],
// zeros past M / N / R.
__device__ __forceinline__ void stage_lora(float* la_s, float* lu_s, const GemmLaunch& L, int64_t m0, int64_t n0,
                                           int64_t r0, int tid, int nthreads) {
  const int64_t M = L.a.M, N = L.a.N, R = L.a.rank;
  for (int idx = tid; idx < kBM * kLoraR; idx += nthreads) {
    const int row = idx / kLoraR, rr = idx % kLoraR;
    const int64_t m = m0 + row, r = r0 + rr;
    la_s[row * kLaPitch + rr] = (m < M && r < R) ? load_f(L.a.lora_act, m * R + r, L.a.lora_act_dtype) : 0.f;
  }
  for (int idx = tid; idx < kLoraR * kBN; idx += nthreads) {
    const int rr = idx / kBN, c = idx % kBN;
    const int64_t n = n0 + c, r = r0 + rr;
    lu_s[rr * kBN + c] = (n < N && r < R) ? load_f(L.a.lora_up, r * N + n, L.a.lora_up_dtype) : 0.f;
  }
}
// out[m, n] = v0 and, when n + 1 < N, out[m, n + 1] = v1 (n even; paired when aligned).
template <typename TOut>
__device__ __forceinline__ void store_pair(const GemmLaunch& L, int64_t m, int64_t n, float v0, float v1) {
  const int64_t N = L.a.N;
  TOut* o = static_cast<TOut*>(L.a.out) + m * N + n;
  if (L.out_pair_ok && n + 1 < N) {
    typename Pair<TOut>::type pv;
    pv.x = from_f<TOut>(v0);
    pv.y = from_f<TOut>(v1);
    *reinterpret_cast<typename Pair<TOut>::type*>(o) = pv;
  } else {
    o[0] = from_f<TOut>(v0);
    if (n + 1 < N) o[1] = from_f<TOut>(v1);
  }
}

// NATIVE4 (int4 only): the 4-bit MMA on the packed data, k-steps of 64 channels (G % 64 == 0).
template <QuantFormat FMT, typename TOut, bool NATIVE4 = false>
__global__ void __launch_bounds__(kThreads, 1) quant_gemm_kernel(const GemmLaunch L) {
  static_assert(!NATIVE4 || FMT == QuantFormat::kInt4, "the native 4-bit MMA is for int4 data");
  constexpr int kStepCh = NATIVE4 ? 64 : 32;  // channels per MMA k-step
  using DAcc = typename std::conditional<FMT == QuantFormat::kFp8E4M3, float, int>::type;
#ifdef PYDIFF_CUDA_EMU
  unsigned char* smem = cuda_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile rows wm*64 .. +63, cols wn*32 .. +31
  const int64_t M = L.a.M, N = L.a.N, K = L.a.K, G = L.a.group_size, Gn = L.Gn;
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int64_t KT = (L.row_bytes + kBKB - 1) / kBKB;
  const bool magic = L.magic != 0;

  float acc[4][4][4];  // [m-tile][n-tile][c-index]: fp32 result
  DAcc dacc[4][4][4];  // current group's partial sums
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[mt][nt][i] = 0.f;
        dacc[mt][nt][i] = DAcc(0);
      }

  // Rows / cols of this thread's accumulators (acc_row / acc_col): row = m0 + rb + 16 mt + 8 h,
  // col = n0 + cb + 8 nt + j; valid while below mlim / nlim.
  const int rb = wm * 64 + acc_row(lane, 0), cb = wn * 32 + acc_col(lane, 0);
  const int mlim = int(M - m0 < kBM ? M - m0 : kBM), nlim = int(N - n0 < kBN ? N - n0 : kBN);
  const float* sa_base = L.a.sa + (m0 + rb) * Gn;  // + (16 mt + 8 h) Gn + g (only dereferenced when valid)
  const float* sw_base = L.a.sw + (n0 + cb) * Gn;  // + (8 nt + j) Gn + g

  // K-steps are visited in order (k-tile, half, j); a group is G / kStepCh consecutive k-steps.
  const int steps_per_group = int(G / kStepCh);  // the host checks K / 32 < 2^31
  int step_in_group = 0;                    // k-steps of group g done so far
  int64_t g = 0;                            // current group

  // One MMA k-step (kStepCh channels) on fragments a[mt], b[nt]; flush after the last k-step of a group,
  // and every kMaxFlushSteps k-steps inside huge groups (keeps |D| < 2^31 for int8: the partial
  // sums of one group are then scaled and added separately, the same sum).
  auto kstep = [&](const uint32_t (&af)[4][4], const uint32_t (&bf)[4][2]) {
    const bool last = ++step_in_group == steps_per_group;
    const bool flush = last || (step_in_group & (kMaxFlushSteps - 1)) == 0;
    float sa_r[4][2], sw_c[4][2];
    if (flush) {  // issued before the MMAs so the loads overlap them
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = mt * 16 + h * 8;
          sa_r[mt][h] = rb + r < mlim ? __ldg(sa_base + r * Gn + g) : 0.f;
        }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int c = nt * 8 + j;
          sw_c[nt][j] = cb + c < nlim ? __ldg(sw_base + c * Gn + g) : 0.f;
        }
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        if constexpr (FMT == QuantFormat::kFp8E4M3)
          mma_e4m3(dacc[mt][nt], af[mt], bf[nt]);
        else if constexpr (NATIVE4)
          mma_s4(dacc[mt][nt], af[mt], bf[nt]);
        else
          mma_s8(dacc[mt][nt], af[mt], bf[nt]);
      }
    if (flush) {
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float sc = __fmul_rn(sa_r[mt][i >> 1], sw_c[nt][i & 1]);
            acc[mt][nt][i] = __fmaf_rn(d_to_f(dacc[mt][nt][i], magic), sc, acc[mt][nt][i]);
            dacc[mt][nt][i] = DAcc(0);
          }
      if (last) {
        step_in_group = 0;
        ++g;
      }
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_tile(smem + s * kStageBytes, L, m0, n0, s, tid);
    cp_async_commit();
  }

  for (int64_t kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (this thread's copies)
    __syncthreads();               // ... everyone's; and everyone is done with stage (kt - 1) % kStages
    {
      const int64_t nk = kt + kStages - 1;
      if (nk < KT) load_tile(smem + (nk % kStages) * kStageBytes, L, m0, n0, nk, tid);
      cp_async_commit();  // (possibly empty group: keeps the wait count uniform)
    }
    const unsigned char* sA = smem + (kt % kStages) * kStageBytes;
    const unsigned char* sB = sA + kBM * kSRow;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // 32-byte slices of the 64-byte k-tile
      const int64_t chan0 = (FMT == QuantFormat::kInt4 ? 2 : 1) * (kt * kBKB + half * 32);  // first channel
      if (chan0 >= K) break;  // past the row end (uniform): zero-filled, skip
      uint32_t ar[4][4], br[2][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
        ldsm_x4(ar[mt], sA + (wm * 64 + mt * 16 + a_ldm_row(lane)) * kSRow + half * 32 + a_ldm_byte(lane));
#pragma unroll
      for (int p = 0; p < 2; ++p)
        ldsm_x4(br[p], sB + (wn * 32 + p * 16 + b_ldm_row(lane)) * kSRow + half * 32 + b_ldm_byte(lane));
      if constexpr (FMT == QuantFormat::kInt4 && !NATIVE4) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {  // two k-steps of 32 channels
          const int64_t s = chan0 / 32 + j;
          if (s * 32 >= K) break;
          uint32_t af[4][4], bf[4][2];
#pragma unroll
          for (int mt = 0; mt < 4; ++mt) frag4_a(ar[mt], j, af[mt]);
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) frag4_b(br, nt, j, bf[nt]);
          kstep(af, bf);
        }
      } else {  // 8-bit data (32 channels), or native int4 (64 channels): the ldmatrix words as they are
        uint32_t bf[4][2];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) frag8_b(br, nt, bf[nt]);
        kstep(ar, bf);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is free for the epilogue

  // ---- low-rank branch: acc += sum_r lora_act[m, r] lora_up[r, n], kLoraR ranks per round
  const int64_t R = L.a.rank;
  if (R > 0) {
    float* la_s = reinterpret_cast<float*>(smem);  // [kBM][kLaPitch]
    float* lu_s = la_s + kBM * kLaPitch;           // [kLoraR][kBN]
    for (int64_t r0 = 0; r0 < R; r0 += kLoraR) {
      __syncthreads();  // previous round's readers are done
      stage_lora(la_s, lu_s, L, m0, n0, r0, tid, kThreads);
      __syncthreads();
      const int rn = int(R - r0 < kLoraR ? R - r0 : kLoraR);
      for (int rr = 0; rr < rn; ++rr) {
        float av[4][2], uv[4][2];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) av[mt][h] = la_s[(wm * 64 + mt * 16 + acc_row(lane, 2 * h)) * kLaPitch + rr];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j) uv[nt][j] = lu_s[rr * kBN + wn * 32 + nt * 8 + acc_col(lane, j)];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i)
              acc[mt][nt][i] = __fmaf_rn(av[mt][i >> 1], uv[nt][i & 1], acc[mt][nt][i]);
      }
    }
  }

  // ---- bias, conversion, stores
  float bv[4][2];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = cb + nt * 8 + j;
      bv[nt][j] = (L.a.bias != nullptr && c < nlim) ? load_f(L.a.bias, n0 + c, L.a.bias_dtype) : 0.f;
    }
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (rb + mt * 16 + h * 8 >= mlim) continue;
      const int64_t m = m0 + rb + mt * 16 + h * 8;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        if (cb + nt * 8 >= nlim) continue;
        const int64_t n = n0 + cb + nt * 8;  // even; the pair's second column is n + 1
        store_pair<TOut>(L, m, n, __fadd_rn(acc[mt][nt][2 * h], bv[nt][0]),
                         __fadd_rn(acc[mt][nt][2 * h + 1], bv[nt][1]));
      }
    }
}

// ---------------------------------------------------------------- Hopper: warpgroup-MMA kernel
// int4 with groups of a multiple of 64 channels (up to 16384) on sm_90a (opt-in: PYDIFF_CUDA_WGMMA=1;
// see use_wgmma). Hopper's mma.sync runs well below its warpgroup MMA, and with one k-step per
// instruction the per-group epilogue and the unpacking sit on the same warps' critical path. Here:
//   * CTA tile 128 x 128, 256 threads = 2 warpgroups of 64 rows each; one chunk of 64 channels (32
//     packed bytes a row) per main-loop iteration t.
//   * Packed tiles stream through a 4-stage cp.async ring; each thread unpacks the 2 x 16 bytes it
//     copied itself (so no barrier between landing and unpacking) into f16 tiles in the canonical
//     K-major, no-swizzle wgmma layout: 8 x 8 "core matrices" of 128 contiguous bytes, the 8 core
//     matrices of one 8-row block side by side along K (LBO = 128 bytes), 8-row blocks 1024 bytes
//     apart (SBO). int4 -> f16 is exact: (nibble & 0xF) ^ 8 is the value + 8, written as the f16
//     1024 + (value + 8) by or-ing the exponent bits 0x6400 in, minus 1032 (one LOP3 and one HSUB2
//     per two values). Within a chunk the channels are permuted identically for A and B (packed
//     word i of a 16-byte piece -> core matrix i, nibbles s and s + 4 -> half2 s), so each group's
//     dot product is unchanged.
//   * A chunk is 4 x wgmma m64n128k16 (f16 in, fp32 accumulators D, reset at the first chunk of a
//     group; the products and |D| <= 64 G <= 2^20 are integers, exact). Ping-pong: in the first
//     half of iteration t warpgroup 0 issues chunk t's wgmmas and unpacks chunk t + 1 while warpgroup
//     1 waits for its chunk t - 1 and, at the end of a group, folds it in; in the second half the
//     roles swap. Fold: acc += D * (sa[m, g] * sw[n, g]), the same fp32 operations in the same order
//     as the mma.sync kernel above (bit-identical results). A barrier ends each half (the one after
//     the second half orders the unpacked tiles, fenced for the async proxy, before the next
//     wgmmas); a chunk's tiles and scales are read until warpgroup 1 has waited for it (iteration
//     t + 1) and rewritten with chunk t + 3: a ring of 3.
//   * Accumulator fragment of m64nNk16 (PTX ISA, "wgmma D matrix fragment"; warp q of the
//     warpgroup, gid = lane >> 2, tig = lane & 3): d[4j + 2h + e] = (row 16 q + gid + 8 h, column
//     8 j + 2 tig + e).
// Epilogue (low-rank branch staged through shared memory, bias, conversion, paired stores) as above.
namespace w4 {
constexpr int kWBM = 128, kWBN = 128, kWThreads = 256, kWStages = 4;
constexpr int kPackRow = 32;                                 // packed bytes of one row and chunk
constexpr int kPackStage = (kWBM + kWBN) * kPackRow;           // 8192
constexpr int kTile = kWBM * 64 * 2;                          // one operand, one chunk, f16: 16384
constexpr int kUnp = 2 * kTile;                              // A + B
constexpr int kOffUnp = kWStages * kPackStage;                // 32768
constexpr int kBufs = 3;                                     // unpacked tiles / scales of 3 chunks
constexpr int kOffScale = kOffUnp + kBufs * kUnp;            // 131072
constexpr int kSmemBytes = kOffScale + kBufs * (kWBM + kWBN) * 4;  // 134144
constexpr int kLBO = 128, kSBO = 1024;                       // core-matrix strides along K / M,N
constexpr int kAlignPad = 1024;                              // base alignment of the swizzled layout
static_assert(kOffUnp % 1024 == 0 && kUnp % 1024 == 0 && kTile % 1024 == 0, "swizzled tiles are 1024-byte aligned");
static_assert((kWBM * kLaPitch + kLoraR * kWBN) * 4 <= kSmemBytes, "epilogue staging must fit");
static_assert(kWBM == kBM && kWBN == kBN, "the epilogue helpers (stage_lora) assume the mma.sync kernel's tile");

// Two layouts of the unpacked [128 x 64] f16 tiles (template parameter SW of the kernel; PYDIFF_CUDA_WGMMA=1
// picks the first, 2 the second, until a GPU run says which is faster):
//  * no swizzle: 8 x 8 core matrices of 128 contiguous bytes, LBO = 128 (along K), SBO = 1024;
//  * 128-byte swizzle (what CUTLASS uses for K-major f16 tiles of 64 channels): row r's 128 bytes at
//    r * 128, its 16-byte chunk c (channels 8c .. 8c + 7) at chunk position c ^ (r & 7); 8-row atoms of
//    1024 bytes (SBO), LBO unused (1); the tile base 1024-byte aligned (the XOR uses address bits 7-9).
// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address, LBO and SBO
// in 16-byte units (bits 0-13, 16-29, 32-45), base offset 0, layout type in bits 62-63 (0 none,
// 1 128-byte swizzle).
template <bool SW>
__host__ __device__ constexpr uint64_t desc(uint32_t addr) {
  return uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t(SW ? 1 : kLBO >> 4) << 16) | (uint64_t(kSBO >> 4) << 32) |
         (uint64_t(SW ? 1 : 0) << 62);
}
// Byte offset of f16 element (row, k) of a [128 x 64] tile in that layout.
template <bool SW>
__host__ __device__ constexpr int tile_off(int row, int k) {
  return SW ? (row >> 3) * kSBO + (row & 7) * 128 + ((((k >> 3) ^ row) & 7) << 4) + (k & 7) * 2
            : (row >> 3) * kSBO + (k >> 3) * kLBO + (row & 7) * 16 + (k & 7) * 2;
}
// Start-address advance of the k-th 16-channel step within a tile (2 core matrices / 32 bytes of a row).
template <bool SW>
__host__ __device__ constexpr int kstep_off(int s) { return SW ? s * 32 : s * 2 * kLBO; }
// Two int4 fields of a packed word (bits 0-3 and 16-19 of x) -> an f16 pair of their values.
__host__ __device__ inline uint32_t nib2_to_h2(uint32_t x) {
  __half2_raw r;
  const uint32_t biased = (x & 0x000F000Fu) ^ 0x64086408u;  // f16 1024 + (v + 8), both halves
  r.x = uint16_t(biased);
  r.y = uint16_t(biased >> 16);
  __half2_raw off;
  off.x = off.y = 0x6408;  // 1032
  const __half2 h = __hsub2(__half2(r), __half2(off));
  const __half2_raw o = __half2_raw(h);
  return uint32_t(o.x) | (uint32_t(o.y) << 16);
}
}  // namespace w4

template <typename TOut, bool SW>
__global__ void __launch_bounds__(w4::kWThreads, 1) quant_gemm_wgmma_kernel(const GemmLaunch L) {
  using namespace w4;  // (names distinct from the mma.sync kernel's)
#ifdef PYDIFF_CUDA_EMU
  unsigned char* smem_raw = cuda_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];  // (16: as declared above; descriptors need 16)
#endif
  // the swizzled layout needs 1024-byte aligned tiles: the launch adds kAlignPad bytes to align the base
  unsigned char* smem = smem_raw + (SW ? (kAlignPad - (smem_u32(smem_raw) & (kAlignPad - 1))) & (kAlignPad - 1) : 0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wq = warp & 3;
  // the warpgroup, through a shuffle so that the compiler sees it warp-uniform (a branch on it is not
  // divergent: without this, ptxas serializes the wgmmas issued under `if (wg == ...)`, C7518)
  const int wg = __shfl_sync(0xFFFFFFFFu, tid >> 7, 0);
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t M = L.a.M, N = L.a.N, Gn = L.Gn;
  const int64_t m0 = int64_t(blockIdx.x) * kWBM, n0 = int64_t(blockIdx.y) * kWBN;
  const int T = int(L.a.K / 64);            // 64-channel chunks = k-iterations (the host checks K / 32 < 2^31)
  const int cpg = int(L.a.group_size / 64);  // chunks per group (the host checks G % 64 == 0, G <= 16384)
  const unsigned char* qa = static_cast<const unsigned char*>(L.a.qa);
  const unsigned char* qw = static_cast<const unsigned char*>(L.a.qw);

  // This thread's copies: 16-byte half ch of row cr, in A and in B. Lanes 0-15 of a warp take the
  // first halves of 16 rows, lanes 16-31 the second halves, so that each 8-lane phase of the
  // 16-byte shared stores (packed slot: planes [half][row]; f16 tile: 8 rows of one core matrix)
  // covers 128 contiguous bytes (no bank conflicts); a row's two halves are still read by one
  // instruction (one 32-byte sector).
  const int cr = (tid & 15) | ((tid >> 5) << 4), ch = (tid >> 4) & 1;
  const bool a_ok = m0 + cr < M, b_ok = n0 + cr < N;
  const unsigned char* a_src = qa + (a_ok ? (m0 + cr) * L.row_bytes : 0) + ch * 16;
  const unsigned char* b_src = qw + (b_ok ? (n0 + cr) * L.row_bytes : 0) + ch * 16;
  // this thread's 16 bytes of A in ring slot g % kWStages (B: + kWBM * kPackRow)
  auto piece = [&](int g) { return smem + (g % kWStages) * kPackStage + ch * kWBM * 16 + cr * 16; };
  auto issue = [&](int g) {  // chunk g -> its ring slot (rows past M / N: zeros)
    unsigned char* slot = piece(g);
    cp_async16(slot, a_ok ? a_src + int64_t(g) * kPackRow : qa, a_ok ? 16 : 0);
    cp_async16(slot + kWBM * kPackRow, b_ok ? b_src + int64_t(g) * kPackRow : qw, b_ok ? 16 : 0);
  };
  // This thread's scale: sa of tile row tid (tid < 128) or sw of tile column tid - 128.
  const int srow = tid < kWBM ? tid : tid - kWBM;
  const bool s_ok = tid < kWBM ? m0 + srow < M : n0 + srow < N;
  const float* s_src = s_ok ? (tid < kWBM ? L.a.sa + (m0 + srow) * Gn : L.a.sw + (n0 + srow) * Gn) : nullptr;
  auto scale_of = [&](int g) { return (s_ok && g < T) ? __ldg(s_src + g / cpg) : 0.f; };  // chunk g's group
  // Own 16-byte pieces of chunk g (landed) -> f16 tiles of buffer g % kBufs; the scale -> its scale buffer.
  auto unpack = [&](int g, float sc) {
    const unsigned char* slot = piece(g);
    unsigned char* ub = smem + kOffUnp + (g % kBufs) * kUnp;
#pragma unroll
    for (int op = 0; op < 2; ++op) {
      const uint4 p = *reinterpret_cast<const uint4*>(slot + op * kWBM * kPackRow);
      const uint32_t w[4] = {p.x, p.y, p.z, p.w};
      unsigned char* dst = ub + op * kTile;
#pragma unroll
      for (int i = 0; i < 4; ++i)  // word i = channels 32 ch + 8 i .. + 7 -> core matrix 4 ch + i
        *reinterpret_cast<uint4*>(dst + tile_off<SW>(cr, 32 * ch + 8 * i)) =
            make_uint4(nib2_to_h2(w[i]), nib2_to_h2(w[i] >> 4), nib2_to_h2(w[i] >> 8), nib2_to_h2(w[i] >> 12));
    }
    reinterpret_cast<float*>(smem + kOffScale)[(g % kBufs) * (kWBM + kWBN) + tid] = sc;
  };

  float acc[64], d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = d[i] = 0.f;
  const int rt = wg * 64 + wq * 16 + gid;  // tile rows rt, rt + 8 of this thread's accumulators

  auto mma = [&](int t) {  // this warpgroup's 4 wgmmas of chunk t (asynchronous), D reset at a group start
    const int acc_d = t % cpg;  // 0 at the first chunk of a group
    const uint32_t ub = smem_u32(smem + kOffUnp + (t % kBufs) * kUnp);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s)  // k-steps of 16 channels = 2 core matrices = 256 bytes along K
      wgmma_m64n128k16_f16(d, desc<SW>(ub + wg * 8 * kSBO + kstep_off<SW>(s)), desc<SW>(ub + kTile + kstep_off<SW>(s)),
                           s + acc_d);
    wgmma_commit();
  };
  // Wait for this warpgroup's chunk g; at the last chunk of a group, acc += D * (sa * sw).
  auto fold = [&](int g) {
    wgmma_wait<0>();
    fence_acc(d);
    if ((g + 1) % cpg != 0) return;
    const float* sc = reinterpret_cast<const float*>(smem + kOffScale) + (g % kBufs) * (kWBM + kWBN);
    const float sa0 = sc[rt], sa1 = sc[rt + 8];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float2 sw = *reinterpret_cast<const float2*>(sc + kWBM + 8 * j + 2 * tig);
      acc[4 * j + 0] = __fmaf_rn(d[4 * j + 0], __fmul_rn(sa0, sw.x), acc[4 * j + 0]);
      acc[4 * j + 1] = __fmaf_rn(d[4 * j + 1], __fmul_rn(sa0, sw.y), acc[4 * j + 1]);
      acc[4 * j + 2] = __fmaf_rn(d[4 * j + 2], __fmul_rn(sa1, sw.x), acc[4 * j + 2]);
      acc[4 * j + 3] = __fmaf_rn(d[4 * j + 3], __fmul_rn(sa1, sw.y), acc[4 * j + 3]);
    }
  };
  float s_next = 0.f;
  auto next = [&](int t) {  // the copies of chunk t + 3; unpack (own pieces of) chunk t + 1
    if (t + kWStages - 1 < T) issue(t + kWStages - 1);
    cp_async_commit();
    if (t + 1 < T) {
      cp_async_wait<kWStages - 2>();  // chunk t + 1 (own copies)
      unpack(t + 1, s_next);
      s_next = scale_of(t + 2);
    }
    fence_proxy_async();
  };

#pragma unroll
  for (int s = 0; s < kWStages - 1; ++s) {
    if (s < T) issue(s);
    cp_async_commit();
  }
  s_next = scale_of(1);
  cp_async_wait<kWStages - 2>();  // chunk 0 (own copies)
  if (T > 0) unpack(0, scale_of(0));
  fence_proxy_async();
  __syncthreads();
  // Ping-pong (see above): phase A: warpgroup 0 issues chunk t and unpacks chunk t + 1, warpgroup 1
  // waits for (and may fold) chunk t - 1; phase B: the other way round, warpgroup 0 on chunk t.
  for (int t = 0; t < T; ++t) {
    if (wg == 0) {
      mma(t);
      next(t);
    } else if (t > 0) {
      fold(t - 1);
    }
    __syncthreads();
    if (wg == 1) {
      mma(t);
      next(t);
    } else {
      fold(t);
    }
    __syncthreads();
  }
  if (wg == 1 && T > 0) fold(T - 1);
  __syncthreads();  // the tiles are free for the epilogue's staging
  cp_async_wait<0>();  // (only empty groups are left)

  // ---- low-rank branch: acc += sum_r lora_act[m, r] lora_up[r, n], kLoraR ranks per round
  const int64_t R = L.a.rank;
  if (R > 0) {
    float* la_s = reinterpret_cast<float*>(smem);  // [kWBM][kLaPitch]
    float* lu_s = la_s + kWBM * kLaPitch;           // [kLoraR][kWBN]
    for (int64_t r0 = 0; r0 < R; r0 += kLoraR) {
      __syncthreads();  // previous round's readers are done
      stage_lora(la_s, lu_s, L, m0, n0, r0, tid, kWThreads);
      __syncthreads();
      const int rn = int(R - r0 < kLoraR ? R - r0 : kLoraR);
      for (int rr = 0; rr < rn; ++rr) {
        const float av0 = la_s[rt * kLaPitch + rr], av1 = la_s[(rt + 8) * kLaPitch + rr];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const float u0 = lu_s[rr * kWBN + 8 * j + 2 * tig], u1 = lu_s[rr * kWBN + 8 * j + 2 * tig + 1];
          acc[4 * j + 0] = __fmaf_rn(av0, u0, acc[4 * j + 0]);
          acc[4 * j + 1] = __fmaf_rn(av0, u1, acc[4 * j + 1]);
          acc[4 * j + 2] = __fmaf_rn(av1, u0, acc[4 * j + 2]);
          acc[4 * j + 3] = __fmaf_rn(av1, u1, acc[4 * j + 3]);
        }
      }
    }
  }

  // ---- bias, conversion, stores
  const int nlim = int(N - n0 < kWBN ? N - n0 : kWBN);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int c = 8 * j + 2 * tig;  // even; the pair's second column is c + 1
    if (c >= nlim) continue;
    const float b0 = L.a.bias != nullptr ? load_f(L.a.bias, n0 + c, L.a.bias_dtype) : 0.f;
    const float b1 = (L.a.bias != nullptr && c + 1 < nlim) ? load_f(L.a.bias, n0 + c + 1, L.a.bias_dtype) : 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + rt + 8 * h;
      if (m >= M) continue;
      const int64_t n = n0 + c;
      store_pair<TOut>(L, m, n, __fadd_rn(acc[4 * j + 2 * h], b0), __fadd_rn(acc[4 * j + 2 * h + 1], b1));
    }
  }
}

// Per-device, once per kernel (so that no attribute call happens during CUDA-graph capture after a
// warm-up): the dynamic shared-memory opt-in, and with needs_e4m3 whether the kernel image has the
// e4m3 MMA. state[device]: 0 unknown, 1 ready, 2 fp8 not supported by the image.
constexpr int kMaxDev = 64;
cudaError_t configure_kernel(const void* kernel, int smem_bytes, bool needs_e4m3,
                             std::atomic<int> (&state)[kMaxDev]) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const int st = dev >= 0 && dev < kMaxDev ? state[dev].load(std::memory_order_relaxed) : 0;
  if (st == 1) return cudaSuccess;
  if (st == 2) return cudaErrorNotSupported;
  if (needs_e4m3) {
    // The e4m3 MMA exists only in code compiled for sm_89+ (see mma_e4m3). ptxVersion: the virtual
    // architecture the image was compiled from (a PTX JIT from compute_80 reports 80).
    cudaFuncAttributes attr;
    e = cudaFuncGetAttributes(&attr, kernel);
    if (e != cudaSuccess) return e;
    const int v = attr.ptxVersion > 0 ? attr.ptxVersion : attr.binaryVersion;
    if (v < 89 || attr.binaryVersion < 89) {
      if (dev >= 0 && dev < kMaxDev) state[dev].store(2, std::memory_order_relaxed);
      return cudaErrorNotSupported;
    }
  }
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (e != cudaSuccess) return e;
  if (dev >= 0 && dev < kMaxDev) state[dev].store(1, std::memory_order_relaxed);
  return cudaSuccess;
}

template <typename TOut, bool SW>
cudaError_t launch_wgmma(const GemmLaunch& L, cudaStream_t stream) {
  static std::atomic<int> state[kMaxDev];
  const int bytes = w4::kSmemBytes + (SW ? w4::kAlignPad : 0);
  const cudaError_t e =
      configure_kernel(reinterpret_cast<const void*>(quant_gemm_wgmma_kernel<TOut, SW>), bytes, false, state);
  if (e != cudaSuccess) return e;
  const dim3 grid(unsigned((L.a.M + w4::kWBM - 1) / w4::kWBM), unsigned((L.a.N + w4::kWBN - 1) / w4::kWBN));
#ifdef PYDIFF_CUDA_EMU
  cuda_emu::launch(quant_gemm_wgmma_kernel<TOut, SW>, grid, dim3(w4::kWThreads), bytes, stream, L);
#else
  quant_gemm_wgmma_kernel<TOut, SW><<<grid, w4::kWThreads, bytes, stream>>>(L);
#endif
  return cudaGetLastError();
}

template <bool SW>
cudaError_t dispatch_wgmma(const GemmLaunch& L, cudaStream_t s) {
  switch (L.a.out_dtype) {
    case FloatType::kF32: return launch_wgmma<float, SW>(L, s);
    case FloatType::kF16: return launch_wgmma<__half, SW>(L, s);
    case FloatType::kBF16: return launch_wgmma<__nv_bfloat16, SW>(L, s);
    default: return cudaErrorInvalidValue;
  }
}

template <QuantFormat FMT, typename TOut, bool NATIVE4>
cudaError_t configure() {
  static std::atomic<int> state[kMaxDev];
  return configure_kernel(reinterpret_cast<const void*>(quant_gemm_kernel<FMT, TOut, NATIVE4>), kSmemBytes,
                          FMT == QuantFormat::kFp8E4M3, state);
}

template <QuantFormat FMT, typename TOut, bool NATIVE4>
cudaError_t launch(const GemmLaunch& L, cudaStream_t stream) {
  cudaError_t e = configure<FMT, TOut, NATIVE4>();
  if (e != cudaSuccess) return e;
  const dim3 grid(unsigned((L.a.M + kBM - 1) / kBM), unsigned((L.a.N + kBN - 1) / kBN));
#ifdef PYDIFF_CUDA_EMU
  cuda_emu::launch(quant_gemm_kernel<FMT, TOut, NATIVE4>, grid, dim3(kThreads), kSmemBytes, stream, L);
#else
  quant_gemm_kernel<FMT, TOut, NATIVE4><<<grid, kThreads, kSmemBytes, stream>>>(L);
#endif
  return cudaGetLastError();
}

template <QuantFormat FMT, bool NATIVE4 = false>
cudaError_t dispatch_out(const GemmLaunch& L, cudaStream_t s) {
  switch (L.a.out_dtype) {
    case FloatType::kF32: return launch<FMT, float, NATIVE4>(L, s);
    case FloatType::kF16: return launch<FMT, __half, NATIVE4>(L, s);
    case FloatType::kBF16: return launch<FMT, __nv_bfloat16, NATIVE4>(L, s);
    default: return cudaErrorInvalidValue;
  }
}

// int4 on the native 4-bit MMA? Groups of a multiple of 64 channels (a k-step must not straddle two
// groups), and an Ampere / Ada GPU (compute capability 8.x; Hopper emulates .s4); the environment
// variable PYDIFF_CUDA_INT4_MMA=1 / 0 overrides the GPU test (not the group condition).
bool use_native_int4(int64_t group_size) {
  if (group_size % 64 != 0) return false;
  if (const char* env = std::getenv("PYDIFF_CUDA_INT4_MMA")) {
    if (env[0] == '1') return true;
    if (env[0] == '0') return false;
  }
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major == 8;
}

// The warpgroup-MMA kernel? int4 with groups of 64k channels (up to 16384), 16-byte aligned qa / qw, a
// compute capability 9.0 GPU and a build with an sm_90a image (PYDIFF_CUDA_SM90A, set by setup.py);
// opt-in with PYDIFF_CUDA_WGMMA=1 until it has been timed on a GPU (the CPU emulator checks it).
// Returns 0 (no), 1 (the no-swizzle layout) or 2 (the 128-byte swizzled layout): PYDIFF_CUDA_WGMMA.
int use_wgmma(const QuantGemmArgs& a, const GemmLaunch& L) {
  // groups of whole 64-channel chunks; |D| <= 64 G <= 2^20 keeps the fp32 accumulators exact
  if (a.fmt != QuantFormat::kInt4 || a.group_size % 64 != 0 || a.group_size > 16384 || !L.aligned16) return 0;
  const char* env = std::getenv("PYDIFF_CUDA_WGMMA");
  if (env == nullptr || (env[0] != '1' && env[0] != '2') || env[1] != '\0') return 0;
#if !defined(PYDIFF_CUDA_EMU) && !defined(PYDIFF_CUDA_SM90A)
  return 0;
#else
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return 0;
  return major == 9 && minor == 0 ? env[0] - '0' : 0;
#endif
}

}  // namespace

int quant_gemm_cuda(const QuantGemmArgs& a, void* stream) {
  if (a.M < 0 || a.N < 0 || a.K < 0 || a.rank < 0) return int(cudaErrorInvalidValue);
  if (a.group_size <= 0 || a.group_size % 32 != 0 || a.K % a.group_size != 0) return int(cudaErrorInvalidValue);
  if (a.K / 32 > 0x7FFFFFFF) return int(cudaErrorInvalidValue);
  if (a.M == 0 || a.N == 0) return 0;
  if (!a.out || (a.K > 0 && (!a.qa || !a.qw || !a.sa || !a.sw))) return int(cudaErrorInvalidValue);
  if (a.rank > 0 && (!a.lora_act || !a.lora_up)) return int(cudaErrorInvalidValue);
  const int64_t grid_x = (a.M + kBM - 1) / kBM, grid_y = (a.N + kBN - 1) / kBN;
  if (grid_x > 0x7FFFFFFF || grid_y > 65535) return int(cudaErrorInvalidConfiguration);
  GemmLaunch L;
  L.a = a;
  L.row_bytes = a.fmt == QuantFormat::kInt4 ? a.K / 2 : a.K;
  L.Gn = a.K / a.group_size;
  L.aligned16 = (reinterpret_cast<uintptr_t>(a.qa) % 16 == 0) && (reinterpret_cast<uintptr_t>(a.qw) % 16 == 0);
  const bool native4 = a.fmt == QuantFormat::kInt4 && use_native_int4(a.group_size);
  const double qprod = a.fmt == QuantFormat::kInt4 ? 64.0 : 16384.0;  // max |qa * qw|
  const int64_t step_ch = native4 ? 64 : 32;  // channels per k-step: flushes come every kMaxFlushSteps of them
  const double flush_chans =
      double(a.group_size < step_ch * kMaxFlushSteps ? a.group_size : step_ch * kMaxFlushSteps);
  L.magic = flush_chans * qprod <= 4194304.0;  // |D| <= 2^22 at every flush
  const int osz = a.out_dtype == FloatType::kF32 ? 4 : 2;
  L.out_pair_ok = (a.N % 2 == 0) && (reinterpret_cast<uintptr_t>(a.out) % (2 * osz) == 0);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (const int wg = use_wgmma(a, L)) return int(wg == 2 ? dispatch_wgmma<true>(L, s) : dispatch_wgmma<false>(L, s));
  switch (a.fmt) {
    case QuantFormat::kInt4:
      return int(native4 ? dispatch_out<QuantFormat::kInt4, true>(L, s) : dispatch_out<QuantFormat::kInt4>(L, s));
    case QuantFormat::kInt8: return int(dispatch_out<QuantFormat::kInt8>(L, s));
    case QuantFormat::kFp8E4M3: return int(dispatch_out<QuantFormat::kFp8E4M3>(L, s));
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace pydiff
