// bf16 and f16 for the emulator: the storage types of cuda_bf16.h and cuda_fp16.h, conversions
// that round to nearest even like the GPU's cvt.rn (NaN becomes the canonical 0x7fff, as the
// CUDA headers do), and the arithmetic the kernels use. Included by cuda_emu.h.
#pragma once

#include <cstdint>
#include <cstring>

namespace contralign_emu {

inline std::uint32_t f32_bits(float x) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float f32_from_bits(std::uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

inline std::uint16_t f32_to_bf16_rn(float x) {
    std::uint32_t u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    // Adding 0x7fff plus the lowest kept bit rounds half to even; a carry into the exponent
    // is the correct result, up to infinity.
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>(u >> 16);
}
inline std::uint16_t f32_to_bf16_rz(float x) {
    std::uint32_t u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return static_cast<std::uint16_t>(u >> 16);
}
inline float bf16_to_f32(std::uint16_t h) { return f32_from_bits(static_cast<std::uint32_t>(h) << 16); }

inline std::uint16_t f32_to_f16_rn(float x) {
    std::uint32_t u = f32_bits(x);
    const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return 0x7fff;
    // 65520 and above round to infinity (65504 is the largest finite f16).
    if (u >= 0x477ff000u) return sign | 0x7c00u;
    if (u >= 0x38800000u) {
        // Normal f16: rebias the exponent (127 - 15) and round away 13 mantissa bits, half to
        // even; a carry into the exponent is again the correct result.
        u += 0xfffu + ((u >> 13) & 1u);
        return sign | static_cast<std::uint16_t>((u - 0x38000000u) >> 13);
    }
    // Below 2^-14 the f16 spacing is 2^-24, the float spacing in [0.5, 1): adding 0.5 lets
    // the FPU round to that spacing (to nearest even), and the low bits are the f16 bits.
    // 2^-14 itself may come out, which is the right smallest normal encoding.
    const float shifted = f32_from_bits(u) + 0.5f;
    return sign | static_cast<std::uint16_t>(f32_bits(shifted) - 0x3f000000u);
}
inline float f16_to_f32(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    const std::uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        // Subnormal (or zero): mantissa * 2^-24, exact in float.
        return f32_from_bits(sign | f32_bits(static_cast<float>(mantissa) * 0x1p-24f));
    }
    return f32_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

}  // namespace contralign_emu

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(contralign_emu::f32_to_bf16_rn(f)) {}
    operator float() const { return contralign_emu::bf16_to_f32(__x); }
};
struct __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(contralign_emu::f32_to_f16_rn(f)) {}
    operator float() const { return contralign_emu::f16_to_f32(__x); }
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct alignas(4) __half2 {
    __half x, y;
};
typedef __half half;
typedef __half2 half2;

