// Paged attention for CPUs with AVX-512: float32 arithmetic over a float32 or bfloat16 key-value cache (bfloat16
// keys and values are widened exactly on load, so a cache type changes only what was stored, never the math).
//
// Each (query row, head) is computed by the same arithmetic whatever else is in the batch: keys are visited in
// logical position order in fixed blocks of kBlock positions aligned at 0; a key's score is one fused
// multiply-add chain over the head dimension; a block's exponentials are summed lane-wise (lane = position
// mod 16) and the lanes reduced by one fixed shuffle tree; blocks are merged with an online softmax in block
// order. So a row's result depends only on its own query and the keys it may see: decode rows, prefill rows
// and verification rows at the same position give the same bits, alone or in any batch.
//
// Speed comes from sharing key reads between rows: the rows of one group (a sequence's prefill or decode
// rows and its candidate-tree rows, which see the same prefix) are taken in tiles; per tile, key-value head and
// block, the keys are gathered once, transposed, from the slot table of the tile's deepest row, and every
// row-head of the tile scores 16 keys per vector instruction against them. A row whose own slot table differs
// at some position (a tree node's ancestors) re-scores just those keys from its own slots with the same
// chain of fused multiply-adds, so it gets the bits it would get alone.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kLanes = 16;
constexpr int64_t kTileRows = 8;  // query rows per work item (each with all heads of one key-value head)

using gorgon::load16;  // 16 cache values as float32 (a bfloat16 cache widens exactly)
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// The score chain of one key, scalar: exactly what one lane of the vector chain computes.
template <typename KV>
inline float score_one(const float* q, const KV* k, int64_t d) {
  float acc = 0.f;
  for (int64_t i = 0; i < d; ++i) acc = std::fma(q[i], to_float(k[i]), acc);
  return acc;
}

// scores[h][c*16 + lane] for chunks [c0, c1) of the transposed keys kt [kBlock/16][d][16], for HB heads at once (they
// share the key loads): per lane a fused multiply-add chain over i = 0..d-1.
template <int HB>
inline void score_chunks(const float* const* q, const float* kt, int64_t d, int64_t c0, int64_t c1, float* scores) {
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) {
    __m512 acc[HB][4];
    for (int h = 0; h < HB; ++h)
      for (int u = 0; u < 4; ++u) acc[h][u] = _mm512_setzero_ps();
    const float* base = kt + c * d * kLanes;
    const int64_t cs = d * kLanes;  // one chunk of keys
    for (int64_t i = 0; i < d; ++i) {
      const float* row = base + i * kLanes;
      const __m512 k0 = _mm512_loadu_ps(row), k1 = _mm512_loadu_ps(row + cs), k2 = _mm512_loadu_ps(row + 2 * cs),
                   k3 = _mm512_loadu_ps(row + 3 * cs);
      for (int h = 0; h < HB; ++h) {
        const __m512 qi = _mm512_set1_ps(q[h][i]);
        acc[h][0] = _mm512_fmadd_ps(qi, k0, acc[h][0]);
        acc[h][1] = _mm512_fmadd_ps(qi, k1, acc[h][1]);
        acc[h][2] = _mm512_fmadd_ps(qi, k2, acc[h][2]);
        acc[h][3] = _mm512_fmadd_ps(qi, k3, acc[h][3]);
      }
    }
    for (int h = 0; h < HB; ++h)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(scores + h * kBlock + (c + u) * kLanes, acc[h][u]);
  }
  for (; c < c1; ++c) {
    __m512 acc[HB];
    for (int h = 0; h < HB; ++h) acc[h] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; ++i) {
      const __m512 k = _mm512_loadu_ps(kt + (c * d + i) * kLanes);
      for (int h = 0; h < HB; ++h) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(q[h][i]), k, acc[h]);
    }
    for (int h = 0; h < HB; ++h) _mm512_storeu_ps(scores + h * kBlock + c * kLanes, acc[h]);
  }
}

