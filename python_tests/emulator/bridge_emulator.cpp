// Runs the CUDA kernels of csrc/cuda/kernels/bridge_attention.cuh on the CPU, lane by lane (see
// bridge_emulator_shim.h). Built by python_tests/emulator/__init__.py with g++ and loaded with ctypes; the tests
// drive it through bridge_ops.cupy_backend with an emulator launcher in place of cupy, so the same host code
// (launch plan, argument order, alignment, workspace, casts) and the same kernels run as on a GPU.
//
// C API:
//   int emu_launch(const char* name, long long blocks, int threads, int smem_bytes, void** params, char* err, int n)
//       params[i] points at the value of the kernel's i-th argument (as cuLaunchKernel's kernelParams).
//   int emu_plan(int is_double, int dim, long long tasks, int num_sms, int backward, long long max_group,
//                long long* out)   // out: fast, td, threads, blocks, smem_bytes, workspace
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>
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

#define BRIDGE_NS "bridge_ops::kernels::"
#define REG_FAST(T, TD)                                                                                       \
  registry()[BRIDGE_NS "bridge_attention_fwd<" #T ", " #TD ">"] =                                             \
      invoker(&bridge_ops::kernels::bridge_attention_fwd<T, TD>);                                              \
  registry()[BRIDGE_NS "bridge_attention_bwd<" #T ", " #TD ">"] =                                             \
      invoker(&bridge_ops::kernels::bridge_attention_bwd<T, TD>);
#define REG_FAST_ALL(T) REG_FAST(T, 1) REG_FAST(T, 2) REG_FAST(T, 4) REG_FAST(T, 8)
#define REG_SIMPLE(T, A)                                                                                      \
  registry()[BRIDGE_NS "bridge_attention_fwd_simple<" #T ", " #A ">"] =                                       \
      invoker(&bridge_ops::kernels::bridge_attention_fwd_simple<T, A>);                                        \
  registry()[BRIDGE_NS "bridge_attention_bwd_simple<" #T ", " #A ">"] =                                       \
      invoker(&bridge_ops::kernels::bridge_attention_bwd_simple<T, A>);

#define REG_CASCADE(T, A)                                                                                     \
  registry()[BRIDGE_NS "cascade_prefix_chunks<" #T ", " #A ">"] =                                             \
      invoker(&bridge_ops::kernels::cascade_prefix_chunks<T, A>);                                              \
  registry()[BRIDGE_NS "cascade_suffix_merge<" #T ", " #A ">"] =                                              \
      invoker(&bridge_ops::kernels::cascade_suffix_merge<T, A>);                                               \
  registry()[BRIDGE_NS "merge_states<" #T ", " #A ">"] = invoker(&bridge_ops::kernels::merge_states<T, A>);

struct Register {
  Register() {
    REG_CASCADE(float, float)
    REG_CASCADE(double, double)
    REG_CASCADE(bridge_ops::kernels::bf16_t, float)
    REG_CASCADE(bridge_ops::kernels::half_t, float)
    REG_FAST_ALL(float)
    REG_FAST_ALL(bridge_ops::kernels::bf16_t)
    REG_FAST_ALL(bridge_ops::kernels::half_t)
    REG_SIMPLE(float, float)
    REG_SIMPLE(double, double)
    REG_SIMPLE(bridge_ops::kernels::bf16_t, float)
    REG_SIMPLE(bridge_ops::kernels::half_t, float)
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
  if (smem_bytes < 0 || smem_bytes > (int)sizeof(bridge_ops::kernels::bridge_smem) || smem_bytes > BRIDGE_SMEM_LIMIT) {
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
  const bridge_ops::kernels::LaunchPlan p =
      bridge_ops::kernels::plan_launch(is_double, dim, tasks, num_sms, backward, max_group);
  out[0] = p.fast;
  out[1] = p.td;
  out[2] = p.threads;
  out[3] = p.blocks;
  out[4] = p.smem_bytes;
  out[5] = p.workspace;
  return 0;
}

extern "C" int emu_constants(long long* out) {
  out[0] = BRIDGE_KEY_TILE;
  out[1] = BRIDGE_ROWS_PER_PASS;
  out[2] = BRIDGE_LANES_PER_ROW;
  out[3] = BRIDGE_MAX_TD;
  for (int i = 0; i < 4; ++i) {
    out[4 + i] = bridge_ops::kernels::forward_smem_bytes_per_warp(1 << i);
    out[8 + i] = bridge_ops::kernels::backward_smem_bytes_per_warp(1 << i);
  }
  return 0;
}
