// Quantized matmul y[M, out] = x[M, in] . W^T for one GGML type (compile with -DQTYPE=<code>).
//
// - gemv_m<M> (M = 1..8): memory-bound; a block owns 4 * R rows of W (R = gemv_rows<M>), 8 lanes
//   per row walk it in units of 32 values (one 16-byte quant load), dequantize in registers and
//   accumulate in fp32 for all M tokens at once, so W is read once per call. x is fp32, read
//   through L1; each loaded x value serves R rows from registers and 4 lanes by broadcast.
// - gemv1_r<R> (Q4_K, Q6_K, M = 1 only): x staged in shared memory, the affine factored per scale
//   group, one PRMT + one FFMA per weight (see below).
// - gemm_bt<BT>, gate_up_bt<BT>: the fused tensor-core GEMM (below): W dequantized a 128 x 128
//   tile at a time into shared memory as f16, x as f16, mma.sync m16n8k16 with fp32 sums.
// - wg_gemm_bt<BT>, wg_gate_up_bt<BT> (sm_90a only): the same GEMM on Hopper's wgmma, with warps
//   that dequantize and warps that multiply.
// - prep_f16: rows [r0, r0+n) of W as f16 into a scratch and x as f16, in one launch (the
//   dequantize + cuBLAS peer path); bandwidth-bound, one 16-byte store per thread.
// - gather_f32: rows ids[i] of W as fp32 (embedding lookup straight from quantized rows).
// gemv reads x as fp32 [M, kpad], the fused GEMM as f16 [M, kpad] (kpad = blocks per row * block
// values, zero-padded by the caller); prep_f16 reads the unpadded [M, cols] and writes the padded f16
// copy itself.
#include "quant_decode.cuh"
#include "act.cuh"
#include "pdl.cuh"
#include "mmv_x.cuh"
#include "fp8.cuh"

#ifndef QTYPE
#error "QTYPE (GGML type code) must be defined"
#endif
#define GEMV_WARPS 8

// Rows per lane of gemv_m<M> (kernels/matmul.py _gemv_rows mirrors it); a block covers 4 * R rows.
// Measured on an H200 (bench/RESULTS.md): at M = 1 two rows per lane (fewer registers, more blocks
// in flight) beat four; at M = 8 eight rows per lane (each x load serving 8 rows) beat four.
// M = 2..7 keep the four of earlier measurements (2..7 were not measured with 2 or 8).
template <int M> __device__ constexpr int gemv_rows() { return M == 1 ? 2 : M == 8 ? 8 : 4; }

typedef Dec<QTYPE> D;

template <int M>
__device__ __forceinline__ void gemv_body(WDesc w, const float* __restrict__ x, int ldx,
                                          float* __restrict__ y, int ldy, int out) {
    // A block owns 4*R rows. Lane = (row slot rs = lane/8, unit slot j = lane%8); lane holds rows
    // row0 + rs + 4r (r < R). The 8 lanes of a slot read 8 consecutive units (one Q4_K super-block:
    // 128 contiguous quant bytes); the 4 slots load the same x addresses (a broadcast) and each x
    // value in registers serves R rows. The 8 warps split the row's units (stride 64) and their
    // partial sums meet in shared memory: enough warps in flight even for 512-row matrices.
    constexpr int R = gemv_rows<M>();
    const int lane = threadIdx.x & 31, j = lane & 7, rs = lane >> 3, warp = threadIdx.x >> 5;
    const int row0 = blockIdx.x * 4 * R + rs;
    __shared__ float red[GEMV_WARPS][M * R * 4];
    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[m][r] = 0.0f;

    const int units = w.nb * D::UNITS;
    for (int u = j + 8 * warp; u < units; u += 8 * GEMV_WARPS) {
        // Rows past the end re-read the last row (in bounds); their sums are never written.
        D dec[R];
#pragma unroll
        for (int r = 0; r < R; r++) dec[r].load(w, min(row0 + 4 * r, out - 1), u);
        const int ka = D::kpos(u, 0), kb = D::kpos(u, 1);
#pragma unroll
        for (int g = 0; g < 8; g++) {
            const int k = (g < 4 ? ka : kb) + 4 * (g & 3);
            float4 xv[M];
#pragma unroll
            for (int m = 0; m < M; m++) xv[m] = __ldg((const float4*)(x + (i64)m * ldx + k));
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float4 wv = dec[r].get4(g);
#pragma unroll
                for (int m = 0; m < M; m++) {
                    float a = acc[m][r];
                    a = fmaf(wv.x, xv[m].x, a);
                    a = fmaf(wv.y, xv[m].y, a);
                    a = fmaf(wv.z, xv[m].z, a);
                    a = fmaf(wv.w, xv[m].w, a);
                    acc[m][r] = a;
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < R; r++) {
            float v = acc[m][r];
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 4);
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
            if (j == 0) red[warp][(m * R + r) * 4 + rs] = v;
        }
    __syncthreads();
    // Thread t sums slot (m, r, rs) = t over the warps: row row0 - rs + rs' + 4r.
    const int t = threadIdx.x;
    if (t < M * R * 4) {
        float v = 0.0f;
#pragma unroll
        for (int q = 0; q < GEMV_WARPS; q++) v += red[q][t];
        const int m = t / (R * 4), r = (t / 4) % R, slot = t % 4;
        const int row = blockIdx.x * 4 * R + slot + 4 * r;
        if (row < out) y[(i64)m * ldy + row] = v;
    }
}

#define GEMV(M)                                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                 \
        gemv_m##M(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, const float* x,      \
                  int ldx, float* y, int ldy, int out) {                                          \
        gemv_body<M>(WDesc{base, row_bytes, nblk, nb, cols}, x, ldx, y, ldy, out);                \
    }
GEMV(1) GEMV(2) GEMV(3) GEMV(4) GEMV(5) GEMV(6) GEMV(7) GEMV(8)

#if QTYPE == T_Q4_K || QTYPE == T_Q6_K
// ---- gemv1_*: M = 1 for the k-quants (kernels/matmul.py _gemv1), few instructions per weight ----
// x (fp32) is staged once per block in shared memory, its float4s XOR-swizzled so that the LDS.128
// of a quarter-warp hit 8 distinct bank groups, with the sum of x over every scale group. A warp
// owns 2R rows per tile (T tiles): lane = (row slot rs, super-block slot s, half e); the 16 lanes of
// a slot walk the row 8 super-blocks per step, each lane reading 128 values of one super-block
// (Q4_K: chunks e and e+2 of 32 qs bytes, so each lane decodes one lo-case and one hi-case
// scale pair without branches; Q6_K: half h = e, 64 ql + 32 qh bytes) for R rows, each x float4
// serving R rows from registers. The first step's weights are requested before x is staged, and
// with PF (gemv1_r1) the next step's before the current one is computed.
// Per weight one PRMT and one FFMA, all fp32:
// - the affine is factored per scale group: sum (D q - M) x = D sum(q x) - M sum(x) (Q4_K: 32
//   values, M = dmin * min; Q6_K: 16 values, M = 32 D), sum(x) from shared memory;
// - q enters the FFMA exactly as the fp32 subnormal q * 2^-149 (the PRMT'd byte itself) against x
//   staged as x * 2^75 (exact), so sum(q x) arrives scaled by 2^-74 and D carries 2^74 (Q4_K high
//   nibbles are read as 16 q: 2^70). That FFMA is inline PTX without .ftz: CuPy compiles with
//   -ftz=true, which flushes q to 0 in compiler-emitted FP32 instructions. Limits: |x| < 2^53
//   (x * 2^75 stays finite); products |q x| < 2^-52 lose relative precision (absolute error < 2^-75).
// Measured on an H200 against gemv_m1 (same run): Q4_K 1.15-1.7x faster, Q6_K 1.0-1.45x, except
// Q6_K rows of more than 4096 values in short matrices, left to gemv_m1 (matmul.py _use_gemv1).
#define G1_WARPS 8

__device__ __forceinline__ float fma_dn(float a, float b, float c) {  // fma keeping subnormals
    float d;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
    return d;
}

__device__ __forceinline__ float qmul(u32 w, int i, float xv, float acc) {  // acc + (byte i) 2^-149 x
    return fma_dn(__uint_as_float(__byte_perm(w, 0u, 0x4440u | (u32)i)), xv, acc);
}

__device__ __forceinline__ int g1_swz(int k) {  // float4 k of x -> its slot in shared memory
#if QTYPE == T_Q4_K
    return k ^ (((k >> 4) & 1) | ((k >> 5) & 6));
#else
    return k ^ ((k >> 5) & 7);
#endif
}

template <int R>
struct G1Buf {  // one step's weight bytes of R rows for one lane
#if QTYPE == T_Q4_K
    uint4 hd[R], q[R][4];
#else
    uint4 ql[R][4], qh[R][2];
    uint2 sc[R];
    u16 d[R];
#endif
    // Rows rb + r of w (r < R); with GLU (R = 2) row rb of w (r = 0, gate) and of the same-shaped
    // tensor at up (r = 1).
    template <bool GLU>
    __device__ __forceinline__ void load(const WDesc& w, const u8* up, int rb, int out, int sb, int e) {
        if (sb >= w.nb) return;
#pragma unroll
        for (int r = 0; r < R; r++) {
            const u8* base = GLU && r ? up : w.base;
            const int row = min(GLU ? rb : rb + r, out - 1);
#if QTYPE == T_Q4_K
            const u8* blk = base + (i64)row * w.row_bytes + (i64)sb * 144;
            hd[r] = __ldg((const uint4*)blk);
            q[r][0] = __ldg((const uint4*)(blk + 16 + 32 * e));
            q[r][1] = __ldg((const uint4*)(blk + 32 + 32 * e));
            q[r][2] = __ldg((const uint4*)(blk + 80 + 32 * e));
            q[r][3] = __ldg((const uint4*)(blk + 96 + 32 * e));
#else  // planes ql[nblk][128] | qh[nblk][64] | scales[nblk][16] | d[nblk]
            const i64 b = (i64)row * w.nb + sb;
#pragma unroll
            for (int k = 0; k < 4; k++) ql[r][k] = __ldg((const uint4*)(base + b * 128 + 64 * e + 16 * k));
#pragma unroll
            for (int k = 0; k < 2; k++)
                qh[r][k] = __ldg((const uint4*)(base + w.nblk * 128 + b * 64 + 32 * e + 16 * k));
            sc[r] = __ldg((const uint2*)(base + w.nblk * 192 + b * 16 + 8 * e));
            d[r] = __ldg((const u16*)(base + w.nblk * 208 + b * 2));
#endif
        }
    }
};

