// Dequantization of GGML blocks in registers, one "unit" of 32 values at a time.
//
// Every supported type is cut into units of 32 values of one row, read as two runs of 16
// consecutive positions (run 0 at kpos(u, 0), run 1 at kpos(u, 1)). The runs follow the byte
// layout so that a unit is one aligned 16-byte load of quants where the format allows it
// (Q4_K: the low and high nibbles of 16 qs bytes are two runs 32 apart). Four consecutive units
// always cover one aligned 128-value slice of the row, which the GEMM tile relies on.
//
// A decoder is loaded with (weight, row, unit) and hands out values four at a time:
// get4(g), g = 0..7, returns run g/4, values 4*(g%4) .. +3, already scaled. Call get4 with
// compile-time g (unrolled loops): the raw words live in registers.
//
// Piece<T>::load8 decodes a quarter of a unit, 8 consecutive values (the dequantize kernels: one
// 16-byte f16 store per thread); Q4_K and Q6_K read only the 8 quant bytes the piece needs.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// GGML type codes (engine/dtypes.py).
#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 6
#define T_Q8_0 8
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14
#define T_BF16 30

// Where a weight tensor lives and how its rows are cut: passed to every kernel.
struct WDesc {
    const u8* base;
    i64 row_bytes;   // bytes of one stored row (whole blocks)
    i64 nblk;        // blocks in the whole tensor (Q6_K planes are laid out per tensor)
    int nb;          // blocks per row
    int cols;        // logical values per row (F types read nothing past it)
};

__device__ __forceinline__ float h2f(u16 h) { return __half2float(__ushort_as_half(h)); }

// float(b) for a byte b in 0..255 without the quarter-rate I2F: 2^23 + b has b as its mantissa.
__device__ __forceinline__ float byte_f(u32 w, int i) {
    return __int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u | (u32)i)) - 8388608.0f;
}

__device__ __forceinline__ u32 word4(const uint4& q, int i) {
    return i == 0 ? q.x : i == 1 ? q.y : i == 2 ? q.z : q.w;
}

// Four bytes of one word, each turned into d*b - m.
__device__ __forceinline__ float4 affine4(u32 w, float d, float m) {
    return make_float4(fmaf(d, byte_f(w, 0), -m), fmaf(d, byte_f(w, 1), -m),
                       fmaf(d, byte_f(w, 2), -m), fmaf(d, byte_f(w, 3), -m));
}

// 6-bit scale and min j of a Q4_K/Q5_K super-block; s0..s2 hold the 12 packed bytes.
__device__ __forceinline__ void scale_min_k4(int j, u32 s0, u32 s1, u32 s2, float& sc, float& mn) {
    auto byte = [&](int i) -> u32 {
        u32 w = i < 4 ? s0 : i < 8 ? s1 : s2;
        return (w >> (8 * (i & 3))) & 0xFFu;
    };
    if (j < 4) {
        sc = (float)(byte(j) & 63u);
        mn = (float)(byte(j + 4) & 63u);
    } else {
        sc = (float)((byte(j + 4) & 0xFu) | ((byte(j - 4) >> 6) << 4));
        mn = (float)((byte(j + 4) >> 4) | ((byte(j) >> 6) << 4));
    }
}

template <int T> struct Dec;

// ---- Q4_K: 144 B = d, dmin, scales[12], qs[128]; unit u: chunk c = u/2, half h = u%2 ----
template <> struct Dec<T_Q4_K> {
    static constexpr int QK = 256, UNITS = 8;
    uint4 q, hd;
    int c;
    float d0, m0, d1, m1;
    __device__ static int kpos(int u, int run) {
        int b = u >> 3, c = (u & 7) >> 1, h = u & 1;
        return b * 256 + 64 * c + 32 * run + 16 * h;
    }
    __device__ void load(const WDesc& w, i64 row, int u) {
        fetch(w, row, u);
        finish();
    }
    // fetch issues the loads only; finish (after them) derives the scales. The GEMM's tile loader
    // fetches a tile ahead and finishes when the bytes are needed.
    __device__ void fetch(const WDesc& w, i64 row, int u) {
        const u8* blk = w.base + row * w.row_bytes + (i64)(u >> 3) * 144;
        c = (u & 7) >> 1;
        hd = __ldg((const uint4*)blk);
        q = __ldg((const uint4*)(blk + 16 + 32 * c + 16 * (u & 1)));
    }
    // The scales and mins of sub-blocks 2c and 2c + 1 (scale_min_k4's bytes), both at once in the two
    // bytes of 16-bit words, without branches: bytes 2(c % 2), +1 of each 4-byte word of scales.
    __device__ void finish() {
        const float d = h2f((u16)(hd.x & 0xFFFF)), dmin = h2f((u16)(hd.x >> 16));
        const int sh = 16 * (c & 1);
        const u32 a = (hd.y >> sh) & 0xFFFFu, b = (hd.z >> sh) & 0xFFFFu, e = (hd.w >> sh) & 0xFFFFu;
        const u32 sc = c < 2 ? a & 0x3F3Fu : (e & 0x0F0Fu) | ((a >> 2) & 0x3030u);
        const u32 mn = c < 2 ? b & 0x3F3Fu : ((e >> 4) & 0x0F0Fu) | ((b >> 2) & 0x3030u);
        d0 = d * byte_f(sc, 0); m0 = dmin * byte_f(mn, 0);
        d1 = d * byte_f(sc, 1); m1 = dmin * byte_f(mn, 1);
    }
    __device__ float4 get4(int g) const {
        u32 w = word4(q, g & 3);
        return g < 4 ? affine4(w & 0x0F0F0F0Fu, d0, m0) : affine4((w >> 4) & 0x0F0F0F0Fu, d1, m1);
    }
};

