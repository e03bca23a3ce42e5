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
// from the (already padded) NHWC input instead of an im2col copy: row r is output pixel
// (n, oh, ow), and its K = kh * kw * C inputs (HWI order, the kernel matrix's rows) are kh
// segments of kw * C contiguous values, one input row apart.
struct Rows {
  bool conv = false;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1;  // window and strides
  int64_t hp = 0, wp = 0, c = 0;           // padded input height, width, channels
  int64_t ho = 0, wo = 0;                  // output height and width

  int64_t Segments() const { return conv ? kh : 1; }
  int64_t SegmentLength(int64_t k) const { return conv ? kw * c : k; }
  int64_t SegmentStride() const { return conv ? wp * c : 0; }
  // Offset of row r's first value from the start of A.
  int64_t Start(int64_t r, int64_t k) const {
    if (!conv) return r * k;
    const int64_t ow = r % wo, t = r / wo, oh = t % ho, n = t / ho;
    return ((n * hp + oh * sh) * wp + ow * sw) * c;
  }
  // Sets the convolution geometry from the input's dimensions; false if they do not fit.
  template <typename Dims>
  bool SetConv(const Dims& x, int64_t kh_, int64_t kw_, int64_t sh_, int64_t sw_) {
    if (x.size() != 4 || kh_ < 1 || kw_ < 1 || sh_ < 1 || sw_ < 1) return false;
    conv = true;
    kh = kh_, kw = kw_, sh = sh_, sw = sw_;
    hp = x[1], wp = x[2], c = x[3];
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
