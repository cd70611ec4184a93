// CPU attention (fp32 arithmetic): paged attention over a block-table KV cache (fp32 or bf16), KV
// writes by slot, and dense attention. One online-softmax core serves all three callers: a work
// item is a set of query rows that share one KV head (all heads of a GQA group, several tokens of
// a prefill chunk), and it walks the keys tile by tile, so each key and value is read once for
// the whole group; a bf16 cache's tile is widened to fp32 once, as it comes up.
#include "cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/vec.h"

namespace pyserve::cpu {
namespace {

constexpr int kMaxRows = 64;       // query rows per work item
constexpr int kMaxTile = 64;       // keys per tile
constexpr int kSplitKeys = 512;    // keys per split of a long decode
constexpr int kPackedMinRows = 12;  // rows from which transposing a key tile pays off

// Up to kMaxTile consecutive key positions; their rows may lie in different cache blocks. The
// online softmax reads fp32 rows; a tile of a bf16 cache holds its rows' addresses only until
// `widened` copies them to fp32 (prefetching needs no more).
struct Tile {
  const float* k[kMaxTile];
  const float* v[kMaxTile];
  int first_pos;  // position of the first key
  int len = 0;
  int row_bytes = 0;  // of a key (or value) row where it lies, for prefetching
  void add(const void* key, const void* value) {
    k[len] = static_cast<const float*>(key);
    v[len++] = static_cast<const float*>(value);
  }
};

// The state of a work item's rows: running max, running sum and unnormalised output.
struct RowState {
  int n = 0;
  int dim = 0;
  bool row_by_row = false;  // batch invariance: scores one row at a time (see set_batch_invariant)
  const float* q[kMaxRows];
  int pos[kMaxRows];
  float m[kMaxRows];
  float l[kMaxRows];
  alignas(64) float o[kMaxRows * 256];
  alignas(64) float s[kMaxRows * kMaxTile];
  alignas(64) float kt[256 * kMaxTile];  // the tile's keys transposed, [dim][key]
  Tile tiles[2];                // the tile in use and the one being prefetched
  const Tile* ahead = nullptr;  // the next tile, requested a key at a time during this one
  Tile wide;                    // a bf16 tile's rows widened to fp32, in the arrays below
  alignas(64) float wide_k[kMaxTile * kMaxHeadDim];
  alignas(64) float wide_v[kMaxTile * kMaxHeadDim];
};

// The tile `t` of a bf16 cache, its rows widened into st's arrays.
const Tile& widened(RowState& st, const Tile& t) {
  const int d = st.dim;
  st.wide.first_pos = t.first_pos;
  st.wide.len = 0;
  for (int j = 0; j < t.len; ++j) {
    bf16_to_f32(reinterpret_cast<const uint16_t*>(t.k[j]), st.wide_k + j * d, d);
    bf16_to_f32(reinterpret_cast<const uint16_t*>(t.v[j]), st.wide_v + j * d, d);
    st.wide.add(st.wide_k + j * d, st.wide_v + j * d);
  }
  return st.wide;
}

// This thread's RowState, kept across calls: at ~280 KB a fresh one is an mmap, page faults and a
// munmap, which cost ~15 us a call, most of a short decode's attention.
RowState& thread_row_state(int dim) {
  thread_local std::unique_ptr<RowState> state(new RowState());
  state->dim = dim;
  state->ahead = nullptr;
  return *state;
}

#ifdef PYSERVE_AVX2
// The eight sums of a[r][c] (four rows by two keys), as [r0k0, r0k1, r1k0, r1k1, ..., r3k1].
inline __m256 hsum_4x2(const __m256 a[4][2]) {
  __m256 h0 = _mm256_hadd_ps(a[0][0], a[0][1]), h1 = _mm256_hadd_ps(a[1][0], a[1][1]);
  __m256 h2 = _mm256_hadd_ps(a[2][0], a[2][1]), h3 = _mm256_hadd_ps(a[3][0], a[3][1]);
  __m256 g0 = _mm256_hadd_ps(h0, h1), g1 = _mm256_hadd_ps(h2, h3);
  return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
}
#endif

#ifdef PYSERVE_AVX2
// S[r..r+R)[j..j+16) from the transposed key tile: query elements are broadcast against sixteen
// keys, the same register blocking as P.V, with no horizontal sums.
template <int R>
void scores_packed_rows(RowState& st, int r, int cols, float scale) {
  const int d = st.dim;
#ifdef __AVX512F__
  // Sixteen keys per 512-bit register: half the instructions of the AVX2 blocking below.
  const __m512 vs = _mm512_set1_ps(scale);
  for (int j = 0; j < cols; j += 16) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int c = 0; c < d; ++c) {
      const __m512 k = _mm512_load_ps(st.kt + c * kMaxTile + j);
      for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(st.q[r + i][c]), k, acc[i]);
    }
    for (int i = 0; i < R; ++i) _mm512_store_ps(st.s + (r + i) * kMaxTile + j, _mm512_mul_ps(acc[i], vs));
  }
