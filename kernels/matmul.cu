// Quantized matmul y[M, out] = x[M, in] . W^T for one GGML type (compile with -DQTYPE=<code>).
//
// - gemv_m<M> (M = 1..8): memory-bound; a block owns 4 * R rows of W (R = gemv_rows<M>), 8 lanes
//   per row walk it in units of 32 values (one 16-byte quant load), dequantize in registers and
//   accumulate in fp32 for all M tokens at once, so W is read once per call. x is fp32, read
//   through L1; each loaded x value serves R rows from registers and 4 lanes by broadcast.
// - gemm_mma: compute-bound; a 128 (out) x 128 (tokens) tile per block, W's 128 x 128 slice is
//   dequantized into shared memory as f16, x converted to f16, and multiplied with
//   mma.sync m16n8k16 (fp32 accumulation).
// - prep_f16: rows [r0, r0+n) of W as f16 into a scratch and x as f16, in one launch (the
//   dequantize + cuBLAS peer path); bandwidth-bound, one 16-byte store per thread.
// - gather_f32: rows ids[i] of W as fp32 (embedding lookup straight from quantized rows).
// gemv/gemm_mma read x as [M, kpad], kpad = blocks per row * block values (zero-padded by the
// caller); prep_f16 reads the unpadded [M, cols] and writes the padded f16 copy itself.
#include "quant_decode.cuh"

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
// Tensor-core GEMM. Block: 256 threads = 8 warps as 2 (out) x 4 (tokens), warp tile 64 x 32.
// A = W tile (out x k, row-major in smem), B = x tile (tokens x k: the "col" operand), D = out x tokens.
#define BO 128
#define BT 128
#define BK 128
#define LDS (BK + 8)  // f16 per smem row; the 16-byte pad makes ldmatrix rows hit distinct banks
#define GEMM_SMEM ((BO + BT) * LDS * 2)

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

extern "C" __global__ void __launch_bounds__(256)
    gemm_mma(const u8* base, i64 row_bytes, i64 nblk, int nb, int cols, const float* x, int ldx,
             int M, float* y, int ldy, int out) {
    extern __shared__ uint4 smem_raw[];
    __half* sW = (__half*)smem_raw;
    __half* sX = sW + BO * LDS;
    const WDesc w{base, row_bytes, nblk, nb, cols};
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int o0 = blockIdx.x * BO, t0 = blockIdx.y * BT;
    const int wo = (warp & 1) * 64, wt = (warp >> 1) * 32;
    const int kpad = nb * D::QK, units = nb * D::UNITS;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int v = 0; v < 4; v++) acc[i][j][v] = 0.0f;

    for (int k0 = 0; k0 < kpad; k0 += BK) {
        // W slice: 128 rows x 4 units; units past the row's end (32-value types) become zeros.
#pragma unroll
        for (int it = 0; it < 2; it++) {
            const int task = tid + 256 * it, r = task >> 2, j = task & 3;
            const int u = k0 / 32 + j;
            __half* dst = sW + r * LDS;
            if (u < units) {
                D dec;
                dec.load(w, min(o0 + r, out - 1), u);
                const int ka = D::kpos(u, 0) - k0, kb = D::kpos(u, 1) - k0;
#pragma unroll
                for (int g = 0; g < 8; g++)
                    store4_f16(dst + (g < 4 ? ka : kb) + 4 * (g & 3), dec.get4(g));
            } else {
#pragma unroll
                for (int g = 0; g < 8; g++)
                    *(uint2*)(dst + 32 * j + 4 * g) = make_uint2(0u, 0u);
            }
        }
        // x slice: 128 tokens x 128 values, fp32 -> f16; missing tokens/values are zeros.
#pragma unroll 4
        for (int it = 0; it < 16; it++) {
            const int task = tid + 256 * it, t = task >> 5, kq = (task & 31) * 4;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (t0 + t < M && k0 + kq < kpad) v = __ldg((const float4*)(x + (i64)(t0 + t) * ldx + k0 + kq));
            store4_f16(sX + t * LDS + kq, v);
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            u32 a[4][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 4; i++)
                ldsm_x4(smem_u32(sW + (wo + 16 * i + (lane & 15)) * LDS + ks + (lane >> 4) * 8),
                        a[i][0], a[i][1], a[i][2], a[i][3]);
#pragma unroll
            for (int j = 0; j < 2; j++)
                ldsm_x4(smem_u32(sX + (wt + 16 * j + (lane & 7) + (lane >> 4) * 8) * LDS + ks +
                                 ((lane >> 3) & 1) * 8),
                        b[2 * j][0], b[2 * j][1], b[2 * j + 1][0], b[2 * j + 1][1]);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) mma16816(acc[i][j], a[i], b[j][0], b[j][1]);
        }
        __syncthreads();
    }
    // D fragment: c0,c1 at (out g, tokens 2t, 2t+1); c2,c3 at out g+8.
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int v = 0; v < 4; v++) {
                const int o = o0 + wo + 16 * i + g + 8 * (v >> 1);
                const int t = t0 + wt + 8 * j + 2 * tq + (v & 1);
                if (o < out && t < M) y[(i64)t * ldy + o] = acc[i][j][v];
            }
}
