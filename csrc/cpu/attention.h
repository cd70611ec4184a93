// CPU attention kernels (fp32 arithmetic, contiguous inputs checked by the Python facade). The
// paged KV cache holds fp32 or bf16 values: bf16 halves the bytes long-context decode reads.
#pragma once
#include <cstdint>

namespace pyserve::cpu {

// Limits of the CPU kernels' fixed-size scratch; the facade checks them.
constexpr int kMaxHeadDim = 256;
constexpr int kMaxBlockSize = 64;
constexpr int kMaxGroup = 64;

struct PagedAttentionArgs {
  const float* q;            // [T, H, D]
  const void* k_cache;       // [num_blocks, Hkv, block_size, D], fp32 or bf16
  const void* v_cache;
  const int32_t* block_tables;  // [S, max_blocks]
  const int32_t* seq_lens;      // [S]
  const int32_t* query_start;   // [S + 1]
  float* out;                // [T, H, D]
  int num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  float scale;
  int window;  // 0 = no sliding window
  bool bf16_cache = false;
};

struct DenseAttentionArgs {
  const float* q;  // [B, H, Lq, D], any strides but a unit one for D
  const float* k;  // [B, Hkv, Lk, D], likewise
  const float* v;
  float* out;      // [B, H, Lq, D], contiguous
  int batch, num_heads, num_kv_heads, q_len, kv_len, head_dim;
  float scale;
  bool causal;
  long q_stride[3], k_stride[3], v_stride[3];  // element strides of (batch, head, position)
};

// Self-attention of sequences packed one after another (no padding): sequence s holds the tokens
// cu_seqlens[s] .. cu_seqlens[s + 1] - 1, and attends within itself only (causal or not).
struct VarlenAttentionArgs {
  const float* q;  // [T, H, D], contiguous
  const float* k;  // [T, Hkv, D], contiguous
  const float* v;
  float* out;      // [T, H, D], contiguous
  const int32_t* cu_seqlens;  // [S + 1], from 0 to T
  int num_seqs, num_heads, num_kv_heads, head_dim;
  float scale;
  bool causal;
};

struct WriteKVArgs {
  const float* k;  // [T, Hkv, D]
  const float* v;
  void* k_cache;  // [num_blocks, Hkv, block_size, D], fp32 or bf16 (rounded to nearest even)
  void* v_cache;
  const int64_t* slots;  // [T], -1 skips
  long num_tokens;
  int num_kv_heads, block_size, head_dim;
  bool bf16_cache = false;
};

// Batch invariance (off by default; the Python facade sets it with PYSERVE_BATCH_INVARIANT): every
// query row's scores are made the same way whatever rows share its work item, key tiles start at
// the sequence's first block whatever the chunk, and long decodes are not split over threads, so
// a token's attention does not depend on how its step was batched or its prompt chunked.
void set_batch_invariant(bool on);
bool batch_invariant();

void paged_attention(const PagedAttentionArgs& args);
void dense_attention(const DenseAttentionArgs& args);
void varlen_attention(const VarlenAttentionArgs& args);
void write_kv(const WriteKVArgs& args);

}  // namespace pyserve::cpu
