// Quantized matmul (W4A4, W8A8 int8 / fp8) with its fused epilogue, CPU kernel: the exact reference
// of the GPU kernels. Definition: pydiff/reference/quant.py; declarations: csrc/include/pydiff/quant.h.
//
//   D[m, n, g] = sum_{k in group g} qa[m, k] qw[n, k]
//   out[m, n]  = round_out( ((sum_g float(D[m, n, g]) * (sa[m, g] * sw[n, g])) + l[m, n]) + bias[n] ),
//   l[m, n]    = sum_r lora_act[m, r] * lora_up[r, n]          (fp32, r ascending)
//
// Exactness: int4 / int8 group sums are integers, accumulated in int32 over chunks of at most 2^15
// products (|chunk| <= 2^15 * 2^14 = 2^29) and in int64 across chunks, so D is exact for any group
// size. fp8 e4m3 values are multiples of 2^-9 below 2^9 in magnitude, so each product is an exact
// fp32 number (8 significant bits) and a float64 sum of up to 2^17 of them is exact too, in any order
// (multiples of 2^-18 below 2^35); D is then rounded to fp32 once. The epilogue is fp32, group by
// group in ascending g (no FMA contraction, so every compiled clone gives the same bits). NaN scales
// (a group that held NaN / inf) give NaN outputs, as in the reference.
//
// Layout of the work: the int4 / int8 operands are widened to int16 once per call (fp8 ones decoded
// to fp32); OpenMP threads take tiles of kMB rows x kNB output channels; within a tile, one
// activation row against four weight rows at a time (int16 x int16 -> int32 dot products that gcc
// vectorises with pmaddwd), so each loaded activation value feeds four products.
#pragma GCC optimize("fp-contract=off")
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "pydiff/cpu_convert.h"
#include "pydiff/cpu_types.h"
#include "pydiff/quant.h"

