// Fused per-row kernels for the decode path: RMSNorm (with the residual add), and the q/k rotary embedding
// with the key/value cache write. Each row is computed on its own by one fixed instruction sequence, so rows
// never depend on how many rows run together. They replace a dozen small PyTorch ops per layer, whose
// dispatch overhead dominated the non-matmul time of a decode step.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

#include "cpu_math.h"

#include <cmath>

namespace {

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

using gorgon::load16;

// The first n of 16 float32 values, rounded to the type (bfloat16: to nearest even, as c10::BFloat16 does).
inline void store16(float* p, __m512 v, int n = 16) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v); }
inline void store16(c10::BFloat16* p, __m512 v, int n = 16) {
  _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1), (__m256i)_mm512_cvtneps_pbh(v));
}
// v rounded to the type T and widened back: what storing and reloading it gives.
template <typename T>
inline __m512 rounded(__m512 v) { return v; }
template <>
inline __m512 rounded<c10::BFloat16>(__m512 v) {
  return gorgon::widen_bf16((__m256i)_mm512_cvtneps_pbh(v));
}

// One row, 16 lanes at a time: residual += x (rounded to the type) when x is given, then
// out = weight * dtype(residual * rsqrt(mean(residual^2) + eps)), the HF Llama convention (normalise in float32,
// round to the model dtype, then scale by the weight in the model dtype). The sum of squares is lane-wise in
// row order, then one fixed shuffle-tree reduction.
template <typename T>
void norm_row(const T* x, T* res, const T* w, T* out, int64_t H, float eps) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    const int n = (int)std::min<int64_t>(16, H - i);
    __m512 r = load16(res + i, n);
    if (x) {
      r = rounded<T>(_mm512_add_ps(r, load16(x + i, n)));
      store16(res + i, r, n);
    }
    sum = _mm512_fmadd_ps(r, r, sum);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sum) / (float)H + eps));
  for (int64_t i = 0; i < H; i += 16) {
    const int n = (int)std::min<int64_t>(16, H - i);
    const __m512 normed = rounded<T>(_mm512_mul_ps(load16(res + i, n), inv));
    store16(out + i, _mm512_mul_ps(load16(w + i, n), normed), n);
  }
}

template <typename T>
void add_rms_norm_impl(torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& w, torch::Tensor& out,
                       double eps, bool add) {
  const int64_t T_ = x.size(0), H = x.size(1);
  T* xp = x.data_ptr<T>();
  T* rp = residual.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      norm_row<T>(add ? xp + r * H : nullptr, rp + r * H, wp, op + r * H, H, (float)eps);
    }
  });
}

// act = dtype(silu(gate)) * up, per element (the HF order: the activation is rounded to the model dtype before
// the product). gate_up [T, 2I]: gate columns, then up columns.
template <typename T>
void silu_mul_impl(const torch::Tensor& gate_up, torch::Tensor& out) {
  const int64_t T_ = gate_up.size(0), I = gate_up.size(1) / 2;
  const T* src = gate_up.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gate = src + r * 2 * I;
      for (int64_t i = 0; i < I; i += 16) {
        const int n = (int)std::min<int64_t>(16, I - i);
        const __m512 act = rounded<T>(gorgon::silu(load16(gate + i, n)));
        store16(dst + r * I + i, _mm512_mul_ps(act, load16(gate + I + i, n)), n);
      }
    }
  });
}

