// Small fused kernels of the forward (everything except the quantized matmuls): fp32 in and out,
// fp32 arithmetic except prefill attention's two products (f16 tensor-core operands, fp32 sums).
//
// Compiled by kernels/build.py (NVRTC). The attention kernels are specialised on HEAD_DIM (a -D
// define) so that per-thread accumulators live in registers; everything else ignores it.
// Each kernel has a NumPy twin in engine/backend_cpu.py (the oracle of tests/test_ops_gpu.py).

#include <cuda_fp16.h>
#include "act.cuh"
#include "pdl.cuh"
#include "mmv_x.cuh"
#include "fp8.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (is_max = false) or max over the whole block; `red` is 32 floats of shared memory.
// Every thread of the block must call it; all get the result.
__device__ float block_reduce(float v, float* red, bool is_max) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int nw = (blockDim.x + 31) >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    if (lane == 0) red[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? red[lane] : (is_max ? NEG_INF : 0.f);
        t = is_max ? warp_max(t) : warp_sum(t);
        if (lane == 0) red[0] = t;
    }
    __syncthreads();
    const float r = red[0];
    __syncthreads();  // red may be reused by the caller's next reduction
    return r;
}

// FP8 mode (engine/fp8.py): x [M, cols] (row stride ldx, fp32 or f16) to e4m3 [M, kpad], zero
// tail, one scale a row: block m finds row m's largest |value|, writes scale[m] = amax / 448
// and the row times 448 / amax (fp8.cuh).
template <typename T>
__device__ void quant_rows_e4m3(const T* __restrict__ x, long long ldx, int cols, int kpad,
                                unsigned char* __restrict__ out, float* __restrict__ scale) {
    __shared__ float red[32];
    const T* src = x + blockIdx.x * ldx;
    float m = 0.0f;
    for (int k = threadIdx.x; k < cols; k += blockDim.x) m = fmaxf(m, fabsf((float)src[k]));
    float sc, inv;
    e4m3_row_scales(block_reduce(m, red, true), sc, inv);
    if (threadIdx.x == 0) scale[blockIdx.x] = sc;
    for (int k = 8 * threadIdx.x; k < kpad; k += 8 * blockDim.x) {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = k + e < cols ? (float)src[k + e] : 0.0f;
        store8_e4m3(out + blockIdx.x * (long long)kpad + k, v, inv);
    }
}

// glu_pair's loads: 8 values as fp32.
__device__ __forceinline__ void load8f(const __half* p, float (&v)[8]) {
    const uint4 r = *(const uint4*)p;
    const __half2* h = (const __half2*)&r;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const float2 f = __half22float2(h[e]);
        v[2 * e] = f.x;
        v[2 * e + 1] = f.y;
    }
}
__device__ __forceinline__ void load8f(const float* p, float (&v)[8]) {
    const float4 r0 = ((const float4*)p)[0], r1 = ((const float4*)p)[1];
    v[0] = r0.x, v[1] = r0.y, v[2] = r0.z, v[3] = r0.w, v[4] = r1.x, v[5] = r1.y, v[6] = r1.z, v[7] = r1.w;
}

// One block of a gated MLP's products to its output (kernels/matmul.py _glu_cublas, glu_matmul_fp8):
// row m of `in` (row stride ldi) holds the gate sums in columns [0, n) and the up sums in [n, 2n);
// out[m, j] = f16(act(gate) * up) (row stride ldo, already offset to the block's first column).
// The FP8 mode's sums are fp32 and are rescaled first, as fp8_rescale does: gate by the row's scale
// a[m] then by its weight row's wg[j], up by a[m] then wu[j].
// Grid: x over 8-column groups (a thread takes 8 columns of one row), y over rows. vec (the caller
// checks n, ldi, ldo and both addresses) takes them with 16-byte loads and one 16-byte store;
// otherwise one value at a time. 32-bit column indices: no 64-bit division per value (a profile of
// the grid-stride version showed it issue-bound at a third of copy bandwidth).
template <typename T, bool SCALED>
__device__ __forceinline__ void glu_pair(const T* __restrict__ in, long long ldi, int n, int m,
                                         const float* __restrict__ a, const float* __restrict__ wg,
                                         const float* __restrict__ wu, __half* __restrict__ out,
                                         long long ldo, int act, int vec) {
    const int j0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (j0 >= n) return;
    const int cnt = min(8, n - j0);
    for (int r = blockIdx.y; r < m; r += gridDim.y) {
        const T* g = in + r * ldi + j0;
        const T* u = g + n;
        __half* o = out + r * ldo + j0;
        float gv[8], uv[8];
        if (vec) {
            load8f(g, gv);
            load8f(u, uv);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) {
                gv[e] = e < cnt ? (float)g[e] : 0.0f;
                uv[e] = e < cnt ? (float)u[e] : 0.0f;
            }
        }
        float y[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float gg = gv[e], uu = uv[e];
            if (SCALED && e < cnt) {
                gg = __fmul_rn(__fmul_rn(gg, a[r]), wg[j0 + e]);
                uu = __fmul_rn(__fmul_rn(uu, a[r]), wu[j0 + e]);
            }
            y[e] = glu_act(gg, act) * uu;
        }
        if (vec) {
            uint4 st;
            __half2* h = (__half2*)&st;
#pragma unroll
            for (int e = 0; e < 4; e++) h[e] = __floats2half2_rn(y[2 * e], y[2 * e + 1]);
            *(uint4*)o = st;
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++)
                if (e < cnt) o[e] = __float2half_rn(y[e]);
        }
    }
}

extern "C" {

// ---------------------------------------------------------------------------------------------
// RMSNorm over the last dim: one block per row. With `res` non-null this is the fused
// residual step: h_out = x + res is written, then y = rmsnorm(h_out) * w. With x8 non-null (at most
// 8 rows, dim whole 256-value super-blocks, blockDim whole warps: ops.py checks) y is also written
// as the Q4_K mmv's operand x8 / xsub (mmv_x.cuh), a warp a sub-block.
__global__ void rmsnorm_rows(const float* __restrict__ x, const float* __restrict__ res,
                             const float* __restrict__ w, float* __restrict__ h_out,
                             float* __restrict__ y, int dim, float eps, __half* __restrict__ x8,
                             unsigned* __restrict__ xsub) {
    __shared__ float red[32];
    pdl_trigger();  // a matmul launched after it as a dependent may load its weights meanwhile
    const size_t base = (size_t)blockIdx.x * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = x[base + i];
        if (res) {
            v += res[base + i];
            h_out[base + i] = v;
        }
        ss += v * v;
    }
    const float inv = rsqrtf(block_reduce(ss, red, false) / dim + eps);
    // Each thread re-reads only the elements it wrote itself, so h_out needs no barrier.
    const float* src = res ? h_out : x;
    if (x8) {  // block-uniform; every lane of a warp takes part in each sub-block's sum
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float v = src[base + i] * inv * w[i];
            y[base + i] = v;
            mmv4_x_put(x8, xsub, dim >> 8, blockIdx.x, i, v, true);
        }
        if (blockIdx.x == 0) mmv4_x_zero_tail(xsub, dim >> 8, gridDim.x, threadIdx.x, blockDim.x);
        return;
    }
    for (int i = threadIdx.x; i < dim; i += blockDim.x) y[base + i] = src[base + i] * inv * w[i];
}

