// Batch-invariant linear layers for x86 CPUs with AVX-512 (and AVX512-BF16 for bfloat16).
//
// y[m][n] = sum_k x[m][k] * w[n][k] + bias[n]
//
// Every output element is computed by the same instruction sequence, whatever M, N, the tiling or the thread
// split: K is walked in fixed chunks (32 bf16 / 16 fp32 lanes) accumulating into one 16-lane float32 vector,
// the lanes are summed by _mm512_reduce_add_ps (a fixed shuffle tree), then the bias is added and the result
// rounded once. So a row's result never depends on how many rows are computed with it: the property that
// makes a request's output independent of its batch and of speculation. The weights are streamed once per
// call for small M (decode), which keeps this memory-bound path close to the machine's bandwidth.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

// Weights are packed once into column tiles of kTileN rows, interleaved by K chunk:
//   packed[tile][chunk][row in tile][lane]
// so a tile streams from memory as one sequential run (the hardware prefetcher's best case); K and N are
// zero-padded to whole chunks and tiles. Zero lanes add exact zeros, so padding changes no result.
constexpr int kTileN = 8;
constexpr int kMaxTileM = 2;

template <typename T>
struct Traits;

// bfloat16: chunks of 32 values; VDPBF16PS accumulates pairs into 16 float32 lanes.
template <>
struct Traits<c10::BFloat16> {
  using raw = uint16_t;
  static constexpr int kChunk = 32;
  static inline __m512 madd(__m512 acc, const raw* x, const raw* w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x), (__m512bh)_mm512_loadu_si512(w));
  }
  static inline __m512 madd_tail(__m512 acc, const raw* x, const raw* w, int n) {
    __m512i xv = _mm512_maskz_loadu_epi16((__mmask32)((1ULL << n) - 1), x);
    return _mm512_dpbf16_ps(acc, (__m512bh)xv, (__m512bh)_mm512_loadu_si512(w));
  }
  static inline void store(raw* y, float v) { *y = c10::BFloat16(v).x; }  // round to nearest even
};

// float32: chunks of 16 values, one FMA per chunk.
template <>
struct Traits<float> {
  using raw = float;
  static constexpr int kChunk = 16;
  static inline __m512 madd(__m512 acc, const raw* x, const raw* w) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(w), acc);
  }
  static inline __m512 madd_tail(__m512 acc, const raw* x, const raw* w, int n) {
    return _mm512_fmadd_ps(_mm512_maskz_loadu_ps((__mmask16)((1U << n) - 1), x), _mm512_loadu_ps(w), acc);
  }
  static inline void store(raw* y, float v) { *y = v; }
};

// MB rows of x against one packed tile of kTileN weight rows.
// pf/pf_lines: cache lines (of the next tile) to prefetch into L2 during this pass (several passes over one tile are
// compute-bound; without this the next tile's memory latency is not hidden behind them).
// store(i, n, v): output row i of this pass, output column n, the float32 result.
template <typename T, int MB, typename Store>
inline void tile(const typename Traits<T>::raw* x, int64_t K, const typename Traits<T>::raw* wt,
                 const float* bias, int64_t N, int64_t n0, const char* pf, int64_t pf_lines, Store&& store) {
  using Tr = Traits<T>;
  constexpr int C = Tr::kChunk;
  __m512 acc[MB][kTileN];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < kTileN; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t full = K / C;
  const int64_t per_chunk = full ? (pf_lines + full - 1) / full : 0;
  for (int64_t c = 0; c < full; ++c) {
    const auto* wc = wt + c * kTileN * C;
    _mm_prefetch((const char*)(wc + 8 * kTileN * C), _MM_HINT_T0);
    for (int64_t l = c * per_chunk; l < std::min(pf_lines, (c + 1) * per_chunk); ++l) _mm_prefetch(pf + l * 64, _MM_HINT_T1);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < kTileN; ++j) acc[i][j] = Tr::madd(acc[i][j], x + i * K + c * C, wc + j * C);
  }
  if (const int tail = K - full * C) {
    const auto* wc = wt + full * kTileN * C;
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < kTileN; ++j) acc[i][j] = Tr::madd_tail(acc[i][j], x + i * K + full * C, wc + j * C, tail);
  }
  const int cols = (int)std::min<int64_t>(kTileN, N - n0);
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < cols; ++j) {
      float v = _mm512_reduce_add_ps(acc[i][j]);  // fixed shuffle tree
      if (bias) v += bias[n0 + j];
      store(i, n0 + j, v);
    }
}