template <int R>
__device__ __forceinline__ void g1_step(const G1Buf<R>& B, const float4* __restrict__ sx,
                                        const float* __restrict__ sX, int sb, int e, int v, float (&acc)[R]) {
#if QTYPE == T_Q4_K
    const float2 X0 = ((const float2*)sX)[4 * sb + e], X1 = ((const float2*)sX)[4 * sb + e + 2];
    // Scales/mins of sub-blocks 2e, 2e+1 (chunk e, lo case) and 4+2e, 5+2e (chunk e+2, hi case).
    float D[R][4], Mn[R][4];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const u32 sh = 16 * e;
        const u32 A = B.hd[r].y >> sh, Bm = B.hd[r].z >> sh, C = B.hd[r].w >> sh;
        const u32 sc0 = A & 0x3F3Fu, mn0 = Bm & 0x3F3Fu;
        const u32 sc1 = (C & 0x0F0Fu) | ((A >> 2) & 0x3030u);
        const u32 mn1 = ((C >> 4) & 0x0F0Fu) | ((Bm >> 2) & 0x3030u);
        const float d = h2f((u16)(B.hd[r].x & 0xFFFF)) * 0x1p74f, dh = d * 0x1p-4f;
        const float dm = h2f((u16)(B.hd[r].x >> 16));
        D[r][0] = d * byte_f(sc0, 0);  Mn[r][0] = dm * byte_f(mn0, 0);
        D[r][1] = dh * byte_f(sc0, 1); Mn[r][1] = dm * byte_f(mn0, 1);
        D[r][2] = d * byte_f(sc1, 0);  Mn[r][2] = dm * byte_f(mn1, 0);
        D[r][3] = dh * byte_f(sc1, 1); Mn[r][3] = dm * byte_f(mn1, 1);
    }
    const float4* xp = sx + 64 * sb + 16 * e;
#pragma unroll
    for (int cc = 0; cc < 2; cc++) {  // chunk e + 2cc: 32 qs bytes; lo nibbles = values 0..31
        float slo[R][2], shi[R][2];
#pragma unroll
        for (int r = 0; r < R; r++) slo[r][0] = slo[r][1] = shi[r][0] = shi[r][1] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float4 xl = xp[32 * cc + (i ^ v)], xh = xp[32 * cc + 8 + (i ^ v)];
#pragma unroll
            for (int r = 0; r < R; r++) {
                const u32 wd = word4(B.q[r][2 * cc + (i >> 2)], i & 3);
                const u32 lo = wd & 0x0F0F0F0Fu, hi = wd & 0xF0F0F0F0u;
                float a = slo[r][i & 1], b = shi[r][i & 1];
                a = qmul(lo, 0, xl.x, a);
                a = qmul(lo, 1, xl.y, a);
                a = qmul(lo, 2, xl.z, a);
                a = qmul(lo, 3, xl.w, a);
                b = qmul(hi, 0, xh.x, b);
                b = qmul(hi, 1, xh.y, b);
                b = qmul(hi, 2, xh.z, b);
                b = qmul(hi, 3, xh.w, b);
                slo[r][i & 1] = a;
                shi[r][i & 1] = b;
            }
        }
        const float2 X = cc ? X1 : X0;
#pragma unroll
        for (int r = 0; r < R; r++) {
            float a = acc[r];
            a = fmaf(D[r][2 * cc], slo[r][0] + slo[r][1], a);
            a = fmaf(-Mn[r][2 * cc], X.x, a);
            a = fmaf(D[r][2 * cc + 1], shi[r][0] + shi[r][1], a);
            a = fmaf(-Mn[r][2 * cc + 1], X.y, a);
            acc[r] = a;
        }
    }
#else
    // Sums of x over the 16-value groups 2q + lh of half e (one scale each).
    const float4 Xa = ((const float4*)sX)[4 * sb + 2 * e], Xb = ((const float4*)sX)[4 * sb + 2 * e + 1];
    const float X[8] = {Xa.x, Xa.y, Xa.z, Xa.w, Xb.x, Xb.y, Xb.z, Xb.w};
    const float4* xp = sx + 64 * sb + 32 * e;
#pragma unroll
    for (int lh = 0; lh < 2; lh++) {
        float S[R][4];
#pragma unroll
        for (int r = 0; r < R; r++) S[r][0] = S[r][1] = S[r][2] = S[r][3] = 0.0f;
#pragma unroll
        for (int ii = 0; ii < 4; ii++) {
            const int i = 4 * lh + ii;  // values l = 4i .. 4i+3 of each quarter
#pragma unroll
            for (int qq = 0; qq < 4; qq++) {
                const float4 xq = xp[8 * qq + (i ^ v)];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const u32 h = word4(B.qh[r][lh], ii), a = word4(B.ql[r][lh + 2 * (qq & 1)], ii);
                    // quarter qq: nibble qq/2 of ql | bits 2qq, 2qq+1 of qh, as 6-bit bytes
                    const u32 lo = qq < 2 ? a & 0x0F0F0F0Fu : (a >> 4) & 0x0F0F0F0Fu;
                    const u32 hb = (qq == 0 ? h << 4 : qq == 1 ? h << 2 : qq == 2 ? h : h >> 2) & 0x30303030u;
                    const u32 vq = lo | hb;
                    float t = S[r][qq];
                    t = qmul(vq, 0, xq.x, t);
                    t = qmul(vq, 1, xq.y, t);
                    t = qmul(vq, 2, xq.z, t);
                    t = qmul(vq, 3, xq.w, t);
                    S[r][qq] = t;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float dd = h2f(B.d[r]);
#pragma unroll
            for (int qq = 0; qq < 4; qq++) {  // scale 2qq + lh: byte 2(qq&1) + lh of sc.x (qq < 2) / sc.y
                const u32 word = qq < 2 ? B.sc[r].x : B.sc[r].y;
                const float dsc = dd * (float)(int)(signed char)(u8)(word >> (8 * (2 * (qq & 1) + lh)));
                float a = acc[r];
                a = fmaf(dsc * 0x1p74f, S[r][qq], a);
                a = fmaf(dsc * -32.0f, X[2 * qq + lh], a);
                acc[r] = a;
            }
        }
    }
#endif
}

// GLU: R = 2, a lane's two rows are row rb of gate (w) and of up (same shape and type), and y gets
// act(gate . x) * (up . x): a gated MLP's gate/up pair and its activation in one launch.
template <int R, bool PF, bool GLU>
__device__ __forceinline__ void gemv1_body(WDesc w, const u8* __restrict__ up, int act, const float* __restrict__ x,
                                           float* __restrict__ y, int out, int T) {
    static_assert(!GLU || R == 2, "GLU pairs one gate row with one up row");
    constexpr int TR = GLU ? 2 : 2 * R;  // rows of y a warp tile covers
    extern __shared__ float4 sx[];
    const int nb = w.nb, n4 = nb * 64;
    float* sX = (float*)(sx + n4);  // sum of each scale group of x (Q4_K: 32 values, Q6_K: 16)
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int e = lane & 1, s = (lane >> 1) & 7, rs = lane >> 4;
    const int v = e | ((s & 3) << 1);  // the swizzle of every float4 this lane reads
    const int S = (nb + 7) >> 3;       // steps per tile
    int tile = (blockIdx.x * G1_WARPS + warp) * T, step = 0;
    const int tile_end = tile + T;
    G1Buf<R> cur, nxt;
    const int RS = GLU ? 1 : R;  // rows of y a lane's row slot covers
    cur.template load<GLU>(w, up, tile * TR + rs * RS, out, s, e);  // in flight while x is staged
    pdl_wait();  // x is the previous kernel's output (launched as a dependent: kernels/build.py)

    for (int i = tid; i < n4; i += blockDim.x) {  // n4 is a multiple of 64: whole warps iterate
        float4 a = __ldg((const float4*)x + i);
        float t = (a.x + a.y) + (a.z + a.w);
        t += __shfl_xor_sync(0xFFFFFFFFu, t, 1);
        t += __shfl_xor_sync(0xFFFFFFFFu, t, 2);
#if QTYPE == T_Q4_K
        t += __shfl_xor_sync(0xFFFFFFFFu, t, 4);
        if ((i & 7) == 0) sX[i >> 3] = t;
#else
        if ((i & 3) == 0) sX[i >> 2] = t;
#endif
        a.x *= 0x1p75f; a.y *= 0x1p75f; a.z *= 0x1p75f; a.w *= 0x1p75f;
        sx[g1_swz(i)] = a;
    }
    __syncthreads();

    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    while (tile < tile_end && tile * TR < out) {  // warp-uniform
        const int rb = tile * TR + rs * RS, sb = 8 * step + s;
        const bool last = step == S - 1;
        const int ntile = last ? tile + 1 : tile, nstep = last ? 0 : step + 1;
        if (PF && ntile < tile_end) nxt.template load<GLU>(w, up, ntile * TR + rs * RS, out, 8 * nstep + s, e);
        if (sb < nb) g1_step<R>(cur, sx, sX, sb, e, v, acc);
        if (last) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                float a = acc[r];
                a += __shfl_xor_sync(0xFFFFFFFFu, a, 1);
                a += __shfl_xor_sync(0xFFFFFFFFu, a, 2);
                a += __shfl_xor_sync(0xFFFFFFFFu, a, 4);
                a += __shfl_xor_sync(0xFFFFFFFFu, a, 8);
                acc[r] = a;
            }
            if ((lane & 15) == 0) {
                if (GLU) {
                    if (rb < out) y[rb] = glu_act(acc[0], act) * acc[1];
                } else {
#pragma unroll
                    for (int r = 0; r < R; r++)
                        if (rb + r < out) y[rb + r] = acc[r];
                }
            }
#pragma unroll
            for (int r = 0; r < R; r++) acc[r] = 0.0f;
        }
        tile = ntile;
        step = nstep;
        if (PF) cur = nxt;
        else if (tile < tile_end) cur.template load<GLU>(w, up, tile * TR + rs * RS, out, 8 * step + s, e);
    }
}

