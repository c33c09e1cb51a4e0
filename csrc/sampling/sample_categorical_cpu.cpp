// Exact categorical sampling, CPU kernel. Rows in parallel (OpenMP); each row in chunks of
// kSampleChunk logits (fp16 / bf16 converted to fp32 in L1, fp32 read in place): chunk max, then
// the exponentials relative to it (a vectorised exp: fp32 polynomial on a reduced argument,
// scaled by 2^k in float64 so nothing underflows above 1e-308), summed in float64. A float64
// uniform picks the chunk by the cumulative chunk sums and a rescan of that chunk picks the token;
// at T = 0 the first argmax is tracked in the first pass (no rescan). Definition:
// pydiff/reference/sampling.py; declarations: csrc/include/pydiff/sampling.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "pydiff/cpu_convert.h"
#include "pydiff/cpu_types.h"
#include "pydiff/sampling.h"

namespace pydiff {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct ChunkMax {
  float m1, m2;  // largest and second-largest kept value (with multiplicity)
  float mn;      // smallest kept finite value
  bool bad;      // NaN or +inf seen
  int arg;       // first index of m1 in the chunk (want_arg; -1 when nothing is kept)
};

// GCC/Clang vector extensions: 8 lanes; the avx2 clone maps them to 256-bit registers.
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef long long v4l __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
// 8 fp32 (int32) lanes widened to two 4-lane float64 (int64) halves. Written as a scalar loop on
// purpose: GCC 12 lowers __builtin_convertvector(v4f -> v4d) to two 128-bit vcvtps2pd through the
// stack (a store-forwarding stall that took ~40 % of chunk_exp), while this loop vectorises to one
// 256-bit vcvtps2pd (vpmovsxdq) per half.
__attribute__((always_inline)) inline void widen8(v8f v, v4d& lo, v4d& hi) {
  float f[8];
  double d[8];
  std::memcpy(f, &v, sizeof f);
  for (int j = 0; j < 8; ++j) d[j] = f[j];
  std::memcpy(&lo, d, sizeof lo);
  std::memcpy(&hi, d + 4, sizeof hi);
}
__attribute__((always_inline)) inline void widen8(v8i v, v4l& lo, v4l& hi) {
  int f[8];
  long long d[8];
  std::memcpy(f, &v, sizeof f);
  for (int j = 0; j < 8; ++j) d[j] = f[j];
  std::memcpy(&lo, d, sizeof lo);
  std::memcpy(&hi, d + 4, sizeof hi);
}
__attribute__((always_inline)) inline float hmax(v8f v) { float m = v[0]; for (int j = 1; j < 8; ++j) m = v[j] > m ? v[j] : m; return m; }

// n8: n rounded up to 8, the tail padded with -inf by the caller. One pass: per lane the two
// largest kept values with multiplicity (m2 = max(m2, min(m1, v)), then m1 = max(m1, v)) and, with
// want_arg, the first index of the lane's maximum; the lanes' 16 values give the chunk's top two
// with multiplicity, the smallest index among the lanes holding m1 its first argmax.
PYDIFF_CLONES_AVX2 ChunkMax chunk_max(const float* __restrict__ l, int64_t n8, float tau, bool want_m2, bool want_arg) {
  const v8f ninf = v8f{} + kNegInf, pinf = v8f{} - kNegInf, vtau = v8f{} + tau;
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  v8f m = ninf, m2 = ninf, mn = pinf;
  v8i bad = v8i{}, arg = v8i{} - 1;
  for (int64_t i = 0; i < n8; i += 8) {
    const v8f v = load8(l + i);
    bad |= (v != v) | (v == pinf);
    const v8f kv = v >= vtau ? v : ninf;
    if (want_arg) arg = kv > m ? lane + int(i) : arg;  // strict: the lane's first occurrence stays
    if (want_m2) {
      const v8f lo = kv < m ? kv : m;
      m2 = lo > m2 ? lo : m2;
    }
    m = kv > m ? kv : m;
    const v8f fv = kv > ninf ? kv : pinf;
    mn = fv < mn ? fv : mn;
  }
  float vmin = mn[0];
  for (int j = 1; j < 8; ++j) vmin = mn[j] < vmin ? mn[j] : vmin;
  int any_bad = 0;
  for (int j = 0; j < 8; ++j) any_bad |= bad[j];
  const float m1 = hmax(m);
  int count = 0, first = -1;
  float below = kNegInf;
  for (int j = 0; j < 8; ++j) {
    if (m[j] == m1) {
      ++count;
      if (arg[j] >= 0 && (first < 0 || arg[j] < first)) first = arg[j];
    } else if (m[j] > below) {
      below = m[j];
    }
    if (m2[j] > below) below = m2[j];
  }
  const float second = want_m2 ? ((count > 1 && m1 > kNegInf) ? m1 : below) : kNegInf;
  return {m1, second, vmin, any_bad != 0, m1 > kNegInf ? first : -1};
}

// e[i] = exp(x[i]) with x[i] = (l[i] - mc) * inv_t for kept tokens (l[i] >= tau), else 0, and
// the float64 sums s = sum e[i], t = sum e[i] x[i] in a fixed lane order (deterministic).
// exp(x) = p * 2^k: p = e^r by an fp32 polynomial on r = x - k ln2 (|r| <= ln2/2, relative error
// ~2e-7), 2^k applied in float64, so values down to 1e-308 survive (fp32 would flush at 1e-38).
// fast: every kept finite e of the chunk is a normal fp32 number (x >= -86), so e = p * 2^k is
// formed exactly in fp32 and only widened to float64 for the sums. with_t = false: t is not summed
// (the entropy statistic only).
PYDIFF_CLONES_AVX2 void chunk_exp(const float* __restrict__ l, int64_t n8, float mc, float inv_t, float tau, bool fast,
                             bool with_t, double* __restrict__ e, double* s_out, double* t_out) {
  const v8f vmc = v8f{} + mc, vinv = v8f{} + inv_t, vtau = v8f{} + tau, lo = v8f{} - 1000.f;
  const v8f zero = v8f{};
  v4d s0 = v4d{}, s1 = v4d{}, t0 = v4d{}, t1 = v4d{};
  for (int64_t i = 0; i < n8; i += 8) {
    const v8f v = load8(l + i);
    v8f x = (v - vmc) * vinv;
    x = x < lo ? lo : x;  // also maps -inf (and the padding) to a value whose 2^k is 0 below
    v8f kf = x * 1.44269504088896341f;
    kf = (kf + 12582912.f) - 12582912.f;  // round to nearest integer
    v8f r = x - kf * 0.693359375f;        // Cody-Waite ln2 split
    r = r - kf * -2.12194440e-4f;
    v8f p = v8f{} + 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const v8i keep = v >= vtau;
    p = keep ? p : zero;
    v8i k = __builtin_convertvector(kf, v8i);
    if (fast) {
      // e = p * 2^k is a normal fp32 number: add k to p's exponent (exact), widen to float64 to sum
      v8i pb;
      std::memcpy(&pb, &p, sizeof pb);
      pb += k << 23;
      v8f ef;
      std::memcpy(&ef, &pb, sizeof ef);
      ef = (keep & (v > v8f{} + kNegInf)) ? ef : zero;
      v4d e0, e1;
      widen8(ef, e0, e1);
      if (e) {
        std::memcpy(e + i, &e0, sizeof e0);
        std::memcpy(e + i + 4, &e1, sizeof e1);
      }
      s0 += e0;
      s1 += e1;
      if (with_t) {
        v4d x0, x1;
        widen8(x, x0, x1);
        t0 += e0 * x0;
        t1 += e1 * x1;
      }
      continue;
    }
    k = k < -1023 ? v8i{} - 1023 : k;  // biased exponent 0: scale 0
    v4d pw[2], xw[2] = {};
    v4l kw[2];
    widen8(p, pw[0], pw[1]);
    widen8(k, kw[0], kw[1]);
    if (with_t) widen8(x, xw[0], xw[1]);
    for (int h = 0; h < 2; ++h) {
      const v4l bits = (kw[h] + 1023) << 52;
      v4d scale;
      std::memcpy(&scale, &bits, sizeof scale);
      const v4d ev = pw[h] * scale;
      if (e) std::memcpy(e + i + 4 * h, &ev, sizeof ev);
      const v4d tx = with_t ? ev * xw[h] : v4d{};
      if (h == 0) { s0 += ev; t0 += tx; } else { s1 += ev; t1 += tx; }
    }
  }
  const v4d s = s0 + s1, t = t0 + t1;
  *s_out = (s[0] + s[1]) + (s[2] + s[3]);
  *t_out = (t[0] + t[1]) + (t[2] + t[3]);
}

// n logits as fp32, padded to n8 (a multiple of 8) with -inf: converted into dst, or, for fp32
// logits whose n is already a multiple of 8, the source itself (no copy).
template <typename T>
const float* load_chunk(const T* src, int64_t n, float* dst, int64_t* n8_out) {
  const int64_t n8 = (n + 7) & ~int64_t(7);
  *n8_out = n8;
  if constexpr (std::is_same_v<T, float>) {
    if (n8 == n) return src;
  }
  convert_to_float(src, n, dst);
  for (int64_t i = n; i < n8; ++i) dst[i] = kNegInf;
  return dst;
}

template <typename T>
void sample_rows(const SampleArgs& a) {
  const int64_t V = a.vocab, C = kSampleChunk;
  const int64_t nchunks = (V + C - 1) / C;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const bool argmax = a.temperature == 0.0;
  const bool stats = a.want_stats || argmax;  // else: no second max, no entropy sum, NaN statistics
  const double t_stat = argmax ? 1.0 : std::min(a.temperature, kMaxTemperature);
  // clamped: for T < 1 / FLT_MAX, float(1 / T) = inf and (l - M) * inf = NaN at the max itself (T above
  // kMaxTemperature was clamped above: 1 / T would be 0 and -inf * 0 = NaN at a banned token)
  const float inv_t = std::min(float(1.0 / t_stat), std::numeric_limits<float>::max());
#pragma omp parallel if (a.rows > 1 && a.rows * a.vocab >= (int64_t(1) << 15))
  {
    std::vector<float> lbuf(C);
    std::vector<double> ebuf(C);
    std::vector<double> cm(nchunks), cs(nchunks), ct(nchunks);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < a.rows; ++r) {
      double* st = a.stats + 3 * r;
      if (a.row_mask && !a.row_mask[r]) {
        a.tokens[r] = -1;
        a.prob[r] = nan;
        st[0] = st[1] = st[2] = nan;
        continue;
      }
      const T* row = static_cast<const T*>(a.logits) + r * a.row_stride;
      const float tau = a.threshold ? a.threshold[r] : kNegInf;
      float M = kNegInf, M2 = kNegInf;
      int64_t first_arg = -1;  // first index of M in the row (argmax)
      bool bad = std::isnan(tau);
      // pass 1: per chunk max (kept), exponentials relative to it, float64 sums
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t lo = c * C, n = std::min(C, V - lo);
        int64_t n8;
        const float* l = load_chunk<T>(row + lo, n, lbuf.data(), &n8);
        const ChunkMax mx = chunk_max(l, n8, tau, stats, argmax);
        bad |= mx.bad;
        if (argmax && mx.m1 > M) first_arg = lo + mx.arg;  // an equal M in a later chunk is not first
        // merge top-2
        if (mx.m1 > M) {
          M2 = std::max(M, mx.m2);
          M = mx.m1;
        } else if (mx.m1 == M) {
          M2 = M;
        } else {
          M2 = std::max(M2, mx.m1);
        }
        cm[c] = mx.m1;
        if (mx.m1 == kNegInf) {
          cs[c] = ct[c] = 0.0;
          continue;
        }
        chunk_exp(l, n8, mx.m1, inv_t, tau, (mx.mn - mx.m1) * inv_t >= -86.f, stats, nullptr, &cs[c],
                  &ct[c]);
      }
      if (bad || M == kNegInf) {
        a.tokens[r] = -2;
        a.prob[r] = nan;
        st[0] = st[1] = st[2] = nan;
        continue;
      }
      // combine: Z = sum_c cs_c w_c with w_c = exp((m_c - M) / T')
      double Z = 0, tsum = 0;
      for (int64_t c = 0; c < nchunks; ++c) {
        if (cs[c] == 0.0) continue;
        const double off = (double(cm[c]) - double(M)) / t_stat;
        const double w = std::exp(off);
        cm[c] = w;  // reuse as the chunk weight
        Z += cs[c] * w;
        tsum += w * (ct[c] + cs[c] * off);
      }
      st[0] = stats ? 1.0 / Z : nan;
      st[1] = stats ? (1.0 - std::exp((double(M2) - double(M)) / t_stat)) / Z : nan;
      st[2] = stats ? std::log(Z) - tsum / Z : nan;
      int64_t tok = -1;
      double etok = 0;
      if (argmax) {
        tok = first_arg;
        etok = 1.0;
      } else {
        const double target = uniform53(a.seeds[r], a.offsets[r]) * Z;
        double acc = 0;
        int64_t c_sel = -1, c_last = -1;
        for (int64_t c = 0; c < nchunks; ++c) {
          if (cs[c] == 0.0) continue;
          c_last = c;
          const double inc = cs[c] * cm[c];
          if (acc + inc > target) { c_sel = c; break; }
          acc += inc;
        }
        if (c_sel < 0) c_sel = c_last;  // rounding: u Z beyond the last cumulative sum
        const int64_t lo = c_sel * C, n = std::min(C, V - lo);
        int64_t n8;
        const float* l = load_chunk<T>(row + lo, n, lbuf.data(), &n8);
        const ChunkMax mx = chunk_max(l, n8, tau, false, false);
        double s_unused, t_unused;
        chunk_exp(l, n8, mx.m1, inv_t, tau, (mx.mn - mx.m1) * inv_t >= -86.f, false, ebuf.data(), &s_unused,
                  &t_unused);
        const double w = cm[c_sel];
        const double rem = (target - acc) / w;
        double a2 = 0;
        int64_t last = -1;
        for (int64_t i = 0; i < n; ++i) {
          if (ebuf[i] <= 0) continue;
          last = i;
          a2 += ebuf[i];
          if (a2 > rem) { tok = lo + i; etok = ebuf[i] * w; break; }
        }
        if (tok < 0) { tok = lo + last; etok = ebuf[last] * w; }
      }
      a.tokens[r] = tok;
      a.prob[r] = etok / Z;
    }
  }
}

}  // namespace

int sample_categorical_cpu(const SampleArgs& a) {
  if (a.rows < 0 || a.vocab < 1 || a.row_stride < 0 || !(a.temperature >= 0) || !std::isfinite(a.temperature))
    return 1;
  if (a.rows == 0) return 0;
  if (!a.logits || !a.seeds || !a.offsets || !a.tokens || !a.prob || !a.stats) return 1;
  switch (a.dtype) {
    case DType::kF32: sample_rows<float>(a); break;
    case DType::kF16: sample_rows<half_t>(a); break;
    case DType::kBF16: sample_rows<bf16_t>(a); break;
    default: return 1;
  }
  return 0;
}

}  // namespace pydiff