// Every tile of a packed weight against rows_of(t) rows of x (a prefix of its rows), each thread taking whole
// tiles: every weight byte is read once per call, by one thread. store(row, n, v) receives the results.
template <typename T, typename RowsOf, typename Store>
void for_tiles(const typename Traits<T>::raw* xp, int64_t K, const typename Traits<T>::raw* wp, int64_t N,
               const float* bias, RowsOf&& rows_of, Store&& store) {
  constexpr int C = Traits<T>::kChunk;
  const int64_t chunks = (K + C - 1) / C, n_tiles = (N + kTileN - 1) / kTileN;
  const int64_t tile_elems = chunks * kTileN * C;
  at::parallel_for(0, n_tiles, 2, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t M = rows_of(t);
      const auto* wt = wp + t * tile_elems;
      // Passes after the first (compute-bound re-reads of this tile) share out prefetching the next tile.
      const int64_t later = (M + kMaxTileM - 1) / kMaxTileM - 1;
      const int64_t lines = t + 1 < t1 ? (tile_elems * (int64_t)sizeof(*wp) + 63) / 64 : 0;
      const char* next = (const char*)(wt + tile_elems);
      auto prefetch_lines = [&](int64_t pass) -> std::pair<int64_t, int64_t> {
        if (pass == 0 || later == 0) return {0, 0};
        return {lines * (pass - 1) / later, lines * pass / later};
      };
      int64_t m = 0, pass = 0;
      auto at_row = [&](int i, int64_t n, float v) { store(m + i, n, v); };
      for (; m + kMaxTileM <= M; m += kMaxTileM, ++pass) {
        const auto [lo, hi] = prefetch_lines(pass);
        tile<T, kMaxTileM>(xp + m * K, K, wt, bias, N, t * kTileN, next + lo * 64, hi - lo, at_row);
      }
      if (m < M) {
        const auto [lo, hi] = prefetch_lines(pass);
        tile<T, 1>(xp + m * K, K, wt, bias, N, t * kTileN, next + lo * 64, hi - lo, at_row);
      }
    }
  });
}

// A packed weight holds whole tiles of an [N, K] weight, K in whole chunks.
template <typename T>
void check_packed(const torch::Tensor& packed, int64_t N, int64_t K, const char* name) {
  constexpr int C = Traits<T>::kChunk;
  const int64_t chunks = (K + C - 1) / C, n_tiles = (N + kTileN - 1) / kTileN;
  TORCH_CHECK(packed.numel() == n_tiles * chunks * kTileN * C, name, ": packed weight does not fit");
}

template <typename T>
torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                          const c10::optional<torch::Tensor>& b) {
  using raw = typename Traits<T>::raw;
  const int64_t M = x.size(0), K = x.size(1);
  check_packed<T>(packed, N, K, "invariant_linear");
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor bias_f;
  if (b.has_value() && b->defined()) bias_f = b->to(torch::kFloat32).contiguous();
  const float* bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  raw* yp = reinterpret_cast<raw*>(y.data_ptr<T>());
  for_tiles<T>(
      reinterpret_cast<const raw*>(x.data_ptr<T>()), K, reinterpret_cast<const raw*>(packed.data_ptr<T>()), N, bias,
      [&](int64_t) { return M; }, [&](int64_t row, int64_t n, float v) { Traits<T>::store(yp + row * N + n, v); });
  return y;
}

