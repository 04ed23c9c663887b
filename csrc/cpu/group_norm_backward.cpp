// CPU kernel of group_norm_act's backward: the gradients (x, weight, bias, temb) of
// y = act(xhat * w + b), xhat = (x + temb - mean) * rstd, from the forward's saved mean and rstd,
// in two passes over x and grad (fastddpm/ops/autograd.py: group_norm_act_backward is the formula
// and the oracle):
//
//   pass 1, per (sample, channel): gp = grad * act'(u) (kept in a scratch buffer), and the sums
//           sg = sum gp, sgx = sum gp xhat; gw = sum_n sgx, gb = sum_n sg;
//   per (sample, group):  A = mean of w gp, B = mean of w gp xhat over the group;
//   pass 2: gx = rstd (w gp - A - xhat B) = gp alpha + x beta + gamma per channel, and
//           gtemb = the channel's sum of gx.
//
// Float and bfloat16/half storage compute in float (a 16-bit row is converted to float on its way
// in and out), double in double. NCHW runs in parallel over (sample, group); channels_last over
// samples (a group's channels are strided there, so a row of C channels is the vector unit).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "fastddpm/checks.h"
#include "isa.h"
#include "simd.h"

namespace fastddpm {
namespace {

template <typename acc_t>
inline acc_t grad_pre_act_scalar(acc_t g, acc_t xhat, acc_t w, acc_t b, bool silu_act) {
  if (!silu_act) return g;
  const acc_t u = xhat * w + b;
  const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-u));
  return g * s * (acc_t(1) + u * (acc_t(1) - s));
}

// The row passes (see the file comment), portable: double, and float on CPUs without AVX2.
template <typename acc_t>
void grad_stats_row_loop(const acc_t* x, const acc_t* g, acc_t* gp, int64_t n, acc_t a, acc_t c, acc_t w, acc_t b,
                         bool silu_act, double* sg, double* sgx) {
  double s1 = 0, s2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xhat = x[i] * a + c;
    const acc_t p = grad_pre_act_scalar(g[i], xhat, w, b, silu_act);
    gp[i] = p;
    s1 += p;
    s2 += double(p) * xhat;
  }
  *sg += s1;
  *sgx += s2;
}

template <typename acc_t>
void grad_stats_channels_loop(const acc_t* x, const acc_t* g, acc_t* gp, int64_t n, const acc_t* a, const acc_t* c,
                              const acc_t* w, const acc_t* b, bool silu_act, acc_t* sg, acc_t* sgx) {
  for (int64_t k = 0; k < n; ++k) {
    const acc_t xhat = x[k] * a[k] + c[k];
    const acc_t p = grad_pre_act_scalar(g[k], xhat, w[k], b[k], silu_act);
    gp[k] = p;
    sg[k] += p;
    sgx[k] += p * xhat;
  }
}

template <typename acc_t>
double grad_apply_row_loop(const acc_t* gp, const acc_t* x, acc_t* gx, int64_t n, acc_t alpha, acc_t beta,
                           acc_t gamma) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    gx[i] = gp[i] * alpha + x[i] * beta + gamma;
    sum += gx[i];
  }
  return sum;
}

template <typename acc_t>
void grad_apply_channels_loop(const acc_t* gp, const acc_t* x, acc_t* gx, int64_t n, const acc_t* alpha,
                              const acc_t* beta, const acc_t* gamma, acc_t* sum) {
  for (int64_t k = 0; k < n; ++k) {
    gx[k] = gp[k] * alpha[k] + x[k] * beta[k] + gamma[k];
    sum[k] += gx[k];
  }
}

// The row passes for the running CPU: the hand-vectorized ones of group_norm_simd.inc for float.
template <typename acc_t>
void grad_stats_row(const acc_t* x, const acc_t* g, acc_t* gp, int64_t n, acc_t a, acc_t c, acc_t w, acc_t b,
                    bool silu_act, double* sg, double* sgx) {
#ifdef FASTDDPM_HAVE_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return avx512::grad_stats_row(x, g, gp, n, a, c, w, b, silu_act, sg, sgx);
    if (cpu_has_avx2()) return avx2::grad_stats_row(x, g, gp, n, a, c, w, b, silu_act, sg, sgx);
  }