// ---- Q5_K: 176 B = d, dmin, scales[12], qh[32], qs[128]; units as Q4_K, bit 2c(+1) of qh ----
template <> struct Dec<T_Q5_K> {
    static constexpr int QK = 256, UNITS = 8;
    uint4 q, qh;
    int c;
    float d0, m0, d1, m1;
    __device__ static int kpos(int u, int run) { return Dec<T_Q4_K>::kpos(u, run); }
    __device__ void load(const WDesc& w, i64 row, int u) {
        const u8* blk = w.base + row * w.row_bytes + (i64)(u >> 3) * 176;
        c = (u & 7) >> 1;
        int h = u & 1;
        uint4 hd = __ldg((const uint4*)blk);
        qh = __ldg((const uint4*)(blk + 16 + 16 * h));
        q = __ldg((const uint4*)(blk + 48 + 32 * c + 16 * h));
        float d = h2f((u16)(hd.x & 0xFFFF)), dmin = h2f((u16)(hd.x >> 16));
        float sc, mn;
        scale_min_k4(2 * c, hd.y, hd.z, hd.w, sc, mn);
        d0 = d * sc; m0 = dmin * mn;
        scale_min_k4(2 * c + 1, hd.y, hd.z, hd.w, sc, mn);
        d1 = d * sc; m1 = dmin * mn;
    }
    __device__ float4 get4(int g) const {
        u32 w = word4(q, g & 3), hb = word4(qh, g & 3);
        int run = g >> 2;
        u32 v = ((w >> (4 * run)) & 0x0F0F0F0Fu) | (((hb >> (2 * c + run)) & 0x01010101u) << 4);
        return run == 0 ? affine4(v, d0, m0) : affine4(v, d1, m1);
    }
};

// ---- Q6_K, repacked per tensor into planes (kernels/matmul.py prepare_weight):
// ql[nblk][128] | qh[nblk][64] | scales[nblk][16] | d[nblk] (f16): the same bytes, 16-B aligned.
// Value k of a block: half h = k/128, quarter q = (k%128)/32, l = k%32:
// ql byte 64h + 32(q&1) + l (nibble q>>1), qh byte 32h + l (bits 2q, 2q+1), scale k/16.
// Unit u: h = u/4, q0 = (u/2)%2, l0 = 16(u%2); run 0 is quarter q0, run 1 quarter q0+2.
template <> struct Dec<T_Q6_K> {
    static constexpr int QK = 256, UNITS = 8;
    uint4 q, qh;
    int q0;
    signed char s0, s1;
    u16 dh;
    float d0, d1;
    __device__ static int kpos(int u, int run) {
        int b = u >> 3, h = (u >> 2) & 1, qq = ((u >> 1) & 1) + 2 * run, l0 = 16 * (u & 1);
        return b * 256 + 128 * h + 32 * qq + l0;
    }
    __device__ void load(const WDesc& w, i64 row, int u) {
        fetch(w, row, u);
        finish();
    }
    __device__ void fetch(const WDesc& w, i64 row, int u) {  // loads only (see Dec<T_Q4_K>)
        i64 b = row * w.nb + (u >> 3);
        int h = (u >> 2) & 1, l0 = 16 * (u & 1);
        q0 = (u >> 1) & 1;
        q = __ldg((const uint4*)(w.base + b * 128 + 64 * h + 32 * q0 + l0));
        qh = __ldg((const uint4*)(w.base + w.nblk * 128 + b * 64 + 32 * h + l0));
        const signed char* sc = (const signed char*)(w.base + w.nblk * 192 + b * 16);
        dh = __ldg((const u16*)(w.base + w.nblk * 208 + b * 2));
        int s = 8 * h + 2 * q0 + (u & 1);
        s0 = __ldg(sc + s);
        s1 = __ldg(sc + s + 4);
    }
    __device__ void finish() {
        float d = h2f(dh);
        d0 = d * (float)s0;
        d1 = d * (float)s1;
    }
    __device__ float4 get4(int g) const {
        u32 w = word4(q, g & 3), hb = word4(qh, g & 3);
        int run = g >> 2, qq = q0 + 2 * run;
        u32 v = ((w >> (4 * run)) & 0x0F0F0F0Fu) | (((hb >> (2 * qq)) & 0x03030303u) << 4);
        float d = run == 0 ? d0 : d1;
        return affine4(v, d, 32.0f * d);
    }
};

