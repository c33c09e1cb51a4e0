// Activation (or weight) quantization for W4A4 / W8A8, CUDA kernel. Includes only CUDA headers.
// Definition: pydiff/reference/quant.py (quantize_ref); declarations and formulas: quant.h.
// Tested without a GPU by csrc/tests/cuda_emu (CPU emulator; the `#ifdef PYDIFF_CUDA_EMU` seams).
//
//   y = prologue(x) (none | tanh-GELU | LayerNorm with adaLN (1 + scale[b]) and + shift[b]); y /= smooth
//   lora_act[m, :] = y[m, :] @ lora_down                              (fp32 accumulation)
//   per row m and group g: amax = max |y| (NaN if any NaN), scale = amax / QMAX (IEEE division),
//   q = 0 (and scale := NaN) when scale is not finite, q = 0 when scale == 0, else
//   int: clamp(rint(y / scale), -QMAX - 1, QMAX); fp8: e4m3_rne(clamp(y / scale, -448, 448)).
//
// Organisation: without lora_down and LayerNorm, with groups of 32 / 64 / 128 / 256, one pass
// (quantize_onepass_kernel: a warp per row, x read once). Otherwise two passes: a CTA of 8 warps owns
// 16 rows (2 per warp) with lora_down, of 4 warps 4 rows (1 per warp: four times the CTAs, more loads
// in flight) without it. Lanes own 8 consecutive channels of a
// 256-channel chunk (16-byte loads of bf16/fp16 x when aligned), so every 8-channel vector lies in
// one group (G % 32 == 0) and a quad of lanes covers 32 channels of one group.
//   0. LayerNorm only: per row, sums of (x - x0) and (x - x0)^2 in float64 (x0 = the row's first
//      element, which removes the cancellation of the one-pass variance) -> mean, rstd (float64).
//   1. pass A over the chunks: y (recomputed from x, bit-identical in pass B: every operation is an
//      explicit round-to-nearest intrinsic, no contraction), per-group amax as the integer max of
//      the bit patterns of |y| (non-negative floats order like their bits; NaN bits exceed inf's, so
//      the max propagates NaN as the definition asks): quad shuffle, then a shared atomicMax per
//      (row, group). With lora_down: y of the chunk goes to shared memory and the CTA adds
//      y_chunk @ lora_down[chunk] to per-(k-slice, row, r) partial sums in shared memory (each
//      partial has one owner thread: deterministic).
//   2. scales = amax / QMAX for the CTA's rows and groups -> global and shared memory.
//   3. pass B: y again, q, packed stores (int4: 4 bytes a lane, int8/fp8: 8 bytes a lane).
//   4. lora_act = sum of the k-slice partials (fixed order).
// Traffic: x read twice (three times with LayerNorm; the re-reads mostly hit L2), q and scales
// written once; lora_down read once per CTA (16 rows).
// Shared memory: 16 * (K / G) * 4 bytes (+ 16 KB + 64 * KS * R bytes with lora_down); configurations
// that do not fit the device's per-block limit return cudaErrorNotSupported.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "pydiff/cuda_types.cuh"
#include "pydiff/quant.h"

namespace pydiff {
namespace {

constexpr int kLoraRows = 16;                 // rows per CTA of the lora_down instantiation
constexpr int kLoraThreads = 256;             // its threads (8 warps, 2 rows each)
constexpr int kRows = kLoraRows;              // (lora_chunk's accumulators)
constexpr int kVec = 8;                       // channels per lane per chunk
constexpr int kChunk = 32 * kVec;             // channels per chunk

// 8 consecutive elements -> fp32; vec: p is 16-byte aligned (x base aligned, K % 32 == 0, k % 8 == 0).
__device__ __forceinline__ void load8(const float* p, bool vec, float (&o)[kVec]) {
  if (vec) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v) o[v] = p[v];
  }
}
template <typename T>
__device__ __forceinline__ void load8(const T* p, bool vec, float (&o)[kVec]) {
  if (vec) {
    union { uint4 u; T e[8]; } r;
    r.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int v = 0; v < kVec; ++v) o[v] = tof(r.e[v]);
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v) o[v] = tof(p[v]);
  }
}

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), evaluated in the reference's order, fp32.
__device__ __forceinline__ float gelu_tanh_f(float x) {
  const float c = 0.7978845608028654f, k3 = 0.044715f;
  float inner = __fmul_rn(__fmul_rn(__fmul_rn(k3, x), x), x);
  inner = __fadd_rn(x, inner);
  const float t = tanhf(__fmul_rn(c, inner));
  return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, t));
}

