// Shared by the native kernels: a matmul's output split into column panels that the calling
// thread and tasks on XLA's intra-op pool claim from an atomic counter.
//
// The caller only waits for panels that some running thread has already claimed, so it can
// never wait on a task that has not started (no deadlock when the pool is busy); late tasks
// find no panel left and return.

#ifndef JAXOPT_LAB_QUANT_NATIVE_PANELS_H_
#define JAXOPT_LAB_QUANT_NATIVE_PANELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxopt_lab {

namespace ffi = xla::ffi;

// The work of one matmul: `panels` panels of `width` output columns.
struct Panels {
  int64_t m = 0, k = 0, n = 0, panels = 0, width = 0;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;

  void SetShape(int64_t rows, int64_t depth, int64_t cols, int64_t panel_width) {
    m = rows;
    k = depth;
    n = cols;
    width = panel_width;
    panels = (n + width - 1) / width;
  }
  int64_t Claim() { return next.fetch_add(1); }
  void Finished() {
    std::lock_guard<std::mutex> lock(mu);
    if (++done == panels) cv.notify_all();
  }
};

// Where row r of the left operand A starts, and how it is laid out. A plain matrix: row r
// at a + r * K, one contiguous segment of K values. A convolution's patches, read straight
// from the NHWC input instead of an im2col copy: row r is output pixel (n, oh, ow), and its
// K = kh * kw * C inputs (HWI order, the kernel matrix's rows) are kh segments of kw * C
// contiguous values, one input row apart. The zero padding is implicit (no padded copy of
// the input exists): a row whose window lies inside the input is read in place (Inside,
// Start); a row whose window touches the padding is copied with its zeros into a
// contiguous K-value scratch row (Gather), which the kernels then read like a matrix row.
struct Rows {
  bool conv = false;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1;  // window and strides
  int64_t h = 0, w = 0, c = 0;             // input height, width, channels (unpadded)
  int64_t pt = 0, pb = 0, pl = 0, pr = 0;  // zero padding: top, bottom, left, right
  int64_t ho = 0, wo = 0;                  // output height and width

  int64_t Segments() const { return conv ? kh : 1; }
  int64_t SegmentLength(int64_t k) const { return conv ? kw * c : k; }
  int64_t SegmentStride() const { return conv ? w * c : 0; }
  bool Padded() const { return conv && (pt | pb | pl | pr) != 0; }
  // A convolution's row as its output pixel; Next steps to the following row without the
  // divisions PixelOf takes (they cost as much as a small window's FMAs).
  struct Pixel {
    int64_t n = 0, oh = 0, ow = 0;
  };
  Pixel PixelOf(int64_t r) const {
    const int64_t t = r / wo;
    return Pixel{t / ho, t % ho, r % wo};
  }
  void Next(Pixel& p) const {
    if (++p.ow == wo) {
      p.ow = 0;
      if (++p.oh == ho) p.oh = 0, ++p.n;
    }
  }
  // Whether the pixel's whole window lies inside the input.
  bool Inside(const Pixel& p) const {
    const int64_t y0 = p.oh * sh - pt, x0 = p.ow * sw - pl;
    return y0 >= 0 && x0 >= 0 && y0 + kh <= h && x0 + kw <= w;
  }
  // Offset of the window's first value from the start of the input; only for one Inside.
  int64_t StartOf(const Pixel& p) const {
    return ((p.n * h + p.oh * sh - pt) * w + p.ow * sw - pl) * c;
  }
  // Offset of row r's first value from the start of A (a convolution: without padding).
  int64_t Start(int64_t r, int64_t k) const { return conv ? StartOf(PixelOf(r)) : r * k; }
  // The pixel's K window values (HWI order) into dst, `fill` where the window is padding:
  // the values a padded copy of the input would hold there.
  template <typename T>
  void Gather(const T* a, const Pixel& p, T* dst, T fill = T(0)) const {
    const int64_t y0 = p.oh * sh - pt, x0 = p.ow * sw - pl;
    // Window columns [jlo, jhi) are inside the input. Plain loops, not memcpy/memset: the
    // pieces are often a few values (C = 1 or 3), where a library call costs more than them.
    const int64_t jlo = std::min(kw, std::max<int64_t>(0, -x0));
    const int64_t jhi = std::max(jlo, std::min(kw, w - x0));
    const int64_t len = kw * c, in_lo = jlo * c, in_hi = jhi * c;
    for (int64_t i = 0; i < kh; ++i, dst += len) {
      const int64_t y = y0 + i;
      if (y < 0 || y >= h) {
        for (int64_t q = 0; q < len; ++q) dst[q] = fill;
        continue;
      }
      const T* src = a + ((p.n * h + y) * w + x0) * c;  // the window row's first value
      for (int64_t q = 0; q < in_lo; ++q) dst[q] = fill;
      for (int64_t q = in_lo; q < in_hi; ++q) dst[q] = src[q];
      for (int64_t q = in_hi; q < len; ++q) dst[q] = fill;
    }
  }
  // Sets the convolution geometry from the input's dimensions and the padding; false if
  // they do not fit (negative padding, or a padded input smaller than the window).
  template <typename Dims>
  bool SetConv(const Dims& x, int64_t kh_, int64_t kw_, int64_t sh_, int64_t sw_,
               int64_t pt_ = 0, int64_t pb_ = 0, int64_t pl_ = 0, int64_t pr_ = 0) {
    if (x.size() != 4 || kh_ < 1 || kw_ < 1 || sh_ < 1 || sw_ < 1) return false;
    if (pt_ < 0 || pb_ < 0 || pl_ < 0 || pr_ < 0) return false;
    conv = true;
    kh = kh_, kw = kw_, sh = sh_, sw = sw_;
    pt = pt_, pb = pb_, pl = pl_, pr = pr_;
    h = x[1], w = x[2], c = x[3];
    const int64_t hp = h + pt + pb, wp = w + pl + pr;
    if (hp < kh || wp < kw) return false;
    ho = (hp - kh) / sh + 1;
    wo = (wp - kw) / sw + 1;
    return true;
  }
};

// Runs work(*s) on the caller and on up to min(pool.num_threads(), max_helpers) pool tasks;
// returns when every panel is done. An empty output is left as it is; K == 0 writes zeros
// to s->c. A small problem passes max_helpers = 0: handing panels to the pool costs more
// than it saves there.
template <typename S>
ffi::Error RunPanels(ffi::ThreadPool& pool, const std::shared_ptr<S>& s, void (*work)(S&),
                     int64_t max_helpers = INT64_MAX) {
  if (s->m == 0 || s->n == 0) return ffi::Error::Success();
  if (s->k == 0) {
    std::memset(s->c, 0, sizeof(*s->c) * s->m * s->n);
    return ffi::Error::Success();
  }
  const int64_t helpers =
      std::min<int64_t>({static_cast<int64_t>(pool.num_threads()), s->panels - 1, max_helpers});
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([s, work] { work(*s); });
  work(*s);
  std::unique_lock<std::mutex> lock(s->mu);
  s->cv.wait(lock, [&] { return s->done == s->panels; });
  return ffi::Error::Success();
}

}  // namespace jaxopt_lab

#endif  // JAXOPT_LAB_QUANT_NATIVE_PANELS_H_
