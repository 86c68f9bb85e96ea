// Fused distillation loss on the CPU: per row, the temperature (given or DTD), the teacher
// correction, T^2-scaled KL, cross-entropy and the gradient wrt the student, in one sweep over a
// row held in cache. Rows run in parallel (at::parallel_for), the passes are vectorised with ATen's
// Vectorized at the capability this file was built for. Semantics: docs/METHODS.md; the Python side has
// validated every argument (kernels trust their inputs).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "kdk_contract.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define KDK_HAVE_MXCSR 1
#endif

#ifndef KDK_CPU_CAPABILITY
#define KDK_CPU_CAPABILITY "DEFAULT"
#endif

namespace {

using at::vec::Vectorized;

// The options, their order and the enums come from the one declaration in kdkernels/_options.py
// (setup.py writes kdk_contract.h from it).
using kdk::Options;
using kdk::kCorrectionNone, kdk::kCorrectionRectify, kdk::kCorrectionSmooth, kdk::kCorrectionSwap;
using kdk::kDivergenceJsd, kdk::kDivergenceKl, kdk::kDivergenceReverseKl, kdk::kDivergenceSkewKl,
    kdk::kDivergenceSkewReverseKl;
using kdk::kFlagStillWrong, kdk::kFlagTeacherCorrect;
using kdk::kTempCosine, kdk::kTempMaxProb, kdk::kTempRows, kdk::kTempScalar;

// Elements per thread at the least, as torch's own ops (at::internal::GRAIN_SIZE): a smaller
// call stays on one thread, where waking another costs about what it saves, and where a busy
// second core would stall the call for a scheduler slice (measured: 8 ms instead of 0.13 ms at
// 256 x 100 with 16384).
constexpr int64_t kGrainElements = at::internal::GRAIN_SIZE;

// ---- row loading: any input dtype into the accumulation type ------------------------------

template <typename T>
constexpr bool is_half_v = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;

// n values of any input dtype into acc_t; bf16 / fp16 into float 32 lanes at a time.
template <typename acc_t, typename in_t>
void widen(const in_t* src, acc_t* dst, int64_t n) {
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float> && is_half_v<in_t>) {
    using VH = Vectorized<in_t>;
    for (; j + VH::size() <= n; j += VH::size()) {
      auto [lo, hi] = at::vec::convert_to_float<in_t>(VH::loadu(src + j));
      lo.store(dst + j);
      hi.store(dst + j + Vectorized<float>::size());
    }
  }
  for (; j < n; ++j) {
    if constexpr (is_half_v<in_t>) dst[j] = static_cast<acc_t>(static_cast<float>(src[j]));
    else dst[j] = static_cast<acc_t>(src[j]);
  }
}

// C values of a row from column `from` as acc_t: the input itself when it already is, else
// converted into buf.
template <typename acc_t>
const acc_t* load_row(const at::Tensor& x, int64_t row, int64_t C, acc_t* buf, int64_t from = 0) {
  const char* base = static_cast<const char*>(x.const_data_ptr()) +
                     (row * x.stride(0) + from) * static_cast<int64_t>(x.element_size());
  switch (x.scalar_type()) {
    case at::kFloat:
      if constexpr (std::is_same_v<acc_t, float>) return reinterpret_cast<const float*>(base);
      widen(reinterpret_cast<const float*>(base), buf, C);
      return buf;
    case at::kDouble:
      if constexpr (std::is_same_v<acc_t, double>) return reinterpret_cast<const double*>(base);
      widen(reinterpret_cast<const double*>(base), buf, C);
      return buf;
    case at::kBFloat16:
      widen(reinterpret_cast<const at::BFloat16*>(base), buf, C);
      return buf;
    case at::kHalf:
      widen(reinterpret_cast<const at::Half*>(base), buf, C);
      return buf;
    default:
      TORCH_CHECK(false, "kdkernels: unsupported dtype ", x.scalar_type());
  }
}

// C values into a row of out from column `from` (unit class stride), converted.
template <typename acc_t>
void store_row(const acc_t* src, at::Tensor& out, int64_t row, int64_t C, int64_t from = 0) {
  const int64_t first = row * out.stride(0) + from;
  switch (out.scalar_type()) {
    case at::kFloat: at::vec::convert(src, out.data_ptr<float>() + first, C); break;
    case at::kDouble: at::vec::convert(src, out.data_ptr<double>() + first, C); break;
    case at::kBFloat16: at::vec::convert(src, out.data_ptr<at::BFloat16>() + first, C); break;
    case at::kHalf: at::vec::convert(src, out.data_ptr<at::Half>() + first, C); break;
    default: TORCH_CHECK(false, "kdkernels: unsupported dtype ", out.scalar_type());
  }
}

// ---- vector loops -----------------------------------------------------------------------

// Calls body(j, n) over [0, C) in vector steps; n < lanes only on the tail. load() and keep()
// below read and mask the tail so that every pass handles it with the same code.
template <typename acc_t, typename Body>
inline void for_vectors(int64_t C, Body body) {
  constexpr int64_t L = Vectorized<acc_t>::size();
  int64_t j = 0;
  for (; j + L <= C; j += L) body(j, L);
  if (j < C) body(j, C - j);
}

template <typename acc_t>
inline Vectorized<acc_t> load(const acc_t* p, int64_t n) {
  return n == Vectorized<acc_t>::size() ? Vectorized<acc_t>::loadu(p)
                                        : Vectorized<acc_t>::loadu(p, n);
}

// v on the first n lanes, fill on the others.
template <typename acc_t>
inline Vectorized<acc_t> keep(const Vectorized<acc_t>& v, int64_t n, acc_t fill) {
  return n == Vectorized<acc_t>::size() ? v : Vectorized<acc_t>::set(Vectorized<acc_t>(fill), v, n);
}

template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) return x.exp_u20();
  else return x.exp();
}

// x^k for a small integer k >= 1, by squaring.
template <typename acc_t>
inline Vectorized<acc_t> ipow(Vectorized<acc_t> x, int k) {
  Vectorized<acc_t> result(1);
  while (k > 0) {
    if (k & 1) result = result * x;
    x = x * x;
    k >>= 1;
  }
  return result;
}

// Flush denormals to zero on this thread while a kernel runs (values below 1e-38 carry no
// weight in a softmax sum; computing them costs microcode assists); restored afterwards.
struct FlushDenormals {
#ifdef KDK_HAVE_MXCSR
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// First index in [0, C) where x equals v (C if none).
template <typename acc_t>
int64_t find_first(const acc_t* x, int64_t C, acc_t v) {
  int64_t found = C;
  constexpr int64_t L = Vectorized<acc_t>::size();
  for (int64_t j = 0; j < C && found == C; j += L) {
    const int64_t n = std::min(L, C - j);
    acc_t lanes[L];
    (load(x + j, n) == Vectorized<acc_t>(v)).store(lanes);
    for (int64_t k = 0; k < n; ++k) {
      if (lanes[k] != 0) { found = j + k; break; }
    }
  }
  return found;
}

// Largest value of x over [begin, end).
template <typename acc_t>
acc_t range_max(const acc_t* x, int64_t begin, int64_t end) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  Vectorized<acc_t> m(-inf);
  for_vectors<acc_t>(end - begin, [&](int64_t j, int64_t n) {
    m = at::vec::maximum(m, keep(load(x + begin + j, n), n, -inf));
  });
  return hmax(m);
}

template <typename acc_t>
inline acc_t xlogy_self(acc_t x) { return x > 0 ? x * std::log(x) : acc_t(0); }

// x * (log x - log p) with 0 * log 0 = 0; log_x given to keep precision for tiny x.
template <typename acc_t>
inline acc_t kl_term(acc_t x, acc_t log_x, acc_t log_p) { return x > 0 ? x * (log_x - log_p) : acc_t(0); }

// ---- KL without cancellation (docs/METHODS.md, "Computing KL without cancellation") ------

// F(d) = expm1(d) - d = sum_{k=2..K} d^k / k!, for |d| < 1/2; K puts the next term under eps.
template <typename acc_t>
inline Vectorized<acc_t> expm1_excess(const Vectorized<acc_t>& d) {
  constexpr int last = std::is_same_v<acc_t, double> ? 17 : 9;
  double inv_factorial[last + 1];
  inv_factorial[0] = 1;
  for (int k = 1; k <= last; ++k) inv_factorial[k] = inv_factorial[k - 1] / k;
  auto f = Vectorized<acc_t>(acc_t(inv_factorial[last]));
  for (int k = last - 1; k >= 2; --k) f = at::vec::fmadd(f, d, Vectorized<acc_t>(acc_t(inv_factorial[k])));
  return d * d * f;
}

// r(a) = (1 + a) log1p(a) - a >= 0, accurate near 0.
template <typename acc_t>
inline acc_t log1p_excess(acc_t a) {
  if (std::abs(a) >= acc_t(0.1)) return (1 + a) * std::log1p(a) - a;
  constexpr int last = std::is_same_v<acc_t, double> ? 16 : 8;
  acc_t series = 0;
  for (int k = last; k >= 2; --k) series = series * -a + acc_t(1) / acc_t(k * (k - 1));
  return series * a * a;
}

// Per row, with es_j = exp((s_j - ms) / T), et_j = exp((t_j - mt) / T) already in cache:
// d_j = (t_j - s_j) / T - c, c = E_q[(t - s) / T]; A = E_p[expm1(d)], Psi = E_p[psi(d)] with
// psi(d) = 1 - e^d (1 - d); then KL(q || p) = (Psi - r(A)) / (1 + A), free of the cancellation
// that costs the usual form ~T^2 eps log C. Also writes es_j expm1(d_j) into esE (the gradient
// p - q = -(esE - A es) / (zs (1 + A)) keeps the same accuracy). `usable` is false where the
// form does not apply (|A| >= 1/2, or a class with q > 0 and p = 0): the usual form is then
// accurate, p and q being far apart.
template <typename acc_t>
struct StableKl {
  acc_t kl, A;
  bool usable;
};