// ---------------------------------------------------------------------------------------------
// Attention's inputs from the q, k and v projections, one launch a layer (ops.qkv_rope; rope is the
// same kernel with k and v absent): q and k get their bias, an RMSNorm per head when nq/nk are
// given (QK-norm) and RoPE; v gets its bias. Inputs [N, H, D] may be column slices of one stacked
// product (row strides ldq, ldk, ldv in floats); outputs are contiguous [N, H, D], except that
// with kv_rows non-null token t's k and v go to row kv_rows[t] of yk / yv (its KV-cache rows).
// One block per token. Its RoPE angles are computed first, in double (positions up to ~1e5 times
// frequencies near 1 need more than fp32's 24 bits), once per pair for all the token's heads;
// then warp w takes heads w, w + warps, ... of q, then k, then v. neox: pairs (i, i + D/2); else
// (2i, 2i+1). freq_i = theta^(-2i/D) / factors[i]. Bias and norm are the fp32 arithmetic of a
// separate add and rmsnorm (x + b, then x * rsqrt(mean(x^2) + eps) * w).
#define ROPE_MAX_PAIRS 256
__global__ void qkv_rope(const float* __restrict__ q, long long ldq, const float* __restrict__ k, long long ldk,
                         const float* __restrict__ v, long long ldv, float* __restrict__ yq, float* __restrict__ yk,
                         float* __restrict__ yv, const int* __restrict__ pos, const float* __restrict__ factors,
                         const float* __restrict__ bq, const float* __restrict__ bk, const float* __restrict__ bv,
                         const float* __restrict__ nq, const float* __restrict__ nk, float eps,
                         const int* __restrict__ kv_rows, int hq, int hk, int hv, int dim, double theta,
                         double pos_scale, int neox) {
    __shared__ double cs[2 * ROPE_MAX_PAIRS];
    const int tok = blockIdx.x, half = dim / 2;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (hq + hk > 0) {
        const double p = (double)pos[tok] * pos_scale;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            double inv_freq = pow(theta, -2.0 * i / dim);
            if (factors) inv_freq /= (double)factors[i];
            sincos(p * inv_freq, &cs[2 * i + 1], &cs[2 * i]);
        }
        __syncthreads();
    }
    for (int h = warp; h < hq + hk + hv; h += warps) {
        const int part = h < hq ? 0 : h < hq + hk ? 1 : 2;
        const int hh = h - (part == 0 ? 0 : part == 1 ? hq : hq + hk);
        const int heads = part == 0 ? hq : part == 1 ? hk : hv;
        const float* src = (part == 0 ? q + tok * ldq : part == 1 ? k + tok * ldk : v + tok * ldv) + (size_t)hh * dim;
        const float* b = part == 0 ? bq : part == 1 ? bk : bv;
        if (b) b += (size_t)hh * dim;
        const size_t row = part && kv_rows ? (size_t)kv_rows[tok] : (size_t)tok;
        float* dst = (part == 0 ? yq : part == 1 ? yk : yv) + (row * heads + hh) * dim;
        if (part == 2) {
            for (int i = lane; i < dim; i += 32) dst[i] = b ? src[i] + b[i] : src[i];
            continue;
        }
        const float* nw = part == 0 ? nq : nk;
        float inv = 1.0f;
        if (nw) {
            float ss = 0.0f;
            for (int i = lane; i < dim; i += 32) {
                const float x = b ? src[i] + b[i] : src[i];
                ss += x * x;
            }
            inv = rsqrtf(warp_sum(ss) / dim + eps);
        }
        for (int i = lane; i < half; i += 32) {
            const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
            float x0 = src[i0], x1 = src[i1];
            if (b) {
                x0 += b[i0];
                x1 += b[i1];
            }
            if (nw) {
                x0 = x0 * inv * nw[i0];
                x1 = x1 * inv * nw[i1];
            }
            const double c = cs[2 * i], s = cs[2 * i + 1];
            dst[i0] = (float)(x0 * c - x1 * s);
            dst[i1] = (float)(x0 * s + x1 * c);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The new tokens' K and V into their KV-cache rows, one launch for both: row t of k/v [N, width]
// goes to row rows[t] of ck/cv [cache rows, width].
__global__ void kv_write(const float* __restrict__ k, const float* __restrict__ v, float* __restrict__ ck,
                         float* __restrict__ cv, const int* __restrict__ rows, long long total, int width) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / width, j = i - t * width;
        const long long dst = (long long)rows[t] * width + j;
        ck[dst] = k[i];
        cv[dst] = v[i];
    }
}

// ---------------------------------------------------------------------------------------------
// act(gate) * up (glu_act: act.cuh).

__global__ void glu(const float* __restrict__ gate, const float* __restrict__ up,
                    float* __restrict__ out, long long n, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = glu_act(gate[i], act) * up[i];
    }
}

// glu_pair (above) for the fp16 path's products: prod f16 [M, ldp], gate and up in its first 2n columns.
__global__ void glu_pair_f16(const __half* __restrict__ prod, long long ldp, int n, int m,
                             __half* __restrict__ out, long long ldo, int act, int vec) {
    glu_pair<__half, false>(prod, ldp, n, m, nullptr, nullptr, nullptr, out, ldo, act, vec);
}

// ---------------------------------------------------------------------------------------------
// FP8 mode (engine/fp8.py; kernels/matmul.py _gemm_fp8, _glu_fp8): quant_rows_e4m3 above.
__global__ void quant_rows_e4m3_f32(const float* x, long long ldx, int cols, int kpad, unsigned char* out,
                                    float* scale) {
    quant_rows_e4m3(x, ldx, cols, kpad, out, scale);
}

__global__ void quant_rows_e4m3_f16(const __half* x, long long ldx, int cols, int kpad, unsigned char* out,
                                    float* scale) {
    quant_rows_e4m3(x, ldx, cols, kpad, out, scale);
}

// The product's epilogue in place: y[m, j] = (y[m, j] * a[m]) * w[j] for j < n (row stride ldy).
// Grid as glu_pair's: x over 4-column groups, y over rows; vec: one 16-byte load and store.
__global__ void fp8_rescale(float* __restrict__ y, long long ldy, int n, int m, const float* __restrict__ a,
                            const float* __restrict__ w, int vec) {
    const int j0 = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (j0 >= n) return;
    const int cnt = min(4, n - j0);
    for (int r = blockIdx.y; r < m; r += gridDim.y) {
        float* p = y + r * ldy + j0;
        if (vec) {
            float4 v = *(float4*)p;
            v.x = __fmul_rn(__fmul_rn(v.x, a[r]), w[j0]);
            v.y = __fmul_rn(__fmul_rn(v.y, a[r]), w[j0 + 1]);
            v.z = __fmul_rn(__fmul_rn(v.z, a[r]), w[j0 + 2]);
            v.w = __fmul_rn(__fmul_rn(v.w, a[r]), w[j0 + 3]);
            *(float4*)p = v;
        } else {
            for (int e = 0; e < cnt; e++) p[e] = __fmul_rn(__fmul_rn(p[e], a[r]), w[j0 + e]);
        }
    }
}

// glu_pair for FP8 sums: d fp32 [M, ldd] (gate sums in columns [0, n), up in [n, 2n)), each rescaled
// as fp8_rescale does (row scale a, the gate's and the up's row scales wg, wu) before the activation.
__global__ void glu_pair_fp8(const float* __restrict__ d, long long ldd, int n, int m,
                             const float* __restrict__ a, const float* __restrict__ wg,
                             const float* __restrict__ wu, __half* __restrict__ out, long long ldo,
                             int act, int vec) {
    glu_pair<float, true>(d, ldd, n, m, a, wg, wu, out, ldo, act, vec);
}

