// AVX-512 kernels of the formats library (compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512dq; entered only after cpu_features().has_avx512_core()). Each function computes the
// same IEEE operations in the same order as its scalar counterpart, so results are bit-identical;
// the element encoder reaches the scalar reference's rounding by integer arithmetic on the f32
// bits instead of frexp/nearbyint.

// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* helpers (GCC bug
// 105593, fixed in later releases); the warnings are about the headers, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <array>
#include <bit>

#include "formats/simd_kernels.h"

namespace pq::formats::simd {
namespace {

// Round-to-nearest-even, saturating conversion of 16 floats to minifloat codes (element.h).
// Normal results: add the rounding bias (half a code step minus one, plus the bit that decides
// the tie) to the f32 bits and drop the extra mantissa bits, then move the exponent bias from 127
// to the format's. Subnormal results: adding 2^(emin - m + 23) makes the FPU round the value at
// the subnormal step, and the low bits of the sum are the code.
class Encoder {
 public:
  explicit Encoder(ElementType type) {
    const ElementInfo& f = element_info(type);
    const int shift = 23 - f.man_bits;
    const int emin = 1 - f.bias;
    shift_ = _mm_cvtsi32_si128(shift);
    round_bias_ = _mm512_set1_epi32((1 << (shift - 1)) - 1);
    rebias_ = _mm512_set1_epi32((127 - f.bias) << f.man_bits);
    min_normal_bits_ = _mm512_set1_epi32((127 + emin) << 23);
    magic_bits_ = _mm512_set1_epi32((127 + emin - f.man_bits + 23) << 23);
    max_code_ = _mm512_set1_epi32(static_cast<int>(f.max_finite_code));
    nan_code_ = _mm512_set1_epi32(static_cast<int>(f.nan_code));
    sign_shift_ = _mm_cvtsi32_si128(32 - f.bits);
  }

  __m512i encode(__m512 x) const {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
    const __m512i lsb = _mm512_and_si512(_mm512_srl_epi32(magnitude, shift_), _mm512_set1_epi32(1));
    const __m512i normal = _mm512_sub_epi32(
        _mm512_srl_epi32(_mm512_add_epi32(_mm512_add_epi32(magnitude, round_bias_), lsb), shift_),
        rebias_);
    const __m512 with_magic =
        _mm512_add_ps(_mm512_castsi512_ps(magnitude), _mm512_castsi512_ps(magic_bits_));
    const __m512i subnormal = _mm512_sub_epi32(_mm512_castps_si512(with_magic), magic_bits_);
    const __mmask16 is_subnormal = _mm512_cmplt_epu32_mask(magnitude, min_normal_bits_);
    __m512i code = _mm512_mask_blend_epi32(is_subnormal, normal, subnormal);
    code = _mm512_min_epu32(code, max_code_);
    const __m512i sign =
        _mm512_srl_epi32(_mm512_and_si512(bits, _mm512_set1_epi32(INT32_MIN)), sign_shift_);
    code = _mm512_or_si512(code, sign);
    const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7F800000));
    return _mm512_mask_mov_epi32(code, is_nan, nan_code_);
  }

 private:
  __m128i shift_;
  __m512i round_bias_;
  __m512i rebias_;
  __m512i min_normal_bits_;
  __m512i magic_bits_;
  __m512i max_code_;
  __m512i nan_code_;
  __m128i sign_shift_;
};

