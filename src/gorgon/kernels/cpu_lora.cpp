// Batch-invariant multi-LoRA for x86 CPUs with AVX-512: every row of a flat batch may use its own adapter.
//
// For row m with adapter i = row_adapter[m] (-1: no LoRA, row untouched):
//   h[j] = scale_i * sum_k A_i[j][k] * x[m][k]                                  (shrink, A_i: [r_i, K])
//   y[m][col_offset + n] = round(float(y[m][col_offset + n]) + sum_j h[j] * Bt_i[j][n])   (expand, Bt_i: [r_i, out_i])
//
// As in cpu_linear.cpp, every output element is computed by one fixed instruction sequence whatever the batch:
// K is walked in fixed 16-lane chunks accumulated into one float32 vector and summed by _mm512_reduce_add_ps,
// h[j] is scaled once in float32, then each output lane accumulates h[j] * Bt[j][n] over j in increasing order
// with FMAs, and the sum is added to y and rounded once. Rows are grouped into segments of the same adapter
// (so A and Bt are streamed once per group of rows, not once per row) and columns are split into tiles for the
// threads, but neither grouping nor splitting changes any lane's arithmetic: a row's bits never depend on
// which other rows, adapters or threads share the call.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int kLanes = 16;        // float32 lanes of one AVX-512 vector
constexpr int kMaxRows = 4;       // rows of one adapter computed together (they share the A and Bt loads)
constexpr int kShrinkJ = 4;       // ranks j computed together by the shrink (independent FMA chains)
constexpr int kPassVecs = 4;      // column vectors per expand pass (independent FMA chains)
constexpr int64_t kTileCols = 256;  // columns per thread work item of the expand
constexpr int64_t kGrainMacs = 1 << 14;  // multiply-adds (some microseconds) that make a thread task worth its start

inline __mmask16 lane_mask(int64_t n) { return n >= kLanes ? (__mmask16)0xFFFF : (__mmask16)((1U << n) - 1); }

template <typename T>
struct Traits;

// bfloat16 <-> float32 conversions are done by hand: widening is exact (the bf16 bits are the top half of the
// float32), and narrowing rounds to nearest even exactly like c10::BFloat16(v) (VCVTNEPS2BF16 would flush
// denormals, which c10 does not).
template <>
struct Traits<c10::BFloat16> {
  using raw = uint16_t;
  static inline __m512 load(const raw* p, __mmask16 m) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static inline void store(raw* p, __m512 v, __mmask16 m) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                          _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));  // NaN
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
  }
};

template <>
struct Traits<float> {
  using raw = float;
  static inline __m512 load(const raw* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static inline void store(raw* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
};

// One adapter's operands, as raw pointers.
template <typename T>
struct Adapter {
  const typename Traits<T>::raw* a = nullptr;    // [r, K]
  const typename Traits<T>::raw* b_t = nullptr;  // [r, out]
  int64_t r = 0, out = 0;
  float scale = 0.f;
};

// R rows of one adapter: whose rows (positions in the segmented order) and where their h lives.
struct Block {
  int64_t first;  // index into the segmented row order
  int rows;
  int64_t adapter;
};

// Shrink for R rows: h[i][j] = scale * reduce(sum over K chunks of x_i * A_j). kShrinkJ ranks at a time; past
// the last rank the A row is clamped to r - 1 and the result dropped, so the code stays one unrolled shape.
template <typename T, int R>
void shrink(const typename Traits<T>::raw* const* x, int64_t K, const Adapter<T>& ad, float* const* h) {
  using Tr = Traits<T>;
  const int64_t full = K / kLanes, tail = K - full * kLanes;
  for (int64_t j0 = 0; j0 < ad.r; j0 += kShrinkJ) {
    const typename Tr::raw* a[kShrinkJ];
#pragma GCC unroll 4
    for (int q = 0; q < kShrinkJ; ++q) a[q] = ad.a + std::min<int64_t>(j0 + q, ad.r - 1) * K;
    __m512 acc[R][kShrinkJ];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < kShrinkJ; ++q) acc[i][q] = _mm512_setzero_ps();
    for (int64_t c = 0; c <= full; ++c) {
      if (c == full && tail == 0) break;
      const __mmask16 m = c < full ? (__mmask16)0xFFFF : lane_mask(tail);  // masked lanes read as 0: add +0
      __m512 av[kShrinkJ];
#pragma GCC unroll 4
      for (int q = 0; q < kShrinkJ; ++q) av[q] = Tr::load(a[q] + c * kLanes, m);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        const __m512 xv = Tr::load(x[i] + c * kLanes, m);
#pragma GCC unroll 4
        for (int q = 0; q < kShrinkJ; ++q) acc[i][q] = _mm512_fmadd_ps(xv, av[q], acc[i][q]);
      }
    }
    const int nj = (int)std::min<int64_t>(kShrinkJ, ad.r - j0);
    for (int i = 0; i < R; ++i)
      for (int q = 0; q < nj; ++q) h[i][j0 + q] = _mm512_reduce_add_ps(acc[i][q]) * ad.scale;  // fixed tree
  }
}