template <typename acc_t>
StableKl<acc_t> stable_kl(const acc_t* s, const acc_t* t, const acc_t* es, const acc_t* et,
                          int64_t C, acc_t inv_t, acc_t c, acc_t ms, acc_t mt, acc_t zs,
                          acc_t* esE) {
  using Vec = Vectorized<acc_t>;
  const acc_t K = std::exp((mt - ms) * inv_t - c);  // es e^d = et K
  Vec vA(0), vPsi(0), vorphan(0);
  for_vectors<acc_t>(C, [&](int64_t j, int64_t n) {
    Vec vs = load(s + j, n), vt = load(t + j, n), ves = load(es + j, n), vet = load(et + j, n);
    Vec d = (vt - vs) * Vec(inv_t) - Vec(c);
    Vec small = d.abs() < Vec(acc_t(0.5));
    Vec dz = Vec::blendv(Vec(0), d, small);
    Vec F = expm1_excess(dz);
    Vec etK = vet * Vec(K);
    Vec e = Vec::blendv(etK - ves, ves * (dz + F), small);                        // es expm1(d)
    Vec psi = Vec::blendv(ves - etK * (Vec(1) - d), ves * (dz * dz + (dz - Vec(1)) * F), small);
    Vec live = (ves > Vec(0)) | (vet > Vec(0));  // both -inf: no mass on either side
    e = Vec::blendv(Vec(0), e, live);
    psi = Vec::blendv(Vec(0), psi, live);
    e.store(esE + j, n);
    vA = vA + keep(e, n, acc_t(0));
    vPsi = vPsi + keep(psi, n, acc_t(0));
    Vec orphan = (ves == Vec(0)) & (vet > Vec(0));
    vorphan = vorphan + keep(Vec::blendv(Vec(0), Vec(1), orphan), n, acc_t(0));
  });
  const acc_t A = hsum(vA) / zs, Psi = hsum(vPsi) / zs;
  const acc_t kl = (Psi - log1p_excess(A)) / (1 + A);
  return {kl, A, std::abs(A) < acc_t(0.5) && std::isfinite(kl) && hsum(vorphan) == 0};
}

// ---- the divergences (docs/METHODS.md, "Divergences") -----------------------------------

// Per entry of a target r and a student p (classes, or a sparse teacher's outcomes), with their
// logs: the divergence's term d (summing to D) and G = dD/dp_j up to a constant (it cancels in
// the gradient p_j (G_j - sum_k p_k G_k)). G is 0 where p = 0.
template <typename acc_t>
struct DivTerms {
  Vectorized<acc_t> d, G;
};

template <typename acc_t>
inline DivTerms<acc_t> div_terms(int64_t kind, acc_t param, const Vectorized<acc_t>& P,
                                 const Vectorized<acc_t>& lP, const Vectorized<acc_t>& R,
                                 const Vectorized<acc_t>& lR) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(0), live_p = P > zero, live_r = R > zero;
  Vec d, G;
  if (kind == kDivergenceKl) {  // r log(r / p)
    d = Vec::blendv(zero, R * (lR - lP), live_r);
    G = Vec::blendv(zero, zero - R / P, live_p);
  } else if (kind == kDivergenceReverseKl) {  // p log(p / r)
    d = Vec::blendv(zero, P * (lP - lR), live_p);
    G = lP - lR;
  } else if (kind == kDivergenceJsd) {  // beta r log(r / m) + (1 - beta) p log(p / m)
    const Vec lm = (Vec(1 - param) * P + Vec(param) * R).log();
    d = Vec(param) * Vec::blendv(zero, R * (lR - lm), live_r) +
        Vec(1 - param) * Vec::blendv(zero, P * (lP - lm), live_p);
    G = Vec(1 - param) * (lP - lm);
  } else if (kind == kDivergenceSkewKl) {  // r log(r / m), m = a r + (1 - a) p
    const Vec m = Vec(param) * R + Vec(1 - param) * P;
    d = Vec::blendv(zero, R * (lR - m.log()), live_r);
    G = Vec::blendv(zero, Vec(-(1 - param)) * R / m, m > zero);
  } else if (kind == kDivergenceSkewReverseKl) {  // p log(p / m), m = a p + (1 - a) r
    const Vec m = Vec(param) * P + Vec(1 - param) * R;
    d = Vec::blendv(zero, P * (lP - m.log()), live_p);
    G = lP - m.log() + Vec(1) - Vec(param) * P / m;
  } else {  // total variation, |p - r| / 2
    const Vec diff = P - R;
    d = Vec(acc_t(0.5)) * diff.abs();
    G = Vec::blendv(zero, Vec(acc_t(0.5)), diff > zero) - Vec::blendv(zero, Vec(acc_t(0.5)), diff < zero);
  }
  return {d, Vec::blendv(zero, G, live_p)};
}

template <typename acc_t>
inline acc_t first_lane(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  return lanes[0];
}

// div_terms of one entry.
template <typename acc_t>
inline std::pair<acc_t, acc_t> div_term(int64_t kind, acc_t param, acc_t P, acc_t lP, acc_t R,
                                        acc_t lR) {
  using Vec = Vectorized<acc_t>;
  auto terms = div_terms<acc_t>(kind, param, Vec(P), Vec(lP), Vec(R), Vec(lR));
  return {first_lane(terms.d), first_lane(terms.G)};
}

// X(z) = z - log1p(z) >= 0 (~z^2 / 2), accurate near 0: sum_{k>=2} (-z)^k / k for |z| < 1/10.
template <typename acc_t>
inline Vectorized<acc_t> x_minus_log1p(const Vectorized<acc_t>& z) {
  using Vec = Vectorized<acc_t>;
  constexpr int last = std::is_same_v<acc_t, double> ? 16 : 8;  // next term under eps
  const Vec small = z.abs() < Vec(acc_t(0.1));
  const Vec zs = Vec::blendv(Vec(0), z, small), minus = Vec(0) - zs;
  Vec series(0);
  for (int k = last; k >= 2; --k) series = at::vec::fmadd(series, minus, Vec(acc_t(1) / acc_t(k)));
  return Vec::blendv(z - z.log1p(), series * zs * zs, small);
}

// div_terms without cancellation (docs/METHODS.md, "The other divergences without
// cancellation"), given also delta_j = log(r_j / p_j) computed accurately. Where |delta| < 1,
// each term is p_j f(e^delta_j) with f >= 0 and ~delta^2 (the linear part of the f-divergence,
// which sums to 0, taken out), and G is shifted by a constant so that it is O(delta); elsewhere
// the direct terms, with the same linear part and shift, are accurate.
template <typename acc_t>
inline DivTerms<acc_t> div_terms_exact(int64_t kind, acc_t param, const Vectorized<acc_t>& P,
                                       const Vectorized<acc_t>& lP, const Vectorized<acc_t>& R,
                                       const Vectorized<acc_t>& lR,
                                       const Vectorized<acc_t>& delta) {
  using Vec = Vectorized<acc_t>;
  if (kind == kDivergenceKl) return div_terms<acc_t>(kind, param, P, lP, R, lR);
  const Vec zero(0), one(1), near = delta.abs() < one, w(param), v(1 - param);
  const Vec live_p = P > zero, use = near & live_p;
  // the direct terms only where some lane needs them (none, at high temperature)
  DivTerms<acc_t> far{zero, zero};
  if (use.zero_mask() != 0) far = div_terms<acc_t>(kind, param, P, lP, R, lR);
  const Vec E = delta.expm1(), u = E + one;
  Vec d, G;
  if (kind == kDivergenceReverseKl) {  // f(u) = u - 1 - log u
    d = P * x_minus_log1p(E);
    G = zero - delta;
    far.d = far.d + (R - P);
  } else if (kind == kDivergenceJsd) {
    const Vec a = w * E, b = v * (zero - delta).expm1();
    d = P * (w * u * x_minus_log1p(b) + v * x_minus_log1p(a));
    G = zero - v * a.log1p();
  } else if (kind == kDivergenceSkewKl) {  // f(u) = u log(u / m) - (1 - a)(u - 1)
    const Vec b = v * (zero - delta).expm1();
    d = P * u * x_minus_log1p(b);
    G = v * b / (one + b);
    far.d = far.d - v * (R - P);
    far.G = far.G + v;
  } else if (kind == kDivergenceSkewReverseKl) {  // f(u) = -log m + (1 - a)(u - 1)
    const Vec z = v * E;
    d = P * x_minus_log1p(z);
    G = w * z / (one + z) - z.log1p();
    far.d = far.d + v * (R - P);
    far.G = far.G - v;
  } else {  // total variation
    d = Vec(acc_t(0.5)) * P * E.abs();
    G = Vec::blendv(zero, Vec(acc_t(-0.5)), delta > zero) - Vec::blendv(zero, Vec(acc_t(-0.5)), delta < zero);
  }
  return {Vec::blendv(far.d, d, use), Vec::blendv(zero, Vec::blendv(far.G, G, near), live_p)};
}

// One target value that differs from the row's base target (the correction at y and b): r and
// log r, and `partner`, the class whose teacher value it took (swap; else -1), from which its
// log ratio is exact.
template <typename acc_t>
struct TargetFix {
  int64_t j;
  acc_t r, log_r;
  int64_t partner;
};