// R = 1 prefetches a step ahead; R = 2 (twice the registers per step) does not.
#define GEMV1(R, PF)                                                                              \
    extern "C" __global__ void __launch_bounds__(G1_WARPS * 32, 2)                                \
        gemv1_r##R(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, const float* x,     \
                   float* y, int out, int T) {                                                    \
        gemv1_body<R, PF, false>(WDesc{base, row_bytes, nblk, nb, cols}, nullptr, 0, x, y, out, T); \
    }
GEMV1(1, true) GEMV1(2, false)

// Gate (base) and up (up, same shape and type) of a gated MLP at M = 1: y = act(x . gate^T) * (x . up^T),
// fp32, one launch (the two products and the glu pass of three launches never exist).
extern "C" __global__ void __launch_bounds__(G1_WARPS * 32, 2)
    gemv1_glu(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, const u8* up, const float* x, float* y,
              int out, int T, int act) {
    gemv1_body<2, false, true>(WDesc{base, row_bytes, nblk, nb, cols}, up, act, x, y, out, T);
}
#endif

__device__ __forceinline__ void store4_f16(__half* p, float4 v) {
    __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
    *(uint2*)p = make_uint2(*(u32*)&a, *(u32*)&b);
}

__device__ __forceinline__ void store8_f16(__half* p, const float (&v)[8]) {
    __half2 h[4];
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *(uint4*)p = make_uint4(*(u32*)&h[0], *(u32*)&h[1], *(u32*)&h[2], *(u32*)&h[3]);
}

// Piece t (8 values) of rows ids[i] (or r0 + i): thread t -> row i, unit u, piece pc. The 32
// lanes of a warp hold 8 consecutive units, i.e. 256 consecutive values of a row for the
// k-quants, so every store instruction of a warp writes one contiguous 512-byte (f16) stretch.
// Piece counts stay below 2^31 (kernels/matmul.py checks): 32-bit index math, no 64-bit division.
__device__ __forceinline__ int dequant_piece(const WDesc& w, const int* ids, int r0, u32 t, u32 units,
                                             float (&v)[8], u32& i) {
    i = t / (4 * units);
    const u32 rem = t - i * 4 * units;
    const i64 row = ids ? (i64)ids[i] : (i64)r0 + i;
    return Piece<QTYPE>::load8(w, row, (int)(rem >> 2), (int)(rem & 3), v);
}

// Unit t (32 values) of rows ids[i] (or r0 + i): thread t -> row i = t / units, unit u; the unit is
// decoded once (one Dec::load: its quant and scale loads, its scales) into four 8-value pieces,
// v[pc] at row position k[pc] (run pc / 2, values 8 * (pc % 2) .. +7). The e4m3 kernels take a
// unit a thread: their conversion makes a piece a thread issue-bound, and a unit a thread measured
// 1.2-1.6x faster on the 7B's shapes (bench/RESULTS.md, tenth session). prep_f16 keeps a piece a
// thread, whose warp stores are contiguous: a unit a thread measured 1.3x slower there for Q4_K.
__device__ __forceinline__ u32 dequant_unit(const WDesc& w, const int* ids, int r0, u32 t, u32 units,
                                            float (&v)[4][8], int (&k)[4]) {
    const u32 i = t / units, u = t - i * units;
    D dec;
    dec.load(w, ids ? (i64)ids[i] : (i64)r0 + i, (int)u);
#pragma unroll
    for (int pc = 0; pc < 4; pc++) {
        put8(v[pc], dec.get4(2 * pc), dec.get4(2 * pc + 1));
        k[pc] = D::kpos((int)u, pc >> 1) + 8 * (pc & 1);
    }
    return i;
}

// One launch prepares both cuBLAS operands: blocks [0, wblocks) write W's rows [r0, r0+nrows)
// as f16 [nrows, kpad]; the rest convert x (fp32 [M, cols], row stride ldx) to f16 [M, kpad] with
// a zero tail. 8 values per thread, one 16-byte store each.
extern "C" __global__ void __launch_bounds__(256)
    prep_f16(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, int r0, int nrows,
             __half* wout, const float* __restrict__ x, int ldx, int M, __half* xout) {
    const WDesc w{base, row_bytes, nblk, nb, cols};
    const u32 units = nb * D::UNITS, kpad = nb * D::QK;
    const u32 wpieces = (u32)nrows * units * 4, wblocks = (wpieces + 255) / 256;
    float v[8];
    if (blockIdx.x < wblocks) {
        const u32 t = blockIdx.x * 256 + threadIdx.x;
        if (t >= wpieces) return;
        u32 i;
        const int k = dequant_piece(w, nullptr, r0, t, units, v, i);
        store8_f16(wout + (i64)i * kpad + k, v);
        return;
    }
    const u32 t = (blockIdx.x - wblocks) * 256 + threadIdx.x, per_row = kpad / 8;
    if (t >= (u32)M * per_row) return;
    const u32 m = t / per_row;
    const int k = (int)(t - m * per_row) * 8;
    const float* src = x + (i64)m * ldx;
    if (k + 8 <= cols && ((ldx | cols) & 3) == 0 && ((size_t)x & 15) == 0) {
        put8(v, __ldg((const float4*)(src + k)), __ldg((const float4*)(src + k + 4)));
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = k + e < cols ? __ldg(src + k + e) : 0.0f;
    }
    store8_f16(xout + (i64)m * kpad + k, v);
}

// FP8 mode (engine/fp8.py; kernels/matmul.py _gemm_fp8): rows [r0, r0+nrows) of W as e4m3
// [nrows, kpad] for cuBLASLt, each row times its inverse scale inv[r0 + i] first; a unit a
// thread, four 8-byte stores.
extern "C" __global__ void __launch_bounds__(256)
    prep_e4m3(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, int r0, int nrows,
              const float* __restrict__ inv, u8* __restrict__ wout) {
    const WDesc w{base, row_bytes, nblk, nb, cols};
    const u32 units = nb * D::UNITS, kpad = nb * D::QK;
    const u32 t = blockIdx.x * 256 + threadIdx.x;
    if (t >= (u32)nrows * units) return;
    float v[4][8];
    int k[4];
    const u32 i = dequant_unit(w, nullptr, r0, t, units, v, k);
    const float s = inv[r0 + i];
#pragma unroll
    for (int pc = 0; pc < 4; pc++) {
#pragma unroll
        for (int e = 0; e < 8; e++) v[pc][e] = k[pc] + e < cols ? v[pc][e] : 0.0f;  // a last block's bytes past cols
        store8_e4m3(wout + (i64)i * kpad + k[pc], v[pc], s);
    }
}