// Expand for R rows over columns [n0, n1) of the adapter's output: y += h @ Bt, kPassVecs vectors per pass.
template <typename T, int R>
void expand(typename Traits<T>::raw* const* y, const Adapter<T>& ad, const float* const* h, int64_t n0,
            int64_t n1) {
  using Tr = Traits<T>;
  for (int64_t p = n0; p < n1; p += kPassVecs * kLanes) {
    __mmask16 m[kPassVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kPassVecs; ++v) m[v] = lane_mask(std::max<int64_t>(0, n1 - p - v * kLanes));
    __m512 acc[R][kPassVecs];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < kPassVecs; ++v) acc[i][v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < ad.r; ++j) {  // increasing j: the fixed summation order of every lane
      const typename Tr::raw* b = ad.b_t + j * ad.out + p;
      __m512 bv[kPassVecs];
#pragma GCC unroll 4
      for (int v = 0; v < kPassVecs; ++v) bv[v] = Tr::load(b + v * kLanes, m[v]);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        const __m512 hj = _mm512_set1_ps(h[i][j]);
#pragma GCC unroll 4
        for (int v = 0; v < kPassVecs; ++v) acc[i][v] = _mm512_fmadd_ps(hj, bv[v], acc[i][v]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < kPassVecs; ++v) {
        auto* yp = y[i] + p + v * kLanes;
        Tr::store(yp, _mm512_add_ps(Tr::load(yp, m[v]), acc[i][v]), m[v]);
      }
  }
}

// Calls F<R> for the block's row count (1..kMaxRows); each R is its own unrolled instantiation.
template <template <int> class F, typename... Args>
void dispatch_rows(int rows, Args&&... args) {
  switch (rows) {
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    case 3: F<3>::run(args...); break;
    default: F<4>::run(args...); break;
  }
}

template <typename T>
struct ShrinkOp {
  template <int R>
  struct F {
    static void run(const typename Traits<T>::raw* const* x, int64_t K, const Adapter<T>& ad, float* const* h) {
      shrink<T, R>(x, K, ad, h);
    }
  };
};

template <typename T>
struct ExpandOp {
  template <int R>
  struct F {
    static void run(typename Traits<T>::raw* const* y, const Adapter<T>& ad, const float* const* h, int64_t n0,
                    int64_t n1) {
      expand<T, R>(y, ad, h, n0, n1);
    }
  };
};

// Work items per thread task so that each task has about kGrainMacs multiply-adds (small calls run inline).
inline int64_t grain(int64_t items, int64_t macs) {
  if (items == 0 || macs == 0) return 1;
  return std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, macs / items));
}