#endif
  grad_stats_row_loop(x, g, gp, n, a, c, w, b, silu_act, sg, sgx);
}

template <typename acc_t>
void grad_stats_channels(const acc_t* x, const acc_t* g, acc_t* gp, int64_t n, const acc_t* a, const acc_t* c,
                         const acc_t* w, const acc_t* b, bool silu_act, acc_t* sg, acc_t* sgx) {
#ifdef FASTDDPM_HAVE_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return avx512::grad_stats_channels(x, g, gp, n, a, c, w, b, silu_act, sg, sgx);
    if (cpu_has_avx2()) return avx2::grad_stats_channels(x, g, gp, n, a, c, w, b, silu_act, sg, sgx);
  }
#endif
  grad_stats_channels_loop(x, g, gp, n, a, c, w, b, silu_act, sg, sgx);
}

template <typename acc_t>
double grad_apply_row(const acc_t* gp, const acc_t* x, acc_t* gx, int64_t n, acc_t alpha, acc_t beta, acc_t gamma) {
#ifdef FASTDDPM_HAVE_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return avx512::grad_apply_row(gp, x, gx, n, alpha, beta, gamma);
    if (cpu_has_avx2()) return avx2::grad_apply_row(gp, x, gx, n, alpha, beta, gamma);
  }
#endif
  return grad_apply_row_loop(gp, x, gx, n, alpha, beta, gamma);
}

template <typename acc_t>
void grad_apply_channels(const acc_t* gp, const acc_t* x, acc_t* gx, int64_t n, const acc_t* alpha,
                         const acc_t* beta, const acc_t* gamma, acc_t* sum) {
#ifdef FASTDDPM_HAVE_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return avx512::grad_apply_channels(gp, x, gx, n, alpha, beta, gamma, sum);
    if (cpu_has_avx2()) return avx2::grad_apply_channels(gp, x, gx, n, alpha, beta, gamma, sum);
  }
#endif
  grad_apply_channels_loop(gp, x, gx, n, alpha, beta, gamma, sum);
}

// A row of storage values as acc_t: the row itself when the types agree, else converted into buf.
template <typename scalar_t, typename acc_t>
const acc_t* acc_row(const scalar_t* p, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
    return buf;
  }
}

// Where a row of gx is computed: the output itself when the types agree, else buf (see store_row).
template <typename scalar_t, typename acc_t>
acc_t* acc_out(scalar_t* p, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) return p;
  else return buf;
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* buf, scalar_t* p, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>)
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
}

struct BackwardArgs {
  int64_t N, C, G, D, HW;
  bool silu;
};

// Pointers of one call: inputs (x, g, w, b, temb, mean, rstd as acc_t) and outputs (gx; per-(n, c)
// sums sg, sgx; gtemb, [N, C] acc_t, when temb is given).
template <typename scalar_t, typename acc_t>
struct BackwardPtrs {
  const scalar_t *x, *g;
  const acc_t *w, *b, *t, *mean, *rstd;
  scalar_t* gx;
  acc_t *sg, *sgx, *gt;
};

// gx = rstd (w gp - A - xhat B) with xhat = x rstd + (t - mu) rstd, as gp alpha + x beta + gamma.
template <typename acc_t>
inline void apply_coefficients(double rstd, double mu, double t, double w, double A, double B, acc_t& alpha,
                               acc_t& beta, acc_t& gamma) {
  alpha = static_cast<acc_t>(rstd * w);
  beta = static_cast<acc_t>(-rstd * rstd * B);
  gamma = static_cast<acc_t>(-rstd * A - rstd * rstd * B * (t - mu));
}

