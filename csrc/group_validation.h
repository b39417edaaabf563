// Validation of cu_group_lens *contents* for backends whose tensors live off the host (CUDA).
//
// The offsets must be read to be checked, which on a GPU is a device-to-host copy and a stream sync. Policy:
// a cu_group_lens tensor is read and checked (check_cu_group_lens_values, the CPU op's exact ValueErrors) the first
// time a kernel sees it, and the result is cached under the tensor's storage, offset, size and version counter, so
// the tensor a decode loop passes at every step costs one sync in total; any in-place change bumps the version
// and triggers a new check. Not cached: inference tensors (no version counter), checked on every call. Not read at
// all: during CUDA graph capture, where a sync is illegal (the caller passes `may_read = false`). In every case the
// kernels clamp offsets into [0, B], so even unchecked offsets cannot make them access memory out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "checks.h"

namespace bridge_ops {

namespace detail {

struct ValidatedGroups {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;  // keeps the StorageImpl's address from being reused
  const c10::StorageImpl* impl;
  int64_t offset, numel, stride, version, batch, max_group;
};

inline std::mutex& validation_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<ValidatedGroups>& validation_cache() {
  static std::vector<ValidatedGroups> entries;
  return entries;
}

}  // namespace detail

// Largest group size of cu_group_lens (shape/dtype/device already checked), or -1 when it was not read.
// `read_to_host` copies the offsets to a contiguous CPU int32 tensor (the backend's way, e.g. a blocking copy).
template <typename ReadToHost>
int64_t validated_max_group(const at::Tensor& cu, int64_t batch, bool may_read, ReadToHost read_to_host) {
  if (!may_read) return -1;
  const bool cacheable = !cu.is_inference();
  const int64_t version = cacheable ? static_cast<int64_t>(cu._version()) : -1;
  const c10::StorageImpl* impl = cu.storage().unsafeGetStorageImpl();
  if (cacheable) {
    std::lock_guard<std::mutex> lock(detail::validation_mutex());
    for (const auto& e : detail::validation_cache()) {
      if (e.impl == impl && !e.storage.expired() && e.offset == cu.storage_offset() && e.numel == cu.numel() &&
          e.stride == cu.stride(0) && e.version == version && e.batch == batch) {
        return e.max_group;
      }
    }
  }
  const at::Tensor host = read_to_host(cu);
  const int64_t max_group = check_cu_group_lens_values(host.const_data_ptr<int32_t>(), cu.numel() - 1, batch);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(detail::validation_mutex());
    auto& cache = detail::validation_cache();
    // Drop entries whose storage is gone, then keep at most 64 (oldest out).
    std::vector<detail::ValidatedGroups> kept;
    for (auto& e : cache) {
      if (!e.storage.expired()) kept.push_back(std::move(e));
    }
    if (kept.size() >= 64) kept.erase(kept.begin());
    c10::StorageImpl* target = cu.storage().unsafeGetStorageImpl();
    kept.push_back(
        {c10::weak_intrusive_ptr<c10::StorageImpl>(c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(target)), impl,
         cu.storage_offset(), cu.numel(), cu.stride(0), version, batch, max_group});
    cache = std::move(kept);
  }
  return max_group;
}

}  // namespace bridge_ops