// The FP8 mode's per-row scales of W, once per matrix: block b reads row b (the same decode as
// prep_e4m3) and writes amax / 448 and 448 / amax of its |values| (fp8.cuh e4m3_row_scales).
extern "C" __global__ void __launch_bounds__(256)
    row_scales_e4m3(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, float* __restrict__ scale,
                    float* __restrict__ inv) {
    const WDesc w{base, row_bytes, nblk, nb, cols};
    const u32 units = nb * D::UNITS;
    __shared__ float red[8];
    float m = 0.0f, v[4][8];
    int k[4];
    for (u32 p = threadIdx.x; p < units; p += 256) {
        dequant_unit(w, nullptr, blockIdx.x, p, units, v, k);
#pragma unroll
        for (int pc = 0; pc < 4; pc++)
#pragma unroll
            for (int e = 0; e < 8; e++)
                if (k[pc] + e < cols) m = fmaxf(m, fabsf(v[pc][e]));  // the row's values only, not a last block's padding
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll
        for (int j = 1; j < 8; j++) m = fmaxf(m, red[j]);
        e4m3_row_scales(m, scale[blockIdx.x], inv[blockIdx.x]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    gather_f32(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, const int* ids, int n,
               float* out) {
    const WDesc w{base, row_bytes, nblk, nb, cols};
    const u32 units = nb * D::UNITS, t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (u32)n * units * 4) return;
    float v[8];
    u32 i;
    const int k = dequant_piece(w, ids, 0, t, units, v, i);
    float* dst = out + (i64)i * cols + k;
#pragma unroll
    for (int e = 0; e < 8; e++)
        if (k + e < cols) dst[e] = v[e];
}

// ------------------------------------------------------------------------------------------
// Fused tensor-core GEMM (kernels/matmul.py _gemm_fused): y[M, out] = x[M, kpad] . W^T, x as f16
// [M, ldx] (zero tail past cols), W dequantized a tile at a time into shared memory as f16, never
// into a scratch in global memory; mma.sync m16n8k16 with fp32 sums (sm_80 and later).
//
// Block: 256 threads = 8 warps, WO (along W's rows) x WT (along tokens); a tile is BO = 128 rows of
// W x BT tokens, walked in k tiles of BK = 128 values. Per k tile a thread dequantizes two 32-value
// units (rows r and r + 64 of the tile, unit j = tid % 4) and copies x with cp.async.
// Pipeline: two shared-memory stages of the f16 W tile, XS of the x tile (3 up to 32 tokens, else
// 2). Iteration i waits for x tile i and syncs; starts the cp.async of x tile i + XS - 1; runs the
// mma of W stage i % 2, and between its steps finishes the W units of tile i+1 (their global loads,
// Dec::fetch, were issued two iterations earlier into a second register set) into the other stage,
// then issues the loads of tile i+3. Q4_K is dequantized in f16x2 arithmetic (store_unit).
// Measured (bench/RESULTS.md): the main loop alone stops near 300 TFLOP/s on an H200; the decode,
// not the loads, costs the rest.
// Grid: x = token tiles (neighbouring blocks share W's tile in L2), y = row tiles, z = splits of k.
// Split-K (S = gridDim.z > 1): block z takes k tiles [z KT / S, (z+1) KT / S) and writes fp32 sums
// to ws[z] ([M, out]); splitk_sum adds the S parts in order (deterministic) into y.
// GLU (gate_up_bt<BT>): tile rows [0, 64) are gate rows o0 + r, rows [64, 128) the same rows of up;
// the gate and up warps swap half their sums through shared memory and each writes f16
// act(gate) * up for its half of the tokens (gemm_epilogue): the two [M, rows] products never exist.
#define BO 128
#define BK 128
#define LDS (BK + 8)  // f16 per smem row; the 16-byte pad makes ldmatrix rows hit distinct banks

__device__ __forceinline__ u32 smem_u32(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared, asynchronously; src_bytes = 0 writes zeros (rows past M, k past kpad).
__device__ __forceinline__ void cp_async16_s(u32 dst, const void* src, int src_bytes) {  // dst: a shared address
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    cp_async16_s(smem_u32(dst), src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Dec::fetch / Dec::finish where the type splits its load (Q4_K, Q6_K), else load at fetch time.
template <class T>
__device__ __forceinline__ auto dec_fetch(T& d, const WDesc& w, i64 row, int u, int)
    -> decltype(d.fetch(w, row, u), void()) {
    d.fetch(w, row, u);
}
template <class T>
__device__ __forceinline__ void dec_fetch(T& d, const WDesc& w, i64 row, int u, long) {
    d.load(w, row, u);
}
template <class T>
__device__ __forceinline__ auto dec_finish(T& d, int) -> decltype(d.finish(), void()) {
    d.finish();
}
template <class T>
__device__ __forceinline__ void dec_finish(T&, long) {}

// First k tile of split z of KT tiles over gridDim.z splits (split-K).
__device__ __forceinline__ int split_begin(int KT, u32 z) { return (int)((i64)z * KT / gridDim.z); }

template <int BT> struct GemmShape {
    static constexpr int WO = BT == 128 ? 2 : BT == 16 ? 8 : 4;  // warps along W's rows
    static constexpr int WT = 8 / WO;                            // warps along tokens
    static constexpr int MI = BO / (16 * WO);                    // m16 tiles a warp (rows)
    static constexpr int NJ = BT / (8 * WT);                     // n8 tiles a warp (tokens), even
    static constexpr int XS = BT <= 32 ? 3 : 2;                   // x stages (copies in flight: XS - 1)
    static constexpr int SMEM = (2 * BO + XS * BT) * LDS * 2;
    static_assert(NJ % 2 == 0 && MI >= 1, "tile shape");
};

__device__ __forceinline__ u32 h2u(__half2 h) { return *(u32*)&h; }
__device__ __forceinline__ __half2 u2h(u32 u) { return *(__half2*)&u; }

// Two 4-bit quants, the nibbles under `mask` of p's 16-bit lanes, as f16x2 q * s + n: a nibble OR
// 0x6400 is the f16 1024 + q (1024 + 16 q for a high nibble), minus 1024 exactly q (16 q); then
// one HFMA2 (the fused GEMM's store_unit). k1024: the f16x2 1024, made once by the caller.
__device__ __forceinline__ u32 q4_f16x2(u32 p, u32 mask, __half2 s, __half2 n, __half2 k1024) {
    return h2u(__hfma2(__hsub2(u2h((p & mask) | 0x64006400u), k1024), s, n));
}

// One decoded unit (32 values: run 0 at ka, run 1 at kb of the tile row) as f16 into shared memory:
// values 8 h .. 8 h + 7 of run `run` go to dst.at(run, h), one 16-byte store. The layout L places
// them: RowTile in the mma.sync tile, UnitSlots in the wgmma tile.
// A plain row of the tile (gemm_bt: [BO][LDS] f16); ka, kb: the unit's runs in the row.
struct RowTile {
    __half* p;
    int ka, kb;
    __device__ __forceinline__ __half* at(int run, int h) const { return p + (run ? kb : ka) + 8 * h; }
};
#if QTYPE == T_Q4_K
// Q4_K in f16x2 arithmetic, 1.75 instructions a value: two neighbouring quant bytes are spread to
// the two 16-bit lanes (PRMT), then q4_f16x2 with the sub-block's scale (over 16 for high nibbles)
// and minus its min, both rounded to f16 (the fp32 path rounds only the result).
template <class L>
__device__ __forceinline__ void store_unit(const D& dec, const L& dst) {
    const __half2 s0 = __float2half2_rn(dec.d0), n0 = __float2half2_rn(-dec.m0);
    const __half2 s1 = __float2half2_rn(dec.d1 * 0.0625f), n1 = __float2half2_rn(-dec.m1);
    const __half2 k1024 = __float2half2_rn(1024.0f);
#pragma unroll
    for (int r = 0; r < 2; r++) {  // values 8r .. 8r+7 of each run: quant bytes 8r .. 8r+7
        u32 lo[4], hi[4];
#pragma unroll
        for (int wd = 0; wd < 2; wd++) {
            const u32 w = word4(dec.q, 2 * r + wd);
#pragma unroll
            for (int pr = 0; pr < 2; pr++) {  // bytes 2pr, 2pr+1 of the word
                const u32 p = __byte_perm(w, 0u, pr ? 0x4342u : 0x4140u);
                lo[2 * wd + pr] = q4_f16x2(p, 0x000F000Fu, s0, n0, k1024);
                hi[2 * wd + pr] = q4_f16x2(p, 0x00F000F0u, s1, n1, k1024);
            }
        }
        *(uint4*)dst.at(0, r) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
        *(uint4*)dst.at(1, r) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    }
}
#else
template <class L>
__device__ __forceinline__ void store_unit(const D& dec, const L& dst) {
#pragma unroll
    for (int gg = 0; gg < 4; gg++) {  // values 8 (gg & 1) .. +7 of run gg / 2
        const float4 lo = dec.get4(2 * gg), hi = dec.get4(2 * gg + 1);
        const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        store8_f16(dst.at(gg >> 1, gg & 1), v);
    }
}
#endif

// The two units of W a thread dequantizes per k tile: tile rows r0 = tid / 4 and r0 + 64 (for the
// GLU: gate row and up row o0 + r0), unit j = tid % 4 of the tile. Two register sets: the loads of
// tile kt go to set kt % 2, two tiles ahead of their use (the main loop is unrolled by two, so the
// set indices are compile-time constants and the sets stay in registers).
struct WUnits {
    D dec[2][2];
    i64 row[2];
    WDesc w[2];
    int j;

    // Thread p of the tile's 256 decoding threads: tile rows p / 4 and p / 4 + 64 (GLU: gate row
    // o0 + p / 4 and the same row of up), unit p % 4.
    template <bool GLU>
    __device__ __forceinline__ void init(const WDesc& wa, const WDesc& wb, int o0, int p, int out) {
        const int r0 = p >> 2;
        j = p & 3;
        w[0] = wa;
        w[1] = GLU ? wb : wa;
        row[0] = min(o0 + r0, out - 1);
        row[1] = GLU ? row[0] : min(o0 + r0 + 64, out - 1);
    }

    __device__ __forceinline__ void fetch(int set, int kt) {
        const int u = kt * (BK / 32) + j;
#pragma unroll
        for (int i = 0; i < 2; i++)
            if (u < w[i].nb * D::UNITS) dec_fetch(dec[set][i], w[i], row[i], u, 0);
    }
    // Unit i of tile kt (in register set `set`) to `dst`, its place in the tile (store_unit's layout);
    // zeros past the row's units.
    template <class L>
    __device__ __forceinline__ void store(int set, int i, int kt, const L& dst) {
        // Types of 256-value blocks fill every k tile (kpad a multiple of BK): no test, no branch, so
        // that the two units' decode can interleave.
        if (D::QK % BK == 0 || kt * (BK / 32) + j < w[i].nb * D::UNITS) {
            dec_finish(dec[set][i], 0);
            store_unit(dec[set][i], dst);
        } else {
#pragma unroll
            for (int q = 0; q < 4; q++) *(uint4*)dst.at(q >> 1, q & 1) = make_uint4(0u, 0u, 0u, 0u);
        }
    }
};

// The fused GEMMs' output: D fragment v of (mi, nj) is W row wo + 16 mi + g + 8 (v >> 1), token
// wt + 8 nj + 2 tq + (v & 1) of the tile. GLU: tile rows [0, 64) are gate rows, [64, 128) the same
// rows of up; the warps of gate row r and up row r + 64 hold the same tokens in the same lanes. Each
// hands the other the sums of half its n8 tiles through shared memory (over the pipeline's buffers:
// every warp is done with them) and finishes the other half, f16 act(gate) * up: gate warps the
// tiles nj < NJ / 2, up warps the rest, so that all the warps that hold sums share the epilogue.
// Else y (fp32 or f16) or, split over k, ws[z].
// Barrier among the 256 threads that hold the sums (threads 0..255; named barrier 7, so that the
// wgmma kernels' other warps need not take part).
__device__ __forceinline__ void sums_sync() { asm volatile("bar.sync 7, 256;\n" ::: "memory"); }

template <int MI, int NJ, int BT, bool GLU>
__device__ __forceinline__ void gemm_epilogue(const float (&acc)[MI][NJ][4], void* smem_raw, int wo, int wt,
                                              int o0, int t0, int M, void* y, int ldy, int y_f16, float* ws,
                                              int out, int act) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    if (GLU) {
        constexpr int LG = BT + 4;
        float* sS = (float*)smem_raw;  // sums [128][LG], rows of the tile
        const bool gate = wo < 64;     // warp-uniform
        sums_sync();
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int nj = 0; nj < NJ; nj++)
                if ((nj < NJ / 2) != gate) {
#pragma unroll
                    for (int v = 0; v < 4; v++)
                        sS[(wo + 16 * mi + g + 8 * (v >> 1)) * LG + wt + 8 * nj + 2 * tq + (v & 1)] = acc[mi][nj][v];
                }
        sums_sync();
        __half* yh = (__half*)y;
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int nj = 0; nj < NJ; nj++)
                if ((nj < NJ / 2) == gate) {
#pragma unroll
                    for (int v = 0; v < 4; v++) {
                        const int r = wo + 16 * mi + g + 8 * (v >> 1), tt = wt + 8 * nj + 2 * tq + (v & 1);
                        const int rg = gate ? r : r - 64;  // the pair's gate row
                        const float other = sS[(gate ? r + 64 : rg) * LG + tt];
                        const float gs = gate ? acc[mi][nj][v] : other, us = gate ? other : acc[mi][nj][v];
                        const int o = o0 + rg, t = t0 + tt;
                        if (o < out && t < M) yh[(i64)t * ldy + o] = __float2half_rn(glu_act(gs, act) * us);
                    }
                }
        return;
    }
    float* part = gridDim.z > 1 ? ws + (i64)blockIdx.z * M * out : nullptr;
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int nj = 0; nj < NJ; nj++)
#pragma unroll
            for (int v = 0; v < 4; v++) {
                const int o = o0 + wo + 16 * mi + g + 8 * (v >> 1);
                const int t = t0 + wt + 8 * nj + 2 * tq + (v & 1);
                if (o >= out || t >= M) continue;
                const float a = acc[mi][nj][v];
                if (part) part[(i64)t * out + o] = a;
                else if (y_f16) ((__half*)y)[(i64)t * ldy + o] = __float2half_rn(a);
                else ((float*)y)[(i64)t * ldy + o] = a;
            }
}

template <int BT, bool GLU>
__device__ __forceinline__ void gemm_body(const WDesc& wa, const WDesc& wb, const __half* __restrict__ x,
                                          int ldx, int M, void* y, int ldy, int y_f16, float* ws,
                                          int out, int act) {
    typedef GemmShape<BT> S;
    extern __shared__ uint4 smem_raw[];
    __half* sW = (__half*)smem_raw;  // [2][BO][LDS]
    __half* sX = sW + 2 * BO * LDS;  // [XS][BT][LDS]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int t0 = blockIdx.x * BT, o0 = blockIdx.y * (GLU ? BO / 2 : BO);
    const int wo = (warp % S::WO) * (16 * S::MI), wt = (warp / S::WO) * (8 * S::NJ);
    const int kpad = wa.nb * D::QK, KT = (kpad + BK - 1) / BK;
    const int kt0 = split_begin(KT, blockIdx.z), kt1 = split_begin(KT, blockIdx.z + 1);

    WUnits wu;
    const int r0 = tid >> 2;
    wu.init<GLU>(wa, wb, o0, tid, out);
    // The runs of this thread's units in a tile row: the same in every k tile.
    const int ka = D::kpos(wu.j, 0), kb = D::kpos(wu.j, 1);
    auto load_x = [&](int kt, __half* dst) {
        const int k0 = kt * BK;
        for (int c = tid; c < BT * (BK / 8); c += 256) {
            const int t = c / (BK / 8), kk = (c % (BK / 8)) * 8;
            const bool ok = t0 + t < M && k0 + kk < kpad;
            const __half* src = ok ? x + (i64)(t0 + t) * ldx + k0 + kk : x;
            cp_async16(dst + t * LDS + kk, src, ok ? 16 : 0);
        }
        cp_async_commit();
    };

    float acc[S::MI][S::NJ][4];
#pragma unroll
    for (int i = 0; i < S::MI; i++)
#pragma unroll
        for (int j = 0; j < S::NJ; j++)
#pragma unroll
            for (int v = 0; v < 4; v++) acc[i][j][v] = 0.0f;

    // Iteration i (tile kt0 + i, P = i % 2): x tile i is in stage i % XS, W tile i in sW stage P;
    // tile i+1's units (set P^1) are stored into sW stage P^1 between the mma steps and tile i+3's
    // loads issued into that set; x tile i + XS - 1 is copied.
    const int n = kt1 - kt0;
    if (n > 0) {
        wu.fetch(0, kt0);
        if (n > 1) wu.fetch(1, kt0 + 1);
#pragma unroll
        for (int q = 0; q < S::XS - 1; q++) {
            if (q < n) load_x(kt0 + q, sX + q * BT * LDS);
            else cp_async_commit();
        }
        wu.store(0, 0, kt0, RowTile{sW + r0 * LDS, ka, kb});
        wu.store(0, 1, kt0, RowTile{sW + (r0 + 64) * LDS, ka, kb});
        if (n > 2) wu.fetch(0, kt0 + 2);
    }
    for (int i0 = 0; i0 < n; i0 += 2) {
#pragma unroll
        for (int P = 0; P < 2; P++) {
            const int i = i0 + P;
            if (i >= n) break;
            cp_async_wait<S::XS - 2>();
            __syncthreads();
            const bool more = i + 1 < n;
            if (i + S::XS - 1 < n) load_x(kt0 + i + S::XS - 1, sX + ((i + S::XS - 1) % S::XS) * BT * LDS);
            else cp_async_commit();  // an empty group keeps the wait count uniform
            const __half* cW = sW + P * BO * LDS;
            const __half* cX = sX + (i % S::XS) * BT * LDS;
            __half* nW = sW + (P ^ 1) * BO * LDS;
#pragma unroll
            for (int ks = 0; ks < BK; ks += 16) {
                if (more && ks == 0) wu.store(P ^ 1, 0, kt0 + i + 1, RowTile{nW + r0 * LDS, ka, kb});
                if (more && ks == BK / 2) {
                    wu.store(P ^ 1, 1, kt0 + i + 1, RowTile{nW + (r0 + 64) * LDS, ka, kb});
                    if (i + 3 < n) wu.fetch(P ^ 1, kt0 + i + 3);
                }
                u32 a[S::MI][4], b[S::NJ][2];
#pragma unroll
                for (int mi = 0; mi < S::MI; mi++)
                    ldsm_x4(smem_u32(cW + (wo + 16 * mi + (lane & 15)) * LDS + ks + (lane >> 4) * 8),
                            a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
#pragma unroll
                for (int jj = 0; jj < S::NJ / 2; jj++)
                    ldsm_x4(smem_u32(cX + (wt + 16 * jj + (lane & 7) + (lane >> 4) * 8) * LDS + ks +
                                     ((lane >> 3) & 1) * 8),
                            b[2 * jj][0], b[2 * jj][1], b[2 * jj + 1][0], b[2 * jj + 1][1]);
#pragma unroll
                for (int mi = 0; mi < S::MI; mi++)
#pragma unroll
                    for (int nj = 0; nj < S::NJ; nj++) mma16816(acc[mi][nj], a[mi], b[nj][0], b[nj][1]);
            }
        }
    }
    gemm_epilogue<S::MI, S::NJ, BT, GLU>(acc, smem_raw, wo, wt, o0, t0, M, y, ldy, y_f16, ws, out, act);
}

#define GEMM_FUSED(BT, MINB)                                                                       \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                        \
        gemm_bt##BT(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, const __half* x,    \
                    int ldx, int M, void* y, int ldy, int y_f16, float* ws, int out) {             \
        const WDesc w{base, row_bytes, nblk, nb, cols};                                            \
        gemm_body<BT, false>(w, w, x, ldx, M, y, ldy, y_f16, ws, out, 0);                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                        \
        gate_up_bt##BT(const u8* gbase, const u8* ubase, i64 row_bytes, i64 nblk, int nb, int cols, \
                       const __half* x, int ldx, int M, __half* y, int ldy, int out, int act) {    \
        const WDesc wg{gbase, row_bytes, nblk, nb, cols}, wu{ubase, row_bytes, nblk, nb, cols};    \
        gemm_body<BT, true>(wg, wu, x, ldx, M, y, ldy, 1, nullptr, out, act);                      \
    }
GEMM_FUSED(16, 2) GEMM_FUSED(32, 2) GEMM_FUSED(64, 2) GEMM_FUSED(128, 1)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// ------------------------------------------------------------------------------------------
// The fused GEMM on Hopper's wgmma (sm_90a only; kernels/matmul.py picks it by compute capability,
// gemm_bt / gate_up_bt above stay the portable twin): y[M, out] = x[M, kpad] . W^T, the same
// arguments, tiles (BO = 128 rows of W x BT tokens, k tiles of BK = 128), split-K, GLU pairing and
// epilogue as gemm_bt<BT> / gate_up_bt<BT>.
//
// Block: 512 threads in two roles (warp specialization), meeting at named barriers:
// - warpgroups 0 and 1 multiply: warpgroup g takes W tile rows [64 g, 64 g + 64) (GLU: 0 gate, 1 up)
//   times the whole x tile, wgmma.mma_async m64nBTk16 with both operands in shared memory and fp32
//   sums in registers; they also copy x's tiles (cp.async, two tiles ahead), hold the sums and run
//   the epilogue;
// - warpgroups 2 and 3 dequantize W's tiles: thread p takes two 32-value units, tile rows p / 4 and
//   p / 4 + 64, unit p % 4 (their loads issued two tiles ahead).
// Measured on an H200 (bench/RESULTS.md, eleventh session): this split gained ~4% over one set of 8
// warps doing everything; either way the kernel keeps the tensor cores ~30% busy at large M (about
// 3.5x a k tile's wgmma time a k tile), with no unit of the SM near its limit. Part of it was the
// epilogue (a third of the warp samples at M = 2048, twelfth session: silu's division, and only the
// up warps working), since shared by gate and up warps and using __fdividef (act.cuh); the rest is
// not yet explained.
// Rings: WG_WS stages of the W tile, WG_XS of the x tile. FULL(s): the dequantizing warps have stored
// W stage s (fenced for the async proxy); the multiplying warps wait on it, which also makes their
// own x copies visible to each other. EMPTY(s): both multiplying warpgroups have finished the wgmma
// that read W stage s. An x stage is rewritten two iterations after its tile's FULL barrier, when
// every multiplying warp has waited for that tile's wgmma.
// Shared-memory tiles are wgmma's K-major layout with the 128-byte swizzle (swz_off): a tile is two
// halves of 64 values of k, a row of a half is 128 bytes, and its eight 16-byte groups are permuted
// by XOR with the row's index mod 8, so that the 8 rows a wgmma reads at one k group fall in distinct
// banks. (The dequantize's 16-byte stores, 2 rows x 4 units a quarter-warp, still take about twice
// the ideal wavefronts.)
#define WG_WS 3               // W stages
#define WG_XS 4               // x stages
#define WG_THREADS 512        // 2 multiplying + 2 dequantizing warpgroups
#define WG_FULL(s) (1 + (s))  // named barriers (0: __syncthreads; 7: sums_sync)
#define WG_EMPTY(s) (4 + (s))

template <int BT> struct WgShape {
    static constexpr int WTILE = BO * BK, XTILE = BT * BK;  // f16 values
    static constexpr int SMEM = (WG_WS * WTILE + WG_XS * XTILE) * 2;
    static_assert(BT == 64 || BT == 128, "tile");
};

// f16 offset of (row r, 8-value group g of k) in a [ROWS][BK] wgmma tile: group g is 16 bytes at half
// g / 8 (64 values of k), row r, position (g % 8) ^ (r % 8). Tiles start 1024-byte aligned (the
// swizzle pattern repeats every 8 rows of 128 bytes and is taken from the address bits).
template <int ROWS> __device__ __forceinline__ int swz_off(int r, int g) {
    return (g >> 3) * (ROWS * 64) + r * 64 + (((g & 7) ^ (r & 7)) << 3);
}

// A unit's four 16-byte groups in a wgmma W tile (store_unit's layout), their offsets made once.
struct UnitSlots {
    __half* p;  // the stage
    int o[4];   // group h of run `run` at p + o[2 run + h]
    __device__ __forceinline__ __half* at(int run, int h) const { return p + o[2 * run + h]; }
};

// wgmma's shared-memory matrix descriptor for a K-major operand with the 128-byte swizzle: start
// address, stride byte offset 1024 (8-row groups), leading byte offset unused (1), layout 1 (128B
// swizzle); address fields in 16-byte units. A k16 step inside a 64-value half starts 32 bytes
// further: the swizzle applies to the address, as the stores did. wg_desc_lo: the low word (address,
// leading byte offset); WG_DESC_HI (below): the high word (stride byte offset, layout).
__device__ __forceinline__ u32 wg_desc_lo(u32 addr) { return ((addr & 0x3FFFF) >> 4) | (1u << 16); }

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy writes to shared memory (st.shared, cp.async) made visible to wgmma (async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator reads or writes across a wgmma fence or wait.
template <int N> __device__ __forceinline__ void wg_hold(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

#define WG_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])
// d += A (64 x 16, descriptor a) . B (BT x 16, descriptor b)^T; D fragment as mma.sync's m16n8 C:
// warp w of the warpgroup, lane (g, t): d[4 j + v] is row 16 w + g + 8 (v >> 1), column 8 j + 2 t + (v & 1).
// The descriptors' high words are the same for every operand (WG_DESC_HI: stride byte offset, layout);
// their low words (address, leading byte offset) are the 32-bit a and b, so that a k step adds one
// 32-bit constant to each.
#define WG_DESC_HI ((1024u >> 4) | (1u << 30))
__device__ __forceinline__ void wgmma_bt(float (&d)[64], u32 a, u32 b) {
    asm volatile(
        "{\n.reg .b64 da, db;\n"
        "mov.b64 da, {%64, %66};\n"
        "mov.b64 db, {%65, %66};\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "da, db, 1, 1, 1, 0, 0;\n}\n"
        : WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24), WG_F8(32), WG_F8(40), WG_F8(48), WG_F8(56)
        : "r"(a), "r"(b), "r"(WG_DESC_HI));
}
__device__ __forceinline__ void wgmma_bt(float (&d)[32], u32 a, u32 b) {
    asm volatile(
        "{\n.reg .b64 da, db;\n"
        "mov.b64 da, {%32, %34};\n"
        "mov.b64 db, {%33, %34};\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "da, db, 1, 1, 1, 0, 0;\n}\n"
        : WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24)
        : "r"(a), "r"(b), "r"(WG_DESC_HI));
}
#undef WG_F8

