/* The static decoding step's kernels for CPU float32: single-token attention over a pre-allocated
 * cache (decode_attention) and the step's few-row matrix products (decode_linear, at the end).
 *
 * One query per head reads every cached key once: the step is bound by reading the cache, and
 * PyTorch's fused CPU kernel reads it at half the speed or less for one query (it runs small
 * matrix products per block and splits the work by heads only: MQA's one KV head on one
 * thread). Here the keys of each (sequence, KV head) are cut into blocks that fit L1 (at most
 * BLOCK keys); OpenMP threads (PyTorch's own runtime, whose thread count torch.set_num_threads
 * sets) take the blocks; each block gives every query head of its KV head a maximum, a sum of
 * exponentials and an unnormalised output, and the blocks are merged by their maxima (the
 * log-sum-exp rule of split-K "flash decoding").
 *
 * Layouts: q (B, H_kv * G, D), k (B, H_kv, S, D) and out (B, H_kv * G, Dv) contiguous; v (B, H_kv, S, Dv)
 * with its rows v_row >= Dv floats apart (MLA's values: the first Dv channels of its key rows, read
 * in place); query head h reads KV head h / G. Slots 0..min(*position, S - 1) are
 * attended to: the written prefix of a buffer, or every slot of a rolling buffer once it wrapped.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define BLOCK 128                  /* keys per block at most */
#define BLOCK_BYTES (16 * 1024)    /* one block's keys, and its values: both stay in L1 */
#define MAX_GROUP 16
#define MAX_VALUE_DIM 256

static inline v8 load8(const float *p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float *p, v8 x) { memcpy(p, &x, sizeof x); }
static inline v8 splat8(float x) { return (v8){x, x, x, x, x, x, x, x}; }
static inline v8 select8(v8i mask, v8 a, v8 b) { return (v8)(((v8i)a & mask) | ((v8i)b & ~mask)); }