// D over a dense row for the divergences other than forward KL. The base target is the teacher,
// r_j = et_j / zt, or (a smoothed row) the uniform `uniform`; `fixes` replace it at up to two
// classes. Writes G_j into G and returns (D, sum_j p_j G_j). The log ratios
// delta_j = log(r_j / p_j) come from x_j = ((t_j - mt) - (s_j - ms)) / T as
// delta_j = (x_j - c) - log1p(A), c = log(zt / zs), A = E_p[expm1(x - c)] (exact: E_p[e^delta] = 1),
// not as the difference of two logs of size log C.
template <typename acc_t>
std::pair<acc_t, acc_t> dense_divergence(const acc_t* s, const acc_t* t, int64_t C,
                                         const acc_t* es, const acc_t* et, acc_t ms, acc_t mt,
                                         acc_t inv_t, acc_t zs, acc_t zt, bool uniform_base,
                                         acc_t uniform, const TargetFix<acc_t>* fixes, int nfix,
                                         const Options& o, acc_t* G) {
  using Vec = Vectorized<acc_t>;
  const acc_t param = acc_t(o.divergence_param), log_zs = std::log(zs), log_zt = std::log(zt);
  const acc_t inv_zs = 1 / zs, inv_zt = 1 / zt, log_uniform = std::log(uniform);
  const acc_t c = log_zt - log_zs;
  auto centred = [&](const Vec& vs, const Vec& vt) {  // x - c
    return ((vt - Vec(mt)) - (vs - Vec(ms))) * Vec(inv_t) - Vec(c);
  };
  acc_t L = 0;  // log1p(A)
  bool exact = !uniform_base;
  if (exact) {
    Vec vA(0), vorphan(0);
    for_vectors<acc_t>(C, [&](int64_t j, int64_t n) {
      Vec ves = load(es + j, n), vet = load(et + j, n);
      Vec e = ves * centred(load(s + j, n), load(t + j, n)).expm1();
      vA = vA + keep(Vec::blendv(Vec(0), e, ves > Vec(0)), n, acc_t(0));
      // a class with r > 0 = p: E_p[r / p] = 1 no longer holds
      vorphan = vorphan + keep(Vec::blendv(Vec(0), Vec(1), (ves == Vec(0)) & (vet > Vec(0))), n, acc_t(0));
    });
    const acc_t A = hsum(vA) * inv_zs;
    // else r and p are far apart, and the difference of the logs loses nothing
    exact = std::isfinite(A) && std::abs(A) < acc_t(0.5) && hsum(vorphan) == 0;
    L = exact ? std::log1p(A) : acc_t(0);
  }
  auto log_ratio = [&](const Vec& vs, const Vec& vt, const Vec& lP, const Vec& lR) {
    return exact ? centred(vs, vt) - Vec(L) : lR - lP;
  };
  Vec vD(0), vGbar(0);
  for_vectors<acc_t>(C, [&](int64_t j, int64_t n) {
    Vec vs = load(s + j, n), vt = load(t + j, n);
    Vec P = load(es + j, n) * Vec(inv_zs);
    Vec lP = (vs - Vec(ms)) * Vec(inv_t) - Vec(log_zs);
    Vec R = uniform_base ? Vec(uniform) : load(et + j, n) * Vec(inv_zt);
    Vec lR = uniform_base ? Vec(log_uniform) : (vt - Vec(mt)) * Vec(inv_t) - Vec(log_zt);
    auto terms = div_terms_exact<acc_t>(o.divergence, param, P, lP, R, lR,
                                        log_ratio(vs, vt, lP, lR));
    terms.G.store(G + j, n);
    vD = vD + keep(terms.d, n, acc_t(0));
    vGbar = vGbar + keep(P * terms.G, n, acc_t(0));
  });
  acc_t D = hsum(vD), Gbar = hsum(vGbar);
  auto one_term = [&](int64_t j, acc_t R, acc_t lR, acc_t delta) {
    const acc_t P = es[j] * inv_zs, lP = (s[j] - ms) * inv_t - log_zs;
    auto terms = div_terms_exact<acc_t>(o.divergence, param, Vec(P), Vec(lP), Vec(R), Vec(lR),
                                        Vec(delta));
    return std::make_pair(first_lane(terms.d), first_lane(terms.G));
  };
  auto base = [&](int64_t j) {  // (r, log r, delta) of the base target at j
    const acc_t lP = (s[j] - ms) * inv_t - log_zs;
    const acc_t R = uniform_base ? uniform : et[j] * inv_zt;
    const acc_t lR = uniform_base ? log_uniform : (t[j] - mt) * inv_t - log_zt;
    return std::array<acc_t, 3>{R, lR, first_lane(log_ratio(Vec(s[j]), Vec(t[j]), Vec(lP), Vec(lR)))};
  };
  for (int f = 0; f < nfix; ++f) {
    const int64_t j = fixes[f].j;
    const auto [R, lR, delta] = base(j);
    const acc_t P = es[j] * inv_zs, lP = (s[j] - ms) * inv_t - log_zs;
    // a value taken from the partner class: its log ratio to p_j is the partner's plus
    // (s_partner - s_j) / T, both small and exact
    const acc_t new_delta = fixes[f].partner >= 0
        ? base(fixes[f].partner)[2] + (s[fixes[f].partner] - s[j]) * inv_t
        : fixes[f].log_r - lP;
    auto [d_old, G_old] = one_term(j, R, lR, delta);
    auto [d_new, G_new] = one_term(j, fixes[f].r, fixes[f].log_r, new_delta);
    D += d_new - d_old;
    Gbar += P * (G_new - G_old);
    G[j] = G_new;
  }
  return {D, Gbar};
}

struct RowOut {
  double loss, temperature;
  int8_t flags;
};

// sum_j exp(s_j - ms), each term kept in e (softmax(s) at T = 1, unnormalised).
template <typename acc_t>
acc_t exp_sum(const acc_t* s, int64_t C, acc_t ms, acc_t* e) {
  using Vec = Vectorized<acc_t>;
  Vec vz(0);
  for_vectors<acc_t>(C, [&](int64_t j, int64_t n) {
    Vec ej = vexp(load(s + j, n) - Vec(ms));
    ej.store(e + j, n);
    vz = vz + keep(ej, n, acc_t(0));
  });
  return hsum(vz);
}

// The rows that skip the math: ignored (loss 0, gradient 0) or holding a bad value (a
// temperature <= 0, a label out of range: loss and gradient NaN, this row only).
template <typename acc_t>
bool skip_row(bool ignored, acc_t T, bool bad_label, const Options& o, acc_t* g, int64_t C,
              RowOut* out) {
  const bool bad = !(T > 0) || bad_label;
  if (!ignored && !bad) return false;
  const acc_t fill = ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
  if (o.compute_grad) std::fill(g, g + C, fill);
  *out = {static_cast<double>(fill), static_cast<double>(T), 0};
  return true;
}

// A row's loss (its KD part and CE at T = 1) and flags.
template <typename acc_t>
RowOut finish_row(acc_t kd_part, acc_t ce_w, acc_t z1, acc_t ms, acc_t s_y, bool labelled,
                  bool wrong, bool still_wrong, acc_t T) {
  double loss = static_cast<double>(kd_part);
  if (ce_w != 0) loss += static_cast<double>(ce_w * (std::log(z1) + ms - s_y));
  int8_t flags = 0;
  if (labelled) {
    flags = static_cast<int8_t>((wrong ? 0 : kFlagTeacherCorrect) |
                                (still_wrong ? kFlagStillWrong : 0));
  }
  return {loss, static_cast<double>(T), flags};
}

