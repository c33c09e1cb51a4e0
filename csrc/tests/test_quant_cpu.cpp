// C++ tests of the CPU quantization kernels (run by ctest):
//  - quant_gemm against a naive triple loop: the integer group sums in int64 and the same fp32
//    epilogue, so the outputs are compared bit for bit (int4, int8, fp8; bias, low-rank branch, all
//    output dtypes; odd sizes); adversarial all +7 x +7, all -8 x -8, +7 x -8 (int4), +127 x +127,
//    -128 x -128 (int8), 448 x 448 (fp8) at K up to 16384, and one group of 2^17 int8 products of
//    -128 x -128 (2^31: overflows an int32 accumulator, so the kernel must widen);
//  - quantize: fp8 e4m3 rounding (nearest, ties to even) against a brute-force nearest search over all
//    e4m3 values for a dense sweep of fp32 values; int4 / int8 rounding ties (half to even); a NaN or
//    inf group -> NaN scale and zero q; a zero group -> zero scale and zero q; int4 packing order.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "pydiff/cpu_types.h"
#include "pydiff/quant.h"

using namespace pydiff;

namespace {

float e4m3_value(int code) {  // positive codes 0..0x7e
  const int e = (code >> 3) & 0xf, m = code & 7;
  return e == 0 ? std::ldexp(float(m), -9) : std::ldexp(float(8 + m), e - 10);
}

// Round |v| <= 448 to the nearest e4m3 value by search; ties to the even code.
uint8_t e4m3_nearest(float v) {
  const double a = std::fabs(double(v));
  int best = 0;
  double bd = a;
  for (int c = 1; c <= 0x7e; ++c) {
    const double d = std::fabs(double(e4m3_value(c)) - a);
    if (d < bd || (d == bd && (c & 1) == 0)) {
      bd = d;
      best = c;
    }
  }
  return uint8_t(best | (std::signbit(v) ? 0x80 : 0));
}

int int_of(const uint8_t* q, QuantFormat f, int64_t i) {
  if (f == QuantFormat::kInt4) {
    const uint8_t b = q[i / 2];
    const int nib = (i % 2) ? (b >> 4) : (b & 0xf);
    return nib >= 8 ? nib - 16 : nib;
  }
  return int(int8_t(q[i]));
}

struct Quantized {
  std::vector<uint8_t> q;
  std::vector<float> s;
  int rc;
};

Quantized quantize(const std::vector<float>& x, int64_t M, int64_t K, int64_t G, QuantFormat f) {
  Quantized r;
  r.q.assign(size_t(f == QuantFormat::kInt4 ? M * K / 2 : M * K), 0xcd);  // poisoned
  r.s.assign(size_t(M * K / G), -1.0f);
  QuantizeArgs a{};
  a.fmt = f;
  a.prologue = QuantPrologue::kNone;
  a.M = M;
  a.K = K;
  a.group_size = G;
  a.x_dtype = FloatType::kF32;
  a.x = x.data();
  a.rows_per_batch = M;
  a.q = r.q.data();
  a.scales = r.s.data();
  r.rc = quantize_cpu(a);
  return r;
}

// ---------------------------------------------------------------- quantize
void test_fp8_rounding() {
  // each row: 448 first (amax = 448, scale = 448 / 448 = 1, so q = e4m3(y) exactly), then 31 sweep values
  std::vector<float> vals;
  for (int e = -24; e <= 8; ++e) {
    for (uint32_t hi = 0; hi < 4096; ++hi) {  // the top 12 mantissa bits, all patterns
      const uint32_t base = uint32_t(e + 127) << 23 | (hi << 11);
      for (uint32_t lo : {0u, 1u, 0x3ffu, 0x400u, 0x401u, 0x7ffu}) {
        const float v = bits_to_float(base | lo);
        if (v <= 448.0f) vals.push_back(v);
      }
    }
  }
  // every rounding tie of the normal range and the subnormal range, and their neighbours
  for (int c = 0; c < 0x7e; ++c) {
    const float mid = 0.5f * (e4m3_value(c) + e4m3_value(c + 1));
    vals.push_back(mid);
    vals.push_back(std::nextafter(mid, 0.0f));
    vals.push_back(std::nextafter(mid, 1000.0f));
  }
  vals.push_back(0.0f);
  vals.push_back(std::numeric_limits<float>::denorm_min());
  vals.push_back(std::numeric_limits<float>::min());
  const int64_t per = 31, G = 32;
  const int64_t M = int64_t((vals.size() + per - 1) / per) * 2;  // positive rows, then negated rows
  std::vector<float> x(size_t(M * G), 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float sgn = m < M / 2 ? 1.0f : -1.0f;
    x[m * G] = 448.0f * sgn;
    for (int64_t j = 0; j < per; ++j) {
      const size_t i = size_t((m % (M / 2)) * per + j);
      x[m * G + 1 + j] = i < vals.size() ? sgn * vals[i] : 0.0f;
    }
  }
  Quantized r = quantize(x, M, G, G, QuantFormat::kFp8E4M3);
  CHECK(r.rc == 0, "quantize fp8 rc=%d", r.rc);
  int bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    CHECK(r.s[m] == 1.0f, "fp8 sweep: scale %g != 1", r.s[m]);
    for (int64_t j = 0; j < G; ++j) {
      const uint8_t want = e4m3_nearest(x[m * G + j]);
      if (r.q[m * G + j] != want && bad++ < 10)
        CHECK(false, "fp8: e4m3(%.9g) = 0x%02x, expected 0x%02x", x[m * G + j], r.q[m * G + j], want);
    }
  }
  CHECK(bad == 0, "fp8: %d wrong conversions out of %lld", bad, (long long)(M * G));
  std::printf("fp8 e4m3 rounding: %lld values checked\n", (long long)(M * G));
}