// Codes to floats. FP4 and FP6 codes index a table of the scalar decoder's values (one
// permute). Wider codes: the code's magnitude bits placed at the top of an f32 mantissa form an
// f32 with the code's exponent field; multiplying by 2^(127 - bias) rebiases it exactly
// (subnormal codes become f32 subnormals first), and specials are patched like the scalar
// decoder does.
class Decoder {
 public:
  explicit Decoder(ElementType type) : type_(type) {
    const ElementInfo& f = element_info(type);
    table_bits_ = f.bits <= 6 ? f.bits : 0;
    if (table_bits_ > 0) {
      // Magnitudes of codes 0..31 (FP4 uses 0..15 of them, with its sign bit inside the index).
      alignas(64) std::array<float, 32> table{};
      const std::uint32_t entries = table_bits_ == 4 ? 16u : 32u;
      for (std::uint32_t c = 0; c < entries; ++c) table[c] = decode_element(type, c);
      table_lo_ = _mm512_load_ps(table.data());
      table_hi_ = _mm512_load_ps(table.data() + 16);
    }
    shift_ = _mm_cvtsi32_si128(23 - f.man_bits);
    factor_ = _mm512_set1_ps(std::bit_cast<float>(static_cast<std::uint32_t>(254 - f.bias) << 23));
    magnitude_mask_ = _mm512_set1_epi32((1 << (f.bits - 1)) - 1);
    mantissa_mask_ = _mm512_set1_epi32((1 << f.man_bits) - 1);
    special_min_ = _mm512_set1_epi32(((1 << f.exp_bits) - 1) << f.man_bits);
    sign_shift_ = _mm_cvtsi32_si128(32 - f.bits);
    ieee_specials_ = f.ieee_specials;
  }

  __m512 decode(__m512i code) const {
    if (table_bits_ == 4) return _mm512_permutexvar_ps(code, table_lo_);
    if (table_bits_ == 6) {
      const __m512 magnitude = _mm512_permutex2var_ps(table_lo_, code, table_hi_);
      const __m512i sign = _mm512_slli_epi32(_mm512_srli_epi32(code, 5), 31);
      return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(magnitude), sign));
    }
    const __m512i magnitude = _mm512_and_si512(code, magnitude_mask_);
    __m512i bits = _mm512_castps_si512(
        _mm512_mul_ps(_mm512_castsi512_ps(_mm512_sll_epi32(magnitude, shift_)), factor_));
    if (ieee_specials_) {
      const __mmask16 special = _mm512_cmpge_epu32_mask(magnitude, special_min_);
      const __m512i payload =
          _mm512_or_si512(_mm512_set1_epi32(0x7F800000),
                          _mm512_sll_epi32(_mm512_and_si512(magnitude, mantissa_mask_), shift_));
      bits = _mm512_mask_mov_epi32(bits, special, payload);
    } else if (type_ == ElementType::E4M3) {
      const __mmask16 nan = _mm512_cmpeq_epi32_mask(magnitude, _mm512_set1_epi32(0x7F));
      bits = _mm512_mask_mov_epi32(bits, nan, _mm512_set1_epi32(0x7FC00000));
    }
    const __m512i sign = _mm512_sll_epi32(_mm512_andnot_si512(magnitude_mask_, code), sign_shift_);
    return _mm512_castsi512_ps(_mm512_or_si512(bits, sign));
  }

 private:
  ElementType type_;
  __m128i shift_;
  __m512 factor_;
  __m512i magnitude_mask_;
  __m512i mantissa_mask_;
  __m512i special_min_;
  __m128i sign_shift_;
  bool ieee_specials_;
  int table_bits_ = 0;
  __m512 table_lo_ = _mm512_setzero_ps();
  __m512 table_hi_ = _mm512_setzero_ps();
};

// Rounds 16 floats to the nearest value of a minifloat grid (ties to even, saturating) without
// forming codes: the value decode(encode(x)) when only dequantized values are wanted. Adding
// C = 2^(e + 23 - m), e = the binade of |x| clamped to the format's range, makes the FPU round
// |x| at the binade's code step; subtracting C again is exact.
class GridRounder {
 public:
  explicit GridRounder(ElementType type) {
    const ElementInfo& f = element_info(type);
    const int emin = 1 - f.bias;
    const int emax = floor_log2(f.max_finite);
    min_binade_ = _mm512_set1_epi32((127 + emin) << 23);
    max_binade_ = _mm512_set1_epi32((127 + emax + 1) << 23);
    step_shift_ = _mm512_set1_epi32((23 - f.man_bits) << 23);
    max_finite_ = _mm512_set1_ps(f.max_finite);
    nan_value_ = _mm512_set1_ps(decode_element(type, f.nan_code));
  }

