// CPU fused sampler: penalties, logit bias, temperature, top-k / top-p / min-p, a seeded draw and
// logprobs in one pass per row. The vocabulary is never fully sorted on the common path: top-k
// and top-n come from a bounded heap, and top-p looks only at the largest logits unless their
// mass falls short of p.
#include "cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/vec.h"
#include "philox.h"

namespace pyserve::cpu {
namespace {

using Scored = std::pair<float, int>;  // (value, token)

// Larger value first; among equal values the lower token id first (torch.topk's order).
inline bool before(const Scored& a, const Scored& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// The k largest entries of x, in `before` order.
void top_entries(const float* x, int n, int k, std::vector<Scored>& out) {
  out.clear();
  k = std::min(k, n);
  if (k <= 0) return;
  // A heap whose top is the worst kept entry: most candidates are rejected with one compare.
  for (int i = 0; i < n; ++i) {
    if (static_cast<int>(out.size()) < k) {
      out.push_back({x[i], i});
      std::push_heap(out.begin(), out.end(), before);
    } else if (x[i] > out.front().first) {
      std::pop_heap(out.begin(), out.end(), before);
      out.back() = {x[i], i};
      std::push_heap(out.begin(), out.end(), before);
    }
  }
  std::sort_heap(out.begin(), out.end(), before);
}

struct RowScratch {
  std::vector<float> x;
  std::vector<uint8_t> seen;
  std::vector<int> counts;
  std::vector<Scored> top;
  explicit RowScratch(int vocab) : x(vocab), seen(vocab, 0), counts(vocab, 0) {}
};

void apply_penalties(const SampleArgs& a, int row, RowScratch& w) {
  float* x = w.x.data();
  const int32_t* out_b = a.output + a.output_off[row];
  const int32_t* out_e = a.output + a.output_off[row + 1];
  const float rep = a.repetition_penalty[row];
  if (rep != 1.0f) {
    auto penalise = [&](const int32_t* b, const int32_t* e) {
      for (const int32_t* t = b; t < e; ++t)
        if (!w.seen[*t]) {
          w.seen[*t] = 1;
          x[*t] = x[*t] > 0 ? x[*t] / rep : x[*t] * rep;
        }
    };
    penalise(a.prompt + a.prompt_off[row], a.prompt + a.prompt_off[row + 1]);
    penalise(out_b, out_e);
    for (const int32_t* t = a.prompt + a.prompt_off[row]; t < a.prompt + a.prompt_off[row + 1]; ++t) w.seen[*t] = 0;
    for (const int32_t* t = out_b; t < out_e; ++t) w.seen[*t] = 0;
  }
  const float freq = a.frequency_penalty[row], pres = a.presence_penalty[row];
  if (freq != 0.0f || pres != 0.0f) {
    for (const int32_t* t = out_b; t < out_e; ++t) ++w.counts[*t];
    for (const int32_t* t = out_b; t < out_e; ++t)
      if (w.counts[*t] > 0) {
        x[*t] -= freq * w.counts[*t] + pres;
        w.counts[*t] = 0;  // each distinct token once; also leaves the scratch clean
      }
  }
  for (int i = a.bias_off[row]; i < a.bias_off[row + 1]; ++i) x[a.bias_tok[i]] += a.bias_val[i];
}

// NaN logits become -inf (never chosen; keeps the first-maximum scan in bounds), and so do the
// tokens a row's structured-output mask leaves out, in the same pass: a masked row costs about
// what an unmasked one does. Branch-free, so the compiler vectorises the 32 lanes of a word.
void finite_and_allowed(const SampleArgs& a, int row, float* x) {
  const int vocab = a.vocab;
  if (a.allowed_row == nullptr || a.allowed_row[row] < 0) {
    for (int i = 0; i < vocab; ++i) x[i] = x[i] == x[i] ? x[i] : -INFINITY;
    return;
  }
  const uint32_t* bits =
      reinterpret_cast<const uint32_t*>(a.allowed_bits) + static_cast<long>(a.allowed_row[row]) * ((vocab + 31) / 32);
  const int full = vocab / 32;
  for (int w = 0; w < full; ++w) {
    const uint32_t word = bits[w];
    float* xs = x + w * 32;
    for (int b = 0; b < 32; ++b) xs[b] = ((word >> b) & 1u) && xs[b] == xs[b] ? xs[b] : -INFINITY;
  }
  for (int i = full * 32; i < vocab; ++i) x[i] = ((bits[full] >> (i - full * 32)) & 1u) && x[i] == x[i] ? x[i] : -INFINITY;
}

// The logit threshold that top-k / top-p / min-p put on a row (keep x >= threshold).
float candidate_threshold(const SampleArgs& a, int row, RowScratch& w, float x_max, float inv_t) {
  const int vocab = a.vocab;
  const float* x = w.x.data();
  float threshold = -INFINITY;
  const int k = a.top_k[row];
  const bool use_k = k > 0 && k < vocab;
  const float top_p = a.top_p[row];
  if (use_k) {
    top_entries(x, vocab, k, w.top);
    threshold = w.top.back().first;
  }
  if (top_p < 1.0f) {
    // The candidate set's mass (ties at the top-k threshold stay in), then its largest entries.
    float total = sum_exp_above(x, vocab, x_max, inv_t, threshold);
    if (!use_k) top_entries(x, vocab, std::min(vocab, 1024), w.top);
    auto nucleus_end = [&](const std::vector<Scored>& sorted, float* last) {
      float before_mass = 0.0f;
      for (const Scored& e : sorted) {
        if (e.first < threshold) break;
        if (before_mass >= top_p * total) return true;
        *last = e.first;
        before_mass += std::exp((e.first - x_max) * inv_t);
      }
      return before_mass >= top_p * total;
    };
    float last = threshold;
    if (!nucleus_end(w.top, &last) && !use_k) {
      // The largest 1024 hold too little mass (a flat distribution): sort what remains.
      w.top.clear();
      for (int i = 0; i < vocab; ++i) w.top.push_back({x[i], i});
      std::sort(w.top.begin(), w.top.end(), before);
      nucleus_end(w.top, &last);
    }
    threshold = std::max(threshold, last);
  }
  const float min_p = a.min_p[row];
  if (min_p > 0.0f) threshold = std::max(threshold, x_max + std::log(min_p) / inv_t);
  return threshold;
}

// The first kept token (x >= threshold) at which the running sum of exp((x - x_max) * inv_t)
// passes target, else the last kept one. Whole blocks are summed with vector code and skipped;
// only the block where the sum crosses is walked token by token (a scalar walk over a vocabulary
// whose kept tokens alternate unpredictably, as under a grammar's mask, is mostly mispredicts).
int inverse_cdf(const float* x, int vocab, float x_max, float inv_t, float threshold, float target) {
  constexpr int kBlock = 64;
  float cdf = 0.0f;
  int i = 0;
  for (; i + kBlock <= vocab; i += kBlock) {
    const float s = sum_exp_above(x + i, kBlock, x_max, inv_t, threshold);
    if (cdf + s > target) break;
    cdf += s;
  }
  for (; i < vocab; ++i) {
    if (x[i] < threshold) continue;
    cdf += std::exp((x[i] - x_max) * inv_t);
    if (cdf > target) return i;
  }
  for (i = vocab - 1; i > 0 && x[i] < threshold; --i) {
  }
  return i;  // rounding left the target out of reach: the last kept token
}

void sample_row(const SampleArgs& a, int row, RowScratch& w) {
  const int vocab = a.vocab;
  const float* logits = a.logits + static_cast<long>(row) * a.row_stride;
  std::memcpy(w.x.data(), logits, sizeof(float) * vocab);
  float raw_max = max_of(logits, vocab);
  float raw_lse = raw_max + std::log(sum_exp_above(logits, vocab, raw_max, 1.0f, -INFINITY));

  apply_penalties(a, row, w);
  finite_and_allowed(a, row, w.x.data());
  const float* x = w.x.data();
  int64_t token = 0;
  const float temperature = a.temperature[row];
  if (temperature <= 0.0f) {
    greedy(x, 1, vocab, vocab, &token);
  } else {
    const float x_max = max_of(x, vocab);
    const float inv_t = 1.0f / temperature;
    float threshold = candidate_threshold(a, row, w, x_max, inv_t);
    float total = sum_exp_above(x, vocab, x_max, inv_t, threshold);
    float target = uniform(a.seed[row], static_cast<uint32_t>(a.step[row]), 0, kSampleStream) * total;
    token = inverse_cdf(x, vocab, x_max, inv_t, threshold, target);
  }
  a.tokens[row] = token;
  a.logprobs[row] = logits[token] - raw_lse;
  if (a.num_logprobs > 0) {
    top_entries(logits, vocab, a.num_logprobs, w.top);
    for (int i = 0; i < a.num_logprobs; ++i) {
      a.top_tokens[static_cast<long>(row) * a.num_logprobs + i] = w.top[i].second;
      a.top_logprobs[static_cast<long>(row) * a.num_logprobs + i] = w.top[i].first - raw_lse;
    }
  }
}

// Why a CSR list is unreadable: offsets must rise from 0 to its length, and ids lie in [0, vocab).
std::string check_list(const char* name, const int32_t* ids, const int32_t* off, int batch, long size, int vocab) {
  bool rising = off[0] == 0 && off[batch] == size;
  for (int b = 0; b < batch && rising; ++b) rising = off[b] <= off[b + 1];
  if (!rising)
    return "params." + std::string(name) + "_offsets must rise from 0 to the length of params." + name + "_tokens";
  for (long i = 0; i < size; ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      return "params." + std::string(name) + "_tokens holds token ids outside [0, " + std::to_string(vocab) + ")";
  return {};
}

}  // namespace

std::string check_sample_args(const SampleArgs& a, const SampleSizes& sizes) {
  for (auto [name, ids, off, size] : {std::tuple{"prompt", a.prompt, a.prompt_off, sizes.prompt},
                                      std::tuple{"output", a.output, a.output_off, sizes.output},
                                      std::tuple{"bias", a.bias_tok, a.bias_off, sizes.bias}}) {
    std::string why = check_list(name, ids, off, a.batch, size, a.vocab);
    if (!why.empty()) return why;
  }
  for (int b = 0; b < a.batch; ++b) {
    // Written so that NaN fails each test.
    if (!(a.top_p[b] > 0.0f && a.top_p[b] <= 1.0f)) return "params.top_p must be in (0, 1]";
    if (!(a.temperature[b] >= 0.0f)) return "params.temperature must be >= 0";
    if (!(a.repetition_penalty[b] > 0.0f)) return "params.repetition_penalty must be > 0";
    if (a.allowed_row != nullptr && (a.allowed_row[b] < -1 || a.allowed_row[b] >= sizes.masks))
      return "params.allowed_row must be in [-1, " + std::to_string(sizes.masks) + ")";
  }
  return {};
}

void sample(const SampleArgs& a) {
#pragma omp parallel if (a.batch > 1)
  {
    RowScratch w(a.vocab);
#pragma omp for schedule(dynamic, 1)
    for (int row = 0; row < a.batch; ++row) sample_row(a, row, w);
  }
}

void greedy(const float* logits, int batch, int vocab, long row_stride, int64_t* tokens) {
  for (int row = 0; row < batch; ++row) {
    const float* x = logits + row * row_stride;
    float best = -INFINITY;
    int i = 0;
#ifdef PYSERVE_AVX2
    // max_ps returns its second operand when either is NaN: the running maximum skips NaNs
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= vocab; i += 8) vm = _mm256_max_ps(_mm256_loadu_ps(x + i), vm);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vm);
    for (float v : lanes) best = v > best ? v : best;
#endif
    for (; i < vocab; ++i) best = x[i] > best ? x[i] : best;
    int token = 0;
    if (best > -INFINITY) {
#ifdef PYSERVE_AVX2
      const __m256 vb = _mm256_set1_ps(best);
      while (token + 8 <= vocab && !_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + token), vb, _CMP_EQ_OQ)))
        token += 8;
#endif
      while (x[token] != best) ++token;
    }
    tokens[row] = token;
  }
}

}  // namespace pyserve::cpu