void test_int_ties() {
  // int4: amax 7 -> scale 1; int8: amax 127 -> scale 1; y / 1 == y, so q = rint(y)
  const float t4[32] = {7.0f, 0.5f, 1.5f, 2.5f, 3.5f, 4.5f, 5.5f, 6.5f, -0.5f, -1.5f, -2.5f, -3.5f, -4.5f, -5.5f,
                        -6.5f, -7.0f, 2.5000002f, 2.4999998f, -0.49999997f, 0.0f, -0.0f, 1.0f, -1.0f, 3.0f,
                        6.4999995f, -6.5000005f, 0.25f, 0.75f, -0.75f, 1.25f, 5.0f, -2.0f};
  std::vector<float> x(t4, t4 + 32);
  Quantized r = quantize(x, 1, 32, 32, QuantFormat::kInt4);
  CHECK(r.rc == 0 && r.s[0] == 1.0f, "int4 ties: rc=%d scale=%g", r.rc, r.s[0]);
  for (int i = 0; i < 32; ++i) {
    const int want = int(std::nearbyint(t4[i]));  // default mode: half to even
    CHECK(int_of(r.q.data(), QuantFormat::kInt4, i) == want, "int4 tie: q(%.9g) = %d, expected %d", t4[i],
          int_of(r.q.data(), QuantFormat::kInt4, i), want);
  }
  const int ties8[] = {0, 2, 2, 4, 4, 6, 6, 126, 126, 124};
  const float v8[] = {0.5f, 1.5f, 2.5f, 3.5f, 4.5f, 5.5f, 6.5f, 125.5f, 126.5f, 124.5f};
  std::vector<float> y(64, 0.25f);
  y[0] = -127.0f;  // amax 127
  for (int i = 0; i < 10; ++i) {
    y[1 + i] = v8[i];
    y[11 + i] = -v8[i];
  }
  r = quantize(y, 1, 64, 64, QuantFormat::kInt8);
  CHECK(r.rc == 0 && r.s[0] == 1.0f, "int8 ties: rc=%d scale=%g", r.rc, r.s[0]);
  CHECK(int_of(r.q.data(), QuantFormat::kInt8, 0) == -127, "int8: q(-127) = %d",
        int_of(r.q.data(), QuantFormat::kInt8, 0));
  for (int i = 0; i < 10; ++i) {
    CHECK(int_of(r.q.data(), QuantFormat::kInt8, 1 + i) == ties8[i], "int8 tie %g -> %d", v8[i],
          int_of(r.q.data(), QuantFormat::kInt8, 1 + i));
    CHECK(int_of(r.q.data(), QuantFormat::kInt8, 11 + i) == -ties8[i], "int8 tie %g -> %d", -v8[i],
          int_of(r.q.data(), QuantFormat::kInt8, 11 + i));
  }
  CHECK(int_of(r.q.data(), QuantFormat::kInt8, 40) == 0, "int8: q(0.25) = %d",
        int_of(r.q.data(), QuantFormat::kInt8, 40));
  // a general scale: q = rint(y / s) with s = amax / 7, in fp32
  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd;
  std::vector<float> z(size_t(3 * 128));
  for (auto& v : z) v = nd(rng);
  for (QuantFormat f : {QuantFormat::kInt4, QuantFormat::kInt8}) {
    const float qm = f == QuantFormat::kInt4 ? 7.0f : 127.0f;
    r = quantize(z, 3, 128, 64, f);
    for (int64_t m = 0; m < 3; ++m)
      for (int64_t g = 0; g < 2; ++g) {
        float amax = 0.0f;
        for (int64_t k = 0; k < 64; ++k) amax = std::max(amax, std::fabs(z[m * 128 + g * 64 + k]));
        const volatile float s = amax / qm;
        CHECK(r.s[m * 2 + g] == s, "scale %g != %g", r.s[m * 2 + g], (float)s);
        for (int64_t k = 0; k < 64; ++k) {
          const volatile float v = z[m * 128 + g * 64 + k] / s;
          const int want = int(std::max(-qm - 1.0f, std::min(qm, std::nearbyint((float)v))));
          CHECK(int_of(r.q.data(), f, m * 128 + g * 64 + k) == want, "q mismatch at %lld", (long long)k);
        }
      }
  }
}