#else
  const __m256 vs = _mm256_set1_ps(scale);
  for (int j = 0; j < cols; j += 16) {
    __m256 acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int c = 0; c < d; ++c) {
      const __m256 k0 = _mm256_load_ps(st.kt + c * kMaxTile + j), k1 = _mm256_load_ps(st.kt + c * kMaxTile + j + 8);
      for (int i = 0; i < R; ++i) {
        const __m256 q = _mm256_broadcast_ss(st.q[r + i] + c);
        acc[i][0] = _mm256_fmadd_ps(q, k0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(q, k1, acc[i][1]);
      }
    }
    for (int i = 0; i < R; ++i) {
      _mm256_store_ps(st.s + (r + i) * kMaxTile + j, _mm256_mul_ps(acc[i][0], vs));
      _mm256_store_ps(st.s + (r + i) * kMaxTile + j + 8, _mm256_mul_ps(acc[i][1], vs));
    }
  }
#endif
}

// Eight keys' rows (8 x 8 floats at column c) transposed into kt[c..c+8][j..j+8].
inline void transpose8(const Tile& t, int j, int c, float* kt) {
  __m256 r[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(t.k[j + i] + c);
  for (int i = 0; i < 8; i += 2) {
    u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_store_ps(kt + (c + i) * kMaxTile + j, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_store_ps(kt + (c + i + 4) * kMaxTile + j, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// Prefill tiles (many rows): transpose the keys once, then a register-blocked product.
void scores_packed(RowState& st, const Tile& t, float scale) {
  const int d = st.dim, cols = (t.len + 15) / 16 * 16;
  int j = 0;
  for (; j + 8 <= t.len; j += 8)
    for (int c = 0; c < d; c += 8) transpose8(t, j, c, st.kt);
  for (; j < cols; ++j)  // the ragged end, zero-padded to whole vectors
    for (int c = 0; c < d; ++c) st.kt[c * kMaxTile + j] = j < t.len ? t.k[j][c] : 0.0f;
  int r = 0;
  for (; r + 6 <= st.n; r += 6) scores_packed_rows<6>(st, r, cols, scale);
  switch (st.n - r) {
    case 5: scores_packed_rows<5>(st, r, cols, scale); break;
    case 4: scores_packed_rows<4>(st, r, cols, scale); break;
    case 3: scores_packed_rows<3>(st, r, cols, scale); break;
    case 2: scores_packed_rows<2>(st, r, cols, scale); break;
    case 1: scores_packed_rows<1>(st, r, cols, scale); break;
  }
}
#endif

// Request keys [j0, j1) of a tile (keys and values), spread over the work of the current tile
// so that only a few lines are in flight at once.
inline void prefetch_keys(const Tile& t, int j0, int j1) {
  for (int j = j0; j < std::min(j1, t.len); ++j)
    for (int i = 0; i < t.row_bytes; i += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(t.k[j]) + i);
      __builtin_prefetch(reinterpret_cast<const char*>(t.v[j]) + i);
    }
}

#ifdef PYSERVE_AVX2
// S[r..r+4)[j, j+1]: four rows by two keys, so each key load serves four rows and one shuffle
// tree reduces eight dot products.
inline void four_rows_two_keys(RowState& st, int r, const float* k0, const float* k1, int j, float scale) {
  __m256 acc[4][2];
  for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int c = 0; c < st.dim; c += 8) {
    __m256 kv0 = _mm256_loadu_ps(k0 + c), kv1 = _mm256_loadu_ps(k1 + c);
    for (int i = 0; i < 4; ++i) {
      __m256 qv = _mm256_loadu_ps(st.q[r + i] + c);
      acc[i][0] = _mm256_fmadd_ps(qv, kv0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(qv, kv1, acc[i][1]);
    }
  }
  alignas(32) float sums[8];
  _mm256_store_ps(sums, _mm256_mul_ps(hsum_4x2(acc), _mm256_set1_ps(scale)));
  for (int i = 0; i < 4; ++i) {
    st.s[(r + i) * kMaxTile + j] = sums[2 * i];
    st.s[(r + i) * kMaxTile + j + 1] = sums[2 * i + 1];
  }
}

// S[r..r+R)[j..j+4) for the R < 4 rows left over (all of a decode step's rows when a GQA group
// has fewer than four heads): four keys a row, reduced by one shuffle tree a row.
template <int R>
inline void few_rows_four_keys(RowState& st, int r, const Tile& t, int j, float scale) {
  __m256 acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int kk = 0; kk < 4; ++kk) acc[i][kk] = _mm256_setzero_ps();
  for (int c = 0; c < st.dim; c += 8) {
    __m256 q[R];
    for (int i = 0; i < R; ++i) q[i] = _mm256_loadu_ps(st.q[r + i] + c);
    for (int kk = 0; kk < 4; ++kk) {
      const __m256 k = _mm256_loadu_ps(t.k[j + kk] + c);
      for (int i = 0; i < R; ++i) acc[i][kk] = _mm256_fmadd_ps(q[i], k, acc[i][kk]);
    }
  }
  for (int i = 0; i < R; ++i) {
    // lanes 0-3: keys j..j+3 over the first half of the columns, lanes 4-7 over the second
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[i][0], acc[i][1]), _mm256_hadd_ps(acc[i][2], acc[i][3]));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(st.s + (r + i) * kMaxTile + j, _mm_mul_ps(sums, _mm_set1_ps(scale)));
  }
}
#endif

// S[r][j] = scale * q_r . k_j, register-blocked by four keys; the next tile's keys are requested
// a few at a time meanwhile.
void scores(RowState& st, const Tile& t, float scale) {
  const int d = st.dim;
  int j = 0;
#ifdef PYSERVE_AVX2
  if (st.row_by_row && d % 8 == 0) {  // the same reduction for every row, alone or among many
    for (; j + 4 <= t.len; j += 4) {
      if (st.ahead) prefetch_keys(*st.ahead, j, j + 4);
      for (int r = 0; r < st.n; ++r) few_rows_four_keys<1>(st, r, t, j, scale);
    }
  } else if (st.n >= kPackedMinRows && d % 8 == 0) {
    scores_packed(st, t, scale);
    return;
  }
  const int full_rows = st.n / 4 * 4;
  for (; j + 4 <= t.len && d % 8 == 0; j += 4) {
    if (st.ahead) prefetch_keys(*st.ahead, j, j + 4);
    for (int r = 0; r < full_rows; r += 4) {
      four_rows_two_keys(st, r, t.k[j], t.k[j + 1], j, scale);
      four_rows_two_keys(st, r, t.k[j + 2], t.k[j + 3], j + 2, scale);
    }
    switch (st.n - full_rows) {
      case 3: few_rows_four_keys<3>(st, full_rows, t, j, scale); break;
      case 2: few_rows_four_keys<2>(st, full_rows, t, j, scale); break;
      case 1: few_rows_four_keys<1>(st, full_rows, t, j, scale); break;
    }
  }
#endif
  if (st.ahead) prefetch_keys(*st.ahead, j, st.ahead->len);
  for (; j < t.len; ++j)
    for (int r = 0; r < st.n; ++r) st.s[r * kMaxTile + j] = dot(st.q[r], t.k[j], d) * scale;
}

// O[r..r+R) += sum_j P[r][j] * v_j with R rows by sixteen columns held in registers, then the
// last eight columns alone for head dims such as 40 or 80 (Stable Diffusion's).
template <int R>
void accumulate_rows(RowState& st, const Tile& t, int r) {
  const int d = st.dim;
#ifdef PYSERVE_AVX2
  int c = 0;
#ifdef __AVX512F__
  for (; c + 16 <= d; c += 16) {  // sixteen columns per 512-bit register
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_loadu_ps(st.o + (r + i) * d + c);
    for (int j = 0; j < t.len; ++j) {
      const __m512 v = _mm512_loadu_ps(t.v[j] + c);
      for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(st.s[(r + i) * kMaxTile + j]), v, acc[i]);
    }
    for (int i = 0; i < R; ++i) _mm512_storeu_ps(st.o + (r + i) * d + c, acc[i]);
  }
#endif
  for (; c + 16 <= d; c += 16) {
    __m256 acc[R][2];
    for (int i = 0; i < R; ++i) {
      acc[i][0] = _mm256_load_ps(st.o + (r + i) * d + c);
      acc[i][1] = _mm256_load_ps(st.o + (r + i) * d + c + 8);
    }
    for (int j = 0; j < t.len; ++j) {
      const float* v = t.v[j] + c;
      __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
      for (int i = 0; i < R; ++i) {
        __m256 p = _mm256_broadcast_ss(st.s + (r + i) * kMaxTile + j);
        acc[i][0] = _mm256_fmadd_ps(p, v0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(p, v1, acc[i][1]);
      }
    }
    for (int i = 0; i < R; ++i) {
      _mm256_store_ps(st.o + (r + i) * d + c, acc[i][0]);
      _mm256_store_ps(st.o + (r + i) * d + c + 8, acc[i][1]);
    }
  }
  if (c < d) {  // d % 16 == 8
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_load_ps(st.o + (r + i) * d + c);
    for (int j = 0; j < t.len; ++j) {
      __m256 v0 = _mm256_loadu_ps(t.v[j] + c);
      for (int i = 0; i < R; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(st.s + (r + i) * kMaxTile + j), v0, acc[i]);
    }
    for (int i = 0; i < R; ++i) _mm256_store_ps(st.o + (r + i) * d + c, acc[i]);
  }
#else
  for (int i = r; i < r + R; ++i)
    for (int j = 0; j < t.len; ++j)
      scale_add(st.o + i * d, 1.0f, st.s[i * kMaxTile + j], t.v[j], d);
#endif
}

// O[r] += sum_j P[r][j] * v_j for every row, in groups of up to six rows.
void accumulate_values(RowState& st, const Tile& t) {
  int r = 0;
  if (st.dim % 8 == 0) {
    for (; r + 6 <= st.n; r += 6) accumulate_rows<6>(st, t, r);
    switch (st.n - r) {
      case 5: accumulate_rows<5>(st, t, r); break;
      case 4: accumulate_rows<4>(st, t, r); break;
      case 3: accumulate_rows<3>(st, t, r); break;
      case 2: accumulate_rows<2>(st, t, r); break;
      case 1: accumulate_rows<1>(st, t, r); break;
    }
    return;
  }
  for (; r < st.n; ++r)
    for (int j = 0; j < t.len; ++j) scale_add(st.o + r * st.dim, 1.0f, st.s[r * kMaxTile + j], t.v[j], st.dim);
}

// One tile of the online softmax: mask, rescale the running state, accumulate P.V.
void attend_tile(RowState& st, const Tile& t, float scale, bool causal, int window) {
  scores(st, t, scale);
  const int d = st.dim;
  // Most tiles mask nothing (a decode step's keys all precede it): skip the per-key test then.
  int first_row_pos = INT_MAX, last_row_pos = INT_MIN;
  for (int r = 0; r < st.n; ++r) {
    first_row_pos = std::min(first_row_pos, st.pos[r]);
    last_row_pos = std::max(last_row_pos, st.pos[r]);
  }
  const bool masks = (causal && t.first_pos + t.len - 1 > first_row_pos) ||
                     (window > 0 && last_row_pos - t.first_pos >= window);
  for (int r = 0; r < st.n; ++r) {
    float* s = st.s + r * kMaxTile;
    for (int j = 0; masks && j < t.len; ++j) {
      int dist = st.pos[r] - (t.first_pos + j);
      if ((causal && dist < 0) || (window > 0 && dist >= window)) s[j] = -INFINITY;
    }
    float tile_max = max_of(s, t.len);
    if (tile_max == -INFINITY) {
      std::fill(s, s + t.len, 0.0f);
      continue;
    }
    float m_new = std::max(st.m[r], tile_max);
    float alpha = std::exp(st.m[r] - m_new);
    st.l[r] = st.l[r] * alpha + exp_sub_sum(s, m_new, t.len);
    if (alpha != 1.0f) scale_add(st.o + r * d, alpha, 0.0f, st.o + r * d, d);
    st.m[r] = m_new;
  }
  accumulate_values(st, t);
}

// Ask for a tile's keys and values ahead of use: paged blocks sit at scattered addresses that
// the hardware prefetcher cannot predict, so decode would otherwise wait on memory for every row.
void prefetch_tile(const Tile& t) { prefetch_keys(t, 0, t.len); }

void reset(RowState& st) {
  std::fill(st.m, st.m + st.n, -INFINITY);
  std::fill(st.l, st.l + st.n, 0.0f);
  std::fill(st.o, st.o + st.n * st.dim, 0.0f);
}

void write_normalised(const RowState& st, int r, float* out) {
  float inv = st.l[r] > 0.0f ? 1.0f / st.l[r] : 0.0f;
  for (int i = 0; i < st.dim; ++i) out[i] = st.o[r * st.dim + i] * inv;
}

// A unit of parallel work: some query tokens of one sequence, one KV head, a range of blocks.
struct WorkItem {
  int seq, kv_head, tok_begin, tok_end, blk_begin, blk_end;
  int split;  // index into the split scratch, or -1 when the item covers all keys
};

}  // namespace