// Dequantizing warpgroups: W's tiles [kt0, kt0 + n) into the W ring.
template <bool GLU>
__device__ __forceinline__ void wg_dequant(const WDesc& wa, const WDesc& wb, int out, __half* sW, int o0, int kt0,
                                           int n) {
    WUnits wu;
    const int p = threadIdx.x - 256, r0 = p >> 2;
    wu.init<GLU>(wa, wb, o0, p, out);
    // The units' places in every tile: four units always cover one aligned 128-value slice of a row.
    const int ka = D::kpos(wu.j, 0) / 8, kb = D::kpos(wu.j, 1) / 8;
    UnitSlots us[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        us[i].o[0] = swz_off<BO>(r0 + 64 * i, ka);
        us[i].o[1] = swz_off<BO>(r0 + 64 * i, ka + 1);
        us[i].o[2] = swz_off<BO>(r0 + 64 * i, kb);
        us[i].o[3] = swz_off<BO>(r0 + 64 * i, kb + 1);
    }
    if (n > 0) wu.fetch(0, kt0);
    if (n > 1) wu.fetch(1, kt0 + 1);
    for (int i0 = 0; i0 < n; i0 += 2) {
#pragma unroll
        for (int P = 0; P < 2; P++) {
            const int i = i0 + P, s = i % WG_WS;
            if (i >= n) break;
            if (i >= WG_WS) bar_sync(WG_EMPTY(s), WG_THREADS);  // the multiply of tile i - WG_WS is done
#pragma unroll
            for (int u = 0; u < 2; u++) {
                us[u].p = sW + s * (BO * BK);
                wu.store(P, u, kt0 + i, us[u]);
            }
            if (i + 2 < n) wu.fetch(P, kt0 + i + 2);
            fence_proxy_async();  // this thread's stores, visible to wgmma
            bar_arrive(WG_FULL(s), WG_THREADS);
        }
    }
}