template <typename T, typename C>
void rope_store_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                     torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots, torch::Tensor& q_out,
                     int64_t nh, int64_t nkv, int64_t d) {
  const int64_t T_ = qkv.size(0), width = qkv.size(1), half = d / 2;
  const T* src = qkv.data_ptr<T>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  float* q = q_out.data_ptr<float>();
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
  at::parallel_for(0, T_, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = src + r * width;
      const float* cr = c + r * d;
      const float* sr = s + r * d;
      for (int64_t h = 0; h < nh + nkv; ++h) {
        const T* x = row + h * d;
        if (half % 16 == 0) {  // 16 lanes at a time: the first half pairs with minus the second, and back
          float* qd = q + (r * nh + h) * d;
          C* kd = kc + (slot[r] * nkv + (h - nh)) * d;
          for (int64_t i = 0; i < half; i += 16) {
            const __m512 lo = load16(x + i), hi = load16(x + half + i);
            const __m512 out_lo = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi), _mm512_loadu_ps(sr + i),
                                                  _mm512_mul_ps(lo, _mm512_loadu_ps(cr + i)));
            const __m512 out_hi = _mm512_fmadd_ps(lo, _mm512_loadu_ps(sr + half + i),
                                                  _mm512_mul_ps(hi, _mm512_loadu_ps(cr + half + i)));
            if (h < nh) {
              store16(qd + i, out_lo);
              store16(qd + half + i, out_hi);
            } else {
              store16(kd + i, out_lo);
              store16(kd + half + i, out_hi);
            }
          }
          continue;
        }
        for (int64_t i = 0; i < d; ++i) {
          // rotate-half: the first half pairs with minus the second half, and back.
          const float rotated = i < half ? -to_f(x[i + half]) : to_f(x[i - half]);
          const float value = std::fma(rotated, sr[i], to_f(x[i]) * cr[i]);  // as the vector path
          if (h < nh)
            q[(r * nh + h) * d + i] = value;
          else
            kc[(slot[r] * nkv + (h - nh)) * d + i] = static_cast<C>(value);  // a bfloat16 cache rounds to nearest even
        }
      }
      const T* v = row + (nh + nkv) * d;
      C* vdst = vc + slot[r] * nkv * d;
      for (int64_t i = 0; i < nkv * d; i += 16) {
        const int n = (int)std::min<int64_t>(16, nkv * d - i);
        store16(vdst + i, load16(v + i, n), n);
      }
    }
  });
}

template <typename T>
void rope_store_into(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                     torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots, torch::Tensor& q_out,
                     int64_t nh, int64_t nkv, int64_t d) {
  if (k_cache.scalar_type() == torch::kBFloat16)
    rope_store_impl<T, c10::BFloat16>(qkv, cos, sin, k_cache, v_cache, slots, q_out, nh, nkv, d);
  else
    rope_store_impl<T, float>(qkv, cos, sin, k_cache, v_cache, slots, q_out, nh, nkv, d);
}

}  // namespace

// residual += x (unless x is undefined), returns rms_norm(residual) * weight. residual is updated in place.
torch::Tensor add_rms_norm(c10::optional<torch::Tensor> x_opt, torch::Tensor residual, torch::Tensor weight,
                           double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.dim() == 2, "add_rms_norm: residual must be contiguous 2-D");
  const bool add = x_opt.has_value() && x_opt->defined();
  torch::Tensor x = add ? x_opt->contiguous() : residual;
  weight = weight.contiguous();
  auto out = torch::empty_like(residual);
  if (residual.scalar_type() == torch::kBFloat16)
    add_rms_norm_impl<c10::BFloat16>(x, residual, weight, out, eps, add);
  else if (residual.scalar_type() == torch::kFloat32)
    add_rms_norm_impl<float>(x, residual, weight, out, eps, add);
  else
    TORCH_CHECK(false, "add_rms_norm: bfloat16 or float32 only");
  return out;
}

// qkv [T, (nh + 2 nkv) d] in the model dtype; cos/sin [T, d] float32; caches [S, nkv, d] float32.
// Writes rotated k and v at `slots`, returns rotated q [T, nh, d] float32.
torch::Tensor rope_store(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                         torch::Tensor v_cache, torch::Tensor slots, int64_t nh, int64_t nkv, int64_t d) {
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == torch::kFloat32 || k_cache.scalar_type() == torch::kBFloat16),
              "rope_store: float32 or bfloat16 caches only");
  qkv = qkv.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  slots = slots.contiguous();
  auto q = torch::empty({qkv.size(0), nh, d}, qkv.options().dtype(torch::kFloat32));
  if (qkv.scalar_type() == torch::kBFloat16)
    rope_store_into<c10::BFloat16>(qkv, cos, sin, k_cache, v_cache, slots, q, nh, nkv, d);
  else if (qkv.scalar_type() == torch::kFloat32)
    rope_store_into<float>(qkv, cos, sin, k_cache, v_cache, slots, q, nh, nkv, d);
  else
    TORCH_CHECK(false, "rope_store: bfloat16 or float32 only");
  return q;
}

// gate_up [T, 2I] in the model dtype -> silu(gate) * up [T, I] (the MLP's activation, fused).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: expected [T, 2I]");
  gate_up = gate_up.contiguous();
  auto out = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == torch::kBFloat16)
    silu_mul_impl<c10::BFloat16>(gate_up, out);
  else if (gate_up.scalar_type() == torch::kFloat32)
    silu_mul_impl<float>(gate_up, out);
  else
    TORCH_CHECK(false, "silu_mul: bfloat16 or float32 only");
  return out;
}