namespace contralign_emu {
template <class H>
H half_from_bits(unsigned short bits) {
    H h;
    h.__x = bits;
    return h;
}
}  // namespace contralign_emu

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    return contralign_emu::half_from_bits<__nv_bfloat16>(contralign_emu::f32_to_bf16_rn(x));
}
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
inline __nv_bfloat16 __float2bfloat16_rz(float x) {
    return contralign_emu::half_from_bits<__nv_bfloat16>(contralign_emu::f32_to_bf16_rz(x));
}
inline float __bfloat162float(__nv_bfloat16 h) { return contralign_emu::bf16_to_f32(h.__x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
    return contralign_emu::half_from_bits<__nv_bfloat16>(bits);
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
    return {__bfloat162float(v.x), __bfloat162float(v.y)};
}
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

inline __half __float2half_rn(float x) {
    return contralign_emu::half_from_bits<__half>(contralign_emu::f32_to_f16_rn(x));
}
inline __half __float2half(float x) { return __float2half_rn(x); }
inline float __half2float(__half h) { return contralign_emu::f16_to_f32(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short bits) {
    return contralign_emu::half_from_bits<__half>(bits);
}
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __half2half2(__half a) { return {a, a}; }
inline __half __low2half(__half2 v) { return v.x; }
inline __half __high2half(__half2 v) { return v.y; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }

namespace contralign_emu {
// Infinity's bits without the sign: every larger pattern is a NaN.
inline unsigned int infinity_bits(__nv_bfloat16) { return 0x7f80u; }
inline unsigned int infinity_bits(__half) { return 0x7c00u; }
}  // namespace contralign_emu

// Arithmetic rounds the exact result once, as the GPU's bf16/f16 instructions do: +, -, *, /
// of two narrow values computed in float and rounded again are correctly rounded (float has
// more than twice their precision plus two bits); fma goes through double.
#define CONTRALIGN_EMU_HALF_OPS(H, H2, to_f, from_f)                                          \
    inline H operator+(H a, H b) { return from_f(to_f(a) + to_f(b)); }                        \
    inline H operator-(H a, H b) { return from_f(to_f(a) - to_f(b)); }                        \
    inline H operator*(H a, H b) { return from_f(to_f(a) * to_f(b)); }                        \
    inline H operator/(H a, H b) { return from_f(to_f(a) / to_f(b)); }                        \
    inline H operator-(H a) { return contralign_emu::half_from_bits<H>(a.__x ^ 0x8000u); }     \
    inline H& operator+=(H& a, H b) { return a = a + b; }                                     \
    inline H& operator-=(H& a, H b) { return a = a - b; }                                     \
    inline H& operator*=(H& a, H b) { return a = a * b; }                                     \
    inline H& operator/=(H& a, H b) { return a = a / b; }                                     \
    inline bool operator==(H a, H b) { return to_f(a) == to_f(b); }                           \
    inline bool operator!=(H a, H b) { return to_f(a) != to_f(b); }                           \
    inline bool operator<(H a, H b) { return to_f(a) < to_f(b); }                             \
    inline bool operator>(H a, H b) { return to_f(a) > to_f(b); }                             \
    inline bool operator<=(H a, H b) { return to_f(a) <= to_f(b); }                           \
    inline bool operator>=(H a, H b) { return to_f(a) >= to_f(b); }                           \
    inline H __hadd(H a, H b) { return a + b; }                                               \
    inline H __hsub(H a, H b) { return a - b; }                                               \
    inline H __hmul(H a, H b) { return a * b; }                                               \
    inline H __hdiv(H a, H b) { return a / b; }                                               \
    inline H __hneg(H a) { return -a; }                                                       \
    inline H __habs(H a) { return contralign_emu::half_from_bits<H>(a.__x & 0x7fffu); }       \
    inline H __hfma(H a, H b, H c) {                                                          \
        return from_f(static_cast<float>(::fma(static_cast<double>(to_f(a)),                  \
                                               static_cast<double>(to_f(b)),                  \
                                               static_cast<double>(to_f(c)))));               \
    }                                                                                         \
    inline H __hmax(H a, H b) { return from_f(::fmaxf(to_f(a), to_f(b))); }                   \
    inline H __hmin(H a, H b) { return from_f(::fminf(to_f(a), to_f(b))); }                   \
    inline bool __hisnan(H a) { return (a.__x & 0x7fffu) > contralign_emu::infinity_bits(a); } \
    inline H2 __hadd2(H2 a, H2 b) { return {a.x + b.x, a.y + b.y}; }                           \
    inline H2 __hmul2(H2 a, H2 b) { return {a.x * b.x, a.y * b.y}; }                           \
    inline H2 __hfma2(H2 a, H2 b, H2 c) { return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }

CONTRALIGN_EMU_HALF_OPS(__nv_bfloat16, __nv_bfloat162, __bfloat162float, __float2bfloat16_rn)
CONTRALIGN_EMU_HALF_OPS(__half, __half2, __half2float, __float2half_rn)
#undef CONTRALIGN_EMU_HALF_OPS

// sm_80's atomicAdd on bf16: exact sum rounded once.
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* address, __nv_bfloat16 value) {
    return ::contralign_emu::atomic_update<__nv_bfloat16>(
        address, value, [](__nv_bfloat16 a, __nv_bfloat16 b) -> __nv_bfloat16 { return a + b; });
}
