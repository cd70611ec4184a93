// CUDA attention: paged (mixed prefill/decode, split-KV with a merge for long contexts), KV writes
// by slot, and dense attention. Each thread block owns one (query token, head); its four warps
// take keys in turn with an online softmax each, then combine in shared memory.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace pyserve::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // head_dim <= 256, a multiple of 32

template <typename T>
__global__ void write_kv_kernel(const T* k, const T* v, T* k_cache, T* v_cache, const int64_t* slots,
                                int num_kv_heads, int block_size, int head_dim) {
  const long i = blockIdx.x;
  const long slot = slots[i];
  if (slot < 0) return;
  const long row = static_cast<long>(num_kv_heads) * head_dim;
  const long block = slot / block_size, offset = slot % block_size;
  for (int c = threadIdx.x; c < row; c += blockDim.x) {
    const long dst = ((block * num_kv_heads + c / head_dim) * block_size + offset) * head_dim + c % head_dim;
    k_cache[dst] = k[i * row + c];
    v_cache[dst] = v[i * row + c];
  }
}

// Online softmax of one query against keys [lo, hi); key_offset(j) locates key/value j.
// Leaves the block's combined (max, sum, unnormalised output) in shared memory.
template <typename T, typename KeyOffset>
__device__ void attend(const T* q, const T* k, const T* v, int lo, int hi, int head_dim, float scale,
                       KeyOffset key_offset, float* sm_m, float* sm_l, float* sm_o) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, per_lane = head_dim / 32;
  float qr[kMaxPerLane], acc[kMaxPerLane];
  for (int i = 0; i < per_lane; ++i) {
    qr[i] = to_float(q[lane + 32 * i]);
    acc[i] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int j = lo + warp; j < hi; j += kWarps) {
    const long off = key_offset(j);
    float s = 0.0f;
    for (int i = 0; i < per_lane; ++i) s += qr[i] * to_float(k[off + lane + 32 * i]);
    s = warp_sum(s) * scale;
    const float m_new = fmaxf(m, s);
    const float alpha = __expf(m - m_new), p = __expf(s - m_new);
    l = l * alpha + p;
    for (int i = 0; i < per_lane; ++i) acc[i] = acc[i] * alpha + p * to_float(v[off + lane + 32 * i]);
    m = m_new;
  }
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
  __syncthreads();
  float m_all = -INFINITY;
  for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, sm_m[w]);
  const float f = m == -INFINITY ? 0.0f : __expf(m - m_all);
  for (int i = 0; i < per_lane; ++i) sm_o[warp * head_dim + lane + 32 * i] = acc[i] * f;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += sm_m[w] == -INFINITY ? 0.0f : sm_l[w] * __expf(sm_m[w] - m_all);
    sm_m[kWarps] = m_all;
    sm_l[kWarps] = total;
  }
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w) o += sm_o[w * head_dim + c];
    sm_o[c] = o;  // warp 0's row is only read by this thread before being overwritten
  }
  __syncthreads();
}

template <typename T>
__global__ void paged_kernel(const T* q, const T* k_cache, const T* v_cache, const int* block_tables,
                             const int* seq_lens, const int* query_start, T* out, float* part_o, float* part_ml,
                             int num_tokens, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                             int block_size, int max_blocks, float scale, int window, int split_keys) {
  extern __shared__ float smem[];
  const int tok = blockIdx.x, head = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  int lo_s = 0, hi_s = num_seqs - 1;  // the sequence owning this token: last s with start <= tok
  while (lo_s < hi_s) {
    int mid = (lo_s + hi_s + 1) / 2;
    if (query_start[mid] <= tok) lo_s = mid; else hi_s = mid - 1;
  }
  const int seq = lo_s, ctx = seq_lens[seq];
  const int pos = ctx - (query_start[seq + 1] - query_start[seq]) + (tok - query_start[seq]);
  int lo = window > 0 ? max(0, pos - window + 1) : 0, hi = pos + 1;
  if (splits > 1) {
    lo = max(lo, split * split_keys);
    hi = min(hi, (split + 1) * split_keys);
  }
  const int kv_head = head / (num_heads / num_kv_heads);
  const int* table = block_tables + static_cast<long>(seq) * max_blocks;
  auto key_offset = [=](int j) {
    return ((static_cast<long>(table[j / block_size]) * num_kv_heads + kv_head) * block_size + j % block_size) *
           head_dim;
  };
  float *sm_m = smem, *sm_l = smem + kWarps + 1, *sm_o = smem + 2 * (kWarps + 1);
  attend(q + (static_cast<long>(tok) * num_heads + head) * head_dim, k_cache, v_cache, lo, hi, head_dim, scale,
         key_offset, sm_m, sm_l, sm_o);
  const float total = sm_l[kWarps];
  if (splits == 1) {
    T* o = out + (static_cast<long>(tok) * num_heads + head) * head_dim;
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) o[c] = from_float<T>(sm_o[c] * inv);
  } else {
    const long p = (static_cast<long>(split) * num_tokens + tok) * num_heads + head;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) part_o[p * head_dim + c] = sm_o[c];
    if (threadIdx.x == 0) {
      part_ml[2 * p] = sm_m[kWarps];
      part_ml[2 * p + 1] = total;
    }
  }
}

