// Writes new tokens' cache positions into a paged KV cache in place, called from JAX through
// the XLA FFI. The cache operand is aliased to the result, so under jit with the cache donated
// only the T written slots are touched; XLA:CPU's own scatter converts a 16-bit float cache to
// float32 and back, a full pass over the cache per call.
//
// A slot is one cache position: every element of the cache's trailing axes (for the packed
// v3 layout: all of a position's combined key/value heads and lanes). Token t goes to slot
// `rows[t]` of page `pages[t]`; a token whose page or row lies outside the cache is dropped,
// so no index value can address memory outside the buffers.

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error cache_write_impl(ffi::AnyBuffer cache, ffi::AnyBuffer slabs,
                            ffi::Buffer<ffi::S32> pages, ffi::Buffer<ffi::S32> rows,
                            ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = cache.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("kv_cache needs a page and a row axis");
  const int64_t num_pages = dims[0], page_size = dims[1];
  const int64_t tokens = pages.element_count();
  if (rows.element_count() != tokens)
    return ffi::Error::InvalidArgument("pages and rows must hold one entry per token");
  if (slabs.element_type() != cache.element_type())
    return ffi::Error::InvalidArgument("the new slots must have the cache's dtype");
  const int64_t slots = num_pages * page_size;
  const size_t slot_bytes = slots > 0 ? cache.size_bytes() / size_t(slots) : 0;
  if (tokens > 0 && slabs.size_bytes() != size_t(tokens) * slot_bytes)
    return ffi::Error::InvalidArgument("each token needs exactly one cache slot of values");
  auto* dst = static_cast<char*>(out->untyped_data());
  const auto* src = static_cast<const char*>(slabs.untyped_data());
  // XLA copies a cache that was not donated into the result before the call; only when it
  // did not alias the two is the cache copied here.
  if (dst != cache.untyped_data()) std::memcpy(dst, cache.untyped_data(), cache.size_bytes());
  const int32_t* page = pages.typed_data();
  const int32_t* row = rows.typed_data();
  for (int64_t t = 0; t < tokens; ++t) {
    if (page[t] < 0 || page[t] >= num_pages || row[t] < 0 || row[t] >= page_size) continue;
    const int64_t slot = int64_t(page[t]) * page_size + row[t];
    std::memcpy(dst + size_t(slot) * slot_bytes, src + size_t(t) * slot_bytes, slot_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(attnbench_cache_write, cache_write_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