template <typename T>
void lora_impl(const torch::Tensor& x, torch::Tensor& y, const int64_t* row_adapter,
               const std::vector<Adapter<T>>& adapters, int64_t col_offset) {
  using raw = typename Traits<T>::raw;
  const int64_t M = x.size(0), K = x.size(1), n_adapters = (int64_t)adapters.size();
  const raw* xp = reinterpret_cast<const raw*>(x.data_ptr<T>());
  raw* yp = reinterpret_cast<raw*>(y.data_ptr<T>());
  const int64_t y_stride = y.stride(0);

  // Segments: the rows with a LoRA, ordered by adapter (stable counting sort), then cut into blocks of up to
  // kMaxRows rows of one adapter.
  std::vector<int64_t> start(n_adapters + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t i = row_adapter[m];
    if (i >= 0 && adapters[i].r > 0) ++start[i + 1];
  }
  for (int64_t i = 0; i < n_adapters; ++i) start[i + 1] += start[i];
  const int64_t active = start[n_adapters];
  if (active == 0) return;
  std::vector<int64_t> order(active);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t i = row_adapter[m];
      if (i >= 0 && adapters[i].r > 0) order[next[i]++] = m;
    }
  }
  std::vector<Block> blocks;
  int64_t r_max = 0, shrink_macs = 0;
  for (int64_t i = 0; i < n_adapters; ++i) {
    for (int64_t s = start[i]; s < start[i + 1]; s += kMaxRows)
      blocks.push_back({s, (int)std::min<int64_t>(kMaxRows, start[i + 1] - s), i});
    r_max = std::max(r_max, adapters[i].r);
    shrink_macs += (start[i + 1] - start[i]) * adapters[i].r * K;
  }

  // Phase 1, shrink: h for every active row (scaled, float32), one block per work item.
  std::vector<float> h_buf(active * r_max);
  at::parallel_for(0, (int64_t)blocks.size(), grain(blocks.size(), shrink_macs), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Block& blk = blocks[b];
      const raw* xr[kMaxRows];
      float* hr[kMaxRows];
      for (int i = 0; i < blk.rows; ++i) {
        xr[i] = xp + order[blk.first + i] * K;
        hr[i] = h_buf.data() + (blk.first + i) * r_max;
      }
      dispatch_rows<ShrinkOp<T>::template F>(blk.rows, xr, K, adapters[blk.adapter], hr);
    }
  });

  // Phase 2, expand: (block, column tile) work items, so that a wide output (an lm_head LoRA) also spreads
  // over the threads when the batch has a single row.
  std::vector<std::pair<int64_t, int64_t>> items;  // (block, first column)
  int64_t expand_macs = 0;
  for (int64_t b = 0; b < (int64_t)blocks.size(); ++b) {
    const Adapter<T>& ad = adapters[blocks[b].adapter];
    for (int64_t n = 0; n < ad.out; n += kTileCols) items.emplace_back(b, n);
    expand_macs += blocks[b].rows * ad.r * ad.out;
  }
  at::parallel_for(0, (int64_t)items.size(), grain(items.size(), expand_macs), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Block& blk = blocks[items[t].first];
      const Adapter<T>& ad = adapters[blk.adapter];
      const int64_t n0 = items[t].second, n1 = std::min(ad.out, n0 + kTileCols);
      raw* yr[kMaxRows];
      const float* hr[kMaxRows];
      for (int i = 0; i < blk.rows; ++i) {
        yr[i] = yp + order[blk.first + i] * y_stride + col_offset;
        hr[i] = h_buf.data() + (blk.first + i) * r_max;
      }
      dispatch_rows<ExpandOp<T>::template F>(blk.rows, yr, ad, hr, n0, n1);
    }
  });
}

// Checks one adapter's tensors and returns its raw view (r = 0: no LoRA on this target for this adapter).
template <typename T>
Adapter<T> adapter_view(size_t i, torch::Tensor& a, torch::Tensor& b_t, double scale, const torch::Tensor& x,
                        int64_t col_offset, int64_t n_total) {
  Adapter<T> ad;
  if (a.numel() == 0) return ad;
  const std::string who = "lora_apply: adapter " + std::to_string(i) + ": ";
  TORCH_CHECK(a.dim() == 2 && a.size(1) == x.size(1), who, "a must be [r, K] with K = ", x.size(1), ", got ",
              a.sizes());
  TORCH_CHECK(b_t.dim() == 2 && b_t.size(0) == a.size(0), who, "b_t must be [r, out] with r = ", a.size(0),
              ", got ", b_t.sizes());
  TORCH_CHECK(a.scalar_type() == x.scalar_type() && b_t.scalar_type() == x.scalar_type(), who,
              "a and b_t must have x's dtype ", x.scalar_type(), ", got ", a.scalar_type(), " and ",
              b_t.scalar_type());
  TORCH_CHECK(a.device().is_cpu() && b_t.device().is_cpu(), who, "a and b_t must be CPU tensors");
  TORCH_CHECK(col_offset + b_t.size(1) <= n_total, who, "col_offset + out = ", col_offset, " + ", b_t.size(1),
              " exceeds y's ", n_total, " columns");
  a = a.contiguous();
  b_t = b_t.contiguous();
  ad.a = reinterpret_cast<const typename Traits<T>::raw*>(a.data_ptr<T>());
  ad.b_t = reinterpret_cast<const typename Traits<T>::raw*>(b_t.data_ptr<T>());
  ad.r = a.size(0);
  ad.out = b_t.size(1);
  ad.scale = (float)scale;
  return ad;
}

