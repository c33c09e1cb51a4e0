// Activation / weight quantization, CPU kernel (OpenMP over rows). Definition: pydiff/reference/quant.py,
// declarations: csrc/include/pydiff/quant.h.
//
// Per row m of x [M, K] (one thread owns a row; the row lives in an fp32 buffer of K values):
//   y = prologue(x[m])        none | gelu_tanh: 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi), fp32,
//                                               in the reference's operation order, std::tanh
//                             | layernorm: mean and biased variance in float64,
//                                          y = float((x - mean) / sqrt(var + eps)), then
//                                          y * (1 + scale[b]) and + shift[b] in fp32 (adaLN)
//   y = y / smooth            (fp32 IEEE division)
//   lora_act[m, r] = sum_k y[k] lora_down[k, r]      (float64 accumulation, rounded to fp32 once)
//   per group g of G channels: amax = max |y| (NaN if the group holds a NaN), s = amax / QMAX (fp32);
//     s not finite -> scales = NaN, q = 0;   s == 0 -> scales = 0, q = 0;
//     else v = y / s (IEEE division) and q = clamp(rintf(v), -QMAX-1, QMAX) (int4, int8; rintf rounds half
//     to even in the default rounding mode), or q = e4m3(clamp(v, -448, 448)) (fp8, round to nearest even).
// Outputs: int4 -> uint8 [M, K/2] (channel 2j in the low nibble of byte j), int8 -> int8 [M, K],
// fp8 -> e4m3fn bytes [M, K]; scales fp32 [M, K/G]; lora_act fp32 [M, R].
//
// The arithmetic follows the reference operation by operation (no contraction into FMA, so every
// compiled clone gives the same bits), hence q and scales equal the torch reference's for prologue
// "none"; with a prologue, tanh (libm vs torch's) and the float64 summation order of the LayerNorm
// statistics can move y by an ulp, and a quantized value by one step at a rounding tie.
#pragma GCC optimize("fp-contract=off")
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "pydiff/cpu_convert.h"
#include "pydiff/cpu_types.h"
#include "pydiff/quant.h"

