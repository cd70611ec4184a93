// CPU fused sampler (fp32 logits, per-row parameters; see pyserve.kernels.sample).
#pragma once
#include <cstdint>
#include <string>

namespace pyserve::cpu {

struct SampleArgs {
  const float* logits;  // [B, V], rows `row_stride` apart
  int batch, vocab;
  long row_stride;
  const float *temperature, *top_p, *min_p;
  const float *repetition_penalty, *presence_penalty, *frequency_penalty;
  const int32_t* top_k;
  const int64_t *seed, *step;
  const int32_t *prompt, *prompt_off, *output, *output_off;  // CSR token lists
  const int32_t *bias_tok, *bias_off;
  const float* bias_val;
  const int32_t* allowed_bits;  // [M, ceil(V / 32)] packed masks, or null
  const int32_t* allowed_row;   // [B]: a row's mask in allowed_bits, -1 for none; null when no mask
  int num_logprobs;
  int64_t* tokens;        // [B]
  float* logprobs;        // [B]
  int64_t* top_tokens;    // [B, num_logprobs]
  float* top_logprobs;    // [B, num_logprobs]
};

// Lengths of the arrays SampleArgs points at, which the checks compare the offsets with.
struct SampleSizes {
  long prompt, output, bias;  // tokens in each CSR list
  int masks;                  // rows of allowed_bits
};

// What is wrong with the arguments' values, naming the parameter; empty when nothing is. The
// sampler reads token lists through their offsets, so these are checked before any row is drawn.
std::string check_sample_args(const SampleArgs& args, const SampleSizes& sizes);

void sample(const SampleArgs& args);

// Each row's first maximum, NaN counting as -inf (a row with nothing above -inf gives token 0):
// what sample() draws at temperature 0 with no penalty, bias or mask, without its other passes.
void greedy(const float* logits, int batch, int vocab, long row_stride, int64_t* tokens);

}  // namespace pyserve::cpu