  __m512 round(__m512 x) const {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
    __m512i binade = _mm512_and_si512(magnitude, _mm512_set1_epi32(0x7F800000));
    binade = _mm512_min_epu32(_mm512_max_epu32(binade, min_binade_), max_binade_);
    const __m512 c = _mm512_castsi512_ps(_mm512_add_epi32(binade, step_shift_));
    const __m512 rounded = _mm512_min_ps(
        _mm512_sub_ps(_mm512_add_ps(_mm512_castsi512_ps(magnitude), c), c), max_finite_);
    const __m512i sign = _mm512_and_si512(bits, _mm512_set1_epi32(INT32_MIN));
    const __m512 value = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(rounded), sign));
    const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7F800000));
    return _mm512_mask_mov_ps(value, is_nan, nan_value_);
  }

 private:
  __m512i min_binade_;
  __m512i max_binade_;
  __m512i step_shift_;
  __m512 max_finite_;
  __m512 nan_value_;
};

__mmask16 tail_mask(std::size_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << remaining) - 1);
}

// Element codes of a GroupCodec (minifloat or offset-binary integer) against one step.
class CodeKernel {
 public:
  explicit CodeKernel(const GroupCodec& codec)
      : encoder_(codec.codes().element),
        decoder_(codec.codes().element),
        int_bits_(codec.codes().int_bits) {
    if (int_bits_ > 0) {
      const int offset = 1 << (int_bits_ - 1);
      offset_ = _mm512_set1_epi32(offset);
      int_lo_ = _mm512_set1_ps(-static_cast<float>(offset));
      int_hi_ = _mm512_set1_ps(codec.code_max());
    }
  }

  // Codes of x / step (step > 0).
  __m512i quantize(__m512 x, __m512 step) const { return encode(_mm512_div_ps(x, step)); }

  // Codes of x * inverse_step, for power-of-two steps (E8M0) whose inverse is exact: the product
  // and the scalar path's quotient are then the same correctly rounded value, and a multiply is
  // much cheaper than a divide.
  __m512i quantize_exact_inverse(__m512 x, __m512 inverse_step) const {
    return encode(_mm512_mul_ps(x, inverse_step));
  }

  __m512i encode(__m512 scaled) const {
    if (int_bits_ == 0) return encoder_.encode(scaled);
    // Same as the scalar path: NaN -> 0, clamp to the code range, round to nearest even.
    const __mmask16 ordered = _mm512_cmp_ps_mask(scaled, scaled, _CMP_ORD_Q);
    const __m512 clamped =
        _mm512_maskz_mov_ps(ordered, _mm512_min_ps(_mm512_max_ps(scaled, int_lo_), int_hi_));
    return _mm512_add_epi32(_mm512_cvtps_epi32(clamped), offset_);
  }

  __m512 dequantize(__m512i code, __m512 step) const {
    if (int_bits_ == 0) return _mm512_mul_ps(decoder_.decode(code), step);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(code, offset_)), step);
  }

  __m512i zero_code() const { return int_bits_ > 0 ? offset_ : _mm512_setzero_si512(); }

 private:
  Encoder encoder_;
  Decoder decoder_;
  int int_bits_;
  __m512i offset_ = _mm512_setzero_si512();
  __m512 int_lo_ = _mm512_setzero_ps();
  __m512 int_hi_ = _mm512_setzero_ps();
};

// Vector form of GroupCodec::scale_for_amax for 16 groups (same operations, same order).
class ScaleKernel {
 public:
  explicit ScaleKernel(const GroupCodec& codec)
      : spec_(codec.scale_spec()),
        e4m3_encoder_(ElementType::E4M3),
        e4m3_decoder_(ElementType::E4M3),
        bf16_encoder_(ElementType::BF16),
        bf16_decoder_(ElementType::BF16),
        f16_encoder_(ElementType::F16),
        f16_decoder_(ElementType::F16),
        code_max_(_mm512_set1_ps(codec.code_max())),
        divisor_(_mm512_set1_ps(codec.amax_divisor())),
        elem_emax_(floor_log2(codec.code_max())) {}