namespace {
std::atomic<bool> g_batch_invariant{false};
}  // namespace

void set_batch_invariant(bool on) { g_batch_invariant.store(on, std::memory_order_relaxed); }
bool batch_invariant() { return g_batch_invariant.load(std::memory_order_relaxed); }

void paged_attention(const PagedAttentionArgs& a) {
  const bool invariant = batch_invariant();
  const int group = a.num_heads / a.num_kv_heads;
  const int tok_tile = std::max(1, kMaxRows / group);
  const int split_blocks = std::max(1, kSplitKeys / a.block_size);
  const int tile_blocks = std::max(1, kMaxTile / a.block_size);
  const long value_bytes = a.bf16_cache ? 2 : 4;

  std::vector<WorkItem> items;
  std::vector<int> split_first;  // per split group: index of its first partial row set
  int n_partials = 0;
  for (int s = 0; s < a.num_seqs; ++s) {
    int q0 = a.query_start[s], qlen = a.query_start[s + 1] - q0, ctx = a.seq_lens[s];
    if (qlen == 0) continue;
    int n_blocks = (ctx + a.block_size - 1) / a.block_size;
    // The window limits which blocks any of these queries can see.
    // (Batch invariance: tiles from block 0 whatever the chunk; tiles before the window are skipped.)
    int first_blk = a.window > 0 && !invariant ? std::max(0, ctx - qlen - a.window + 1) / a.block_size : 0;
    int span = n_blocks - first_blk;
    bool split = !invariant && qlen == 1 && span > 2 * split_blocks;
    for (int h = 0; h < a.num_kv_heads; ++h) {
      if (split) {
        for (int b = first_blk; b < n_blocks; b += split_blocks)
          items.push_back({s, h, 0, 1, b, std::min(n_blocks, b + split_blocks), n_partials++});
      } else {
        for (int t = 0; t < qlen; t += tok_tile)
          items.push_back({s, h, t, std::min(qlen, t + tok_tile), first_blk, n_blocks, -1});
      }
    }
  }
  // Partials of split decode: per (split, head in group): m, l, and D outputs.
  std::vector<float> part_ml(static_cast<size_t>(n_partials) * group * 2);
  std::vector<float> part_o(static_cast<size_t>(n_partials) * group * a.head_dim);

#pragma omp parallel
  {
    RowState* st = &thread_row_state(a.head_dim);
    st->row_by_row = invariant;
#pragma omp for schedule(dynamic, 1)
    for (size_t w = 0; w < items.size(); ++w) {
      const WorkItem& it = items[w];
      int q0 = a.query_start[it.seq], qlen = a.query_start[it.seq + 1] - q0, ctx = a.seq_lens[it.seq];
      st->n = (it.tok_end - it.tok_begin) * group;
      for (int t = it.tok_begin, r = 0; t < it.tok_end; ++t)
        for (int g = 0; g < group; ++g, ++r) {
          st->q[r] = a.q + (static_cast<long>(q0 + t) * a.num_heads + it.kv_head * group + g) * a.head_dim;
          st->pos[r] = ctx - qlen + t;
        }
      reset(*st);
      int max_pos = ctx - qlen + it.tok_end - 1, min_pos = ctx - qlen + it.tok_begin;
      const int32_t* table = a.block_tables + static_cast<long>(it.seq) * a.max_blocks;
      // Tiles of whole blocks, up to kMaxTile keys, starting at block b.
      const int end = std::min(it.blk_end, max_pos / a.block_size + 1);
      auto tile_at = [&](int b, Tile& tile) {
        tile.first_pos = b * a.block_size;
        tile.len = 0;
        tile.row_bytes = a.head_dim * value_bytes;
        for (int blk = b; blk < std::min(end, b + tile_blocks); ++blk) {
          const long base = (static_cast<long>(table[blk]) * a.num_kv_heads + it.kv_head) * a.block_size * a.head_dim;
          const int keys = std::min(a.block_size, ctx - blk * a.block_size);
          for (int j = 0; j < keys; ++j) {
            const long at = (base + static_cast<long>(j) * a.head_dim) * value_bytes;
            tile.add(static_cast<const char*>(a.k_cache) + at, static_cast<const char*>(a.v_cache) + at);
          }
        }
      };
      Tile* cur = &st->tiles[0];
      Tile* next = &st->tiles[1];
      if (it.blk_begin < end) {
        tile_at(it.blk_begin, *cur);
        prefetch_tile(*cur);
      }
      for (int b = it.blk_begin; b < end; b += tile_blocks) {
        st->ahead = nullptr;
        if (b + tile_blocks < end) {
          tile_at(b + tile_blocks, *next);
          st->ahead = next;
        }
        const bool before_window = a.window > 0 && cur->first_pos + cur->len - 1 <= min_pos - a.window;
        if (!before_window) attend_tile(*st, a.bf16_cache ? widened(*st, *cur) : *cur, a.scale, true, a.window);
        std::swap(cur, next);
      }
      for (int r = 0; r < st->n; ++r) {
        int t = it.tok_begin + r / group, head = it.kv_head * group + r % group;
        if (it.split < 0) {
          write_normalised(*st, r, a.out + (static_cast<long>(q0 + t) * a.num_heads + head) * a.head_dim);
        } else {
          long p = static_cast<long>(it.split) * group + r;
          part_ml[2 * p] = st->m[r];
          part_ml[2 * p + 1] = st->l[r];
          std::memcpy(&part_o[p * a.head_dim], st->o + r * a.head_dim, sizeof(float) * a.head_dim);
        }
      }
    }
  }
  if (n_partials == 0) return;

  // Merge the splits of each (sequence, KV head): consecutive items with split >= 0.
  std::vector<std::pair<size_t, size_t>> runs;
  for (size_t w = 0; w < items.size();) {
    if (items[w].split < 0) { ++w; continue; }
    size_t e = w + 1;
    while (e < items.size() && items[e].split >= 0 && items[e].seq == items[w].seq &&
           items[e].kv_head == items[w].kv_head)
      ++e;
    runs.push_back({w, e});
    w = e;
  }
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < runs.size(); ++i) {
    auto [w0, w1] = runs[i];
    const WorkItem& it = items[w0];
    int q0 = a.query_start[it.seq];
    for (int g = 0; g < group; ++g) {
      float m = -INFINITY;
      for (size_t w = w0; w < w1; ++w) m = std::max(m, part_ml[2 * (items[w].split * group + g)]);
      float* out = a.out + (static_cast<long>(q0) * a.num_heads + it.kv_head * group + g) * a.head_dim;
      std::fill(out, out + a.head_dim, 0.0f);
      float total = 0.0f;
      for (size_t w = w0; w < w1; ++w) {
        long p = static_cast<long>(items[w].split) * group + g;
        if (part_ml[2 * p + 1] == 0.0f) continue;
        float f = std::exp(part_ml[2 * p] - m);
        total += part_ml[2 * p + 1] * f;
        scale_add(out, 1.0f, f, &part_o[p * a.head_dim], a.head_dim);
      }
      if (total > 0.0f) scale_add(out, 1.0f / total, 0.0f, out, a.head_dim);
    }
  }
}

