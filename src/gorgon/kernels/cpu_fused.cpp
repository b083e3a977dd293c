// Fused per-row kernels for the decode path: RMSNorm (with the residual add), and the q/k rotary embedding
// with the key/value cache write. Each row is computed on its own by one fixed instruction sequence, so rows
// never depend on how many rows run together. They replace a dozen small PyTorch ops per layer, whose
// dispatch overhead dominated the non-matmul time of a decode step.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// One row: out = weight * dtype(x * rsqrt(mean(x^2) + eps)), the HF Llama convention (normalise in float32,
// round to the model dtype, then scale by the weight in the model dtype).
template <typename T>
void norm_row(const T* x, const T* w, T* out, int64_t H, float eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < H; ++i) {
    const float v = to_f(x[i]);
    sum += v * v;
  }
  const float inv = 1.f / std::sqrt(sum / (float)H + eps);
  for (int64_t i = 0; i < H; ++i) {
    const T normed = static_cast<T>(to_f(x[i]) * inv);
    out[i] = static_cast<T>(to_f(w[i]) * to_f(normed));
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
      T* res = rp + r * H;
      if (add) {
        const T* xr = xp + r * H;
        for (int64_t i = 0; i < H; ++i) res[i] = static_cast<T>(to_f(res[i]) + to_f(xr[i]));
      }
      norm_row<T>(res, wp, op + r * H, H, (float)eps);
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
        for (int64_t i = 0; i < d; ++i) {
          // rotate-half: the first half pairs with minus the second half, and back.
          const float rotated = i < half ? -to_f(x[i + half]) : to_f(x[i - half]);
          const float value = to_f(x[i]) * cr[i] + rotated * sr[i];
          if (h < nh)
            q[(r * nh + h) * d + i] = value;
          else
            kc[(slot[r] * nkv + (h - nh)) * d + i] = static_cast<C>(value);  // a bfloat16 cache rounds to nearest even
        }
      }
      const T* v = row + (nh + nkv) * d;
      C* vdst = vc + slot[r] * nkv * d;
      for (int64_t i = 0; i < nkv * d; ++i) vdst[i] = static_cast<C>(to_f(v[i]));
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