template <typename scalar_t, typename acc_t>
void backward_nchw(const BackwardPtrs<scalar_t, acc_t>& p, const BackwardArgs& a) {
  at::parallel_for(0, a.N * a.G, 1, [&](int64_t begin, int64_t end) {
    // gp of the whole group (pass 2 reads it back from cache), and one row of each converted input
    std::vector<acc_t> gp(a.D * a.HW), xbuf, gbuf, obuf;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) xbuf.resize(a.HW), gbuf.resize(a.HW), obuf.resize(a.HW);
    std::vector<double> sg(a.D), sgx(a.D);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / a.G, c0 = (ng % a.G) * a.D;
      const double mu = p.mean[ng], rstd = p.rstd[ng];
      double A = 0, B = 0;
      for (int64_t j = 0; j < a.D; ++j) {
        const int64_t c = c0 + j, off = (n * a.C + c) * a.HW;
        const double t = p.t ? double(p.t[n * a.C + c]) : 0.0, w = p.w ? double(p.w[c]) : 1.0;
        const acc_t* xr = acc_row(p.x + off, a.HW, xbuf.data());
        const acc_t* gr = acc_row(p.g + off, a.HW, gbuf.data());
        sg[j] = sgx[j] = 0;
        grad_stats_row<acc_t>(xr, gr, gp.data() + j * a.HW, a.HW, static_cast<acc_t>(rstd),
                              static_cast<acc_t>((t - mu) * rstd), static_cast<acc_t>(w),
                              p.b ? p.b[c] : acc_t(0), a.silu, &sg[j], &sgx[j]);
        p.sg[n * a.C + c] = static_cast<acc_t>(sg[j]);
        p.sgx[n * a.C + c] = static_cast<acc_t>(sgx[j]);
        A += w * sg[j];
        B += w * sgx[j];
      }
      const double count = static_cast<double>(a.D * a.HW);
      A /= count;
      B /= count;
      for (int64_t j = 0; j < a.D; ++j) {
        const int64_t c = c0 + j, off = (n * a.C + c) * a.HW;
        acc_t alpha, beta, gamma;
        apply_coefficients(rstd, mu, p.t ? double(p.t[n * a.C + c]) : 0.0, p.w ? double(p.w[c]) : 1.0, A, B, alpha,
                           beta, gamma);
        const acc_t* xr = acc_row(p.x + off, a.HW, xbuf.data());
        acc_t* out = acc_out(p.gx + off, obuf.data());
        const double sum = grad_apply_row<acc_t>(gp.data() + j * a.HW, xr, out, a.HW, alpha, beta, gamma);
        store_row(out, p.gx + off, a.HW);
        if (p.gt) p.gt[n * a.C + c] = static_cast<acc_t>(sum);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_nhwc(const BackwardPtrs<scalar_t, acc_t>& p, const BackwardArgs& a) {
  at::parallel_for(0, a.N, 1, [&](int64_t begin, int64_t end) {
    const int64_t C = a.C;
    std::vector<acc_t> gp(a.HW * C), xbuf, gbuf, obuf;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) xbuf.resize(C), gbuf.resize(C), obuf.resize(C);
    std::vector<acc_t> ca(C), cc(C), cw(C), cb(C), sg(C), sgx(C), alpha(C), beta(C), gamma(C), sum(C);
    std::vector<double> A(a.G), B(a.G);
    for (int64_t n = begin; n < end; ++n) {
      const acc_t *mean = p.mean + n * a.G, *rstd = p.rstd + n * a.G;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / a.D;
        const double t = p.t ? double(p.t[n * C + c]) : 0.0;
        ca[c] = rstd[g];
        cc[c] = static_cast<acc_t>((t - double(mean[g])) * double(rstd[g]));
        cw[c] = p.w ? p.w[c] : acc_t(1);
        cb[c] = p.b ? p.b[c] : acc_t(0);
      }
      std::fill(sg.begin(), sg.end(), acc_t(0));
      std::fill(sgx.begin(), sgx.end(), acc_t(0));
      const int64_t base = n * a.HW * C;
      for (int64_t s = 0; s < a.HW; ++s) {
        const acc_t* xr = acc_row(p.x + base + s * C, C, xbuf.data());
        const acc_t* gr = acc_row(p.g + base + s * C, C, gbuf.data());
        grad_stats_channels<acc_t>(xr, gr, gp.data() + s * C, C, ca.data(), cc.data(), cw.data(), cb.data(), a.silu,
                                   sg.data(), sgx.data());
      }
      std::fill(A.begin(), A.end(), 0.0);
      std::fill(B.begin(), B.end(), 0.0);
      for (int64_t c = 0; c < C; ++c) {
        p.sg[n * C + c] = sg[c];
        p.sgx[n * C + c] = sgx[c];
        A[c / a.D] += double(cw[c]) * sg[c];
        B[c / a.D] += double(cw[c]) * sgx[c];
      }
      const double count = static_cast<double>(a.D * a.HW);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / a.D;
        apply_coefficients(double(rstd[g]), double(mean[g]), p.t ? double(p.t[n * C + c]) : 0.0, double(cw[c]),
                           A[g] / count, B[g] / count, alpha[c], beta[c], gamma[c]);
      }
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t s = 0; s < a.HW; ++s) {
        const acc_t* xr = acc_row(p.x + base + s * C, C, xbuf.data());
        acc_t* out = acc_out(p.gx + base + s * C, obuf.data());
        grad_apply_channels<acc_t>(gp.data() + s * C, xr, out, C, alpha.data(), beta.data(), gamma.data(),
                                   sum.data());
        store_row(out, p.gx + base + s * C, C);
      }
      if (p.gt)
        for (int64_t c = 0; c < C; ++c) p.gt[n * C + c] = sum[c];
    }
  });
}

}  // namespace

