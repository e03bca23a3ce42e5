// Weight-only quantized matmul for x86 CPUs with AVX-512, as an XLA FFI handler.
//
// C[M, N] = A[M, K] @ W, W[k, n] = clamp((q[k, n] - z[g, n]) * s[g, n]) with g = k / (K / G):
// the float32 values `dequantize` gives for a (K, N) QTensor whose scale (and zero point)
// has shape (G, N) -- G = 1 for per-tensor or per-channel scales, G = K / group_size for
// groups along K. The codes are int8 (K, N), or 4-bit packed along N into uint8
// (K, ceil(N / 2)), the low nibble holding the even column. The dequantized weight is never
// written to memory as a whole.
//
// * M == 1 (GEMV, memory-bound): 256 output columns per panel, 16 float32 accumulators in
//   registers. Each row of codes is read once, straight from the packed storage: a 16-byte
//   load is widened to 16 int32 lanes (vpmovzxbd); vpermps with a 16-entry table turns the
//   low nibbles into the even columns' codes as floats (it only reads an index's low 4 bits,
//   so no mask is needed) and, after a 4-bit shift, the high nibbles into the odd columns'.
//   Within one group the accumulators hold sum_k x[k] * (q - z); the group's scale is
//   applied once, when the group ends. That equals the product on the dequantized weight
//   up to float32 rounding while no (q - z) * s can overflow; a panel's group whose scales
//   could (|s| > FLT_MAX / 512, Inf or NaN) runs a scalar loop on the clamped weights
//   instead, exactly like dequantize.
// * M > 1: one panel of 64 columns is dequantized into a [K][64] buffer (L2-resident) and a
//   6 x 64 register tile of float32 FMAs runs over it, in order of k (12 x 16 or 8 x 32 for
//   a narrower last panel); a tall product with few panels is split along M too.
//
// Threads: see native_panels.h; problems smaller than kSerialWork run on the caller only.
// Built with -mavx512f -mavx512bw -mavx512vl; used only when /proc/cpuinfo lists them.

#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "native_panels.h"

namespace {

using jaxopt_lab::Panels;
using jaxopt_lab::RunPanels;
namespace ffi = xla::ffi;

constexpr int kGemvCols = 256;   // output columns per GEMV panel: 16 accumulators
constexpr int kRows = 6;         // rows of A per GEMM register tile
constexpr int kBlocks = 4;       // 16-column blocks per GEMM tile
constexpr int kPanel = 16 * kBlocks;
constexpr float kSafeScale = FLT_MAX / 512;  // |q - z| <= 255: no product can overflow
constexpr int64_t kSerialWork = int64_t{1} << 18;
constexpr int kMaxTileRows = 12;          // rows of the tallest GEMM tile (RowsFor<1>)
constexpr int64_t kMinChunk = 8 * kRows;  // rows of a GEMM work item, at least
constexpr int64_t kTargetItems = 8;       // GEMM work items to aim for (2 threads here)

struct Shared : Panels {
  const float* a;         // (M, K)
  const uint8_t* codes;   // (K, row_bytes)
  int64_t row_bytes;
  const float* scale;     // (G, N)
  const int8_t* zp;       // (G, N) or nullptr
  int64_t group_size;
  int bits;               // 4 or 8
  float* c;               // (M, N)
  int64_t row_chunks = 1, chunk_rows = 0;  // GEMM work items: see GemmWork
  jaxopt_lab::Rows rows;                   // A: a matrix, or a convolution's input
};

inline int Code(const Shared& s, int64_t k, int64_t j) {
  const uint8_t* row = s.codes + k * s.row_bytes;
  if (s.bits == 8) return static_cast<int8_t>(row[j]);
  const int nibble = (row[j / 2] >> (4 * (j % 2))) & 15;
  return nibble < 8 ? nibble : nibble - 16;
}

// dequantize's value of one weight: float32 (q - z) * s, clamped into the finite range.
inline float Weight(const Shared& s, int64_t k, int64_t j) {
  const int64_t at = (k / s.group_size) * s.n + j;
  const float z = s.zp ? static_cast<float>(s.zp[at]) : 0.f;
  const float w = (static_cast<float>(Code(s, k, j)) - z) * s.scale[at];
  return std::isnan(w) ? w : std::min(FLT_MAX, std::max(-FLT_MAX, w));
}

inline __mmask16 Mask(int64_t count) {
  return static_cast<__mmask16>(count >= 16 ? 0xFFFF : count <= 0 ? 0 : (1u << count) - 1u);
}

// Even and odd columns (lo, hi) back into column order: columns [0, 16) and [16, 32).
inline __m512 InterleaveLow(__m512 lo, __m512 hi) {
  const __m512i idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  return _mm512_permutex2var_ps(lo, idx, hi);
}
inline __m512 InterleaveHigh(__m512 lo, __m512 hi) {
  const __m512i idx =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  return _mm512_permutex2var_ps(lo, idx, hi);
}

// Signed 4-bit codes as floats, indexed by the nibble.
inline __m512 NibbleTable() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
}

