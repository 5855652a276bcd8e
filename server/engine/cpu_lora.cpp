// A step's LoRA deltas from the step stack (held in bfloat16), on the CPU (server/engine/cpu_lora.py says why).
//
// For each row, for each (stack position, weight) it asks for, in its own order:
//   h = x[row] @ A[position]            (every module of the group at once: A is [in, positions, modules, a_rank])
//   y_j[row] += (weight * h_j) @ B_j[position]   for each module j the step has weights for
// Rows with one adapter come in items of up to four rows on the same position, which share every load of A and
// B (the adapters are read once per item, not once per row). Each row's sums run in the same fixed order
// whatever item it is in (h over the inputs in two interleaved partial sums, y over the ranks in order), so a
// row gets the same bits whatever shares the step; rows with several adapters (mixtures) are taken one by
// one, their adapters in the row's own order. Threads split the items.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <vector>

namespace {

constexpr int64_t MAX_HIDDEN = 1024;  // modules * a_rank of one group
constexpr int ITEM_ROWS = 4;

using bf16 = uint16_t;  // the step stack's A and B, in bfloat16 (cpu_lora.py says why)

// 16 bf16 (masked) widened to float32: exact
inline __m512 load16(__mmask16 m, const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline __mmask16 tail(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

template <int R, int U>
inline void step(const float* const* x, int64_t k, const bf16* column, __mmask16 m0, __mmask16 m1,
                 __m512 (&acc)[R][2][2]) {
  const __m512 lo = load16(m0, column);
  const __m512 hi = load16(m1, column + 16);
  for (int r = 0; r < R; ++r) {
    const __m512 xk = _mm512_set1_ps(x[r][k]);
    acc[r][U][0] = _mm512_fmadd_ps(xk, lo, acc[r][U][0]);
    if (m1) acc[r][U][1] = _mm512_fmadd_ps(xk, hi, acc[r][U][1]);
  }
}

// hidden[r][0:size] = x[r] @ A for R rows (A's rows `a_stride` apart), 32 columns at a time in registers; each
// row's inputs summed in two interleaved partial sums (even and odd k, each in order, then added)
template <int R>
inline void shrink(const float* const* x, int64_t in, const bf16* a, int64_t a_stride, int64_t size,
                   float* const* hidden) {
  for (int64_t c0 = 0; c0 < size; c0 += 32) {
    const __mmask16 m0 = tail(size - c0), m1 = tail(size - c0 - 16);
    __m512 acc[R][2][2];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 2; ++u) acc[r][u][0] = acc[r][u][1] = _mm512_setzero_ps();
    const bf16* column = a + c0;
    int64_t k = 0;
    for (; k + 2 <= in; k += 2, column += 2 * a_stride) {
      step<R, 0>(x, k, column, m0, m1, acc);
      step<R, 1>(x, k + 1, column + a_stride, m0, m1, acc);
    }
    if (k < in) step<R, 0>(x, k, column, m0, m1, acc);
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(hidden[r] + c0, m0, _mm512_add_ps(acc[r][0][0], acc[r][1][0]));
      if (m1) _mm512_mask_storeu_ps(hidden[r] + c0 + 16, m1, _mm512_add_ps(acc[r][0][1], acc[r][1][1]));
    }
  }
}

// y[r][0:out] += (weight[r] * h[r][0:rank]) @ B ([rank, out]) for R rows: each output adds its ranks in order
template <int R>
inline void expand(const float* const* h, const float* weight, int64_t rank, const bf16* b, int64_t out,
                   float* const* y) {
  alignas(64) float scaled[R][MAX_HIDDEN];
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < rank; ++i) scaled[r][i] = weight[r] * h[r][i];
  for (int64_t n = 0; n < out; n += 16) {
    const __mmask16 m = tail(out - n);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_maskz_loadu_ps(m, y[r] + n);
    for (int64_t i = 0; i < rank; ++i) {
      const __m512 column = load16(m, b + i * out + n);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(scaled[r][i]), column, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y[r] + n, m, acc[r]);
  }
}

struct Group {
  const float* x;
  int64_t x_stride, in;
  const bf16* a;
  int64_t a_stride, modules, a_rank, size, rank;
  std::vector<const bf16*> b;  // per module, at position 0; nullptr: no weights
  std::vector<int64_t> b_position_stride, out;
  std::vector<float*> y;
  std::vector<int64_t> y_stride;
};

// R rows on one position: shrink once, then every module's expand
template <int R>
void run_rows(const Group& g, const int64_t* rows, int64_t position, const float* weights) {
  alignas(64) float hidden[R][MAX_HIDDEN];
  const float* x[R];
  float* h[R];
  for (int r = 0; r < R; ++r) {
    x[r] = g.x + rows[r] * g.x_stride;
    h[r] = hidden[r];
  }
  shrink<R>(x, g.in, g.a + position * g.modules * g.a_rank, g.a_stride, g.size, h);
  for (int64_t j = 0; j < g.modules; ++j) {
    if (g.b[j] == nullptr) continue;
    const float* hj[R];
    float* y[R];
    for (int r = 0; r < R; ++r) {
      hj[r] = hidden[r] + j * g.a_rank;
      y[r] = g.y[j] + rows[r] * g.y_stride[j];
    }
    expand<R>(hj, weights, g.rank, g.b[j] + position * g.b_position_stride[j], g.out[j], y);
  }
}