template <typename T>
__global__ void merge_kernel(const float* part_o, const float* part_ml, T* out, int num_tokens, int num_heads,
                             int head_dim, int splits) {
  const int tok = blockIdx.x, head = blockIdx.y;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part_ml[2 * ((static_cast<long>(s) * num_tokens + tok) * num_heads + head)]);
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
    float o = 0.0f, total = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const long p = (static_cast<long>(s) * num_tokens + tok) * num_heads + head;
      if (part_ml[2 * p + 1] == 0.0f) continue;
      const float f = __expf(part_ml[2 * p] - m);
      total += part_ml[2 * p + 1] * f;
      o += part_o[p * head_dim + c] * f;
    }
    out[(static_cast<long>(tok) * num_heads + head) * head_dim + c] = from_float<T>(total > 0.0f ? o / total : 0.0f);
  }
}

template <typename T>
__global__ void dense_kernel(const T* q, const T* k, const T* v, T* out, int num_heads, int num_kv_heads, int q_len,
                             int kv_len, int head_dim, float scale, bool causal) {
  extern __shared__ float smem[];
  // One grid axis (up to 2^31 - 1 blocks) for (batch x head, query row): q_len may exceed 65,535.
  const int bh = static_cast<int>(blockIdx.x / q_len), row = static_cast<int>(blockIdx.x % q_len);
  const int b = bh / num_heads, head = bh % num_heads;
  const long kv_base = (static_cast<long>(b) * num_kv_heads + head / (num_heads / num_kv_heads)) * kv_len * head_dim;
  const int hi = causal ? min(kv_len, kv_len - q_len + row + 1) : kv_len;
  auto key_offset = [=](int j) { return kv_base + static_cast<long>(j) * head_dim; };
  float *sm_m = smem, *sm_l = smem + kWarps + 1, *sm_o = smem + 2 * (kWarps + 1);
  const long q_off = (static_cast<long>(bh) * q_len + row) * head_dim;
  attend(q + q_off, k, v, 0, hi, head_dim, scale, key_offset, sm_m, sm_l, sm_o);
  const float inv = sm_l[kWarps] > 0.0f ? 1.0f / sm_l[kWarps] : 0.0f;
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) out[q_off + c] = from_float<T>(sm_o[c] * inv);
}

// Packed sequences without padding: one block per (token, head); the token's sequence is found by
// binary search in cu_seqlens, and it attends to its sequence's keys (up to itself when causal).
template <typename T>
__global__ void varlen_kernel(const T* q, const T* k, const T* v, T* out, const int* cu_seqlens, int num_seqs,
                              int num_heads, int num_kv_heads, int head_dim, float scale, bool causal) {
  extern __shared__ float smem[];
  const int tok = blockIdx.x, head = blockIdx.y;
  int lo = 0, hi_seq = num_seqs;  // the last s with cu_seqlens[s] <= tok
  while (hi_seq - lo > 1) {
    const int mid = (lo + hi_seq) / 2;
    if (cu_seqlens[mid] <= tok) lo = mid; else hi_seq = mid;
  }
  const int start = cu_seqlens[lo], end = cu_seqlens[lo + 1];
  const int kv_head = head / (num_heads / num_kv_heads);
  const int keys = causal ? tok - start + 1 : end - start;
  auto key_offset = [=](int j) { return ((static_cast<long>(start) + j) * num_kv_heads + kv_head) * head_dim; };
  float *sm_m = smem, *sm_l = smem + kWarps + 1, *sm_o = smem + 2 * (kWarps + 1);
  const long q_off = (static_cast<long>(tok) * num_heads + head) * head_dim;
  attend(q + q_off, k, v, 0, keys, head_dim, scale, key_offset, sm_m, sm_l, sm_o);
  const float inv = sm_l[kWarps] > 0.0f ? 1.0f / sm_l[kWarps] : 0.0f;
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) out[q_off + c] = from_float<T>(sm_o[c] * inv);
}

