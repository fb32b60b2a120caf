// The FP8 mode's e4m3 rounding (engine/fp8.py holds the rules and their NumPy twin): float32 to
// float8 e4m3fn, nearest with ties to even, saturated to +-448. `cvt ... e4m3x2` exists from sm_89
// on; below that the kernels that use it trap: kernels/matmul.py never launches them there (the
// backend refuses precision fp8 on such a GPU before loading anything).
#pragma once

// Two values as one 16-bit pair, lo in the low byte (the lower address).
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    __trap();
    return 0;
#endif
}

// v[0..7] * s (one fp32 rounding each, as NumPy's x * inv) as 8 e4m3 bytes in one 8-byte store.
__device__ __forceinline__ void store8_e4m3(unsigned char* dst, const float (&v)[8], float s) {
    unsigned w[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const unsigned lo = e4m3x2(__fmul_rn(v[4 * h], s), __fmul_rn(v[4 * h + 1], s));
        const unsigned hi = e4m3x2(__fmul_rn(v[4 * h + 2], s), __fmul_rn(v[4 * h + 3], s));
        w[h] = lo | (hi << 16);
    }
    *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
}

// (scale, inverse) of a row whose largest |value| is amax: amax / 448 and 448 / amax, each one
// correctly rounded division (fp8.row_scales); an all-zero row gets 0 and 0.
__device__ __forceinline__ void e4m3_row_scales(float amax, float& scale, float& inv) {
    scale = amax == 0.0f ? 0.0f : __fdiv_rn(amax, 448.0f);
    inv = amax == 0.0f ? 0.0f : __fdiv_rn(448.0f, amax);
}
