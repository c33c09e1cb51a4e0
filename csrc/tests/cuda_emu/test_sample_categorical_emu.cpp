// The CUDA categorical sampling kernels (csrc/sampling/sample_categorical_cuda.cu) run on the CPU
// emulator (emu.h) through their host entry point pydiff::sample_categorical_cuda, against the CPU
// kernel (csrc/sampling/sample_categorical_cpu.cpp, compiled into this test) which implements the
// same definition (pydiff/reference/sampling.py):
//
//   kept tokens l_i >= tau[r]; e_i = exp((l_i - M) / T') (T' = T, or 1 when T == 0), Z = sum e_i;
//   token = min{i : e_0 + ... + e_i > uniform53(seed[r], offset[r]) Z} (T == 0: first argmax);
//   prob = e_token / Z; stats = (1 / Z, (1 - exp((M2 - M) / T')) / Z, entropy); -1 for rows off
//   in row_mask, -2 (NaN prob / stats) for rows with a NaN / +inf logit, a NaN tau or no kept token.
//
// Tokens must agree exactly. prob and stats agree to 1e-5 relative (the two kernels sum the
// exponentials in different chunks / orders and their exp polynomials round differently, so the
// float64 sums differ in the last fp32 bits); NaN where the other is NaN. A token may differ only
// if u Z falls within that tolerance of a cumulative boundary, which the random rows here never hit.
// Cases: V = 1, primes, multiples and non-multiples of the CUDA chunk (4096) and the CPU chunk
// (2048), several chunks; fp32 / fp16 / bf16; T in {1, 0.7, 2.5, 1e-3, 1e-6, 1e-30, 1e-40, 1e-44,
// 1e30, 1e50, 0} (T < 1 / FLT_MAX: 1 / T is inf in fp32, both kernels clamp it to FLT_MAX; T above
// kMaxTemperature = 2^100 samples as 2^100 in both); thresholds
// (top-k / top-p / min-p cut-offs as the ops pass them: tau = some logit, ties included, or
// max + log p), NaN tau; row masks; all -inf rows, NaN / +inf logits, large-magnitude logits,
// ties, a single kept token; row strides > V; negative seeds / offsets. Outputs are poisoned;
// every buffer, the workspace included (exactly sample_categorical_cuda_workspace bytes), sits
// against a guard page with canaries (cuda_emu::Buffer). Not in the default run (too slow on the
// emulator): R > 65535, the host code's 65535-row slices; CUDA_EMU_BIG_ROWS=1 adds that case (R =
// 65537, all four runs incl. the fused select's per-slice counters; ~30 s).
#include "emu.h"

// The kernels' static `__shared__` arrays: one copy per emulator worker OS thread, i.e. one per
// running block (a block runs on one worker, its CUDA threads are fibers of that thread). Without
// this the host compiler would give every CUDA thread its own copy.
#undef __shared__
#define __shared__ static thread_local
#include "../../sampling/sample_categorical_cuda.cu"
#undef __shared__

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // the CPU kernel's AVX target clone
#include "../../sampling/sample_categorical_cpu.cpp"
#pragma GCC diagnostic pop

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {

using pydiff::DType;
using pydiff::SampleArgs;

int g_fail = 0, g_checks = 0;
long g_rows[3] = {0, 0, 0};  // sampled / masked (-1) / invalid (-2) rows seen

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t s) : g(s) {}
  double uni() { return std::uniform_real_distribution<double>(0, 1)(g); }
  double normal() { return std::normal_distribution<double>(0, 1)(g); }
  int64_t integer(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
};

size_t elem_bytes(DType d) { return d == DType::kF32 ? 4 : 2; }
const char* dname(DType d) { return d == DType::kF32 ? "f32" : d == DType::kF16 ? "f16" : "bf16"; }

// Stores v in dtype d (round to nearest even) at element i of p; returns the stored value as fp32.
float store(DType d, unsigned char* p, int64_t i, float v) {
  if (d == DType::kF32) {
    std::memcpy(p + 4 * i, &v, 4);
    return v;
  }
  if (d == DType::kF16) {
    const pydiff::half_t h = pydiff::from_float<pydiff::half_t>(v);
    std::memcpy(p + 2 * i, &h, 2);
    return pydiff::to_float(h);
  }
  const pydiff::bf16_t h = pydiff::from_float<pydiff::bf16_t>(v);
  std::memcpy(p + 2 * i, &h, 2);
  return pydiff::to_float(h);
}