void test_special_groups() {
  const int64_t M = 2, K = 128, G = 32;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> x(size_t(M * K));
  for (auto& v : x) v = nd(rng);
  x[0 * K + 5] = std::numeric_limits<float>::quiet_NaN();        // row 0 group 0: NaN
  x[0 * K + 32 + 3] = std::numeric_limits<float>::infinity();    // row 0 group 1: inf
  for (int64_t k = 64; k < 96; ++k) x[0 * K + k] = k % 2 ? 0.0f : -0.0f;  // row 0 group 2: zeros
  x[1 * K + 127] = -std::numeric_limits<float>::infinity();      // row 1 group 3: -inf
  for (QuantFormat f : {QuantFormat::kInt4, QuantFormat::kInt8, QuantFormat::kFp8E4M3}) {
    Quantized r = quantize(x, M, K, G, f);
    CHECK(r.rc == 0, "rc=%d", r.rc);
    const int64_t per = f == QuantFormat::kInt4 ? G / 2 : G;
    auto group_zero = [&](int64_t m, int64_t g) {
      for (int64_t j = 0; j < per; ++j)
        if (r.q[size_t(m * (K / G) * per + g * per + j)] != 0) return false;
      return true;
    };
    CHECK(std::isnan(r.s[0]) && group_zero(0, 0), "fmt %d: NaN group: scale %g", int(f), r.s[0]);
    CHECK(std::isnan(r.s[1]) && group_zero(0, 1), "fmt %d: inf group: scale %g", int(f), r.s[1]);
    CHECK(r.s[2] == 0.0f && group_zero(0, 2), "fmt %d: zero group: scale %g", int(f), r.s[2]);
    CHECK(std::isnan(r.s[7]) && group_zero(1, 3), "fmt %d: -inf group: scale %g", int(f), r.s[7]);
    for (int g : {3, 4, 5, 6})
      CHECK(std::isfinite(r.s[g]) && r.s[g] > 0.0f, "fmt %d: ordinary group %d: scale %g", int(f), g, r.s[g]);
  }
  // packing order: channel 2j in the low nibble of byte j
  std::vector<float> p(32, 0.0f);
  p[0] = 7.0f;   // amax
  p[1] = -3.0f;  // byte 0 = 0x?7 | (-3 & 0xf) << 4 = 0xd7
  p[2] = 1.0f;   // byte 1 = 0x01
  Quantized r = quantize(p, 1, 32, 32, QuantFormat::kInt4);
  CHECK(r.q[0] == 0xd7 && r.q[1] == 0x01, "int4 packing: bytes 0x%02x 0x%02x", r.q[0], r.q[1]);
}

// ---------------------------------------------------------------- quant_gemm
struct GemmCase {
  QuantFormat f;
  int64_t M, N, K, G, R;
  bool bias;
  FloatType out;
};