// --- GEMV (M == 1) ----------------------------------------------------------------------

// One group of rows [k0, k0 + count) of a 4-bit panel: tot += (sum_k x[k] (q - z)) * sc.
// zf holds the zero points de-interleaved like the accumulators (even columns of each
// 32-column piece, then odd); sc and tot are in column order.
template <bool kAsym, bool kFull>
void Gemv4Group(const float* x, const uint8_t* rows, int64_t row_bytes, int64_t count,
                int64_t nbytes, const float* zf, const float* sc, float* tot) {
  const __m512 table = NibbleTable();
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  __mmask16 mask[8];
  for (int p = 0; p < 8; ++p) mask[p] = Mask(nbytes - 16 * p);
  for (int64_t r = 0; r < count; ++r) {
    const __m512 xb = _mm512_set1_ps(x[r]);
    const uint8_t* row = rows + r * row_bytes;
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
      const __m128i bytes =
          kFull ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * p))
                : _mm_maskz_loadu_epi8(mask[p], row + 16 * p);
      const __m512i v = _mm512_cvtepu8_epi32(bytes);
      __m512 lo = _mm512_permutexvar_ps(v, table);
      __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
      if (kAsym) {
        lo = _mm512_sub_ps(lo, _mm512_load_ps(zf + 32 * p));
        hi = _mm512_sub_ps(hi, _mm512_load_ps(zf + 32 * p + 16));
      }
      acc[2 * p] = _mm512_fmadd_ps(xb, lo, acc[2 * p]);
      acc[2 * p + 1] = _mm512_fmadd_ps(xb, hi, acc[2 * p + 1]);
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p) {
    float* t = tot + 32 * p;
    _mm512_store_ps(t, _mm512_fmadd_ps(InterleaveLow(acc[2 * p], acc[2 * p + 1]),
                                       _mm512_load_ps(sc + 32 * p), _mm512_load_ps(t)));
    _mm512_store_ps(t + 16, _mm512_fmadd_ps(InterleaveHigh(acc[2 * p], acc[2 * p + 1]),
                                            _mm512_load_ps(sc + 32 * p + 16),
                                            _mm512_load_ps(t + 16)));
  }
}

// The same for int8 codes (column order throughout).
template <bool kAsym, bool kFull>
void Gemv8Group(const float* x, const uint8_t* rows, int64_t row_bytes, int64_t count,
                int64_t nbytes, const float* zf, const float* sc, float* tot) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  __mmask16 mask[16];
  for (int p = 0; p < 16; ++p) mask[p] = Mask(nbytes - 16 * p);
  for (int64_t r = 0; r < count; ++r) {
    const __m512 xb = _mm512_set1_ps(x[r]);
    const uint8_t* row = rows + r * row_bytes;
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) {
      const __m128i bytes =
          kFull ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * p))
                : _mm_maskz_loadu_epi8(mask[p], row + 16 * p);
      __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
      if (kAsym) q = _mm512_sub_ps(q, _mm512_load_ps(zf + 16 * p));
      acc[p] = _mm512_fmadd_ps(xb, q, acc[p]);
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < 16; ++p) {
    float* t = tot + 16 * p;
    _mm512_store_ps(t, _mm512_fmadd_ps(acc[p], _mm512_load_ps(sc + 16 * p), _mm512_load_ps(t)));
  }
}