size_t smem_bytes(int head_dim) { return sizeof(float) * (2 * (kWarps + 1) + kWarps * head_dim); }

}  // namespace

void write_kv(int dtype, uintptr_t k, uintptr_t v, uintptr_t k_cache, uintptr_t v_cache, uintptr_t slots,
              long num_tokens, int num_kv_heads, int block_size, int head_dim, uintptr_t stream) {
  if (num_tokens == 0) return;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    write_kv_kernel<T><<<num_tokens, 128, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v), reinterpret_cast<T*>(k_cache),
        reinterpret_cast<T*>(v_cache), reinterpret_cast<const int64_t*>(slots), num_kv_heads, block_size, head_dim);
  });
  check(cudaGetLastError(), "write_kv");
}

void paged_attention(int dtype, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_tables,
                     uintptr_t seq_lens, uintptr_t query_start, uintptr_t out, uintptr_t scratch, int num_tokens,
                     int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks,
                     float scale, int window, int num_splits, int split_keys, uintptr_t stream) {
  if (num_tokens == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  float* part_o = reinterpret_cast<float*>(scratch);
  float* part_ml = part_o + static_cast<long>(num_splits) * num_tokens * num_heads * head_dim;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dim3 grid(num_tokens, num_heads, num_splits);
    paged_kernel<T><<<grid, 32 * kWarps, smem_bytes(head_dim), s>>>(
        reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k_cache), reinterpret_cast<const T*>(v_cache),
        reinterpret_cast<const int*>(block_tables), reinterpret_cast<const int*>(seq_lens),
        reinterpret_cast<const int*>(query_start), reinterpret_cast<T*>(out), part_o, part_ml, num_tokens, num_seqs,
        num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale, window, split_keys);
    if (num_splits > 1)
      merge_kernel<T><<<dim3(num_tokens, num_heads), 128, 0, s>>>(part_o, part_ml, reinterpret_cast<T*>(out),
                                                                   num_tokens, num_heads, head_dim, num_splits);
  });
  check(cudaGetLastError(), "paged_attention");
}

void dense_attention(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int batch, int num_heads,
                     int num_kv_heads, int q_len, int kv_len, int head_dim, float scale, bool causal,
                     uintptr_t stream) {
  if (batch == 0 || q_len == 0) return;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dense_kernel<T><<<static_cast<unsigned>(static_cast<long>(batch) * num_heads * q_len), 32 * kWarps,
                      smem_bytes(head_dim),
                      reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v),
        reinterpret_cast<T*>(out), num_heads, num_kv_heads, q_len, kv_len, head_dim, scale, causal);
  });
  check(cudaGetLastError(), "dense_attention");
}

void varlen_attention(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t cu_seqlens,
                      int num_tokens, int num_seqs, int num_heads, int num_kv_heads, int head_dim, float scale,
                      bool causal, uintptr_t stream) {
  if (num_tokens == 0 || num_seqs == 0) return;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    varlen_kernel<T><<<dim3(num_tokens, num_heads), 32 * kWarps, smem_bytes(head_dim),
                       reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v),
        reinterpret_cast<T*>(out), reinterpret_cast<const int*>(cu_seqlens), num_seqs, num_heads, num_kv_heads,
        head_dim, scale, causal);
  });
  check(cudaGetLastError(), "varlen_attention");
}

}  // namespace pyserve::cuda