float out_round(float v, FloatType t) {
  if (t == FloatType::kF16) return to_float(from_float<half_t>(v));
  if (t == FloatType::kBF16) return to_float(from_float<bf16_t>(v));
  return v;
}

float read_out(const std::vector<uint8_t>& o, FloatType t, int64_t i) {
  if (t == FloatType::kF32) {
    float v;
    std::memcpy(&v, o.data() + 4 * i, 4);
    return v;
  }
  uint16_t b;
  std::memcpy(&b, o.data() + 2 * i, 2);
  return t == FloatType::kF16 ? to_float(half_t{b}) : to_float(bf16_t{b});
}

// value of element i of a stored q row (int4 / int8 / fp8) as a double
double qval(const std::vector<uint8_t>& q, QuantFormat f, int64_t i) {
  if (f == QuantFormat::kFp8E4M3) {
    const uint8_t b = q[size_t(i)];
    const double v = e4m3_value(b & 0x7f);
    return (b & 0x80) ? -v : v;
  }
  return int_of(q.data(), f, i);
}

// Runs the kernel and the naive loop on the given operands; returns the number of mismatches.
int check_gemm(const GemmCase& c, const std::vector<uint8_t>& qa, const std::vector<uint8_t>& qw,
               const std::vector<float>& sa, const std::vector<float>& sw, const std::vector<float>& bias,
               const std::vector<float>& lact, const std::vector<float>& lup, const char* what) {
  const int64_t M = c.M, N = c.N, K = c.K, G = c.G, Gn = K / G, R = c.R;
  const int esz = c.out == FloatType::kF32 ? 4 : 2;
  std::vector<uint8_t> out(size_t(M * N * esz), 0xff);  // poisoned: NaN in every dtype
  QuantGemmArgs a{};
  a.fmt = c.f;
  a.M = M;
  a.N = N;
  a.K = K;
  a.group_size = G;
  a.qa = qa.data();
  a.sa = sa.data();
  a.qw = qw.data();
  a.sw = sw.data();
  a.bias = c.bias ? bias.data() : nullptr;
  a.bias_dtype = FloatType::kF32;
  a.lora_act = R ? lact.data() : nullptr;
  a.lora_act_dtype = FloatType::kF32;
  a.lora_up = R ? lup.data() : nullptr;
  a.lora_up_dtype = FloatType::kF32;
  a.rank = R;
  a.out = out.data();
  a.out_dtype = c.out;
  const int rc = quant_gemm_cpu(a);
  CHECK(rc == 0, "%s: rc=%d", what, rc);
  int bad = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int64_t g = 0; g < Gn; ++g) {
        // exact group sum: int64 for integers; fp8 products are exact in double and the sum is too
        double D = 0.0;
        int64_t Di = 0;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          if (c.f == QuantFormat::kFp8E4M3) D += qval(qa, c.f, m * K + k) * qval(qw, c.f, n * K + k);
          else Di += int64_t(int_of(qa.data(), c.f, m * K + k)) * int_of(qw.data(), c.f, n * K + k);
        }
        const float d = c.f == QuantFormat::kFp8E4M3 ? float(D) : float(Di);
        const volatile float s = sa[m * Gn + g] * sw[n * Gn + g];
        const volatile float p = d * s;
        acc = acc + p;
      }
      if (R) {
        float l = 0.0f;
        for (int64_t r = 0; r < R; ++r) {
          const volatile float p = lact[m * R + r] * lup[r * N + n];
          l = l + p;
        }
        acc = acc + l;
      }
      if (c.bias) acc = acc + bias[n];
      const float want = out_round(acc, c.out), got = read_out(out, c.out, m * N + n);
      if (!(got == want || (std::isnan(got) && std::isnan(want)))) {
        if (bad < 5)
          CHECK(false, "%s: out[%lld, %lld] = %.9g, expected %.9g", what, (long long)m, (long long)n, got, want);
        ++bad;
      }
    }
  CHECK(bad == 0, "%s: %d mismatches of %lld", what, bad, (long long)(M * N));
  return bad;
}

int64_t qbytes(QuantFormat f, int64_t rows, int64_t K) { return f == QuantFormat::kInt4 ? rows * K / 2 : rows * K; }

