// Exact categorical sampling, CUDA kernels (CUDA headers only). Definition:
// pydiff/reference/sampling.py; declarations: csrc/include/pydiff/sampling.h.
//
// Kernel 1, grid (chunks, rows): each block loads one chunk of kChunk logits into registers (one
// read of the logits in total), reduces the chunk's max / second max / first argmax / NaN flag,
// then sums e = exp((l - m_c) / T): e by the hardware exp2 in fp32 (ex2.approx.ftz, ~2 ulp: one
// MUFU instruction per logit instead of a ~12-instruction polynomial, so the kernel is bound by its
// read of the logits), summed in fp32 by eights, then in float64, kept by 1024-logit segment. These
// sums only choose the chunk and its segment (their probabilities to ~5e-7 relative); with the
// statistics also e * x for the entropy and the sum split as (count of maxima) + (the rest), which
// the entropy of a peaked row needs.
// Kernel 2, one warp per row: combines the chunk partials (max, Z, entropy, margin), draws the
// float64 uniform, scans the weighted chunk sums to pick the chunk, its segment sums to pick the
// segment, and rescans that segment with float64-range exponentials (fp32 polynomial on the reduced
// argument, 2^k in float64: nothing underflows above 1e-308): once for its float64 total, then with
// a warp prefix sum to find the token at the target's share of that total (within the segment each
// token keeps its float64 probability, tails included, although the pass-1 sum differs by ~1e-7).
// A segment whose kept tokens' fp32 exponentials all flushed to 0 has a sum of 0 and could not be
// picked: the partial flags it, and the select then rescans the whole chunk instead.
// Tested without a GPU by csrc/tests/cuda_emu (CPU emulator; the `#ifdef PYDIFF_CUDA_EMU` seam).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "pydiff/cuda_types.cuh"
#include "pydiff/sampling.h"