// kNaNNegInf: every logit -inf but one NaN (no finite maximum: the partial kernel's NaN check without a
// threshold must not rely on the exponential sums alone)
// kNaNNegInfChunk: the same in the first 4096 logits only (a whole chunk of the partial kernel), the
// rest normal: the row has a finite maximum, and that chunk alone must flag it.
enum RowKind {
  kNormal, kAllNegInf, kNaN, kPosInf, kHuge, kTies, kSingle, kNaNTau, kMasked, kNaNNegInf, kNaNNegInfChunk, kNumKinds
};

struct Case {
  DType dt;
  int64_t R, V, pad;
  double T;
  bool thresholds, mask;
  double scale;      // logit spread
  bool specials;     // mix special rows in
};

bool close(double a, double b, double rel, double abs_tol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= rel * std::max(std::fabs(a), std::fabs(b)) + abs_tol;
}

void run_case(const Case& c, uint64_t seed) {
  Rng rng(seed);
  const int64_t R = c.R, V = c.V, S = V + c.pad;
  const size_t eb = elem_bytes(c.dt);
  std::vector<unsigned char> logits(size_t(R * S) * eb);
  std::vector<float> thr(size_t(R), -std::numeric_limits<float>::infinity());
  std::vector<unsigned char> mask(size_t(R), 1);
  std::vector<int64_t> seeds(static_cast<size_t>(R)), offsets(static_cast<size_t>(R));
  const float big = c.dt == DType::kF16 ? 60000.f : 3e38f;
  for (int64_t r = 0; r < R; ++r) {
    const int kind = c.specials ? int(rng.integer(0, kNumKinds - 1)) : kNormal;
    unsigned char* row = logits.data() + size_t(r * S) * eb;
    float mx = -std::numeric_limits<float>::infinity();
    std::vector<float> vals(static_cast<size_t>(V));
    const double shift = rng.normal() * 20;
    for (int64_t i = 0; i < S; ++i) {
      float v = float(rng.normal() * c.scale + shift);
      if (i >= V) v = std::numeric_limits<float>::quiet_NaN();  // padding: never read
      if (i < V) {
        if (kind == kAllNegInf || kind == kNaNNegInf || (kind == kNaNNegInfChunk && i < 4096)) v = -INFINITY;
        if (kind == kHuge) v = float((rng.uni() * 2 - 1) * big);
        if (kind == kTies) v = float(rng.integer(0, 2));
        if (kind == kSingle) v = -INFINITY;
        if (rng.uni() < 0.05) v = -INFINITY;  // some dropped tokens everywhere
      }
      const float s = store(c.dt, row, i, v);
      if (i < V) {
        vals[size_t(i)] = s;
        mx = std::max(mx, s);
      }
    }
    if (kind == kSingle) {
      const int64_t i = rng.integer(0, V - 1);
      vals[size_t(i)] = store(c.dt, row, i, float(rng.normal() * 5));
      mx = vals[size_t(i)];
    }
    if (kind == kNaN || kind == kNaNNegInf)
      store(c.dt, row, rng.integer(0, V - 1), std::numeric_limits<float>::quiet_NaN());
    if (kind == kNaNNegInfChunk)
      store(c.dt, row, rng.integer(0, std::min<int64_t>(V, 4096) - 1), std::numeric_limits<float>::quiet_NaN());
    if (kind == kPosInf) store(c.dt, row, rng.integer(0, V - 1), INFINITY);
    if (c.thresholds && rng.uni() < 0.8) {
      const int which = int(rng.integer(0, 2));
      if (which == 0) {  // top-k: tau = the k-th largest logit (ties kept)
        std::vector<float> s = vals;
        std::sort(s.begin(), s.end(), std::greater<float>());
        thr[size_t(r)] = s[size_t(rng.integer(0, std::min<int64_t>(V - 1, 50)))];
      } else if (which == 1) {  // min-p: tau = M + T log p
        thr[size_t(r)] = float(double(mx) + (c.T > 0 ? c.T : 1.0) * std::log(rng.uni() * 0.5 + 1e-3));
      } else {  // some logit (a top-p cut-off is one)
        thr[size_t(r)] = vals[size_t(rng.integer(0, V - 1))];
      }
    }
    if (kind == kNaNTau) thr[size_t(r)] = std::numeric_limits<float>::quiet_NaN();
    if (c.mask && (kind == kMasked || rng.uni() < 0.1)) mask[size_t(r)] = 0;
    seeds[size_t(r)] = int64_t(rng.g());
    offsets[size_t(r)] = int64_t(rng.g()) >> rng.integer(0, 63);
  }

  SampleArgs a{};
  a.dtype = c.dt;
  a.rows = R;
  a.vocab = V;
  a.row_stride = S;
  a.temperature = c.T;
  // CPU
  std::vector<int64_t> tok_c(size_t(R), 77);
  std::vector<double> prob_c(size_t(R), 77), st_c(size_t(3 * R), 77);
  a.logits = logits.data();
  a.threshold = c.thresholds ? thr.data() : nullptr;
  a.row_mask = c.mask ? reinterpret_cast<const bool*>(mask.data()) : nullptr;
  a.seeds = seeds.data();
  a.offsets = offsets.data();
  a.tokens = tok_c.data();
  a.prob = prob_c.data();
  a.stats = st_c.data();
  if (pydiff::sample_categorical_cpu(a) != 0) {
    std::printf("FAIL cpu kernel rejected the case\n");
    ++g_fail;
    return;
  }
  // CUDA (emulated)
  cuda_emu::Buffer d_log(logits.size(), eb), d_thr(size_t(R) * 4, 4), d_mask(size_t(R), 1), d_seed(size_t(R) * 8, 8),
      d_off(size_t(R) * 8, 8), d_tok(size_t(R) * 8, 8), d_prob(size_t(R) * 8, 8), d_st(size_t(R) * 24, 8);
  d_log.copy_from(logits.data(), logits.size());
  d_thr.copy_from(thr.data(), size_t(R) * 4);
  d_mask.copy_from(mask.data(), size_t(R));
  d_seed.copy_from(seeds.data(), size_t(R) * 8);
  d_off.copy_from(offsets.data(), size_t(R) * 8);
  d_tok.fill(0xA5);
  d_prob.fill(0xA5);
  d_st.fill(0xA5);
  const int64_t ws_bytes = pydiff::sample_categorical_cuda_workspace(R, V);
  cuda_emu::Buffer ws(size_t(ws_bytes), 8);
  ws.fill(0xFF);
  a.logits = d_log.data();
  a.threshold = c.thresholds ? d_thr.as<float>() : nullptr;
  a.row_mask = c.mask ? d_mask.as<bool>() : nullptr;
  a.seeds = d_seed.as<int64_t>();
  a.offsets = d_off.as<int64_t>();
  a.tokens = d_tok.as<int64_t>();
  a.prob = d_prob.as<double>();
  a.stats = d_st.as<double>();
  const int rc = pydiff::sample_categorical_cuda(a, ws.data(), nullptr);
  ++g_checks;
  bool ok = rc == 0 && d_log.intact() && d_tok.intact() && d_prob.intact() && d_st.intact() && ws.intact();
  if (!ok) std::printf("  rc %d or a canary was overwritten\n", rc);
  int bad_rows = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t tg = d_tok.as<int64_t>()[r];
    ++g_rows[tg >= 0 ? 0 : tg == -1 ? 1 : 2];
    const double pg = d_prob.as<double>()[r];
    const double* sg = d_st.as<double>() + 3 * r;
    const double* sc = st_c.data() + 3 * r;
    const bool row_ok = tg == tok_c[size_t(r)] && close(pg, prob_c[size_t(r)], 1e-5, 0) &&
                        close(sg[0], sc[0], 1e-5, 0) && close(sg[1], sc[1], 1e-5, 1e-12) &&
                        close(sg[2], sc[2], 1e-5, 1e-5);
    if (!row_ok && bad_rows++ < 3)
      std::printf("  row %lld: cuda token %lld prob %.17g stats (%.10g %.10g %.10g) | cpu token %lld prob %.17g "
                  "stats (%.10g %.10g %.10g)\n",
                  (long long)r, (long long)tg, pg, sg[0], sg[1], sg[2], (long long)tok_c[size_t(r)], prob_c[size_t(r)],
                  sc[0], sc[1], sc[2]);
    ok = ok && row_ok;
  }
  // Against the run above, bit for bit: the tokens + prob path (want_stats = false: NaN statistics,
  // except at temperature 0, which computes them regardless), and the fused select
  // (PYDIFF_SAMPLING_FUSED=1: the row's last partial block picks the token; the counters live in the
  // poisoned workspace, so a missing reset fails here) with and without the statistics.
  struct Variant {
    bool want, fused;
  };
  for (const Variant v : {Variant{false, false}, Variant{true, true}, Variant{false, true}}) {
    cuda_emu::Buffer v_tok(size_t(R) * 8, 8), v_prob(size_t(R) * 8, 8), v_st(size_t(R) * 24, 8);
    v_tok.fill(0xA5);
    v_prob.fill(0xA5);
    v_st.fill(0xA5);
    ws.fill(0xFF);
    SampleArgs b = a;
    b.want_stats = v.want;
    b.tokens = v_tok.as<int64_t>();
    b.prob = v_prob.as<double>();
    b.stats = v_st.as<double>();
    if (v.fused) setenv("PYDIFF_SAMPLING_FUSED", "1", 1);
    const int rc2 = pydiff::sample_categorical_cuda(b, ws.data(), nullptr);
    unsetenv("PYDIFF_SAMPLING_FUSED");
    ++g_checks;
    bool v_ok = rc2 == 0 && v_tok.intact() && v_prob.intact() && v_st.intact() && ws.intact();
    auto same = [](double x, double y) { return (x != x && y != y) || std::memcmp(&x, &y, sizeof(double)) == 0; };
    for (int64_t r = 0; r < R && v_ok; ++r) {
      const double* s1 = d_st.as<double>() + 3 * r;
      const double* s2 = v_st.as<double>() + 3 * r;
      bool stats_ok = true;
      for (int q = 0; q < 3; ++q) stats_ok = stats_ok && ((v.want || c.T == 0) ? same(s1[q], s2[q]) : s2[q] != s2[q]);
      const double p1 = d_prob.as<double>()[r], p2 = v_prob.as<double>()[r];
      if (v_tok.as<int64_t>()[r] != d_tok.as<int64_t>()[r] || !same(p1, p2) || !stats_ok) {
        std::printf("  want_stats=%d fused=%d row %lld: token %lld vs %lld, prob %.17g vs %.17g, stats (%g %g %g)\n",
                    int(v.want), int(v.fused), (long long)r, (long long)v_tok.as<int64_t>()[r],
                    (long long)d_tok.as<int64_t>()[r], p2, p1, s2[0], s2[1], s2[2]);
        v_ok = false;
      }
    }
    ok = ok && v_ok;
  }
  if (!ok) {
    ++g_fail;
    std::printf("FAIL %s R=%lld V=%lld pad=%lld T=%g thr=%d mask=%d scale=%g specials=%d seed=%llu (%d bad rows)\n",
                dname(c.dt), (long long)R, (long long)V, (long long)c.pad, c.T, c.thresholds, c.mask, c.scale,
                c.specials, (unsigned long long)seed, bad_rows);
  }
}

