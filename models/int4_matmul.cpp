// y = x @ W.T with W in 4-bit groups, on the CPU with AVX-512 BF16 dot products (models/cpu_int4.py says why).
//
// Layout (pack() in cpu_int4.py): output columns in blocks of 16, inputs in groups of 32. For block b and
// group g: 16 pairs of inputs, each 16 bytes (byte i: column i's two inputs, the first in the low nibble),
// then 16 float16 scales and 16 float16 offsets: w = q * scale + offset, q in 0..15 (GGUF's Q4_1 block:
// d * q + m with d and m in float16, so its weights are held exactly).
//
// For each block and group, the group's integer levels q are widened to bf16 (exact) and dotted with the
// rows' bf16 inputs in float32 (vdpbf16ps: exact products, float32 sums), then scaled:
//   y[m, n] += scale[n, g] * sum_k x[m, k] q[n, k] + offset[n, g] * sum_k x[m, k].
// Rows are taken eight at a time, each row by the same instructions in the same order whatever the tile, and
// the sum over groups runs in order on one thread: a row gets the same bits whatever the number of rows (the
// engine's batch invariance). Threads split the output columns, never the sums.
//
// int8_matmul: the same for GGUF's Q8_0 blocks (w = q * d, q in -128..127, one float16 d per 32 inputs), what
// the tied embedding / lm_head is held in (models/cpu_int4.py, Int8Table): per block of 16 columns and group,
// 16 pairs of inputs, each 32 bytes (column i's two inputs at bytes 2i and 2i+1), then the 16 columns' d.
// An int8 is exact in bf16, so the products are exact as above.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstring>
#include <vector>

namespace {

constexpr int64_t COLUMNS = 16, GROUP = 32, PAIRS = GROUP / 2, TILE = 8;
constexpr int64_t Q_BYTES = PAIRS * 16, BLOCK_BYTES = Q_BYTES + 2 * COLUMNS * 2;
constexpr int64_t Q8_BYTES = PAIRS * 32, Q8_BLOCK_BYTES = Q8_BYTES + COLUMNS * 2;

inline __m512 widen_half(const void* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 widen_int8(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Q8: the block is Q8_0 (int8 levels, a scale); else 4-bit levels with a scale and an offset (`sums`: each
// row's sum of inputs per group, the offsets' term; unused for Q8)
template <bool Q8, int64_t ROWS>
void tile(const uint16_t* x, int64_t k_size, const float* sums, int64_t groups, const uint8_t* block,
          float* y, int64_t n_size) {
  // bf16 of 0..15, twice: vpermw indexes 32 entries
  alignas(64) static const uint16_t LEVELS[32] = {
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130,
      0x4140, 0x4150, 0x4160, 0x4170, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
      0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
  const __m512i levels = _mm512_load_si512(LEVELS);
  const __m512i fields = _mm512_set1_epi32(0x000F000F);
  constexpr int64_t q_bytes = Q8 ? Q8_BYTES : Q_BYTES, block_bytes = Q8 ? Q8_BLOCK_BYTES : BLOCK_BYTES;
  __m512 acc[ROWS];
  for (int64_t m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, block += block_bytes) {
    __m512 dot[ROWS];
    for (int64_t m = 0; m < ROWS; ++m) dot[m] = _mm512_setzero_ps();
    const uint32_t* pairs = reinterpret_cast<const uint32_t*>(x + g * GROUP);
    for (int64_t p = 0; p < PAIRS; ++p) {
      __m512bh w;
      if constexpr (Q8) {
        // words 0-15: columns 0-7's pairs, 16-31: columns 8-15's (vcvtne2ps2bf16 puts its second operand first)
        w = _mm512_cvtne2ps_pbh(widen_int8(block + p * 32 + 16), widen_int8(block + p * 32));
      } else {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + p * 16)));
        // each 32-bit lane: the low nibble in bits 0-3, the high one in bits 16-19: two 16-bit level indices
        const __m512i index = _mm512_ternarylogic_epi32(fields, bytes, _mm512_slli_epi32(bytes, 12), 0xE0);
        w = (__m512bh)_mm512_permutexvar_epi16(index, levels);
      }
      for (int64_t m = 0; m < ROWS; ++m)
        dot[m] = _mm512_dpbf16_ps(dot[m], (__m512bh)_mm512_set1_epi32(pairs[m * k_size / 2 + p]), w);
    }
    const __m512 scale = widen_half(block + q_bytes);
    if constexpr (Q8) {
      for (int64_t m = 0; m < ROWS; ++m) acc[m] = _mm512_fmadd_ps(scale, dot[m], acc[m]);
    } else {
      const __m512 offset = widen_half(block + q_bytes + COLUMNS * 2);
      for (int64_t m = 0; m < ROWS; ++m) {
        acc[m] = _mm512_fmadd_ps(scale, dot[m], acc[m]);
        acc[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[m * groups + g]), acc[m]);
      }
    }
  }
  for (int64_t m = 0; m < ROWS; ++m) _mm512_storeu_ps(y + m * n_size, acc[m]);
}

using TileFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, const uint8_t*, float*, int64_t);
template <bool Q8>
constexpr TileFn TILES[TILE + 1] = {nullptr,          tile<Q8, 1>, tile<Q8, 2>, tile<Q8, 3>, tile<Q8, 4>,
                                    tile<Q8, 5>, tile<Q8, 6>, tile<Q8, 7>, tile<Q8, 8>};

