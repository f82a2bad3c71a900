// bf16 / f16 <-> f32: known bit patterns (1.0, -2.5, max, min subnormal, Inf, NaN, ties to even),
// exhaustive round trips of every 16-bit pattern, and random inputs against independent references.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "worker/safetensors.h"

namespace epic {
namespace {

float from_bits(uint32_t bits) { return std::bit_cast<float>(bits); }
uint32_t bits_of(float value) { return std::bit_cast<uint32_t>(value); }

TEST(Bf16Conversion, KnownBitPatterns) {
  EXPECT_EQ(0x3F80, f32_to_bf16(1.0f));
  EXPECT_EQ(0xC020, f32_to_bf16(-2.5f));
  EXPECT_EQ(0x0000, f32_to_bf16(0.0f));
  EXPECT_EQ(0x8000, f32_to_bf16(-0.0f));
  EXPECT_EQ(0x7F7F, f32_to_bf16(from_bits(0x7F7F0000)));  // largest finite bf16
  EXPECT_EQ(0x0001, f32_to_bf16(from_bits(0x00010000)));  // smallest subnormal bf16, 2^-133
  EXPECT_EQ(0x7F80, f32_to_bf16(std::numeric_limits<float>::infinity()));
  EXPECT_EQ(0xFF80, f32_to_bf16(-std::numeric_limits<float>::infinity()));
  // FLT_MAX lies above the midpoint between the largest bf16 and 2^128, so it rounds to Inf.
  EXPECT_EQ(0x7F80, f32_to_bf16(std::numeric_limits<float>::max()));
  // Ties to even: 1 + 2^-8 is halfway between 0x3F80 and 0x3F81 (keeps the even 0x3F80);
  // 0x3F818000 is halfway between 0x3F81 and 0x3F82 (goes up to the even 0x3F82).
  EXPECT_EQ(0x3F80, f32_to_bf16(from_bits(0x3F808000)));
  EXPECT_EQ(0x3F82, f32_to_bf16(from_bits(0x3F818000)));
  EXPECT_EQ(0x3F81, f32_to_bf16(from_bits(0x3F808001)));  // just above the tie
  EXPECT_EQ(0x3F80, f32_to_bf16(from_bits(0x3F807FFF)));  // just below the tie

  EXPECT_EQ(1.0f, bf16_to_f32(0x3F80));
  EXPECT_EQ(-2.5f, bf16_to_f32(0xC020));
  EXPECT_EQ(std::ldexp(1.0f, -133), bf16_to_f32(0x0001));
  EXPECT_EQ(from_bits(0x7F7F0000), bf16_to_f32(0x7F7F));
  EXPECT_TRUE(std::isinf(bf16_to_f32(0x7F80)));
  EXPECT_TRUE(std::isnan(bf16_to_f32(0x7FC0)));
  EXPECT_TRUE(std::signbit(bf16_to_f32(0x8000)));
}

TEST(Bf16Conversion, NanStaysNanWithItsSign) {
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // A payload only in the low 16 bits would truncate to Inf without the forced quiet bit.
  const uint16_t low_payload = f32_to_bf16(from_bits(0x7F800001));
  EXPECT_TRUE(std::isnan(bf16_to_f32(low_payload))) << std::hex << low_payload;
  const uint16_t negative = f32_to_bf16(from_bits(0xFFFFFFFF));  // would carry out of 16 bits if rounded
  EXPECT_TRUE(std::isnan(bf16_to_f32(negative))) << std::hex << negative;
  EXPECT_EQ(0x8000, negative & 0x8000);
}

TEST(F16Conversion, KnownBitPatterns) {
  EXPECT_EQ(0x3C00, f32_to_f16(1.0f));
  EXPECT_EQ(0xC100, f32_to_f16(-2.5f));
  EXPECT_EQ(0x0000, f32_to_f16(0.0f));
  EXPECT_EQ(0x8000, f32_to_f16(-0.0f));
  EXPECT_EQ(0x7BFF, f32_to_f16(65504.0f));                  // largest finite f16
  EXPECT_EQ(0x7BFF, f32_to_f16(65519.99f));                 // below the midpoint to 2^16
  EXPECT_EQ(0x7C00, f32_to_f16(65520.0f));                  // the midpoint ties to the even Inf
  EXPECT_EQ(0x0400, f32_to_f16(std::ldexp(1.0f, -14)));     // smallest normal
  EXPECT_EQ(0x0001, f32_to_f16(std::ldexp(1.0f, -24)));     // smallest subnormal
  EXPECT_EQ(0x03FF, f32_to_f16(std::ldexp(1023.0f, -24)));  // largest subnormal
  EXPECT_EQ(0x8001, f32_to_f16(-std::ldexp(1.0f, -24)));
  EXPECT_EQ(0x7C00, f32_to_f16(std::numeric_limits<float>::infinity()));
  EXPECT_EQ(0xFC00, f32_to_f16(-std::numeric_limits<float>::infinity()));
  EXPECT_EQ(0x7C00, f32_to_f16(std::numeric_limits<float>::max()));
  EXPECT_EQ(0x0000, f32_to_f16(std::numeric_limits<float>::denorm_min()));
  // Ties to even among normals: 1 + 2^-11 is halfway between 0x3C00 and 0x3C01.
  EXPECT_EQ(0x3C00, f32_to_f16(1.0f + std::ldexp(1.0f, -11)));
  EXPECT_EQ(0x3C02, f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)));
  EXPECT_EQ(0x3C01, f32_to_f16(from_bits(0x3F801001)));  // just above the tie
  // Ties to even among subnormals: 2^-25 is halfway between 0 and the smallest subnormal.
  EXPECT_EQ(0x0000, f32_to_f16(std::ldexp(1.0f, -25)));
  EXPECT_EQ(0x0001, f32_to_f16(std::ldexp(1.5f, -25)));
  EXPECT_EQ(0x0002, f32_to_f16(std::ldexp(3.0f, -25)));
  EXPECT_EQ(0x0002, f32_to_f16(std::ldexp(5.0f, -25)));
  // Halfway between the largest subnormal and the smallest normal: goes to the even 0x0400.
  EXPECT_EQ(0x0400, f32_to_f16(std::ldexp(2047.0f, -25)));