struct QLaunch {
  QuantizeArgs a;
  int64_t Gn;  // groups per row
  int x_vec;   // x base 16-byte aligned
  int q_vec;   // q base 8-byte aligned
  int rp, ks;  // lora: threads per k-slice (>= 32, power of two) and k-slices (rp * ks == kThreads)
};

// y for channels k .. k + 7 of row m (prologue, then smoothing).
template <typename TX>
__device__ __forceinline__ void compute_y(const QLaunch& L, int64_t m, int64_t k, double mean, double rstd,
                                          float (&y)[kVec]) {
  const QuantizeArgs& a = L.a;
  float xv[kVec];
  load8(static_cast<const TX*>(a.x) + m * a.K + k, L.x_vec != 0, xv);
  if (a.prologue == QuantPrologue::kGeluTanh) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) y[v] = gelu_tanh_f(xv[v]);
  } else if (a.prologue == QuantPrologue::kLayerNorm) {
    const int64_t mod = (m / a.rows_per_batch) * a.K + k;  // adaLN row b = m / rows_per_batch
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      float t = __double2float_rn(__dmul_rn(__dsub_rn(double(xv[v]), mean), rstd));
      if (a.scale != nullptr) t = __fmul_rn(t, __fadd_rn(1.0f, load_f(a.scale, mod + v, a.mod_dtype)));
      if (a.shift != nullptr) t = __fadd_rn(t, load_f(a.shift, mod + v, a.mod_dtype));
      y[v] = t;
    }
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v) y[v] = xv[v];
  }
  if (a.smooth != nullptr) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) y[v] = __fdiv_rn(y[v], load_f(a.smooth, k + v, a.smooth_dtype));
  }
}

// LayerNorm statistics of one row by one warp (all lanes get the result).
template <typename TX>
__device__ __forceinline__ void ln_stats(const QLaunch& L, int64_t m, int lane, double& mean, double& rstd) {
  const int64_t K = L.a.K;
  const TX* row = static_cast<const TX*>(L.a.x) + m * K;
  const double x0 = double(tof(row[0]));
  double s1 = 0.0, s2 = 0.0;
  for (int64_t k = int64_t(lane) * kVec; k < K; k += kChunk) {
    float xv[kVec];
    load8(row + k, L.x_vec != 0, xv);
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const double d = double(xv[v]) - x0;
      s1 += d;
      s2 += d * d;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s1 += __shfl_xor_sync(0xffffffffu, s1, o);
    s2 += __shfl_xor_sync(0xffffffffu, s2, o);
  }
  const double mu = s1 / double(K);
  double var = s2 / double(K) - mu * mu;
  var = var > 0.0 ? var : 0.0;
  mean = x0 + mu;
  rstd = 1.0 / sqrt(var + L.a.eps);
}

// yT_s[kk][row] layout: 16 floats per channel kk, the four float4 quads of rows XOR-swizzled by
// (kk >> 3) & 3, so that the 32 lanes of a warp (kk = 8 lane + v) writing one row spread over 4x
// more banks; readers load quad q ^ swizzle to get rows 4q .. 4q + 3.
__device__ __forceinline__ int yt_swizzle(int kk) { return (kk >> 3) & 3; }

// part[ks][row][r] += sum_{kk in slice ks} yT[kk][row] * lora_down[c0 + kk][r] for the chunk at c0.
template <typename TL>
__device__ __forceinline__ void lora_chunk(const QLaunch& L, int64_t c0, int nk, const float* yT_s, float* part_s,
                                           int tid) {
  const TL* ld = static_cast<const TL*>(L.a.lora_down);
  const int64_t R = L.a.rank;
  const int rl = tid % L.rp, ks = tid / L.rp;
  for (int64_t r = rl; r < R; r += L.rp) {
    float acc[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) acc[i] = 0.f;
    for (int kk = ks; kk < nk; kk += L.ks) {
      const float w = tof(ld[(c0 + kk) * R + r]);  // a warp reads 32 consecutive r: coalesced
      const float4* yv = reinterpret_cast<const float4*>(yT_s + kk * kRows);  // broadcast
      const int sw = yt_swizzle(kk);
#pragma unroll
      for (int q = 0; q < kRows / 4; ++q) {
        const float4 t = yv[q ^ sw];  // rows 4q .. 4q + 3
        acc[4 * q + 0] = __fmaf_rn(t.x, w, acc[4 * q + 0]);
        acc[4 * q + 1] = __fmaf_rn(t.y, w, acc[4 * q + 1]);
        acc[4 * q + 2] = __fmaf_rn(t.z, w, acc[4 * q + 2]);
        acc[4 * q + 3] = __fmaf_rn(t.w, w, acc[4 * q + 3]);
      }
    }
    float* p = part_s + int64_t(ks) * kRows * R + r;
#pragma unroll
    for (int i = 0; i < kRows; ++i) p[i * R] = __fadd_rn(p[i * R], acc[i]);
  }
}

