// Small fused kernels of the forward (everything except the quantized matmuls), fp32 throughout.
//
// Compiled by kernels/build.py (NVRTC). The attention kernels are specialised on HEAD_DIM (a -D
// define) so that per-thread accumulators live in registers; everything else ignores it.
// Each kernel has a NumPy twin in engine/backend_cpu.py (the oracle of tests/test_ops_gpu.py).

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

extern "C" {

// ---------------------------------------------------------------------------------------------
// RMSNorm over the last dim: one block per row. With `res` non-null this is the fused
// residual step: h_out = x + res is written, then y = rmsnorm(h_out) * w.
__global__ void rmsnorm_rows(const float* __restrict__ x, const float* __restrict__ res,
                             const float* __restrict__ w, float* __restrict__ h_out,
                             float* __restrict__ y, int dim, float eps) {
    __shared__ float red[32];
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
    for (int i = threadIdx.x; i < dim; i += blockDim.x) y[base + i] = src[base + i] * inv * w[i];
}

// ---------------------------------------------------------------------------------------------
// RoPE on x [N, H, D]: one block per token, threads over (head, pair). The angle is computed in
// double: positions up to ~1e5 times frequencies near 1 need more than fp32's 24 bits.
// neox: pairs (i, i + D/2); else pairs (2i, 2i+1). freq_i = theta^(-2i/D) / factors[i].
__global__ void rope(const float* __restrict__ x, float* __restrict__ y, const int* __restrict__ pos,
                     const float* __restrict__ factors, int n_heads, int dim, double theta,
                     double pos_scale, int neox) {
    const int tok = blockIdx.x;
    const int half = dim / 2;
    const double p = (double)pos[tok] * pos_scale;
    const size_t base = (size_t)tok * n_heads * dim;
    for (int e = threadIdx.x; e < n_heads * half; e += blockDim.x) {
        const int h = e / half, i = e % half;
        double inv_freq = pow(theta, -2.0 * i / dim);
        if (factors) inv_freq /= (double)factors[i];
        double s, c;
        sincos(p * inv_freq, &s, &c);
        const int i0 = neox ? i : 2 * i;
        const int i1 = neox ? i + half : 2 * i + 1;
        const size_t o = base + (size_t)h * dim;
        const float x0 = x[o + i0], x1 = x[o + i1];
        y[o + i0] = (float)(x0 * c - x1 * s);
        y[o + i1] = (float)(x0 * s + x1 * c);
    }
}

// ---------------------------------------------------------------------------------------------
// act(gate) * up, act 0 = silu, 1 = gelu (tanh approximation).
__global__ void glu(const float* __restrict__ gate, const float* __restrict__ up,
                    float* __restrict__ out, long long n, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        float a;
        if (act == 0) {
            a = g / (1.f + expf(-g));
        } else {
            const float u = 0.7978845608028654f * (g + 0.044715f * g * g * g);
            a = 0.5f * g * (1.f + tanhf(u));
        }
        out[i] = a * up[i];
    }
}

// ---------------------------------------------------------------------------------------------
// Attention. Sequences are described per sequence b:
//   q rows q_start[b] .. q_start[b] + q_len[b] of q [N, Hq, D];
//   keys/values: rows kv_off[b] .. kv_off[b] + kv_len[b] of k/v (row stride Hkv*D), i.e. the packed
//   new-token k/v for a plain prefill, or the KV cache slot of the sequence;
//   query t of the sequence sits at key index q_pos0[b] + t (0 for a prefill, past_len with a cache).
// Key j is visible to query at index p iff j <= p and (window <= 0 or p - j < window).
// GQA: query head h reads kv head h / (Hq/Hkv).

#define DP ((HEAD_DIM + 3) / 4 * 4)  // head dim padded to whole float4s (pad lanes hold zeros)
#define LDS (DP + 4)                 // shared row stride: float4-aligned, rows shift by 4 banks
#define BQ 32                         // query rows per tile (a row = one (token, head of the group))
#define BK 32                         // keys per tile
#define ATT_THREADS 128               // 4 threads per query row
#define NCOL4 ((DP / 4 + 3) / 4)      // float4 output columns per thread