namespace {

// One sequence's attention for `attend_spans`: where its queries, keys, values and outputs are,
// as element strides per position and per head (the head dimension has unit stride).
struct Span {
  const float *q, *k, *v;
  float* out;
  long q_pos, q_head, k_pos, k_head, v_pos, v_head, out_pos, out_head;
  int q_len, kv_len;
};

// Every span's queries over its keys; causal masks align the last query with the last key. Work
// items are (span, KV head, tile of queries), spread over the threads.
void attend_spans(const std::vector<Span>& spans, int num_heads, int num_kv_heads, int head_dim, float scale,
                  bool causal) {
  const int group = num_heads / num_kv_heads;
  const int tok_tile = std::max(1, kMaxRows / group);
  std::vector<long> first(spans.size() + 1, 0);  // each span's first work item
  for (size_t i = 0; i < spans.size(); ++i)
    first[i + 1] = first[i] + static_cast<long>(num_kv_heads) * ((spans[i].q_len + tok_tile - 1) / tok_tile);
#pragma omp parallel
  {
    RowState* st = &thread_row_state(head_dim);
    st->row_by_row = false;  // the per-thread state may come from a batch-invariant paged call
#pragma omp for schedule(dynamic, 1)
    for (long w = 0; w < first.back(); ++w) {
      const size_t i = std::upper_bound(first.begin(), first.end(), w) - first.begin() - 1;
      const Span& sp = spans[i];
      const int n_tiles = (sp.q_len + tok_tile - 1) / tok_tile;
      const int tile_idx = (w - first[i]) % n_tiles, h = (w - first[i]) / n_tiles;
      const int t0 = tile_idx * tok_tile, t1 = std::min(sp.q_len, t0 + tok_tile);
      const int offset = sp.kv_len - sp.q_len;
      st->n = (t1 - t0) * group;
      for (int t = t0, r = 0; t < t1; ++t)
        for (int g = 0; g < group; ++g, ++r) {
          st->q[r] = sp.q + (h * group + g) * sp.q_head + t * sp.q_pos;
          st->pos[r] = offset + t;
        }
      reset(*st);
      const float* k = sp.k + h * sp.k_head;
      const float* v = sp.v + h * sp.v_head;
      const int end = causal ? std::min(sp.kv_len, offset + t1) : sp.kv_len;
      Tile& tile = st->tiles[0];
      for (int k0 = 0; k0 < end; k0 += kMaxTile) {
        tile.first_pos = k0;
        tile.len = 0;
        for (int j = k0; j < std::min(end, k0 + kMaxTile); ++j) tile.add(k + j * sp.k_pos, v + j * sp.v_pos);
        attend_tile(*st, tile, scale, causal, 0);
      }
      for (int r = 0; r < st->n; ++r) {
        const int t = t0 + r / group, head = h * group + r % group;
        write_normalised(*st, r, sp.out + head * sp.out_head + t * sp.out_pos);
      }
    }
  }
}

}  // namespace