// One row. s, t: C values (t already built for the virtual teacher). g: C outputs (acc_t).
// bp, bq, b1, bd: scratch of C values each.
template <typename acc_t>
RowOut distill_row(const acc_t* s, const acc_t* t, int64_t C, int64_t y, bool labelled,
                   bool ignored, acc_t T, const Options& o, acc_t* g, acc_t* bp, acc_t* bq,
                   acc_t* b1, acc_t* bd) {
  using Vec = Vectorized<acc_t>;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const bool dtd = o.temp_mode == kTempCosine || o.temp_mode == kTempMaxProb;
  const bool need_z1 = o.ce_weight != 0 || o.temp_mode == kTempMaxProb;
  if (ignored && !dtd) {
    if (o.compute_grad) std::fill(g, g + C, acc_t(0));
    return {0.0, static_cast<double>(T), 0};
  }

  // Pass 1: maxima (and the cosine's dot products) at T = 1.
  Vec vms(-inf), vmt(-inf), vss(0), vtt(0), vst(0);
  for_vectors<acc_t>(C, [&](int64_t j, int64_t n) {
    Vec vs = load(s + j, n), vt = load(t + j, n);
    vms = at::vec::maximum(vms, keep(vs, n, -inf));
    vmt = at::vec::maximum(vmt, keep(vt, n, -inf));
    if (o.temp_mode == kTempCosine) {  // finite pairs only: x - x is 0 exactly when x is finite
      Vec finite = ((vs - vs) == Vec(0)) & ((vt - vt) == Vec(0));
      Vec fs = Vec::blendv(Vec(0), vs, finite), ft = Vec::blendv(Vec(0), vt, finite);
      vss = vss + keep(fs * fs, n, acc_t(0));
      vtt = vtt + keep(ft * ft, n, acc_t(0));
      vst = vst + keep(fs * ft, n, acc_t(0));
    }
  });
  const acc_t ms = hmax(vms), mt = hmax(vmt);

  acc_t z1 = 0;
  const bool max_prob = o.temp_mode == kTempMaxProb;
  if (max_prob) z1 = exp_sum(s, C, ms, b1);  // softmax(s) at T = 1: the max_prob weight
  if (o.temp_mode == kTempCosine) {
    const acc_t norms = std::max(std::sqrt(hsum(vss)), acc_t(1e-12)) *
                        std::max(std::sqrt(hsum(vtt)), acc_t(1e-12));
    const acc_t c = 1 - hsum(vst) / norms;
    const acc_t raw = acc_t(o.tau0) - acc_t(o.beta) * c * c;
    T = raw < acc_t(o.tau_min) ? acc_t(o.tau_min) : raw;
  } else if (o.temp_mode == kTempMaxProb) {
    const acc_t raw = acc_t(o.tau0) - acc_t(o.beta) * z1;
    T = raw < acc_t(o.tau_min) ? acc_t(o.tau_min) : raw;
  }
  RowOut skipped;
  if (skip_row(ignored, T, labelled && (y < 0 || y >= C), o, g, C, &skipped)) return skipped;

  // A teacher row with no finite logit has no distribution: its KD term is 0 (CE still counts).
  const bool has_teacher = mt > -inf;
  const acc_t mt_shift = has_teacher ? mt : acc_t(0);

  // Pass 2: tempered softmax sums, the KL cross term, and (smooth) the sum of shifted logits.
  const acc_t inv_t = 1 / T;
  const bool smooth = o.correction == kCorrectionSmooth;
  // CE needs exp(s - m) too: at an integer temperature k <= 8 that is exp((s - m) / k)^k
  const bool ce_here = need_z1 && !max_prob;
  const int int_t = (T >= 1 && T <= 8 && T == std::floor(T)) ? static_cast<int>(T) : 0;
  Vec vzs(0), vzt(0), vcross(0), vsd(0), vz1(0);
  for_vectors<acc_t>(C, [&](int64_t j, int64_t n) {
    Vec ds = load(s + j, n) - Vec(ms), dt = load(t + j, n) - Vec(mt_shift);
    Vec es = vexp(ds * Vec(inv_t)), et = vexp(dt * Vec(inv_t));
    es.store(bp + j, n);
    et.store(bq + j, n);
    vzs = vzs + keep(es, n, acc_t(0));
    vzt = vzt + keep(et, n, acc_t(0));
    if (ce_here) {  // at an integer temperature pass 3 recomputes e1 instead of storing it
      Vec e1 = int_t ? ipow(es, int_t) : vexp(ds);
      if (!int_t) e1.store(b1 + j, n);
      vz1 = vz1 + keep(e1, n, acc_t(0));
    }
    // q_j (d_t - d_s): masked where q_j = 0 so that 0 * inf (a masked class) adds nothing
    vcross = vcross + keep(Vec::blendv(Vec(0), et * (dt - ds), et > Vec(0)), n, acc_t(0));
    if (smooth) vsd = vsd + keep(ds, n, acc_t(0));
  });
  const acc_t zs = hsum(vzs), zt = hsum(vzt);
  if (ce_here) z1 = hsum(vz1);
  const acc_t log_zs = std::log(zs), log_zt = std::log(zt);
  acc_t kl = 0;
  StableKl<acc_t> stable{0, 0, false};
  const bool kl_div = o.divergence == kDivergenceKl;
  if (has_teacher && kl_div) {
    const acc_t cross = hsum(vcross) / zt;  // E_q[(t - mt) - (s - ms)]
    stable = stable_kl(s, t, bp, bq, C, inv_t, (cross + mt - ms) * inv_t, ms, mt, zs, bd);
    kl = stable.usable ? stable.kl : cross * inv_t + log_zs - log_zt;
  }

  // Is the teacher wrong? A tie with the label counts as correct.
  const acc_t t_y = labelled ? t[y] : acc_t(0);
  const bool wrong = labelled && t_y < mt;
  const acc_t kd_w = has_teacher ? acc_t(wrong ? o.wrong_kd_weight : o.kd_weight) : acc_t(0);
  const acc_t kd_grad = kd_w * (o.t2_scale ? T : inv_t);
  bool still_wrong = wrong;
  acc_t q_coef = has_teacher ? kd_grad / zt : acc_t(0), const_term = 0;  // g = kd_grad p - q_coef e_t + ...
  acc_t fix_y = 0, fix_b = 0;
  int64_t b = 0;
  acc_t r_y = 0, r_b = 0, lr_y = 0, lr_b = 0;  // the corrected target at y and b
  if (wrong && o.correction != kCorrectionNone) {
    auto log_p = [&](int64_t j) { return (s[j] - ms) * inv_t - log_zs; };
    if (smooth) {
      const acc_t eps = acc_t(o.smooth_eps), ec = eps / acc_t(C);
      const acc_t sum_log_p = hsum(vsd) * inv_t - acc_t(C) * log_zs;
      kl = xlogy_self(1 - eps + ec) + acc_t(C - 1) * xlogy_self(ec) - (1 - eps) * log_p(y) -
           ec * sum_log_p;
      q_coef = 0;
      const_term = -kd_grad * ec;
      fix_y = -kd_grad * (1 - eps);
      still_wrong = false;
    } else {
      b = find_first(t, C, mt);  // the first maximum
      if (b == C) b = 0;          // only for a NaN row, which is poisoned anyway
      const acc_t q_y = bq[y] / zt, q_b = bq[b] / zt;
      const acc_t lq_y = (t_y - mt) * inv_t - log_zt, lq_b = (t[b] - mt) * inv_t - log_zt;
      if (o.correction == kCorrectionSwap) {
        r_y = q_b; lr_y = lq_b; r_b = q_y; lr_b = lq_y;
        still_wrong = false;
        // KL changes by (q_y - q_b)(log p_y - log p_b): both differences exact, not cancelled
        const acc_t diff = q_b * std::expm1((t_y - t[b]) * inv_t);
        kl += diff * (s[y] - s[b]) * inv_t;
        fix_y = kd_grad * diff;
        fix_b = -kd_grad * diff;
      } else {  // rectify
        const acc_t new_y = (q_y + 1) / 2, new_b = q_b / 2, k = (q_y + q_b) / (new_y + new_b);
        r_y = new_y * k; r_b = new_b * k;
        lr_y = std::log(r_y); lr_b = std::log(r_b);
        // the largest teacher logit away from the label and the argmax
        const int64_t lo = std::min(y, b), hi = std::max(y, b);
        const acc_t other = std::max({range_max(t, 0, lo), range_max(t, lo + 1, hi),
                                      range_max(t, hi + 1, C)});
        const acc_t q_other = other == -inf ? acc_t(0) : std::exp((other - mt) * inv_t) / zt;
        still_wrong = std::max(r_b, q_other) > r_y;
      }
      if (o.correction == kCorrectionRectify) {
        const acc_t lp_y = log_p(y), lp_b = log_p(b);
        kl += kl_term(r_y, lr_y, lp_y) + kl_term(r_b, lr_b, lp_b) - kl_term(q_y, lq_y, lp_y) -
              kl_term(q_b, lq_b, lp_b);
        fix_y = kd_grad * (q_y - r_y);
        fix_b = kd_grad * (q_b - r_b);
      }
    }
  }
  acc_t g_mean = 0;  // the other divergences: sum_j p_j G_j, with G_j in bd
  if (!kl_div) {
    TargetFix<acc_t> fixes[2];
    int nfix = 0;
    const acc_t ec = acc_t(o.smooth_eps) / acc_t(C);
    const bool smoothed = wrong && smooth;
    if (smoothed) {
      const acc_t top = 1 - acc_t(o.smooth_eps) + ec;
      fixes[nfix++] = {y, top, std::log(top), -1};
    } else if (wrong && o.correction != kCorrectionNone) {
      const bool swap = o.correction == kCorrectionSwap;
      fixes[nfix++] = {y, r_y, lr_y, swap ? b : int64_t(-1)};
      fixes[nfix++] = {b, r_b, lr_b, swap ? y : int64_t(-1)};
    }
    kl = 0;
    if (has_teacher) {
      std::tie(kl, g_mean) = dense_divergence<acc_t>(s, t, C, bp, bq, ms, mt, inv_t, zs, zt,
                                                    smoothed, ec, fixes, nfix, o, bd);
    }
    q_coef = const_term = fix_y = fix_b = 0;
  }
  const acc_t ce_w = acc_t(o.ce_weight);
  const RowOut out = finish_row<acc_t>(kd_w * (o.t2_scale ? T * T : acc_t(1)) * kl, ce_w, z1,
                                       ms, labelled ? s[y] : acc_t(0), labelled, wrong,
                                       still_wrong, T);
  if (!o.compute_grad) return out;

  // Pass 3: the gradient, kd_grad (p - target) + ce_w (softmax(s) - onehot(y)).
  // every gradient coefficient carries the caller's scale (1 / rows for "mean" on the CPU)
  const acc_t gs = acc_t(o.grad_scale);
  const acc_t p_coef = gs * kd_grad / zs, c1 = ce_w != 0 ? gs * ce_w / z1 : acc_t(0);
  q_coef *= gs;
  const_term *= gs;
  const bool e1_from_p = ce_here && int_t;
  // p - q from the cancellation-free form where it applies (not on rows "smooth" replaced)
  const bool stable_grad = stable.usable && q_coef != 0;
  const acc_t e_coef = stable_grad ? -gs * kd_grad / (zs * (1 + stable.A)) : acc_t(0);
  const bool divergence_grad = !kl_div && has_teacher;  // p_j (G_j - sum_k p_k G_k)
  for_vectors<acc_t>(C, [&](int64_t j, int64_t n) {  // g may be bp itself: same index, read first
    Vec ep = load(bp + j, n);
    Vec gv = divergence_grad ? Vec(p_coef) * ep * (load(bd + j, n) - Vec(g_mean))
        : stable_grad
        ? Vec(e_coef) * (load(bd + j, n) - Vec(stable.A) * ep)
        : Vec(p_coef) * ep - Vec(q_coef) * load(bq + j, n) + Vec(const_term);
    if (ce_w != 0) gv = gv + Vec(c1) * (e1_from_p ? ipow(ep, int_t) : load(b1 + j, n));
    gv.store(g + j, n);
  });
  if (labelled) {
    g[y] += gs * (fix_y - ce_w);
    g[b] += gs * fix_b;
  }
  return out;
}