__device__ __forceinline__ void load_tile(float* dst, const float* __restrict__ src, int first,
                                          int n_valid, size_t row_stride, int col0) {
    for (int e = threadIdx.x; e < BK * DP; e += ATT_THREADS) {
        const int r = e / DP, d = e % DP;
        float v = 0.f;
        if (r < n_valid && d < HEAD_DIM) v = src[(size_t)(first + r) * row_stride + col0 + d];
        dst[r * LDS + d] = v;
    }
}

// Tiled (flash-style) attention: one block per (tile of BQ query rows, kv head, sequence). The
// query rows of a tile are the (token, group head) pairs sharing one kv head, so every K/V tile
// loaded into shared memory serves all heads of the GQA group. Scores live only in registers and
// a BQ x BK shared tile; softmax is online (running max m and sum l per row), in base 2.
__global__ void __launch_bounds__(ATT_THREADS)
attn_tiled(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
           float* __restrict__ out, const int* __restrict__ q_start, const int* __restrict__ q_len,
           const int* __restrict__ q_pos0, const int* __restrict__ kv_off,
           const int* __restrict__ kv_len, int n_heads, int n_kv_heads, int window,
           float scale_log2) {
    extern __shared__ float4 smem4[];
    float* Qs = reinterpret_cast<float*>(smem4);  // BQ x LDS
    float* KVs = Qs + BQ * LDS;                     // BK x LDS, holds K then V of a tile
    float* Ps = KVs + BK * LDS;                     // BQ x (BK + 1) probabilities

    const int b = blockIdx.z, kvh = blockIdx.y;
    const int G = n_heads / n_kv_heads;
    const int n_rows = q_len[b] * G;
    const int row0 = blockIdx.x * BQ;
    if (row0 >= n_rows) return;
    const int qs0 = q_start[b], pos0 = q_pos0[b], koff = kv_off[b], klen = kv_len[b];
    const size_t q_stride = (size_t)n_heads * HEAD_DIM, kv_stride = (size_t)n_kv_heads * HEAD_DIM;
    const int tid = threadIdx.x;

    for (int e = tid; e < BQ * DP; e += ATT_THREADS) {
        const int r = e / DP, d = e % DP, gr = row0 + r;
        float val = 0.f;
        if (gr < n_rows && d < HEAD_DIM)
            val = q[(size_t)(qs0 + gr / G) * q_stride + (size_t)(kvh * G + gr % G) * HEAD_DIM + d];
        Qs[r * LDS + d] = val;
    }

    const int last_row = min(row0 + BQ, n_rows) - 1;
    const int p_min = pos0 + row0 / G, p_max = pos0 + last_row / G;
    const int k_begin = window > 0 ? max(0, p_min - window + 1) : 0;
    const int k_end = min(klen, p_max + 1);

    const int r = tid >> 2, c = tid & 3;  // this thread's query row and column lane
    const int my_row = row0 + r;
    const bool row_valid = my_row < n_rows;
    const int my_pos = pos0 + my_row / G;

    float m = NEG_INF, l = 0.f;
    float4 acc[NCOL4];
#pragma unroll
    for (int j = 0; j < NCOL4; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);

    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        const int n_keys = min(BK, k_end - k0);
        __syncthreads();  // Q written / previous tile's V no longer read
        load_tile(KVs, k, koff + k0, n_keys, kv_stride, kvh * HEAD_DIM);
        __syncthreads();

        float s[BK / 4];
#pragma unroll
        for (int i = 0; i < BK / 4; ++i) s[i] = 0.f;
        for (int d4 = 0; d4 < DP / 4; ++d4) {
            const float4 qv = *reinterpret_cast<const float4*>(&Qs[r * LDS + 4 * d4]);
#pragma unroll
            for (int i = 0; i < BK / 4; ++i) {
                const float4 kv = *reinterpret_cast<const float4*>(&KVs[(c + 4 * i) * LDS + 4 * d4]);
                s[i] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
            }
        }
        float t_max = NEG_INF;
#pragma unroll
        for (int i = 0; i < BK / 4; ++i) {
            const int kp = k0 + c + 4 * i;
            const bool ok = row_valid && kp < k_end && kp <= my_pos && (window <= 0 || my_pos - kp < window);
            s[i] = ok ? s[i] * scale_log2 : NEG_INF;
            t_max = fmaxf(t_max, s[i]);
        }
        t_max = fmaxf(t_max, __shfl_xor_sync(0xffffffffu, t_max, 1));
        t_max = fmaxf(t_max, __shfl_xor_sync(0xffffffffu, t_max, 2));
        const float m_new = fmaxf(m, t_max);
        // A row with no visible key yet keeps m = -inf; guard so that exp2(-inf - -inf) never runs.
        const bool any = m_new != NEG_INF;
        const float alpha = any ? exp2f(m - m_new) : 1.f;
        float p_sum = 0.f;
#pragma unroll
        for (int i = 0; i < BK / 4; ++i) {
            const float p = any ? exp2f(s[i] - m_new) : 0.f;
            Ps[r * (BK + 1) + c + 4 * i] = p;
            p_sum += p;
        }
        p_sum += __shfl_xor_sync(0xffffffffu, p_sum, 1);
        p_sum += __shfl_xor_sync(0xffffffffu, p_sum, 2);
        l = l * alpha + p_sum;
        m = m_new;

        __syncthreads();  // K no longer read; P complete
        load_tile(KVs, v, koff + k0, n_keys, kv_stride, kvh * HEAD_DIM);
        __syncthreads();

#pragma unroll
        for (int j = 0; j < NCOL4; ++j) {
            acc[j].x *= alpha; acc[j].y *= alpha; acc[j].z *= alpha; acc[j].w *= alpha;
        }
        for (int kk = 0; kk < n_keys; ++kk) {
            const float p = Ps[r * (BK + 1) + kk];
#pragma unroll
            for (int j = 0; j < NCOL4; ++j) {
                const int col4 = c + 4 * j;
                if (col4 < DP / 4) {
                    const float4 vv = *reinterpret_cast<const float4*>(&KVs[kk * LDS + 4 * col4]);
                    acc[j].x += p * vv.x; acc[j].y += p * vv.y; acc[j].z += p * vv.z; acc[j].w += p * vv.w;
                }
            }
        }
    }

    if (!row_valid) return;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* o = out + (size_t)(qs0 + my_row / G) * q_stride + (size_t)(kvh * G + my_row % G) * HEAD_DIM;
