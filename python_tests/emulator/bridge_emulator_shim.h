// Host definitions of the CUDA names used by csrc/cuda/kernels/bridge_attention.cuh, so that g++ compiles the very
// kernels the GPU runs and python_tests/emulator/bridge_emulator.cpp runs them lane by lane.
//
// A warp is 32 coroutines (ucontext) on one OS thread. Every warp-collective (__shfl_*_sync, __ballot_sync,
// __syncwarp) is a barrier: a lane posts its value and yields; when all 32 lanes have arrived at a collective of the
// same kind, each reads what it needs and runs on to the next one. Exiting while other lanes wait at a collective,
// mixing collective kinds or masks other than the full warp is reported as an error (on a GPU it is undefined
// behaviour). Warps run one after the other (the kernels never synchronize across warps).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }

namespace bridge_emu {
template <typename To, typename From>
inline To bit_cast(const From& from) {  // std::bit_cast is C++20
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
}  // namespace bridge_emu

inline float __uint_as_float(unsigned int u) { return bridge_emu::bit_cast<float>(u); }
inline unsigned int __float_as_uint(float f) { return bridge_emu::bit_cast<unsigned int>(f); }
inline double __longlong_as_double(long long u) { return bridge_emu::bit_cast<double>(u); }

struct EmuDim3 {
  unsigned int x, y, z;
};

namespace bridge_emu {

enum Collective { kNone = 0, kShfl = 1, kBallot = 2, kSync = 3 };

struct State {
  EmuDim3 thread_idx[32];
  EmuDim3 block_idx{0, 0, 0}, block_dim{32, 1, 1};
  unsigned int dyn_smem = 0;
  int lane = 0;
  uint64_t slots[2][32];
  unsigned int seq[32];
  int kind[32];
  const char* error = nullptr;
};
State& state();
void arrive(int kind);  // yields to the scheduler until the whole warp has arrived

inline unsigned short float_to_half(float f) { return bit_cast<unsigned short>((_Float16)f); }
inline float half_to_float(unsigned short b) { return (float)bit_cast<_Float16>(b); }
inline unsigned int dynamic_smem_bytes() { return state().dyn_smem; }

template <typename V>
inline V exchange(unsigned int mask, V v, int src_of_lane_xor, bool is_xor, int kind) {
  State& s = state();
  if (mask != 0xffffffffu) s.error = "a collective with a partial mask";
  const int lane = s.lane;
  const int buf = s.seq[lane] & 1;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  s.slots[buf][lane] = bits;
  s.seq[lane]++;
  arrive(kind);
  const int src = is_xor ? (lane ^ src_of_lane_xor) : src_of_lane_xor;
  V r;
  const uint64_t got = s.slots[buf][src & 31];
  std::memcpy(&r, &got, sizeof(V));
  return r;
}

}  // namespace bridge_emu

#define threadIdx (::bridge_emu::state().thread_idx[::bridge_emu::state().lane])
#define blockIdx (::bridge_emu::state().block_idx)
#define blockDim (::bridge_emu::state().block_dim)

template <typename V>
inline V __shfl_xor_sync(unsigned int mask, V v, int lane_mask) {
  return bridge_emu::exchange(mask, v, lane_mask, true, bridge_emu::kShfl);
}
template <typename V>
inline V __shfl_sync(unsigned int mask, V v, int src) {
  return bridge_emu::exchange(mask, v, src, false, bridge_emu::kShfl);
}
inline unsigned int __ballot_sync(unsigned int mask, bool pred) {
  bridge_emu::State& s = bridge_emu::state();
  const int buf = s.seq[s.lane] & 1;
  bridge_emu::exchange(mask, (int)pred, 0, true, bridge_emu::kBallot);
  unsigned int r = 0;
  for (int l = 0; l < 32; ++l) r |= (s.slots[buf][l] != 0 ? 1u : 0u) << l;
  return r;
}
inline void __syncwarp(unsigned int mask = 0xffffffffu) { bridge_emu::exchange(mask, 0, 0, true, bridge_emu::kSync); }