template <QuantFormat FMT> struct QMax;
template <> struct QMax<QuantFormat::kInt4> { static constexpr float v = 7.0f; };
template <> struct QMax<QuantFormat::kInt8> { static constexpr float v = 127.0f; };
template <> struct QMax<QuantFormat::kFp8E4M3> { static constexpr float v = 448.0f; };

// max |y[v]| as an integer bit pattern (non-negative floats order like their bits; NaN's bits exceed
// inf's, so a max over lanes propagates NaN as the definition asks).
__device__ __forceinline__ int amax_bits(const float (&y)[kVec]) {
  int am = 0;
#pragma unroll
  for (int v = 0; v < kVec; ++v) am = max(am, __float_as_int(fabsf(y[v])));
  return am;
}

// A group's scale from its amax bits: amax / QMAX (IEEE division), NaN where not finite (NaN or inf).
template <QuantFormat FMT>
__device__ __forceinline__ float group_scale(int am) {
  const float s = __fdiv_rn(__int_as_float(am), QMax<FMT>::v);
  return isfinite(s) ? s : __int_as_float(0x7FC00000);
}

// Quantize y[0..7] (channels k .. k + 7 of row m) with scale s and store them.
template <QuantFormat FMT>
__device__ __forceinline__ void store_q(const QLaunch& L, int64_t m, int64_t k, const float (&y)[kVec], float s) {
  constexpr float qmax = QMax<FMT>::v;
  const bool ok = isfinite(s) && s > 0.0f;
  const int64_t K = L.a.K;
  unsigned char bytes[kVec];
  if constexpr (FMT == QuantFormat::kFp8E4M3) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const float t = fminf(fmaxf(__fdiv_rn(y[v], s), -qmax), qmax);
      bytes[v] = ok ? static_cast<unsigned char>(__nv_cvt_float_to_fp8(t, __NV_SATFINITE, __NV_E4M3)) : 0;
    }
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const float t = fminf(fmaxf(rintf(__fdiv_rn(y[v], s)), -qmax - 1.0f), qmax);  // rint: half to even
      bytes[v] = ok ? static_cast<unsigned char>(static_cast<int>(t)) : 0;     // two's complement byte
    }
  }
  if constexpr (FMT == QuantFormat::kInt4) {
    // channel 2j -> low nibble of byte j, 2j + 1 -> high nibble
    uint32_t w = 0;
#pragma unroll
    for (int j = 0; j < kVec / 2; ++j)
      w |= (uint32_t(bytes[2 * j] & 0xF) | (uint32_t(bytes[2 * j + 1] & 0xF) << 4)) << (8 * j);
    unsigned char* p = static_cast<unsigned char*>(L.a.q) + m * (K / 2) + k / 2;
    if (L.q_vec) {
      *reinterpret_cast<uint32_t*>(p) = w;  // k / 2 % 4 == 0 and K / 2 % 16 == 0
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) p[j] = static_cast<unsigned char>(w >> (8 * j));
    }
  } else {
    unsigned char* p = static_cast<unsigned char*>(L.a.q) + m * K + k;
    if (L.q_vec) {
      uint2 w;
      w.x = uint32_t(bytes[0]) | (uint32_t(bytes[1]) << 8) | (uint32_t(bytes[2]) << 16) | (uint32_t(bytes[3]) << 24);
      w.y = uint32_t(bytes[4]) | (uint32_t(bytes[5]) << 8) | (uint32_t(bytes[6]) << 16) | (uint32_t(bytes[7]) << 24);
      *reinterpret_cast<uint2*>(p) = w;
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v) p[v] = bytes[v];
    }
  }
}