void check_args() {
  // the host function's own checks
  SampleArgs a{};
  a.dtype = DType::kF32;
  a.rows = 1;
  a.vocab = 5;
  a.row_stride = 5;
  a.temperature = -1;
  ++g_checks;
  if (pydiff::sample_categorical_cuda(a, nullptr, nullptr) != int(cudaErrorInvalidValue)) {
    std::printf("FAIL negative temperature accepted\n");
    ++g_fail;
  }
  a.temperature = std::numeric_limits<double>::quiet_NaN();
  if (pydiff::sample_categorical_cuda(a, nullptr, nullptr) != int(cudaErrorInvalidValue)) {
    std::printf("FAIL NaN temperature accepted\n");
    ++g_fail;
  }
  a.temperature = 1;
  a.vocab = 0;
  if (pydiff::sample_categorical_cuda(a, nullptr, nullptr) != int(cudaErrorInvalidValue)) {
    std::printf("FAIL vocab 0 accepted\n");
    ++g_fail;
  }
  a.vocab = 5;
  a.rows = 0;
  if (pydiff::sample_categorical_cuda(a, nullptr, nullptr) != 0 || !cuda_emu::launches().empty()) {
    std::printf("FAIL rows 0: not a no-op\n");
    ++g_fail;
  }
}