  void compute(__m512 amax, __m512i* stored, __m512* step) const {
    const __mmask16 zero = _mm512_cmpeq_ps_mask(amax, _mm512_setzero_ps());
    switch (spec_.kind) {
      case ScaleKind::kE4M3OverGlobal: {
        const __m512 global = _mm512_set1_ps(spec_.global_scale);
        const __m512 unrounded = _mm512_mul_ps(global, _mm512_div_ps(amax, code_max_));
        const __m512i code = _mm512_max_epu32(e4m3_encoder_.encode(unrounded),
                                              _mm512_set1_epi32(spec_.min_e4m3_scale));
        *stored = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~zero), code);
        *step = _mm512_maskz_mov_ps(static_cast<__mmask16>(~zero),
                                    _mm512_div_ps(e4m3_decoder_.decode(code), global));
        return;
      }
      case ScaleKind::kE8M0: {
        __m512i exponent = _mm512_cvtps_epi32(_mm512_getexp_ps(amax));
        if (spec_.mx_rule == MxScaleRule::kRoundToPower2) {
          const __m512 mantissa = _mm512_getmant_ps(amax, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
          const __mmask16 up = _mm512_cmp_ps_mask(mantissa, _mm512_set1_ps(1.75f), _CMP_GE_OQ);
          exponent = _mm512_mask_add_epi32(exponent, up, exponent, _mm512_set1_epi32(1));
        }
        exponent = _mm512_sub_epi32(exponent, _mm512_set1_epi32(elem_emax_));
        exponent = _mm512_min_epi32(_mm512_max_epi32(exponent, _mm512_set1_epi32(-127)),
                                    _mm512_set1_epi32(127));
        const __m512i code =
            _mm512_maskz_add_epi32(static_cast<__mmask16>(~zero), exponent, _mm512_set1_epi32(127));
        *stored = code;
        // 2^(code - 127): the f32 exponent field, except code 0 = 2^-127, an f32 subnormal.
        const __mmask16 code_zero = _mm512_cmpeq_epi32_mask(code, _mm512_setzero_si512());
        *step = _mm512_castsi512_ps(_mm512_mask_mov_epi32(_mm512_slli_epi32(code, 23), code_zero,
                                                          _mm512_set1_epi32(0x00400000)));
        return;
      }
      case ScaleKind::kFloat:
        break;
    }
    const __m512 unrounded = _mm512_div_ps(amax, divisor_);
    __m512i code;
    __m512 value;
    round_float_scale(unrounded, &code, &value);
    const __mmask16 underflow = _mm512_cmpeq_ps_mask(value, _mm512_setzero_ps());
    __m512i one_code;
    __m512 one_value;
    round_float_scale(_mm512_set1_ps(1.0f), &one_code, &one_value);
    *stored = _mm512_mask_mov_epi32(code, underflow, one_code);
    *step = _mm512_mask_mov_ps(value, underflow, one_value);
  }

 private:
  void round_float_scale(__m512 unrounded, __m512i* code, __m512* value) const {
    switch (spec_.float_dtype) {
      case io::DType::BF16:
        *code = bf16_encoder_.encode(unrounded);
        *value = bf16_decoder_.decode(*code);
        return;
      case io::DType::F16:
        *code = f16_encoder_.encode(unrounded);
        *value = f16_decoder_.decode(*code);
        return;
      default:
        *code = _mm512_castps_si512(unrounded);
        *value = unrounded;
    }
  }

  ScaleSpec spec_;
  Encoder e4m3_encoder_;
  Decoder e4m3_decoder_;
  Encoder bf16_encoder_;
  Decoder bf16_decoder_;
  Encoder f16_encoder_;
  Decoder f16_decoder_;
  __m512 code_max_;
  __m512 divisor_;
  int elem_emax_;
};

std::uint32_t group_max_abs_bits(const float* x, std::int64_t n) {
  __m512i m = _mm512_setzero_si512();
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(static_cast<std::size_t>(n - i));
    const __m512i v = _mm512_maskz_loadu_epi32(k, x + i);
    m = _mm512_max_epu32(m, _mm512_and_si512(v, abs_mask));
  }
  return _mm512_reduce_max_epu32(m);
}

// One level of a transposing reduction: vector pairs (v[2i], v[2i+1]) become v[i], whose lanes
// selected by `mask` hold partial maxima of v[2i+1] and the others of v[2i].
template <typename Permute>
void reduce_level(__m512i* v, int pairs, __mmask16 mask, Permute permute) {
  for (int i = 0; i < pairs; ++i) {
    const __m512i kept = _mm512_mask_blend_epi32(mask, v[2 * i], v[2 * i + 1]);
    const __m512i moved = _mm512_mask_blend_epi32(mask, v[2 * i + 1], v[2 * i]);
    v[i] = _mm512_max_epu32(kept, permute(moved));
  }
}