// One row against a sparse (top-k) teacher: v, idx its k values and class ids (a negative or
// out-of-range id is an unused slot). The divergence compares distributions over outcomes
// (docs/METHODS.md, "Sparse (top-k) teachers"): each of the k classes, the label when a swap or
// rectify needs it and it is not among them (teacher mass 0 before the correction), and the rest,
// which carries the teacher's tail (tail: values are log-probabilities, 1 - sum exp(v) the mass
// of every other class) or nothing. Only the student row is dense: one pass for its softmax, one
// for the gradient. bp, b1: scratch of C values; outcome: scratch of 6 (k + 2) values.
template <typename acc_t>
RowOut distill_row_sparse(const acc_t* s, int64_t C, const acc_t* v, const int64_t* idx,
                          int64_t k, int64_t y, bool labelled, bool ignored, acc_t T,
                          const Options& o, acc_t* g, acc_t* bp, acc_t* b1, acc_t* outcome) {
  using Vec = Vectorized<acc_t>;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const bool dtd = o.temp_mode == kTempCosine || o.temp_mode == kTempMaxProb;
  const bool smooth = o.correction == kCorrectionSmooth;
  const acc_t ce_w = acc_t(o.ce_weight);
  auto used = [&](int64_t j) { return idx[j] >= 0 && idx[j] < C; };
  if (ignored && !dtd) {
    if (o.compute_grad) std::fill(g, g + C, acc_t(0));
    return {0.0, static_cast<double>(T), 0};
  }
  const acc_t ms = range_max(s, 0, C);
  acc_t z1 = 0;
  if (o.temp_mode == kTempMaxProb || ce_w != 0) z1 = exp_sum(s, C, ms, b1);  // kept in b1
  if (o.temp_mode == kTempCosine) {  // over the teacher's classes: the finite pairs
    acc_t ss = 0, tt = 0, st = 0;
    for (int64_t j = 0; j < k; ++j) {
      if (!used(j) || !std::isfinite(s[idx[j]]) || !std::isfinite(v[j])) continue;
      ss += s[idx[j]] * s[idx[j]];
      tt += v[j] * v[j];
      st += s[idx[j]] * v[j];
    }
    const acc_t c = 1 - st / (std::max(std::sqrt(ss), acc_t(1e-12)) *
                              std::max(std::sqrt(tt), acc_t(1e-12)));
    T = std::max(acc_t(o.tau0) - acc_t(o.beta) * c * c, acc_t(o.tau_min));
  } else if (o.temp_mode == kTempMaxProb) {
    T = std::max(acc_t(o.tau0) - acc_t(o.beta) * z1, acc_t(o.tau_min));
  }
  RowOut skipped;
  if (skip_row(ignored, T, labelled && (y < 0 || y >= C), o, g, C, &skipped)) return skipped;
  const acc_t inv_t = 1 / T;

  // The student at T: es_j in bp, their sum, and (smooth) the sum of the shifted logits.
  Vec vzs(0), vsd(0);
  for_vectors<acc_t>(C, [&](int64_t j, int64_t n) {
    Vec ds = load(s + j, n) - Vec(ms);
    Vec es = vexp(ds * Vec(inv_t));
    es.store(bp + j, n);
    vzs = vzs + keep(es, n, acc_t(0));
    if (smooth) vsd = vsd + keep(ds, n, acc_t(0));
  });
  const acc_t zs = hsum(vzs), log_zs = std::log(zs);

  // The teacher: its argmax b (first by class id), the label among its classes, wrong.
  int64_t n_used = 0, pos_y = k, pos_b = -1;
  bool has_teacher = false;  // a used slot that is not -inf (a tail alone is no teacher)
  acc_t best = -inf;
  double mass = 0;  // the tail is often a small difference of masses near 1
  for (int64_t j = 0; j < k; ++j) {
    if (!used(j)) continue;
    ++n_used;
    has_teacher = has_teacher || !(v[j] == -inf);
    if (o.teacher_tail) mass += std::exp(static_cast<double>(v[j]));
    if (pos_b < 0 || v[j] > best || (v[j] == best && idx[j] < idx[pos_b])) {
      best = v[j];
      pos_b = j;
    }
    if (labelled && idx[j] == y) pos_y = j;
  }
  const bool in_k = pos_y < k;
  const bool wrong = labelled && best > -inf && (!in_k || v[pos_y] < best);
  const bool extra = wrong && !in_k &&
                     (o.correction == kCorrectionSwap || o.correction == kCorrectionRectify);
  const bool rest_empty = n_used + (extra ? 1 : 0) >= C;  // no class left for the tail
  const acc_t tail = o.teacher_tail && !rest_empty ? acc_t(std::max(1 - mass, 0.0)) : 0;

  // The outcomes: 0..k-1 the classes, k the label's slot, k + 1 the rest.
  const int64_t M = k + 2;
  acc_t *P = outcome, *lP = P + M, *R = lP + M, *lR = R + M, *d = lR + M, *G = d + M;
  for (int64_t j = 0; j < k; ++j) {
    R[j] = used(j) ? v[j] : -inf;  // log-weights first, tempered below
    P[j] = used(j) ? bp[idx[j]] / zs : 0;
    lP[j] = used(j) ? (s[idx[j]] - ms) * inv_t - log_zs : -inf;
  }
  R[k] = -inf;
  P[k] = extra ? bp[y] / zs : 0;
  lP[k] = extra ? (s[y] - ms) * inv_t - log_zs : -inf;
  R[k + 1] = tail > 0 ? std::log(tail) : -inf;
  // The rest's mass summed directly, the explicit classes' es set aside (in d) meanwhile: zs
  // minus theirs would lose the rest's digits when they hold nearly all the mass.
  acc_t rest = 0;
  if (!rest_empty) {
    for (int64_t j = 0; j < k; ++j) d[j] = used(j) ? bp[idx[j]] : acc_t(0);
    d[k] = extra ? bp[y] : acc_t(0);
    for (int64_t j = 0; j < k; ++j) {
      if (used(j)) bp[idx[j]] = 0;
    }
    if (extra) bp[y] = 0;
    Vec vrest(0);
    for_vectors<acc_t>(C, [&](int64_t j, int64_t n) {
      vrest = vrest + keep(load(bp + j, n), n, acc_t(0));
    });
    rest = hsum(vrest);
    for (int64_t j = 0; j < k; ++j) {
      if (used(j)) bp[idx[j]] = d[j];
    }
    if (extra) bp[y] = d[k];
  }
  P[k + 1] = rest_empty ? 0 : std::max(rest, acc_t(0)) / zs;
  lP[k + 1] = P[k + 1] > 0 ? std::log(P[k + 1]) : -inf;
  acc_t mq = -inf;
  for (int64_t j = 0; j < M; ++j) mq = std::max(mq, R[j]);
  acc_t zq = 0;
  for (int64_t j = 0; j < M; ++j) {
    lR[j] = has_teacher ? (R[j] - mq) * inv_t : -inf;
    zq += std::exp(lR[j]);
  }
  for (int64_t j = 0; j < M; ++j) {
    lR[j] -= std::log(zq);
    R[j] = std::exp(lR[j]);
  }

  // The correction at the label's and the argmax's outcomes.
  bool still_wrong = wrong;
  if (wrong && (o.correction == kCorrectionSwap || o.correction == kCorrectionRectify)) {
    if (o.correction == kCorrectionSwap) {
      std::swap(R[pos_y], R[pos_b]);
      std::swap(lR[pos_y], lR[pos_b]);
      still_wrong = false;
    } else {
      const acc_t q_y = R[pos_y], q_b = R[pos_b];
      const acc_t new_y = (q_y + 1) / 2, new_b = q_b / 2, scale = (q_y + q_b) / (new_y + new_b);
      R[pos_y] = new_y * scale;
      R[pos_b] = new_b * scale;
      lR[pos_y] = std::log(R[pos_y]);
      lR[pos_b] = std::log(R[pos_b]);
      acc_t other = 0;  // the largest target mass on a class other than the label
      for (int64_t j = 0; j <= k; ++j) {
        if (j != pos_y) other = std::max(other, R[j]);
      }
      still_wrong = other > R[pos_y];
    }
  }

  // D and G over the outcomes.
  acc_t D = 0, g_mean = 0;
  const acc_t param = acc_t(o.divergence_param);
  for_vectors<acc_t>(M, [&](int64_t j, int64_t n) {
    Vec vP = load(P + j, n);
    auto terms = div_terms<acc_t>(o.divergence, param, vP, load(lP + j, n), load(R + j, n),
                                  load(lR + j, n));
    terms.d.store(d + j, n);
    terms.G.store(G + j, n);
    D += hsum(keep(terms.d, n, acc_t(0)));
    g_mean += hsum(keep(vP * terms.G, n, acc_t(0)));
  });
  const bool smoothed = wrong && smooth;  // the target is no longer the teacher: dense
  const acc_t eps = acc_t(o.smooth_eps), ec = eps / acc_t(C);
  if (smoothed) {
    const acc_t sum_log_p = hsum(vsd) * inv_t - acc_t(C) * log_zs;
    D = xlogy_self(1 - eps + ec) + acc_t(C - 1) * xlogy_self(ec) -
        (1 - eps) * ((s[y] - ms) * inv_t - log_zs) - ec * sum_log_p;
    still_wrong = false;
  }
  if (!has_teacher) D = 0;
  const acc_t kd_w = has_teacher ? acc_t(wrong ? o.wrong_kd_weight : o.kd_weight) : acc_t(0);
  const acc_t kd_grad = kd_w * (o.t2_scale ? T : inv_t);
  const RowOut out = finish_row<acc_t>(kd_w * (o.t2_scale ? T * T : acc_t(1)) * D, ce_w, z1,
                                       ms, labelled ? s[y] : acc_t(0), labelled, wrong,
                                       still_wrong, T);
  if (!o.compute_grad) return out;

  // The gradient: kd_grad p_j (G of j's outcome - sum p G) + ce_w (softmax(s) - onehot(y)); the
  // rest's coefficient everywhere, then the explicit outcomes' classes.
  const acc_t gs = acc_t(o.grad_scale);
  const acc_t c1 = ce_w != 0 ? gs * ce_w / z1 : acc_t(0);
  const acc_t p_coef = gs * kd_grad / zs;
  // no teacher: G and g_mean are NaN (no outcome has mass) and p_coef is 0: no KD term at all
  const acc_t rest_coef = smoothed ? p_coef
                          : has_teacher ? p_coef * (G[k + 1] - g_mean) : acc_t(0);
  const acc_t shift = smoothed ? -gs * kd_grad * ec : acc_t(0);
  for_vectors<acc_t>(C, [&](int64_t j, int64_t n) {
    Vec gv = Vec(rest_coef) * load(bp + j, n) + Vec(shift);
    if (ce_w != 0) gv = gv + Vec(c1) * load(b1 + j, n);
    gv.store(g + j, n);
  });
  if (smoothed) {
    g[y] -= gs * kd_grad * (1 - eps);
  } else if (has_teacher) {  // set, not corrected: p_j (G_rest - G_j) may be huge
    const acc_t kd_scale = gs * kd_grad;
    auto explicit_class = [&](int64_t c, int64_t j) {
      g[c] = kd_scale * P[j] * (G[j] - g_mean) + (ce_w != 0 ? c1 * b1[c] : acc_t(0));
    };
    for (int64_t j = 0; j < k; ++j) {
      if (used(j)) explicit_class(idx[j], j);
    }
    if (extra) explicit_class(y, k);
  }
  if (labelled) g[y] -= gs * ce_w;
  return out;
}

