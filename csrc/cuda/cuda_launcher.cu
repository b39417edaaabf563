// The nvcc launcher (csrc/host/launcher.h): every kernel of kernels/kernel_table.h compiled into _C, launched by name
// with <<<>>> on the current CUDA stream, and the C++ hosts (csrc/host/) bound with it as the ops' CUDA kernels.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstddef>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "../host/hosts.h"
#include "kernels/kernel_table.cuh"

namespace bridge_ops::cuda {
namespace {

namespace kn = bridge_ops::kernels;

// One kernel of the table: how to launch it (its params struct by value, over the grid, on the stream) and the size of
// that struct.
struct Entry {
  void (*launch)(const kn::Grid& grid, const void* params, cudaStream_t stream);
  size_t params_bytes;
};

class CudaLauncher final : public Launcher {
 public:
  CudaLauncher() {
    kn::for_each_kernel([this](auto instance) {
      using Instance = decltype(instance);
      using Params = typename kn::ParamsOf<decltype(kn::kernel_function<Instance>())>::type;
      const auto launch = [](const kn::Grid& grid, const void* params, cudaStream_t stream) {
        const auto kernel = kn::kernel_function<Instance>();
        kernel<<<static_cast<unsigned int>(grid.blocks), grid.threads, grid.smem_bytes, stream>>>(
            *static_cast<const Params*>(params));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      table_[Instance::name()] = Entry{launch, sizeof(Params)};
    });
  }

  const std::string& name() const override { return name_; }
  c10::DeviceType device_type() const override { return c10::DeviceType::CUDA; }

  int num_sms(c10::DeviceIndex device) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (device >= static_cast<int>(sm_counts_.size())) sm_counts_.resize(device + 1, 0);
    if (sm_counts_[device] == 0) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_counts_[device], cudaDevAttrMultiProcessorCount, device));
    }
    return sm_counts_[device];
  }

  bool capturing(c10::DeviceIndex) override {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }

  void launch(const std::string& kernel, const kn::Grid& grid, const void* params, size_t params_bytes) override {
    const auto it = table_.find(kernel);
    TORCH_CHECK(it != table_.end(), "bridge_ops: no CUDA kernel named ", kernel);
    TORCH_CHECK(params_bytes == it->second.params_bytes, "bridge_ops: ", kernel, " takes a params struct of ",
                it->second.params_bytes, " bytes, got ", params_bytes);
    TORCH_CHECK(grid.blocks > 0 && grid.blocks <= 2147483647LL, "bridge_ops: ", kernel, " launched over ", grid.blocks,
                " blocks");
    it->second.launch(grid, params, c10::cuda::getCurrentCUDAStream().stream());
  }

 private:
  const std::string name_ = "cuda";
  std::unordered_map<std::string, Entry> table_;
  std::mutex mutex_;
  std::vector<int> sm_counts_;
};

CudaLauncher& launcher() {
  static CudaLauncher instance;
  return instance;
}

std::tuple<at::Tensor, at::Tensor> bridge_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& cu_group_lens,
                                                         const std::optional<at::Tensor>& key_mask,
                                                         std::optional<double> scale) {
  return host::bridge_attention(launcher(), q, k, v, cu_group_lens, key_mask, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bridge_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& lse, const at::Tensor& cu_group_lens,
    const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
  return host::bridge_attention_backward(launcher(), grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask, scale);
}

std::tuple<at::Tensor, at::Tensor> cascade_attention_cuda(const at::Tensor& q, const at::Tensor& prefix_k,
                                                          const at::Tensor& prefix_v, const at::Tensor& prefix_lens,
                                                          const at::Tensor& suffix_k, const at::Tensor& suffix_v,
                                                          const at::Tensor& cu_group_lens,
                                                          const std::optional<at::Tensor>& suffix_lens,
                                                          std::optional<double> scale) {
  return host::cascade_attention(launcher(), q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, cu_group_lens,
                                 suffix_lens, scale);
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& o_a, const at::Tensor& lse_a,
                                                               const at::Tensor& o_b, const at::Tensor& lse_b) {
  return host::merge_attention_states(launcher(), o_a, lse_a, o_b, lse_b);
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, CUDA, m) {
  m.impl("bridge_attention", &bridge_attention_cuda);
  m.impl("bridge_attention_backward", &bridge_attention_backward_cuda);
  m.impl("cascade_attention", &cascade_attention_cuda);
  m.impl("merge_attention_states", &merge_attention_states_cuda);
}

}  // namespace bridge_ops::cuda