void test_gemm_random() {
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> nd;
  int cases = 0;
  for (QuantFormat f : {QuantFormat::kInt4, QuantFormat::kInt8, QuantFormat::kFp8E4M3})
    for (int64_t M : {1, 3, 37, 70})  // 70 x 130 x 320: past the threshold of the OpenMP tile loop
      for (int64_t N : {1, 5, 67, 130})
        for (int64_t K : {32, 96, 320})
          for (int64_t G : {32, 64, 0}) {
            const int64_t g = G == 0 ? K : G;
            if (K % g) continue;
            GemmCase c{f, M, N, K, g, (M + N + K) % 3 == 0 ? 0 : 4 + (M % 5), ((M + N) % 2) == 0,
                       FloatType(int((M + N + K + g) % 3))};
            std::vector<uint8_t> qa(size_t(qbytes(f, M, K))), qw(size_t(qbytes(f, N, K)));
            for (auto& b : qa) b = uint8_t(byte(rng));
            for (auto& b : qw) b = uint8_t(byte(rng));
            if (f == QuantFormat::kFp8E4M3) {  // no NaN codes
              for (auto& b : qa) if ((b & 0x7f) == 0x7f) b ^= 1;
              for (auto& b : qw) if ((b & 0x7f) == 0x7f) b ^= 1;
            }
            std::vector<float> sa(size_t(M * K / g)), sw(size_t(N * K / g)), bias(static_cast<size_t>(N)),
                lact(size_t(M * c.R)), lup(size_t(c.R * N));
            for (auto& v : sa) v = std::fabs(nd(rng)) * 0.01f;
            for (auto& v : sw) v = std::fabs(nd(rng)) * 0.01f;
            for (auto& v : bias) v = nd(rng);
            for (auto& v : lact) v = nd(rng);
            for (auto& v : lup) v = nd(rng);
            char what[128];
            std::snprintf(what, sizeof what, "gemm fmt=%d M=%lld N=%lld K=%lld G=%lld R=%lld bias=%d out=%d", int(f),
                          (long long)M, (long long)N, (long long)K, (long long)g, (long long)c.R, int(c.bias),
                          int(c.out));
            check_gemm(c, qa, qw, sa, sw, bias, lact, lup, what);
            ++cases;
          }
  std::printf("quant_gemm random: %d cases bit-equal to the naive loop\n", cases);
}

uint8_t fill_byte(QuantFormat f, int v) {  // v: integer value (int4 / int8) or e4m3 code (fp8)
  if (f == QuantFormat::kInt4) return uint8_t((v & 0xf) | ((v & 0xf) << 4));
  return uint8_t(v);
}

void test_gemm_adversarial() {
  struct Adv {
    QuantFormat f;
    int va, vw;
    int64_t K;
  };
  const Adv advs[] = {
      {QuantFormat::kInt4, 7, 7, 16384},     {QuantFormat::kInt4, -8, -8, 16384},  {QuantFormat::kInt4, 7, -8, 16384},
      {QuantFormat::kInt4, -8, -8, 4096},    {QuantFormat::kInt8, 127, 127, 16384},
      {QuantFormat::kInt8, -128, -128, 16384}, {QuantFormat::kInt8, -128, 127, 16384},
      {QuantFormat::kFp8E4M3, 0x7e, 0x7e, 16384}, {QuantFormat::kFp8E4M3, 0xfe, 0x7e, 16384},
      {QuantFormat::kFp8E4M3, 0x01, 0x7e, 4096},
  };
  for (const Adv& v : advs)
    for (int64_t G : {int64_t(64), v.K}) {
      const int64_t M = 3, N = 5, K = v.K, Gn = K / G;
      std::vector<uint8_t> qa(size_t(qbytes(v.f, M, K)), fill_byte(v.f, v.va)),
          qw(size_t(qbytes(v.f, N, K)), fill_byte(v.f, v.vw));
      std::vector<float> sa(size_t(M * Gn), 1.0f), sw(size_t(N * Gn), 1.0f), none;
      GemmCase c{v.f, M, N, K, G, 0, false, FloatType::kF32};
      char what[128];
      std::snprintf(what, sizeof what, "adversarial fmt=%d %d x %d K=%lld G=%lld", int(v.f), v.va, v.vw,
                    (long long)K, (long long)G);
      check_gemm(c, qa, qw, sa, sw, none, none, none, what);
      if (G == K && v.f != QuantFormat::kFp8E4M3) {
        // unit scales, one group: out is the integer sum itself (exact in fp32 below 2^24)
        std::vector<uint8_t> out(size_t(M * N * 4));
        QuantGemmArgs a{};
        a.fmt = v.f; a.M = M; a.N = N; a.K = K; a.group_size = G;
        a.qa = qa.data(); a.sa = sa.data(); a.qw = qw.data(); a.sw = sw.data();
        a.out = out.data(); a.out_dtype = FloatType::kF32;
        quant_gemm_cpu(a);
        const int64_t exact = int64_t(v.va) * int64_t(v.vw) * K;
        CHECK(read_out(out, FloatType::kF32, 0) == float(exact), "%s: %.9g != %lld", what,
              read_out(out, FloatType::kF32, 0), (long long)exact);
      }
    }
  // one group of 2^17 products of -128 x -128 = 2^31: past int32
  {
    const int64_t K = int64_t(1) << 17;
    std::vector<uint8_t> qa(size_t(K), uint8_t(0x80)), qw(size_t(2 * K), uint8_t(0x80));
    for (int64_t k = 0; k < K; ++k) qw[size_t(K + k)] = uint8_t(k % 2 ? 0x7f : 0x80);  // row 1: alternating
    std::vector<float> sa(1, 1.0f), sw(2, 1.0f), none;
    GemmCase c{QuantFormat::kInt8, 1, 2, K, K, 0, false, FloatType::kF32};
    check_gemm(c, qa, qw, sa, sw, none, none, none, "int8 group of 2^17 (-128)^2");
  }
  std::printf("quant_gemm adversarial: done\n");
}

