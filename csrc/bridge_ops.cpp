// The bridge_ops operator library: the one schema block every backend implements, and the pybind11
// module `bridge_ops._C` that reports how this build was made.
//
// Kernels live beside this file: csrc/cpu/*.cpp register TORCH_LIBRARY_IMPL(bridge_ops, CPU, ...),
// csrc/cuda/cuda_launcher.cu registers the C++ hosts of the CUDA kernels (csrc/host/) as
// TORCH_LIBRARY_IMPL(bridge_ops, CUDA, ...); csrc/autograd.cpp the Autograd kernels, csrc/bridge_block_decode.cpp
// and csrc/decode_layer.cpp the device-independent composite decode ops. Fake kernels are registered from Python
// (bridge_ops/ops.py), so torch.compile sees each op as one node. csrc/kernel_launch.cpp adds the submodule _C.kernels:
// the CUDA kernels' launch plans, constants and kernel table, and the hosts with a Python launcher (the cupy backend,
// the tests).
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cpu/cpu_features.h"

TORCH_LIBRARY(bridge_ops, m) {
  // Attention along the batch axis within groups of rows. q, k, v: [B, S, H, Dh]; cu_group_lens: int32 [G+1];
  // key_mask: bool [B, S] or None. Returns (out [B, S, H, Dh], lse [B, S, H] in float32, float64 for
  // float64 inputs).
  m.def(
      "bridge_attention(Tensor q, Tensor k, Tensor v, Tensor cu_group_lens, Tensor? key_mask=None, "
      "float? scale=None) -> (Tensor out, Tensor lse)");
  // Gradients of bridge_attention with respect to q, k, v, given the gradients of out and (optionally) lse.
  m.def(
      "bridge_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor lse, "
      "Tensor cu_group_lens, Tensor? key_mask=None, float? scale=None) -> (Tensor grad_q, Tensor grad_k, "
      "Tensor grad_v)");
  // One inference step of a BridgeBlock, fused: hidden + o_proj(bridge_attention(q, k, v)) with q, k, v the
  // projections of rms_norm(hidden). hidden: [B, S, D] (S = 1 when decoding); key_mask: bool [B, S] or None.
  // No backward.
  m.def(
      "bridge_block_decode(Tensor hidden, Tensor norm_weight, float eps, Tensor q_weight, Tensor k_weight, "
      "Tensor v_weight, Tensor o_weight, Tensor cu_group_lens, Tensor? key_mask, int num_heads, "
      "float? scale=None) -> Tensor");
  // Cascade decode attention, one new token per row: each row's query against ONE copy of its group's prompt keys
  // (prefix) and its own generated keys (suffix), merged exactly. q: [B, Hq, Dh]; prefix_k/v: [G, Hkv, P, Dh] with
  // prefix_lens int32 [G] valid positions right-aligned (left padding); suffix_k/v: [B, Hkv, T, Dh] with suffix_lens
  // int32 [B] valid positions from the start (None: all T); cu_group_lens int32 [G+1]. Hq a multiple of Hkv (GQA).
  // Returns (out [B, Hq, Dh], lse [B, Hq] float32, float64 for float64 inputs). No backward.
  m.def(
      "cascade_attention(Tensor q, Tensor prefix_k, Tensor prefix_v, Tensor prefix_lens, Tensor suffix_k, "
      "Tensor suffix_v, Tensor cu_group_lens, Tensor? suffix_lens=None, float? scale=None) -> "
      "(Tensor out, Tensor lse)");
  // Exact merge of two attention results over disjoint key sets: o_a, o_b [..., Dh]; lse_a, lse_b [...] in the lse
  // dtype. Returns (out [..., Dh], lse [...]). No backward.
  m.def("merge_attention_states(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b) -> (Tensor out, Tensor lse)");
  // A linear layer for the few rows of a decode step: x [..., in] @ weight[out, in]^T + bias [out] -> [..., out].
  // The CPU kernel streams each weight row once for all rows (float32, at most 32 rows; anything else is at::linear).
  // No backward.
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // One Llama-family decoder layer (HF's Llama / Mistral / Qwen2 forward, op for op) for one new token per row over
  // the shared-prefix cache: hidden [B, 1, D]; cos, sin [B, Dh]; weights the 7 projections (q, k, v, o, gate, up,
  // down) and biases their optional biases; the new key/value are written into suffix_k/v[:, :, slot] and the
  // cascade attends over the prefix and suffix positions 0 .. slot. Returns the layer's output [B, 1, D]. No
  // backward.
  m.def(
      "decode_layer(Tensor hidden, Tensor cos, Tensor sin, Tensor input_norm_weight, float input_norm_eps, "
      "Tensor post_norm_weight, float post_norm_eps, Tensor[] weights, Tensor?[] biases, Tensor prefix_k, "
      "Tensor prefix_v, Tensor prefix_lens, Tensor(a!) suffix_k, Tensor(b!) suffix_v, int slot, "
      "Tensor cu_group_lens, float scaling) -> Tensor");
  // One token per row of probs [rows, vocab]: torch.multinomial(probs, 1).squeeze(1)'s draw (same tokens, same
  // generator state), its transformation and argmax in parallel over rows on the CPU. No backward.
  m.def("sample_categorical(Tensor probs, Generator? generator=None) -> Tensor");
}

namespace bridge_ops {
void bind_kernel_launch(pybind11::module_& m);  // csrc/kernel_launch.cpp: the submodule _C.kernels
}  // namespace bridge_ops

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list backends;
  backends.append("cpu");
#ifdef BRIDGE_OPS_WITH_CUDA
  backends.append("cuda");
  info["cuda_version"] = BRIDGE_OPS_CUDA_VERSION;
#else
  info["cuda_version"] = pybind11::none();
#endif
  info["backends"] = backends;
  info["torch_version"] = TORCH_VERSION;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cxx_standard"] = static_cast<long>(__cplusplus);
#ifdef _OPENMP
  info["openmp"] = static_cast<long>(_OPENMP);
#else
  info["openmp"] = pybind11::none();
#endif
  info["cpu_isa"] = bridge_ops::cpu::active_isa_name();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bridge_ops compiled operators (registered under torch.ops.bridge_ops) and build information";
  m.def("build_info", &build_info,
        "Dict: compiled backends, the torch and CUDA versions this build was made with, compiler, OpenMP, and "
        "the CPU instruction set the CPU kernels dispatch to on this machine.");
  bridge_ops::bind_kernel_launch(m);
}
