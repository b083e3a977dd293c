// Paged attention for CPUs with AVX-512, float32, one query row at a time.
//
// Each (query row, head) is computed by the same code whatever else is in the batch: keys are visited in
// logical position order in fixed blocks of kBlock positions aligned at 0, each block's scores are
// max-normalised and summed in order, and blocks are merged with an online softmax in block order. So the
// result of a row depends only on its own query and the keys it may see: decode rows, prefill rows and
// verification rows at the same position give the same bits, alone or in any batch.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;

inline float dot(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < d) {
    __mmask16 m = (__mmask16)((1U << (d - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// acc[0:d] = acc * scale + p * v
inline void scale_add(float* acc, float scale, float p, const float* v, int64_t d) {
  const __m512 s = _mm512_set1_ps(scale), pv = _mm512_set1_ps(p);
  int64_t i = 0;
  for (; i + 16 <= d; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + i), _mm512_mul_ps(s, _mm512_loadu_ps(acc + i))));
  for (; i < d; ++i) acc[i] = p * v[i] + scale * acc[i];
}

// One (row, head): keys at logical positions [lo, hi] through `slots`.
void attend_row(const float* q, const float* k_cache, const float* v_cache, const int64_t* slots, int64_t lo,
                int64_t hi, int64_t kv_head, int64_t n_kv, int64_t d, float scale, float* out, float* scores) {
  const int64_t stride = n_kv * d;
  float m = -std::numeric_limits<float>::infinity(), denom = 0.f;
  std::fill(out, out + d, 0.f);
  for (int64_t b0 = (lo / kBlock) * kBlock; b0 <= hi; b0 += kBlock) {
    const int64_t s0 = std::max(lo, b0), s1 = std::min(hi + 1, b0 + kBlock);
    float block_max = -std::numeric_limits<float>::infinity();
    for (int64_t p = s0; p < s1; ++p) {
      const float s = dot(q, k_cache + slots[p] * stride + kv_head * d, d) * scale;
      scores[p - s0] = s;
      block_max = std::max(block_max, s);
    }
    const float m_new = std::max(m, block_max);
    const float correction = std::exp(m - m_new);  // exp(-inf) = 0 on the first block
    float block_sum = 0.f;
    for (int64_t p = s0; p < s1; ++p) {
      const float e = std::exp(scores[p - s0] - m_new);
      scores[p - s0] = e;
      block_sum += e;
    }
    denom = denom * correction + block_sum;
    // acc = acc * correction + sum_p e_p v_p, folded in key order
    for (int64_t p = s0; p < s1; ++p) {
      const float* v = v_cache + slots[p] * stride + kv_head * d;
      scale_add(out, p == s0 ? correction : 1.f, scores[p - s0], v, d);
    }
    m = m_new;
  }
  const float inv = 1.f / denom;
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
}

}  // namespace

// q [T, n_heads, d] float32; k_cache, v_cache [S, n_kv, d] float32; row_seq [T] (-1: padding row, output 0);
// row_pos [T]; slot_table [B, C]; window: sliding window (0: none). Returns [T, n_heads, d] float32.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor row_seq,
                              torch::Tensor row_pos, torch::Tensor slot_table, int64_t window, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32 &&
                  v_cache.scalar_type() == torch::kFloat32,
              "paged_attention: float32 only");
  q = q.contiguous();
  row_seq = row_seq.contiguous();
  row_pos = row_pos.contiguous();
  slot_table = slot_table.contiguous();
  const int64_t T = q.size(0), n_heads = q.size(1), d = q.size(2), n_kv = k_cache.size(1);
  const int64_t rep = n_heads / n_kv, C = slot_table.size(1);
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* seq = row_seq.data_ptr<int64_t>();
  const int64_t* pos = row_pos.data_ptr<int64_t>();
  const int64_t* table = slot_table.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T * n_heads, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores(kBlock);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t t = w / n_heads, h = w % n_heads;
      if (seq[t] < 0) continue;
      const int64_t hi = pos[t], lo = window > 0 ? std::max<int64_t>(0, hi - window + 1) : 0;
      TORCH_CHECK(hi < C, "paged_attention: position beyond the slot table");
      attend_row(qp + w * d, kp, vp, table + seq[t] * C, lo, hi, h / rep, n_kv, d, (float)scale, op + w * d,
                 scores.data());
    }
  });
  return out;
}