/* Lane u of the result: the sum of t[u]'s eight lanes (an 8 x 8 transpose folded into adds). */
static inline v8 row_sums8(const v8 t[8]) {
    v8 pairs[4], quads[2];
    for (int i = 0; i < 4; i++)
        pairs[i] = __builtin_shufflevector(t[2 * i], t[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14)
                 + __builtin_shufflevector(t[2 * i], t[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; i++)
        quads[i] = __builtin_shufflevector(pairs[2 * i], pairs[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13)
                 + __builtin_shufflevector(pairs[2 * i], pairs[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(quads[0], quads[1], 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(quads[0], quads[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* exp(x) lane-wise for x <= 0 (scores minus their maximum): 2^n exp(r), |r| <= ln2/2, exp(r) by
 * its degree-6 Taylor polynomial (relative error below 3e-7). Below -64 it returns 0: exp(-64) is
 * 1.6e-28 of the maximum's weight, and keeping such weights would only feed the value sums
 * products in float32's subnormal range, where arithmetic is about 100x slower. */
static inline v8 exp8_nonpositive(v8 x) {
    const v8i negligible = x < splat8(-64.0f);
    x = select8(negligible, splat8(0.0f), x);
    const v8i n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8i); /* round, x <= 0 */
    const v8 nf = __builtin_convertvector(n, v8);
    const v8 r = x - nf * 0.693145751953125f - nf * 1.428606765330187e-06f; /* ln 2, in two parts */
    v8 p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return select8(negligible, splat8(0.0f), p * (v8)((n + 127) << 23));
}

static inline float exp_nonpositive(float x) { return exp8_nonpositive(splat8(x))[0]; }

/* The scores s[g][j] = scale * q_g . k_j of n <= BLOCK keys for `heads` (1 or 2) query heads:
 * eight keys at a time, lane-wise products into eight independent sums per head (one running sum
 * would wait on its own additions), then one transposed sum; two heads share each key load. */
static inline __attribute__((always_inline)) void block_scores(
        const float *restrict qh, const float *restrict kb, i64 n, int heads, const i64 D, float scale,
        float s[][BLOCK]) {
    i64 j = 0;
    if (D % 8 == 0)
        for (; j + 8 <= n; j += 8) {
            const float *kj = kb + j * D;
            v8 t[2][8];
            for (int u = 0; u < 8; u++)
                for (int h = 0; h < heads; h++) t[h][u] = load8(qh + h * D) * load8(kj + u * D);
            for (i64 c = 8; c < D; c += 8)
                for (int u = 0; u < 8; u++) {
                    const v8 kc = load8(kj + u * D + c);
                    for (int h = 0; h < heads; h++) t[h][u] += load8(qh + h * D + c) * kc;
                }
            for (int h = 0; h < heads; h++) store8(s[h] + j, row_sums8(t[h]) * scale);
        }
    for (; j < n; j++)
        for (int h = 0; h < heads; h++) {
            float dot = 0.0f;
            for (i64 d = 0; d < D; d++) dot += qh[h * D + d] * kb[j * D + d];
            s[h][j] = dot * scale;
        }
}

/* Scores to weights exp(s - max), in place: returns the maximum, *sum gets the weights' sum. */
static inline float block_softmax(float *s, i64 n, float *sum) {
    v8 max8 = splat8(-INFINITY), sum8 = splat8(0.0f);
    i64 j;
    for (j = 0; j + 8 <= n; j += 8) max8 = select8(load8(s + j) > max8, load8(s + j), max8);
    float m = -INFINITY, l = 0.0f;
    for (int u = 0; u < 8; u++) m = max8[u] > m ? max8[u] : m;
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    for (j = 0; j + 8 <= n; j += 8) {
        const v8 e = exp8_nonpositive(load8(s + j) - m);
        store8(s + j, e);
        sum8 += e;
    }
    for (int u = 0; u < 8; u++) l += sum8[u];
    for (; j < n; j++) l += (s[j] = exp_nonpositive(s[j] - m));
    *sum = l;
    return m;
}

/* acc (Dv) = sum_j w[j] v_j for one head: successive keys into `sums` separate sums, about 128
 * floats in all (16 vector registers), so that the additions do not wait on each other. */
static inline __attribute__((always_inline)) void block_values_one_head(
        const float *restrict w, const float *restrict vb, i64 n, const i64 Dv, i64 v_row, float *restrict acc_out) {
    const int sums = Dv <= 32 ? 4 : Dv <= 64 ? 2 : 1;
    float acc[4][MAX_VALUE_DIM];
    for (int u = 0; u < sums; u++)
        for (i64 d = 0; d < Dv; d++) acc[u][d] = 0.0f;
    i64 j;
    for (j = 0; j + sums <= n; j += sums)
        for (int u = 0; u < sums; u++) {
            const float p = w[j + u], *restrict vj = vb + (j + u) * v_row;
            for (i64 d = 0; d < Dv; d++) acc[u][d] += p * vj[d];
        }
    for (; j < n; j++)
        for (i64 d = 0; d < Dv; d++) acc[0][d] += w[j] * vb[j * v_row + d];
    for (i64 d = 0; d < Dv; d++) {
        float total = acc[0][d];
        for (int u = 1; u < sums; u++) total += acc[u][d];
        acc_out[d] = total;
    }
}

/* The same for four heads at once, 16 value channels at a time: each value load feeds four
 * heads, and the eight running sums are independent. */
static inline __attribute__((always_inline)) void block_values_four_heads(
        float w[][BLOCK], const float *restrict vb, i64 n, const i64 Dv, i64 v_row, float *restrict acc_out) {
    i64 d0 = 0;
    for (; d0 + 16 <= Dv; d0 += 16) {
        v8 acc[4][2];
        for (int h = 0; h < 4; h++) acc[h][0] = acc[h][1] = splat8(0.0f);
        for (i64 j = 0; j < n; j++) {
            const v8 v0 = load8(vb + j * v_row + d0), v1 = load8(vb + j * v_row + d0 + 8);
            for (int h = 0; h < 4; h++) {
                const v8 p = splat8(w[h][j]);
                acc[h][0] += p * v0;
                acc[h][1] += p * v1;
            }
        }
        for (int h = 0; h < 4; h++) {
            store8(acc_out + h * Dv + d0, acc[h][0]);
            store8(acc_out + h * Dv + d0 + 8, acc[h][1]);
        }
    }
    for (; d0 < Dv; d0++)
        for (int h = 0; h < 4; h++) {
            float total = 0.0f;
            for (i64 j = 0; j < n; j++) total += w[h][j] * vb[j * v_row + d0];
            acc_out[h * Dv + d0] = total;
        }
}

/* One block of n <= BLOCK keys of one (sequence, KV head) for its G query heads qg (G, D): per
 * head the block's maximum score, its sum of exponentials and its unnormalised output (Dv).
 * Always inlined, so that the calls with constant widths get fully unrolled copies. */
static inline __attribute__((always_inline)) void attend_block(
        const float *restrict qg, const float *restrict kb, const float *restrict vb, i64 n, i64 G,
        const i64 D, const i64 Dv, i64 v_row, float scale, float *restrict max_out, float *restrict sum_out,
        float *restrict acc_out) {
    float s[MAX_GROUP][BLOCK];
    i64 g = 0;
    for (; g + 2 <= G; g += 2) block_scores(qg + g * D, kb, n, 2, D, scale, s + g);
    if (g < G) block_scores(qg + g * D, kb, n, 1, D, scale, s + g);
    for (g = 0; g < G; g++) max_out[g] = block_softmax(s[g], n, sum_out + g);
    g = 0;
    for (; g + 4 <= G; g += 4) block_values_four_heads(s + g, vb, n, Dv, v_row, acc_out + g * Dv);
    for (; g < G; g++) block_values_one_head(s[g], vb, n, Dv, v_row, acc_out + g * Dv);
}

/* Returns 0, or -1 when G or Dv exceed the fixed buffers (the caller checks them first). */
int decode_attention(const float *q, const float *k, const float *v, float *out, const int64_t *position,
                     i64 B, i64 H_kv, i64 G, i64 S, i64 D, i64 Dv, i64 v_row, float scale) {
    if (G > MAX_GROUP || Dv > MAX_VALUE_DIM) return -1;
    const i64 n_valid = *position + 1 < S ? *position + 1 : S;
    /* every query head of a KV head passes over the block's keys and values again: keep a block
     * within L1 (128 keys of 32 channels; 40 of MLA's 96) */
    const i64 widest = D > Dv ? D : Dv, fit = BLOCK_BYTES / (i64)sizeof(float) / widest / 8 * 8;
    const i64 block = fit < 8 ? 8 : fit > BLOCK ? BLOCK : fit;
    const i64 n_blocks = (n_valid + block - 1) / block, items = B * H_kv * n_blocks;
    float *block_max = malloc(sizeof(float) * items * G), *block_sum = malloc(sizeof(float) * items * G);
    float *block_acc = malloc(sizeof(float) * items * G * Dv);
    if (!block_max || !block_sum || !block_acc) {
        free(block_max); free(block_sum); free(block_acc);
        return -1;
    }
    #pragma omp parallel for schedule(static)
    for (i64 item = 0; item < items; item++) {
        const i64 bh = item / n_blocks, j0 = (item % n_blocks) * block;
        const i64 n = j0 + block < n_valid ? block : n_valid - j0;
        const float *kb = k + (bh * S + j0) * D, *vb = v + (bh * S + j0) * v_row, *qg = q + bh * G * D;
        float *m = block_max + item * G, *l = block_sum + item * G, *acc = block_acc + item * G * Dv;
        if (D == 32 && Dv == 32) attend_block(qg, kb, vb, n, G, 32, 32, v_row, scale, m, l, acc);
        else if (D == 64 && Dv == 64) attend_block(qg, kb, vb, n, G, 64, 64, v_row, scale, m, l, acc);
        else if (D == 96 && Dv == 64) attend_block(qg, kb, vb, n, G, 96, 64, v_row, scale, m, l, acc);  /* MLA */
        else if (D == 128 && Dv == 128) attend_block(qg, kb, vb, n, G, 128, 128, v_row, scale, m, l, acc);
        else attend_block(qg, kb, vb, n, G, D, Dv, v_row, scale, m, l, acc);
    }
    for (i64 bh = 0; bh < B * H_kv; bh++)
        for (i64 g = 0; g < G; g++) {
            float m = -INFINITY, l = 0.0f, o[MAX_VALUE_DIM] = {0};
            for (i64 b = 0; b < n_blocks; b++) {
                const float mb = block_max[(bh * n_blocks + b) * G + g];
                m = mb > m ? mb : m;
            }
            for (i64 b = 0; b < n_blocks; b++) {
                const i64 at = (bh * n_blocks + b) * G + g;
                const float w = exp_nonpositive(block_max[at] - m);
                l += w * block_sum[at];
                for (i64 d = 0; d < Dv; d++) o[d] += w * block_acc[at * Dv + d];
            }
            for (i64 d = 0; d < Dv; d++) out[(bh * G + g) * Dv + d] = o[d] / l;
        }
    free(block_max); free(block_sum); free(block_acc);
    return 0;
}

/* The decoding step's matrix products, one row per sequence: out (M, N) = x (M, K) W^T + add,
 * W (N, K) row-major, add (N) (a bias, add_row_stride 0) or (M, N) (a residual) or NULL, x's rows
 * x_row_stride apart: four weight rows at a time meet the row of x in eight lanes. */
static inline __attribute__((always_inline)) void linear_rows(
        const float *restrict xm, const float *restrict w, i64 n0, i64 n1, const i64 K, float *restrict out) {
    i64 n = n0;
    for (; n + 4 <= n1; n += 4) {
        v8 acc[4] = {splat8(0.0f), splat8(0.0f), splat8(0.0f), splat8(0.0f)};
        i64 k = 0;
        for (; k + 8 <= K; k += 8) {
            const v8 xv = load8(xm + k);
            for (int r = 0; r < 4; r++) acc[r] += xv * load8(w + (n + r) * K + k);
        }
        for (int r = 0; r < 4; r++) {
            float total = 0.0f;
            for (int u = 0; u < 8; u++) total += acc[r][u];
            for (i64 kk = k; kk < K; kk++) total += xm[kk] * w[(n + r) * K + kk];
            out[n + r] = total;
        }
    }
    for (; n < n1; n++) {
        float total = 0.0f;
        for (i64 k = 0; k < K; k++) total += xm[k] * w[n * K + k];
        out[n] = total;
    }
}

/* Weights of at least this many elements (64 KiB) are split over the threads: their read from
 * memory, not the product, is the time; smaller ones are not worth waking a thread for. */
#define LINEAR_PARALLEL_MIN (16 * 1024)

void decode_linear(const float *x, i64 x_row_stride, const float *w, const float *add, i64 add_row_stride,
                   float *out, i64 M, i64 N, i64 K) {
    const i64 chunk = 64, chunks = (N + chunk - 1) / chunk;
    #pragma omp parallel for schedule(static) if (N * K >= LINEAR_PARALLEL_MIN)
    for (i64 c = 0; c < M * chunks; c++) {
        const i64 m = c / chunks, n0 = (c % chunks) * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        float *row = out + m * N;
        if (K == 128) linear_rows(x + m * x_row_stride, w, n0, n1, 128, row);
        else if (K == 512) linear_rows(x + m * x_row_stride, w, n0, n1, 512, row);
        else linear_rows(x + m * x_row_stride, w, n0, n1, K, row);
        if (add)
            for (i64 n = n0; n < n1; n++) row[n] += add[m * add_row_stride + n];
    }
}