using RunFn = void (*)(const Group&, const int64_t*, int64_t, const float*);
constexpr RunFn RUNS[ITEM_ROWS + 1] = {nullptr, run_rows<1>, run_rows<2>, run_rows<3>, run_rows<4>};

// items: [n, ITEM_ROWS + 1] (position, then up to four rows, -1 after the last) with item_weights [n, ITEM_ROWS];
// mixture rows: starts [m + 1] into positions / weights, one row each in mixture_rows [m]
void lora_rows(const at::Tensor& x, const at::Tensor& a, const std::vector<std::optional<at::Tensor>>& bs,
               const std::vector<at::Tensor>& ys, const at::Tensor& items, const at::Tensor& item_weights,
               const at::Tensor& mixture_rows, const at::Tensor& starts, const at::Tensor& positions,
               const at::Tensor& weights, int64_t rank) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "x: [rows, in] float32");
  TORCH_CHECK(a.dim() == 4 && a.scalar_type() == at::kBFloat16 && a.stride(3) == 1 && a.stride(2) == a.size(3) &&
              a.stride(1) == a.size(2) * a.size(3) && a.size(0) == x.size(1), "a: [in, positions, modules, a_rank] bfloat16");
  Group g;
  g.x = x.data_ptr<float>();
  g.x_stride = x.stride(0);
  g.in = x.size(1);
  g.a = reinterpret_cast<const bf16*>(a.data_ptr<at::BFloat16>());
  g.a_stride = a.stride(0);
  g.modules = a.size(2);
  g.a_rank = a.size(3);
  g.rank = rank;
  // one module: only the columns its rank uses (A is at least 16 wide); several: every module's block
  g.size = g.modules == 1 ? rank : g.modules * g.a_rank;
  TORCH_CHECK(g.modules * g.a_rank <= MAX_HIDDEN && rank <= g.a_rank, "modules * a_rank <= 1024, rank <= a_rank");
  TORCH_CHECK(static_cast<int64_t>(bs.size()) == g.modules && static_cast<int64_t>(ys.size()) == g.modules,
              "one B and one output per module");
  for (int64_t j = 0; j < g.modules; ++j) {
    const at::Tensor& y = ys[j];
    TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.stride(1) == 1 && y.scalar_type() == at::kFloat,
                "outputs: [rows, out] float32");
    g.y.push_back(y.data_ptr<float>());
    g.y_stride.push_back(y.stride(0));
    g.out.push_back(y.size(1));
    if (bs[j].has_value()) {
      const at::Tensor& b = *bs[j];
      TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && b.scalar_type() == at::kBFloat16 && b.size(0) == a.size(1) &&
                  b.size(1) >= rank && b.size(2) == y.size(1), "B: [positions, rank, out] bfloat16");
      g.b.push_back(reinterpret_cast<const bf16*>(b.data_ptr<at::BFloat16>()));
      g.b_position_stride.push_back(b.size(1) * b.size(2));
    } else {
      g.b.push_back(nullptr);
      g.b_position_stride.push_back(0);
    }
  }
  TORCH_CHECK(items.scalar_type() == at::kLong && items.dim() == 2 && items.size(1) == ITEM_ROWS + 1 &&
              items.is_contiguous() && item_weights.scalar_type() == at::kFloat && item_weights.is_contiguous() &&
              item_weights.numel() == items.size(0) * ITEM_ROWS, "items: [n, 5] int64, item_weights: [n, 4]");
  TORCH_CHECK(mixture_rows.scalar_type() == at::kLong && starts.scalar_type() == at::kLong &&
              starts.numel() == mixture_rows.numel() + 1 && positions.scalar_type() == at::kLong &&
              weights.scalar_type() == at::kFloat && positions.numel() == weights.numel(),
              "mixture_rows, starts, positions, weights");
  const int64_t* ip = items.data_ptr<int64_t>();
  const float* iw = item_weights.data_ptr<float>();
  const int64_t* mr = mixture_rows.data_ptr<int64_t>();
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  const int64_t n_items = items.size(0), n_mixtures = mixture_rows.numel();
  at::parallel_for(0, n_items + n_mixtures, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t < n_items) {
        const int64_t* item = ip + t * (ITEM_ROWS + 1);
        int count = 0;
        while (count < ITEM_ROWS && item[1 + count] >= 0) ++count;
        if (count) RUNS[count](g, item + 1, item[0], iw + t * ITEM_ROWS);
        continue;
      }
      const int64_t m = t - n_items;  // a mixture row: its adapters one at a time, in its order
      for (int64_t e = sp[m]; e < sp[m + 1]; ++e) run_rows<1>(g, mr + m, pp[e], wp + e);
    }
  });
}

}  // namespace

TORCH_LIBRARY(loraplex_lora, m) {
  m.def("lora_rows(Tensor x, Tensor a, Tensor?[] bs, Tensor(a!)[] ys, Tensor items, Tensor item_weights, "
        "Tensor mixture_rows, Tensor starts, Tensor positions, Tensor weights, int rank) -> ()");
  m.impl("lora_rows", c10::DispatchKey::CPU, TORCH_FN(lora_rows));
}