// Lane i of the result = the largest lane of v[bit_reverse4(i)] (unsigned); v is clobbered.
// 60 operations for 16 horizontal maxima instead of ~150 with one reduction each.
__m512i transposed_max16(__m512i* v) {
  reduce_level(v, 8, 0xFF00, [](__m512i d) { return _mm512_shuffle_i32x4(d, d, 0x4E); });
  reduce_level(v, 4, 0xF0F0, [](__m512i d) { return _mm512_shuffle_i32x4(d, d, 0xB1); });
  reduce_level(v, 2, 0xCCCC, [](__m512i d) { return _mm512_shuffle_epi32(d, _MM_PERM_BADC); });
  reduce_level(v, 1, 0xAAAA, [](__m512i d) { return _mm512_shuffle_epi32(d, _MM_PERM_CDAB); });
  return v[0];
}

constexpr int kBitReverse4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

void compute_row_scales(const GroupCodec& codec, const float* x, std::int64_t groups,
                        std::int64_t group_size, GroupScale* scales) {
  const ScaleKernel kernel(codec);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  for (std::int64_t first = 0; first < groups; first += 16) {
    const std::int64_t count = std::min<std::int64_t>(16, groups - first);
    __m512i amax_bits;
    if (count == 16 && group_size % 16 == 0) {
      __m512i partial[16];
      for (int j = 0; j < 16; ++j) {
        const float* group = x + (first + kBitReverse4[j]) * group_size;
        __m512i m = _mm512_setzero_si512();
        for (std::int64_t i = 0; i < group_size; i += 16) {
          m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512(group + i), abs_mask));
        }
        partial[j] = m;
      }
      amax_bits = transposed_max16(partial);
    } else {
      alignas(64) std::array<std::uint32_t, 16> lanes{};
      for (std::int64_t j = 0; j < count; ++j) {
        lanes[j] = group_max_abs_bits(x + (first + j) * group_size, group_size);
      }
      amax_bits = _mm512_load_si512(lanes.data());
    }
    __m512i stored;
    __m512 step;
    kernel.compute(_mm512_castsi512_ps(amax_bits), &stored, &step);
    alignas(64) std::array<std::uint32_t, 16> stored_out;
    alignas(64) std::array<float, 16> step_out;
    _mm512_store_si512(stored_out.data(), stored);
    _mm512_store_ps(step_out.data(), step);
    for (std::int64_t j = 0; j < count; ++j) scales[first + j] = {stored_out[j], step_out[j]};
  }
}

}  // namespace

void encode_elements_avx512(ElementType type, std::span<const float> values,
                            std::span<std::uint8_t> codes) {
  const Encoder encoder(type);
  for (std::size_t i = 0; i < values.size(); i += 16) {
    const __mmask16 k = tail_mask(values.size() - i);
    const __m512i code = encoder.encode(_mm512_maskz_loadu_ps(k, values.data() + i));
    _mm512_mask_cvtepi32_storeu_epi8(codes.data() + i, k, code);
  }
}

void decode_elements_avx512(ElementType type, std::span<const std::uint8_t> codes,
                            std::span<float> values) {
  const Decoder decoder(type);
  for (std::size_t i = 0; i < codes.size(); i += 16) {
    const __mmask16 k = tail_mask(codes.size() - i);
    const __m512i code = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, codes.data() + i));
    _mm512_mask_storeu_ps(values.data() + i, k, decoder.decode(code));
  }
}

void encode_elements16_avx512(ElementType type, std::span<const float> values,
                              std::span<std::uint16_t> codes) {
  const Encoder encoder(type);
  for (std::size_t i = 0; i < values.size(); i += 16) {
    const __mmask16 k = tail_mask(values.size() - i);
    const __m512i code = encoder.encode(_mm512_maskz_loadu_ps(k, values.data() + i));
    _mm512_mask_cvtepi32_storeu_epi16(codes.data() + i, k, code);
  }
}