// ---- 32-value blocks (Q4_0, Q4_1, Q5_0, Q8_0): a unit is one block; blocks are only 2- or
// 4-byte aligned, so they are read in 16-bit pieces (speed matters less for these types). ----
__device__ __forceinline__ u32 ld_u32_2(const u8* p) {  // 4 bytes at a 2-aligned address
    const u16* h = (const u16*)p;
    return (u32)__ldg(h) | ((u32)__ldg(h + 1) << 16);
}

template <int T> struct Block32 {
    static constexpr int QK = 32, UNITS = 1;
    __device__ static int kpos(int u, int run) { return u * 32 + 16 * run; }
};

template <> struct Dec<T_Q4_0> : Block32<T_Q4_0> {
    u32 q[4];
    float d;
    __device__ void load(const WDesc& w, i64 row, int u) {
        const u8* blk = w.base + row * w.row_bytes + (i64)u * 18;
        d = h2f(__ldg((const u16*)blk));
#pragma unroll
        for (int i = 0; i < 4; i++) q[i] = ld_u32_2(blk + 2 + 4 * i);
    }
    __device__ float4 get4(int g) const {
        return affine4((q[g & 3] >> (4 * (g >> 2))) & 0x0F0F0F0Fu, d, 8.0f * d);
    }
};

template <> struct Dec<T_Q4_1> : Block32<T_Q4_1> {
    u32 q[4];
    float d, m;
    __device__ void load(const WDesc& w, i64 row, int u) {
        const u8* blk = w.base + row * w.row_bytes + (i64)u * 20;
        u32 dm = __ldg((const u32*)blk);
        d = h2f((u16)(dm & 0xFFFF));
        m = -h2f((u16)(dm >> 16));  // value = d*q + m, affine4 computes d*q - m
#pragma unroll
        for (int i = 0; i < 4; i++) q[i] = __ldg((const u32*)(blk + 4 + 4 * i));
    }
    __device__ float4 get4(int g) const {
        return affine4((q[g & 3] >> (4 * (g >> 2))) & 0x0F0F0F0Fu, d, m);
    }
};

// Q5_0: 22 B = d, qh (u32), qs[16]; value j: low nibble j | bit j of qh; value 16+j: high | bit 16+j.
template <> struct Dec<T_Q5_0> : Block32<T_Q5_0> {
    u32 q[4], qh;
    float d;
    __device__ void load(const WDesc& w, i64 row, int u) {
        const u8* blk = w.base + row * w.row_bytes + (i64)u * 22;
        d = h2f(__ldg((const u16*)blk));
        qh = ld_u32_2(blk + 2);
#pragma unroll
        for (int i = 0; i < 4; i++) q[i] = ld_u32_2(blk + 6 + 4 * i);
    }
    __device__ float4 get4(int g) const {
        int run = g >> 2, j = 4 * (g & 3);
        u32 bits = qh >> (16 * run + j);
        u32 hb = (bits & 1u) | ((bits & 2u) << 7) | ((bits & 4u) << 14) | ((bits & 8u) << 21);
        u32 v = ((q[g & 3] >> (4 * run)) & 0x0F0F0F0Fu) | (hb << 4);
        return affine4(v, d, 16.0f * d);
    }
};

template <> struct Dec<T_Q8_0> : Block32<T_Q8_0> {
    u32 q[8];
    float d;
    __device__ void load(const WDesc& w, i64 row, int u) {
        const u8* blk = w.base + row * w.row_bytes + (i64)u * 34;
        d = h2f(__ldg((const u16*)blk));
#pragma unroll
        for (int i = 0; i < 8; i++) q[i] = ld_u32_2(blk + 2 + 4 * i);
    }
    __device__ float4 get4(int g) const {
        // int8 -> offset to 0..255 by flipping the sign bit, then subtract 128 via the min term
        u32 v = q[g] ^ 0x80808080u;
        return affine4(v, d, 128.0f * d);
    }
};

