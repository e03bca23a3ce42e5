// int8 x int8 -> int32 matrix multiply for x86 CPUs with AVX512-VNNI, as an XLA FFI handler.
//
// C[M, N] = A[M, K] @ B[K, N], all row-major, exact int32 accumulation.
//
// VNNI's vpdpbusd multiplies unsigned by signed bytes, four at a time per int32 lane, so
// each A quad is flipped to unsigned (a + 128, one XOR of the broadcast word) and
// 128 * colsum(B) is subtracted at the end. B is packed one panel of 64 columns at a time
// into [K/4][64][4] (zero-padded), the layout vpdpbusd reads with one 64-byte load per
// 16 columns; the packing also yields the column sums. A 6 x 64 register tile of int32
// accumulators runs over the whole K for each row block.
//
// Threads: work items (a 64-column panel, or part of its rows for a tall product with few
// columns) are claimed by the calling thread and by tasks on XLA's intra-op pool (see
// native_panels.h); products below kSerialMacs run on the caller alone.
//
// Built with -mavx512f -mavx512bw -mavx512vl -mavx512vnni by setup.py at install time (or
// by jaxopt_lab/quant/native.py on first use in a checkout without the library).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "native_panels.h"

namespace {

using jaxopt_lab::Panels;
using jaxopt_lab::RunPanels;
namespace ffi = xla::ffi;

constexpr int kRows = 6;      // rows of A per register tile
constexpr int kBlocks = 4;    // 16-column blocks per tile
constexpr int kPanel = 16 * kBlocks;

// Work items: column panel p / row_chunks, rows [chunk_rows * (p % row_chunks), ...). A
// tall product with few columns (a convolution's patches times its kernel) is split along
// M too, so that both threads get work; each item packs its panel again (K * 64 bytes,
// against at least kMinChunk * K * 64 multiply-adds).
struct Shared : Panels {
  const int8_t* a;
  const int8_t* b;
  int32_t* c;
  int64_t row_chunks = 1, chunk_rows = 0;
};

constexpr int64_t kMinChunk = 8 * kRows;
constexpr int64_t kTargetItems = 8;
constexpr int64_t kSerialMacs = int64_t{1} << 22;  // below: the pool handoff costs more

// Packs columns [j0, j0 + 64) of B into [k4][64][4] and returns their column sums.
void PackPanel(const int8_t* b, int64_t k, int64_t n, int64_t j0, int8_t* packed,
               int32_t* colsum) {
  const int64_t k4 = (k + 3) / 4;
  const int64_t width = std::min<int64_t>(kPanel, n - j0);
  std::memset(colsum, 0, sizeof(int32_t) * kPanel);
  int64_t kk = 0;
  if (width == kPanel) {
    // Four rows x 64 columns -> 64 column quads: byte and word interleaves within 128-bit
    // lanes, then a 4 x 4 transpose of the lanes. Column sums come from vpdpbusd with ones.
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i sum[kBlocks];
    for (int c = 0; c < kBlocks; ++c) sum[c] = _mm512_setzero_si512();
    for (; kk + 4 <= k; kk += 4) {
      const int8_t* src = b + kk * n + j0;
      const __m512i r0 = _mm512_loadu_si512(src), r1 = _mm512_loadu_si512(src + n);
      const __m512i r2 = _mm512_loadu_si512(src + 2 * n), r3 = _mm512_loadu_si512(src + 3 * n);
      const __m512i lo01 = _mm512_unpacklo_epi8(r0, r1), hi01 = _mm512_unpackhi_epi8(r0, r1);
      const __m512i lo23 = _mm512_unpacklo_epi8(r2, r3), hi23 = _mm512_unpackhi_epi8(r2, r3);
      const __m512i v0 = _mm512_unpacklo_epi16(lo01, lo23), v1 = _mm512_unpackhi_epi16(lo01, lo23);
      const __m512i v2 = _mm512_unpacklo_epi16(hi01, hi23), v3 = _mm512_unpackhi_epi16(hi01, hi23);
      const __m512i t0 = _mm512_shuffle_i32x4(v0, v1, 0x44), t1 = _mm512_shuffle_i32x4(v0, v1, 0xEE);
      const __m512i t2 = _mm512_shuffle_i32x4(v2, v3, 0x44), t3 = _mm512_shuffle_i32x4(v2, v3, 0xEE);
      const __m512i out[kBlocks] = {
          _mm512_shuffle_i32x4(t0, t2, 0x88), _mm512_shuffle_i32x4(t0, t2, 0xDD),
          _mm512_shuffle_i32x4(t1, t3, 0x88), _mm512_shuffle_i32x4(t1, t3, 0xDD)};
      int8_t* dst = packed + (kk / 4) * kPanel * 4;
      for (int c = 0; c < kBlocks; ++c) {
        _mm512_storeu_si512(dst + 64 * c, out[c]);
        sum[c] = _mm512_dpbusd_epi32(sum[c], ones, out[c]);
      }
    }
    for (int c = 0; c < kBlocks; ++c) _mm512_storeu_si512(colsum + 16 * c, sum[c]);
  }
  // Whatever the fast path left: the last rows (K % 4) or a narrow last panel.
  std::memset(packed + (kk / 4) * kPanel * 4, 0, static_cast<size_t>(k4 - kk / 4) * kPanel * 4);
  for (; kk < k; ++kk) {
    const int8_t* row = b + kk * n + j0;
    int8_t* dst = packed + (kk / 4) * kPanel * 4 + (kk % 4);
    for (int64_t j = 0; j < width; ++j) {
      dst[j * 4] = row[j];
      colsum[j] += row[j];
    }
  }
}

// One quad of A (four int8 values) broadcast to every lane, flipped to unsigned.
inline __m512i Quad(const int8_t* p, int64_t remaining) {
  int32_t word = 0;
  std::memcpy(&word, p, remaining >= 4 ? 4 : static_cast<size_t>(remaining));
  // Padding bytes past K meet zero weights, so flipping them is harmless.
  return _mm512_xor_si512(_mm512_set1_epi32(word), _mm512_set1_epi32(0x80808080u));
}

// R rows (a compile-time constant, so the R x 4 accumulators stay in registers).
template <int R>
void Tile(const Shared& s, const int8_t* packed, const int32_t* colsum, int64_t i0,
          int64_t j0) {
  const int64_t k4 = (s.k + 3) / 4;
  const int64_t full = s.k / 4;  // quads that can be read with one 4-byte load
  const int8_t* a = s.a + i0 * s.k;
  __m512i acc[R][kBlocks];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kBlocks; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t q = 0; q < k4; ++q) {
    const int8_t* bq = packed + q * kPanel * 4;
    const __m512i b0 = _mm512_loadu_si512(bq);
    const __m512i b1 = _mm512_loadu_si512(bq + 64);
    const __m512i b2 = _mm512_loadu_si512(bq + 128);
    const __m512i b3 = _mm512_loadu_si512(bq + 192);
    const int64_t remaining = q < full ? 4 : s.k - 4 * q;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i av = Quad(a + r * s.k + 4 * q, remaining);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, b2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, b3);
    }
  }
  // Epilogue with compile-time indices only, so the accumulators never leave registers.
  const int64_t width = std::min<int64_t>(kPanel, s.n - j0);
  __mmask16 mask[kBlocks];
  __m512i corr[kBlocks];
