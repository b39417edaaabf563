// Runs the CUDA kernels of csrc/cuda/kernels/bridge_attention.cuh and prefix_attention.cuh on the CPU, lane by lane
// (see bridge_emulator_shim.h). Built by python_tests/emulator_launcher.py with g++ and loaded with ctypes; the tests
// drive it through bridge_ops.cupy_backend with an emulator launcher in place of cupy, so the same host code (launch
// plan and parameter structs of launch.h through bridge_ops._C.kernels, alignment, workspace, casts) and the same
// kernels run as on a GPU.
//
// C API:
//   int emu_launch(const char* name, long long blocks, int threads, int smem_bytes, void** params, char* err, int n)
//       params[i] points at the value of the kernel's i-th argument (as cuLaunchKernel's kernelParams).
//   int emu_plan(int is_double, int dim, long long tasks, int num_sms, int backward, long long max_group,
//                long long* out)   // launch.h's plan_launch as this build sees it: fast, td, threads, blocks,
//                                  // smem_bytes, workspace (a test compares it with bridge_ops._C's)
//   int emu_constants(long long* out)  // kKeyTile, kRowsPerPass, kLanesPerRow, kMaxTd, smem per warp by TD
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../csrc/cuda/kernels/bridge_attention.cuh"
#include "../../csrc/cuda/kernels/prefix_attention.cuh"

namespace bridge_ops {
namespace kernels {
float4 bridge_smem[1 << 16];  // 1 MiB of "shared memory" (one block at a time)
}
}  // namespace bridge_ops

namespace bridge_emu {
namespace {
State g_state;
ucontext_t g_sched;
ucontext_t g_lanes[32];
constexpr size_t kStack = 256 * 1024;
std::vector<char> g_stacks(32 * kStack);
bool g_done[32];
std::function<void()>* g_body = nullptr;

void lane_entry() {
  (*g_body)();
  g_done[g_state.lane] = true;  // returns to uc_link (the scheduler)
}

// Runs one warp to completion; returns an error message or nullptr.
const char* run_warp(std::function<void()>& body) {
  g_body = &body;
  for (int l = 0; l < 32; ++l) {
    getcontext(&g_lanes[l]);
    g_lanes[l].uc_stack.ss_sp = g_stacks.data() + l * kStack;
    g_lanes[l].uc_stack.ss_size = kStack;
    g_lanes[l].uc_link = &g_sched;
    makecontext(&g_lanes[l], lane_entry, 0);
    g_done[l] = false;
    g_state.seq[l] = 0;
    g_state.kind[l] = kNone;
  }
  while (true) {
    for (int l = 0; l < 32; ++l) {
      if (g_done[l]) continue;
      g_state.lane = l;
      g_state.kind[l] = kNone;
      swapcontext(&g_sched, &g_lanes[l]);
      if (g_state.error != nullptr) return g_state.error;
    }
    int done = 0;
    for (int l = 0; l < 32; ++l) done += g_done[l];
    if (done == 32) return nullptr;
    if (done > 0) return "some lanes exited while others wait at a warp collective";
    int kind = -1;
    for (int l = 0; l < 32; ++l) {
      if (kind == -1) kind = g_state.kind[l];
      if (g_state.kind[l] != kind) return "lanes of a warp are at different kinds of warp collectives";
    }
  }
}
}  // namespace

State& state() { return g_state; }

void arrive(int kind) {
  const int l = g_state.lane;
  g_state.kind[l] = kind;
  swapcontext(&g_lanes[l], &g_sched);
}
}  // namespace bridge_emu

