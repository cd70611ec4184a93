// A Llama-style decoder stack for decode-sized batches in one call (fp32 activations): per layer
// RMS norm, fused qkv product, rotary embedding, KV-cache write, paged attention, output product,
// RMS norm with the residual add, fused gate/up product, SiLU gate, down product; then the final
// norm. The same kernels the per-op path calls, without a return to Python between them.
#pragma once
#include <cstdint>

#include "cpu/quantized_linear.h"  // kMaxPackedRows

namespace pyserve::cpu {

// One product's weights: fp32 [n, k] (format 0) or a packed WeightFormat code (1-3).
struct DecoderLinear {
  const void* w;
  const uint16_t* scales;  // packed int8/int4 only: fp16
  const float* bias;    // or null
  int n, k, format;
  bool int8_activations;  // packed int8/int4 only: see QuantizedLinearArgs
};

struct DecoderLayer {
  const float* input_norm;  // [hidden]
  const float* post_norm;   // [hidden]
  DecoderLinear qkv, o, gate_up, down;
  void* k_cache;  // [num_blocks, kv_heads, block_size, head_dim], fp32 or bf16 (bf16_cache)
  void* v_cache;
};

struct DecoderStackArgs {
  float* x;                 // [T, hidden]: the embeddings in, the final normed hidden states out
  int tokens, hidden, heads, kv_heads, head_dim;
  float eps;
  const float *cos, *sin;   // [T, head_dim / 2]
  const DecoderLayer* layers;
  int num_layers;
  const float* final_norm;  // [hidden]
  const int64_t* slots;     // [T]
  const int32_t *block_tables, *seq_lens, *query_start;
  int num_seqs, max_blocks, block_size, window;
  float scale;
  bool bf16_cache;
};

// Rows a stack call takes: with any fp32 product, the limit of the fp32 matrix-vector kernel
// (beyond it torch's GEMM may be faster); with every product packed, the packed kernels' own limit,
// so that a busy server's decode steps (64 streams) are one call as well.
constexpr int kMaxStackRows = 8;
constexpr int kMaxPackedStackRows = kMaxPackedRows;

// int64 fields a layer takes in the bindings' address table: input_norm, post_norm, then
// (w, scales, bias, n, k, format, int8_activations) for qkv, o, gate_up and down, then k_cache,
// v_cache.
constexpr int kStackLayerFields = 2 + 4 * 7 + 2;

void decoder_stack(const DecoderStackArgs& args);

// A decode step from token ids to logits: the ids' embedding rows, rotary angles from the
// positions (cos and sin of position x inv_freq, in fp32 as torch computes them), decoder_stack,
// the output product, and each row's greedy token (sampling.h greedy) while the logits are in
// cache. The step's Python around the stack (a few dozen tensor ops, on caches the weight stream
// has just flushed) cost about a tenth of a batch-1 step.
struct DecodeStepArgs {
  DecoderStackArgs stack;     // its x, cos and sin are this call's own
  const float* embedding;     // [vocab, hidden]
  const int64_t* token_ids;   // [T], each in [0, vocab)
  const int64_t* positions;   // [T]
  const float* inv_freq;      // [head_dim / 2]
  DecoderLinear head;         // [vocab, hidden]
  float* logits;              // [T, vocab]
  int64_t* greedy;            // [T]
};

void decode_step(DecodeStepArgs args);

}  // namespace pyserve::cpu
