// AVX2 kernels of the formats library, 8 lanes wide, for CPUs without AVX-512 (AMD Zen 1-3, Intel
// client parts); compiled with -mavx2 -mfma, entered only after cpu_features().has_avx2_fma().
// They port formats_avx512.cpp: each function computes the same IEEE operations in the same order
// as its scalar counterpart (element.cpp, group_codec.cpp), so results are bit-identical. AVX2 has
// no mask registers, no getexp/getmant and no narrowing stores: lane masks are vectors whose lanes
// are all ones or all zeros, exponents come from the f32 bits, and codes are packed before they
// are stored.

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>

#include "formats/simd_kernels.h"

namespace pq::formats::simd {
namespace {

// Lanes [0, remaining) set, for _mm256_maskload_ps / _mm256_maskstore_ps, which never touch
// memory under clear lanes (and read them as zero).
__m256i tail_mask(std::size_t remaining) {
  const int count = remaining >= 8 ? 8 : static_cast<int>(remaining);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The first min(remaining, 8) floats at x; lanes past the end are 0.
__m256 load_floats(const float* x, std::size_t remaining) {
  return remaining >= 8 ? _mm256_loadu_ps(x) : _mm256_maskload_ps(x, tail_mask(remaining));
}

void store_floats(float* out, __m256 v, std::size_t remaining) {
  if (remaining >= 8) return _mm256_storeu_ps(out, v);
  _mm256_maskstore_ps(out, tail_mask(remaining), v);
}

// Codes (lanes below 2^16) as eight 16-bit words: unsigned saturation leaves them unchanged.
__m128i pack_words(__m256i code) {
  return _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
}

// Codes below 2^8 as the low eight bytes.
__m128i pack_bytes(__m256i code) {
  const __m128i words = pack_words(code);
  return _mm_packus_epi16(words, words);
}

void store_codes(std::uint8_t* out, __m256i code, std::size_t remaining) {
  const __m128i bytes = pack_bytes(code);
  if (remaining >= 8) return _mm_storel_epi64(reinterpret_cast<__m128i*>(out), bytes);
  alignas(16) std::array<std::uint8_t, 16> buffer;
  _mm_store_si128(reinterpret_cast<__m128i*>(buffer.data()), bytes);
  std::memcpy(out, buffer.data(), remaining);
}

void store_codes(std::uint16_t* out, __m256i code, std::size_t remaining) {
  const __m128i words = pack_words(code);
  if (remaining >= 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(out), words);
  alignas(16) std::array<std::uint16_t, 8> buffer;
  _mm_store_si128(reinterpret_cast<__m128i*>(buffer.data()), words);
  std::memcpy(out, buffer.data(), remaining * sizeof(std::uint16_t));
}

__m256i load_codes(const std::uint8_t* in, std::size_t remaining) {
  if (remaining >= 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in)));
  }
  alignas(16) std::array<std::uint8_t, 16> buffer{};
  std::memcpy(buffer.data(), in, remaining);
  return _mm256_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(buffer.data())));
}

__m256i load_codes(const std::uint16_t* in, std::size_t remaining) {
  if (remaining >= 8) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)));
  }
  alignas(16) std::array<std::uint16_t, 8> buffer{};
  std::memcpy(buffer.data(), in, remaining * sizeof(std::uint16_t));
  return _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(buffer.data())));
}