namespace pydiff {
namespace {

// fp32 -> fp8 e4m3fn (bias 7, no infinities, 0x7f / 0xff = NaN, max 448 = 0x7e), round to nearest even.
// Finite values beyond 448 saturate to +-448 (the kernel clamps first anyway); NaN -> 0x7f | sign.
inline uint8_t float_to_e4m3(float f) {
  uint32_t u = float_to_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (u >= 0x43e00000u) return uint8_t(sign | 0x7eu);  // >= 448 (and inf): saturate
  if (u < 0x3c800000u) {                               // below 2^-6: e4m3 subnormal, a multiple of 2^-9
    // |f| * 2^9 is exact (scaling by a power of two); rounding it to an integer (half to even, the
    // default mode) gives the subnormal mantissa, or 8 = the encoding of 2^-6 when it rounds up.
    const float a = bits_to_float(u) * 512.0f;
    return uint8_t(sign | uint8_t(std::nearbyint(a)));
  }
  // normal: rebias the exponent (127 -> 7) and round the 23-bit mantissa to 3 bits, half to even
  const uint32_t odd = (u >> 20) & 1u;
  u = u - (uint32_t(120) << 23) + 0x7ffffu + odd;
  return uint8_t(sign | uint8_t(u >> 20));
}

template <typename T>
inline void load_row(const void* p, int64_t off, int64_t n, float* __restrict__ dst) {
  convert_to_float(static_cast<const T*>(p) + off, n, dst);
}

void load_any(const void* p, FloatType t, int64_t off, int64_t n, float* dst) {
  switch (t) {
    case FloatType::kF16: load_row<half_t>(p, off, n, dst); break;
    case FloatType::kBF16: load_row<bf16_t>(p, off, n, dst); break;
    case FloatType::kF64: {
      const double* s = static_cast<const double*>(p) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      break;
    }
    default: load_row<float>(p, off, n, dst); break;
  }
}

std::vector<float> to_vec(const void* p, FloatType t, int64_t n) {
  std::vector<float> v(size_t(std::max<int64_t>(n, 0)));
  if (p != nullptr && n > 0) load_any(p, t, 0, n, v.data());
  return v;
}

// gelu_tanh in the reference's order: ((0.5 x) * (1 + tanh(c (x + ((0.044715 x) x) x)))).
void gelu_tanh_row(float* y, int64_t n) {
  const float c = float(std::sqrt(2.0 / 3.14159265358979323846));
  const float k = 0.044715f;
  for (int64_t i = 0; i < n; ++i) {
    const float x = y[i];
    const float t3 = ((k * x) * x) * x;
    const float t = std::tanh(c * (x + t3));
    y[i] = (0.5f * x) * (1.0f + t);
  }
}

// LayerNorm of one row, statistics in float64 (mean, biased variance), adaLN modulation in fp32.
PYDIFF_CLONES void layernorm_row(float* __restrict__ y, int64_t n, double eps, const float* __restrict__ scale,
                                 const float* __restrict__ shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += double(y[i]);
  const double mean = s / double(n);
  double v = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = double(y[i]) - mean;
    v += d * d;
  }
  const double rstd = 1.0 / std::sqrt(v / double(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = float((double(y[i]) - mean) * rstd);
  if (scale != nullptr)
    for (int64_t i = 0; i < n; ++i) y[i] = y[i] * (1.0f + scale[i]);
  if (shift != nullptr)
    for (int64_t i = 0; i < n; ++i) y[i] = y[i] + shift[i];
}

PYDIFF_CLONES void divide_row(float* __restrict__ y, const float* __restrict__ d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = y[i] / d[i];
}

// acc[r] += y[k] * W[k, r] over k, float64; W fp32 [K, R].
PYDIFF_CLONES void lora_row(const float* __restrict__ y, const float* __restrict__ w, int64_t K, int64_t R,
                            double* __restrict__ acc) {
  for (int64_t r = 0; r < R; ++r) acc[r] = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double yk = double(y[k]);
    const float* wk = w + k * R;
    for (int64_t r = 0; r < R; ++r) acc[r] += yk * double(wk[r]);
  }
}

// max |y| over n values and whether any is NaN.
PYDIFF_CLONES float group_amax(const float* __restrict__ y, int64_t n, bool* has_nan) {
  float m = 0.0f;
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(y[i]);
    m = a > m ? a : m;
    nan |= (y[i] != y[i]);
  }
  *has_nan = nan != 0;
  return m;
}

// q[i] = clamp(rint(y[i] / s), lo, hi) as int8.
PYDIFF_CLONES void quantize_int(const float* __restrict__ y, int64_t n, float s, float lo, float hi,
                                int8_t* __restrict__ q) {
  for (int64_t i = 0; i < n; ++i) {
    float v = std::rint(y[i] / s);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    q[i] = int8_t(int(v));
  }
}

PYDIFF_CLONES void quantize_fp8(const float* __restrict__ y, int64_t n, float s, uint8_t* __restrict__ q) {
  for (int64_t i = 0; i < n; ++i) {
    float v = y[i] / s;
    v = v < -448.0f ? -448.0f : v;
    v = v > 448.0f ? 448.0f : v;
    q[i] = float_to_e4m3(v);
  }
}

template <typename T>
void run(const QuantizeArgs& a) {
  const int64_t M = a.M, K = a.K, G = a.group_size, Gn = K / G, R = a.rank;
  const float qmax = a.fmt == QuantFormat::kInt4 ? 7.0f : (a.fmt == QuantFormat::kInt8 ? 127.0f : 448.0f);
  const std::vector<float> smooth = to_vec(a.smooth, a.smooth_dtype, a.smooth ? K : 0);
  const std::vector<float> lora = to_vec(a.lora_down, a.lora_dtype, a.lora_down ? K * R : 0);
  const bool ln = a.prologue == QuantPrologue::kLayerNorm;
  const int64_t B = (ln && (a.shift || a.scale)) ? M / a.rows_per_batch : 0;
  const std::vector<float> shift = to_vec(ln ? a.shift : nullptr, a.mod_dtype, a.shift ? B * K : 0);
  const std::vector<float> scale = to_vec(ln ? a.scale : nullptr, a.mod_dtype, a.scale ? B * K : 0);
  const T* x = static_cast<const T*>(a.x);

#pragma omp parallel if (M * K >= (int64_t(1) << 15))
  {
    std::vector<float> y(static_cast<size_t>(K));
    std::vector<int8_t> qi(a.fmt == QuantFormat::kInt4 ? size_t(K) : 0);
    std::vector<double> acc(static_cast<size_t>(R));
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      load_row<T>(x, m * K, K, y.data());
      if (a.prologue == QuantPrologue::kGeluTanh) {
        gelu_tanh_row(y.data(), K);
      } else if (ln && K > 0) {
        const int64_t b = B > 0 ? m / a.rows_per_batch : 0;
        layernorm_row(y.data(), K, a.eps, a.scale ? scale.data() + b * K : nullptr,
                      a.shift ? shift.data() + b * K : nullptr);
      }
      if (a.smooth) divide_row(y.data(), smooth.data(), K);
      if (R > 0) {
        lora_row(y.data(), lora.data(), K, R, acc.data());
        for (int64_t r = 0; r < R; ++r) a.lora_act[m * R + r] = float(acc[r]);
      }
      for (int64_t g = 0; g < Gn; ++g) {
        const float* yg = y.data() + g * G;
        bool has_nan = false;
        const float amax = group_amax(yg, G, &has_nan);
        const float s = has_nan ? std::numeric_limits<float>::quiet_NaN() : amax / qmax;
        const bool ok = std::isfinite(s) && s > 0.0f;
        a.scales[m * Gn + g] = std::isfinite(s) ? s : std::numeric_limits<float>::quiet_NaN();
        if (a.fmt == QuantFormat::kFp8E4M3) {
          uint8_t* q = static_cast<uint8_t*>(a.q) + m * K + g * G;
          if (ok) quantize_fp8(yg, G, s, q);
          else std::memset(q, 0, size_t(G));
        } else {
          int8_t* q = a.fmt == QuantFormat::kInt8 ? static_cast<int8_t*>(a.q) + m * K + g * G : qi.data() + g * G;
          if (ok) quantize_int(yg, G, s, -qmax - 1.0f, qmax, q);
          else std::memset(q, 0, size_t(G));
        }
      }
      if (a.fmt == QuantFormat::kInt4) {
        uint8_t* q = static_cast<uint8_t*>(a.q) + m * (K / 2);
        for (int64_t j = 0; j < K / 2; ++j)
          q[j] = uint8_t((uint8_t(qi[2 * j]) & 0x0fu) | ((uint8_t(qi[2 * j + 1]) & 0x0fu) << 4));
      }
    }
  }
}

}  // namespace

int quantize_cpu(const QuantizeArgs& a) {
  if (a.M < 0 || a.K < 0 || a.group_size <= 0 || a.group_size % 32 != 0 || a.K % a.group_size != 0 || a.rank < 0)
    return 1;
  if (a.M == 0) return 0;  // (empty outputs may have null data pointers)
  if (a.K > 0 && (a.x == nullptr || a.q == nullptr || a.scales == nullptr)) return 1;
  if (a.rank > 0 && (a.lora_act == nullptr || (a.K > 0 && a.lora_down == nullptr))) return 1;
  if ((a.shift || a.scale) && (a.rows_per_batch < 1 || a.M % a.rows_per_batch != 0)) return 1;
  switch (a.x_dtype) {
    case FloatType::kF32: run<float>(a); return 0;
    case FloatType::kF16: run<half_t>(a); return 0;
    case FloatType::kBF16: run<bf16_t>(a); return 0;
    default: return 1;
  }
}

}  // namespace pydiff
