// Host-side helpers of the emulator tests: number formats implemented from their definitions (not
// with the CUDA headers' conversion functions, which the emulated kernels themselves use), typed
// storage of the FloatType inputs, a seeded RNG and the CHECK macro of csrc/tests/check.h.
#pragma once
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>

#include "../check.h"
#include "pydiff/float_type.h"

namespace emu_test {

using pydiff::FloatType;

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16, round to nearest even.
inline uint16_t f16_bits(float f) {
  const uint16_t sign = (f32_bits(f) >> 16) & 0x8000;
  if (std::isnan(f)) return sign | 0x7E00;
  const double a = std::fabs(double(f));
  if (a >= 65520.0) return sign | 0x7C00;  // max 65504 + half an ulp: rounds to inf
  if (a < 0x1p-14) return sign | uint16_t(std::nearbyint(a * 0x1p24));  // subnormal (1024 -> min normal)
  int ex;
  std::frexp(a, &ex);
  int E = ex - 1;  // a in [2^E, 2^(E+1))
  double m = std::nearbyint(std::ldexp(a, 10 - E));  // in [1024, 2048]
  if (m == 2048.0) {
    m = 1024.0;
    ++E;
  }
  if (E + 15 >= 31) return sign | 0x7C00;
  return sign | uint16_t(((E + 15) << 10) | (int(m) - 1024));
}
inline double f16_value(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double v = e == 31 ? (m ? NAN : INFINITY)
                   : e == 0 ? std::ldexp(double(m), -24)
                            : std::ldexp(double(1024 + m), e - 25);
  return (h & 0x8000) ? -v : v;
}
// bfloat16 (the high half of binary32), round to nearest even.
inline uint16_t bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline double bf16_value(uint16_t b) { return double(f32_from_bits(uint32_t(b) << 16)); }

// float8 e4m3 ("fn": bias 7, no infinities, S.1111.111 = NaN, max 448).
inline double e4m3_value(uint8_t v) {
  const int e = (v >> 3) & 15, m = v & 7;
  if (e == 15 && m == 7) return NAN;
  const double mag = e == 0 ? m / 512.0 : (1.0 + m / 8.0) * std::ldexp(1.0, e - 7);
  return (v & 0x80) ? -mag : mag;
}
// |v| <= 448 (finite) -> nearest e4m3, ties to the even code (= even mantissa); the sign of v is kept
// (also for results that round to zero), as torch's float -> float8_e4m3fn conversion does.
inline uint8_t e4m3_round(double v) {
  static const auto table = [] {
    std::array<double, 0x7F> t{};
    for (int c = 0; c <= 0x7E; ++c) t[size_t(c)] = e4m3_value(uint8_t(c));
    return t;
  }();
  const uint8_t sign = std::signbit(v) ? 0x80 : 0x00;
  const double a = std::fabs(v);
  int best = 0;
  for (int c = 1; c <= 0x7E; ++c) {
    const double d = std::fabs(table[size_t(c)] - a), db = std::fabs(table[size_t(best)] - a);
    if (d < db || (d == db && (c & 1) == 0)) best = c;
  }
  return sign | uint8_t(best);
}

inline size_t type_size(FloatType t) {
  switch (t) {
    case FloatType::kF16:
    case FloatType::kBF16: return 2;
    case FloatType::kF64: return 8;
    default: return 4;
  }
}
// Stores v rounded to t (from double: fp32 first for the 16-bit types, as torch's .to() of an fp32
// tensor would) and returns the stored value.
inline double store(FloatType t, void* p, int64_t i, double v) {
  switch (t) {
    case FloatType::kF16: {
      const uint16_t h = f16_bits(float(v));
      std::memcpy(static_cast<char*>(p) + 2 * i, &h, 2);
      return f16_value(h);
    }
    case FloatType::kBF16: {
      const uint16_t b = bf16_bits(float(v));
      std::memcpy(static_cast<char*>(p) + 2 * i, &b, 2);
      return bf16_value(b);
    }
    case FloatType::kF64: std::memcpy(static_cast<char*>(p) + 8 * i, &v, 8); return v;
    default: {
      const float f = float(v);
      std::memcpy(static_cast<char*>(p) + 4 * i, &f, 4);
      return f;
    }
  }
}
inline double load(FloatType t, const void* p, int64_t i) {
  uint16_t h;
  switch (t) {
    case FloatType::kF16: std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2); return f16_value(h);
    case FloatType::kBF16: std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2); return bf16_value(h);
    case FloatType::kF64: {
      double d;
      std::memcpy(&d, static_cast<const char*>(p) + 8 * i, 8);
      return d;
    }
    default: {
      float f;
      std::memcpy(&f, static_cast<const char*>(p) + 4 * i, 4);
      return f;
    }
  }
}
inline const char* type_name(FloatType t) {
  switch (t) {
    case FloatType::kF16: return "f16";
    case FloatType::kBF16: return "bf16";
    case FloatType::kF64: return "f64";
    default: return "f32";
  }
}

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g); }
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(g); }
  int64_t integer(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }  // [lo, hi]
};

}  // namespace emu_test
