// pybind11 bindings of the CPU kernels. Tensors arrive as raw addresses (`tensor.data_ptr()`)
// that pyserve/kernels/cpu.py has checked for dtype, shape and contiguity; the module never links
// libtorch, so it builds in seconds and works with any torch version.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include <cstdint>

#include "denoise_coef.h"
#include "cpu/attention.h"
#include "cpu/decoder.h"
#include "cpu/denoise.h"
#include "cpu/layer_ops.h"
#include "cpu/lora.h"
#include "cpu/linear.h"
#include "cpu/quantized_linear.h"
#include "cpu/sampling.h"

namespace py = pybind11;
using pyserve::cpu::DenoiseArgs;
using pyserve::cpu::DenseAttentionArgs;
using pyserve::cpu::VarlenAttentionArgs;
using pyserve::cpu::LinearArgs;
using pyserve::cpu::PagedAttentionArgs;
using pyserve::cpu::SampleArgs;
using pyserve::cpu::WriteKVArgs;

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// A product's seven table fields: w, scales, bias, n, k, format, int8_activations.
pyserve::cpu::DecoderLinear decoder_linear(const int64_t* f) {
  return {reinterpret_cast<const void*>(f[0]), ptr<const uint16_t>(f[1]), ptr<const float>(f[2]),
          static_cast<int>(f[3]), static_cast<int>(f[4]), static_cast<int>(f[5]), f[6] != 0};
}

// The layers of a decoder stack's address table (kStackLayerFields int64 fields a layer).
std::vector<pyserve::cpu::DecoderLayer> stack_layers(uintptr_t table, int num_layers) {
  const int64_t* f = ptr<const int64_t>(table);
  std::vector<pyserve::cpu::DecoderLayer> layers(num_layers);
  for (int i = 0; i < num_layers; ++i, f += pyserve::cpu::kStackLayerFields)
    layers[i] = {ptr<const float>(f[0]), ptr<const float>(f[1]), decoder_linear(f + 2), decoder_linear(f + 9),
                 decoder_linear(f + 16), decoder_linear(f + 23), ptr<void>(f[30]), ptr<void>(f[31])};
  return layers;
}

