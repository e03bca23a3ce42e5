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
  jaxopt_lab::Rows rows;  // A: a matrix, or a convolution's input (segments of whole quads)
  int8_t fill = 0;        // a padded convolution's padding value (the input's zero point)
};

constexpr int kMaxTileRows = 12;  // rows of the tallest tile (RowsFor<1>)

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

// R rows x B 16-column blocks (compile-time constants, so the R x B accumulators stay in
// registers). A panel narrower than 64 columns (a convolution with 16 or 32 output
// channels) runs only its B = ceil(width / 16) blocks, with more rows per tile, instead of
// multiplying zero padding.
//
// A padded convolution's row whose window touches the padding is gathered, `fill` included,
// into its own contiguous K-byte row of scratch (the padding is implicit: no padded copy of
// the input exists); a row inside the input is read in place. Integer sums: exact either way.
template <int R, int B>
void Tile(const Shared& s, const int8_t* packed, const int32_t* colsum, int8_t* scratch,
          int64_t i0, int64_t j0) {
  const int8_t* a[R];
  int64_t stride[R];
  if (!s.rows.Padded()) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      a[r] = s.a + s.rows.Start(i0 + r, s.k);
      stride[r] = s.rows.SegmentStride();
    }
  } else {
    auto pixel = s.rows.PixelOf(i0);
    for (int r = 0; r < R; ++r, s.rows.Next(pixel)) {
      if (s.rows.Inside(pixel)) {
        a[r] = s.a + s.rows.StartOf(pixel);
        stride[r] = s.rows.SegmentStride();
      } else {
        s.rows.Gather(s.a, pixel, scratch + r * s.k, s.fill);
        a[r] = scratch + r * s.k;
        stride[r] = s.rows.SegmentLength(s.k);
      }
    }
  }
  __m512i acc[R][B];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < B; ++c) acc[r][c] = _mm512_setzero_si512();
  // A matrix is one segment of K values (its last quad may be partial); a convolution's
  // segments hold whole quads (kw * C % 4 == 0), so packed quads follow on across them.
  const int64_t segments = s.rows.Segments(), length = s.rows.SegmentLength(s.k);
  const int64_t quads = (length + 3) / 4;
  // Whole quads take one constant 4-byte load each (a variable-length copy there would
  // become a memcpy call per quad); a matrix's partial last quad comes after the loop.
  const int64_t whole = length / 4;
  for (int64_t seg = 0; seg < segments; ++seg) {
    const int8_t* as[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) as[r] = a[r] + seg * stride[r];
    const int8_t* bseg = packed + seg * quads * kPanel * 4;
    for (int64_t q = 0; q < whole; ++q) {
      const int8_t* bq = bseg + q * kPanel * 4;
      __m512i b[B];
#pragma GCC unroll 4
      for (int c = 0; c < B; ++c) b[c] = _mm512_loadu_si512(bq + 64 * c);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i av = Quad(as[r] + 4 * q, 4);
#pragma GCC unroll 4
        for (int c = 0; c < B; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], av, b[c]);
      }
    }
    if (whole < quads) {
      const int8_t* bq = bseg + whole * kPanel * 4;
      const int64_t remaining = length - 4 * whole;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i av = Quad(as[r] + 4 * whole, remaining);
#pragma GCC unroll 4
        for (int c = 0; c < B; ++c) {
          acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], av, _mm512_loadu_si512(bq + 64 * c));
        }
      }
    }
  }
  // Epilogue with compile-time indices only, so the accumulators never leave registers.
  const int64_t width = std::min<int64_t>(kPanel, s.n - j0);
  __mmask16 mask[B];
  __m512i corr[B];
#pragma GCC unroll 4
  for (int c = 0; c < B; ++c) {
    const int64_t cols = std::max<int64_t>(0, std::min<int64_t>(16, width - 16 * c));
    mask[c] = static_cast<__mmask16>((1u << cols) - 1u);
    corr[c] = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask[c], colsum + 16 * c), 7);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    int32_t* row = s.c + (i0 + r) * s.n + j0;
#pragma GCC unroll 4
    for (int c = 0; c < B; ++c) {
      _mm512_mask_storeu_epi32(row + 16 * c, mask[c], _mm512_sub_epi32(acc[r][c], corr[c]));
    }
  }
}

// Rows per tile for B blocks: R * B accumulators + B panel registers stay within the 32
// vector registers.
template <int B>
constexpr int RowsFor() {
  return B == 1 ? kMaxTileRows : B == 2 ? 8 : kRows;
}