void decode_elements16_avx512(ElementType type, std::span<const std::uint16_t> codes,
                              std::span<float> values) {
  const Decoder decoder(type);
  for (std::size_t i = 0; i < codes.size(); i += 16) {
    const __mmask16 k = tail_mask(codes.size() - i);
    const __m512i code = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, codes.data() + i));
    _mm512_mask_storeu_ps(values.data() + i, k, decoder.decode(code));
  }
}

std::uint32_t max_abs_bits_avx512(std::span<const float> x) {
  return group_max_abs_bits(x.data(), static_cast<std::int64_t>(x.size()));
}

void quantize_row_avx512(const GroupCodec& codec, const float* x, std::int64_t cols,
                         std::int64_t group_size, bool scales_given, GroupScale* scales,
                         std::uint8_t* codes, float* dequantized) {
  const std::int64_t groups = cols / group_size;
  if (!scales_given) compute_row_scales(codec, x, groups, group_size, scales);
  if (codes == nullptr && dequantized == nullptr) return;  // only the scales are wanted
  const bool power_of_two_steps = codec.scale_spec().kind == ScaleKind::kE8M0;
  if (codes == nullptr && codec.codes().int_bits == 0) {
    // Only dequantized values wanted: round on the grid directly, no codes.
    const GridRounder rounder(codec.codes().element);
    for (std::int64_t gi = 0; gi < groups; ++gi) {
      const float step_value = scales[gi].step;
      const __m512 step = _mm512_set1_ps(step_value);
      const __m512 inverse_step = _mm512_set1_ps(power_of_two_steps ? 1.0f / step_value : 0.0f);
      const std::int64_t base = gi * group_size;
      for (std::int64_t i = 0; i < group_size; i += 16) {
        const __mmask16 k = tail_mask(static_cast<std::size_t>(group_size - i));
        __m512 value = _mm512_setzero_ps();
        if (step_value != 0.0f) {
          const __m512 v = _mm512_maskz_loadu_ps(k, x + base + i);
          value = rounder.round(power_of_two_steps ? _mm512_mul_ps(v, inverse_step)
                                                   : _mm512_div_ps(v, step));
        }
        _mm512_mask_storeu_ps(dequantized + base + i, k, _mm512_mul_ps(value, step));
      }
    }
    return;
  }
  const CodeKernel kernel(codec);
  for (std::int64_t gi = 0; gi < groups; ++gi) {
    const float step_value = scales[gi].step;
    const __m512 step = _mm512_set1_ps(step_value);
    const __m512 inverse_step = _mm512_set1_ps(power_of_two_steps ? 1.0f / step_value : 0.0f);
    const std::int64_t base = gi * group_size;
    for (std::int64_t i = 0; i < group_size; i += 16) {
      const __mmask16 k = tail_mask(static_cast<std::size_t>(group_size - i));
      __m512i code = kernel.zero_code();
      if (step_value != 0.0f) {
        const __m512 v = _mm512_maskz_loadu_ps(k, x + base + i);
        code = power_of_two_steps ? kernel.quantize_exact_inverse(v, inverse_step)
                                  : kernel.quantize(v, step);
      }
      if (codes) _mm512_mask_cvtepi32_storeu_epi8(codes + base + i, k, code);
      if (dequantized) {
        _mm512_mask_storeu_ps(dequantized + base + i, k, kernel.dequantize(code, step));
      }
    }
  }
}

void dequantize_row_avx512(const GroupCodec& codec, const std::uint8_t* codes,
                           const GroupScale* scales, std::int64_t cols, std::int64_t group_size,
                           float* out) {
  const CodeKernel kernel(codec);
  const std::int64_t groups = cols / group_size;
  for (std::int64_t gi = 0; gi < groups; ++gi) {
    const __m512 step = _mm512_set1_ps(scales[gi].step);
    const std::int64_t base = gi * group_size;
    for (std::int64_t i = 0; i < group_size; i += 16) {
      const __mmask16 k = tail_mask(static_cast<std::size_t>(group_size - i));
      const __m512i code = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, codes + base + i));
      _mm512_mask_storeu_ps(out + base + i, k, kernel.dequantize(code, step));
    }
  }
}

}  // namespace pq::formats::simd