// ---------------------------------------------------------------------------------------------
// Attention. Sequences are described per sequence b:
//   q rows q_start[b] .. q_start[b] + q_len[b] of q [N, Hq, D];
//   keys/values: rows kv_off[b] .. kv_off[b] + kv_len[b] of k/v (row stride Hkv*D), i.e. the packed
//   new-token k/v for a plain prefill, or the KV cache slot of the sequence;
//   query t of the sequence sits at key index q_pos0[b] + t (0 for a prefill, past_len with a cache).
// Key j is visible to query at index p iff j <= p and (window <= 0 or p - j < window).
// GQA: query head h reads kv head h / (Hq/Hkv).
//
// Prefill runs on tensor cores (attn_flash): K and V are first converted to f16 into a packed
// scratch (kv_to_half; rows kv_pack[b] .. kv_pack[b] + kv_len[b], head dim zero-padded to DH),
// which halves the bytes every query block re-reads and lets tiles stream with cp.async.

#define DH ((HEAD_DIM + 15) / 16 * 16)  // head dim padded to whole k16 steps of mma (pad = zeros)
#define SROW (DH + 8)                   // shared row stride in halfs: +16 B puts the 8 rows of an
                                        // ldmatrix on 8 distinct 16-byte bank groups
#ifndef FA_WARPS                        // ops.py sets FA_*; defaults for tools
#define FA_WARPS 4
#endif
#ifndef FA_MT                           // 16-row slices per warp: each K/V fragment read from shared
#define FA_MT 1                         // memory feeds FA_MT mma, at FA_MT x the accumulator registers
#endif
#ifndef FA_BK
#define FA_BK 64
#endif
#ifndef FA_MINB                         // blocks per SM the registers must allow (__launch_bounds__)
#define FA_MINB 1
#endif
#define FA_WROWS (16 * FA_MT)           // query rows per warp (16 = the m of m16n8k16)
#define FA_BQ (FA_WROWS * FA_WARPS)     // query rows per block
#define FA_THREADS (32 * FA_WARPS)
#define Q_IN_REGS (DH * FA_MT <= 128)   // else Q fragments are re-read from shared memory
#define CHUNKS (DH / 8)                 // 16-byte chunks (8 halfs) per padded row

// 8 consecutive values of a row (n_valid of them real, the rest zero) times mul, as 8 halfs.
__device__ __forceinline__ uint4 pack8_half(const float* __restrict__ src, int n_valid, float mul) {
    float x[8];
#if HEAD_DIM % 4 == 0
    if (n_valid >= 8) {
        const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
        x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    } else
#endif
    {
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = i < n_valid ? src[i] : 0.f;
    }
    uint4 r;
    __half2* h = reinterpret_cast<__half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(x[2 * i] * mul, x[2 * i + 1] * mul);
    return r;
}

// f32 k/v rows of every sequence -> packed f16 rows [sum kv_len, Hkv, DH]; grid (_, sequences).
__global__ void kv_to_half(const float* __restrict__ k, const float* __restrict__ v, uint4* __restrict__ kh,
                           uint4* __restrict__ vh, const int* __restrict__ kv_off, const int* __restrict__ kv_len,
                           const int* __restrict__ kv_pack, int n_kv_heads) {
    const int b = blockIdx.y;
    const long long n = (long long)kv_len[b] * n_kv_heads * CHUNKS;
    const long long src_row0 = (long long)kv_off[b] * n_kv_heads, dst_row0 = (long long)kv_pack[b] * n_kv_heads;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const long long rh = e / CHUNKS;  // (row, head) within the sequence
        const int c = (int)(e % CHUNKS);
        const size_t src = (size_t)(src_row0 + rh) * HEAD_DIM + 8 * c;
        const size_t dst = (size_t)(dst_row0 + rh) * CHUNKS + c;
        kh[dst] = pack8_half(k + src, HEAD_DIM - 8 * c, 1.f);
        vh[dst] = pack8_half(v + src, HEAD_DIM - 8 * c, 1.f);
    }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    // src-size 0 zero-fills: rows past the last key must hold zeros, not stale or NaN bits,
    // because P (= 0 there) times V still enters the mma.
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const __half* p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], const __half* p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// c += a (16x16, row) * b (16x8, col); f16 operands, f32 accumulators.
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx(-inf) = +0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

// Rows first .. first + n_keys of one kv head of the f16 scratch -> a BK x SROW shared tile.
__device__ __forceinline__ void load_kv_tile(__half* dst, const __half* __restrict__ base, int first, int n_keys,
                                             size_t row_stride) {
    for (int e = threadIdx.x; e < FA_BK * CHUNKS; e += FA_THREADS) {
        const int r = e / CHUNKS, c = e % CHUNKS;
        const bool ok = r < n_keys;
        cp_async16(dst + r * SROW + 8 * c, base + (ok ? (size_t)(first + r) * row_stride + 8 * c : 0), ok);
    }
}