#pragma unroll
    for (int j = 0; j < NCOL4; ++j) {
        const int d = 4 * (c + 4 * j);
        const float vals[4] = {acc[j].x, acc[j].y, acc[j].z, acc[j].w};
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (d + u < HEAD_DIM) o[d + u] = vals[u] * inv;
    }
}

// Attention for few queries per sequence (decode): one block per (query token, query head).
// Keys are processed in chunks of DEC_THREADS: a thread per key computes the whole dot product
// (independent 16-byte loads, no per-key reduction), the block does an online softmax over the
// chunk, then threads split (value column, key subset) for P.V.
#define DEC_THREADS 256

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

// ---------------------------------------------------------------------------------------------
// Top-k per row of x [rows, n]: k passes of a block-wide argmax, each pass taking the best element
// strictly after the previous pick in the order (value descending, index ascending). Ties resolve
// to the lower index, NaNs are never picked. k is small (<= a few hundred); each pass re-reads the
// row from L2/HBM, cheaper than sorting all of it.
__global__ void topk_rows(const float* __restrict__ x, float* __restrict__ vals, int* __restrict__ idx,
                          int n, int k) {
    __shared__ float rv[32];
    __shared__ int ri[32];
    const float* row = x + (size_t)blockIdx.x * n;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int nw = (blockDim.x + 31) >> 5;
    float prev_v = __int_as_float(0x7f800000);
    int prev_i = -1;
    for (int j = 0; j < k; ++j) {
        float bv = NEG_INF;
        int bi = -1;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float xv = row[i];
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
            vals[(size_t)blockIdx.x * k + j] = prev_i >= 0 ? prev_v : NEG_INF;
            idx[(size_t)blockIdx.x * k + j] = prev_i;
        }
        if (prev_i < 0) prev_v = NEG_INF;  // row exhausted (k > n or all NaN): nothing is "after"
    }
}

}  // extern "C"
