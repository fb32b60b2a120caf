// The gated MLP's activation, shared by ops.cu (glu, glu_pair_f16) and matmul.cu (the fused GEMM's
// GLU epilogue): act 0 = silu, 1 = gelu (tanh approximation).
#pragma once

__device__ __forceinline__ float glu_act(float g, int act) {
    // silu: __fdividef, not IEEE division, whose slow-path subroutine (taken by a warp when any lane
    // has 1 + exp(-g) beyond 2^126) was 16% of the wgmma GEMM's warp samples at M = 2048 (ncu, twelfth
    // session). It differs by at most 2 ulp, and gives -0 where exp(-g) overflows, as the division did.
    if (act == 0) return __fdividef(g, 1.f + expf(-g));
    const float u = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.f + tanhf(u));
}