using GroupFn = void (*)(const float*, const uint8_t*, int64_t, int64_t, int64_t, const float*,
                         const float*, float*);

template <int kBits>
GroupFn PickGroup(bool asym, bool full) {
  if (kBits == 4) {
    return asym ? (full ? Gemv4Group<true, true> : Gemv4Group<true, false>)
                : (full ? Gemv4Group<false, true> : Gemv4Group<false, false>);
  }
  return asym ? (full ? Gemv8Group<true, true> : Gemv8Group<true, false>)
              : (full ? Gemv8Group<false, true> : Gemv8Group<false, false>);
}

template <int kBits>
void GemvWork(Shared& s) {
  alignas(64) float tot[kGemvCols], sc[kGemvCols], zf[kGemvCols];
  for (int64_t p = s.Claim(); p < s.panels; p = s.Claim()) {
    const int64_t j0 = p * kGemvCols;
    const int64_t width = std::min<int64_t>(kGemvCols, s.n - j0);
    const int64_t nbytes = kBits == 4 ? (width + 1) / 2 : width;
    const uint8_t* panel = s.codes + (kBits == 4 ? j0 / 2 : j0);
    const GroupFn group = PickGroup<kBits>(s.zp != nullptr, width == kGemvCols);
    std::fill(tot, tot + kGemvCols, 0.f);
    std::fill(sc, sc + kGemvCols, 0.f);
    std::fill(zf, zf + kGemvCols, 0.f);
    for (int64_t k0 = 0; k0 < s.k; k0 += s.group_size) {
      const int64_t at = (k0 / s.group_size) * s.n + j0;
      bool safe = true;
      for (int64_t j = 0; j < width; ++j) {
        sc[j] = s.scale[at + j];
        safe &= std::fabs(sc[j]) <= kSafeScale;  // false for NaN and Inf
      }
      if (!safe) {  // rare: the clamped weights themselves, like dequantize
        for (int64_t k = k0; k < k0 + s.group_size; ++k) {
          for (int64_t j = 0; j < width; ++j) tot[j] += s.a[k] * Weight(s, k, j0 + j);
        }
        continue;
      }
      if (s.zp != nullptr) {
        for (int64_t j = 0; j < width; ++j) {
          // 4 bits: the accumulators' order, even columns of each 32 first.
          const int64_t slot = kBits == 4 ? (j & ~31) + (j % 32) / 2 + 16 * (j % 2) : j;
          zf[slot] = static_cast<float>(s.zp[at + j]);
        }
      }
      group(s.a + k0, panel + k0 * s.row_bytes, s.row_bytes, s.group_size, nbytes, zf, sc,
            tot);
    }
    std::memcpy(s.c + j0, tot, sizeof(float) * width);
    s.Finished();
  }
}

// --- GEMM (M > 1) -----------------------------------------------------------------------