// RPW rows per warp, WARPS warps: <2, 8> (16 rows a CTA) with lora_down (lora_chunk's layout needs
// 16 rows); <1, 4> (4 rows a CTA, four times the CTAs) without it, for more loads in flight.
template <QuantFormat FMT, typename TX, int RPW, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 24 / WARPS) quantize_kernel(const QLaunch L) {
  constexpr int kRowsPerWarp = RPW;
  constexpr int kRows = RPW * WARPS;
  constexpr int kThreads = WARPS * 32;
  constexpr bool kLora = kRows == kLoraRows;
#ifdef PYDIFF_CUDA_EMU
  unsigned char* smem = cuda_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  const QuantizeArgs& a = L.a;
  const int64_t M = a.M, K = a.K, G = a.group_size, Gn = L.Gn, R = a.rank;
  int* amax_s = reinterpret_cast<int*>(smem);                         // [kRows][Gn]: bits of amax, then
  float* scale_s = reinterpret_cast<float*>(smem);                    //   the scales (same storage)
  float* yT_s = reinterpret_cast<float*>(smem + kRows * Gn * 4);      // [kChunk][kRows] (lora only)
  float* part_s = yT_s + kChunk * kRows;                              // [ks][kRows][R] (lora only)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t m0 = int64_t(blockIdx.x) * kRows;

  for (int64_t i = tid; i < kRows * Gn; i += kThreads) amax_s[i] = 0;
  if (kLora && R > 0)
    for (int64_t i = tid; i < int64_t(L.ks) * kRows * R; i += kThreads) part_s[i] = 0.f;

  double mean[kRowsPerWarp], rstd[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t m = m0 + warp * kRowsPerWarp + i;
    mean[i] = 0.0;
    rstd[i] = 1.0;
    if (a.prologue == QuantPrologue::kLayerNorm && m < M && K > 0) ln_stats<TX>(L, m, lane, mean[i], rstd[i]);
  }
  __syncthreads();

  // ---- pass A: amax per (row, group); lora partial sums
  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    const int64_t k = c0 + int64_t(lane) * kVec;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int lr = warp * kRowsPerWarp + i;
      const int64_t m = m0 + lr;
      const bool act = m < M && k < K;  // k < K: the lane's 8 channels are all inside (K % 32 == 0)
      float y[kVec];
      int am = 0;
      if (act) {
        compute_y<TX>(L, m, k, mean[i], rstd[i], y);
        am = amax_bits(y);
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) y[v] = 0.f;
      }
      // the quad (lanes 4q .. 4q + 3) covers 32 channels starting at a multiple of 32: one group
      am = max(am, __shfl_xor_sync(0xffffffffu, am, 1));
      am = max(am, __shfl_xor_sync(0xffffffffu, am, 2));
      if (act && (lane & 3) == 0) atomicMax(amax_s + lr * Gn + k / G, am);
      if (kLora && R > 0) {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const int kk = lane * kVec + v;
          yT_s[kk * kRows + (((lr >> 2) ^ yt_swizzle(kk)) << 2) + (lr & 3)] = y[v];
        }
      }
    }
    if (kLora && R > 0) {
      __syncthreads();
      const int nk = int(K - c0 < kChunk ? K - c0 : kChunk);
      switch (a.lora_dtype) {
        case FloatType::kF16: lora_chunk<__half>(L, c0, nk, yT_s, part_s, tid); break;
        case FloatType::kBF16: lora_chunk<__nv_bfloat16>(L, c0, nk, yT_s, part_s, tid); break;
        default: lora_chunk<float>(L, c0, nk, yT_s, part_s, tid); break;
      }
      __syncthreads();  // yT_s is rewritten by the next chunk
    }
  }
  __syncthreads();

  // ---- scales
  for (int64_t idx = tid; idx < kRows * Gn; idx += kThreads) {
    const int64_t row = idx / Gn, g = idx % Gn, m = m0 + row;
    const float s = group_scale<FMT>(amax_s[idx]);
    scale_s[idx] = s;
    if (m < M) a.scales[m * Gn + g] = s;
  }
  __syncthreads();

  // ---- pass B: quantize and store
  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    const int64_t k = c0 + int64_t(lane) * kVec;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int lr = warp * kRowsPerWarp + i;
      const int64_t m = m0 + lr;
      if (m >= M || k >= K) continue;
      float y[kVec];
      compute_y<TX>(L, m, k, mean[i], rstd[i], y);
      store_q<FMT>(L, m, k, y, scale_s[lr * Gn + k / G]);
    }
  }

  // ---- lora_act
  if (kLora && R > 0) {
    for (int64_t o = tid; o < kRows * R; o += kThreads) {
      const int64_t row = o / R, r = o % R, m = m0 + row;
      if (m >= M) continue;
      float s = 0.f;
      for (int ks = 0; ks < L.ks; ++ks) s = __fadd_rn(s, part_s[(int64_t(ks) * kRows + row) * R + r]);
      a.lora_act[m * R + r] = s;
    }
  }
}

