// exp on every lane of a GCC float vector, shared by the kernels in this folder.
//
// DEFINE_VEXP(name, vec, ivec) defines `static inline vec name(vec x)` for a float vector type `vec` and the int32
// vector type `ivec` of the same lane count: Cephes expf (x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial for
// e^r, 2^n by the exponent bits), within 2 ulp of expf for x in [-87.3, 88]; x is clamped to that range, so lanes
// far below it give ~1e-38, not 0 (callers zero the lanes they mask out).
#ifndef XMATCH_VECTOR_EXP_H_
#define XMATCH_VECTOR_EXP_H_
#include <string.h>

#define DEFINE_VEXP(name, vec, ivec)                                                                          \
  static inline vec name(vec x) {                                                                             \
    const vec zero = {0};                                                                                     \
    const vec lo = zero - 87.3f, hi = zero + 88.0f;                                                           \
    ivec below = x < lo, above = x > hi;                                                                      \
    x = (vec)(((ivec)x & ~below) | ((ivec)lo & below));                                                       \
    x = (vec)(((ivec)x & ~above) | ((ivec)hi & above));                                                       \
    const vec t = x * 1.44269504088896341f;                                                                   \
    const ivec negative = t < zero;                                                                           \
    const vec half = (vec)(((ivec)(zero - 0.5f) & negative) | ((ivec)(zero + 0.5f) & ~negative));             \
    const ivec n = __builtin_convertvector(t + half, ivec); /* round half away from zero */                  \
    const vec nf = __builtin_convertvector(n, vec);                                                           \
    const vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;                                                \
    vec y = 1.9875691500e-4f * r + 1.3981999507e-3f;                                                          \
    y = y * r + 8.3334519073e-3f;                                                                             \
    y = y * r + 4.1665795894e-2f;                                                                             \
    y = y * r + 1.6666665459e-1f;                                                                             \
    y = y * r + 5.0000001201e-1f;                                                                             \
    y = y * r * r + r + 1.0f;                                                                                 \
    const ivec bits = (n + 127) << 23;                                                                        \
    vec pow2;                                                                                                 \
    memcpy(&pow2, &bits, sizeof pow2);                                                                        \
    return y * pow2;                                                                                          \
  }

#endif  // XMATCH_VECTOR_EXP_H_