template <typename acc_t>
void run_rows(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
              const c10::optional<at::Tensor>& teacher_indices,
              const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& temps,
              const Options& o, int64_t rows, at::Tensor& loss, at::Tensor& grad,
              at::Tensor& temperature, at::Tensor& flags) {
  const int64_t N = student.size(0), C = student.size(1);
  const bool sparse = teacher_indices.has_value();
  const int64_t k = sparse ? teacher_indices->size(1) : 0;
  const int64_t* idx_ptr = sparse ? teacher_indices->const_data_ptr<int64_t>() : nullptr;
  const int64_t idx_stride = sparse ? teacher_indices->stride(0) : 0;
  const bool labelled = target.has_value();
  const bool virtual_teacher = o.virtual_teacher > 0;
  const int64_t* y_ptr = labelled ? target->const_data_ptr<int64_t>() : nullptr;
  const int64_t y_stride = labelled ? target->stride(0) : 0;
  const acc_t* temp_ptr = o.temp_mode == kTempRows ? temps->const_data_ptr<acc_t>() : nullptr;
  const int64_t temp_stride = o.temp_mode == kTempRows ? temps->stride(0) : 0;
  acc_t* loss_ptr = loss.data_ptr<acc_t>();
  acc_t* temp_out = temperature.data_ptr<acc_t>();
  int8_t* flag_ptr = flags.data_ptr<int8_t>();
  const bool grad_is_acc = grad.scalar_type() == c10::CppTypeToScalarType<acc_t>::value;
  const bool write_grad = o.compute_grad;
  const bool grad_over_student = write_grad && grad.data_ptr() == student.data_ptr();
  const acc_t log_a = virtual_teacher ? std::log(acc_t(o.virtual_teacher)) : 0;
  const acc_t log_rest = virtual_teacher
      ? std::log((1 - acc_t(o.virtual_teacher)) / acc_t(std::max<int64_t>(C - 1, 1))) : 0;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
  acc_t* row_loss = loss_ptr;
  std::vector<acc_t> loss_rows;
  if (o.reduction != kdk::kReductionNone) {  // the rows' losses, then their sum or mean
    loss_rows.resize(N);
    row_loss = loss_rows.data();
  }

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    FlushDenormals ftz;
    // converted s and t (bf16 / fp16 inputs), the tempered exps of s and t, exp(s - max) at T=1;
    // a gradient that needs converting is written into bp first
    // and es expm1(d) of the cancellation-free KL
    // (a sparse teacher: its k values in tbuf, 6 (k + 2) values per outcome after bd)
    std::vector<acc_t> scratch(6 * C + (sparse ? 7 * k + 12 : 0));
    acc_t *sbuf = scratch.data(), *tbuf = sbuf + C, *bp = tbuf + C, *bq = bp + C, *b1 = bq + C,
          *bd = b1 + C;
    if (sparse) {
      tbuf = bd + C;
      bd = tbuf + k;  // the outcomes
    }
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = labelled ? y_ptr[i * y_stride] : -1;
      const bool ignored = labelled && y == o.ignore_index;
      const acc_t* s = load_row<acc_t>(student, i, C, sbuf);
      if (grad_over_student && s != sbuf) {  // the gradient overwrites the row: read a copy
        std::copy(s, s + C, sbuf);
        s = sbuf;
      }
      const acc_t T = temp_ptr ? temp_ptr[i * temp_stride] : acc_t(o.temp_value);
      acc_t* g = write_grad && grad_is_acc ? grad.data_ptr<acc_t>() + i * C : bp;
      RowOut r;
      if (sparse) {
        const acc_t* v = load_row<acc_t>(*teacher, i, k, tbuf);
        r = distill_row_sparse<acc_t>(s, C, v, idx_ptr + i * idx_stride, k, y, labelled,
                                      ignored, T, o, g, bp, b1, bd);
      } else {
        const acc_t* t;
        if (virtual_teacher) {
          std::fill(tbuf, tbuf + C, log_rest);
          if (!ignored && y >= 0 && y < C) tbuf[y] = log_a;
          t = tbuf;
        } else {
          t = load_row<acc_t>(*teacher, i, C, tbuf);
        }
        r = distill_row<acc_t>(s, t, C, y, labelled, ignored, T, o, g, bp, bq, b1, bd);
      }
      if (write_grad && !grad_is_acc) store_row<acc_t>(bp, grad, i, C);
      row_loss[i] = static_cast<acc_t>(r.loss);
      temp_out[i] = static_cast<acc_t>(r.temperature);
      flag_ptr[i] = r.flags;
    }
  });
  if (o.reduction != kdk::kReductionNone) {  // in order, in double: deterministic
    double total = 0;
    for (int64_t i = 0; i < N; ++i) total += double(row_loss[i]);
    *loss_ptr = static_cast<acc_t>(o.reduction == kdk::kReductionMean ? total / rows : total);
  }
}

// The forward (and the gradient, into a new tensor or, over_student, over the student's logits:
// each row is read from a copy before its gradient is written).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill(
    const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
    const c10::optional<at::Tensor>& teacher_indices, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& temp_rows, c10::ArrayRef<double> options,
    bool over_student) {
  const Options o = kdk::unpack_options(options);
  TORCH_CHECK(student.dim() == 2 && student.stride(1) == 1,
              "kdkernels: student must be [N, C] with unit class stride");
  if (teacher_indices.has_value()) {
    TORCH_CHECK(teacher_indices->scalar_type() == at::kLong && teacher_indices->dim() == 2 &&
                teacher_indices->size(0) == student.size(0) && teacher_indices->stride(1) == 1 &&
                teacher.has_value() && teacher->sizes() == teacher_indices->sizes() &&
                teacher->stride(1) == 1,
                "kdkernels: a sparse teacher is [N, k] int64 indices and [N, k] values, unit "
                "stride along k");
  } else {
    TORCH_CHECK(!teacher.has_value() || (teacher->sizes() == student.sizes() &&
                teacher->stride(1) == 1),
                "kdkernels: teacher must match the student, with unit class stride");
  }
  TORCH_CHECK(!target.has_value() || (target->scalar_type() == at::kLong && target->dim() == 1 &&
              target->size(0) == student.size(0)),
              "kdkernels: target must be int64 of shape [N] (any stride)");
  TORCH_CHECK(o.temp_mode != kTempRows || (temp_rows.has_value() &&
              temp_rows->scalar_type() == (student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat) &&
              temp_rows->dim() == 1 && temp_rows->size(0) == student.size(0)),
              "kdkernels: per-row temperature must be [N] (any stride), float64 for float64 logits "
              "else float32");
  TORCH_CHECK(teacher.has_value() || o.virtual_teacher > 0, "kdkernels: no teacher");
  const int64_t N = student.size(0);
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // "mean" counts the rows whose label is not ignore_index (every row without labels), at
  // least 1, and folds 1 / count into the gradient
  int64_t rows = N;
  if (target.has_value() && o.reduction == kdk::kReductionMean) {
    const int64_t* y = target->const_data_ptr<int64_t>();
    const int64_t stride = target->stride(0);
    rows = 0;
    for (int64_t i = 0; i < N; ++i) rows += y[i * stride] != o.ignore_index;
  }
  rows = std::max<int64_t>(rows, 1);
  Options run = o;
  if (o.reduction == kdk::kReductionMean) run.grad_scale = o.grad_scale / double(rows);
  auto loss = o.reduction == kdk::kReductionNone ? at::empty({N}, student.options().dtype(acc))
                                                 : at::empty({}, student.options().dtype(acc));
  TORCH_CHECK(!over_student || (o.compute_grad && student.is_contiguous()),
              "kdkernels: the gradient over the student needs compute_grad and contiguous rows");
  auto grad = over_student ? student
              : o.compute_grad ? at::empty(student.sizes(), student.options())
                               : at::empty({0}, student.options());
  auto temps_out = at::empty({N}, student.options().dtype(acc));
  auto flags = at::empty({N}, student.options().dtype(at::kChar));
  if (acc == at::kDouble) {
    run_rows<double>(student, teacher, teacher_indices, target, temp_rows, run, rows, loss,
                     grad, temps_out, flags);
  } else {
    run_rows<float>(student, teacher, teacher_indices, target, temp_rows, run, rows, loss, grad,
                    temps_out, flags);
  }
  return {loss, grad, temps_out, flags};
}

// ---- the shard entry points (kdkernels/_options.py, SHARD_STATS / SHARD_ROWS) --------------
// A range of a row's columns [start, start + W) of a vocabulary of V classes. Each pass reads the
// range once, a chunk of kChunkVectors vectors at a time (bf16 / fp16 chunks converted into buffers
// that stay in L1): the statistics are an online softmax over the chunks, whose sums are moved
// to each new maximum in double. The merge across ranges subtracts log-sums, which float sums
// would leave a relative error of their rounding: the results are float64, the per-class math
// float64 too (ct = double) unless the inputs are 16/32-bit and every temperature is at most
// kFloatShardT (ct = float, where that error stays under 1e-6 of the KL); a chunk's vector
// lanes are summed in ct, then into doubles.
constexpr double kFloatShardT = 8.0;
constexpr int kChunkVectors = 16;
template <typename ct>
constexpr int64_t kChunk = kChunkVectors * Vectorized<ct>::size();

// Row i's range, read a chunk at a time as ct: the input itself where it is ct, else converted
// into sbuf / tbuf (kChunk values each); a virtual teacher's columns are built from the label.
template <typename ct>
struct ShardRow {
  const at::Tensor& student;
  const c10::optional<at::Tensor>& teacher;
  int64_t i, W, ly;  // the row, the range's width, the label's column in it (-1: not in it)
  ct rest, label;    // the virtual teacher's logits away from and at the label
  ct *sbuf, *tbuf;

  const ct* s(int64_t j, int64_t n) const { return load_row<ct>(student, i, n, sbuf, j); }
  const ct* t(int64_t j, int64_t n) const {
    if (teacher.has_value()) return load_row<ct>(*teacher, i, n, tbuf, j);
    std::fill(tbuf, tbuf + n, rest);
    if (ly >= j && ly < j + n) tbuf[ly - j] = label;
    return tbuf;
  }
  ct s_at(int64_t j) const {
    ct v;
    return *load_row<ct>(student, i, 1, &v, j);
  }
};