// quantize -> quant_gemm of a quantized weight: compares with the dequantized float64 product
void test_end_to_end() {
  const int64_t M = 37, N = 67, K = 320, G = 64;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> x(size_t(M * K)), w(size_t(N * K));
  for (auto& v : x) v = nd(rng);
  for (auto& v : w) v = nd(rng) * 0.05f;
  for (QuantFormat f : {QuantFormat::kInt4, QuantFormat::kInt8, QuantFormat::kFp8E4M3}) {
    Quantized qa = quantize(x, M, K, G, f), qw = quantize(w, N, K, G, f);
    std::vector<float> none;
    GemmCase c{f, M, N, K, G, 0, false, FloatType::kF32};
    check_gemm(c, qa.q, qw.q, qa.s, qw.s, none, none, none, "end to end");
    // relative error of the quantized product against the float product (a sanity bound)
    std::vector<float> out(size_t(M * N));
    QuantGemmArgs a{};
    a.fmt = f; a.M = M; a.N = N; a.K = K; a.group_size = G;
    a.qa = qa.q.data(); a.sa = qa.s.data(); a.qw = qw.q.data(); a.sw = qw.s.data();
    a.out = out.data(); a.out_dtype = FloatType::kF32;
    quant_gemm_cpu(a);
    double num = 0, den = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double ref = 0;
        for (int64_t k = 0; k < K; ++k) ref += double(x[m * K + k]) * w[n * K + k];
        num += (out[m * N + n] - ref) * (out[m * N + n] - ref);
        den += ref * ref;
      }
    const double rel = std::sqrt(num / den);
    const double bound = f == QuantFormat::kInt4 ? 0.2 : 0.05;
    CHECK(rel < bound, "fmt %d: relative error of the quantized product %.3g", int(f), rel);
    std::printf("end to end fmt=%d: relative error %.4f\n", int(f), rel);
  }
}

void test_bad_args() {
  QuantGemmArgs a{};
  a.M = 1; a.N = 1; a.K = 48; a.group_size = 48;
  CHECK(quant_gemm_cpu(a) != 0, "group_size 48 accepted");
  QuantizeArgs q{};
  q.M = 1; q.K = 64; q.group_size = 48;
  CHECK(quantize_cpu(q) != 0, "quantize: group_size 48 accepted");
}

}  // namespace

int main() {
  test_fp8_rounding();
  test_int_ties();
  test_special_groups();
  test_gemm_random();
  test_gemm_adversarial();
  test_end_to_end();
  test_bad_args();
  if (pydiff_test::failures) {
    std::printf("%d failures\n", pydiff_test::failures);
    return 1;
  }
  std::printf("all quantization tests passed\n");
  return 0;
}