// Flash attention on tensor cores: one block per (kv head, sequence, tile of FA_BQ query rows). The
// query rows of a tile are the (token, group head) pairs sharing one kv head, so each K/V tile in
// shared memory serves all heads of the GQA group. Each warp owns FA_WROWS rows: S = Q.K^T and O += P.V
// are m16n8k16 mma with fp32 accumulators, the softmax is online in base 2 (q is pre-multiplied by
// scale*log2(e) before its f16 rounding) and P is reused from the S accumulators as the A operand.
// K/V tiles are double-buffered with cp.async. Scores never leave registers.
__global__ void __launch_bounds__(FA_THREADS, FA_MINB)
attn_flash(const float* __restrict__ q, const __half* __restrict__ kh, const __half* __restrict__ vh,
           float* __restrict__ out, const int* __restrict__ q_start, const int* __restrict__ q_len,
           const int* __restrict__ q_pos0, const int* __restrict__ kv_pack, const int* __restrict__ kv_len,
           int n_heads, int n_kv_heads, int window, float scale_log2) {
    extern __shared__ uint4 smem_u4[];
    __half* Qs = reinterpret_cast<__half*>(smem_u4);  // FA_BQ x SROW
    __half* Ks = Qs + FA_BQ * SROW;                    // 2 stages x FA_BK x SROW
    __half* Vs = Ks + 2 * FA_BK * SROW;                // 2 stages x FA_BK x SROW

    const int kvh = blockIdx.x, b = blockIdx.y;
    const int G = n_heads / n_kv_heads;
    const int n_rows = q_len[b] * G;
    const int row0 = (gridDim.z - 1 - blockIdx.z) * FA_BQ;  // the longest (latest) tiles start first
    if (row0 >= n_rows) return;
    const int qs0 = q_start[b], pos0 = q_pos0[b], klen = kv_len[b];
    const size_t q_stride = (size_t)n_heads * HEAD_DIM, kv_stride = (size_t)n_kv_heads * DH;
    const __half* kbase = kh + (size_t)kv_pack[b] * kv_stride + (size_t)kvh * DH;
    const __half* vbase = vh + (size_t)kv_pack[b] * kv_stride + (size_t)kvh * DH;

    const int last_row = min(row0 + FA_BQ, n_rows) - 1;
    const int p_min = pos0 + row0 / G, p_max = pos0 + last_row / G;
    const int k_begin = window > 0 ? max(0, p_min - window + 1) : 0;
    const int k_end = min(klen, p_max + 1);
    const int n_tiles = k_end > k_begin ? (k_end - k_begin + FA_BK - 1) / FA_BK : 0;

    if (n_tiles > 0) {  // the first tile's copy overlaps the Q load below
        load_kv_tile(Ks, kbase, k_begin, min(FA_BK, k_end - k_begin), kv_stride);
        load_kv_tile(Vs, vbase, k_begin, min(FA_BK, k_end - k_begin), kv_stride);
    }
    asm volatile("cp.async.commit_group;\n" ::);

    for (int e = threadIdx.x; e < FA_BQ * CHUNKS; e += FA_THREADS) {
        const int r = e / CHUNKS, c = e % CHUNKS, gr = row0 + r;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (gr < n_rows)
            val = pack8_half(q + (size_t)(qs0 + gr / G) * q_stride + (size_t)(kvh * G + gr % G) * HEAD_DIM + 8 * c,
                             HEAD_DIM - 8 * c, scale_log2);
        *reinterpret_cast<uint4*>(Qs + r * SROW + 8 * c) = val;
    }
    __syncthreads();

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const __half* q_warp = Qs + warp * FA_WROWS * SROW;
#if Q_IN_REGS
    unsigned qf[FA_MT][DH / 16][4];
#pragma unroll
    for (int mt = 0; mt < FA_MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk)
            ldsm_x4(qf[mt][kk], q_warp + (mt * 16 + (lane & 15)) * SROW + kk * 16 + (lane >> 4) * 8);
#endif
    // Positions of this thread's rows (g and g + 8 of each 16-row slice of the warp); rows past the
    // end borrow the last row's position so that they see keys and stay finite (they are not stored).
    int my_pos[FA_MT][2];
#pragma unroll
    for (int mt = 0; mt < FA_MT; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i)
            my_pos[mt][i] = pos0 + min(row0 + warp * FA_WROWS + mt * 16 + g + 8 * i, n_rows - 1) / G;

    float o[FA_MT][DH / 8][4];
#pragma unroll
    for (int mt = 0; mt < FA_MT; ++mt)
#pragma unroll
        for (int j = 0; j < DH / 8; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    float m[FA_MT][2], l[FA_MT][2];  // l: this thread's columns only, summed over the quad at the end
#pragma unroll
    for (int mt = 0; mt < FA_MT; ++mt) m[mt][0] = m[mt][1] = NEG_INF, l[mt][0] = l[mt][1] = 0.f;

    for (int it = 0; it < n_tiles; ++it) {
        const int k0 = k_begin + it * FA_BK;
        const int st = it & 1;
        if (it + 1 < n_tiles) {
            const int k1 = k0 + FA_BK;
            load_kv_tile(Ks + (st ^ 1) * FA_BK * SROW, kbase, k1, min(FA_BK, k_end - k1), kv_stride);
            load_kv_tile(Vs + (st ^ 1) * FA_BK * SROW, vbase, k1, min(FA_BK, k_end - k1), kv_stride);
        }
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();
        const __half* Kt = Ks + st * FA_BK * SROW;
        const __half* Vt = Vs + st * FA_BK * SROW;

        float s[FA_MT][FA_BK / 8][4];
#pragma unroll
        for (int mt = 0; mt < FA_MT; ++mt)
#pragma unroll
            for (int j = 0; j < FA_BK / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
#if Q_IN_REGS
            const unsigned(&a)[FA_MT][DH / 16][4] = qf;
#define QFRAG(mt) a[mt][kk]
#else
            unsigned a[FA_MT][4];
#pragma unroll
            for (int mt = 0; mt < FA_MT; ++mt)
                ldsm_x4(a[mt], q_warp + (mt * 16 + (lane & 15)) * SROW + kk * 16 + (lane >> 4) * 8);
#define QFRAG(mt) a[mt]
#endif
#pragma unroll
            for (int nb = 0; nb < FA_BK / 16; ++nb) {
                unsigned bf[4];  // one K fragment serves every 16-row slice of the warp
                ldsm_x4(bf, Kt + (nb * 16 + (lane >> 4) * 8 + (lane & 7)) * SROW + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int mt = 0; mt < FA_MT; ++mt) {
                    mma16816(s[mt][2 * nb], QFRAG(mt), bf[0], bf[1]);
                    mma16816(s[mt][2 * nb + 1], QFRAG(mt), bf[2], bf[3]);
                }
            }
#undef QFRAG
        }

        // Masking is needed only where some (row, key) pair of the tile is invisible.
        const bool full = k0 + FA_BK <= k_end && k0 + FA_BK - 1 <= p_min && (window <= 0 || p_max - k0 < window);
#pragma unroll
        for (int mt = 0; mt < FA_MT; ++mt) {
            if (!full) {
#pragma unroll
                for (int j = 0; j < FA_BK / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int kp = k0 + 8 * j + 2 * t + (e & 1), p = my_pos[mt][e >> 1];
                        if (!(kp < k_end && kp <= p && (window <= 0 || p - kp < window))) s[mt][j][e] = NEG_INF;
                    }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                float mx = NEG_INF;
#pragma unroll
                for (int j = 0; j < FA_BK / 8; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * i], s[mt][j][2 * i + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m[mt][i], mx);
                // A row with no visible key so far keeps m = -inf; subtracting 0 instead keeps
                // exp2(-inf - m) = 0 rather than NaN.
                const float m_use = m_new == NEG_INF ? 0.f : m_new;
                const float alpha = fast_exp2(m[mt][i] - m_use);
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < FA_BK / 8; ++j) {
                    s[mt][j][2 * i] = fast_exp2(s[mt][j][2 * i] - m_use);
                    s[mt][j][2 * i + 1] = fast_exp2(s[mt][j][2 * i + 1] - m_use);
                    sum += s[mt][j][2 * i] + s[mt][j][2 * i + 1];
                }
                l[mt][i] = l[mt][i] * alpha + sum;
                m[mt][i] = m_new;
#pragma unroll
                for (int j = 0; j < DH / 8; ++j) {
                    o[mt][j][2 * i] *= alpha;
                    o[mt][j][2 * i + 1] *= alpha;
                }
            }
        }
#pragma unroll
        for (int kk = 0; kk < FA_BK / 16; ++kk) {
            // The C fragments of two adjacent 8-key tiles are exactly the A fragment of one k16 step.
            unsigned a[FA_MT][4];
#pragma unroll
            for (int mt = 0; mt < FA_MT; ++mt) {
                a[mt][0] = pack_half2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack_half2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack_half2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack_half2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int nd = 0; nd < DH / 16; ++nd) {
                unsigned bf[4];
                ldsm_x4_t(bf, Vt + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * SROW + nd * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int mt = 0; mt < FA_MT; ++mt) {
                    mma16816(o[mt][2 * nd], a[mt], bf[0], bf[1]);
                    mma16816(o[mt][2 * nd + 1], a[mt], bf[2], bf[3]);
                }
            }
        }
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }
    asm volatile("cp.async.wait_group 0;\n" ::);  // nothing may be in flight when the block exits

#pragma unroll
    for (int mt = 0; mt < FA_MT; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float li = l[mt][i];
            li += __shfl_xor_sync(0xffffffffu, li, 1);
            li += __shfl_xor_sync(0xffffffffu, li, 2);
            const int gr = row0 + warp * FA_WROWS + mt * 16 + g + 8 * i;
            if (gr >= n_rows) continue;
            const float inv = li > 0.f ? 1.f / li : 0.f;
            float* orow = out + (size_t)(qs0 + gr / G) * q_stride + (size_t)(kvh * G + gr % G) * HEAD_DIM;
#pragma unroll
            for (int j = 0; j < DH / 8; ++j) {
                const int d = 8 * j + 2 * t;
                const float x0 = o[mt][j][2 * i] * inv, x1 = o[mt][j][2 * i + 1] * inv;
#if HEAD_DIM % 2 == 0
                if (d < HEAD_DIM) *reinterpret_cast<float2*>(orow + d) = make_float2(x0, x1);
#else
                if (d < HEAD_DIM) orow[d] = x0;
                if (d + 1 < HEAD_DIM) orow[d + 1] = x1;
#endif
            }
        }
}