// Columns [j0, j0 + 64) of the dequantized weight into out[K][64] (zeros past N).
template <int kBits>
void DequantizePanel(const Shared& s, int64_t j0, float* out) {
  const int64_t width = std::min<int64_t>(kPanel, s.n - j0);
  const int64_t nbytes = kBits == 4 ? (width + 1) / 2 : width;
  const uint8_t* panel = s.codes + (kBits == 4 ? j0 / 2 : j0);
  const __m512 table = NibbleTable();
  const __m512 top = _mm512_set1_ps(FLT_MAX), bottom = _mm512_set1_ps(-FLT_MAX);
  __mmask16 cols[kBlocks], bytes[kBlocks];
  for (int c = 0; c < kBlocks; ++c) {
    cols[c] = Mask(width - 16 * c);
    bytes[c] = Mask(nbytes - 16 * c);
  }
  for (int64_t k0 = 0; k0 < s.k; k0 += s.group_size) {
    const int64_t at = (k0 / s.group_size) * s.n + j0;
    __m512 sv[kBlocks], zv[kBlocks];
    for (int c = 0; c < kBlocks; ++c) {
      sv[c] = _mm512_maskz_loadu_ps(cols[c], s.scale + at + 16 * c);
      zv[c] = s.zp ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                         _mm_maskz_loadu_epi8(cols[c], s.zp + at + 16 * c)))
                   : _mm512_setzero_ps();
    }
    for (int64_t k = k0; k < k0 + s.group_size; ++k) {
      const uint8_t* row = panel + k * s.row_bytes;
      __m512 f[kBlocks];
      if (kBits == 4) {
#pragma GCC unroll 2
        for (int q = 0; q < 2; ++q) {
          const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(bytes[q], row + 16 * q));
          const __m512 lo = _mm512_permutexvar_ps(v, table);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
          f[2 * q] = InterleaveLow(lo, hi);
          f[2 * q + 1] = InterleaveHigh(lo, hi);
        }
      } else {
#pragma GCC unroll 4
        for (int c = 0; c < kBlocks; ++c) {
          f[c] = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(bytes[c], row + 16 * c)));
        }
      }
      float* dst = out + k * kPanel;
#pragma GCC unroll 4
      for (int c = 0; c < kBlocks; ++c) {
        const __m512 w = _mm512_mul_ps(_mm512_sub_ps(f[c], zv[c]), sv[c]);
        // min/max return their second operand when either is NaN: NaN stays NaN.
        _mm512_store_ps(dst + 16 * c, _mm512_max_ps(bottom, _mm512_min_ps(top, w)));
      }
    }
  }
}

// R rows x B 16-column blocks of C from a dequantized panel (compile-time sizes, so the
// accumulators stay in registers). A panel narrower than 64 columns (a convolution with 16
// or 32 output channels) runs only its B = ceil(width / 16) blocks, with more rows a tile.
// Row r's K values are Segments() runs of SegmentLength() values at a[r] + seg * stride[r].
template <int R, int B>
void FloatTile(const Shared& s, const float* packed, const float* const* a,
               const int64_t* stride, int64_t i0, int64_t j0) {
  __m512 acc[R][B];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < B; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t segments = s.rows.Segments(), length = s.rows.SegmentLength(s.k);
  for (int64_t seg = 0; seg < segments; ++seg) {
    const float* bseg = packed + seg * length * kPanel;
    const float* as[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) as[r] = a[r] + seg * stride[r];
    for (int64_t t = 0; t < length; ++t) {
      const float* bk = bseg + t * kPanel;
      __m512 b[B];
#pragma GCC unroll 4
      for (int c = 0; c < B; ++c) b[c] = _mm512_load_ps(bk + 16 * c);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(as[r][t]);
#pragma GCC unroll 4
        for (int c = 0; c < B; ++c) acc[r][c] = _mm512_fmadd_ps(av, b[c], acc[r][c]);
      }
    }
  }
  const int64_t width = std::min<int64_t>(kPanel, s.n - j0);
  __mmask16 mask[B];
#pragma GCC unroll 4
  for (int c = 0; c < B; ++c) mask[c] = Mask(width - 16 * c);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* row = s.c + (i0 + r) * s.n + j0;
#pragma GCC unroll 4
    for (int c = 0; c < B; ++c) _mm512_mask_storeu_ps(row + 16 * c, mask[c], acc[r][c]);
  }
}

// One tile: a row whose window lies inside the input is read in place; a row whose window
// touches the padding is gathered, zeros included, into its own contiguous K-value row of
// scratch. Either way each output is the same sequence of FMAs over the same values, in the
// same order, as on an explicitly padded input: bit-identical results.
template <int R, int B>
void Tile(const Shared& s, const float* packed, float* scratch, int64_t i0, int64_t j0) {
  const float* a[R];
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
        s.rows.Gather(s.a, pixel, scratch + r * s.k);
        a[r] = scratch + r * s.k;
        stride[r] = s.rows.SegmentLength(s.k);
      }
    }
  }
  FloatTile<R, B>(s, packed, a, stride, i0, j0);
}