// Rows [0, m_full) against every column of a packed weight whose rows were permuted (packed column n is output
// column col_of[n]), rows [m_full, M) against its first n_prefix packed columns only: two projections that share
// weights (the full lm_head and a drafting vocabulary packed first) in one pass over them.
template <typename T>
std::vector<torch::Tensor> joint_impl(const torch::Tensor& x, const torch::Tensor& packed, int64_t N, int64_t m_full,
                                      int64_t n_prefix, const torch::Tensor& col_of) {
  using raw = typename Traits<T>::raw;
  const int64_t M = x.size(0), K = x.size(1);
  check_packed<T>(packed, N, K, "invariant_linear_joint");
  auto full = torch::empty({m_full, N}, x.options());
  auto prefix = torch::empty({M - m_full, n_prefix}, x.options());
  raw* fp = reinterpret_cast<raw*>(full.data_ptr<T>());
  raw* pp = reinterpret_cast<raw*>(prefix.data_ptr<T>());
  const int64_t* cols = col_of.data_ptr<int64_t>();
  for_tiles<T>(
      reinterpret_cast<const raw*>(x.data_ptr<T>()), K, reinterpret_cast<const raw*>(packed.data_ptr<T>()), N, nullptr,
      [&](int64_t t) { return t * kTileN < n_prefix ? M : m_full; },
      [&](int64_t row, int64_t n, float v) {
        if (row < m_full)
          Traits<T>::store(fp + row * N + cols[n], v);
        else if (n < n_prefix)
          Traits<T>::store(pp + (row - m_full) * n_prefix + n, v);
      });
  return {full, prefix};
}

template <typename T>
torch::Tensor pack_impl(const torch::Tensor& w) {
  constexpr int C = Traits<T>::kChunk;
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t chunks = (K + C - 1) / C, n_tiles = (N + kTileN - 1) / kTileN;
  auto padded = torch::zeros({n_tiles * kTileN, chunks * C}, w.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  // (tiles, kTileN, chunks, C) -> (tiles, chunks, kTileN, C)
  return padded.view({n_tiles, kTileN, chunks, C}).permute({0, 2, 1, 3}).contiguous().view({-1});
}

}  // namespace

torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "pack_weight: expected a 2-D weight");
  if (w.scalar_type() == torch::kBFloat16) return pack_impl<c10::BFloat16>(w);
  if (w.scalar_type() == torch::kFloat32) return pack_impl<float>(w);
  TORCH_CHECK(false, "pack_weight: only bfloat16 and float32");
}

torch::Tensor invariant_linear(torch::Tensor x, torch::Tensor packed, int64_t N, c10::optional<torch::Tensor> b) {
  TORCH_CHECK(x.dim() == 2, "invariant_linear: x must be 2-D");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), "invariant_linear: dtype mismatch");
  x = x.contiguous();
  if (x.scalar_type() == torch::kBFloat16) return linear_impl<c10::BFloat16>(x, packed, N, b);
  if (x.scalar_type() == torch::kFloat32) return linear_impl<float>(x, packed, N, b);
  TORCH_CHECK(false, "invariant_linear: only bfloat16 and float32");
}


std::vector<torch::Tensor> invariant_linear_joint(torch::Tensor x, torch::Tensor packed, int64_t N, int64_t m_full,
                                                  int64_t n_prefix, torch::Tensor col_of) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == packed.scalar_type(), "invariant_linear_joint: 2-D x of the weight's dtype");
  TORCH_CHECK(0 <= m_full && m_full <= x.size(0) && 0 <= n_prefix && n_prefix <= N, "invariant_linear_joint: bad split");
  TORCH_CHECK(col_of.scalar_type() == torch::kLong && col_of.numel() == N, "invariant_linear_joint: col_of must be N int64");
  x = x.contiguous();
  col_of = col_of.contiguous();
  const int64_t* cols = col_of.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(0 <= cols[n] && cols[n] < N, "invariant_linear_joint: col_of out of range");
  if (x.scalar_type() == torch::kBFloat16) return joint_impl<c10::BFloat16>(x, packed, N, m_full, n_prefix, col_of);
  if (x.scalar_type() == torch::kFloat32) return joint_impl<float>(x, packed, N, m_full, n_prefix, col_of);
  TORCH_CHECK(false, "invariant_linear_joint: only bfloat16 and float32");
}