namespace {

using Invoker = std::function<void(void**)>;

template <typename... Args, size_t... I>
void call_with(void (*f)(Args...), void** params, std::index_sequence<I...>) {
  f(*static_cast<typename std::remove_reference<Args>::type*>(params[I])...);
}

template <typename... Args>
Invoker invoker(void (*f)(Args...)) {
  return [f](void** params) { call_with(f, params, std::index_sequence_for<Args...>{}); };
}

std::map<std::string, Invoker>& registry() {
  static std::map<std::string, Invoker> r;
  return r;
}

namespace kn = bridge_ops::kernels;

// Kernel names as the cupy backend spells them (NVRTC name expressions), e.g.
// "bridge_ops::kernels::bridge_attention_fwd<bridge_ops::kernels::bf16_t, 4>".
template <typename T>
const char* type_name();
template <>
const char* type_name<float>() {
  return "float";
}
template <>
const char* type_name<double>() {
  return "double";
}
template <>
const char* type_name<kn::bf16_t>() {
  return "bridge_ops::kernels::bf16_t";
}
template <>
const char* type_name<kn::half_t>() {
  return "bridge_ops::kernels::half_t";
}

template <typename F>
void add(const std::string& kernel, const std::string& args, F* f) {
  registry()["bridge_ops::kernels::" + kernel + "<" + args + ">"] = invoker(f);
}

// The fast kernels of every register layout of launch.h (kTdValues).
template <typename T, int I = 0>
void add_fast() {
  constexpr int TD = kn::kTdValues[I];
  const std::string args = std::string(type_name<T>()) + ", " + std::to_string(TD);
  add("bridge_attention_fwd", args, &kn::bridge_attention_fwd<T, TD>);
  add("bridge_attention_bwd", args, &kn::bridge_attention_bwd<T, TD>);
  if constexpr (I + 1 < kn::kNumTd) add_fast<T, I + 1>();
}

// The kernels of storage type T with accumulation type A.
template <typename T, typename A>
void add_all() {
  const std::string args = std::string(type_name<T>()) + ", " + type_name<A>();
  if constexpr (!std::is_same<T, double>::value) add_fast<T>();
  add("bridge_attention_fwd_simple", args, &kn::bridge_attention_fwd_simple<T, A>);
  add("bridge_attention_bwd_simple", args, &kn::bridge_attention_bwd_simple<T, A>);
  add("cascade_prefix_chunks", args, &kn::cascade_prefix_chunks<T, A>);
  add("cascade_suffix_merge", args, &kn::cascade_suffix_merge<T, A>);
  add("merge_states", args, &kn::merge_states<T, A>);
}

struct Register {
  Register() {
    add_all<float, float>();
    add_all<double, double>();
    add_all<kn::bf16_t, float>();
    add_all<kn::half_t, float>();
  }
} register_all;

}  // namespace

extern "C" int emu_launch(const char* name, long long blocks, int threads, int smem_bytes, void** params, char* err,
                          int err_len) {
  auto it = registry().find(name);
  if (it == registry().end()) {
    std::snprintf(err, err_len, "no kernel named %s", name);
    return 1;
  }
  if (threads % 32 != 0 || threads <= 0 || threads > 1024) {
    std::snprintf(err, err_len, "bad block size %d", threads);
    return 1;
  }
  if (smem_bytes < 0 || smem_bytes > (int)sizeof(bridge_ops::kernels::bridge_smem) ||
      smem_bytes > bridge_ops::kernels::kSmemLimit) {
    std::snprintf(err, err_len, "dynamic shared memory %d bytes is over the limit", smem_bytes);
    return 1;
  }
  bridge_emu::State& s = bridge_emu::state();
  s.error = nullptr;
  s.block_dim = EmuDim3{(unsigned)threads, 1, 1};
  s.dyn_smem = (unsigned)smem_bytes;
  std::function<void()> body = [&]() { it->second(params); };
  for (long long b = 0; b < blocks; ++b) {
    s.block_idx = EmuDim3{(unsigned)b, 0, 0};
    // Shared memory starts as NaN: reading anything not staged shows up in the results.
    float* sm = reinterpret_cast<float*>(bridge_ops::kernels::bridge_smem);
    for (int i = 0; i < smem_bytes / 4; ++i) sm[i] = std::nanf("");
    for (int w = 0; w < threads / 32; ++w) {
      for (int l = 0; l < 32; ++l) s.thread_idx[l] = EmuDim3{(unsigned)(w * 32 + l), 0, 0};
      const char* e = bridge_emu::run_warp(body);
      if (e != nullptr) {
        std::snprintf(err, err_len, "%s (kernel %s, block %lld, warp %d)", e, name, b, w);
        return 1;
      }
    }
  }
  return 0;
}

extern "C" int emu_plan(int is_double, int dim, long long tasks, int num_sms, int backward, long long max_group,
                        long long* out) {
  const kn::LaunchPlan p = kn::plan_launch(is_double != 0, dim, tasks, num_sms, backward != 0, max_group);
  out[0] = p.fast;
  out[1] = p.td;
  out[2] = p.threads;
  out[3] = p.blocks;
  out[4] = p.smem_bytes;
  out[5] = p.workspace;
  return 0;
}

extern "C" int emu_constants(long long* out) {
  out[0] = kn::kKeyTile;
  out[1] = kn::kRowsPerPass;
  out[2] = kn::kLanesPerRow;
  out[3] = kn::kMaxTd;
  for (int i = 0; i < kn::kNumTd; ++i) {
    out[4 + i] = kn::forward_smem_bytes_per_warp(kn::kTdValues[i]);
    out[8 + i] = kn::backward_smem_bytes_per_warp(kn::kTdValues[i]);
  }
  return 0;
}
