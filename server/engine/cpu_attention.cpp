// Decode attention read in place from the paged KV cache, on the CPU (server/engine/cpu_attention.py says why).
//
// One (row, kv head) at a time: the group of query heads sharing that kv head against the row's first
// `length` keys, read block by block from the cache where they lie (no gathered copy, no padding), scores
// and softmax in float32. Every sum runs in a fixed order that depends only on the row's own length, so a
// row gets the same bits whatever else is in the batch (the engine's batch invariance).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include <immintrin.h>

namespace {

constexpr int64_t MAX_GROUP = 8;    // query heads per kv head (Llama 3 70B: 8)
constexpr int64_t MAX_CHUNKS = 16;  // head_dim / 16 (head_dim up to 256)

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// exp(x) for x <= 0 (scores minus their maximum): Cephes' expf polynomial (about 1 ulp); below -87 it gives
// 2^-126-ish instead of 0. NaN stays NaN (max_ps returns its second operand when either is NaN).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// fn(t, the row's vector at position t widened to float32) for t < length, block by block (no division per
// position: a 64-bit divide costs more than a position's dot products)
template <typename T, typename Fn>
inline void for_each_position(const T* cache, const int64_t* table, int64_t length, int64_t block_size,
                              int64_t token_stride, int64_t chunks, Fn fn) {
  __m512 vector[MAX_CHUNKS];
  for (int64_t t = 0, block = 0; t < length; ++block) {
    const T* row = cache + table[block] * block_size * token_stride;
    for (int64_t offset = 0; offset < block_size && t < length; ++offset, ++t, row += token_stride) {
      for (int64_t c = 0; c < chunks; ++c) vector[c] = load16(row + c * 16);
      fn(t, vector);
    }
  }
}

template <typename T>
void attend_head(const float* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t length,
                 int64_t block_size, int64_t token_stride, int64_t group, int64_t dim, float scale, float* out,
                 std::vector<float>& scores) {
  const int64_t chunks = dim / 16, padded = (length + 15) / 16 * 16;
  scores.resize(group * padded);
  __m512 queries[MAX_GROUP][MAX_CHUNKS];
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < chunks; ++c) queries[g][c] = _mm512_loadu_ps(q + g * dim + c * 16);
  for_each_position(k_cache, table, length, block_size, token_stride, chunks, [&](int64_t t, const __m512* k) {
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_mul_ps(queries[g][0], k[0]);
      for (int64_t c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(queries[g][c], k[c], acc);
      scores[g * padded + t] = _mm512_reduce_add_ps(acc) * scale;
    }
  });
  // softmax numerators in place; positions past `length` are exactly 0
  float inverse[MAX_GROUP];
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * padded;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < padded; t += 16) {
      const __mmask16 live = length - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (length - t)) - 1);
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, s + t));
    }
    const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < padded; t += 16) {
      const __mmask16 live = length - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (length - t)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), peak)));
      _mm512_storeu_ps(s + t, e);
      total = _mm512_add_ps(total, e);
    }
    inverse[g] = 1.0f / _mm512_reduce_add_ps(total);
  }
  __m512 acc[MAX_GROUP][MAX_CHUNKS];
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < chunks; ++c) acc[g][c] = _mm512_setzero_ps();
  for_each_position(v_cache, table, length, block_size, token_stride, chunks, [&](int64_t t, const __m512* v) {
    for (int64_t g = 0; g < group; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * padded + t]);
      for (int64_t c = 0; c < chunks; ++c) acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
    }
  });
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < chunks; ++c)
      _mm512_storeu_ps(out + g * dim + c * 16, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inverse[g])));
}


template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
         const at::Tensor& lengths, double scale, at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads, width = tables.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / kv_heads, head = item % kv_heads;
      const int64_t offset = (row * heads + head * group) * dim;
      attend_head<T>(qp + offset, kp + head * dim, vp + head * dim, tp + row * width, lp[row], block_size,
                     kv_heads * dim, group, dim, static_cast<float>(scale), op + offset, scores);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& tables, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: [rows, heads, dim] float32");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "caches: [blocks, block_size, kv_heads, dim], the same shape and dtype, contiguous");
  const int64_t dim = q.size(2), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && dim % 16 == 0 && dim / 16 <= MAX_CHUNKS, "head_dim: a multiple of 16, <= 256");
  TORCH_CHECK(q.size(1) % kv_heads == 0 && q.size(1) / kv_heads <= MAX_GROUP, "heads: a multiple of kv_heads, <= 8x");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && tables.scalar_type() == at::kLong &&
              tables.is_contiguous(), "tables: [rows, width] int64");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0) && lengths.scalar_type() == at::kLong &&
              lengths.is_contiguous(), "lengths: [rows] int64");
  auto out = at::empty_like(q);
  switch (k_cache.scalar_type()) {
    case at::kBFloat16: run<at::BFloat16>(q, k_cache, v_cache, tables, lengths, scale, out); break;
    case at::kHalf: run<at::Half>(q, k_cache, v_cache, tables, lengths, scale, out); break;
    case at::kFloat: run<float>(q, k_cache, v_cache, tables, lengths, scale, out); break;
    default: TORCH_CHECK(false, "caches: bfloat16, float16 or float32");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(loraplex, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lengths, float scale) -> Tensor");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
}