namespace pydiff {
namespace {

constexpr int64_t kMB = 16;          // rows of a tile
constexpr int64_t kNB = 64;          // output channels of a tile
constexpr int64_t kChunk = 1 << 15;  // products summed in int32 before widening to int64

// e4m3fn byte -> fp32 (bias 7, subnormals m * 2^-9, 0x7f / 0xff NaN).
float e4m3_to_float(uint8_t b) {
  const int e = (b >> 3) & 0xf, m = b & 7;
  float v;
  if (e == 15 && m == 7) v = std::numeric_limits<float>::quiet_NaN();
  else if (e == 0) v = std::ldexp(float(m), -9);
  else v = std::ldexp(float(8 + m), e - 10);
  return (b & 0x80) ? -v : v;
}

// Four dot products of length n sharing the vector a, int16 x int16 -> int32 (gcc vectorises this
// with pmaddwd); exact for |a|, |w| <= 128 and n <= kChunk.
PYDIFF_CLONES void dot4_i16(const int16_t* __restrict__ a, const int16_t* __restrict__ w0,
                            const int16_t* __restrict__ w1, const int16_t* __restrict__ w2,
                            const int16_t* __restrict__ w3, int64_t n, int32_t* out) {
  int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int32_t x = a[k];
    s0 += x * w0[k];
    s1 += x * w1[k];
    s2 += x * w2[k];
    s3 += x * w3[k];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// fp8: products exact in fp32, summed in float64 in 8 lanes (the sum is exact, so the order does not
// matter; n is a multiple of 32). Four weight rows share each loaded activation.
PYDIFF_CLONES void dot4_f8(const float* __restrict__ a, const float* __restrict__ w0, const float* __restrict__ w1,
                           const float* __restrict__ w2, const float* __restrict__ w3, int64_t n, double* out) {
  double s0[8] = {}, s1[8] = {}, s2[8] = {}, s3[8] = {};
  for (int64_t k = 0; k < n; k += 8)
    for (int l = 0; l < 8; ++l) {
      const float x = a[k + l];
      s0[l] += double(x * w0[k + l]);
      s1[l] += double(x * w1[k + l]);
      s2[l] += double(x * w2[k + l]);
      s3[l] += double(x * w3[k + l]);
    }
  double t[4] = {};
  for (int l = 0; l < 8; ++l) {
    t[0] += s0[l];
    t[1] += s1[l];
    t[2] += s2[l];
    t[3] += s3[l];
  }
  for (int j = 0; j < 4; ++j) out[j] = t[j];
}

// Group sums of one activation row against four weight rows, exact, as int64.
inline void group_dots_int(const int16_t* a, const int16_t* const* w, int64_t G, int64_t* D) {
  for (int j = 0; j < 4; ++j) D[j] = 0;
  for (int64_t lo = 0; lo < G; lo += kChunk) {
    const int64_t n = std::min(kChunk, G - lo);
    int32_t s[4];
    dot4_i16(a + lo, w[0] + lo, w[1] + lo, w[2] + lo, w[3] + lo, n, s);
    for (int j = 0; j < 4; ++j) D[j] += s[j];
  }
}

template <typename T>
void load_vec(const void* p, int64_t n, float* dst) {
  convert_to_float(static_cast<const T*>(p), n, dst);
}

std::vector<float> to_vec(const void* p, FloatType t, int64_t n) {
  std::vector<float> v(size_t(std::max<int64_t>(n, 0)));
  if (p == nullptr || n <= 0) return v;
  switch (t) {
    case FloatType::kF16: load_vec<half_t>(p, n, v.data()); break;
    case FloatType::kBF16: load_vec<bf16_t>(p, n, v.data()); break;
    case FloatType::kF64:
      for (int64_t i = 0; i < n; ++i) v[size_t(i)] = float(static_cast<const double*>(p)[i]);
      break;
    default: load_vec<float>(p, n, v.data()); break;
  }
  return v;
}

void store_row(void* out, FloatType t, int64_t off, int64_t n, const float* src) {
  switch (t) {
    case FloatType::kF16: {
      convert_from_float(src, n, static_cast<half_t*>(out) + off);
      break;
    }
    case FloatType::kBF16: {
      convert_from_float(src, n, static_cast<bf16_t*>(out) + off);
      break;
    }
    default: std::memcpy(static_cast<float*>(out) + off, src, size_t(n) * sizeof(float)); break;
  }
}

// int4 packed [rows, K/2] -> int16 [rows, K] (low nibble = even channel, sign-extended).
void unpack_int4(const uint8_t* p, int64_t rows, int64_t K, int16_t* out) {
  const int64_t total = rows * (K / 2);
#pragma omp parallel for schedule(static) if (total >= (int64_t(1) << 18))
  for (int64_t i = 0; i < total; ++i) {
    const uint8_t b = p[i];
    out[2 * i] = int16_t(int8_t(uint8_t(b << 4)) >> 4);
    out[2 * i + 1] = int16_t(int8_t(b) >> 4);
  }
}

void widen_int8(const int8_t* p, int64_t n, int16_t* out) {
#pragma omp parallel for schedule(static) if (n >= (int64_t(1) << 18))
  for (int64_t i = 0; i < n; ++i) out[i] = p[i];
}

void decode_fp8(const uint8_t* p, int64_t n, float* out) {
  float lut[256];
  for (int i = 0; i < 256; ++i) lut[i] = e4m3_to_float(uint8_t(i));
#pragma omp parallel for schedule(static) if (n >= (int64_t(1) << 18))
  for (int64_t i = 0; i < n; ++i) out[i] = lut[p[i]];
}

}  // namespace

int quant_gemm_cpu(const QuantGemmArgs& a) {
  const int64_t M = a.M, N = a.N, K = a.K, G = a.group_size, R = a.rank;
  if (M < 0 || N < 0 || K < 0 || G <= 0 || G % 32 != 0 || K % G != 0 || R < 0) return 1;
  if (M == 0 || N == 0) return 0;
  if (a.out == nullptr || (K > 0 && (a.qa == nullptr || a.qw == nullptr || a.sa == nullptr || a.sw == nullptr)))
    return 1;
  if (R > 0 && (a.lora_act == nullptr || a.lora_up == nullptr)) return 1;
  if (a.out_dtype != FloatType::kF32 && a.out_dtype != FloatType::kF16 && a.out_dtype != FloatType::kBF16) return 1;
  const int64_t Gn = K / G;
  const bool fp8 = a.fmt == QuantFormat::kFp8E4M3;

  // operands widened once per call: int4 / int8 -> int16, fp8 -> fp32 (both exact)
  std::vector<int16_t> a16, w16;
  std::vector<float> af, wf;
  if (fp8) {
    af.resize(size_t(M * K));
    wf.resize(size_t(N * K));
    decode_fp8(static_cast<const uint8_t*>(a.qa), M * K, af.data());
    decode_fp8(static_cast<const uint8_t*>(a.qw), N * K, wf.data());
  } else {
    a16.resize(size_t(M * K));
    w16.resize(size_t(N * K));
    if (a.fmt == QuantFormat::kInt4) {
      unpack_int4(static_cast<const uint8_t*>(a.qa), M, K, a16.data());
      unpack_int4(static_cast<const uint8_t*>(a.qw), N, K, w16.data());
    } else if (a.fmt == QuantFormat::kInt8) {
      widen_int8(static_cast<const int8_t*>(a.qa), M * K, a16.data());
      widen_int8(static_cast<const int8_t*>(a.qw), N * K, w16.data());
    } else {
      return 1;
    }
  }
  const std::vector<float> bias = to_vec(a.bias, a.bias_dtype, a.bias ? N : 0);
  const std::vector<float> up = to_vec(a.lora_up, a.lora_up_dtype, R > 0 ? R * N : 0);
  const std::vector<float> lact = to_vec(a.lora_act, a.lora_act_dtype, R > 0 ? M * R : 0);

  const int64_t mt = (M + kMB - 1) / kMB, nt = (N + kNB - 1) / kNB;
  const int64_t tiles = mt * nt;
#pragma omp parallel for schedule(dynamic, 1) if (M * N * std::max<int64_t>(K, 1) >= (int64_t(1) << 20))
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t m0 = (t / nt) * kMB, n0 = (t % nt) * kNB;
    const int64_t m1 = std::min(M, m0 + kMB), n1 = std::min(N, n0 + kNB), nb = n1 - n0;
    float acc[kNB], lr[kNB];
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t j = 0; j < nb; ++j) acc[j] = 0.0f;
      for (int64_t g = 0; g < Gn; ++g) {
        const float sam = a.sa[m * Gn + g];
        for (int64_t j = 0; j < nb; j += 4) {
          const int nw = int(std::min<int64_t>(4, nb - j));
          float d[4];
          if (fp8) {
            const float* wr[4];
            for (int i = 0; i < 4; ++i) wr[i] = wf.data() + (n0 + j + std::min(i, nw - 1)) * K + g * G;
            double D[4];
            dot4_f8(af.data() + m * K + g * G, wr[0], wr[1], wr[2], wr[3], G, D);
            for (int i = 0; i < nw; ++i) d[i] = float(D[i]);
          } else {
            const int16_t* wr[4];  // past the N edge: repeat the last row (its sums are discarded)
            for (int i = 0; i < 4; ++i) wr[i] = w16.data() + (n0 + j + std::min(i, nw - 1)) * K + g * G;
            int64_t D[4];
            group_dots_int(a16.data() + m * K + g * G, wr, G, D);
            for (int i = 0; i < nw; ++i) d[i] = float(D[i]);
          }
          for (int i = 0; i < nw; ++i) acc[j + i] += d[i] * (sam * a.sw[(n0 + j + i) * Gn + g]);
        }
      }
      if (R > 0) {
        for (int64_t j = 0; j < nb; ++j) lr[j] = 0.0f;
        for (int64_t r = 0; r < R; ++r) {
          const float x = lact[size_t(m * R + r)];
          const float* u = up.data() + r * N + n0;
          for (int64_t j = 0; j < nb; ++j) lr[j] += x * u[j];
        }
        for (int64_t j = 0; j < nb; ++j) acc[j] += lr[j];
      }
      if (a.bias)
        for (int64_t j = 0; j < nb; ++j) acc[j] += bias[size_t(n0 + j)];
      store_row(a.out, a.out_dtype, m * N + n0, nb, acc);
    }
  }
  return 0;
}

}  // namespace pydiff