#pragma GCC unroll 4
  for (int c = 0; c < kBlocks; ++c) {
    const int64_t cols = std::max<int64_t>(0, std::min<int64_t>(16, width - 16 * c));
    mask[c] = static_cast<__mmask16>((1u << cols) - 1u);
    corr[c] = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask[c], colsum + 16 * c), 7);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    int32_t* row = s.c + (i0 + r) * s.n + j0;
#pragma GCC unroll 4
    for (int c = 0; c < kBlocks; ++c) {
      _mm512_mask_storeu_epi32(row + 16 * c, mask[c], _mm512_sub_epi32(acc[r][c], corr[c]));
    }
  }
}

void TailTile(const Shared& s, const int8_t* packed, const int32_t* colsum, int64_t i0,
              int64_t j0, int64_t rows) {
  switch (rows) {
    case 1: return Tile<1>(s, packed, colsum, i0, j0);
    case 2: return Tile<2>(s, packed, colsum, i0, j0);
    case 3: return Tile<3>(s, packed, colsum, i0, j0);
    case 4: return Tile<4>(s, packed, colsum, i0, j0);
    default: return Tile<5>(s, packed, colsum, i0, j0);
  }
}

// Claims and computes panels until none is left.
void Work(Shared& s) {
  const int64_t k4 = (s.k + 3) / 4;
  int8_t* packed = nullptr;
  alignas(64) int32_t colsum[kPanel];
  for (int64_t p = s.Claim(); p < s.panels; p = s.Claim()) {
    if (packed == nullptr) {
      packed = static_cast<int8_t*>(std::aligned_alloc(64, static_cast<size_t>(k4) * kPanel * 4));
    }
    const int64_t j0 = (p / s.row_chunks) * kPanel;
    PackPanel(s.b, s.k, s.n, j0, packed, colsum);
    int64_t i0 = (p % s.row_chunks) * s.chunk_rows;
    const int64_t end = std::min(s.m, i0 + s.chunk_rows);
    for (; i0 + kRows <= end; i0 += kRows) Tile<kRows>(s, packed, colsum, i0, j0);
    if (i0 < end) TailTile(s, packed, colsum, i0, j0, end - i0);
    s.Finished();
  }
  std::free(packed);
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::S8> b,
                      ffi::ResultBuffer<ffi::S32> c) {
  const auto ad = a.dimensions();
  const auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[1] != bd[0]) {
    return ffi::Error::InvalidArgument("int8 matmul expects (M, K) @ (K, N)");
  }
  auto s = std::make_shared<Shared>();
  s->a = a.typed_data();
  s->b = b.typed_data();
  s->c = c->typed_data();
  s->SetShape(ad[0], ad[1], bd[1], kPanel);
  const int64_t col_panels = s->panels;
  if (s->m == 0) return ffi::Error::Success();
  s->row_chunks = std::max<int64_t>(1, std::min<int64_t>((kTargetItems + col_panels - 1) / col_panels,
                                                         s->m / kMinChunk));
  s->chunk_rows = (s->m + s->row_chunks - 1) / s->row_chunks;
  s->chunk_rows = (s->chunk_rows + kRows - 1) / kRows * kRows;
  s->row_chunks = (s->m + s->chunk_rows - 1) / s->chunk_rows;  // none left empty
  s->panels = col_panels * s->row_chunks;
  const bool small = s->m * s->k * s->n < kSerialMacs;
  return RunPanels(pool, s, Work, small ? 0 : INT64_MAX);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JolInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