// Round-to-nearest-even, saturating conversion of 8 floats to minifloat codes (element.h), the
// steps of encode_element: normal results add the rounding bias (half a code step minus one, plus
// the bit that decides the tie) to the f32 bits and drop the extra mantissa bits, then move the
// exponent bias from 127 to the format's; subnormal results add 2^(emin - m + 23) so that the FPU
// rounds at the subnormal step, and the low bits of the sum are the code.
class Encoder {
 public:
  explicit Encoder(ElementType type) {
    const ElementInfo& f = element_info(type);
    const int shift = 23 - f.man_bits;
    const int emin = 1 - f.bias;
    shift_ = _mm_cvtsi32_si128(shift);
    round_bias_ = _mm256_set1_epi32((1 << (shift - 1)) - 1);
    rebias_ = _mm256_set1_epi32((127 - f.bias) << f.man_bits);
    min_normal_bits_ = _mm256_set1_epi32((127 + emin) << 23);
    magic_bits_ = _mm256_set1_epi32((127 + emin - f.man_bits + 23) << 23);
    max_code_ = _mm256_set1_epi32(static_cast<int>(f.max_finite_code));
    nan_code_ = _mm256_set1_epi32(static_cast<int>(f.nan_code));
    sign_shift_ = _mm_cvtsi32_si128(32 - f.bits);
  }

  __m256i encode(__m256 x) const {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i lsb = _mm256_and_si256(_mm256_srl_epi32(magnitude, shift_), _mm256_set1_epi32(1));
    const __m256i normal = _mm256_sub_epi32(
        _mm256_srl_epi32(_mm256_add_epi32(_mm256_add_epi32(magnitude, round_bias_), lsb), shift_),
        rebias_);
    const __m256 with_magic =
        _mm256_add_ps(_mm256_castsi256_ps(magnitude), _mm256_castsi256_ps(magic_bits_));
    const __m256i subnormal = _mm256_sub_epi32(_mm256_castps_si256(with_magic), magic_bits_);
    // AVX2 compares only signed integers; magnitudes are below 2^31, so that is the same order.
    const __m256i is_subnormal = _mm256_cmpgt_epi32(min_normal_bits_, magnitude);
    __m256i code = _mm256_blendv_epi8(normal, subnormal, is_subnormal);
    code = _mm256_min_epu32(code, max_code_);
    const __m256i sign =
        _mm256_srl_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(INT32_MIN)), sign_shift_);
    code = _mm256_or_si256(code, sign);
    const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F800000));
    return _mm256_blendv_epi8(code, nan_code_, is_nan);
  }

 private:
  __m128i shift_;
  __m256i round_bias_;
  __m256i rebias_;
  __m256i min_normal_bits_;
  __m256i magic_bits_;
  __m256i max_code_;
  __m256i nan_code_;
  __m128i sign_shift_;
};

// Codes to floats. FP4 and FP6 codes index a table of the scalar decoder's values: a permute reads
// an 8-entry slice by the code's low 3 bits, and blends on bits 3 (and 4) pick the slice; this
// also keeps their many subnormal codes away from the multiply below. Wider codes: the code's
// magnitude bits placed at the top of an f32 mantissa form an f32 with the code's exponent field;
// multiplying by 2^(127 - bias) rebiases it exactly (subnormal codes become f32 subnormals first),
// and specials are patched like the scalar decoder does.
class Decoder {
 public:
  explicit Decoder(ElementType type) : type_(type) {
    const ElementInfo& f = element_info(type);
    table_bits_ = f.bits <= 6 ? f.bits : 0;
    if (table_bits_ > 0) {
      // Magnitudes of codes 0..31 (FP4 uses 0..15 of them, with its sign bit inside the index).
      std::array<float, 32> table{};
      const std::uint32_t entries = table_bits_ == 4 ? 16u : 32u;
      for (std::uint32_t c = 0; c < entries; ++c) table[c] = decode_element(type, c);
      for (int s = 0; s < 4; ++s) tables_[s] = _mm256_loadu_ps(table.data() + 8 * s);
    }
    shift_ = _mm_cvtsi32_si128(23 - f.man_bits);
    factor_ = _mm256_set1_ps(std::bit_cast<float>(static_cast<std::uint32_t>(254 - f.bias) << 23));
    magnitude_mask_ = _mm256_set1_epi32((1 << (f.bits - 1)) - 1);
    mantissa_mask_ = _mm256_set1_epi32((1 << f.man_bits) - 1);
    max_finite_code_ = _mm256_set1_epi32(static_cast<int>(f.max_finite_code));
    sign_shift_ = _mm_cvtsi32_si128(32 - f.bits);
    ieee_specials_ = f.ieee_specials;
  }

