// Which instruction set the CPU kernels run with on this machine.
//
// Every CPU kernel body is compiled twice: once for the baseline x86-64 / generic target and once with
// AVX2 + FMA (see BRIDGE_OPS_CPU_DISPATCH in vector_ops.h). The choice is made once per process from
// CPUID; BRIDGE_OPS_CPU_ISA=default forces the baseline path (tests use it to cover both builds).
#pragma once

#include <cstdlib>
#include <cstring>

namespace bridge_ops::cpu {

enum class Isa { kDefault, kAvx2Fma };

inline Isa detect_isa() {
  const char* forced = std::getenv("BRIDGE_OPS_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) return Isa::kDefault;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2Fma;
#endif
  return Isa::kDefault;
}

inline Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

inline const char* active_isa_name() { return active_isa() == Isa::kAvx2Fma ? "avx2+fma" : "default"; }

}  // namespace bridge_ops::cpu