// One pass, for what needs no row statistics and no shared memory: no lora_down, prologue none or
// tanh-GELU, groups of G = 32, 64, 128 or 256 channels (a 256-channel chunk holds whole groups). A warp
// owns a row; per chunk each lane computes y of its 8 channels once, the G / 8 lanes of a group
// combine their amax (the same NaN-propagating max of |y|'s bit patterns as pass A), and every lane
// quantizes its values from registers: x is read once, no atomics, no barrier. Same operations as
// quantize_kernel (compute_y, the scale division, store_q), so the same bits.
template <QuantFormat FMT, typename TX, int G>
__global__ void __launch_bounds__(128) quantize_onepass_kernel(const QLaunch L) {
  static_assert(G % 32 == 0 && kChunk % G == 0, "whole groups in a chunk");
  constexpr int kLanes = G / kVec;  // lanes of a group: 4, 8, 16 or 32
  const QuantizeArgs& a = L.a;
  const int lane = threadIdx.x & 31;
  const int64_t m = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5), K = a.K, Gn = L.Gn;
  if (m >= a.M) return;  // (whole warps: the shuffles below stay within full warps)
  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    const int64_t k = c0 + int64_t(lane) * kVec;
    const bool act = k < K;  // K % G == 0: a group's lanes are all in or all out
    float y[kVec];
    int am = 0;
    if (act) {
      compute_y<TX>(L, m, k, 0.0, 1.0, y);
      am = amax_bits(y);
    }
#pragma unroll
    for (int o = 1; o < kLanes; o <<= 1) am = max(am, __shfl_xor_sync(0xffffffffu, am, o));
    if (!act) continue;
    const float sc = group_scale<FMT>(am);
    if (lane % kLanes == 0) a.scales[m * Gn + k / G] = sc;
    store_q<FMT>(L, m, k, y, sc);
  }
}

// Once per device and instantiation (no attribute call during CUDA-graph capture after a warm-up):
// opt in to the device's largest dynamic shared memory per block.
template <QuantFormat FMT, typename TX, int RPW, int WARPS>
cudaError_t configure(int dev, int optin) {
  constexpr int kMaxDev = 64;
  static std::atomic<int> ready[kMaxDev];
  if (dev >= 0 && dev < kMaxDev && ready[dev].load(std::memory_order_relaxed)) return cudaSuccess;
  cudaError_t e = cudaFuncSetAttribute(quantize_kernel<FMT, TX, RPW, WARPS>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (e != cudaSuccess) return e;
  if (dev >= 0 && dev < kMaxDev) ready[dev].store(1, std::memory_order_relaxed);
  return cudaSuccess;
}

template <QuantFormat FMT, typename TX, int RPW, int WARPS>
cudaError_t launch_rows(const QLaunch& L, size_t smem, int dev, int optin, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    cudaError_t e = configure<FMT, TX, RPW, WARPS>(dev, optin);
    if (e != cudaSuccess) return e;
  }
  constexpr int rows = RPW * WARPS;
  const int64_t blocks = (L.a.M + rows - 1) / rows;
#ifdef PYDIFF_CUDA_EMU
  cuda_emu::launch(quantize_kernel<FMT, TX, RPW, WARPS>, dim3(unsigned(blocks)), dim3(WARPS * 32), smem, stream, L);
#else
  quantize_kernel<FMT, TX, RPW, WARPS><<<unsigned(blocks), WARPS * 32, smem, stream>>>(L);
#endif
  return cudaGetLastError();
}