  __m256 decode(__m256i code) const {
    if (table_bits_ > 0) {
      // Entries 0..15 (every FP4 code, FP6 magnitudes below 16); blendv_ps selects by each lane's
      // top bit, where code bit 3 is shifted.
      const __m256 below16 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tables_[0], code),
                                              _mm256_permutevar8x32_ps(tables_[1], code),
                                              _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
      if (table_bits_ == 4) return below16;
      const __m256 from16 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tables_[2], code),
                                             _mm256_permutevar8x32_ps(tables_[3], code),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
      const __m256 magnitude =
          _mm256_blendv_ps(below16, from16, _mm256_castsi256_ps(_mm256_slli_epi32(code, 27)));
      const __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(code, 5), 31);
      return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(magnitude), sign));
    }
    const __m256i magnitude = _mm256_and_si256(code, magnitude_mask_);
    __m256i bits = _mm256_castps_si256(
        _mm256_mul_ps(_mm256_castsi256_ps(_mm256_sll_epi32(magnitude, shift_)), factor_));
    if (ieee_specials_) {
      // The exponent field is all ones exactly above the largest finite code.
      const __m256i special = _mm256_cmpgt_epi32(magnitude, max_finite_code_);
      const __m256i payload =
          _mm256_or_si256(_mm256_set1_epi32(0x7F800000),
                          _mm256_sll_epi32(_mm256_and_si256(magnitude, mantissa_mask_), shift_));
      bits = _mm256_blendv_epi8(bits, payload, special);
    } else if (type_ == ElementType::E4M3) {
      const __m256i nan = _mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x7F));
      bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC00000), nan);
    }
    const __m256i sign = _mm256_sll_epi32(_mm256_andnot_si256(magnitude_mask_, code), sign_shift_);
    return _mm256_castsi256_ps(_mm256_or_si256(bits, sign));
  }

 private:
  ElementType type_;
  __m128i shift_;
  __m256 factor_;
  __m256i magnitude_mask_;
  __m256i mantissa_mask_;
  __m256i max_finite_code_;
  __m128i sign_shift_;
  bool ieee_specials_;
  int table_bits_ = 0;
  __m256 tables_[4] = {};
};

// Rounds 8 floats to the nearest value of a minifloat grid (ties to even, saturating) without
// forming codes: the value decode(encode(x)) when only dequantized values are wanted. Adding
// C = 2^(e + 23 - m), e = the binade of |x| clamped to the format's range, makes the FPU round
// |x| at the binade's code step; subtracting C again is exact.
class GridRounder {
 public:
  explicit GridRounder(ElementType type) {
    const ElementInfo& f = element_info(type);
    const int emin = 1 - f.bias;
    const int emax = floor_log2(f.max_finite);
    min_binade_ = _mm256_set1_epi32((127 + emin) << 23);
    max_binade_ = _mm256_set1_epi32((127 + emax + 1) << 23);
    step_shift_ = _mm256_set1_epi32((23 - f.man_bits) << 23);
    max_finite_ = _mm256_set1_ps(f.max_finite);
    nan_value_ = _mm256_set1_ps(decode_element(type, f.nan_code));
  }

  __m256 round(__m256 x) const {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
    __m256i binade = _mm256_and_si256(magnitude, _mm256_set1_epi32(0x7F800000));
    binade = _mm256_min_epu32(_mm256_max_epu32(binade, min_binade_), max_binade_);
    const __m256 c = _mm256_castsi256_ps(_mm256_add_epi32(binade, step_shift_));
    const __m256 rounded = _mm256_min_ps(
        _mm256_sub_ps(_mm256_add_ps(_mm256_castsi256_ps(magnitude), c), c), max_finite_);
    const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32(INT32_MIN));
    const __m256 value = _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(rounded), sign));
    const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F800000));
    return _mm256_blendv_ps(value, nan_value_, _mm256_castsi256_ps(is_nan));
  }

 private:
  __m256i min_binade_;
  __m256i max_binade_;
  __m256i step_shift_;
  __m256 max_finite_;
  __m256 nan_value_;
};