  EXPECT_EQ(1.0f, f16_to_f32(0x3C00));
  EXPECT_EQ(-2.5f, f16_to_f32(0xC100));
  EXPECT_EQ(65504.0f, f16_to_f32(0x7BFF));
  EXPECT_EQ(std::ldexp(1.0f, -24), f16_to_f32(0x0001));
  EXPECT_EQ(std::ldexp(1023.0f, -24), f16_to_f32(0x03FF));
  EXPECT_EQ(std::ldexp(1.0f, -14), f16_to_f32(0x0400));
  EXPECT_EQ(std::numeric_limits<float>::infinity(), f16_to_f32(0x7C00));
  EXPECT_EQ(-std::numeric_limits<float>::infinity(), f16_to_f32(0xFC00));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7E00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7C01)));  // signalling NaN is still NaN, not Inf
  EXPECT_TRUE(std::signbit(f16_to_f32(0x8000)));
}

TEST(F16Conversion, NanStaysNanWithItsSign) {
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(std::numeric_limits<float>::quiet_NaN()))));
  const uint16_t low_payload = f32_to_f16(from_bits(0xFF800001));
  EXPECT_TRUE(std::isnan(f16_to_f32(low_payload))) << std::hex << low_payload;
  EXPECT_EQ(0x8000, low_payload & 0x8000);
}

// Every 16-bit pattern converts to f32 exactly and back to itself (NaNs stay NaN).
TEST(HalfConversions, EveryPatternRoundTrips) {
  int num_wrong = 0;
  for (uint32_t pattern = 0; pattern <= 0xFFFF; ++pattern) {
    const auto bits = static_cast<uint16_t>(pattern);
    const float as_bf16 = bf16_to_f32(bits);
    const float as_f16 = f16_to_f32(bits);
    const bool bf16_ok =
        std::isnan(as_bf16) ? std::isnan(bf16_to_f32(f32_to_bf16(as_bf16))) : f32_to_bf16(as_bf16) == bits;
    const bool f16_ok =
        std::isnan(as_f16) ? std::isnan(f16_to_f32(f32_to_f16(as_f16))) : f32_to_f16(as_f16) == bits;
    if ((!bf16_ok || !f16_ok) && num_wrong++ < 10) {
      ADD_FAILURE() << "pattern 0x" << std::hex << pattern << (bf16_ok ? "" : " bf16")
                    << (f16_ok ? "" : " f16");
    }
  }
  EXPECT_EQ(0, num_wrong);
}

