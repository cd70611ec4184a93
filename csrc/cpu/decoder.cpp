// See decoder.h. Scratch lives in this call's vectors: at decode sizes it is a few hundred KB.
#include "cpu/decoder.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/attention.h"
#include "cpu/layer_ops.h"
#include "cpu/linear.h"
#include "cpu/quantized_linear.h"
#include "cpu/sampling.h"

namespace pyserve::cpu {
namespace {

void product(const DecoderLinear& l, const float* x, float* out, int rows) {
  if (l.format == 0) {
    linear(LinearArgs{x, static_cast<const float*>(l.w), l.bias, out, rows, l.n, l.k});
  } else {
    quantized_linear(QuantizedLinearArgs{x, l.w, l.scales, l.bias, out, rows, l.n, l.k,
                                         static_cast<WeightFormat>(l.format), l.int8_activations},
                     Isa::kAuto);
  }
}

// Columns [first, first + width) of each row of src [rows, stride] into dst [rows, width].
void gather_columns(const float* src, long stride, long first, long width, float* dst, int rows) {
  for (int r = 0; r < rows; ++r) std::memcpy(dst + r * width, src + r * stride + first, sizeof(float) * width);
}

}  // namespace

void decoder_stack(const DecoderStackArgs& a) {
  const int t = a.tokens, hidden = a.hidden, d = a.head_dim;
  const long q_width = static_cast<long>(a.heads) * d, kv_width = static_cast<long>(a.kv_heads) * d;
  const long qkv_width = q_width + 2 * kv_width;
  std::vector<float> normed(static_cast<long>(t) * hidden), residual(static_cast<long>(t) * hidden);
  std::vector<float> qkv(t * qkv_width), q(t * q_width), k(t * kv_width), v(t * kv_width), attn(t * q_width);
  std::vector<float> gate_up, act;
  for (int i = 0; i < a.num_layers; ++i) {
    const DecoderLayer& layer = a.layers[i];
    // The residual stream: the embeddings at the first layer, else the running sum.
    rms_norm(a.x, i == 0 ? nullptr : residual.data(), layer.input_norm, normed.data(), residual.data(), t, hidden,
             a.eps);
    product(layer.qkv, normed.data(), qkv.data(), t);
    rotary(qkv.data(), a.cos, a.sin, t, qkv_width, a.heads + a.kv_heads, d);
    gather_columns(qkv.data(), qkv_width, 0, q_width, q.data(), t);
    gather_columns(qkv.data(), qkv_width, q_width, kv_width, k.data(), t);
    gather_columns(qkv.data(), qkv_width, q_width + kv_width, kv_width, v.data(), t);
    write_kv(WriteKVArgs{k.data(), v.data(), layer.k_cache, layer.v_cache, a.slots, t, a.kv_heads, a.block_size, d,
                         a.bf16_cache});
    paged_attention(PagedAttentionArgs{q.data(), layer.k_cache, layer.v_cache, a.block_tables, a.seq_lens,
                                       a.query_start, attn.data(), a.num_seqs, a.heads, a.kv_heads, d, a.block_size,
                                       a.max_blocks, a.scale, a.window, a.bf16_cache});
    product(layer.o, attn.data(), a.x, t);
    rms_norm(a.x, residual.data(), layer.post_norm, normed.data(), residual.data(), t, hidden, a.eps);
    const int inter = layer.gate_up.n / 2;
    gate_up.resize(static_cast<long>(t) * 2 * inter);
    act.resize(static_cast<long>(t) * inter);
    product(layer.gate_up, normed.data(), gate_up.data(), t);
    silu_mul(gate_up.data(), act.data(), t, inter);
    product(layer.down, act.data(), a.x, t);
  }
  rms_norm(a.x, a.num_layers ? residual.data() : nullptr, a.final_norm, normed.data(), nullptr, t, hidden, a.eps);
  std::memcpy(a.x, normed.data(), sizeof(float) * t * hidden);
}

void decode_step(DecodeStepArgs a) {
  const int t = a.stack.tokens, hidden = a.stack.hidden, half = a.stack.head_dim / 2;
  std::vector<float> x(static_cast<long>(t) * hidden), cos(t * half), sin(t * half);
  for (int r = 0; r < t; ++r) {
    std::memcpy(x.data() + static_cast<long>(r) * hidden, a.embedding + a.token_ids[r] * hidden,
                sizeof(float) * hidden);
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(a.positions[r]) * a.inv_freq[i];
      cos[r * half + i] = std::cos(angle);
      sin[r * half + i] = std::sin(angle);
    }
  }
  a.stack.x = x.data();
  a.stack.cos = cos.data();
  a.stack.sin = sin.data();
  decoder_stack(a.stack);
  product(a.head, x.data(), a.logits, t);
  greedy(a.logits, t, a.head.n, a.head.n, a.greedy);
}

}  // namespace pyserve::cpu