// Attention for few queries per sequence (decode): one block per (query token, query head).
// Keys are processed in chunks of DEC_THREADS: a thread per key computes the whole dot product
// (independent 16-byte loads, no per-key reduction), the block does an online softmax over the
// chunk, then threads split (value column, key subset) for P.V.
#define DEC_THREADS 256
#define DP ((HEAD_DIM + 3) / 4 * 4)  // head dim padded to whole float4s (pad lanes hold zeros)

__global__ void __launch_bounds__(DEC_THREADS)
attn_decode(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
            float* __restrict__ out, const int* __restrict__ tok_seq, const int* __restrict__ q_start,
            const int* __restrict__ q_pos0, const int* __restrict__ kv_off,
            const int* __restrict__ kv_len, int n_heads, int n_kv_heads, int window,
            float scale_log2) {
    __shared__ float4 qsh4[DP / 4];
    __shared__ float sc[DEC_THREADS];
    __shared__ float part_acc[DEC_THREADS];
    __shared__ float red[32];
    float* qsh = reinterpret_cast<float*>(qsh4);
    pdl_trigger();  // the output projection after it, launched as a dependent, loads its weights meanwhile

    const int tok = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    const int b = tok_seq[tok];
    const int kvh = h / (n_heads / n_kv_heads);
    const int pos = q_pos0[b] + tok - q_start[b];
    const int koff = kv_off[b];
    const int k_end = min(kv_len[b], pos + 1);
    const int k_begin = window > 0 ? max(0, pos - window + 1) : 0;
    const size_t kv_stride = (size_t)n_kv_heads * HEAD_DIM;
    const float* qrow = q + (size_t)tok * n_heads * HEAD_DIM + (size_t)h * HEAD_DIM;
    for (int d = tid; d < DP; d += DEC_THREADS) qsh[d] = d < HEAD_DIM ? qrow[d] : 0.f;
    __syncthreads();

    const int n_parts = DEC_THREADS / HEAD_DIM;  // >= 1 since HEAD_DIM <= 256
    const int part = tid / HEAD_DIM, dcol = tid % HEAD_DIM;
    const bool active = part < n_parts;
    float m = NEG_INF, l = 0.f, acc = 0.f;

    for (int c0 = k_begin; c0 < k_end; c0 += DEC_THREADS) {
        const int n_keys = min(DEC_THREADS, k_end - c0);
        float s = NEG_INF;
        if (tid < n_keys) {
            const float* krow = k + (size_t)(koff + c0 + tid) * kv_stride + (size_t)kvh * HEAD_DIM;
            float dot = 0.f;
#if HEAD_DIM % 4 == 0
            const float4* k4 = reinterpret_cast<const float4*>(krow);
#pragma unroll 8
            for (int d4 = 0; d4 < HEAD_DIM / 4; ++d4) {
                const float4 kv = k4[d4], qv = qsh4[d4];
                dot += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
            }
#else
            for (int d = 0; d < HEAD_DIM; ++d) dot += qsh[d] * krow[d];
#endif
            s = dot * scale_log2;
        }
        const float m_new = fmaxf(m, block_reduce(s, red, true));  // finite: n_keys >= 1
        const float p = exp2f(s - m_new);
        const float alpha = exp2f(m - m_new);
        sc[tid] = p;
        l = l * alpha + block_reduce(p, red, false);  // its barriers also publish sc
        m = m_new;
        acc *= alpha;
        if (active) {
            const float* vcol = v + (size_t)(koff + c0) * kv_stride + (size_t)kvh * HEAD_DIM + dcol;
#pragma unroll 8
            for (int kk = part; kk < n_keys; kk += n_parts) acc += sc[kk] * vcol[(size_t)kk * kv_stride];
        }
        __syncthreads();  // sc is overwritten by the next chunk
    }
    part_acc[tid] = active ? acc : 0.f;
    __syncthreads();
    if (tid < HEAD_DIM) {
        float o = 0.f;
        for (int pidx = 0; pidx < n_parts; ++pidx) o += part_acc[pidx * HEAD_DIM + tid];
        out[(size_t)tok * n_heads * HEAD_DIM + (size_t)h * HEAD_DIM + tid] = l > 0.f ? o / l : 0.f;
    }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// Split-K decode attention (flash-decoding): the visible keys of each query are cut into n_split
// contiguous ranges, one block per (query token, group of DEC_G query heads sharing a kv head, range)
// writes the range's partial softmax state per head (max m and sum l of exp2(s - m), and the
// unnormalised sum of exp2(s - m) * v), and attn_decode_combine merges the ranges in a fixed order.
// n_split is computed on the device from the query's own visible key count (dec_n_splits), never
// from the grid: a grid sized for a whole KV cache (a CUDA graph's) and one sized for the keys
// present (an eager step) give the same ranges, hence the same bits; blocks past n_split exit.
// One kernel per DEC_G = 1 .. 8 (attn_decode_split_g<DEC_G>; ops.py: ceil(G / ceil(G / 8)) heads).
// Within a range, keys go in chunks of DS_KC: DS_TPK lanes per key compute the DEC_G dot products
// (16-byte loads, a 3-step shuffle sum), one warp per head updates its online softmax, then each
// thread accumulates one value column for the DEC_G heads over its share of the chunk's keys.
#define DS_TPK 8                        // lanes per key in the dot products
#define DS_KC (DEC_THREADS / DS_TPK)    // keys per chunk (= 32 = the lanes of a softmax warp)
static_assert(DS_KC == 32, "a softmax warp holds one chunk key per lane");

// Visible keys [*k_begin, *k_end) of query token tok (see the attention comment above).
__device__ __forceinline__ void dec_visible(int tok, const int* __restrict__ tok_seq, const int* __restrict__ q_start,
                                            const int* __restrict__ q_pos0, const int* __restrict__ kv_len, int window,
                                            int* b, int* k_begin, int* k_end) {
    *b = tok_seq[tok];
    const int pos = q_pos0[*b] + tok - q_start[*b];
    *k_end = min(kv_len[*b], pos + 1);
    *k_begin = window > 0 ? max(0, pos - window + 1) : 0;
}

// Ranges for n_vis visible keys: ceil(n_vis / min_keys), at most max_splits (equal ranges of
// ceil(n_vis / n_split) keys, so the last ones may be short or empty).
__device__ __forceinline__ int dec_n_splits(int n_vis, int max_splits, int min_keys) {
    return max(1, min(max_splits, (n_vis + min_keys - 1) / min_keys));
}

// ws_acc [N, Hq, gridDim.z, HEAD_DIM] and ws_ml [N, Hq, gridDim.z, 2] (m, l): entries s < n_split
// of every head are written. Grid (N, Hkv * tiles of DEC_G heads, >= the largest n_split).
#define DEC_SPLIT_PARAMS                                                                                   \
    const float *__restrict__ q, const float *__restrict__ k, const float *__restrict__ v,                \
        float *__restrict__ ws_acc, float *__restrict__ ws_ml, const int *__restrict__ tok_seq,           \
        const int *__restrict__ q_start, const int *__restrict__ q_pos0, const int *__restrict__ kv_off,  \
        const int *__restrict__ kv_len, int n_heads, int n_kv_heads, int window, float scale_log2,        \
        int max_splits, int min_keys
template <int DEC_G>
__device__ __forceinline__ void decode_split_block(DEC_SPLIT_PARAMS) {
    static_assert(DEC_G >= 1 && DEC_G <= DEC_THREADS / 32, "one softmax warp per head of a block");
    __shared__ float4 qs4[DEC_G][DP / 4];
    __shared__ float ps[DEC_G][DS_KC];  // a chunk's scores, then its probabilities
    __shared__ float m_s[DEC_G], l_s[DEC_G], alpha_s[DEC_G];
    __shared__ float mrg[DEC_THREADS * DEC_G];  // column sums of key subsets 1.. (merged into 0)

    const int tok = blockIdx.x, split = blockIdx.z, n_ws = gridDim.z, tid = threadIdx.x;
    const int G = n_heads / n_kv_heads;
    const int tiles = (G + DEC_G - 1) / DEC_G;
    const int kvh = blockIdx.y / tiles, g0 = (blockIdx.y % tiles) * DEC_G;
    const int ng = min(DEC_G, G - g0);  // heads of this block: h0 .. h0 + ng - 1
    const int h0 = kvh * G + g0;
    int b, k_begin, k_end;
    dec_visible(tok, tok_seq, q_start, q_pos0, kv_len, window, &b, &k_begin, &k_end);
    const int n_vis = max(0, k_end - k_begin);
    const int n_split = dec_n_splits(n_vis, max_splits, min_keys);
    if (split >= n_split) return;  // the same for the whole block
    const int chunk = (n_vis + n_split - 1) / n_split;
    const int s_begin = k_begin + split * chunk;
    const int s_end = min(k_end, s_begin + chunk);  // <= s_begin: an empty range, written as such

    const int koff = kv_off[b];
    const size_t kv_stride = (size_t)n_kv_heads * HEAD_DIM;
    const float* qrow = q + (size_t)tok * n_heads * HEAD_DIM + (size_t)h0 * HEAD_DIM;
    float* qs = reinterpret_cast<float*>(qs4);
    for (int e = tid; e < DEC_G * DP; e += DEC_THREADS) {
        const int j = e / DP, d = e % DP;
        qs[e] = j < ng && d < HEAD_DIM ? qrow[(size_t)j * HEAD_DIM + d] : 0.f;
    }
    if (tid < DEC_G) {
        m_s[tid] = NEG_INF;
        l_s[tid] = 0.f;
        alpha_s[tid] = 1.f;  // stays so for the padding heads >= ng (no softmax warp updates them)
    }
    __syncthreads();

    const int key = tid / DS_TPK, lig = tid % DS_TPK;  // the chunk key of this lane, lane within its key
    const int warp = tid >> 5, lane = tid & 31;
    const int n_parts = DEC_THREADS / HEAD_DIM;  // >= 1 since HEAD_DIM <= 256
    const int part = tid / HEAD_DIM, dcol = tid % HEAD_DIM;
    const bool active = part < n_parts;
    float acc[DEC_G];
#pragma unroll
    for (int j = 0; j < DEC_G; ++j) acc[j] = 0.f;

    for (int c0 = s_begin; c0 < s_end; c0 += DS_KC) {
        const int n_keys = min(DS_KC, s_end - c0);
        float dot[DEC_G];
#pragma unroll
        for (int j = 0; j < DEC_G; ++j) dot[j] = 0.f;
        if (key < n_keys) {
            const float* krow = k + (size_t)(koff + c0 + key) * kv_stride + (size_t)kvh * HEAD_DIM;
#if HEAD_DIM % 4 == 0
            const float4* k4 = reinterpret_cast<const float4*>(krow);
            for (int d4 = lig; d4 < HEAD_DIM / 4; d4 += DS_TPK) {
                const float4 kv = k4[d4];
#pragma unroll
                for (int j = 0; j < DEC_G; ++j) {
                    const float4 qv = qs4[j][d4];
                    dot[j] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
                }
            }
#else
            for (int d = lig; d < HEAD_DIM; d += DS_TPK) {
                const float kd = krow[d];
#pragma unroll
                for (int j = 0; j < DEC_G; ++j) dot[j] += qs[j * DP + d] * kd;
            }
#endif
        }
#pragma unroll
        for (int j = 0; j < DEC_G; ++j) {  // every lane takes part: the groups are aligned 8-lane runs
            for (int o = DS_TPK / 2; o > 0; o >>= 1) dot[j] += __shfl_xor_sync(0xffffffffu, dot[j], o);
            if (lig == 0 && key < n_keys) ps[j][key] = dot[j] * scale_log2;
        }
        __syncthreads();
        if (warp < ng) {  // warp j: the online softmax of head j over the chunk, lane = key
            const float sv = lane < n_keys ? ps[warp][lane] : NEG_INF;
            const float m_old = m_s[warp];
            const float m_new = fmaxf(m_old, warp_max(sv));  // finite: n_keys >= 1
            const float pv = lane < n_keys ? exp2f(sv - m_new) : 0.f;
            ps[warp][lane] = pv;
            const float psum = warp_sum(pv);
            if (lane == 0) {
                const float a = exp2f(m_old - m_new);
                alpha_s[warp] = a;
                l_s[warp] = l_s[warp] * a + psum;
                m_s[warp] = m_new;
            }
        }
        __syncthreads();
        if (active) {
            const float* vcol = v + (size_t)(koff + c0) * kv_stride + (size_t)kvh * HEAD_DIM + dcol;
#pragma unroll
            for (int j = 0; j < DEC_G; ++j) acc[j] *= alpha_s[j];
            for (int kk = part; kk < n_keys; kk += n_parts) {
                const float vv = vcol[(size_t)kk * kv_stride];
#pragma unroll
                for (int j = 0; j < DEC_G; ++j) acc[j] += ps[j][kk] * vv;
            }
        }
        __syncthreads();  // ps and alpha_s are rewritten by the next chunk
    }

    if (active && part > 0) {
#pragma unroll
        for (int j = 0; j < DEC_G; ++j) mrg[((part - 1) * DEC_G + j) * HEAD_DIM + dcol] = acc[j];
    }
    __syncthreads();
    const size_t ws_row = ((size_t)tok * n_heads + h0) * n_ws + split;  // entry of head h0; head j: + j * n_ws
    if (part == 0) {
        for (int p = 1; p < n_parts; ++p) {
#pragma unroll
            for (int j = 0; j < DEC_G; ++j) acc[j] += mrg[((p - 1) * DEC_G + j) * HEAD_DIM + dcol];
        }
#pragma unroll
        for (int j = 0; j < DEC_G; ++j)
            if (j < ng) ws_acc[(ws_row + (size_t)j * n_ws) * HEAD_DIM + dcol] = acc[j];
    }
    if (tid < ng) {
        ws_ml[(ws_row + (size_t)tid * n_ws) * 2] = m_s[tid];
        ws_ml[(ws_row + (size_t)tid * n_ws) * 2 + 1] = l_s[tid];
    }
}

extern "C" {

#define DEC_SPLIT_KERNEL(G)                                                                               \
    __global__ void __launch_bounds__(DEC_THREADS) attn_decode_split_g##G(DEC_SPLIT_PARAMS) {          \
        decode_split_block<G>(q, k, v, ws_acc, ws_ml, tok_seq, q_start, q_pos0, kv_off, kv_len, n_heads, \
                              n_kv_heads, window, scale_log2, max_splits, min_keys);                      \
    }
DEC_SPLIT_KERNEL(1)
DEC_SPLIT_KERNEL(2)
DEC_SPLIT_KERNEL(3)
DEC_SPLIT_KERNEL(4)
DEC_SPLIT_KERNEL(5)
DEC_SPLIT_KERNEL(6)
DEC_SPLIT_KERNEL(7)
DEC_SPLIT_KERNEL(8)

// out[tok, h] = sum_s acc_s * 2^(m_s - M) / sum_s l_s * 2^(m_s - M), M = max_s m_s, over the
// query's n_split ranges (0 when it sees no key, as attn_decode). Grid (N, Hq); dynamic shared
// memory: n_ws floats, the ranges' weights 2^(m_s - M), computed once, so that the column loop
// issues its loads of acc back to back. Sums run in a fixed order: the result is deterministic.
// With x8 non-null (at most 8 tokens, n_heads * HEAD_DIM whole 256-value super-blocks, HEAD_DIM and
// blockDim whole warps: ops.py checks) out is also written as the Q4_K mmv's operand (mmv_x.cuh)
// for the output projection, a warp a sub-block.
__global__ void attn_decode_combine(const float* __restrict__ ws_acc, const float* __restrict__ ws_ml,
                                    float* __restrict__ out, const int* __restrict__ tok_seq,
                                    const int* __restrict__ q_start, const int* __restrict__ q_pos0,
                                    const int* __restrict__ kv_len, int n_heads, int window, int max_splits,
                                    int min_keys, int n_ws, __half* __restrict__ x8, unsigned* __restrict__ xsub) {
    extern __shared__ float wsh[];
    __shared__ float red[32];
    pdl_trigger();  // as attn_decode
    const int tok = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    int b, k_begin, k_end;
    dec_visible(tok, tok_seq, q_start, q_pos0, kv_len, window, &b, &k_begin, &k_end);
    const int n_split = dec_n_splits(max(0, k_end - k_begin), max_splits, min_keys);
    const size_t row = ((size_t)tok * n_heads + h) * n_ws;
    const float* ml = ws_ml + row * 2;
    float m_part = NEG_INF;
    for (int s = tid; s < n_split; s += blockDim.x) m_part = fmaxf(m_part, ml[2 * s]);
    const float m_all = block_reduce(m_part, red, true);
    float l_part = 0.f;
    for (int s = tid; s < n_split; s += blockDim.x) {
        const float ms = ml[2 * s];
        const float w = ms == NEG_INF ? 0.f : exp2f(ms - m_all);  // an empty range: acc 0, l 0
        wsh[s] = w;
        l_part += ml[2 * s + 1] * w;
    }
    const float l = block_reduce(l_part, red, false);  // its barriers also publish wsh
    for (int d = tid; d < HEAD_DIM; d += blockDim.x) {
        const float* acc = ws_acc + row * HEAD_DIM + d;
        float o = 0.f;
#pragma unroll 4
        for (int s = 0; s < n_split; ++s) o += acc[(size_t)s * HEAD_DIM] * wsh[s];
        const float r = l > 0.f ? o / l : 0.f;
        out[((size_t)tok * n_heads + h) * HEAD_DIM + d] = r;
        if (x8) mmv4_x_put(x8, xsub, n_heads * HEAD_DIM >> 8, tok, h * HEAD_DIM + d, r, true);
    }
    if (x8 && tok == 0 && h == 0) mmv4_x_zero_tail(xsub, n_heads * HEAD_DIM >> 8, gridDim.x, tid, blockDim.x);
}

// ---------------------------------------------------------------------------------------------
// Top-k selection. The order is (key descending, index ascending): ties resolve to the lower index,
// NaNs are never picked.

}  // extern "C"

