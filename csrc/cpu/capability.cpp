// Which instruction-set variant of the CPU kernels runs (kernels.h), and the op that reports it.
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels.h"

namespace rezero::cpu {
namespace {

struct Variant {
  const char* name;
  bool supported;  // the CPU has every feature the variant was compiled for
};

#define REZERO_CPU_VARIANT_ENTRY(variant, ...) Variant{#variant, REZERO_CPU_SUPPORTS_##variant()},

const auto& variants() {
  static const auto table = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
#endif
    return std::array{REZERO_CPU_VARIANTS(REZERO_CPU_VARIANT_ENTRY)};
  }();
  return table;
}

std::string upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
  return s;
}

// Index of the variant called `name` (case-insensitive), or -1.
int find(const std::string& name) {
  const auto& v = variants();
  for (size_t i = 0; i < v.size(); ++i)
    if (upper(name) == v[i].name) return static_cast<int>(i);
  return -1;
}

std::string names() {
  std::string s;
  for (const auto& v : variants()) s += (s.empty() ? "" : ", ") + std::string(v.name);
  return s;
}

int choose() {
  const auto& v = variants();
  int best = 0;
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i].supported) best = static_cast<int>(i);
  if (v.size() == 1) return 0;  // a REZERO_CPU_ARCH build: nothing to choose
  if (const char* ours = std::getenv("REZERO_CPU_CAPABILITY"); ours != nullptr && *ours) {
    const int i = find(ours);
    TORCH_CHECK(i >= 0, "REZERO_CPU_CAPABILITY=", ours, " is not a CPU variant of this build (",
                names(), ")");
    return std::min(i, best);
  }
  // ATen's other values (e.g. zvector, sve256) name no variant of ours: ignored.
  if (const char* aten = std::getenv("ATEN_CPU_CAPABILITY"); aten != nullptr && *aten) {
    const int i = find(aten);
    if (i >= 0) return std::min(i, best);
  }
  return best;
}

}  // namespace

int cpu_variant() {
  static const int chosen = choose();
  return chosen;
}

const char* cpu_variant_name(int variant) { return variants().at(variant).name; }

std::vector<std::string> cpu_variant_names() {
  std::vector<std::string> out;
  for (const auto& v : variants()) out.emplace_back(v.name);
  return out;
}

}  // namespace rezero::cpu

// torch.ops.rezero_kernels.cpu_capability(): the variant that runs (the environment is read the
// first time a CPU kernel or this op runs, and never again); cpu_capabilities(): every variant
// this build compiled, lowest first.
TORCH_LIBRARY_FRAGMENT(rezero_kernels, m) {
  m.def("cpu_capability() -> str", [] {
    return std::string(rezero::cpu::cpu_variant_name(rezero::cpu::cpu_variant()));
  });
  m.def("cpu_capabilities() -> str[]", &rezero::cpu::cpu_variant_names);
}