PYBIND11_MODULE(_C, m) {
  {
    pybind11::dict coef;  // the denoise coefficient table's columns (denoise_coef.h)
    for (const auto& entry : pyserve::kDenoiseCoefNames) coef[entry.name] = entry.column;
    m.attr("DENOISE_COEF") = coef;
  }
  m.doc() = "pyserve CPU kernels (fp32)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.attr("MAX_HEAD_DIM") = pyserve::cpu::kMaxHeadDim;
  m.attr("MAX_BLOCK_SIZE") = pyserve::cpu::kMaxBlockSize;
  m.attr("MAX_GROUP") = pyserve::cpu::kMaxGroup;
  m.attr("MAX_LINEAR_ROWS") = pyserve::cpu::kMaxLinearRows;
  m.attr("MAX_PACKED_ROWS") = pyserve::cpu::kMaxPackedRows;

  m.def("num_threads", [] { return omp_get_max_threads(); });
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); });

  m.def(
      "paged_attention",
      [](uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_tables, uintptr_t seq_lens,
         uintptr_t query_start, uintptr_t out, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
         int block_size, int max_blocks, float scale, int window, bool bf16_cache) {
        pyserve::cpu::paged_attention(PagedAttentionArgs{
            ptr<const float>(q), ptr<const void>(k_cache), ptr<const void>(v_cache),
            ptr<const int32_t>(block_tables), ptr<const int32_t>(seq_lens), ptr<const int32_t>(query_start),
            ptr<float>(out), num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale, window,
            bf16_cache});
      },
      nogil);

  m.def(
      "dense_attention",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int batch, int num_heads, int num_kv_heads, int q_len,
         int kv_len, int head_dim, float scale, bool causal, std::array<long, 3> q_stride,
         std::array<long, 3> k_stride, std::array<long, 3> v_stride) {
        DenseAttentionArgs args{ptr<const float>(q), ptr<const float>(k), ptr<const float>(v), ptr<float>(out),
                                batch, num_heads, num_kv_heads, q_len, kv_len, head_dim, scale, causal};
        for (int i = 0; i < 3; ++i) {
          args.q_stride[i] = q_stride[i];
          args.k_stride[i] = k_stride[i];
          args.v_stride[i] = v_stride[i];
        }
        pyserve::cpu::dense_attention(args);
      },
      nogil);

  m.def(
      "varlen_attention",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t cu_seqlens, int num_seqs, int num_heads,
         int num_kv_heads, int head_dim, float scale, bool causal) {
        pyserve::cpu::varlen_attention(VarlenAttentionArgs{ptr<const float>(q), ptr<const float>(k),
                                                           ptr<const float>(v), ptr<float>(out),
                                                           ptr<const int32_t>(cu_seqlens), num_seqs, num_heads,
                                                           num_kv_heads, head_dim, scale, causal});
      },
      nogil);

  m.def(
      "write_kv",
      [](uintptr_t k, uintptr_t v, uintptr_t k_cache, uintptr_t v_cache, uintptr_t slots, long num_tokens,
         int num_kv_heads, int block_size, int head_dim, bool bf16_cache) {
        pyserve::cpu::write_kv(WriteKVArgs{ptr<const float>(k), ptr<const float>(v), ptr<void>(k_cache),
                                           ptr<void>(v_cache), ptr<const int64_t>(slots), num_tokens, num_kv_heads,
                                           block_size, head_dim, bf16_cache});
      },
      nogil);

  // Returns why the arguments' values are unusable (nothing is drawn then), or an empty string.
  m.def(
      "sample",
      [](uintptr_t logits, int batch, int vocab, long row_stride, uintptr_t temperature, uintptr_t top_p,
         uintptr_t min_p, uintptr_t repetition, uintptr_t presence, uintptr_t frequency, uintptr_t top_k,
         uintptr_t seed, uintptr_t step, uintptr_t prompt, uintptr_t prompt_off, long prompt_len, uintptr_t output,
         uintptr_t output_off, long output_len, uintptr_t bias_tok, uintptr_t bias_off, uintptr_t bias_val,
         long bias_len, uintptr_t allowed_bits, uintptr_t allowed_row, int masks, int num_logprobs, uintptr_t tokens,
         uintptr_t logprobs, uintptr_t top_tokens, uintptr_t top_logprobs) {
        const SampleArgs args{
            ptr<const float>(logits), batch, vocab, row_stride, ptr<const float>(temperature),
            ptr<const float>(top_p), ptr<const float>(min_p), ptr<const float>(repetition),
            ptr<const float>(presence), ptr<const float>(frequency), ptr<const int32_t>(top_k),
            ptr<const int64_t>(seed), ptr<const int64_t>(step), ptr<const int32_t>(prompt),
            ptr<const int32_t>(prompt_off), ptr<const int32_t>(output), ptr<const int32_t>(output_off),
            ptr<const int32_t>(bias_tok), ptr<const int32_t>(bias_off), ptr<const float>(bias_val),
            ptr<const int32_t>(allowed_bits), ptr<const int32_t>(allowed_row), num_logprobs,
            ptr<int64_t>(tokens), ptr<float>(logprobs), ptr<int64_t>(top_tokens), ptr<float>(top_logprobs)};
        std::string why = pyserve::cpu::check_sample_args(args, {prompt_len, output_len, bias_len, masks});
        if (why.empty()) pyserve::cpu::sample(args);
        return why;
      },
      nogil);

  m.attr("MAX_STACK_ROWS") = pyserve::cpu::kMaxStackRows;
  m.attr("MAX_PACKED_STACK_ROWS") = pyserve::cpu::kMaxPackedStackRows;
  m.attr("STACK_LAYER_FIELDS") = pyserve::cpu::kStackLayerFields;
  // `table` holds kStackLayerFields int64 fields a layer (see cpu/decoder.h).
  m.def(
      "decoder_stack",
      [](uintptr_t x, int tokens, int hidden, int heads, int kv_heads, int head_dim, float eps, uintptr_t cos,
         uintptr_t sin, uintptr_t table, int num_layers, uintptr_t final_norm, uintptr_t slots,
         uintptr_t block_tables, uintptr_t seq_lens, uintptr_t query_start, int num_seqs, int max_blocks,
         int block_size, int window, float scale, bool bf16_cache) {
        const std::vector<pyserve::cpu::DecoderLayer> layers = stack_layers(table, num_layers);
        pyserve::cpu::decoder_stack(pyserve::cpu::DecoderStackArgs{
            ptr<float>(x), tokens, hidden, heads, kv_heads, head_dim, eps, ptr<const float>(cos),
            ptr<const float>(sin), layers.data(), num_layers, ptr<const float>(final_norm),
            ptr<const int64_t>(slots), ptr<const int32_t>(block_tables), ptr<const int32_t>(seq_lens),
            ptr<const int32_t>(query_start), num_seqs, max_blocks, block_size, window, scale, bf16_cache});
      },
      nogil);

  // A decode step (one token a sequence) from host lists: its metadata never becomes tensors.
  // `head` is a product's seven fields as in the table. Returns each row's greedy token.
  m.def(
      "decode_step",
      [](uintptr_t logits, const std::vector<int64_t>& token_ids, const std::vector<int64_t>& positions,
         const std::vector<int64_t>& slots, const std::vector<std::vector<int32_t>>& block_tables,
         uintptr_t embedding, uintptr_t inv_freq, const std::array<int64_t, 7>& head, int hidden, int heads,
         int kv_heads, int head_dim, float eps, uintptr_t table, int num_layers, uintptr_t final_norm,
         int block_size, int window, float scale, bool bf16_cache) {
        const int t = static_cast<int>(token_ids.size());
        int width = 1;
        for (const auto& row : block_tables) width = std::max(width, static_cast<int>(row.size()));
        std::vector<int32_t> tables(static_cast<long>(t) * width, 0), seq_lens(t), query_start(t + 1);
        for (int r = 0; r < t; ++r) {
          std::copy(block_tables[r].begin(), block_tables[r].end(), tables.begin() + static_cast<long>(r) * width);
          seq_lens[r] = static_cast<int32_t>(positions[r] + 1);
          query_start[r + 1] = r + 1;
        }
        const std::vector<pyserve::cpu::DecoderLayer> layers = stack_layers(table, num_layers);
        pyserve::cpu::DecoderStackArgs stack{
            nullptr, t, hidden, heads, kv_heads, head_dim, eps, nullptr, nullptr, layers.data(), num_layers,
            ptr<const float>(final_norm), slots.data(), tables.data(), seq_lens.data(), query_start.data(), t,
            width, block_size, window, scale, bf16_cache};
        std::vector<int64_t> greedy(t);
        pyserve::cpu::decode_step(pyserve::cpu::DecodeStepArgs{stack, ptr<const float>(embedding), token_ids.data(),
                                                               positions.data(), ptr<const float>(inv_freq),
                                                               decoder_linear(head.data()), ptr<float>(logits),
                                                               greedy.data()});
        return greedy;
      },
      nogil);

  m.def(
      "greedy",
      [](uintptr_t logits, int batch, int vocab, long row_stride, uintptr_t tokens) {
        pyserve::cpu::greedy(ptr<const float>(logits), batch, vocab, row_stride, ptr<int64_t>(tokens));
      },
      nogil);

  m.def(
      "lora",
      [](uintptr_t y, uintptr_t x, uintptr_t a, uintptr_t b, uintptr_t index, uintptr_t rank, uintptr_t scale,
         int tokens, int n, int k, int max_rank) {
        pyserve::cpu::lora(pyserve::cpu::LoraArgs{ptr<float>(y), ptr<const float>(x), ptr<const float>(a),
                                                  ptr<const float>(b), ptr<const int32_t>(index),
                                                  ptr<const int32_t>(rank), ptr<const float>(scale), tokens, n, k,
                                                  max_rank});
      },
      nogil);

  m.def(
      "rms_norm",
      [](uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t out, uintptr_t residual_out, int rows, int dim,
         float eps) {
        pyserve::cpu::rms_norm(ptr<const float>(x), ptr<const float>(residual), ptr<const float>(weight),
                               ptr<float>(out), ptr<float>(residual_out), rows, dim, eps);
      },
      nogil);

  m.def(
      "rotary",
      [](uintptr_t x, uintptr_t cos, uintptr_t sin, int rows, long row_stride, int rotated_heads, int head_dim) {
        pyserve::cpu::rotary(ptr<float>(x), ptr<const float>(cos), ptr<const float>(sin), rows, row_stride,
                             rotated_heads, head_dim);
      },
      nogil);

  m.def(
      "silu_mul",
      [](uintptr_t x, uintptr_t out, int rows, int n) {
        pyserve::cpu::silu_mul(ptr<const float>(x), ptr<float>(out), rows, n);
      },
      nogil);

  m.def(
      "linear",
      [](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int m, int n, int k) {
        pyserve::cpu::linear(LinearArgs{ptr<const float>(x), ptr<const float>(w), ptr<const float>(bias),
                                        ptr<float>(out), m, n, k});
      },
      nogil);

  m.def(
      "quantized_linear",
      [](uintptr_t x, uintptr_t w, uintptr_t scales, uintptr_t bias, uintptr_t out, int m, int n, int k, int format,
         bool int8_activations, int isa) {
        pyserve::cpu::quantized_linear(
            pyserve::cpu::QuantizedLinearArgs{ptr<const float>(x), ptr<const void>(w), ptr<const uint16_t>(scales),
                                              ptr<const float>(bias), ptr<float>(out), m, n, k,
                                              static_cast<pyserve::cpu::WeightFormat>(format), int8_activations},
            static_cast<pyserve::cpu::Isa>(isa));
      },
      nogil);
  m.def("best_isa", [] { return static_cast<int>(pyserve::cpu::best_isa()); });
  m.def("set_isa_limit", [](int isa) { pyserve::cpu::set_isa_limit(static_cast<pyserve::cpu::Isa>(isa)); });
  m.def("set_batch_invariant", [](bool on) { pyserve::cpu::set_batch_invariant(on); });

  m.def(
      "denoise_step",
      [](uintptr_t x, uintptr_t cond, uintptr_t uncond, uintptr_t prev_x0, uintptr_t coef, uintptr_t seed,
         uintptr_t step, uintptr_t x_next, uintptr_t x0, int batch, long numel) {
        pyserve::cpu::denoise_step(DenoiseArgs{ptr<const float>(x), ptr<const float>(cond), ptr<const float>(uncond),
                                               ptr<const float>(prev_x0), ptr<const float>(coef),
                                               ptr<const int64_t>(seed), ptr<const int64_t>(step), ptr<float>(x_next),
                                               ptr<float>(x0), batch, numel});
      },
      nogil);
}