template <int BT, bool GLU>
__device__ __forceinline__ void wg_body(const WDesc& wa, const WDesc& wb, const __half* __restrict__ x, int ldx,
                                        int M, void* y, int ldy, int y_f16, float* ws, int out, int act) {
    typedef WgShape<BT> S;
    extern __shared__ __align__(1024) uint4 smem_raw[];
    __half* sW = (__half*)smem_raw;      // [WG_WS][BO x BK] (swz_off<BO>)
    __half* sX = sW + WG_WS * S::WTILE;  // [WG_XS][BT x BK] (swz_off<BT>)
    const int tid = threadIdx.x, warp = tid >> 5, wgp = tid >> 7;
    const int t0 = blockIdx.x * BT, o0 = blockIdx.y * (GLU ? BO / 2 : BO);
    const int kpad = wa.nb * D::QK, KT = (kpad + BK - 1) / BK;
    const int kt0 = split_begin(KT, blockIdx.z), kt1 = split_begin(KT, blockIdx.z + 1);
    const int n = kt1 - kt0;
    if (wgp >= 2) {
        wg_dequant<GLU>(wa, wb, out, sW, o0, kt0, n);
        return;
    }
    // x: copy q of a tile is token xt + 16 q, k group xg (a quarter-warp: 8 rows of one group, distinct
    // banks); rows past M and k past kpad are zeros.
    const int xg = (tid >> 3) & 15, xt = (tid >> 7) * 8 + (tid & 7);
    const u32 xdst = smem_u32(sX + swz_off<BT>(xt, xg));  // + 2048 q bytes (16 rows) for copy q
    const __half* xsrc = x + (i64)min(t0 + xt, M - 1) * ldx + 8 * xg;
    u32 xok = 0;  // bit q: token xt + 16 q is a row of x
#pragma unroll
    for (int q = 0; q < BT / 16; q++) xok |= (t0 + xt + 16 * q < M ? 1u : 0u) << q;
    auto load_x = [&](int kt, int stage) {
        const int k = kt * BK;
        const bool kin = k + 8 * xg < kpad;
#pragma unroll
        for (int q = 0; q < BT / 16; q++) {
            const bool ok = kin && ((xok >> q) & 1u);
            cp_async16_s(xdst + stage * S::XTILE * 2 + 2048 * q, ok ? xsrc + (i64)16 * q * ldx + k : x, ok ? 16 : 0);
        }
        cp_async_commit();
    };

    float acc[BT / 2];
#pragma unroll
    for (int i = 0; i < BT / 2; i++) acc[i] = 0.0f;
    // Descriptors (low words) of stage 0 (this warpgroup's 64 rows of W; all of x); a stage, a half
    // and a k16 step inside a half add to their address field (16-byte units).
    const u32 dW = wg_desc_lo(smem_u32(sW) + wgp * 64 * 128), dX = wg_desc_lo(smem_u32(sX));
    if (n > 0) load_x(kt0, 0);
    if (n > 1) load_x(kt0 + 1, 1);
    else cp_async_commit();
    for (int i = 0; i < n; i++) {
        cp_async_wait<1>();   // this thread's copies of x tile i have landed
        fence_proxy_async();  // ... visible to wgmma
        bar_sync(WG_FULL(i % WG_WS), WG_THREADS);  // W tile i stored; every multiplying warp is past tile i - 1
        // The tile's wgmma first, queued behind tile i - 1's while it runs: what a warp issues between
        // the barrier and its wgmma leaves the tensor cores idle once tile i - 1's is done.
        const u32 da = dW + (i % WG_WS) * (S::WTILE * 2 / 16), dx = dX + (i % WG_XS) * (S::XTILE * 2 / 16);
        wg_fence();
        wg_hold(acc);
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++)  // half ks / 4 of the tile, 32 bytes a k16 step inside it
            wgmma_bt(acc, da + ((ks >> 2) * BO * 128 + (ks & 3) * 32) / 16, dx + ((ks >> 2) * BT * 128 + (ks & 3) * 32) / 16);
        wg_commit();
        if (i + 2 < n) load_x(kt0 + i + 2, (i + 2) % WG_XS);  // tile i - 2's stage: its wgmma waited for
        else cp_async_commit();                                // (an empty group keeps the count uniform)
        wg_wait<1>();  // tile i - 1's multiply is done: its W stage can be refilled
        wg_hold(acc);
        if (i >= 1 && i - 1 + WG_WS < n) bar_arrive(WG_EMPTY((i - 1) % WG_WS), WG_THREADS);
    }
    wg_wait<0>();
    wg_hold(acc);
    // The D fragment is mma.sync's C layout for one m16 tile a warp: gemm_epilogue with MI = 1.
    gemm_epilogue<1, BT / 8, BT, GLU>(*(const float(*)[1][BT / 8][4])acc, smem_raw, 64 * wgp + 16 * (warp & 3), 0,
                                      o0, t0, M, y, ldy, y_f16, ws, out, act);
}

#define GEMM_WG(BT)                                                                                   \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                       \
        wg_gemm_bt##BT(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, const __half* x,    \
                       int ldx, int M, void* y, int ldy, int y_f16, float* ws, int out) {             \
        const WDesc w{base, row_bytes, nblk, nb, cols};                                               \
        wg_body<BT, false>(w, w, x, ldx, M, y, ldy, y_f16, ws, out, 0);                               \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                       \
        wg_gate_up_bt##BT(const u8* gbase, const u8* ubase, i64 row_bytes, i64 nblk, int nb, int cols, \
                          const __half* x, int ldx, int M, __half* y, int ldy, int out, int act) {    \
        const WDesc wg{gbase, row_bytes, nblk, nb, cols}, wu{ubase, row_bytes, nblk, nb, cols};       \
        wg_body<BT, true>(wg, wu, x, ldx, M, y, ldy, 1, nullptr, out, act);                           \
    }
GEMM_WG(64) GEMM_WG(128)
#endif  // __CUDA_ARCH_FEAT_SM90_ALL