// The k best of row keys key(0..n) by k passes of a block-wide argmax, each taking the best element
// strictly after the previous pick; raw keys into vals/idx (-inf / -1 once the row is exhausted).
// Every thread of the block calls it; all get the k-th pick in kth_v / kth_i. O(k n): the general
// case (any k), and the fallback of topk_logprobs_rows when its candidates do not fit.
template <class Key>
__device__ void select_k_passes(const Key& key, int n, int k, float* vals, int* idx, float& kth_v, int& kth_i) {
    __shared__ float rv[32];
    __shared__ int ri[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int nw = (blockDim.x + 31) >> 5;
    float prev_v = __int_as_float(0x7f800000);
    int prev_i = -1;
    for (int j = 0; j < k; ++j) {
        float bv = NEG_INF;
        int bi = -1;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float xv = key(i);
            const bool after = xv < prev_v || (xv == prev_v && i > prev_i);
            if (after && (bi < 0 || xv > bv)) { bv = xv; bi = i; }  // strided i: first hit has lowest index
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) { bv = ov; bi = oi; }
        }
        if (lane == 0) { rv[w] = bv; ri[w] = bi; }
        __syncthreads();
        if (w == 0) {
            bv = lane < nw ? rv[lane] : NEG_INF;
            bi = lane < nw ? ri[lane] : -1;
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) { bv = ov; bi = oi; }
            }
            if (lane == 0) { rv[0] = bv; ri[0] = bi; }
        }
        __syncthreads();
        prev_v = rv[0];
        prev_i = ri[0];
        __syncthreads();
        if (threadIdx.x == 0) {
            vals[j] = prev_i >= 0 ? prev_v : NEG_INF;
            idx[j] = prev_i;
        }
        if (prev_i < 0) prev_v = NEG_INF;  // row exhausted (k > n or all NaN): nothing is "after"
    }
    kth_v = prev_v;
    kth_i = prev_i;
}