// A token 17 nats below the maximum (p = 4.1e-8) in the same fp32 sum of eight as the maximum, where
// 1 + 4.1e-8 rounds to 1 (the chunk sum misses it): a uniform in its interval (seed 12345, offset
// 96735269: u = 1 - 5.9e-10) must still draw it, since the rescan places the target at its share of
// its own float64 total. Layouts: below a full chunk (thread 0 holds logits 0, 128, 256, ...), a full
// 16-byte-loaded bf16 chunk (thread 0 holds 0..7) and fp32 chunk (thread 0 holds 0..3, 512..515).
void tail_beside_max() {
  struct T { DType dt; int64_t V, tail; };
  // (the tail in the maximum's segment, in another segment of its chunk, in another chunk)
  const T cases[] = {{DType::kF32, 1000, 256}, {DType::kBF16, 1000, 256}, {DType::kBF16, 4096, 7},
                     {DType::kF16, 8192, 5}, {DType::kF32, 4096, 512}, {DType::kBF16, 4096, 3000},
                     {DType::kF32, 4096, 1024}, {DType::kF16, 8192, 4096 + 2500}};
  for (const T& c : cases) {
    const size_t eb = elem_bytes(c.dt);
    cuda_emu::Buffer d_log(size_t(c.V) * eb, 16), d_seed(8, 8), d_off(8, 8), d_tok(8, 8), d_prob(8, 8), d_st(24, 8);
    for (int64_t i = 0; i < c.V; ++i)
      store(c.dt, d_log.data(), i, i == 0 ? 0.f : i == c.tail ? -17.f : -INFINITY);
    const int64_t seed = 12345, off = 96735269;
    d_seed.copy_from(&seed, 8);
    d_off.copy_from(&off, 8);
    d_tok.fill(0xA5);
    d_prob.fill(0xA5);
    SampleArgs a{};
    a.dtype = c.dt;
    a.rows = 1;
    a.vocab = a.row_stride = c.V;
    a.temperature = 1.0;
    a.logits = d_log.data();
    a.seeds = d_seed.as<int64_t>();
    a.offsets = d_off.as<int64_t>();
    a.tokens = d_tok.as<int64_t>();
    a.prob = d_prob.as<double>();
    a.stats = d_st.as<double>();
    a.want_stats = false;
    cuda_emu::Buffer ws(size_t(pydiff::sample_categorical_cuda_workspace(1, c.V)), 8);
    const int rc = pydiff::sample_categorical_cuda(a, ws.data(), nullptr);
    const double p = std::exp(-17.0) / (1 + std::exp(-17.0));
    ++g_checks;
    if (rc != 0 || d_tok.as<int64_t>()[0] != c.tail || !close(d_prob.as<double>()[0], p, 1e-6, 0)) {
      std::printf("FAIL tail beside the maximum: %s V=%lld: token %lld (want %lld), prob %.10g (want %.10g)\n",
                  dname(c.dt), (long long)c.V, (long long)d_tok.as<int64_t>()[0], (long long)c.tail,
                  d_prob.as<double>()[0], p);
      ++g_fail;
    }
  }
}