// y[t, o] = sum over z of ws[z][t, o] (z in order), as fp32 or f16: the split-K parts of gemm_bt*.
extern "C" __global__ void __launch_bounds__(256)
    splitk_sum(const float* __restrict__ ws, int S, int M, int out, void* y, int ldy, int y_f16) {
    const i64 n = (i64)M * out, plane = n;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float a = 0.0f;
        for (int z = 0; z < S; z++) a += ws[z * plane + i];
        const i64 t = i / out, o = i - t * out;
        if (y_f16) ((__half*)y)[t * ldy + o] = __float2half_rn(a);
        else ((float*)y)[t * ldy + o] = a;
    }
}

#if QTYPE == T_Q4_K || QTYPE == T_Q6_K
// ------------------------------------------------------------------------------------------
// mmv: Q4_K or Q6_K times 1..8 tokens on tensor cores, W decoded straight into mma.sync A
// fragments (kernels/matmul.py _mmv). Decode's M: the GEMV's fp32 FMAs grow with M, and the
// fused GEMM decodes 128 x 128 tiles into shared memory for 16-token tiles of which M use 1..8.
// The 8 tokens are the n = 8 of m16n8k16: lane (g, t) = (lane / 4, lane % 4) holds A's rows g and
// g + 8 of a 16-row group and token g's B fragments; its sums c0, c1 are row g, tokens 2t, 2t+1 and
// c2, c3 row g + 8. A k step need not be 16 consecutive values, only the same 16 in A and B.
// Block: 8 warps on the same 16 rows, warp w on super-blocks w, w + 8, ...; the next super-block's
// bytes are loaded before the current one is decoded (two register sets); the warps' sums meet in
// shared memory (mmv_store).
#define MMV_WARPS 8

// The warps' sums acc (c0..c3 of rows g, g + 8) added in shared memory in warp order, then y: rows
// o0 + r of 16 (GLU: rows r < 8 are gate rows o0 + r, rows 8 + r the same rows of up, y = act(gate) * up).
template <bool GLU>
__device__ __forceinline__ void mmv_store(const float (&acc)[4], int o0, int M, float* __restrict__ y, int ldy,
                                          int out, int act) {
    __shared__ float red[MMV_WARPS][16][8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    red[warp][g][2 * t] = acc[0];
    red[warp][g][2 * t + 1] = acc[1];
    red[warp][g + 8][2 * t] = acc[2];
    red[warp][g + 8][2 * t + 1] = acc[3];
    __syncthreads();
    const int tid = threadIdx.x;
    if (tid < (GLU ? 64 : 128)) {
        const int r = tid >> 3, n = tid & 7;
        float v = 0.0f, u = 0.0f;
#pragma unroll
        for (int q = 0; q < MMV_WARPS; q++) {
            v += red[q][r][n];
            if (GLU) u += red[q][r + 8][n];
        }
        const int o = o0 + r;
        if (n < M && o < out) y[(i64)n * ldy + o] = GLU ? glu_act(v, act) * u : v;
    }
}

#if QTYPE == T_Q4_K
// Q4_K: every k step lies inside one 32-value sub-block, so its scale is applied to the mma's fp32
// sums, once per sub-block and row, and W's quants enter the fragments unscaled: a nibble masked
// in place is the f16 whose bits are q (q * 2^-24, subnormal; a high nibble 16q * 2^-24), exact,
// and the tensor cores' products of it are exact (mma keeps f16 subnormals: the kernel tests against
// the oracle, run on sm_90, would fail by orders of magnitude if it flushed them; sm_80 and sm_121
// are compiled, not yet run). Two instructions make two values (PRMT for two
// bytes, one LOP3 a nibble plane), against 3.5 where each value is scaled and shifted in f16.
// Lane t takes bytes 8t..8t+7 of each 32-byte quant chunk c of rows g and g + 8: their low nibbles
// are values 8t..8t+7 of sub-block 2c, their high nibbles those of sub-block 2c+1. K step s of a
// sub-block: A slots 2t, 2t+1 = values 8t+4s, +1 (bytes 8t+4s, +1); slots 2t+8, 2t+9 = values
// 8t+4s+2, +3. Token g's B fragments of both steps are then x's values 8t..8t+7 of the sub-block in
// x's own order: one 16-byte load (x8 = x as f16, zeros past cols).
// The mins: y -= sum over sub-blocks j of dmin * m_j * X_j, X_j the sum of x8's values over j, as
// one more mma a super-block whose k slots 2j, 2j+1 hold f16(dmin * m_j) (rounded as the fused
// GEMM's f16 tiles round it) against X_j split in two f16s, hi + lo (xsub, mmv_x.cuh: in fragment
// order [nb][token 8][t 4][2] f16x2 = (hi, lo) of sub-blocks t and t + 4).
struct Mmv4Raw {  // rows g, g + 8 of one super-block: header (d, dmin, 12 scale bytes), 8 bytes a chunk
    uint4 hd[2];
    uint2 q[2][4];
    __device__ __forceinline__ void load(const u8* const (&rp)[2], i64 at, int t) {  // at: the super-block's byte offset
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const u8* p = rp[h] + at;
            hd[h] = __ldg((const uint4*)p);
            p += 16 + 8 * t;
#pragma unroll
            for (int c = 0; c < 4; c++) q[h][c] = __ldg((const uint2*)(p + 32 * c));
        }
    }
};

// Byte k of w as the float 2^23 + byte (the bits 0x4B0000bb), exact: fmaf(it, s, -2^23 * s) = byte * s.
__device__ __forceinline__ float byte_2p23(u32 w, int k) {
    return __int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u | k));
}

// acc: c0..c3 of the scaled sub-block sums; accm: of the mins' mma.
__device__ __forceinline__ void mmv4_step(const Mmv4Raw& R, const __half* __restrict__ xs, uint2 xm, int t,
                                          bool tok, float (&acc)[4], float (&accm)[4]) {
    u32 sc[2][2], am[4];  // sc: [row][sub-blocks 0-3 / 4-7] 6-bit scales a byte; am: the mins' A fragment
    float dl[2], ndl[2], dh[2], ndh[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const uint4 hd = R.hd[h];
        sc[h][0] = hd.y & 0x3F3F3F3Fu;
        sc[h][1] = (hd.w & 0x0F0F0F0Fu) | ((hd.y >> 2) & 0x30303030u);
        const u32 mn0 = hd.z & 0x3F3F3F3Fu, mn1 = ((hd.w >> 4) & 0x0F0F0F0Fu) | ((hd.z >> 2) & 0x30303030u);
        // -dmin * m of sub-blocks t and t + 4 (exact in fp32), rounded to f16 in both halves
        const float d = h2f((u16)(hd.x & 0xFFFF)), dmin = h2f((u16)(hd.x >> 16));
        am[h] = h2u(__float2half2_rn(fmaf(byte_2p23(mn0, t), -dmin, 8388608.0f * dmin)));
        am[2 + h] = h2u(__float2half2_rn(fmaf(byte_2p23(mn1, t), -dmin, 8388608.0f * dmin)));
        dl[h] = d * 16777216.0f;  // 2^24: low nibbles enter as q * 2^-24
        dh[h] = d * 1048576.0f;   // 2^20: high nibbles as 16 q * 2^-24
        ndl[h] = -8388608.0f * dl[h];
        ndh[h] = -8388608.0f * dh[h];
    }
    mma16816(accm, am, xm.x, xm.y);
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const uint4 xl = tok ? __ldg((const uint4*)(xs + 64 * c)) : make_uint4(0, 0, 0, 0);  // xs: + 8t
        const uint4 xh = tok ? __ldg((const uint4*)(xs + 64 * c + 32)) : make_uint4(0, 0, 0, 0);
        float sl[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sh[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int s = 0; s < 2; s++) {
            u32 al[4], ah[4];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const u32 w = s ? R.q[h][c].y : R.q[h][c].x;
                const u32 p01 = __byte_perm(w, 0u, 0x4140u), p23 = __byte_perm(w, 0u, 0x4342u);
                al[h] = p01 & 0x000F000Fu;
                al[2 + h] = p23 & 0x000F000Fu;
                ah[h] = p01 & 0x00F000F0u;
                ah[2 + h] = p23 & 0x00F000F0u;
            }
            mma16816(sl, al, s ? xl.z : xl.x, s ? xl.w : xl.y);
            mma16816(sh, ah, s ? xh.z : xh.x, s ? xh.w : xh.y);
        }
        const int jl = 2 * c, jh = 2 * c + 1;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float sl_ = fmaf(byte_2p23(sc[h][jl >> 2], jl & 3), dl[h], ndl[h]);  // d * sc_j * 2^24, exact
            const float sh_ = fmaf(byte_2p23(sc[h][jh >> 2], jh & 3), dh[h], ndh[h]);
#pragma unroll
            for (int e = 0; e < 2; e++) acc[2 * h + e] = fmaf(sh_, sh[2 * h + e], fmaf(sl_, sl[2 * h + e], acc[2 * h + e]));
        }
    }
}

// GLU: the 16 rows of the mma are 8 gate rows (g) and the same 8 rows of up (g + 8).
template <bool GLU>
__device__ __forceinline__ void mmv4_body(const WDesc& w, const u8* __restrict__ up, const __half* __restrict__ x8,
                                          const uint2* __restrict__ xsub, int M, float* __restrict__ y, int ldy,
                                          int out, int act) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int o0 = blockIdx.x * (GLU ? 8 : 16);
    const u8* rp[2];  // rows g, g + 8 (GLU: gate and up row g)
    if (GLU) {
        const i64 r = min(o0 + g, out - 1);  // rows past the end re-read the last row; never written
        rp[0] = w.base + r * w.row_bytes;
        rp[1] = up + r * w.row_bytes;
    } else {
        rp[0] = w.base + (i64)min(o0 + g, out - 1) * w.row_bytes;
        rp[1] = w.base + (i64)min(o0 + g + 8, out - 1) * w.row_bytes;
    }
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, accm[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const bool tok = g < M;
    const __half* xg = x8 + (i64)min(g, M - 1) * w.nb * 256 + 8 * t;
    const uint2* xmg = xsub + g * 4 + t;  // + sb * 32
    Mmv4Raw ra, rb;  // two register sets, alternating (no copies)
    int sb = warp;
    if (sb < w.nb) ra.load(rp, (i64)sb * 144, t);
    pdl_wait();  // x8 and xsub are the previous kernel's output: mmv_x's or x's producer's (kernels/build.py)
    while (sb < w.nb) {  // warp-uniform
        if (sb + MMV_WARPS < w.nb) rb.load(rp, (i64)(sb + MMV_WARPS) * 144, t);
        mmv4_step(ra, xg + (i64)sb * 256, __ldg(xmg + sb * 32), t, tok, acc, accm);
        sb += MMV_WARPS;
        if (sb >= w.nb) break;
        if (sb + MMV_WARPS < w.nb) ra.load(rp, (i64)(sb + MMV_WARPS) * 144, t);
        mmv4_step(rb, xg + (i64)sb * 256, __ldg(xmg + sb * 32), t, tok, acc, accm);
        sb += MMV_WARPS;
    }
    pdl_trigger();  // the next dependent (a product, or mmv_x of one) may be scheduled
    const float sum[4] = {acc[0] + accm[0], acc[1] + accm[1], acc[2] + accm[2], acc[3] + accm[3]};
    mmv_store<GLU>(sum, o0, M, y, ldy, out, act);
}