// out[h][i0 : i0 + 16 NU] += sum_j e[h][j] v_j for keys [s0, s1), in key order, HB heads sharing each value load.
template <int HB, int NU, typename KV>
inline void accumulate_piece(float* const* out, const float* e, const KV* v_base, const int64_t* slots,
                             int64_t stride, int64_t i0, int64_t s0, int64_t s1) {
  __m512 acc[HB][NU];
  for (int h = 0; h < HB; ++h)
    for (int u = 0; u < NU; ++u) acc[h][u] = _mm512_loadu_ps(out[h] + i0 + u * kLanes);
  for (int64_t j = s0; j < s1; ++j) {
    const KV* v = v_base + slots[j] * stride + i0;
    __m512 vv[NU];
    for (int u = 0; u < NU; ++u) vv[u] = load16(v + u * kLanes);
    for (int h = 0; h < HB; ++h) {
      const __m512 p = _mm512_set1_ps(e[h * kBlock + j]);
      for (int u = 0; u < NU; ++u) acc[h][u] = _mm512_fmadd_ps(p, vv[u], acc[h][u]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int u = 0; u < NU; ++u) _mm512_storeu_ps(out[h] + i0 + u * kLanes, acc[h][u]);
}

// out[h] += sum_j e[h][j] v_j over the whole head dimension (d % 16 == 0), 64 columns at a time.
template <int HB, typename KV>
inline void accumulate_values(float* const* out, const float* e, const KV* v_base, const int64_t* slots,
                              int64_t stride, int64_t d, int64_t s0, int64_t s1) {
  int64_t i0 = 0;
  for (; i0 + 4 * kLanes <= d; i0 += 4 * kLanes) accumulate_piece<HB, 4, KV>(out, e, v_base, slots, stride, i0, s0, s1);
  switch ((d - i0) / kLanes) {
    case 3: accumulate_piece<HB, 3, KV>(out, e, v_base, slots, stride, i0, s0, s1); break;
    case 2: accumulate_piece<HB, 2, KV>(out, e, v_base, slots, stride, i0, s0, s1); break;
    case 1: accumulate_piece<HB, 1, KV>(out, e, v_base, slots, stride, i0, s0, s1); break;
    default: break;
  }
}

// out[i * out_stride + j] = rows[j][i] for a 16 x 16 tile (in-register transpose).
template <typename KV>
inline void transpose16(const KV* const* rows, float* out, int64_t out_stride) {
  __m512 r[16], t[16];
  for (int j = 0; j < 16; ++j) r[j] = load16(rows[j]);
  for (int j = 0; j < 16; j += 2) {
    t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
  }
  for (int j = 0; j < 16; j += 4) {
    r[j] = _mm512_shuffle_ps(t[j], t[j + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[j + 1] = _mm512_shuffle_ps(t[j], t[j + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[j + 2] = _mm512_shuffle_ps(t[j + 1], t[j + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[j + 3] = _mm512_shuffle_ps(t[j + 1], t[j + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 16; j += 8)
    for (int u = 0; u < 4; ++u) {
      t[j + u] = _mm512_shuffle_f32x4(r[j + u], r[j + 4 + u], 0x88);
      t[j + 4 + u] = _mm512_shuffle_f32x4(r[j + u], r[j + 4 + u], 0xdd);
    }
  for (int u = 0; u < 8; ++u) {
    r[u] = _mm512_shuffle_f32x4(t[u], t[8 + u], 0x88);
    r[8 + u] = _mm512_shuffle_f32x4(t[u], t[8 + u], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + i * out_stride, r[i]);
}

// kt[c][i][lane] for positions [g0, g1) of `slots`; lanes outside the range read `zeros` (d zeros of the cache type).
template <typename KV>
inline void gather_transposed(const KV* k_base, const int64_t* slots, int64_t stride, int64_t d, int64_t g0,
                              int64_t g1, const KV* zeros, float* kt) {
  const KV* rows[16];
  for (int64_t c = g0 / kLanes; c * kLanes < g1; ++c) {
    const int64_t j0 = c * kLanes;
    for (int64_t j = 0; j < kLanes; ++j)
      rows[j] = (j0 + j >= g0 && j0 + j < g1) ? k_base + slots[j0 + j] * stride : zeros;
    for (int64_t i0 = 0; i0 < d; i0 += kLanes) {
      transpose16(rows, kt + (c * d + i0) * kLanes, kLanes);
      for (int64_t j = 0; j < kLanes; ++j) rows[j] += kLanes;
    }
  }
}

struct RowState {
  float m = -std::numeric_limits<float>::infinity();
  float denom = 0.f;
};

template <typename KV>
struct Args {
  const float* q;
  const KV *k, *v;
  const int64_t *seq, *pos, *table;
  int64_t n_heads, n_kv, d, C, window;
  float scale;
  float* out;
};

// Softmax merge of one head's block scores [s0, s1) (raw dot products in, exponentials out); returns the
// factor that rescales the head's earlier value sum.
inline float merge_block(float* scores, int64_t s0, int64_t s1, float scale_f, RowState& st) {
  const int64_t c0 = s0 / kLanes, c1 = (s1 + kLanes - 1) / kLanes;
  const __m512 scale = _mm512_set1_ps(scale_f), ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = ninf;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t j0 = c * kLanes;
    const unsigned lo = (unsigned)std::max<int64_t>(0, s0 - j0), hi = (unsigned)std::min<int64_t>(kLanes, s1 - j0);
    const __mmask16 valid = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
    const __m512 s = _mm512_mask_mul_ps(ninf, valid, _mm512_loadu_ps(scores + j0), scale);
    _mm512_storeu_ps(scores + j0, s);
    vmax = _mm512_max_ps(vmax, s);
  }
  const float m_new = std::max(st.m, _mm512_reduce_max_ps(vmax));
  const float correction = _mm512_cvtss_f32(gorgon::exp_neg(_mm512_set1_ps(st.m - m_new)));  // 0 on the first block
  const __m512 mv = _mm512_set1_ps(m_new);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t c = c0; c < c1; ++c) {
    const __m512 e = gorgon::exp_neg(_mm512_sub_ps(_mm512_loadu_ps(scores + c * kLanes), mv));
    _mm512_storeu_ps(scores + c * kLanes, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  st.denom = st.denom * correction + _mm512_reduce_add_ps(vsum);
  st.m = m_new;
  return correction;
}

// One block of one row for HB of its heads (query heads h0.. of key-value head kv): scores, softmax merge,
// value accumulation into out.
template <int HB, typename KV>
void attend_block(const Args<KV>& a, int64_t t, int64_t h0, const int64_t* own, const int64_t* leader, const float* kt,
                  int64_t b0, int64_t s0, int64_t s1, int64_t kv, RowState* st, float* scores) {
  const int64_t d = a.d, stride = a.n_kv * d;
  const float* q[HB];
  float* out[HB];
  for (int h = 0; h < HB; ++h) {
    q[h] = a.q + (t * a.n_heads + h0 + h) * d;
    out[h] = a.out + (t * a.n_heads + h0 + h) * d;
  }
  score_chunks<HB>(q, kt, d, s0 / kLanes, (s1 + kLanes - 1) / kLanes, scores);
  for (int64_t j = s0; j < s1; ++j)  // keys this row sees through slots of its own (a tree node's ancestors)
    if (own[b0 + j] != leader[b0 + j])
      for (int h = 0; h < HB; ++h) scores[h * kBlock + j] = score_one(q[h], a.k + own[b0 + j] * stride + kv * d, d);
  for (int h = 0; h < HB; ++h) {
    const float correction = merge_block(scores + h * kBlock, s0, s1, a.scale, st[h]);
    const __m512 cv = _mm512_set1_ps(correction);
    for (int64_t i = 0; i < d; i += kLanes) _mm512_storeu_ps(out[h] + i, _mm512_mul_ps(cv, _mm512_loadu_ps(out[h] + i)));
  }
  accumulate_values<HB>(out, scores, a.v + kv * d, own + b0, stride, d, s0, s1);
}

template <typename KV>
void attend_heads(const Args<KV>& a, int64_t t, int64_t h0, int64_t nh, const int64_t* own, const int64_t* leader,
                  const float* kt, int64_t b0, int64_t s0, int64_t s1, int64_t kv, RowState* st, float* scores) {
  for (; nh >= 4; nh -= 4, h0 += 4, st += 4) attend_block<4>(a, t, h0, own, leader, kt, b0, s0, s1, kv, st, scores);
  if (nh == 3) attend_block<3>(a, t, h0, own, leader, kt, b0, s0, s1, kv, st, scores);
  if (nh == 2) attend_block<2>(a, t, h0, own, leader, kt, b0, s0, s1, kv, st, scores);
  if (nh == 1) attend_block<1>(a, t, h0, own, leader, kt, b0, s0, s1, kv, st, scores);
}

// One work item: the rows `rows` (one tile of a group) with every query head of key-value head `kv`.
template <typename KV>
void attend_tile(const Args<KV>& a, const int64_t* rows, int64_t n, int64_t kv, std::vector<float>& kt,
                 std::vector<float>& scores, const std::vector<KV>& zeros, std::vector<RowState>& state) {
  const int64_t rep = a.n_heads / a.n_kv, d = a.d, stride = a.n_kv * d;
  int64_t leader = rows[0], lo_min = std::numeric_limits<int64_t>::max();
  auto lo_of = [&](int64_t t) { return a.window > 0 ? std::max<int64_t>(0, a.pos[t] - a.window + 1) : 0; };
  for (int64_t r = 0; r < n; ++r) {
    if (a.pos[rows[r]] > a.pos[leader]) leader = rows[r];
    lo_min = std::min(lo_min, lo_of(rows[r]));
  }
  const int64_t hi_max = a.pos[leader];
  const int64_t* lead = a.table + a.seq[leader] * a.C;
  state.assign(n * rep, RowState());
  for (int64_t b0 = lo_min / kBlock * kBlock; b0 <= hi_max; b0 += kBlock) {
    // Gather the block's keys, transposed in chunks of 16 positions (kt[c][i][lane] = dimension i of the key
    // at position b0 + 16 c + lane), from the leader's slots; lanes outside the gathered range are zeros (their
    // scores are masked).
    const int64_t g0 = std::max(lo_min, b0) - b0, g1 = std::min(hi_max + 1 - b0, kBlock);
    gather_transposed(a.k + kv * d, lead + b0, stride, d, g0, g1, zeros.data(), kt.data());
    for (int64_t r = 0; r < n; ++r) {
      const int64_t t = rows[r], hi = a.pos[t], lo = lo_of(t);
      if (hi < b0 || lo >= b0 + kBlock) continue;
      const int64_t s0 = std::max(lo, b0) - b0, s1 = std::min(hi + 1 - b0, kBlock);
      attend_heads(a, t, kv * rep, rep, a.table + a.seq[t] * a.C, lead, kt.data(), b0, s0, s1, kv,
                   state.data() + r * rep, scores.data());
    }
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t h = 0; h < rep; ++h) {
      float* o = a.out + (rows[r] * a.n_heads + kv * rep + h) * d;
      const float inv = 1.f / state[r * rep + h].denom;
      for (int64_t i = 0; i < d; ++i) o[i] *= inv;
    }
}

// Every (tile, key-value head) work item, spread over the threads: costliest first (keys read x rows), each
// thread taking the next item when it is done. Items cost very different amounts when contexts differ (a long
// prompt's prefill beside short decodes), and an even split of the item range left one core idle for much of
// the call. Items write disjoint outputs, so the order changes no result.
template <typename KV>
void attend_all(const Args<KV>& a, const std::vector<std::pair<const int64_t*, int64_t>>& tiles) {
  std::vector<int64_t> cost(tiles.size()), order(tiles.size());
  for (size_t i = 0; i < tiles.size(); ++i) {
    int64_t hi = 0;
    for (int64_t r = 0; r < tiles[i].second; ++r) hi = std::max(hi, a.pos[tiles[i].first[r]]);
    cost[i] = (hi + kBlock) * (tiles[i].second + 4);  // key blocks gathered, plus every row's scoring
    order[i] = (int64_t)i;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  const int64_t items = (int64_t)tiles.size() * a.n_kv;
  const int threads = (int)std::min<int64_t>(at::get_num_threads(), items);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> kt(a.d * kBlock), scores(4 * kBlock);
    std::vector<KV> zeros(a.d, KV(0.f));
    std::vector<RowState> state;
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < items; ++w) {
      const auto& tile = tiles[order[w / a.n_kv]];
      attend_tile(a, tile.first, tile.second, w % a.n_kv, kt, scores, zeros, state);
    }
  }
}

}  // namespace

// q [T, n_heads, d] float32; k_cache, v_cache [S, n_kv, d] float32 or bfloat16 (both alike); row_seq [T] (-1:
// padding row, output 0); row_pos [T]; slot_table [B, C]; row_group [T]: rows that share a key prefix (same id) are tiled together;
// window: sliding window (0: none). Returns [T, n_heads, d] float32.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor row_seq,
                              torch::Tensor row_pos, torch::Tensor slot_table, torch::Tensor row_group,
                              int64_t window, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32, "paged_attention: float32 queries only");
  const auto kv_type = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == kv_type && (kv_type == torch::kFloat32 || kv_type == torch::kBFloat16),
              "paged_attention: float32 or bfloat16 caches only");
  q = q.contiguous();
  row_seq = row_seq.contiguous();
  row_pos = row_pos.contiguous();
  slot_table = slot_table.contiguous();
  row_group = row_group.contiguous();
  const int64_t T = q.size(0), n_heads = q.size(1), d = q.size(2), n_kv = k_cache.size(1);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: cache must be contiguous");
  TORCH_CHECK(row_group.numel() == T, "paged_attention: row_group must have one entry per row");
  TORCH_CHECK(d % kLanes == 0, "paged_attention: head_dim must be a multiple of 16");
  auto out = torch::zeros_like(q);
  const int64_t* seq = row_seq.data_ptr<int64_t>();
  // Tiles: each group's rows (in row order), kTileRows at a time.
  const int64_t* group = row_group.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> by_group;
  std::vector<int64_t> index_of;  // group id -> position in by_group
  for (int64_t t = 0; t < T; ++t) {
    if (seq[t] < 0) continue;
    // Checked here: an exception cannot leave the parallel region below.
    TORCH_CHECK(row_pos.data_ptr<int64_t>()[t] < slot_table.size(1), "paged_attention: position beyond the slot table");
    const int64_t g = group[t];
    TORCH_CHECK(g >= 0 && g < T, "paged_attention: group ids must lie in [0, T)");
    if ((int64_t)index_of.size() <= g) index_of.resize(g + 1, -1);
    if (index_of[g] < 0) {
      index_of[g] = by_group.size();
      by_group.emplace_back();
    }
    by_group[index_of[g]].push_back(t);
  }
  std::vector<std::pair<const int64_t*, int64_t>> tiles;
  // With fewer work items than two per thread (one sequence's candidate tree: 3 items on 2 threads left one
  // thread idle a third of the call), a group's rows are split into more tiles; each re-gathers its keys,
  // a small cost beside scoring several rows. Tiling never changes a row's result.
  const int64_t threads = at::get_num_threads();
  const int64_t min_tiles = (int64_t)by_group.size() * n_kv < 2 * threads ? (2 * threads + n_kv - 1) / n_kv : 1;
  for (const auto& rows : by_group) {  // tiles of at most kTileRows, as even as possible (threads finish together)
    const int64_t n = rows.size();
    const int64_t count = std::min(n, std::max(min_tiles, (n + kTileRows - 1) / kTileRows));
    for (int64_t i = 0, start = 0; i < count; ++i) {
      const int64_t size = n / count + (i < n % count ? 1 : 0);
      tiles.emplace_back(rows.data() + start, size);
      start += size;
    }
  }
  if (kv_type == torch::kBFloat16)
    attend_all<c10::BFloat16>(Args<c10::BFloat16>{q.data_ptr<float>(), k_cache.data_ptr<c10::BFloat16>(),
                                                  v_cache.data_ptr<c10::BFloat16>(), seq, row_pos.data_ptr<int64_t>(),
                                                  slot_table.data_ptr<int64_t>(), n_heads, n_kv, d, slot_table.size(1),
                                                  window, (float)scale, out.data_ptr<float>()},
                              tiles);
  else
    attend_all<float>(Args<float>{q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), seq,
                                  row_pos.data_ptr<int64_t>(), slot_table.data_ptr<int64_t>(), n_heads, n_kv, d,
                                  slot_table.size(1), window, (float)scale, out.data_ptr<float>()},
                      tiles);
  return out;
}