namespace pydiff {
namespace {

// 32 logits a thread: the block's reductions (max, flag, sums: shuffles, shared memory, barriers) cost
// about as much as a thread's arithmetic on 16 logits once the exponentials are one instruction each
constexpr int kThreads = 128;
constexpr int kPerThread = 32;
constexpr int kChunk = kThreads * kPerThread;  // 4096 logits per block
// A chunk's segments: a thread's sums of eight (v[8g .. 8g + 7]) all lie in segment g, in both load
// paths (16-byte loads: load q of thread t holds elements (q * kThreads + t) * kVec + e; one element
// per load: element j at j * kThreads + t), so the per-segment sums cost one extra reduction.
constexpr int kSeg = kPerThread / 8;      // 4 segments
constexpr int kSegLen = kChunk / kSeg;    // of 1024 logits

struct Partial {
  double s, t, z;     // sum e, sum e * x (relative to the chunk max), (count of maxima) + (sum of the other e)
  double seg[kSeg];   // s by segment (s = ((seg[0] + seg[1]) + seg[2]) + seg[3])
  float m1, m2;       // chunk max and second max (with multiplicity), kept tokens only
  int64_t arg;        // first index of m1 in the row (-1 if none kept)
  int bad;            // NaN / +inf seen
  int flushed;        // bit g: segment g holds a kept token but its fp32 exponentials all flushed to 0
};

__device__ __forceinline__ double exp_neg(float x) {
  x = x < -1000.f ? -1000.f : x;  // (as fmaxf, but a NaN stays NaN: the partial kernel finds NaN by its sum)
  // kf = rint(x / ln2) as the C++ kernel computes it (rounded product, then to the nearest integer,
  // ties to even), by adding 1.5 * 2^23: k is then the low bits of the sum (no F2I / FRND, which
  // issue at a quarter of the FP32 rate)
  const float t = __fadd_rn(__fmul_rn(x, 1.44269504088896341f), 12582912.f);
  const float kf = __fsub_rn(t, 12582912.f);
  float r = fmaf(kf, -0.693359375f, x);
  r = fmaf(kf, 2.12194440e-4f, r);
  float p = 1.f / 5040.f;
  p = fmaf(p, r, 1.f / 720.f);
  p = fmaf(p, r, 1.f / 120.f);
  p = fmaf(p, r, 1.f / 24.f);
  p = fmaf(p, r, 1.f / 6.f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.f);
  p = fmaf(p, r, 1.f);
  // the biased exponent int(kf) + 1023 straight from t's bits (|kf| <= 1443 < 2^22), 0 below 2^-1022
  // (2^k underflows to 0.0), placed in bits 52-62: 2^k as a double
  const int kb = max(__float_as_int(t) - (0x4B400000 - 1023), 0);
  return double(p) * __longlong_as_double(static_cast<long long>(static_cast<unsigned>(kb)) << 52);
}

// 2^y in fp32 by the special-function unit (ex2.approx.ftz.f32: ~2 ulp, 0 below 2^-126 and for -inf,
// NaN for NaN); the emulator uses the host's exp2f.
__device__ __forceinline__ float fast_exp2(float y) {
#ifdef PYDIFF_CUDA_EMU
  return exp2f(y);
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
#endif
}

// ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])), in fp32
__device__ __forceinline__ float sum8(const float* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The warp sums of four values a thread (a segment each), in 6 double shuffles instead of 4 x 5: the
// first two levels exchange half the values, so that lane 8g ends with segment g's sum (lanes 8g ..
// 8g + 7 with the same; a fixed order, so deterministic).
__device__ __forceinline__ double warp_sum4(const double (&a)[4], int lane) {
  const bool h16 = (lane & 16) != 0, h8 = (lane & 8) != 0;
  double k0 = h16 ? a[2] : a[0], k1 = h16 ? a[3] : a[1];  // kept: segments 0, 1 (low half) or 2, 3
  k0 += __shfl_xor_sync(0xffffffffu, h16 ? a[0] : a[2], 16);
  k1 += __shfl_xor_sync(0xffffffffu, h16 ? a[1] : a[3], 16);
  double k = h8 ? k1 : k0;  // segment 2 * h16 + h8
  k += __shfl_xor_sync(0xffffffffu, h8 ? k0 : k1, 8);
  for (int o = 4; o > 0; o >>= 1) k += __shfl_xor_sync(0xffffffffu, k, o);
  return k;
}

// The first of the N weights whose running sum passes target, among the positive ones (-1 if none:
// rounding left target at or beyond the total); run: the sum of the weights before it (of all of
// them if none); last: the last positive one (0 if none).
template <int N>
__device__ __forceinline__ int pick_cumulative(const double (&w)[N], double target, double& run, int& last) {
  int ks = -1;
  run = 0;
  last = 0;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (w[k] > 0) last = k;
    if (ks < 0) {
      if (w[k] > 0 && run + w[k] > target)
        ks = k;
      else
        run += w[k];
    }
  }
  return ks;
}

// (m1, m2, arg) pair merge: keep the two largest with multiplicity and the first argmax.
__device__ __forceinline__ void merge_top2(float& m1, float& m2, int64_t& arg, float o1, float o2, int64_t oarg) {
  if (o1 > m1) {
    m2 = fmaxf(m1, o2);
    m1 = o1;
    arg = oarg;
  } else if (o1 == m1) {
    m2 = m1;
    if (oarg >= 0 && (arg < 0 || oarg < arg)) arg = oarg;
  } else {
    m2 = fmaxf(m2, o1);
  }
}

// A thread's sums over its logits, x = (v - m1) / T (UNIT: T = 1, no multiply: the same x):
// sg[g] = sum e over v[8g .. 8g + 7] (an fp32 sum of eight, in float64). With STATS also t += sum e * x, z += sum of e over
// v < m1 (the others are the maxima, e = 1: counted apart, in nlo, so that Z - 1 keeps its own
// rounding, which the entropy of a peaked row needs), below = max of v < m1, nlo = count of v < m1.
template <bool STATS, bool UNIT>
__device__ __forceinline__ void exp_sums(const float (&v)[kPerThread], float m1, float inv_tf, double (&sg)[kSeg],
                                         double& t, double& z, float& below, int& nlo) {
  static_assert(kPerThread % 8 == 0, "sums of eight");
#pragma unroll
  for (int g = 0; g < kPerThread; g += 8) {
    float e[8], ex[8], er[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float vj = v[g + j];
      const float x = UNIT ? vj - m1 : (vj - m1) * inv_tf;
      e[j] = fast_exp2(x * 1.44269504088896341f);  // 0 where v = -inf
      if (STATS) {
        const bool lo = vj < m1;
        ex[j] = e[j] * fmaxf(x, -FLT_MAX);  // (e = 0 where x = -inf: no 0 * -inf)
        er[j] = lo ? e[j] : 0.f;
        below = fmaxf(below, lo ? vj : -INFINITY);
        nlo += lo;
      }
    }
    sg[g / 8] = double(sum8(e));
    if (STATS) {
      t += double(sum8(ex));
      z += double(sum8(er));
    }
  }
}

template <typename T>
__device__ void select_row(const SampleArgs& a, const Partial* __restrict__ part, int nchunks, int64_t row, int lane);

// STATS = false (tokens + prob, temperature > 0): per logit only the max, the NaN/+inf flag and the
// sum; the second max and the entropy and split sums (statistics only) are skipped. ARG (temperature
// 0 only): the first argmax. HAS_T = false (no threshold): every logit is kept, no per-logit comparison.
// counters (fused select, else nullptr): one int per row, zero on entry; the row's last block to
// finish (threadfence reduction: each block's partial is made visible device-wide before it counts
// itself) then runs select_row with its first warp, so the chosen chunk is read back while it is
// likely still in L2 and no second kernel runs after the last partial.
// (FUSED is a template argument so that the plain kernel keeps its registers: the select code raises
// the bf16 tokens-only kernel from 56 to 72 registers a thread on sm_90a.)
template <typename T, bool STATS, bool HAS_T, bool ARG, bool FUSED>
__global__ void __launch_bounds__(kThreads, 4) partial_kernel(SampleArgs a, Partial* __restrict__ part, int nchunks,
                                                              int* __restrict__ counters) {
  const int64_t row = blockIdx.y;
  const int c = blockIdx.x;
  if (a.row_mask && !a.row_mask[row]) {
    // an unsampled row: no partials; fused, its first block writes the row's outputs (-1 / NaN)
    if (FUSED && c == 0 && threadIdx.x < 32) select_row<T>(a, part, nchunks, row, int(threadIdx.x));
    return;
  }
  const T* lrow = static_cast<const T*>(a.logits) + row * a.row_stride;
  const float tau = a.threshold ? a.threshold[row] : -INFINITY;
  const int64_t base = int64_t(c) * kChunk;
  float v[kPerThread];
  float gm[kSeg];  // the maxima of the thread's segments (sums of eight), kept tokens only
  int bad = 0;
  // A full chunk at a 16-byte aligned address: 16-byte loads, lane t of load q holding elements
  // (q * kThreads + t) * kVec .. + kVec - 1 (each load instruction reads one contiguous span of the
  // warp); otherwise one element per load, element j of thread t at j * kThreads + t. Either way
  // coalesced (the Nsight profile of a 2-byte-load version showed half the stalls on loads), and a
  // thread's indices increase with j.
  constexpr int kVec = 16 / int(sizeof(T));
  const bool vec = base + kChunk <= a.vocab && (reinterpret_cast<uintptr_t>(lrow + base) & 15u) == 0;
  auto index = [&](int j) -> int64_t {
    return vec ? base + (int64_t(j / kVec) * kThreads + threadIdx.x) * kVec + j % kVec
               : base + int64_t(j) * kThreads + threadIdx.x;
  };
  if (vec) {
#pragma unroll
    for (int q = 0; q < kPerThread / kVec; ++q) {
      union { uint4 u; T e[kVec]; } r;
      r.u = reinterpret_cast<const uint4*>(lrow + base)[q * kThreads + threadIdx.x];
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[q * kVec + e] = tof(r.e[e]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t i = index(j);
      v[j] = i < a.vocab ? tof(lrow[i]) : -INFINITY;
    }
  }
#pragma unroll
  for (int g = 0; g < kSeg; ++g) gm[g] = -INFINITY;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const float x = v[j];  // -inf past the vocabulary
    // NaN / +inf: with a threshold checked here; without one, +inf is the max and NaN makes the sum NaN
    if (HAS_T) bad |= (x != x) | (x == INFINITY);
    const float kv = !HAS_T || x >= tau ? x : -INFINITY;
    v[j] = kv;
    gm[j / 8] = fmaxf(gm[j / 8], kv);
  }
  float m1 = fmaxf(fmaxf(gm[0], gm[1]), fmaxf(gm[2], gm[3]));
  static_assert(kSeg == 4, "four segments: m1 above, warp_sum4 below");
  // bits 1-4 of bad: the segments holding a kept token (block-reduced with it)
#pragma unroll
  for (int g = 0; g < kSeg; ++g) bad |= int(gm[g] > -INFINITY) << (g + 1);
  // block reduce (m1, bad)
  __shared__ float sm1[kThreads / 32];
  __shared__ int sbad[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, o));
    bad |= __shfl_xor_sync(0xffffffffu, bad, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sm1[warp] = m1; sbad[warp] = bad; }
  __syncthreads();
  m1 = sm1[0];
  bad = sbad[0];
  for (int w = 1; w < kThreads / 32; ++w) {
    m1 = fmaxf(m1, sm1[w]);
    bad |= sbad[w];
  }
  const int kept = bad >> 1;
  bad &= 1;
  // exponentials relative to the chunk max
  // T above kMaxTemperature samples as kMaxTemperature (1 / T would be 0: -inf * 0 = NaN at a banned token)
  const double inv_t = 1.0 / (a.temperature == 0.0 ? 1.0 : fmin(a.temperature, kMaxTemperature));
  const float inv_tf = fminf(float(inv_t), FLT_MAX);  // T < 1 / FLT_MAX: inf * 0 would give NaN at the max
  double sg[kSeg] = {0, 0, 0, 0}, t = 0, z = 0;
  float below = -INFINITY;
  int nlo = 0;
  int64_t arg = -1;
  if (m1 > -INFINITY) {
    if (inv_tf == 1.f)
      exp_sums<STATS, true>(v, m1, inv_tf, sg, t, z, below, nlo);
    else
      exp_sums<STATS, false>(v, m1, inv_tf, sg, t, z, below, nlo);
    if (ARG) {
#pragma unroll
      for (int j = kPerThread - 1; j >= 0; --j) arg = v[j] == m1 ? index(j) : arg;  // the thread's first
    }
  } else if (!HAS_T) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) sg[0] = v[j] != v[j] ? double(NAN) : sg[0];  // only NaN and -inf here
  }
  if (!HAS_T) bad |= m1 == INFINITY;  // (the NaN case: S != S below)
  const double s = warp_sum4(sg, lane);  // lane 8g: segment g
  if (STATS) {
    t = warp_sum(t);
    z = warp_sum(z);
    for (int o = 16; o > 0; o >>= 1) {
      below = fmaxf(below, __shfl_xor_sync(0xffffffffu, below, o));
      nlo += __shfl_xor_sync(0xffffffffu, nlo, o);
    }
  }
  if (ARG) {
    for (int o = 16; o > 0; o >>= 1) {
      const int64_t oa = __shfl_xor_sync(0xffffffffu, arg, o);
      arg = oa >= 0 && (arg < 0 || oa < arg) ? oa : arg;
    }
  }
  __shared__ double ss[kThreads / 32][kSeg], st[kThreads / 32], sz[kThreads / 32];
  __shared__ float sb[kThreads / 32];
  __shared__ int sn[kThreads / 32];
  __shared__ int64_t sarg[kThreads / 32];
  __syncthreads();
  if (lane % 8 == 0) ss[warp][lane / 8] = s;
  if (lane == 0) { st[warp] = t; sz[warp] = z; sb[warp] = below; sn[warp] = nlo; sarg[warp] = arg; }
  __syncthreads();
  if (threadIdx.x == 0) {
    double Tt = 0, Zc = 0, seg[kSeg] = {0, 0, 0, 0};
    int nbelow = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      for (int g = 0; g < kSeg; ++g) seg[g] += ss[w][g];
      if (STATS) {
        Tt += st[w];
        Zc += sz[w];
        below = fmaxf(below, sb[w]);
        nbelow += sn[w];
      }
      if (ARG && sarg[w] >= 0 && (arg < 0 || sarg[w] < arg)) arg = sarg[w];
    }
    const double S = ((seg[0] + seg[1]) + seg[2]) + seg[3];
    // the maxima: every logit not below m1 (m1 the max of a NaN-free chunk; a NaN chunk is flagged)
    const int nmax = kChunk - nbelow;
    Partial p;
    p.s = S;
    int flushed = 0;
    for (int g = 0; g < kSeg; ++g) {
      p.seg[g] = seg[g];
      flushed |= ((kept >> g) & 1) && !(seg[g] > 0.0) ? 1 << g : 0;
    }
    p.flushed = flushed;
    p.t = Tt;
    p.z = m1 > -INFINITY ? Zc + double(nmax) : 0.0;
    p.m1 = m1;
    p.m2 = m1 > -INFINITY && nmax > 1 ? m1 : below;  // the second max, with multiplicity
    p.arg = arg;
    p.bad = bad | (!HAS_T && S != S);  // without a threshold a NaN logit reaches S (exp2 keeps NaN)
    part[row * nchunks + c] = p;
  }
  if (FUSED) {
    __shared__ int s_last;
    if (threadIdx.x == 0) {
      __threadfence();  // this block's partial, device-wide, before its count
      s_last = atomicAdd(counters + row, 1) == nchunks - 1;
    }
    __syncthreads();
    if (s_last) {
      __threadfence();  // (the other blocks' partials were fenced before their counts)
      if (threadIdx.x < 32) select_row<T>(a, part, nchunks, row, int(threadIdx.x));
    }
  }
}