extern "C" __global__ void __launch_bounds__(MMV_WARPS * 32, 2)
    mmv_r1(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, const __half* x8, const uint2* xsub, int M,
           float* y, int ldy, int out) {
    mmv4_body<false>(WDesc{base, row_bytes, nblk, nb, cols}, nullptr, x8, xsub, M, y, ldy, out, 0);
}
extern "C" __global__ void __launch_bounds__(MMV_WARPS * 32, 2)
    mmv_glu(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, const u8* up, const __half* x8,
            const uint2* xsub, int M, float* y, int ldy, int out, int act) {
    mmv4_body<true>(WDesc{base, row_bytes, nblk, nb, cols}, up, x8, xsub, M, y, ldy, out, act);
}

// x (fp32 [M, ldx], or f16 when x_f16) -> x8 and xsub (mmv_x.cuh: the layout, zeros past cols and for
// tokens past M). Thread i takes value i % (nb * 256) of token i / (nb * 256), over all 8 tokens: a warp
// a sub-block. The producers of a small batch's rows write the same operand themselves (ops.cu).
extern "C" __global__ void __launch_bounds__(256)
    mmv_x(const void* __restrict__ x, int x_f16, int ldx, int M, int cols, int nb, __half* __restrict__ x8,
          u32* __restrict__ xsub) {
    pdl_trigger();  // the mmv after it may load its first weights while x8 is written
    pdl_wait();     // x is the previous kernel's output (launched as a dependent: kernels/build.py)
    const int i = blockIdx.x * 256 + threadIdx.x;  // grid: exactly 8 * nb * 256 threads
    const int per = nb * 256, m = i / per, k = i - m * per;
    const i64 at = (i64)m * ldx + k;
    const float v = m >= M || k >= cols ? 0.0f : x_f16 ? __half2float(((const __half*)x)[at]) : ((const float*)x)[at];
    mmv4_x_put(x8, xsub, nb, m, k, v, m < M);
}
#else
// Q6_K: x8's k steps run across the super-block, 4 consecutive values of a row a lane, each value
// scaled in f16 as store_unit does. Lane (g, t) decodes a quarter of each super-block of rows g and
// g + 8, 16 k steps of 4 values a row: of each, values j0, j1 are A's k slots 2t, 2t+1 and j2, j3
// slots 2t+8, 2t+9. mmv_x writes x in that order (mmv_kpos), so lane (g, t) reads token g's B
// fragments of 2 k steps with one 16-byte load. Lane t takes half h = t / 2 and l in [16(t&1), +16):
// ql[l], ql[l+32], qh[l]; step (wi, qq) = quarter qq (values 128h + 32qq + l, one int8 scale each),
// bytes l = 16(t&1) + 4wi + j. Decode in f16x2: two quant bytes spread to the 16-bit lanes (PRMT),
// the value OR 0x6400 (the f16 1024 + v), minus 1056 (1024 and the -32 offset) exactly, then one
// HMUL2 with the scale rounded to f16. Two sets of registers for two row groups would spill: one group a block.

// x8's groups of 4 values in a super-block, in the order lane t reads them: group ((wi * 4 + t) * 4 + qq);
// the first of its values.
__device__ __forceinline__ int mmv_kpos(int group) {
    const int qq = group & 3, t = (group >> 2) & 3, wi = group >> 4;
    return 128 * (t >> 1) + 32 * qq + 16 * (t & 1) + 4 * wi;
}

struct MmvRaw {  // one super-block of rows g, g + 8: lane t's quarter
    uint4 ql[2][2], qh[2];
    uint2 sc[2];
    u16 d[2];
    __device__ __forceinline__ void load(const WDesc& w, const int (&row)[2], int sb, int t) {
#pragma unroll
        for (int h = 0; h < 2; h++) {  // planes ql[nblk][128] | qh[nblk][64] | scales[nblk][16] | d[nblk]
            const i64 b = (i64)row[h] * w.nb + sb;
            const int half = t >> 1, l0 = 16 * (t & 1);
            const u8* p = w.base;
            ql[h][0] = __ldg((const uint4*)(p + b * 128 + 64 * half + l0));
            ql[h][1] = __ldg((const uint4*)(p + b * 128 + 64 * half + 32 + l0));
            qh[h] = __ldg((const uint4*)(p + w.nblk * 128 + b * 64 + 32 * half + l0));
            sc[h] = __ldg((const uint2*)(p + w.nblk * 192 + b * 16 + 8 * half));
            d[h] = __ldg((const u16*)(p + w.nblk * 208 + b * 2));
        }
    }
};

__device__ __forceinline__ void mmv_step(const MmvRaw& R, const __half* __restrict__ xs, int t, bool tok,
                                         float (&acc)[2][4]) {
    __half2 s[2][4];  // [row g / g+8][quarter]
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const float d = h2f(R.d[h]);
        const uint2 sc = R.sc[h];
#pragma unroll
        for (int qq = 0; qq < 4; qq++) {  // scale (t&1) + 2qq of the half: byte of sc.x (qq < 2) or sc.y
            const u32 word = qq < 2 ? sc.x : sc.y;
            const int shift = 8 * ((t & 1) + 2 * (qq & 1));
            s[h][qq] = __float2half2_rn(d * (float)(int)(signed char)(u8)(word >> shift));
        }
    }
    const __half2 k1056 = __float2half2_rn(1056.0f);
#pragma unroll
    for (int wi = 0; wi < 4; wi++) {
        uint4 xb[2];
#pragma unroll
        for (int i = 0; i < 2; i++)
            xb[i] = tok ? __ldg((const uint4*)(xs + (wi * 4 + t) * 16 + 8 * i)) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int qq = 0; qq < 4; qq++) {
            const uint4 x2 = xb[qq >> 1];
            const u32 b0 = qq & 1 ? x2.z : x2.x, b1 = qq & 1 ? x2.w : x2.y;
            u32 a[4];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const u32 wl = word4(R.ql[h][qq & 1], wi), wh = word4(R.qh[h], wi);
#pragma unroll
                for (int pr = 0; pr < 2; pr++) {
                    const u32 sel = pr ? 0x4342u : 0x4140u;
                    const u32 pl = __byte_perm(wl, 0u, sel), ph = __byte_perm(wh, 0u, sel);
                    const u32 lo = (qq < 2 ? pl : pl >> 4) & 0x000F000Fu;
                    const u32 hb = (qq == 0 ? ph << 4 : qq == 1 ? ph << 2 : qq == 2 ? ph : ph >> 2) & 0x00300030u;
                    const __half2 v = __hsub2(u2h(lo | hb | 0x64006400u), k1056);
                    a[2 * pr + h] = h2u(__hmul2(v, s[h][qq]));
                }
            }
            mma16816(acc[qq & 1], a, b0, b1);  // two independent mma chains
        }
    }
}

extern "C" __global__ void __launch_bounds__(MMV_WARPS * 32, 2)
    mmv_r1(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, const __half* x8, const uint2*, int M,
           float* y, int ldy, int out) {
    const WDesc w{base, row_bytes, nblk, nb, cols};
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int o0 = blockIdx.x * 16;
    const int row[2] = {min(o0 + g, out - 1), min(o0 + g + 8, out - 1)};  // past the end: re-read, never written
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    const bool tok = g < M;
    const __half* xg = x8 + (i64)min(g, M - 1) * w.nb * 256;
    MmvRaw cur, nxt;
    int sb = warp;
    if (sb < w.nb) cur.load(w, row, sb, t);
    pdl_wait();  // x8 is mmv_x's output (launched as a dependent: kernels/build.py)
    while (sb < w.nb) {  // warp-uniform
        const int nsb = sb + MMV_WARPS;
        if (nsb < w.nb) nxt.load(w, row, nsb, t);
        mmv_step(cur, xg + (i64)sb * 256, t, tok, acc);
        cur = nxt;
        sb = nsb;
    }
    pdl_trigger();  // the next dependent (a product, or mmv_x of one) may be scheduled
    const float sum[4] = {acc[0][0] + acc[1][0], acc[0][1] + acc[1][1], acc[0][2] + acc[1][2], acc[0][3] + acc[1][3]};
    mmv_store<false>(sum, o0, M, y, ldy, out, 0);
}

// x (fp32 [M, ldx], or f16 when x_f16) -> x8 (f16 [M][nb][64 groups][4], mmv's order: mmv_kpos;
// zeros past cols): thread i writes the 4 values of group i (of token, super-block, group). The
// xsub argument (Q4_K's) is not used.
extern "C" __global__ void __launch_bounds__(256)
    mmv_x(const void* __restrict__ x, int x_f16, int ldx, int M, int cols, int nb, __half* __restrict__ x8, u32*) {
    pdl_trigger();  // the mmv after it may load its first weights while x8 is written
    pdl_wait();     // x is the previous kernel's output (launched as a dependent: kernels/build.py)
    const int i = blockIdx.x * 256 + threadIdx.x;
    if (i >= M * nb * 64) return;
    const int sb = (i >> 6) % nb, m = (i >> 6) / nb;
    const int k = sb * 256 + mmv_kpos(i & 63);
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const i64 at = (i64)m * ldx + k + j;
        v[j] = k + j >= cols ? 0.0f : x_f16 ? __half2float(((const __half*)x)[at]) : ((const float*)x)[at];
    }
    const __half2 a = __floats2half2_rn(v[0], v[1]), b = __floats2half2_rn(v[2], v[3]);
    *(uint2*)(x8 + (i64)i * 4) = make_uint2(h2u(a), h2u(b));
}
#endif
#endif