// Rows per tile for B blocks: R * B accumulators + B panel registers within 32 registers.
template <int B>
constexpr int RowsFor() {
  return B == 1 ? kMaxTileRows : B == 2 ? 8 : kRows;
}

// Rows [i0, end) against the panel at j0: full tiles, then the tail in tiles of 8/4/2/1.
template <int B>
void FloatRows(const Shared& s, const float* packed, float* scratch, int64_t i0, int64_t end,
               int64_t j0) {
  constexpr int R = RowsFor<B>();
  for (; i0 + R <= end; i0 += R) Tile<R, B>(s, packed, scratch, i0, j0);
  if constexpr (R > 8) {
    if (end - i0 >= 8) { Tile<8, B>(s, packed, scratch, i0, j0); i0 += 8; }
  }
  if (end - i0 >= 4) { Tile<4, B>(s, packed, scratch, i0, j0); i0 += 4; }
  if (end - i0 >= 2) { Tile<2, B>(s, packed, scratch, i0, j0); i0 += 2; }
  if (end - i0 >= 1) Tile<1, B>(s, packed, scratch, i0, j0);
}

// Work item p: the panel p / row_chunks, rows [chunk_rows * (p % row_chunks), ...). A tall
// product with few columns (a convolution's patches times its kernel) is split along M too,
// so both threads get work; each item dequantizes its panel again (K * 64 weights, against
// at least kMinChunk * K * 64 multiply-adds).
//
// A padded convolution also takes a scratch of kMaxTileRows gathered rows (the tallest
// tile), per thread: 12 * K floats, where a padded copy of the input would take N * Hp * Wp * C.
template <int kBits>
void GemmWork(Shared& s) {
  float* packed = nullptr;
  float* scratch = nullptr;
  for (int64_t p = s.Claim(); p < s.panels; p = s.Claim()) {
    if (packed == nullptr) {
      packed = static_cast<float*>(
          std::aligned_alloc(64, static_cast<size_t>(s.k) * kPanel * sizeof(float)));
      if (s.rows.Padded()) {
        scratch = static_cast<float*>(std::malloc(sizeof(float) * s.k * kMaxTileRows));
      }
    }
    const int64_t j0 = (p / s.row_chunks) * kPanel;
    DequantizePanel<kBits>(s, j0, packed);
    const int64_t i0 = (p % s.row_chunks) * s.chunk_rows;
    const int64_t end = std::min(s.m, i0 + s.chunk_rows);
    const int64_t width = std::min<int64_t>(kPanel, s.n - j0);
    if (width <= 16) {
      FloatRows<1>(s, packed, scratch, i0, end, j0);
    } else if (width <= 32) {
      FloatRows<2>(s, packed, scratch, i0, end, j0);
    } else {
      FloatRows<kBlocks>(s, packed, scratch, i0, end, j0);
    }
    s.Finished();
  }
  std::free(scratch);
  std::free(packed);
}