// Independent reference: of the two representable neighbours a value lies between (found by
// truncation), pick the nearer in double arithmetic, and the even one on a tie. to_double maps a
// pattern to its value, with Inf standing for the next power of two as IEEE rounding treats it.
template <typename ToDouble>
uint16_t nearest_even_reference(float value, uint16_t truncated, ToDouble to_double) {
  const uint16_t up = static_cast<uint16_t>(truncated + 1);
  const double below = std::fabs(to_double(truncated) - value);
  const double above = std::fabs(to_double(up) - value);
  if (below < above) return truncated;
  if (above < below) return up;
  return (truncated & 1) ? up : truncated;
}

TEST(HalfConversions, RandomValuesMatchNearestEvenReference) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> any_bits;
  int num_wrong = 0;
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t bits = any_bits(rng);
    const float value = from_bits(bits);
    if (std::isnan(value) || std::isinf(value)) continue;
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
    const float magnitude = std::fabs(value);

    // bf16: truncation keeps the top 16 bits.
    auto bf16_as_double = [](uint16_t pattern) {
      return pattern == 0x7F80 ? std::ldexp(1.0, 128) : static_cast<double>(bf16_to_f32(pattern));
    };
    const uint16_t bf16_expected =
        sign |
        nearest_even_reference(magnitude, static_cast<uint16_t>(bits_of(magnitude) >> 16), bf16_as_double);
    // f16: values from 65520 up round to Inf; below it, truncate by searching the sorted patterns.
    uint16_t f16_expected;
    if (magnitude >= 65520.0f) {
      f16_expected = sign | 0x7C00;
    } else {
      uint16_t low = 0, high = 0x7BFF;  // the largest pattern whose value <= magnitude
      while (low < high) {
        const uint16_t middle = static_cast<uint16_t>((low + high + 1) / 2);
        if (f16_to_f32(middle) <= magnitude)
          low = middle;
        else
          high = static_cast<uint16_t>(middle - 1);
      }
      f16_expected = sign | (low == 0x7BFF ? uint16_t{0x7BFF}
                                           : nearest_even_reference(magnitude, low, [](uint16_t pattern) {
                                               return static_cast<double>(f16_to_f32(pattern));
                                             }));
    }
    const uint16_t bf16_actual = f32_to_bf16(value);
    const uint16_t f16_actual = f32_to_f16(value);
    if ((bf16_actual != bf16_expected || f16_actual != f16_expected) && num_wrong++ < 10) {
      ADD_FAILURE() << std::hex << "f32 0x" << bits << ": bf16 0x" << bf16_actual << " expected 0x"
                    << bf16_expected << ", f16 0x" << f16_actual << " expected 0x" << f16_expected;
    }
  }
  EXPECT_EQ(0, num_wrong);
}

#if defined(__FLT16_MAX__) && (defined(__x86_64__) || defined(__aarch64__))
// The compiler's own float -> _Float16 conversion (IEEE round-to-nearest-even) as a second reference.
TEST(HalfConversions, F16MatchesCompilerFloat16) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> any_bits;
  int num_wrong = 0;
  for (int i = 0; i < 1000000; ++i) {
    const float value = from_bits(any_bits(rng));
    if (std::isnan(value)) continue;
    const auto expected = std::bit_cast<uint16_t>(static_cast<_Float16>(value));
    const uint16_t actual = f32_to_f16(value);
    if (actual != expected && num_wrong++ < 10) {
      ADD_FAILURE() << std::hex << "f32 0x" << bits_of(value) << ": 0x" << actual << " expected 0x"
                    << expected;
    }
  }
  EXPECT_EQ(0, num_wrong);
}
#endif

}  // namespace
}  // namespace epic