// One row's second pass, by one whole warp (lane = its lane): combines the row's chunk partials,
// writes the row's token, probability and statistics. Called by select_kernel (a warp per row) or,
// fused, by the row's last partial block to finish (partial_kernel with counters).
template <typename T>
__device__ void select_row(const SampleArgs& a, const Partial* __restrict__ part, int nchunks, int64_t row, int lane) {
  double* st = a.stats + 3 * row;
  const double nan = __longlong_as_double(0x7ff8000000000000ll);
  if (a.row_mask && !a.row_mask[row]) {
    if (lane == 0) { a.tokens[row] = -1; a.prob[row] = nan; st[0] = st[1] = st[2] = nan; }
    return;
  }
  const Partial* P = part + row * nchunks;
  float M = -INFINITY, M2 = -INFINITY;
  int64_t arg = -1;
  int bad = 0;
  for (int c = lane; c < nchunks; c += 32) {
    merge_top2(M, M2, arg, P[c].m1, P[c].m2, P[c].arg);
    bad |= P[c].bad;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float o1 = __shfl_xor_sync(0xffffffffu, M, o), o2 = __shfl_xor_sync(0xffffffffu, M2, o);
    const int64_t oa = __shfl_xor_sync(0xffffffffu, arg, o);
    merge_top2(M, M2, arg, o1, o2, oa);
    bad |= __shfl_xor_sync(0xffffffffu, bad, o);
  }
  if (a.threshold && a.threshold[row] != a.threshold[row]) bad = 1;
  if (bad || M == -INFINITY) {
    if (lane == 0) { a.tokens[row] = -2; a.prob[row] = nan; st[0] = st[1] = st[2] = nan; }
    return;
  }
  const double t_stat = a.temperature == 0.0 ? 1.0 : fmin(a.temperature, kMaxTemperature);
  const bool stats = a.want_stats || a.temperature == 0.0;  // else m2, arg and t were not computed
  double Z = 0, Zs = 0, tsum = 0;  // Zs: Z from the split sums (z), for the statistics
  for (int c = lane; c < nchunks; c += 32) {
    if (P[c].s == 0.0) continue;
    const double off = (double(P[c].m1) - double(M)) / t_stat;
    const double w = exp(off);
    Z += P[c].s * w;
    if (stats) {
      Zs += P[c].z * w;
      tsum += w * (P[c].t + P[c].z * off);
    }
  }
  Z = warp_sum(Z);
  Zs = warp_sum(Zs);
  tsum = warp_sum(tsum);
  // A valid row has Z >= 1 (the chunk holding the maximum contributes e = 1 at weight 1); anything else
  // (a NaN the partial kernels did not flag) is an invalid row, never a token search over NaN sums.
  if (!(Z >= 1.0)) {
    if (lane == 0) { a.tokens[row] = -2; a.prob[row] = nan; st[0] = st[1] = st[2] = nan; }
    return;
  }
  if (lane == 0) {
    st[0] = stats ? 1.0 / Zs : nan;
    st[1] = stats ? (1.0 - exp((double(M2) - double(M)) / t_stat)) / Zs : nan;
    st[2] = stats ? log(Zs) - tsum / Zs : nan;
  }
  if (a.temperature == 0.0) {
    if (lane == 0) { a.tokens[row] = arg; a.prob[row] = 1.0 / Zs; }
    return;
  }
  // pick the chunk: ordered prefix over chunks, 32 at a time
  const double target = uniform53(a.seeds[row], a.offsets[row]) * Z;
  double acc = 0;
  int c_sel = -1, c_last = -1;
  double w_sel = 0;
  for (int g = 0; g < nchunks && c_sel < 0; g += 32) {
    const int c = g + lane;
    double w = 0, inc = 0;
    if (c < nchunks && P[c].s > 0.0) {
      w = exp((double(P[c].m1) - double(M)) / t_stat);
      inc = P[c].s * w;
    }
    double scan = inc;
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffffu, scan, o);
      if (lane >= o) scan += y;
    }
    const unsigned hit = __ballot_sync(0xffffffffu, inc > 0 && acc + scan > target);
    const unsigned nz = __ballot_sync(0xffffffffu, inc > 0);
    if (nz) c_last = g + 31 - __clz(nz);
    if (hit) {
      const int l = __ffs(hit) - 1;
      c_sel = g + l;
      w_sel = __shfl_sync(0xffffffffu, w, l);
      acc += __shfl_sync(0xffffffffu, scan - inc, l);
    } else {
      acc += __shfl_sync(0xffffffffu, scan, 31);
    }
  }
  const bool beyond = c_sel < 0;  // rounding: u Z beyond the last cumulative sum
  if (beyond) {
    c_sel = c_last;
    w_sel = exp((double(P[c_sel].m1) - double(M)) / t_stat);
  }
  // The target's share of the chunk sum s left: the segment holding it, from the segment sums (beyond
  // the last cumulative one by rounding: the last segment with a kept token). Where a segment holds
  // kept tokens whose fp32 exponentials all flushed to 0 (a sum of 0 would never be picked), the
  // whole chunk is rescanned instead, so that every kept token keeps its float64 weight.
  const Partial& pc = P[c_sel];
  const double share = (target - acc) / w_sel;  // (unused if beyond)
  int64_t lo = int64_t(c_sel) * kChunk, end = lo + kChunk;
  double num = share, den = pc.s;
  bool past = beyond;
  if (pc.flushed == 0) {
    double run;
    int klast;
    int ks = pick_cumulative(pc.seg, share, run, klast);
    if (ks < 0) {
      ks = klast;
      past = true;
    }
    lo += int64_t(ks) * kSegLen;
    end = lo + kSegLen;
    num = share - run;
    den = pc.seg[ks];
  }
  // rescan that segment (or chunk)
  const T* lrow = static_cast<const T*>(a.logits) + row * a.row_stride;
  const float tau = a.threshold ? a.threshold[row] : -INFINITY;
  const float mc = pc.m1;
  const float inv_tf = fminf(float(1.0 / t_stat), FLT_MAX);  // as in partial_kernel
  const int64_t hi = end < a.vocab ? end : a.vocab;
  // Its float64 total with the rescan's exponentials (relative to the chunk max), in steps of 512
  // logits (16 coalesced loads in flight per lane: each step waits one DRAM round trip; a segment is
  // two steps), the steps' sums kept; the target at the same share of that total as of the partial
  // kernel's fp32-summed one; then only the step holding it is scanned again (beyond the last
  // cumulative sum: the last kept token, i.e. in the last step with a kept logit).
  constexpr int kA = 16, kSteps = kChunk / (32 * kA);
  double stot[kSteps];
  double tot = 0;
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    const int64_t g = lo + int64_t(k) * 32 * kA;
    double ls = 0;
    if (g < hi) {  // (warp-uniform)
      float xv[kA];
#pragma unroll
      for (int q = 0; q < kA; ++q) {
        const int64_t i = g + q * 32 + lane;
        xv[q] = i < hi ? tof(lrow[i]) : -INFINITY;
      }
#pragma unroll
      for (int q = 0; q < kA; ++q) ls += xv[q] >= tau && xv[q] > -INFINITY ? exp_neg((xv[q] - mc) * inv_tf) : 0.0;
    }
    stot[k] = warp_sum(ls);
    tot += stot[k];
  }
  const double rem = past ? INFINITY : num / den * tot;
  double run;
  int klast;
  const int ks = pick_cumulative(stot, rem, run, klast);
  const int64_t slo = lo + int64_t(ks < 0 ? klast : ks) * 32 * kA;
  const int64_t shi = slo + 32 * kA < hi ? slo + 32 * kA : hi;
  // that step: kE consecutive logits per lane and pass (their loads issued together), lane sums
  // scanned across the warp, the hit lane then walks its kE
  int64_t tok = -1, last = -1;
  double etok = 0, elast = 0;
  constexpr int kE = 8;
  for (int64_t g = slo; g < shi && tok < 0; g += 32 * kE) {
    const int64_t i0 = g + int64_t(lane) * kE;
    float xv[kE];
#pragma unroll
    for (int q = 0; q < kE; ++q) xv[q] = i0 + q < shi ? tof(lrow[i0 + q]) : -INFINITY;
    double e[kE], lsum = 0, e_last = 0;
    int qlast = -1;
#pragma unroll
    for (int q = 0; q < kE; ++q) {
      e[q] = xv[q] >= tau && xv[q] > -INFINITY ? exp_neg((xv[q] - mc) * inv_tf) : 0.0;
      lsum += e[q];
      if (e[q] > 0) { qlast = q; e_last = e[q]; }  // (no indexing by a run-time q: e stays in registers)
    }
    double scan = lsum;
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffffu, scan, o);
      if (lane >= o) scan += y;
    }
    const unsigned hit = __ballot_sync(0xffffffffu, lsum > 0 && run + scan > rem);
    const unsigned nz = __ballot_sync(0xffffffffu, qlast >= 0);
    if (nz) {
      const int l = 31 - __clz(nz);
      last = g + int64_t(l) * kE + __shfl_sync(0xffffffffu, qlast, l);
      elast = __shfl_sync(0xffffffffu, e_last, l);
    }
    if (hit) {
      const int l = __ffs(hit) - 1;
      // in lane l: the first kept logit whose running sum passes rem (its last kept one if rounding
      // leaves the walk a hair short of the scan that chose the lane)
      double p = run + scan - lsum, e_sel = e_last;
      int qsel = -1;
#pragma unroll
      for (int q = 0; q < kE; ++q) {
        p += e[q];
        if (qsel < 0 && e[q] > 0 && p > rem) { qsel = q; e_sel = e[q]; }
      }
      qsel = qsel < 0 ? qlast : qsel;
      const int qs = __shfl_sync(0xffffffffu, qsel, l);
      tok = g + int64_t(l) * kE + qs;
      etok = __shfl_sync(0xffffffffu, e_sel, l);
    }
    run += __shfl_sync(0xffffffffu, scan, 31);
  }
  if (tok < 0) { tok = last; etok = elast; }
  if (lane == 0) {
    a.tokens[row] = tok;
    a.prob[row] = etok * w_sel / Z;
  }
}