// Element codes of a GroupCodec (minifloat or offset-binary integer) against one step.
class CodeKernel {
 public:
  explicit CodeKernel(const GroupCodec& codec)
      : encoder_(codec.codes().element),
        decoder_(codec.codes().element),
        int_bits_(codec.codes().int_bits) {
    if (int_bits_ > 0) {
      const int offset = 1 << (int_bits_ - 1);
      offset_ = _mm256_set1_epi32(offset);
      int_lo_ = _mm256_set1_ps(-static_cast<float>(offset));
      int_hi_ = _mm256_set1_ps(codec.code_max());
    }
  }

  // Codes of x / step (step > 0).
  __m256i quantize(__m256 x, __m256 step) const { return encode(_mm256_div_ps(x, step)); }

  // Codes of x * inverse_step, for power-of-two steps (E8M0) whose inverse is exact: the product
  // and the scalar path's quotient are then the same correctly rounded value, and a multiply is
  // much cheaper than a divide.
  __m256i quantize_exact_inverse(__m256 x, __m256 inverse_step) const {
    return encode(_mm256_mul_ps(x, inverse_step));
  }

  __m256i encode(__m256 scaled) const {
    if (int_bits_ == 0) return encoder_.encode(scaled);
    // Same as the scalar path: NaN -> 0, clamp to the code range, round to nearest even (the
    // conversion rounds by MXCSR, nearest-even like the scalar nearbyint).
    const __m256 ordered = _mm256_cmp_ps(scaled, scaled, _CMP_ORD_Q);
    const __m256 clamped =
        _mm256_and_ps(ordered, _mm256_min_ps(_mm256_max_ps(scaled, int_lo_), int_hi_));
    return _mm256_add_epi32(_mm256_cvtps_epi32(clamped), offset_);
  }

  __m256 dequantize(__m256i code, __m256 step) const {
    if (int_bits_ == 0) return _mm256_mul_ps(decoder_.decode(code), step);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(code, offset_)), step);
  }

  __m256i zero_code() const { return int_bits_ > 0 ? offset_ : _mm256_setzero_si256(); }

 private:
  Encoder encoder_;
  Decoder decoder_;
  int int_bits_;
  __m256i offset_ = _mm256_setzero_si256();
  __m256 int_lo_ = _mm256_setzero_ps();
  __m256 int_hi_ = _mm256_setzero_ps();
};