void dense_attention(const DenseAttentionArgs& a) {
  std::vector<Span> spans;
  const long out_head = static_cast<long>(a.q_len) * a.head_dim;
  for (long b = 0; b < a.batch; ++b)
    spans.push_back({a.q + b * a.q_stride[0], a.k + b * a.k_stride[0], a.v + b * a.v_stride[0],
                     a.out + b * a.num_heads * out_head, a.q_stride[2], a.q_stride[1], a.k_stride[2], a.k_stride[1],
                     a.v_stride[2], a.v_stride[1], a.head_dim, out_head, a.q_len, a.kv_len});
  attend_spans(spans, a.num_heads, a.num_kv_heads, a.head_dim, a.scale, a.causal);
}

void varlen_attention(const VarlenAttentionArgs& a) {
  std::vector<Span> spans;
  const long q_pos = static_cast<long>(a.num_heads) * a.head_dim, kv_pos = static_cast<long>(a.num_kv_heads) * a.head_dim;
  for (int s = 0; s < a.num_seqs; ++s) {
    const long start = a.cu_seqlens[s];
    const int len = a.cu_seqlens[s + 1] - a.cu_seqlens[s];
    if (len <= 0) continue;
    spans.push_back({a.q + start * q_pos, a.k + start * kv_pos, a.v + start * kv_pos, a.out + start * q_pos, q_pos,
                     a.head_dim, kv_pos, a.head_dim, kv_pos, a.head_dim, q_pos, a.head_dim, len, len});
  }
  attend_spans(spans, a.num_heads, a.num_kv_heads, a.head_dim, a.scale, a.causal);
}

void write_kv(const WriteKVArgs& a) {
  const long row = static_cast<long>(a.num_kv_heads) * a.head_dim;
#pragma omp parallel for schedule(static)
  for (long i = 0; i < a.num_tokens; ++i) {
    const long slot = a.slots[i];
    if (slot < 0) continue;
    const long block = slot / a.block_size, offset = slot % a.block_size;
    for (int h = 0; h < a.num_kv_heads; ++h) {
      const long dst = ((block * a.num_kv_heads + h) * a.block_size + offset) * a.head_dim;
      const float *k = a.k + i * row + h * a.head_dim, *v = a.v + i * row + h * a.head_dim;
      if (a.bf16_cache) {
        f32_to_bf16(k, static_cast<uint16_t*>(a.k_cache) + dst, a.head_dim);
        f32_to_bf16(v, static_cast<uint16_t*>(a.v_cache) + dst, a.head_dim);
      } else {
        std::memcpy(static_cast<float*>(a.k_cache) + dst, k, sizeof(float) * a.head_dim);
        std::memcpy(static_cast<float*>(a.v_cache) + dst, v, sizeof(float) * a.head_dim);
      }
    }
  }
}

}  // namespace pyserve::cpu
