// Vector math shared by the CPU kernels (AVX-512).
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace gorgon {

// 16 bfloat16 bit patterns widened to float32, exactly (a bfloat16's bits are the top half of a float32).
inline __m512 widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// 16 values as float32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) { return widen_bf16(_mm256_loadu_si256((const __m256i*)p)); }

// The first n of 16 values as float32, the other lanes 0 (a row's tail).
inline __m512 load16(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
inline __m512 load16(const c10::BFloat16* p, int n) {
  return widen_bf16(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
}

// e^x for x in [-120, 88]: range reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 Taylor polynomial (relative
// error < 6e-9, below float32's half ulp) and an exact scaling by 2^n.
inline __m512 exp_core(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// e^x for x <= 0 (-inf -> exactly 0: e^-120 scales to exactly 0, e^-104 is below any denormal).
inline __m512 exp_neg(__m512 x) { return exp_core(_mm512_max_ps(x, _mm512_set1_ps(-120.f))); }

// x * sigmoid(x) = x / (1 + e^-x); e^-x is clamped to [e^-120, e^88], which changes no float32 result.
inline __m512 silu(__m512 x) {
  const __m512 e = exp_core(_mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), _mm512_set1_ps(-120.f)),
                                          _mm512_set1_ps(88.f)));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

}  // namespace gorgon