template <typename T>
void lora_typed(const torch::Tensor& x, torch::Tensor& y, const torch::Tensor& row_adapter,
                std::vector<torch::Tensor>& a, std::vector<torch::Tensor>& b_t, const std::vector<double>& scales,
                int64_t col_offset) {
  std::vector<Adapter<T>> adapters;
  adapters.reserve(a.size());
  for (size_t i = 0; i < a.size(); ++i)
    adapters.push_back(adapter_view<T>(i, a[i], b_t[i], scales[i], x, col_offset, y.size(1)));
  lora_impl<T>(x, y, row_adapter.data_ptr<int64_t>(), adapters, col_offset);
}

}  // namespace

// y[:, col_offset : col_offset + out_i] += scale_i * (x @ a_i^T) @ b_t_i for each row's adapter i, in place.
// x [M, K] and y [M, N_total] bfloat16 or float32 (y's rows may be strided, its columns contiguous);
// row_adapter [M] int64, -1 for rows without LoRA; a_i [r_i, K], b_t_i [r_i, out_i] (B transposed), an empty
// a_i for adapters without LoRA on this target.
void lora_apply(torch::Tensor x, torch::Tensor y, torch::Tensor row_adapter, std::vector<torch::Tensor> a,
                std::vector<torch::Tensor> b_t, std::vector<double> scales, int64_t col_offset) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "lora_apply: x and y must be 2-D, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && row_adapter.device().is_cpu(),
              "lora_apply: x, y and row_adapter must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32,
              "lora_apply: bfloat16 or float32 only, got ", x.scalar_type());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "lora_apply: y's dtype ", y.scalar_type(), " is not x's ",
              x.scalar_type());
  TORCH_CHECK(y.size(0) == x.size(0), "lora_apply: x has ", x.size(0), " rows but y has ", y.size(0));
  TORCH_CHECK(y.size(1) == 0 || y.stride(1) == 1, "lora_apply: y's columns must be contiguous (stride(1) == 1)");
  TORCH_CHECK(y.size(0) <= 1 || y.stride(0) >= y.size(1), "lora_apply: y's rows overlap");
  TORCH_CHECK(row_adapter.scalar_type() == torch::kInt64 && row_adapter.dim() == 1 &&
                  row_adapter.size(0) == x.size(0),
              "lora_apply: row_adapter must be int64 [M] with M = ", x.size(0), ", got ", row_adapter.scalar_type(),
              " ", row_adapter.sizes());
  TORCH_CHECK(a.size() == b_t.size() && a.size() == scales.size(), "lora_apply: a, b_t and scales differ in length (",
              a.size(), ", ", b_t.size(), ", ", scales.size(), ")");
  TORCH_CHECK(col_offset >= 0, "lora_apply: col_offset must be >= 0, got ", col_offset);
  x = x.contiguous();
  row_adapter = row_adapter.contiguous();
  const int64_t* idx = row_adapter.data_ptr<int64_t>();
  const int64_t n_adapters = (int64_t)a.size();
  for (int64_t m = 0; m < row_adapter.size(0); ++m)
    TORCH_CHECK(idx[m] >= -1 && idx[m] < n_adapters, "lora_apply: row ", m, " has adapter index ", idx[m],
                ", outside [-1, ", n_adapters, ")");
  if (x.scalar_type() == torch::kBFloat16)
    lora_typed<c10::BFloat16>(x, y, row_adapter, a, b_t, scales, col_offset);
  else
    lora_typed<float>(x, y, row_adapter, a, b_t, scales, col_offset);
}
