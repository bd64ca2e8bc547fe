#pragma once

#include <string>
#include <vector>

#include "formats/group_codec.h"

namespace pq::formats::test {

inline GroupCodec nvfp4(float global) {
  return GroupCodec({ElementType::E2M1, 0},
                    {.kind = ScaleKind::kE4M3OverGlobal, .global_scale = global});
}
inline GroupCodec mx(ElementType e, MxScaleRule rule = MxScaleRule::kOcpFloor) {
  return GroupCodec({e, 0}, {.kind = ScaleKind::kE8M0, .mx_rule = rule});
}
inline GroupCodec int_codec(int bits, io::DType scale_dtype = io::DType::BF16) {
  return GroupCodec({ElementType::E2M1, bits},
                    {.kind = ScaleKind::kFloat, .float_dtype = scale_dtype});
}
inline GroupCodec fp8_f32() {
  return GroupCodec({ElementType::E4M3, 0},
                    {.kind = ScaleKind::kFloat, .float_dtype = io::DType::F32});
}

// One codec of every element type, scale kind, MX rule and float scale dtype.
inline std::vector<GroupCodec> all_codecs() {
  return {nvfp4(448.0f * 6.0f / 3.0f),
          nvfp4(1.0f),
          mx(ElementType::E2M1),
          mx(ElementType::E2M1, MxScaleRule::kRoundToPower2),
          mx(ElementType::E2M3),
          mx(ElementType::E3M2),
          mx(ElementType::E4M3),
          mx(ElementType::E4M3, MxScaleRule::kRoundToPower2),
          fp8_f32(),
          int_codec(4),
          int_codec(8),
          int_codec(4, io::DType::F16),
          int_codec(8, io::DType::F32)};
}

inline std::string describe(const GroupCodec& c) {
  return std::string(c.codes().int_bits ? "int" + std::to_string(c.codes().int_bits)
                                        : std::string(element_info(c.codes().element).name)) +
         " scale kind " + std::to_string(static_cast<int>(c.scale_spec().kind)) + " rule " +
         std::to_string(static_cast<int>(c.scale_spec().mx_rule));
}

}  // namespace pq::formats::test