// Checks the operands and runs the product; a.dims() is (M, K), or the NHWC input
// of a convolution when rows.conv (then M = N * Ho * Wo and K = kh * kw * C).
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& a, ffi::AnyBuffer& codes,
               ffi::Buffer<ffi::F32>& scale, ffi::AnyBuffer& zp, ffi::ResultBuffer<ffi::F32>& c,
               int32_t bits, const jaxopt_lab::Rows& rows) {
  const auto ad = a.dimensions(), cd = codes.dimensions(), sd = scale.dimensions();
  const auto od = c->dimensions();
  const bool asym = zp.element_count() > 0;
  if (cd.size() != 2 || sd.size() != 2 || od.size() != 2 || (bits != 4 && bits != 8) ||
      (!rows.conv && ad.size() != 2)) {
    return ffi::Error::InvalidArgument("weight-only matmul expects 2-D operands, 4 or 8 bits");
  }
  const int64_t m = od[0], n = od[1], g = sd[0];
  const int64_t k = rows.conv ? rows.kh * rows.kw * rows.c : ad[1];
  const bool bad_a = rows.conv ? m != ad[0] * rows.ho * rows.wo : ad[0] != m;
  const bool bad_codes = cd[0] != k || cd[1] != (bits == 4 ? (n + 1) / 2 : n) ||
                         codes.element_type() != (bits == 4 ? ffi::U8 : ffi::S8);
  const bool bad_scale = sd[1] != n || (k > 0 && (g < 1 || k % g != 0));
  const bool bad_zp = asym && (zp.element_type() != ffi::S8 || zp.element_count() != g * n);
  if (bad_a || bad_codes || bad_scale || bad_zp) {
    return ffi::Error::InvalidArgument(
        "weight-only matmul expects a (M, K) (or an NHWC input giving M pixels), codes (K, N "
        "or ceil(N / 2)), scale (G, N) with G dividing K, int8 zero point (G, N) or empty");
  }
  auto s = std::make_shared<Shared>();
  s->a = a.typed_data();
  s->codes = static_cast<const uint8_t*>(codes.untyped_data());
  s->row_bytes = cd[1];
  s->scale = scale.typed_data();
  s->zp = asym ? static_cast<const int8_t*>(zp.untyped_data()) : nullptr;
  s->group_size = g > 0 ? k / g : 1;
  s->bits = bits;
  s->c = c->typed_data();
  s->rows = rows;
  // A convolution always takes the GEMM path: its rows are not one contiguous vector.
  const bool gemv = m == 1 && !rows.conv;
  s->SetShape(m, k, n, gemv ? kGemvCols : kPanel);
  if (!gemv && m > 0) {
    const int64_t col_panels = s->panels;
    s->row_chunks = std::max<int64_t>(
        1, std::min<int64_t>((kTargetItems + col_panels - 1) / col_panels, m / kMinChunk));
    s->chunk_rows = (m + s->row_chunks - 1) / s->row_chunks;
    s->chunk_rows = (s->chunk_rows + kRows - 1) / kRows * kRows;
    s->row_chunks = (m + s->chunk_rows - 1) / s->chunk_rows;  // none left empty
    s->panels = col_panels * s->row_chunks;
  }
  // Bytes of codes read plus FMAs / 16: below kSerialWork the pool handoff is not worth it.
  const int64_t work = k * n * bits / 8 + m * k * n / 16;
  const int64_t helpers = work < kSerialWork ? 0 : INT64_MAX;
  if (gemv) return RunPanels(pool, s, bits == 4 ? GemvWork<4> : GemvWork<8>, helpers);
  return RunPanels(pool, s, bits == 4 ? GemmWork<4> : GemmWork<8>, helpers);
}

ffi::Error WeightOnlyMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::AnyBuffer codes,
                            ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer zp,
                            ffi::ResultBuffer<ffi::F32> c, int32_t bits) {
  return Run(pool, a, codes, scale, zp, c, bits, jaxopt_lab::Rows{});
}

// A 2-D convolution (NHWC input, unpadded; zero padding pt/pb rows above/below and pl/pr
// columns left/right, implicit; kernel as its (kh * kw * C, N) matrix of codes) without an
// im2col copy or a padded copy: the GEMM reads each output pixel's window in place, or
// gathers it with its zeros when it touches the padding.
ffi::Error WeightOnlyConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                          ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer zp,
                          ffi::ResultBuffer<ffi::F32> c, int32_t bits, int64_t kh, int64_t kw,
                          int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                          int64_t pr) {
  jaxopt_lab::Rows rows;
  if (!rows.SetConv(x.dimensions(), kh, kw, sh, sw, pt, pb, pl, pr)) {
    return ffi::Error::InvalidArgument("weight-only conv expects an NHWC input at least as "
                                       "large as the window once padded, positive window and "
                                       "strides, padding at least zero");
  }
  return Run(pool, x, codes, scale, zp, c, bits, rows);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JolWeightOnlyMatmul, WeightOnlyMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JolWeightOnlyConv, WeightOnlyConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr"));