// Vector form of GroupCodec::scale_for_amax for 8 groups (same operations, same order).
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
        code_max_(_mm256_set1_ps(codec.code_max())),
        divisor_(_mm256_set1_ps(codec.amax_divisor())),
        elem_emax_(floor_log2(codec.code_max())) {}

  void compute(__m256 amax, __m256i* stored, __m256* step) const {
    const __m256i zero = _mm256_castps_si256(_mm256_cmp_ps(amax, _mm256_setzero_ps(), _CMP_EQ_OQ));
    switch (spec_.kind) {
      case ScaleKind::kE4M3OverGlobal: {
        const __m256 global = _mm256_set1_ps(spec_.global_scale);
        const __m256 unrounded = _mm256_mul_ps(global, _mm256_div_ps(amax, code_max_));
        const __m256i code = _mm256_max_epu32(e4m3_encoder_.encode(unrounded),
                                              _mm256_set1_epi32(spec_.min_e4m3_scale));
        *stored = _mm256_andnot_si256(zero, code);
        *step = _mm256_andnot_ps(_mm256_castsi256_ps(zero),
                                 _mm256_div_ps(e4m3_decoder_.decode(code), global));
        return;
      }
      case ScaleKind::kE8M0: {
        // floor(log2(amax)) and the mantissa from the bits (AVX-512's getexp/getmant). A
        // subnormal amax is its mantissa field times 2^-149; converting that integer (< 2^23) to
        // float is exact and normalizes it, so its exponent is the float's minus 149. Zero lanes
        // come out wrong here and are replaced below.
        const __m256i bits = _mm256_castps_si256(amax);
        const __m256i subnormal = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x00800000), bits);
        const __m256i normalized =
            _mm256_blendv_epi8(bits, _mm256_castps_si256(_mm256_cvtepi32_ps(bits)), subnormal);
        __m256i exponent = _mm256_sub_epi32(_mm256_srli_epi32(normalized, 23),
                                            _mm256_set1_epi32(127 + elem_emax_));
        exponent = _mm256_sub_epi32(exponent, _mm256_and_si256(subnormal, _mm256_set1_epi32(149)));
        if (spec_.mx_rule == MxScaleRule::kRoundToPower2) {
          // Mantissa >= 1.75: its 23-bit field >= 0.75 * 2^23 = 0x600000. The compare gives -1.
          const __m256i up =
              _mm256_cmpgt_epi32(_mm256_and_si256(normalized, _mm256_set1_epi32(0x007FFFFF)),
                                 _mm256_set1_epi32(0x005FFFFF));
          exponent = _mm256_sub_epi32(exponent, up);
        }
        exponent = _mm256_min_epi32(_mm256_max_epi32(exponent, _mm256_set1_epi32(-127)),
                                    _mm256_set1_epi32(127));
        const __m256i code =
            _mm256_andnot_si256(zero, _mm256_add_epi32(exponent, _mm256_set1_epi32(127)));
        *stored = code;
        // 2^(code - 127): the f32 exponent field, except code 0 = 2^-127, an f32 subnormal.
        const __m256i code_zero = _mm256_cmpeq_epi32(code, _mm256_setzero_si256());
        *step = _mm256_castsi256_ps(_mm256_blendv_epi8(_mm256_slli_epi32(code, 23),
                                                       _mm256_set1_epi32(0x00400000), code_zero));
        return;
      }
      case ScaleKind::kFloat:
        break;
    }
    const __m256 unrounded = _mm256_div_ps(amax, divisor_);
    __m256i code;
    __m256 value;
    round_float_scale(unrounded, &code, &value);
    const __m256 underflow = _mm256_cmp_ps(value, _mm256_setzero_ps(), _CMP_EQ_OQ);
    __m256i one_code;
    __m256 one_value;
    round_float_scale(_mm256_set1_ps(1.0f), &one_code, &one_value);
    *stored = _mm256_blendv_epi8(code, one_code, _mm256_castps_si256(underflow));
    *step = _mm256_blendv_ps(value, one_value, underflow);
  }

 private:
  void round_float_scale(__m256 unrounded, __m256i* code, __m256* value) const {
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
        *code = _mm256_castps_si256(unrounded);
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
  __m256 code_max_;
  __m256 divisor_;
  int elem_emax_;
};

std::uint32_t horizontal_max(__m256i m) {
  __m128i h = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0x4E));
  h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0xB1));
  return static_cast<std::uint32_t>(_mm_cvtsi128_si32(h));
}

std::uint32_t group_max_abs_bits(const float* x, std::int64_t n) {
  __m256i m = _mm256_setzero_si256();
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  for (std::int64_t i = 0; i < n; i += 8) {
    const __m256i v = _mm256_castps_si256(load_floats(x + i, static_cast<std::size_t>(n - i)));
    m = _mm256_max_epu32(m, _mm256_and_si256(v, abs_mask));
  }
  return horizontal_max(m);
}

// One level of a transposing reduction: vector pairs (v[2i], v[2i+1]) become v[i], whose lanes
// selected by kMask hold partial maxima of v[2i+1] and the others of v[2i].
template <int kMask, typename Permute>
void reduce_level(__m256i* v, int pairs, Permute permute) {
  for (int i = 0; i < pairs; ++i) {
    const __m256i kept = _mm256_blend_epi32(v[2 * i], v[2 * i + 1], kMask);
    const __m256i moved = _mm256_blend_epi32(v[2 * i + 1], v[2 * i], kMask);
    v[i] = _mm256_max_epu32(kept, permute(moved));
  }
}