// ---- plain floats: a unit is 32 consecutive values; values at or past `cols` read as 0 ----
template <int T> struct DecFloat {
    static constexpr int QK = 32, UNITS = 1;
    const u8* row_ptr;
    int k0, cols;
    __device__ static int kpos(int u, int run) { return u * 32 + 16 * run; }
    __device__ void load(const WDesc& w, i64 row, int u) {
        row_ptr = w.base + row * w.row_bytes;
        k0 = u * 32;
        cols = w.cols;
    }
    __device__ float at(int k) const {
        if (k >= cols) return 0.0f;
        if (T == T_F32) return __ldg((const float*)row_ptr + k);
        u16 h = __ldg((const u16*)row_ptr + k);
        if (T == T_F16) return h2f(h);
        return __uint_as_float((u32)h << 16);  // bf16
    }
    __device__ float4 get4(int g) const {
        int k = k0 + 4 * g;
        return make_float4(at(k), at(k + 1), at(k + 2), at(k + 3));
    }
};
template <> struct Dec<T_F32> : DecFloat<T_F32> {};
template <> struct Dec<T_F16> : DecFloat<T_F16> {};
template <> struct Dec<T_BF16> : DecFloat<T_BF16> {};


// ---- Pieces: piece pc (0..3) of unit u = run pc/2, values 8*(pc%2) .. +7 of that run ----
__device__ __forceinline__ void put8(float (&v)[8], float4 a, float4 b) {
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// Any type: decode the whole unit, keep the piece (get4 needs compile-time g, hence the loop).
template <int T> struct Piece {
    // Returns the row position of v[0].
    __device__ static int load8(const WDesc& w, i64 row, int u, int pc, float (&v)[8]) {
        Dec<T> dec;
        dec.load(w, row, u);
#pragma unroll
        for (int p = 0; p < 4; p++)
            if (p == pc) put8(v, dec.get4(2 * p), dec.get4(2 * p + 1));
        return Dec<T>::kpos(u, pc >> 1) + 8 * (pc & 1);
    }
};

// Q4_K: the piece is 8 bytes of qs (low nibbles for run 0, high for run 1) and one scale/min pair.
template <> struct Piece<T_Q4_K> {
    __device__ static int load8(const WDesc& w, i64 row, int u, int pc, float (&v)[8]) {
        const u8* blk = w.base + row * w.row_bytes + (i64)(u >> 3) * 144;
        const int c = (u & 7) >> 1, h = u & 1, run = pc >> 1, half = pc & 1;
        const uint4 hd = __ldg((const uint4*)blk);
        const uint2 q = __ldg((const uint2*)(blk + 16 + 32 * c + 16 * h + 8 * half));
        float sc, mn;
        scale_min_k4(2 * c + run, hd.y, hd.z, hd.w, sc, mn);
        const float d = h2f((u16)(hd.x & 0xFFFF)) * sc, m = h2f((u16)(hd.x >> 16)) * mn;
        put8(v, affine4((q.x >> (4 * run)) & 0x0F0F0F0Fu, d, m),
             affine4((q.y >> (4 * run)) & 0x0F0F0F0Fu, d, m));
        return Dec<T_Q4_K>::kpos(u, run) + 8 * half;
    }
};

// Q6_K planes: 8 bytes of ql, 8 of qh, one scale; value d*sc*(q - 32).
template <> struct Piece<T_Q6_K> {
    __device__ static int load8(const WDesc& w, i64 row, int u, int pc, float (&v)[8]) {
        const i64 b = row * w.nb + (u >> 3);
        const int h = (u >> 2) & 1, q0 = (u >> 1) & 1, run = pc >> 1, qq = q0 + 2 * run;
        const int l = 16 * (u & 1) + 8 * (pc & 1);
        const uint2 ql = __ldg((const uint2*)(w.base + b * 128 + 64 * h + 32 * q0 + l));
        const uint2 qh = __ldg((const uint2*)(w.base + w.nblk * 128 + b * 64 + 32 * h + l));
        const signed char sc = (signed char)__ldg(w.base + w.nblk * 192 + b * 16 + 8 * h + 2 * qq + (u & 1));
        const float d = h2f(__ldg((const u16*)(w.base + w.nblk * 208 + b * 2))) * (float)sc;
        auto six = [&](u32 lo, u32 hi) {
            return ((lo >> (4 * run)) & 0x0F0F0F0Fu) | (((hi >> (2 * qq)) & 0x03030303u) << 4);
        };
        put8(v, affine4(six(ql.x, qh.x), d, 32.0f * d), affine4(six(ql.y, qh.y), d, 32.0f * d));
        return Dec<T_Q6_K>::kpos(u, run) + 8 * (pc & 1);
    }
};