template <typename ct>
void shard_stats_row(const ShardRow<ct>& row, double T, int64_t start, const Options& o,
                     double* out) {
  using Vec = Vectorized<ct>;
  const ct inf = std::numeric_limits<ct>::infinity();
  const int64_t W = row.W, ly = row.ly;
  const ct inv_t = ct(1 / T);
  const bool ce = o.ce_weight != 0, smooth = o.correction == kCorrectionSmooth;
  const bool rectify = o.correction == kCorrectionRectify;
  const bool argmax = rectify || o.correction == kCorrectionSwap;
  // CE's exp(s - ms) is exp((s - ms) / T)^k at an integer temperature k <= 8
  const int int_t = (T >= 1 && T <= 8 && T == std::floor(T)) ? static_cast<int>(T) : 0;
  ct ms = -inf, mt = -inf;  // the maxima so far: each chunk's exps are taken against them
  double zs = 0, zt = 0, cross = 0, z1 = 0, s_sum = 0, s_y = 0, t_y = 0, s_b = 0;
  double tx1 = -inf, tx2 = -inf;
  int64_t b = 0, idx1 = -1;
  for (int64_t c = 0; c < W; c += kChunk<ct>) {
    const int64_t n = std::min(kChunk<ct>, W - c);
    const ct *s = row.s(c, n), *t = row.t(c, n);
    Vec vms(-inf), vmt(-inf);
    for_vectors<ct>(n, [&](int64_t j, int64_t m) {
      vms = at::vec::maximum(vms, keep(load(s + j, m), m, -inf));
      vmt = at::vec::maximum(vmt, keep(load(t + j, m), m, -inf));
    });
    const ct cms = hmax(vms), cmt = hmax(vmt);
    if (argmax && (c == 0 || cmt > mt)) {  // the first maximum (column 0 if none is finite)
      const int64_t k = cmt > mt ? find_first(t, n, cmt) : 0;
      b = c + k;
      s_b = s[k];
    }
    // the sums so far moved to a new maximum (or poisoned by a NaN); while the maximum is -inf
    // every exp was 0
    if (!(cms <= ms)) {
      if (ms > -inf) {
        zs *= std::exp((double(ms) - double(cms)) / T);
        z1 *= std::exp(double(ms) - double(cms));
      }
      ms = cms;
    }
    if (!(cmt <= mt)) {
      if (mt > -inf) {
        const double moved = std::exp((double(mt) - double(cmt)) / T);
        zt *= moved;
        cross *= moved;
      }
      mt = cmt;
    }
    const Vec v_ms(ms == -inf ? ct(0) : ms), v_mt(mt == -inf ? ct(0) : mt), v_inv_t(inv_t);
    Vec vzs(0), vzt(0), vcross(0), vz1(0), vsum(0);
    for_vectors<ct>(n, [&](int64_t j, int64_t m) {
      Vec vs = load(s + j, m), vt = load(t + j, m);
      Vec es = vexp<ct>((vs - v_ms) * v_inv_t), et = vexp<ct>((vt - v_mt) * v_inv_t);
      vzs = vzs + keep(es, m, ct(0));
      vzt = vzt + keep(et, m, ct(0));
      vcross = vcross + keep(Vec::blendv(Vec(0), et * (vt - vs), et > Vec(0)), m, ct(0));
      if (ce) vz1 = vz1 + keep(int_t ? ipow(es, int_t) : vexp<ct>(vs - v_ms), m, ct(0));
      if (smooth) vsum = vsum + keep(vs, m, ct(0));
    });
    zs += double(hsum(vzs));
    zt += double(hsum(vzt));
    cross += double(hsum(vcross));
    if (ce) z1 += double(hsum(vz1));
    if (smooth) s_sum += double(hsum(vsum));
    if (ly >= c && ly < c + n) {
      s_y = s[ly - c];
      t_y = t[ly - c];
    }
    if (rectify) {  // the two largest teacher logits away from the label
      for (int64_t k = 0; k < n; ++k) {
        if (c + k == ly) continue;
        if (idx1 < 0 || t[k] > tx1) {
          tx2 = tx1;
          tx1 = t[k];
          idx1 = c + k;
        } else if (t[k] > tx2) {
          tx2 = t[k];
        }
      }
    }
  }
  if (idx1 < 0) idx1 = 0;  // a range of one column, the label's
  const bool owns = ly >= 0;
  out[kdk::kStat_ms] = ms;
  out[kdk::kStat_zs] = zs;
  out[kdk::kStat_mt] = mt;
  out[kdk::kStat_zt] = zt;
  out[kdk::kStat_cross] = cross;
  out[kdk::kStat_z1] = z1;
  out[kdk::kStat_s_y] = s_y;
  out[kdk::kStat_t_y] = t_y;
  out[kdk::kStat_owns] = owns ? 1.0 : 0.0;
  out[kdk::kStat_b] = double(b + start);
  out[kdk::kStat_s_b] = s_b;
  out[kdk::kStat_tx1] = tx1;
  out[kdk::kStat_idx1] = double(idx1 + start);
  out[kdk::kStat_tx2] = tx2;
  out[kdk::kStat_s_sum] = s_sum;
}

// Where a pass writes the range's gradient: straight into the output row when it is ct, else a
// chunk at a time through buf.
template <typename ct>
struct GradOut {
  at::Tensor& out;
  int64_t i;
  ct *direct, *buf;
  ct* chunk(int64_t c) const { return direct ? direct + c : buf; }
  void done(int64_t c, int64_t n) const {
    if (!direct) store_row<ct>(buf, out, i, n, c);
  }
};

// From the row's merged values r: the range's gradient into g (grad), or its part of D and of
// sum_j p_j G_j into sums (the divergences other than the forward KL). The gradient may be
// written over the student's logits: each chunk is read before it is written, and the columns
// the correction fixes are computed before any.
template <typename ct>
void shard_pass_row(const ShardRow<ct>& row, int64_t start, int64_t V, const double* r,
                    const Options& o, bool grad, const GradOut<ct>* g_out, double* sums) {
  using Vec = Vectorized<ct>;
  const int64_t W = row.W, ly = row.ly;
  const double T = r[kdk::kRow_T], inv_t = 1 / T, ms = r[kdk::kRow_ms], mt = r[kdk::kRow_mt];
  const double log_zs = r[kdk::kRow_log_zs], log_zt = r[kdk::kRow_log_zt];
  const double kd_grad = r[kdk::kRow_kd_grad], g_mean = r[kdk::kRow_g_mean];
  const double scale = r[kdk::kRow_scale], param = o.divergence_param;
  const double ce_w = o.ce_weight, c1 = ce_w != 0 ? ce_w / r[kdk::kRow_z1] : 0.0;
  const bool smoothed = r[kdk::kRow_smoothed] > 0, kl = o.divergence == kDivergenceKl;
  const double log_ec = o.smooth_eps > 0 ? std::log(o.smooth_eps / double(V))
                                         : -std::numeric_limits<double>::infinity();
  if (grad && scale == 0) {  // a row that does not count
    for (int64_t c = 0; c < W; c += kChunk<ct>) {
      const int64_t n = std::min(kChunk<ct>, W - c);
      std::fill(g_out->chunk(c), g_out->chunk(c) + n, ct(0));
      g_out->done(c, n);
    }
    return;
  }
  // the correction's targets at the label and the argmax, where this range holds them: their
  // (gradient, d, p G), in double, against the target log r
  struct Fixed {
    int64_t j;
    double g, d, pG;
  };
  std::array<Fixed, 2> fixed{};
  int nfixed = 0;
  const int64_t lb = static_cast<int64_t>(r[kdk::kRow_b]) - start;
  const std::array<std::pair<int64_t, double>, 2> fixes = {{
      {r[kdk::kRow_fix_y] > 0 ? ly : -1, r[kdk::kRow_lr_y]},
      {r[kdk::kRow_fix_b] > 0 && lb >= 0 && lb < W ? lb : -1, r[kdk::kRow_lr_b]}}};
  for (const auto& [j, lr] : fixes) {
    if (j < 0) continue;
    const double sj = double(row.s_at(j));
    const double lp = (sj - ms) * inv_t - log_zs, p = std::exp(lp), q = std::exp(lr);
    double dir = p - q, d = 0, pG = 0;
    if (!kl) {
      auto [dj, Gj] = div_term<double>(o.divergence, param, p, lp, q, lr);
      d = dj;
      pG = p * Gj;
      dir = p > 0 ? p * (Gj - g_mean) : 0.0;
    }
    double gj = kd_grad != 0 ? kd_grad * dir : 0.0;
    if (ce_w != 0) gj += c1 * std::exp(sj - ms) - (j == ly ? ce_w : 0.0);
    fixed[nfixed++] = {j, gj * scale, d, pG};
  }
  const int int_t = (T >= 1 && T <= 8 && T == std::floor(T)) ? static_cast<int>(T) : 0;
  auto splat = [](double x) { return Vec(static_cast<ct>(x)); };
  const Vec v_ms = splat(ms), v_inv_t = splat(inv_t), v_log_zs = splat(log_zs);
  const Vec v_inv_zs = splat(std::exp(-log_zs)), v_mt = splat(mt), v_log_zt = splat(log_zt);
  const Vec v_log_ec = splat(log_ec), v_kd = splat(kd_grad), v_c1 = splat(c1);
  const Vec v_scale = splat(scale), v_g_mean = splat(g_mean), lanes = Vec::arange(0, 1);
  double total_D = 0, total_pG = 0;
  for (int64_t c = 0; c < W; c += kChunk<ct>) {
    const int64_t n = std::min(kChunk<ct>, W - c);
    const ct* s = row.s(c, n);
    const ct* t = smoothed ? nullptr : row.t(c, n);
    ct* g = grad ? g_out->chunk(c) : nullptr;
    // the sums skip the fixed columns (their base term may be infinite)
    auto skip_fixed = [&](Vec v, int64_t j) {
      for (int k = 0; k < nfixed; ++k) {
        const int64_t lane = fixed[k].j - (c + j);
        if (lane >= 0 && lane < Vec::size()) v = Vec::blendv(v, Vec(0), lanes == Vec(ct(lane)));
      }
      return v;
    };
    Vec vD(0), vpG(0);
    for_vectors<ct>(n, [&](int64_t j, int64_t m) {
      Vec vs = load(s + j, m), ds = (vs - v_ms) * v_inv_t, es = vexp<ct>(ds);
      Vec lP = ds - v_log_zs, P = es * v_inv_zs;
      Vec lR = smoothed ? v_log_ec : (load(t + j, m) - v_mt) * v_inv_t - v_log_zt;
      Vec R = vexp<ct>(lR), dir = P - R;
      if (!kl) {
        auto terms = div_terms<ct>(o.divergence, ct(param), P, lP, R, lR);
        if (!grad) {
          vD = vD + keep(skip_fixed(terms.d, j), m, ct(0));
          vpG = vpG + keep(skip_fixed(P * terms.G, j), m, ct(0));
          return;
        }
        dir = Vec::blendv(Vec(0), P * (terms.G - v_g_mean), P > Vec(0));
      }
      if (!grad) return;
      Vec gv = kd_grad != 0 ? v_kd * dir : Vec(0);
      if (ce_w != 0) gv = gv + v_c1 * (int_t ? ipow(es, int_t) : vexp<ct>(vs - v_ms));
      (gv * v_scale).store(g + j, m);
    });
    if (!grad) {
      total_D += double(hsum(vD));
      total_pG += double(hsum(vpG));
      continue;
    }
    if (ly >= c && ly < c + n && ce_w != 0) g[ly - c] -= ct(ce_w * scale);
    for (int k = 0; k < nfixed; ++k) {
      if (fixed[k].j >= c && fixed[k].j < c + n) g[fixed[k].j - c] = ct(fixed[k].g);
    }
    g_out->done(c, n);
  }
  if (!grad) {
    for (int k = 0; k < nfixed; ++k) {
      total_D += fixed[k].d;
      total_pG += fixed[k].pG;
    }
    sums[0] = r[kdk::kRow_has_teacher] > 0 ? total_D : 0.0;
    sums[1] = total_pG;
  }
}