struct RawKey {
    const float* row;
    __device__ float operator()(int i) const { return row[i]; }
};

// log_softmax(x / t) of one value as CuPy computes it in separate kernels (z = x * inv_t; z -= max;
// z -= log(sum)): the _rn intrinsics keep the compiler from contracting the steps into an FMA.
struct LogProbKey {
    const float* row;
    float inv_t, m, log_s;
    __device__ float operator()(int i) const { return __fsub_rn(__fsub_rn(__fmul_rn(row[i], inv_t), m), log_s); }
};

// Online log-sum-exp of a running (max m, sum s of exp(v - m)); -inf and NaN are skipped.
__device__ __forceinline__ void lse_add(float& m, float& s, float v) {
    if (v > m) {
        s = s * expf(m - v) + 1.f;
        m = v;
    } else if (v > NEG_INF) {
        s += expf(v - m);
    }
}

__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    if (m2 > m) {
        s = s * expf(m - m2) + s2;
        m = m2;
    } else if (m2 > NEG_INF) {
        s += s2 * expf(m2 - m);
    }
}

// log(sum exp) over the block's (m, s) pairs, in a fixed order (the result is deterministic); -inf
// when every sum is empty. `red` is 64 floats of shared memory; every thread calls it.
__device__ float block_lse(float m, float s, float* red) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    if (lane == 0) { red[w] = m; red[32 + w] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        m = red[0];
        s = red[32];
        for (int i = 1; i < nw; ++i) lse_merge(m, s, red[i], red[32 + i]);
        red[0] = s > 0.f ? logf(s) + m : NEG_INF;
    }
    __syncthreads();
    const float r = red[0];
    __syncthreads();
    return r;
}

// Sorts v/ix[0..p) (p a power of two) into the order (v descending, ix ascending): a bitonic
// network over shared memory; every thread of the block calls it.
__device__ void bitonic_best_first(float* v, int* ix, int p) {
    for (int size = 2; size <= p; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < (p >> 1); t += blockDim.x) {
                const int i = (t / stride) * 2 * stride + (t % stride), j = i + stride;
                const bool j_first = v[j] > v[i] || (v[j] == v[i] && ix[j] < ix[i]);
                if (j_first == ((i & size) == 0)) {
                    const float tv = v[i];
                    const int ti = ix[i];
                    v[i] = v[j];
                    ix[i] = ix[j];
                    v[j] = tv;
                    ix[j] = ti;
                }
            }
            __syncthreads();
        }
    }
}