// (gx, gweight, gbias, gtemb); a gradient whose input is None is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& temb, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, int64_t groups, bool silu_act) {
  check_group_norm_args(x_in, weight, bias, groups, 1.0, temb);
  check_same_shape(grad_in, x_in, "grad");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int64_t HW = (N > 0 && C > 0) ? x_in.numel() / (N * C) : 0;
  const auto stat_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* s : {&mean_in, &rstd_in})
    TORCH_CHECK_VALUE(s->scalar_type() == stat_type && s->dim() == 2 && s->size(0) == N && s->size(1) == groups,
                      s == &mean_in ? "mean" : "rstd", ": expected ", stat_type, " [", N, ", ", groups, "], got ",
                      s->scalar_type(), " ", s->sizes());
  // the layout decision of the forward (group_norm_cpu.cpp), so gx is laid out like its y
  const bool nhwc = x_in.dim() == 4 && !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(format), g = grad_in.contiguous(format);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor gx = at::empty_like(x, x.options(), format);
  const auto acc_options = x.options().dtype(stat_type);
  at::Tensor sg = at::empty({N, C}, acc_options), sgx = at::empty({N, C}, acc_options);
  at::Tensor gt = temb ? at::empty({N, C}, acc_options) : at::Tensor();
  const BackwardArgs args{N, C, groups, C / groups, HW, silu_act};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto as_acc = [](const c10::optional<at::Tensor>& v) {
      return v ? v->contiguous().to(at::CppTypeToScalarType<acc_t>::value) : at::Tensor();
    };
    const at::Tensor w = as_acc(weight), b = as_acc(bias), te = as_acc(temb);
    const BackwardPtrs<scalar_t, acc_t> p{x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                          weight ? w.data_ptr<acc_t>() : nullptr,
                                          bias ? b.data_ptr<acc_t>() : nullptr,
                                          temb ? te.data_ptr<acc_t>() : nullptr,
                                          mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), gx.data_ptr<scalar_t>(),
                                          sg.data_ptr<acc_t>(), sgx.data_ptr<acc_t>(),
                                          temb ? gt.data_ptr<acc_t>() : nullptr};
    if (N > 0) (nhwc ? backward_nhwc<scalar_t, acc_t> : backward_nchw<scalar_t, acc_t>)(p, args);
  });
  // the per-sample partial sums reduced over the batch in a fixed order: deterministic
  // (a fresh empty tensor for each None: a custom op's outputs may not alias one another)
  at::Tensor gw = weight ? sgx.sum(0).to(weight->scalar_type()) : x.new_empty({0});
  at::Tensor gb = bias ? sg.sum(0).to(bias->scalar_type()) : x.new_empty({0});
  at::Tensor gtemb = temb ? gt.to(temb->scalar_type()) : x.new_empty({0});
  return {gx, gw, gb, gtemb};
}

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) { m.impl("group_norm_act_backward", &group_norm_act_backward_cpu); }

}  // namespace fastddpm
