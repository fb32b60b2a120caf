// The gated MLP's activation, shared by ops.cu (glu, glu_pair_f16) and matmul.cu (the fused GEMM's
// GLU epilogue): act 0 = silu, 1 = gelu (tanh approximation).
#pragma once

__device__ __forceinline__ float glu_act(float g, int act) {
    if (act == 0) return g / (1.f + expf(-g));
    const float u = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.f + tanhf(u));
}
