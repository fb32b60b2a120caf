// The Q4_K mmv's x operand (matmul.cu mmv4_body), in one place for everything that writes it:
// matmul.cu's mmv_x (from any fp32/f16 x) and, fused, the ops.cu kernels that make the rows of a
// small batch's next product (rmsnorm_rows, attn_decode_combine).
//   x8:   f16 [M][nb * 256], x in its own order (zeros past its values);
//   xsub: f16x2 [nb][token 8][t 4][2]: the sum X_j of x8's values over 32-value sub-block j of
//         super-block sb as two f16s hi = f16(X_j), lo = f16(X_j - hi), at ((sb * 8 + m) * 4 +
//         (j & 3)) * 2 + (j >> 2), i.e. (hi, lo) of sub-blocks t and t + 4 in the mins' B fragment
//         order; tokens M..7 are zeros.
#pragma once
#include <cuda_fp16.h>

// A whole warp puts one sub-block: lane l holds value i = 32 * (sub-block) + l of token m; x8 is
// written where `real` (token m < M), xsub always (a token past M puts zeros: v = 0).
__device__ __forceinline__ void mmv4_x_put(__half* __restrict__ x8, unsigned* __restrict__ xsub, int nb, int m,
                                           int i, float v, bool real) {
    const __half h = __float2half_rn(v);
    if (real) x8[(long long)m * nb * 256 + i] = h;
    float s = __half2float(h);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
    if ((threadIdx.x & 31) == 0) {
        const int sb = i >> 8, j = (i >> 5) & 7;
        const __half hi = __float2half_rn(s), lo = __float2half_rn(s - __half2float(hi));
        const __half2 p = __halves2half2(hi, lo);
        xsub[((sb * 8 + m) * 4 + (j & 3)) * 2 + (j >> 2)] = *reinterpret_cast<const unsigned*>(&p);
    }
}

// xsub's zeros of tokens M..7 (M <= 8), by threads tid of n: 8 words a (super-block, token).
__device__ __forceinline__ void mmv4_x_zero_tail(unsigned* __restrict__ xsub, int nb, int M, int tid, int n) {
    const int per = (8 - M) * 8;
    for (int e = tid; e < nb * per; e += n) xsub[(e / per * 8 + M) * 8 + e % per] = 0u;
}
