// Generated from dps_fast/_contract.py by `python dps_fast/_contract.py`: edit that file, not this one
// (tests/test_fast_path_contract.py checks that the two agree).
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

// How a decline starts (a NotImplementedError the Python path catches).
#define DPS_FAST_DECLINES "dps_fast: the eager fast path declines"

namespace dps_fast {
namespace contract {

constexpr double kGammaLow = 0.0;  // exclusive
constexpr double kGammaHigh = 1.0;  // inclusive
constexpr double kTauEMin = 1.1754943508222875e-38;  // FLT_MIN
constexpr const char* kBackendEnv = "DPS_FAST_BACKEND";
constexpr int kEagerArguments = 10;
constexpr const char* kEagerSchema = "dps_ce_eager(Tensor logits, Tensor index, Tensor(a!) alpha, float gamma, float tau_e, str target, str reduction, bool update, bool validate, str? backend) -> Tensor";

// The position of a target in ['posterior', 'prior'], or -1.
inline int target_position(c10::string_view name) {
  if (name == "posterior") return 0;
  if (name == "prior") return 1;
  return -1;
}

// The position of a reduction in ['none', 'mean', 'sum'], or -1.
inline int reduction_code(c10::string_view name) {
  if (name == "none") return 0;
  if (name == "mean") return 1;
  if (name == "sum") return 2;
  return -1;
}

// The position of a backend the fast path runs in ['auto', 'cpu'], or -1.
inline int eager_backend_position(c10::string_view name) {
  if (name == "auto") return 0;
  if (name == "cpu") return 1;
  return -1;
}

inline bool fused_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float ||
         t == c10::ScalarType::BFloat16 ||
         t == c10::ScalarType::Half;
}

inline bool index_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Long ||
         t == c10::ScalarType::Int ||
         t == c10::ScalarType::Short ||
         t == c10::ScalarType::Char ||
         t == c10::ScalarType::Byte;
}

}  // namespace contract
}  // namespace dps_fast