// Lane i of the result = the largest lane of v[bit_reverse3(i)] (unsigned); v is clobbered.
// 28 operations for 8 horizontal maxima instead of ~56 with one reduction each.
__m256i transposed_max8(__m256i* v) {
  reduce_level<0xF0>(v, 4, [](__m256i d) { return _mm256_permute2x128_si256(d, d, 0x01); });
  reduce_level<0xCC>(v, 2, [](__m256i d) { return _mm256_shuffle_epi32(d, 0x4E); });
  reduce_level<0xAA>(v, 1, [](__m256i d) { return _mm256_shuffle_epi32(d, 0xB1); });
  return v[0];
}

constexpr int kBitReverse3[8] = {0, 4, 2, 6, 1, 5, 3, 7};

void compute_row_scales(const GroupCodec& codec, const float* x, std::int64_t groups,
                        std::int64_t group_size, GroupScale* scales) {
  const ScaleKernel kernel(codec);
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  for (std::int64_t first = 0; first < groups; first += 8) {
    const std::int64_t count = std::min<std::int64_t>(8, groups - first);
    __m256i amax_bits;
    if (count == 8 && group_size % 8 == 0) {
      __m256i partial[8];
      for (int j = 0; j < 8; ++j) {
        const float* group = x + (first + kBitReverse3[j]) * group_size;
        __m256i m = _mm256_setzero_si256();
        for (std::int64_t i = 0; i < group_size; i += 8) {
          m = _mm256_max_epu32(
              m, _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(group + i)), abs_mask));
        }
        partial[j] = m;
      }
      amax_bits = transposed_max8(partial);
    } else {
      alignas(32) std::array<std::uint32_t, 8> lanes{};
      for (std::int64_t j = 0; j < count; ++j) {
        lanes[j] = group_max_abs_bits(x + (first + j) * group_size, group_size);
      }
      amax_bits = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes.data()));
    }
    __m256i stored;
    __m256 step;
    kernel.compute(_mm256_castsi256_ps(amax_bits), &stored, &step);
    alignas(32) std::array<std::uint32_t, 8> stored_out;
    alignas(32) std::array<float, 8> step_out;
    _mm256_store_si256(reinterpret_cast<__m256i*>(stored_out.data()), stored);
    _mm256_store_ps(step_out.data(), step);
    for (std::int64_t j = 0; j < count; ++j) scales[first + j] = {stored_out[j], step_out[j]};
  }
}

// Element codes of any width (8- or 16-bit) to and from floats, 8 at a time.
template <typename Code>
void encode_all(ElementType type, std::span<const float> values, std::span<Code> codes) {
  const Encoder encoder(type);
  for (std::size_t i = 0; i < values.size(); i += 8) {
    const std::size_t remaining = values.size() - i;
    store_codes(codes.data() + i, encoder.encode(load_floats(values.data() + i, remaining)),
                remaining);
  }
}

template <typename Code>
void decode_all(ElementType type, std::span<const Code> codes, std::span<float> values) {
  const Decoder decoder(type);
  for (std::size_t i = 0; i < codes.size(); i += 8) {
    const std::size_t remaining = codes.size() - i;
    store_floats(values.data() + i, decoder.decode(load_codes(codes.data() + i, remaining)),
                 remaining);
  }
}

}  // namespace

void encode_elements_avx2(ElementType type, std::span<const float> values,
                          std::span<std::uint8_t> codes) {
  encode_all(type, values, codes);
}

void decode_elements_avx2(ElementType type, std::span<const std::uint8_t> codes,
                          std::span<float> values) {
  decode_all(type, codes, values);
}

void encode_elements16_avx2(ElementType type, std::span<const float> values,
                            std::span<std::uint16_t> codes) {
  encode_all(type, values, codes);
}