template <bool Q8>
at::Tensor matmul(const at::Tensor& x, const at::Tensor& packed, int64_t n_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: [rows, in] bfloat16");
  const int64_t rows = x.size(0), k_size = x.size(1), groups = k_size / GROUP, blocks = n_size / COLUMNS;
  const int64_t block_bytes = Q8 ? Q8_BLOCK_BYTES : BLOCK_BYTES;
  TORCH_CHECK(k_size % GROUP == 0 && n_size % COLUMNS == 0, "in: a multiple of 32, out: of 16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.numel() == blocks * groups * block_bytes,
              Q8 ? "packed: the layout pack_int8() makes for this shape" : "packed: the layout pack() makes for this shape");
  auto y = at::empty({rows, n_size}, x.options().dtype(at::kFloat));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  // each row's sum of inputs per group (the offsets' term), in order; Q8_0 has no offsets
  std::vector<float> sums(Q8 ? 0 : rows * groups);
  for (int64_t m = 0; !Q8 && m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0;
      for (int64_t k = 0; k < GROUP; ++k) {
        const uint32_t bits = static_cast<uint32_t>(xp[m * k_size + g * GROUP + k]) << 16;
        float v;
        std::memcpy(&v, &bits, sizeof(v));
        s += v;
      }
      sums[m * groups + g] = s;
    }
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m = 0; m < rows; m += TILE) {
        const int64_t count = rows - m < TILE ? rows - m : TILE;
        TILES<Q8>[count](xp + m * k_size, k_size, Q8 ? nullptr : sums.data() + m * groups, groups,
                         wp + b * groups * block_bytes, yp + m * n_size + b * COLUMNS, n_size);
      }
    }
  });
  return y;
}

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t n_size) {
  return matmul<false>(x, packed, n_size);
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t n_size) {
  return matmul<true>(x, packed, n_size);
}

}  // namespace

TORCH_LIBRARY(loraplex_int4, m) {
  m.def("int4_matmul(Tensor x, Tensor packed, int n) -> Tensor");
  m.impl("int4_matmul", c10::DispatchKey::CPU, TORCH_FN(int4_matmul));
  m.def("int8_matmul(Tensor x, Tensor packed, int n) -> Tensor");
  m.impl("int8_matmul", c10::DispatchKey::CPU, TORCH_FN(int8_matmul));
}