template <typename T>
__global__ void select_kernel(SampleArgs a, const Partial* __restrict__ part, int nchunks) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= a.rows) return;
  select_row<T>(a, part, nchunks, row, int(threadIdx.x % 32));
}

// The fused select (partial_kernel with counters, no select_kernel): opt-in by PYDIFF_SAMPLING_FUSED=1,
// read on every call (slower than the two kernels on an H200: 1.56x against 1.04x of amax).
bool fused_select() {
  const char* e = getenv("PYDIFF_SAMPLING_FUSED");
  return e && e[0] == '1' && e[1] == '\0';  // exactly "1", as the Triton launcher reads it
}

template <typename T>
cudaError_t launch(const SampleArgs& a, void* ws, cudaStream_t s, int* counters) {
  const int nchunks = int((a.vocab + kChunk - 1) / kChunk);
  Partial* part = static_cast<Partial*>(ws);
  if (a.rows > 65535) {
    // grid.y limit: process rows in slices
    for (int64_t r0 = 0; r0 < a.rows; r0 += 65535) {
      SampleArgs b = a;
      const int64_t n = a.rows - r0 < 65535 ? a.rows - r0 : 65535;
      b.rows = n;
      b.logits = static_cast<const T*>(a.logits) + r0 * a.row_stride;
      b.threshold = a.threshold ? a.threshold + r0 : nullptr;
      b.row_mask = a.row_mask ? a.row_mask + r0 : nullptr;
      b.seeds = a.seeds + r0;
      b.offsets = a.offsets + r0;
      b.tokens = a.tokens + r0;
      b.prob = a.prob + r0;
      b.stats = a.stats + 3 * r0;
      const cudaError_t err = launch<T>(b, part + r0 * nchunks, s, counters ? counters + r0 : nullptr);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const int rows_per_block = 4;
  const bool argmax = a.temperature == 0.0;
  const bool stats = a.want_stats || argmax;
  const bool has_t = a.threshold != nullptr;
  auto pick = [&](auto fused) {
    constexpr bool F = decltype(fused)::value;
    return argmax ? (has_t ? partial_kernel<T, true, true, true, F> : partial_kernel<T, true, false, true, F>)
           : stats ? (has_t ? partial_kernel<T, true, true, false, F> : partial_kernel<T, true, false, false, F>)
                   : (has_t ? partial_kernel<T, false, true, false, F> : partial_kernel<T, false, false, false, F>);
  };
  auto pk = counters ? pick(std::true_type{}) : pick(std::false_type{});
#ifdef PYDIFF_CUDA_EMU
  cuda_emu::launch(pk, dim3(unsigned(nchunks), unsigned(a.rows)), dim3(kThreads), 0, s, a, part, nchunks, counters);
  if (!counters)
    cuda_emu::launch(select_kernel<T>, dim3(unsigned((a.rows + rows_per_block - 1) / rows_per_block)),
                     dim3(32 * rows_per_block), 0, s, a, part, nchunks);
#else
  pk<<<dim3(unsigned(nchunks), unsigned(a.rows)), kThreads, 0, s>>>(a, part, nchunks, counters);
  if (!counters)
    select_kernel<T><<<unsigned((a.rows + rows_per_block - 1) / rows_per_block), 32 * rows_per_block, 0, s>>>(
        a, part, nchunks);
#endif
  return cudaGetLastError();
}

// The workspace: the partials (rows x chunks), then one int32 counter per row (the fused select's).
int64_t partials_bytes(int64_t rows, int64_t vocab) {
  return rows * ((vocab + kChunk - 1) / kChunk) * int64_t(sizeof(Partial));
}

template <typename T>
cudaError_t launch_all(const SampleArgs& a, void* ws, cudaStream_t s) {
  int* counters = nullptr;
  if (fused_select()) {
    counters = reinterpret_cast<int*>(static_cast<char*>(ws) + partials_bytes(a.rows, a.vocab));
#ifdef PYDIFF_CUDA_EMU
    std::memset(counters, 0, size_t(a.rows) * sizeof(int));
#else
    const cudaError_t err = cudaMemsetAsync(counters, 0, size_t(a.rows) * sizeof(int), s);
    if (err != cudaSuccess) return err;
#endif
  }
  return launch<T>(a, ws, s, counters);
}

}  // namespace

int64_t sample_categorical_cuda_workspace(int64_t rows, int64_t vocab) {
  return partials_bytes(rows, vocab) + rows * int64_t(sizeof(int));
}

int sample_categorical_cuda(const SampleArgs& a, void* workspace, void* stream) {
  if (a.rows < 0 || a.vocab < 1 || a.row_stride < 0 || !(a.temperature >= 0)) return int(cudaErrorInvalidValue);
  if (a.rows == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kF32: return int(launch_all<float>(a, workspace, s));
    case DType::kF16: return int(launch_all<__half>(a, workspace, s));
    case DType::kBF16: return int(launch_all<__nv_bfloat16>(a, workspace, s));
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace pydiff
