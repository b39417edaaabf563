// The C++ hosts of the CUDA kernels, one per operator (csrc/host/launcher.h says what a host does and which launchers
// run it). Each takes the op's arguments as its schema in csrc/bridge_ops.cpp states them, plus the launcher, and
// returns the op's results; tensors live on the launcher's device type.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "launcher.h"

namespace bridge_ops::host {

// q, k, v: [B, S, H, Dh] float16/bfloat16/float32/float64; cu_group_lens int32 [G + 1]; key_mask bool [B, S] or none.
// Returns out [B, S, H, Dh] (q's dtype) and lse [B, S, H] (float32; float64 for float64 inputs).
std::tuple<at::Tensor, at::Tensor> bridge_attention(Launcher& launcher, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& cu_group_lens,
                                                    const std::optional<at::Tensor>& key_mask,
                                                    std::optional<double> scale);

// grad_out: like q; grad_lse: like lse, or none; lse: the forward's. Returns grad_q, grad_k, grad_v (q's shape and
// dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bridge_attention_backward(
    Launcher& launcher, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse, const at::Tensor& cu_group_lens,
    const std::optional<at::Tensor>& key_mask, std::optional<double> scale);

// q: [B, Hq, Dh]; prefix_k/v: [G, Hkv, P, Dh]; prefix_lens int32 [G]; suffix_k/v: [B, Hkv, T, Dh]; cu_group_lens int32
// [G + 1]; suffix_lens int32 [B] or none (all T); Dh <= 256. Returns out [B, Hq, Dh] (q's dtype) and lse [B, Hq]
// (float32; float64 for float64 inputs). prefix_lens / suffix_lens are not read here: the kernels clamp them into
// [0, P] / [0, T].
std::tuple<at::Tensor, at::Tensor> cascade_attention(Launcher& launcher, const at::Tensor& q,
                                                     const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                     const at::Tensor& prefix_lens, const at::Tensor& suffix_k,
                                                     const at::Tensor& suffix_v, const at::Tensor& cu_group_lens,
                                                     const std::optional<at::Tensor>& suffix_lens,
                                                     std::optional<double> scale);

// o_a, o_b: [..., Dh] with Dh <= 256; lse_a, lse_b: [...] in the lse dtype. Returns out [..., Dh] and lse [...].
std::tuple<at::Tensor, at::Tensor> merge_attention_states(Launcher& launcher, const at::Tensor& o_a,
                                                          const at::Tensor& lse_a, const at::Tensor& o_b,
                                                          const at::Tensor& lse_b);

}  // namespace bridge_ops::host