template <QuantFormat FMT, typename TX, int G>
cudaError_t launch_onepass(const QLaunch& L, cudaStream_t stream) {
  const int64_t blocks = (L.a.M + 3) / 4;
#ifdef PYDIFF_CUDA_EMU
  cuda_emu::launch(quantize_onepass_kernel<FMT, TX, G>, dim3(unsigned(blocks)), dim3(128), 0, stream, L);
#else
  quantize_onepass_kernel<FMT, TX, G><<<unsigned(blocks), 128, 0, stream>>>(L);
#endif
  return cudaGetLastError();
}

// Whether quantize_onepass_kernel applies (else quantize_kernel: lora_down, LayerNorm, other groups).
bool onepass(const QuantizeArgs& a) {
  const int64_t G = a.group_size;
  return a.rank == 0 && a.prologue != QuantPrologue::kLayerNorm && (G == 32 || G == 64 || G == 128 || G == 256);
}

template <QuantFormat FMT, typename TX>
cudaError_t launch(const QLaunch& L, size_t smem, int dev, int optin, cudaStream_t stream) {
  if (onepass(L.a)) {
    switch (L.a.group_size) {
      case 32: return launch_onepass<FMT, TX, 32>(L, stream);
      case 64: return launch_onepass<FMT, TX, 64>(L, stream);
      case 128: return launch_onepass<FMT, TX, 128>(L, stream);
      default: return launch_onepass<FMT, TX, 256>(L, stream);
    }
  }
  if (L.a.rank > 0) return launch_rows<FMT, TX, 2, 8>(L, smem, dev, optin, stream);
  return launch_rows<FMT, TX, 1, 4>(L, smem, dev, optin, stream);
}

template <QuantFormat FMT>
cudaError_t dispatch_x(const QLaunch& L, size_t smem, int dev, int optin, cudaStream_t s) {
  switch (L.a.x_dtype) {
    case FloatType::kF32: return launch<FMT, float>(L, smem, dev, optin, s);
    case FloatType::kF16: return launch<FMT, __half>(L, smem, dev, optin, s);
    case FloatType::kBF16: return launch<FMT, __nv_bfloat16>(L, smem, dev, optin, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int quantize_cuda(const QuantizeArgs& a, void* stream) {
  if (a.M < 0 || a.K < 0 || a.rank < 0 || a.rows_per_batch < 1) return int(cudaErrorInvalidValue);
  if (a.group_size <= 0 || a.group_size % 32 != 0 || a.K % a.group_size != 0) return int(cudaErrorInvalidValue);
  if (a.M == 0) return 0;
  if (!a.scales || (a.K > 0 && (!a.x || !a.q)) || (a.rank > 0 && (!a.lora_down || !a.lora_act)))
    return int(cudaErrorInvalidValue);
  const int64_t rows = a.rank > 0 ? kLoraRows : 4;  // rows per CTA (see quantize_kernel)
  if ((a.M + rows - 1) / rows > 0x7FFFFFFF) return int(cudaErrorInvalidConfiguration);
  QLaunch L;
  L.a = a;
  if (a.rank == 0) L.a.lora_down = nullptr;
  L.Gn = a.K / a.group_size;
  L.x_vec = reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  L.q_vec = reinterpret_cast<uintptr_t>(a.q) % 8 == 0;
  L.rp = a.rank <= 32 ? 32 : a.rank <= 64 ? 64 : a.rank <= 128 ? 128 : 256;
  L.ks = kLoraThreads / L.rp;
  const size_t smem = size_t(rows) * size_t(L.Gn) * 4 +
                      (a.rank > 0 ? (size_t(kChunk) * kRows + size_t(L.ks) * kRows * size_t(a.rank)) * 4 : 0);
  int dev = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return int(e);
  if (smem > size_t(optin) && !onepass(a)) return int(cudaErrorNotSupported);  // (the one-pass kernel uses none)
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.fmt) {
    case QuantFormat::kInt4: return int(dispatch_x<QuantFormat::kInt4>(L, smem, dev, optin, s));
    case QuantFormat::kInt8: return int(dispatch_x<QuantFormat::kInt8>(L, smem, dev, optin, s));
    case QuantFormat::kFp8E4M3: return int(dispatch_x<QuantFormat::kFp8E4M3>(L, smem, dev, optin, s));
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace pydiff