extern "C" {

// Top-k per row of x [rows, n] (k passes; see select_k_passes). One block per row.
__global__ void topk_rows(const float* __restrict__ x, float* __restrict__ vals, int* __restrict__ idx,
                          int n, int k) {
    float kv;
    int ki;
    select_k_passes(RawKey{x + (size_t)blockIdx.x * n}, n, k, vals + (size_t)blockIdx.x * k,
                    idx + (size_t)blockIdx.x * k, kv, ki);
}

// The k most likely entries of log_softmax(x / t) of each row of x [rows, n] (row stride ld) and,
// with want_tail, the log of the summed probability of all the others (-inf when there are none).
// One block of TK_THREADS per row, no temporary the size of the row: pass 1 takes the max of
// x * inv_t (and each thread's max), pass 2 the sum of exp, pass 3 computes every log-prob y,
// keeps as candidates those >= the k-th largest of the threads' maxima (at least k of them: the
// maxima themselves) and sums exp(y) of the others online. The candidates are sorted in shared
// memory; those past rank k join the tail. More than TK_CAP candidates (a row of many equal values)
// or k > TK_THREADS: the same result by k passes.
#define TK_THREADS 512
#define TK_CAP 2048
__global__ void __launch_bounds__(TK_THREADS)
    topk_logprobs_rows(const float* __restrict__ x, long long ld, int n, int k, float inv_t, int want_tail,
                       float* __restrict__ vals, int* __restrict__ idx, float* __restrict__ tail) {
    __shared__ float cv[TK_CAP];
    __shared__ int ci[TK_CAP];
    __shared__ float red[64];
    __shared__ int cnt;
    const float* row = x + (size_t)blockIdx.x * ld;
    float* vrow = vals + (size_t)blockIdx.x * k;
    int* irow = idx + (size_t)blockIdx.x * k;
    const int tid = threadIdx.x;

    float tm = NEG_INF;
    for (int i = tid; i < n; i += TK_THREADS) tm = fmaxf(tm, __fmul_rn(row[i], inv_t));
    const float m = block_reduce(tm, red, true);
    float s = 0.f;
    for (int i = tid; i < n; i += TK_THREADS) s += expf(__fsub_rn(__fmul_rn(row[i], inv_t), m));
    const LogProbKey y{row, inv_t, m, logf(block_reduce(s, red, false))};

    float rm = NEG_INF, rs = 0.f;  // the tail's running log-sum-exp
    bool fast = k <= TK_THREADS;
    if (fast) {
        // y is non-decreasing in x * inv_t, so y of the k-th largest thread max is a threshold
        // that at least k values reach
        cv[tid] = tm;
        ci[tid] = tid;
        __syncthreads();
        bitonic_best_first(cv, ci, TK_THREADS);
        const float tau = __fsub_rn(__fsub_rn(cv[k - 1], y.m), y.log_s);
        __syncthreads();
        if (tid == 0) cnt = 0;
        __syncthreads();
        for (int i = tid; i < n; i += TK_THREADS) {
            const float v = y(i);
            if (v >= tau) {
                const int p = atomicAdd(&cnt, 1);
                if (p < TK_CAP) { cv[p] = v; ci[p] = i; }
            } else if (want_tail) {
                lse_add(rm, rs, v);
            }
        }
        __syncthreads();
        const int c = cnt;
        if (c <= TK_CAP) {
            int p = 1;
            while (p < c) p <<= 1;
            for (int j = c + tid; j < p; j += TK_THREADS) { cv[j] = NEG_INF; ci[j] = 0x7fffffff; }
            __syncthreads();
            bitonic_best_first(cv, ci, p);
            for (int j = tid; j < k; j += TK_THREADS) { vrow[j] = cv[j]; irow[j] = ci[j]; }
            if (want_tail)
                for (int j = k + tid; j < c; j += TK_THREADS) lse_add(rm, rs, cv[j]);
        } else {
            fast = false;  // c is the same for every thread: the whole block takes the other way
        }
    }
    if (!fast) {
        float kv;
        int ki;
        select_k_passes(y, n, k, vrow, irow, kv, ki);
        rm = NEG_INF;
        rs = 0.f;
        if (want_tail)
            for (int i = tid; i < n; i += TK_THREADS) {
                const float v = y(i);
                if (v < kv || (v == kv && i > ki)) lse_add(rm, rs, v);
            }
    }
    if (want_tail) {
        const float t = block_lse(rm, rs, red);
        if (tid == 0) tail[blockIdx.x] = t;
    }
}

}  // extern "C"

// Sets *flag when any value of a float16 (half != 0) or float32 array is NaN or +-Inf: the exponent
// bits all set. One pass over the bytes with 16-byte loads (p is 16-byte aligned; the launcher
// checks), the few trailing elements by one thread. Many threads may store 1: a benign race.
__device__ __forceinline__ bool nonfinite_word(unsigned w, int half) {
    return half ? ((w & 0x7C00u) == 0x7C00u) || ((w & 0x7C000000u) == 0x7C000000u)
                : (w & 0x7F800000u) == 0x7F800000u;
}

extern "C" __global__ void any_nonfinite(const unsigned char* __restrict__ p, long long n_bytes, int half,
                                         int* __restrict__ flag) {
    const long long n16 = n_bytes >> 4;
    const uint4* v = reinterpret_cast<const uint4*>(p);
    bool bad = false;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n16; i += (long long)gridDim.x * blockDim.x) {
        const uint4 q = __ldg(v + i);
        bad |= nonfinite_word(q.x, half) || nonfinite_word(q.y, half) || nonfinite_word(q.z, half)
               || nonfinite_word(q.w, half);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        for (long long b = n16 << 4; b < n_bytes; b += half ? 2 : 4) {
            const unsigned w = half ? *reinterpret_cast<const unsigned short*>(p + b)
                                    : *reinterpret_cast<const unsigned*>(p + b);
            bad |= nonfinite_word(w, half);
        }
    }
    if (bad) *flag = 1;
}

// The index of the largest value of each row of x [rows, n] (row stride ld), as numpy.argmax: the
// first of equal maxima, and the first NaN where a row has one. One block of AM_THREADS per row;
// each value becomes a 64-bit key (its order-preserving bits above the index's complement, NaN
// above everything) and the block takes the largest key. Greedy decoding's next token, in place
// of cupy.argmax (bench/RESULTS.md, eighth session).
#define AM_THREADS 1024
__device__ __forceinline__ unsigned long long argmax_key(float v, int i) {
    const unsigned u = __float_as_uint(v);
    const unsigned ord = v != v ? 0xFFFFFFFFu : (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)ord << 32) | (unsigned)~(unsigned)i;
}

extern "C" __global__ void __launch_bounds__(AM_THREADS)
    argmax_rows(const float* __restrict__ x, long long ld, int n, int* __restrict__ out) {
    __shared__ unsigned long long red[AM_THREADS / 32];
    const float* row = x + (long long)blockIdx.x * ld;
    unsigned long long best = 0;  // below every key of a value (n >= 1: the launcher checks)
#pragma unroll 8
    for (int i = threadIdx.x; i < n; i += AM_THREADS) {
        const unsigned long long k = argmax_key(__ldg(row + i), i);
        best = k > best ? k : best;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long k = __shfl_xor_sync(0xFFFFFFFFu, best, o);
        best = k > best ? k : best;
    }
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x < 32) {
        best = red[threadIdx.x];
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long k = __shfl_xor_sync(0xFFFFFFFFu, best, o);
            best = k > best ? k : best;
        }
        if (threadIdx.x == 0) out[blockIdx.x] = (int)~(unsigned)(best & 0xFFFFFFFFu);
    }
}