// Rows [i0, end) of the panel at j0 with B blocks: full tiles, then one tail tile.
template <int B>
void Rows(const Shared& s, const int8_t* packed, const int32_t* colsum, int8_t* scratch,
          int64_t i0, int64_t end, int64_t j0) {
  constexpr int R = RowsFor<B>();
  for (; i0 + R <= end; i0 += R) Tile<R, B>(s, packed, colsum, scratch, i0, j0);
  // The tail (< R rows) in tiles of 8, 4, 2 and 1 rows.
  if constexpr (R > 8) {
    if (end - i0 >= 8) { Tile<8, B>(s, packed, colsum, scratch, i0, j0); i0 += 8; }
  }
  if (end - i0 >= 4) { Tile<4, B>(s, packed, colsum, scratch, i0, j0); i0 += 4; }
  if (end - i0 >= 2) { Tile<2, B>(s, packed, colsum, scratch, i0, j0); i0 += 2; }
  if (end - i0 >= 1) Tile<1, B>(s, packed, colsum, scratch, i0, j0);
}

// Claims and computes panels until none is left.
void Work(Shared& s) {
  const int64_t k4 = (s.k + 3) / 4;
  int8_t* packed = nullptr;
  int8_t* scratch = nullptr;  // a padded convolution's gathered rows, kMaxTileRows * K bytes
  alignas(64) int32_t colsum[kPanel];
  for (int64_t p = s.Claim(); p < s.panels; p = s.Claim()) {
    if (packed == nullptr) {
      packed = static_cast<int8_t*>(std::aligned_alloc(64, static_cast<size_t>(k4) * kPanel * 4));
      if (s.rows.Padded()) scratch = static_cast<int8_t*>(std::malloc(s.k * kMaxTileRows));
    }
    const int64_t j0 = (p / s.row_chunks) * kPanel;
    PackPanel(s.b, s.k, s.n, j0, packed, colsum);
    const int64_t i0 = (p % s.row_chunks) * s.chunk_rows;
    const int64_t end = std::min(s.m, i0 + s.chunk_rows);
    const int64_t width = std::min<int64_t>(kPanel, s.n - j0);
    if (width <= 16) {
      Rows<1>(s, packed, colsum, scratch, i0, end, j0);
    } else if (width <= 32) {
      Rows<2>(s, packed, colsum, scratch, i0, end, j0);
    } else {
      Rows<kBlocks>(s, packed, colsum, scratch, i0, end, j0);
    }
    s.Finished();
  }
  std::free(scratch);
  std::free(packed);
}

// Splits the product into work items and runs them; s->a, b, c, rows are set.
ffi::Error Run(ffi::ThreadPool& pool, std::shared_ptr<Shared> s, int64_t m, int64_t k,
               int64_t n) {
  s->SetShape(m, k, n, kPanel);
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
  return Run(pool, s, ad[0], ad[1], bd[1]);
}

// A 2-D convolution of int8 codes without an im2col copy or a padded copy: x is the NHWC
// input with kw * C a multiple of 4, padded implicitly by pt/pb rows above/below and pl/pr
// columns left/right holding `fill` (one int8 value), b the kernel as its (kh * kw * C, N)
// matrix, c (N * Ho * Wo, N).
ffi::Error Int8Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> b,
                    ffi::Buffer<ffi::S8> fill, ffi::ResultBuffer<ffi::S32> c, int64_t kh,
                    int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                    int64_t pr) {
  auto s = std::make_shared<Shared>();
  const auto xd = x.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (!s->rows.SetConv(xd, kh, kw, sh, sw, pt, pb, pl, pr) || (kw * s->rows.c) % 4 != 0 ||
      bd.size() != 2 || bd[0] != kh * kw * s->rows.c || cd.size() != 2 || cd[1] != bd[1] ||
      cd[0] != xd[0] * s->rows.ho * s->rows.wo || fill.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "int8 conv expects an NHWC input (kw * C a multiple of 4, at least the window once "
        "padded, padding at least zero), a (kh * kw * C, N) kernel, an (N * Ho * Wo, N) "
        "output and one int8 padding value");
  }
  s->fill = fill.typed_data()[0];
  s->a = x.typed_data();
  s->b = b.typed_data();
  s->c = c->typed_data();
  return Run(pool, s, cd[0], bd[0], bd[1]);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JolInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JolInt8Conv, Int8Conv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr"));