// Rows in parallel, each as a ShardRow (its label made local to the range); body(row, gbuf)
// with a chunk of scratch for a gradient that needs converting.
template <typename ct, typename Body>
void shard_rows(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                const c10::optional<at::Tensor>& target, int64_t start, int64_t V,
                const Options& o, Body body) {
  const int64_t N = student.size(0), W = student.size(1);
  const int64_t* y = target.has_value() ? target->const_data_ptr<int64_t>() : nullptr;
  const int64_t y_stride = target.has_value() ? target->stride(0) : 0;
  const double a = o.virtual_teacher;
  const ct rest = static_cast<ct>(a < 1 ? std::log((1 - a) / double(std::max<int64_t>(V - 1, 1)))
                                        : -std::numeric_limits<double>::infinity());
  const ct label = static_cast<ct>(std::log(a));
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(W, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    FlushDenormals ftz;
    alignas(64) ct sbuf[kChunk<ct>], tbuf[kChunk<ct>], gbuf[kChunk<ct>];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t local = y ? y[i * y_stride] - start : -1;
      const int64_t ly = local >= 0 && local < W ? local : -1;
      body(ShardRow<ct>{student, teacher, i, W, ly, rest, label, sbuf, tbuf}, gbuf);
    }
  });
}

void check_shard(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                 const c10::optional<at::Tensor>& target, const at::Tensor& per_row,
                 int64_t width) {
  TORCH_CHECK(student.dim() == 2 && student.stride(1) == 1,
              "kdkernels: student shard must be [N, W] with unit class stride");
  TORCH_CHECK(!teacher.has_value() || (teacher->sizes() == student.sizes() &&
              teacher->stride(1) == 1), "kdkernels: teacher shard must match the student's");
  TORCH_CHECK(!target.has_value() || (target->scalar_type() == at::kLong &&
              target->dim() == 1 && target->size(0) == student.size(0)),
              "kdkernels: target must be int64 of shape [N]");
  TORCH_CHECK(per_row.scalar_type() == at::kDouble && per_row.is_contiguous() &&
              per_row.size(0) == student.size(0) && (width < 0 || per_row.size(1) == width),
              "kdkernels: per-row values must be contiguous float64 [N, ", width, "]");
}

// float math where the inputs are not float64 and no temperature exceeds kFloatShardT
bool float_shard(const at::Tensor& student, const double* T, int64_t N, int64_t stride) {
  if (student.scalar_type() == at::kDouble) return false;
  for (int64_t i = 0; i < N; ++i) {
    if (!(T[i * stride] <= kFloatShardT)) return false;
  }
  return true;
}

template <typename ct>
void shard_stats_rows(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                      const c10::optional<at::Tensor>& target, const double* T, int64_t start,
                      int64_t V, const Options& o, double* out) {
  shard_rows<ct>(student, teacher, target, start, V, o, [&](const ShardRow<ct>& row, ct*) {
    shard_stats_row<ct>(row, T[row.i], start, o, out + row.i * kdk::kNumStats);
  });
}

at::Tensor shard_stats_cpu(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                           const c10::optional<at::Tensor>& target, const at::Tensor& temps,
                           int64_t vocab_start, int64_t vocab_size,
                           c10::ArrayRef<double> options) {
  const Options o = kdk::unpack_options(options);
  check_shard(student, teacher, target, temps.unsqueeze(1), -1);
  const int64_t N = student.size(0);
  auto out = at::empty({N, kdk::kNumStats}, student.options().dtype(at::kDouble));
  const double* T = temps.const_data_ptr<double>();
  if (float_shard(student, T, N, 1)) {
    shard_stats_rows<float>(student, teacher, target, T, vocab_start, vocab_size, o,
                            out.data_ptr<double>());
  } else {
    shard_stats_rows<double>(student, teacher, target, T, vocab_start, vocab_size, o,
                             out.data_ptr<double>());
  }
  return out;
}

// The pass into out: the gradient (grad; out may be the student itself) or the sums [N, 2].
template <typename ct>
void shard_pass_rows(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                     const c10::optional<at::Tensor>& target, const double* r, int64_t start,
                     int64_t V, const Options& o, bool grad, at::Tensor& out) {
  const bool direct = grad && out.scalar_type() == c10::CppTypeToScalarType<ct>::value;
  shard_rows<ct>(student, teacher, target, start, V, o, [&](const ShardRow<ct>& row, ct* gbuf) {
    const int64_t i = row.i;
    const GradOut<ct> g{out, i, direct ? out.data_ptr<ct>() + i * out.stride(0) : nullptr, gbuf};
    double* sums = grad ? nullptr : out.data_ptr<double>() + 2 * i;
    shard_pass_row<ct>(row, start, V, r + i * kdk::kNumRows, o, grad, &g, sums);
  });
}

void shard_pass_into(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                     const c10::optional<at::Tensor>& target, const at::Tensor& rows,
                     int64_t vocab_start, int64_t vocab_size, c10::ArrayRef<double> options,
                     bool grad, at::Tensor& out) {
  const Options o = kdk::unpack_options(options);
  check_shard(student, teacher, target, rows, kdk::kNumRows);
  const double* r = rows.const_data_ptr<double>();
  if (float_shard(student, r + kdk::kRow_T, student.size(0), kdk::kNumRows)) {
    shard_pass_rows<float>(student, teacher, target, r, vocab_start, vocab_size, o, grad, out);
  } else {
    shard_pass_rows<double>(student, teacher, target, r, vocab_start, vocab_size, o, grad, out);
  }
}

at::Tensor shard_pass_cpu(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                          const c10::optional<at::Tensor>& target, const at::Tensor& rows,
                          int64_t vocab_start, int64_t vocab_size,
                          c10::ArrayRef<double> options, bool grad) {
  const int64_t N = student.size(0), W = student.size(1);
  auto out = grad ? at::empty({N, W}, student.options())
                  : at::empty({N, 2}, student.options().dtype(at::kDouble));
  shard_pass_into(student, teacher, target, rows, vocab_start, vocab_size, options, grad, out);
  return out;
}

// shard_pass_cpu's gradient written over `student` (the fused lm_head's chunk logits)
void shard_pass_cpu_(at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                     const c10::optional<at::Tensor>& target, const at::Tensor& rows,
                     int64_t vocab_start, int64_t vocab_size, c10::ArrayRef<double> options) {
  shard_pass_into(student, teacher, target, rows, vocab_start, vocab_size, options, true,
                  student);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_cpu(
    const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
    const c10::optional<at::Tensor>& teacher_indices, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& temp_rows, c10::ArrayRef<double> options) {
  return distill(student, teacher, teacher_indices, target, temp_rows, options, false);
}

// distill_cpu with the gradient written over `student` (the fused lm_head's chunk logits)
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_cpu_(
    at::Tensor& student, const c10::optional<at::Tensor>& teacher,
    const c10::optional<at::Tensor>& teacher_indices, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& temp_rows, c10::ArrayRef<double> options) {
  auto [loss, grad, temps, flags] =
      distill(student, teacher, teacher_indices, target, temp_rows, options, true);
  return {loss, temps, flags};
}

}  // namespace

TORCH_LIBRARY(kdkernels, m) {
  m.def("distill_cpu(Tensor student, Tensor? teacher, Tensor? teacher_indices, Tensor? target, "
        "Tensor? temp_rows, float[] options) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("distill_cpu_(Tensor(a!) student, Tensor? teacher, Tensor? teacher_indices, "
        "Tensor? target, Tensor? temp_rows, float[] options) -> (Tensor, Tensor, Tensor)");
  m.def("shard_stats_cpu(Tensor student, Tensor? teacher, Tensor? target, Tensor temps, "
        "int vocab_start, int vocab_size, float[] options) -> Tensor");
  m.def("shard_pass_cpu(Tensor student, Tensor? teacher, Tensor? target, Tensor rows, "
        "int vocab_start, int vocab_size, float[] options, bool grad) -> Tensor");
  m.def("shard_pass_cpu_(Tensor(a!) student, Tensor? teacher, Tensor? target, Tensor rows, "
        "int vocab_start, int vocab_size, float[] options) -> ()");
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("distill_cpu", &distill_cpu);
  m.impl("distill_cpu_", &distill_cpu_);
  m.impl("shard_stats_cpu", &shard_stats_cpu);
  m.impl("shard_pass_cpu", &shard_pass_cpu);
  m.impl("shard_pass_cpu_", &shard_pass_cpu_);
}

// A plain Python module per CPU variant (kdkernels._C_default, _C_avx2, _C_avx512: setup.py
// sets TORCH_EXTENSION_NAME), so that importing one loads the library and registers the op.
#define KDK_STRINGIFY2(x) #x
#define KDK_STRINGIFY(x) KDK_STRINGIFY2(x)
#define KDK_PYINIT2(name) PyInit_##name
#define KDK_PYINIT(name) KDK_PYINIT2(name)
extern "C" PyObject* KDK_PYINIT(TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, KDK_STRINGIFY(TORCH_EXTENSION_NAME),
                                   nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&def);
  if (module != nullptr) {
    PyModule_AddStringConstant(module, "CPU_CAPABILITY", KDK_CPU_CAPABILITY);
    PyModule_AddIntConstant(module, "FLOAT_LANES", Vectorized<float>::size());
    // what this build was compiled against, checked by kdkernels/ops/cpp_distill.py
    PyModule_AddStringConstant(module, "OPTION_NAMES", kdk::kOptionNames);
    for (const auto& e : kdk::kEnums) PyModule_AddIntConstant(module, e.name, e.value);
  }
  return module;
}
