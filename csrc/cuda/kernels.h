// Host entry points of the CUDA kernels (defined in the .cu files, bound in bindings_cuda.cpp).
// Pointers are device addresses checked by pyserve/kernels/cuda.py; `stream` is a cudaStream_t.
#pragma once
#include <cstdint>
#include <utility>

namespace pyserve::cuda {

void write_kv(int dtype, uintptr_t k, uintptr_t v, uintptr_t k_cache, uintptr_t v_cache, uintptr_t slots,
              long num_tokens, int num_kv_heads, int block_size, int head_dim, uintptr_t stream);

void paged_attention(int dtype, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_tables,
                     uintptr_t seq_lens, uintptr_t query_start, uintptr_t out, uintptr_t scratch, int num_tokens,
                     int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks,
                     float scale, int window, int num_splits, int split_keys, uintptr_t stream);

// y [m, n] = x [m, k] times a packed weight (format: 1 bf16, 2 int8, 3 int4) plus bias; x, bias and y
// in `dtype`, scales fp16.
void quantized_linear(int dtype, uintptr_t x, uintptr_t w, uintptr_t scales, uintptr_t bias, uintptr_t out, int m,
                      int n, int k, int format, uintptr_t stream);

// y [tokens, n] += each row's LoRA delta (pyserve.kernels.lora); a, b, x, y in `dtype`; `shrunk` is
// [tokens, max_rank] fp32 scratch.
void lora(int dtype, uintptr_t y, uintptr_t x, uintptr_t a, uintptr_t b, uintptr_t index, uintptr_t rank,
          uintptr_t scale, uintptr_t shrunk, int tokens, int n, int k, int max_rank, uintptr_t stream);

void dense_attention(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int batch, int num_heads,
                     int num_kv_heads, int q_len, int kv_len, int head_dim, float scale, bool causal,
                     uintptr_t stream);

// Self-attention of packed sequences (see pyserve.kernels.varlen_attention); cu_seqlens int32 [S + 1].
void varlen_attention(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t cu_seqlens,
                      int num_tokens, int num_seqs, int num_heads, int num_kv_heads, int head_dim, float scale,
                      bool causal, uintptr_t stream);

void sample(int dtype, uintptr_t logits, uintptr_t scratch, int batch, int vocab, long row_stride,
            uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t repetition,
            uintptr_t presence, uintptr_t frequency, uintptr_t seed, uintptr_t step, uintptr_t prompt,
            uintptr_t prompt_off, uintptr_t output, uintptr_t output_off, uintptr_t bias_tok, uintptr_t bias_off,
            uintptr_t bias_val, uintptr_t allowed_bits, uintptr_t allowed_row, int num_logprobs, uintptr_t tokens, uintptr_t logprobs, uintptr_t top_tokens,
            uintptr_t top_logprobs, uintptr_t stream);

void denoise_step(int dtype, uintptr_t x, uintptr_t cond, uintptr_t uncond, uintptr_t prev_x0, uintptr_t coef,
                  uintptr_t seed, uintptr_t step, uintptr_t x_next, uintptr_t x0, int batch, long numel,
                  uintptr_t stream);

// (CUDA runtime version built against, driver's CUDA version; 0 without a driver), as 1000 * major + 10 * minor.
std::pair<int, int> versions();

}  // namespace pyserve::cuda