// The partials' segment sums and flush flags, read from the workspace after a run: V = 4096 (one
// chunk), the maximum 0 at index 0, segment 1 (indices 1024 .. 2047) at -200 (kept, but e^-200 flushes
// to 0 in fp32), segment 2 at -5, segment 3 -inf. Without a threshold: segment sums (1, 0, 1024 e^-5,
// 0), s = their sum in order, flushed = 0b0010; with tau = -100 segment 1 is not kept: flushed = 0.
// Both: the tokens of six seeds equal the CPU kernel's (the flagged chunk is rescanned whole).
void segment_partials() {
  for (const DType dt : {DType::kF32, DType::kBF16})
    for (const bool thr : {false, true}) {
      const int64_t V = 4096;
      const size_t eb = elem_bytes(dt);
      cuda_emu::Buffer d_log(size_t(V) * eb, 16), d_thr(4, 4), d_seed(8, 8), d_off(8, 8), d_tok(8, 8), d_prob(8, 8),
          d_st(24, 8);
      for (int64_t i = 0; i < V; ++i)
        store(dt, d_log.data(), i, i == 0 ? 0.f : i < 1024 ? -INFINITY : i < 2048 ? -200.f : i < 3072 ? -5.f : -INFINITY);
      const float tau = -100.f;
      const int64_t seed = 7, off = 11;
      d_thr.copy_from(&tau, 4);
      d_seed.copy_from(&seed, 8);
      d_off.copy_from(&off, 8);
      SampleArgs a{};
      a.dtype = dt;
      a.rows = 1;
      a.vocab = a.row_stride = V;
      a.temperature = 1.0;
      a.logits = d_log.data();
      a.threshold = thr ? d_thr.as<float>() : nullptr;
      a.seeds = d_seed.as<int64_t>();
      a.offsets = d_off.as<int64_t>();
      a.tokens = d_tok.as<int64_t>();
      a.prob = d_prob.as<double>();
      a.stats = d_st.as<double>();
      cuda_emu::Buffer ws(size_t(pydiff::sample_categorical_cuda_workspace(1, V)), 8);
      ws.fill(0xFF);
      const int rc = pydiff::sample_categorical_cuda(a, ws.data(), nullptr);
      const pydiff::Partial& p = *reinterpret_cast<const pydiff::Partial*>(ws.data());
      const double want2 = 1024 * std::exp(-5.0);
      // the token (flagged: chosen from the whole chunk; else from the segment sums) against the CPU
      // kernel's, for a few seeds
      bool tokens_ok = true;
      for (int64_t sd = 0; sd < 6 && rc == 0; ++sd) {
        d_seed.copy_from(&sd, 8);
        int64_t tok_c = -9;
        double prob_c = 0, st_c[3];
        SampleArgs b = a;
        b.tokens = &tok_c;
        b.prob = &prob_c;
        b.stats = st_c;
        if (pydiff::sample_categorical_cpu(b) != 0 || pydiff::sample_categorical_cuda(a, ws.data(), nullptr) != 0 ||
            d_tok.as<int64_t>()[0] != tok_c || !close(d_prob.as<double>()[0], prob_c, 1e-5, 0)) {
          std::printf("  seed %lld: cuda token %lld, cpu token %lld\n", (long long)sd, (long long)d_tok.as<int64_t>()[0],
                      (long long)tok_c);
          tokens_ok = false;
        }
      }
      ++g_checks;
      const bool ok = rc == 0 && tokens_ok && p.flushed == (thr ? 0 : 2) && close(p.seg[0], 1.0, 1e-6, 0) &&
                      p.seg[1] == 0.0 && close(p.seg[2], want2, 1e-6, 0) && p.seg[3] == 0.0 &&
                      p.s == ((p.seg[0] + p.seg[1]) + p.seg[2]) + p.seg[3];
      if (!ok) {
        std::printf("FAIL segment partials %s threshold %d: rc %d flushed %d seg (%.10g %.10g %.10g %.10g) s %.17g\n",
                    dname(dt), int(thr), rc, p.flushed, p.seg[0], p.seg[1], p.seg[2], p.seg[3], p.s);
        ++g_fail;
      }
    }
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  check_args();
  tail_beside_max();
  segment_partials();
  const DType dts[] = {DType::kF32, DType::kF16, DType::kBF16};
  const double temps[] = {1.0, 0.7, 2.5, 1e-3, 1e-6, 1e-30, 1e-40, 1e-44, 1e30, 1e50, 0.0};
  const int64_t vocabs[] = {1, 2, 31, 257, 2048, 2049, 4095, 4096, 4097, 8191, 12289, 40961};
  uint64_t seed = 1;
  int n = 0;
  for (const int64_t V : vocabs)
    for (const DType dt : dts) {
      const double T = temps[size_t(n++) % (sizeof temps / sizeof temps[0])];
      const int64_t R = V > 10000 ? 4 : V > 3000 ? 9 : 33;
      run_case({dt, R, V, 0, T, false, false, 3.0, false}, seed++);
      run_case({dt, R, V, int64_t(V % 3) + 1, T, true, true, 3.0, true}, seed++);
      // special rows without a threshold (the partial kernel then finds NaN through its sums)
      run_case({dt, R, V, 0, T, false, false, 3.0, true}, seed++);
    }
  if (std::getenv("CUDA_EMU_BIG_ROWS")) run_case({DType::kBF16, 65537, 7, 2, 1.0, true, true, 3.0, true}, seed++);
  // temperatures x thresholds / masks / specials on a few sizes
  for (const double T : temps)
    for (const DType dt : dts) {
      run_case({dt, 9, 4097, 5, T, true, true, 8.0, true}, seed++);
      run_case({dt, 37, 97, 0, T, true, false, 0.5, true}, seed++);
      run_case({dt, 5, 1, 0, T, true, true, 1.0, true}, seed++);
      run_case({dt, 9, 4097, 3, T, false, true, 8.0, true}, seed++);
    }
  // wide spread (most tokens underflow against the max), many chunks with weights far apart
  for (const DType dt : dts) {
    run_case({dt, 3, 20011, 0, 1.0, false, false, 300.0, false}, seed++);
    run_case({dt, 3, 20011, 0, 1.0, true, true, 30.0, true}, seed++);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d cases (%ld sampled rows, %ld masked, %ld invalid), %d failed, %zu launches, %.1f s\n", g_checks,
              g_rows[0], g_rows[1], g_rows[2], g_fail, cuda_emu::launches().size(), secs);
  return g_fail ? 1 : 0;
}
