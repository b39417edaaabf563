// Runs the CUDA kernels of csrc/cuda/kernels/bridge_attention.cuh and cascade_attention.cuh on the CPU, lane by lane
// (see bridge_emulator_shim.h). Built by python_tests/emulator_launcher.py with g++ and loaded with ctypes; the tests
// run the ops' C++ hosts (csrc/host/, through bridge_ops._C.kernels) with a launcher that calls emu_launch, so the
// host a CUDA build ships (checks, launch plan, params structs, alignment, workspace, casts) and the same kernels run
// as on a GPU.
//
// C API:
//   int emu_launch(const char* name, long long blocks, int threads, int smem_bytes, const void* params,
//                  long long params_bytes, char* err, int n)
//       kernel `name` (kernel_table.h) with the params struct at `params` (its size checked) as its one argument.
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
#include <vector>

#include "../../csrc/cuda/kernels/kernel_table.cuh"

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

namespace kn = bridge_ops::kernels;

// One kernel of kernel_table.h: runs it on the params struct at the pointer; the size of that struct.
struct Entry {
  std::function<void(const void*)> run;
  size_t params_bytes;
};

std::map<std::string, Entry>& registry() {
  static std::map<std::string, Entry> r;
  return r;
}

struct Register {
  Register() {
    kn::for_each_kernel([](auto instance) {
      using Instance = decltype(instance);
      const auto kernel = kn::kernel_function<Instance>();
      using Params = typename kn::ParamsOf<decltype(kn::kernel_function<Instance>())>::type;
      registry()[Instance::name()] =
          Entry{[kernel](const void* p) { kernel(*static_cast<const Params*>(p)); }, sizeof(Params)};
    });
  }
} register_all;

}  // namespace

extern "C" int emu_launch(const char* name, long long blocks, int threads, int smem_bytes, const void* params,
                          long long params_bytes, char* err, int err_len) {
  auto it = registry().find(name);
  if (it == registry().end()) {
    std::snprintf(err, err_len, "no kernel named %s", name);
    return 1;
  }
  if (params_bytes != (long long)it->second.params_bytes) {
    std::snprintf(err, err_len, "%s takes a params struct of %zu bytes, got %lld", name, it->second.params_bytes,
                  params_bytes);
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
  std::function<void()> body = [&]() { it->second.run(params); };
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