void decode_elements16_avx2(ElementType type, std::span<const std::uint16_t> codes,
                            std::span<float> values) {
  decode_all(type, codes, values);
}

std::uint32_t max_abs_bits_avx2(std::span<const float> x) {
  return group_max_abs_bits(x.data(), static_cast<std::int64_t>(x.size()));
}

void quantize_row_avx2(const GroupCodec& codec, const float* x, std::int64_t cols,
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
      const __m256 step = _mm256_set1_ps(step_value);
      const __m256 inverse_step = _mm256_set1_ps(power_of_two_steps ? 1.0f / step_value : 0.0f);
      const std::int64_t base = gi * group_size;
      for (std::int64_t i = 0; i < group_size; i += 8) {
        const auto remaining = static_cast<std::size_t>(group_size - i);
        __m256 value = _mm256_setzero_ps();
        if (step_value != 0.0f) {
          const __m256 v = load_floats(x + base + i, remaining);
          value = rounder.round(power_of_two_steps ? _mm256_mul_ps(v, inverse_step)
                                                   : _mm256_div_ps(v, step));
        }
        store_floats(dequantized + base + i, _mm256_mul_ps(value, step), remaining);
      }
    }
    return;
  }
  const CodeKernel kernel(codec);
  for (std::int64_t gi = 0; gi < groups; ++gi) {
    const float step_value = scales[gi].step;
    const __m256 step = _mm256_set1_ps(step_value);
    const __m256 inverse_step = _mm256_set1_ps(power_of_two_steps ? 1.0f / step_value : 0.0f);
    const std::int64_t base = gi * group_size;
    for (std::int64_t i = 0; i < group_size; i += 8) {
      const auto remaining = static_cast<std::size_t>(group_size - i);
      __m256i code = kernel.zero_code();
      if (step_value != 0.0f) {
        const __m256 v = load_floats(x + base + i, remaining);
        code = power_of_two_steps ? kernel.quantize_exact_inverse(v, inverse_step)
                                  : kernel.quantize(v, step);
      }
      if (codes) store_codes(codes + base + i, code, remaining);
      if (dequantized) {
        store_floats(dequantized + base + i, kernel.dequantize(code, step), remaining);
      }
    }
  }
}

void quantize_with_steps_avx2(const GroupCodec& codec, const float* x, const float* steps,
                              std::int64_t n, std::uint8_t* codes, float* dequantized) {
  const CodeKernel kernel(codec);
  for (std::int64_t i = 0; i < n; i += 8) {
    const auto remaining = static_cast<std::size_t>(n - i);
    const __m256 step = load_floats(steps + i, remaining);
    // Lanes with step 0 (and the tail's, loaded as 0) take the zero code, as the scalar path;
    // what their division gave is discarded.
    const __m256i zero_step =
        _mm256_castps_si256(_mm256_cmp_ps(step, _mm256_setzero_ps(), _CMP_EQ_OQ));
    const __m256i code = _mm256_blendv_epi8(kernel.quantize(load_floats(x + i, remaining), step),
                                            kernel.zero_code(), zero_step);
    store_codes(codes + i, code, remaining);
    store_floats(dequantized + i, kernel.dequantize(code, step), remaining);
  }
}

void dequantize_row_avx2(const GroupCodec& codec, const std::uint8_t* codes,
                         const GroupScale* scales, std::int64_t cols, std::int64_t group_size,
                         float* out) {
  const CodeKernel kernel(codec);
  const std::int64_t groups = cols / group_size;
  for (std::int64_t gi = 0; gi < groups; ++gi) {
    const __m256 step = _mm256_set1_ps(scales[gi].step);
    const std::int64_t base = gi * group_size;
    for (std::int64_t i = 0; i < group_size; i += 8) {
      const auto remaining = static_cast<std::size_t>(group_size - i);
      store_floats(out + base + i, kernel.dequantize(load_codes(codes + base + i, remaining), step),
                   remaining);
    }
  }
}

}  // namespace pq::formats::simd
