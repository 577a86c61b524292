/* CPU kernels for attention over each query's selected keys (DeepSeek-style sparse attention).
 *
 * Loaded with ctypes by attnlab/attention/_native.py, which compiles this file once per machine and
 * calls every kernel but select_chunk on a range of rows [r0, r1) from one thread per range (ctypes
 * releases the GIL), so those kernels are sequential; select_chunk, called once per block of a few
 * dozen rows, spreads them over PyTorch's OpenMP threads itself. Plain C on float32 arrays, no
 * Python or torch headers: it builds in about a second.
 *
 * Layouts (row-major, contiguous). A "row" r is a query token (b, t), r = b * T + t, at position
 * start + t. keys (R, K) int32: the key positions a row attends to; an entry whose key lies after
 * the row's position is padding (rows at positions < K keep positions 0..K-1) and contributes
 * nothing. Query-side arrays are (R, H, D) or (R, H, K); key-side tables are (B, S, G, D) with
 * G groups of H / G heads each (head h reads group h / (H / G)).
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

#define PREFETCH 4  /* slots ahead: the selected keys are scattered over the tables */
static inline void prefetch_rows(const float *rows, i64 GD, int write) {
    const char *at = (const char *)rows;
    for (i64 byte = 0; byte < GD * (i64)sizeof(float); byte += 64) {
        if (write) __builtin_prefetch(at + byte, 1);
        else __builtin_prefetch(at + byte, 0);
    }
}

/* The table rows of one query row's key in `slot` (NULL for padding): `base` is its sequence's
 * (S, G, D) table. */
static inline const float *entry(const float *base, const int32_t *keys, i64 slot, i64 K, i64 GD, i64 position) {
    if (slot + PREFETCH < K) prefetch_rows(base + keys[slot + PREFETCH] * GD, GD, 0);
    const i64 key = keys[slot];
    return key > position ? 0 : base + key * GD;
}

static inline __attribute__((always_inline)) float dot(const float *x, const float *y, i64 D) {
    float lanes[8] = {0};
    i64 d = 0;
    for (; d + 8 <= D; d += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += x[d + l] * y[d + l];
    float acc = 0.0f;
    for (; d < D; ++d) acc += x[d] * y[d];
    for (int l = 0; l < 8; ++l) acc += lanes[l];
    return acc;
}

static inline __attribute__((always_inline)) void axpy(float *restrict y, float c, const float *restrict x, i64 D) {
    for (i64 d = 0; d < D; ++d) y[d] += c * x[d];
}

/* Per row: where its sequence's table starts, its keys, its position; per head: its group's offset. */
#define ROW_SETUP(table, GD)                                   \
    const i64 batch = r / T, position = start + r % T;         \
    const int32_t *row_keys = keys + r * K;                    \
    const float *base = (table) + batch * S * (GD);
#define GROUP_OFFSETS()                                        \
    i64 group_offset[H];                                       \
    for (i64 h = 0; h < H; ++h) group_offset[h] = (h / (H / G)) * D;

/* exp(x) for x <= 0 and log(x) for normal x > 0 to about 2 float ulps, in straight-line arithmetic
 * that vectorises (the C library's expf/logf are calls, one value at a time): a power of two from
 * the exponent bits times a polynomial on the reduced argument (Cephes' coefficients). */
static inline float exp_nonpositive(float x) {
    const int vanishes = x < -87.0f;  /* exp(-87) ~ 1.6e-38, the smallest normal float's order; -inf -> 0 */
    x = vanishes ? -87.0f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  /* x - n ln 2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return vanishes ? 0.0f : p * scale;
}

static inline float log_positive(float x) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    float e = (float)((bits >> 23) - 127);
    bits = (bits & 0x007fffff) | 0x3f800000;  /* the mantissa m in [1, 2) */
    float m;
    memcpy(&m, &bits, sizeof m);
    const int high = m > 1.41421356f;  /* m in [sqrt(1/2), sqrt(2)): log(m) = log(1 + f), |f| < 0.42 */
    m = high ? 0.5f * m : m;
    e = high ? e + 1.0f : e;
    const float f = m - 1.0f, z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z - e * 2.12194440e-4f - 0.5f * z;
    return f + y + e * 0.693359375f;
}

/* Softmax attention of each row's heads over its selected keys, one row at a time:
 *   p[r, h, slot] = softmax over the row's real slots of scale * q[r, h] . k[key, g(h)] (0 on padding),
 *   out[r, h] = sum_slot p[r, h, slot] v[key, g(h)],
 *   mean[r, slot] = the heads' average of p (the indexer's KL target), unless mean is NULL.
 * q, out (R, H, D); p (R, H, K); mean (R, K). A row's logits stay in cache from the products to the
 * weighted sum. */
static inline __attribute__((always_inline)) void attention_forward_impl(
        const float *q, const float *k_table, const float *v_table, const int32_t *keys, float *p, float *out,
        float *mean, i64 T, i64 H, i64 G, i64 S, const i64 D, i64 K, i64 start, float scale, i64 r0, i64 r1) {
    GROUP_OFFSETS()
    for (i64 r = r0; r < r1; ++r) {
        ROW_SETUP(k_table, G * D)
        const float *v_base = v_table + batch * S * G * D, *x = q + r * H * D;
        float *pr = p + r * H * K, *o = out + r * H * D;
        for (i64 slot = 0; slot < K; ++slot) {
            const float *rows = entry(base, row_keys, slot, K, G * D, position);
            for (i64 h = 0; h < H; ++h)
                pr[h * K + slot] = rows ? scale * dot(x + h * D, rows + group_offset[h], D) : -__builtin_inff();
        }
        for (i64 h = 0; h < H; ++h) {
            float *ph = pr + h * K, top = -__builtin_inff(), total = 0.0f;
            for (i64 slot = 0; slot < K; ++slot) top = ph[slot] > top ? ph[slot] : top;
            for (i64 slot = 0; slot < K; ++slot) {
                ph[slot] = exp_nonpositive(ph[slot] - top);
                total += ph[slot];
            }
            const float inv_total = 1.0f / total;
            for (i64 slot = 0; slot < K; ++slot) ph[slot] *= inv_total;
        }
        memset(o, 0, H * D * sizeof(float));
        for (i64 slot = 0; slot < K; ++slot) {
            const float *rows = entry(v_base, row_keys, slot, K, G * D, position);
            if (!rows) continue;
            for (i64 h = 0; h < H; ++h) axpy(o + h * D, pr[h * K + slot], rows + group_offset[h], D);
        }
        if (!mean) continue;
        float *m = mean + r * K;
        const float inv_heads = 1.0f / (float)H;
        for (i64 slot = 0; slot < K; ++slot) m[slot] = pr[slot];
        for (i64 h = 1; h < H; ++h)
            for (i64 slot = 0; slot < K; ++slot) m[slot] += pr[h * K + slot];
        for (i64 slot = 0; slot < K; ++slot) m[slot] *= inv_heads;
    }
}

/* The backward pass of softmax attention over the selected keys, one pass over each row's keys:
 * with p (R, H, K) the probabilities, dO (R, H, D) the output's gradient and delta[r, h] = dO . O,
 *   ds = scale * p * (dO . v - delta),  dq += ds k,  dk += ds q,  dv += p dO
 * for the heads h0..h1 (whole groups) of rows r0..r1: dq (R, H, D) is written there; dk, dv
 * (B, S, G, D) accumulate. Threads split either the groups (sharing dk, dv: no row of theirs
 * overlaps) or the rows (one dk, dv pair each). */
static inline __attribute__((always_inline)) void attention_backward_impl(
        const float *q, const float *k_table, const float *v_table, const int32_t *keys, const float *p,
        const float *grad_out, const float *delta, float *grad_q, float *grad_k, float *grad_v,
        i64 T, i64 H, i64 G, i64 S, const i64 D, i64 K, i64 start, float scale, i64 h0, i64 h1, i64 r0, i64 r1) {
    GROUP_OFFSETS()
    const i64 first = group_offset[h0], width = group_offset[h1 - 1] + D - first;  /* the groups' slice */
    for (i64 r = r0; r < r1; ++r) {
        ROW_SETUP(k_table, G * D)
        const i64 offset = base - k_table;  /* the same rows of every (B, S, G, D) table */
        const float *pr = p + r * H * K, *qr = q + r * H * D, *dor = grad_out + r * H * D, *dr = delta + r * H;
        float *dq = grad_q + r * H * D, ds[H];
        memset(dq + h0 * D, 0, (h1 - h0) * D * sizeof(float));
        for (i64 slot = 0; slot < K; ++slot) {
            if (slot + PREFETCH < K) {  /* the keys are scattered over the tables: fetch ahead */
                const i64 next = offset + row_keys[slot + PREFETCH] * G * D + first;
                prefetch_rows(k_table + next, width, 0);
                prefetch_rows(v_table + next, width, 0);
                prefetch_rows(grad_k + next, width, 1);
                prefetch_rows(grad_v + next, width, 1);
            }
            const i64 key = row_keys[slot];
            if (key > position) continue;  /* padding */
            const i64 at = offset + key * G * D;
            const float *k_rows = k_table + at, *v_rows = v_table + at;
            float *dk_rows = grad_k + at, *dv_rows = grad_v + at;
            /* every head's dot product first: independent, they overlap; each axpy waits for one */
            for (i64 h = h0; h < h1; ++h) ds[h] = dot(dor + h * D, v_rows + group_offset[h], D);
            for (i64 h = h0; h < h1; ++h) {
                const float prob = pr[h * K + slot], grad_logit = scale * prob * (ds[h] - dr[h]);
                axpy(dq + h * D, grad_logit, k_rows + group_offset[h], D);
                axpy(dk_rows + group_offset[h], grad_logit, qr + h * D, D);
                axpy(dv_rows + group_offset[h], prob, dor + h * D, D);
            }
        }
    }
}

/* The indexer's KL over each row's selected keys (the sparse stage) and its gradients, row by row:
 *   log q = log_softmax of the row's scores over its real slots (padding excluded),
 *   loss[r] = sum p (log p - log q) over the slots where p > 0,
 *   g = (q - p) * inv_n: the gradient of the mean over the rows with respect to the scores,
 *   grad_w[r, j] = sum_slot g terms[r, j, slot] (terms: the heads' ReLU(q_j . k) at the slots),
 *   with c = g[slot] * w[r, j] where the ReLU passed: grad_q[r, j] = sum_slot c k[key] and
 *   grad_k[key] += c q_j[r] (one grad_k per thread).
 * scores, p (R, K); terms (R, J, K); w (R, J); q (R, J, D); k_table (B, S, D); `row` K floats of
 * scratch. With grad_q NULL only the loss. */
static inline __attribute__((always_inline)) void indexer_kl_impl(
        const float *scores, const float *p, const float *w, const float *terms, const float *k_table,
        const float *q, const int32_t *keys, float *loss, float *grad_w, float *grad_q, float *grad_k,
        float *row, i64 T, i64 J, i64 S, const i64 D, i64 K, i64 start, float inv_n, i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; ++r) {
        const i64 batch = r / T, position = start + r % T;
        const int32_t *row_keys = keys + r * K;
        const float *sr = scores + r * K, *pr = p + r * K;
        float top = -__builtin_inff();
        for (i64 slot = 0; slot < K; ++slot) {
            const float s = row_keys[slot] <= position ? sr[slot] : -__builtin_inff();
            top = s > top ? s : top;
        }
        float total = 0.0f;
        for (i64 slot = 0; slot < K; ++slot) {
            row[slot] = row_keys[slot] <= position ? exp_nonpositive(sr[slot] - top) : 0.0f;
            total += row[slot];
        }
        const float log_total = log_positive(total), inv_total = 1.0f / total;
        float kl = 0.0f;
        for (i64 slot = 0; slot < K; ++slot) {
            const float target = pr[slot], log_q = sr[slot] - top - log_total;
            /* padding slots have p = 0: no term; their g is 0 through row[slot] = 0 */
            kl += target > 0.0f ? target * (log_positive(target) - log_q) : 0.0f;
            row[slot] = (row[slot] * inv_total - target) * inv_n;
        }
        loss[r] = kl;
        if (!grad_q) continue;
        const float *tr = terms + r * J * K, *wr = w + r * J, *qr = q + r * J * D;
        for (i64 j = 0; j < J; ++j) {
            float acc = 0.0f;
            for (i64 slot = 0; slot < K; ++slot) acc += row[slot] * tr[j * K + slot];
            grad_w[r * J + j] = acc;
        }
        const float *base = k_table + batch * S * D;
        float *grad_base = grad_k + batch * S * D, *dq = grad_q + r * J * D;
        memset(dq, 0, J * D * sizeof(float));
        for (i64 slot = 0; slot < K; ++slot) {
            const float *k_row = entry(base, row_keys, slot, K, D, position);
            if (!k_row || row[slot] == 0.0f) continue;
            float *grad_row = grad_base + (k_row - base);
            if (slot + PREFETCH < K) prefetch_rows(grad_base + row_keys[slot + PREFETCH] * D, D, 1);
            for (i64 j = 0; j < J; ++j) {
                if (tr[j * K + slot] <= 0.0f) continue;  /* the ReLU passes no gradient */
                const float c = row[slot] * wr[j];
                axpy(dq + j * D, c, k_row, D);
                axpy(grad_row, c, qr + j * D, D);
            }
        }
    }
}

/* The public kernels: the head width as a compile-time constant for the common widths, so that
 * the short per-head loops compile to straight vector code without run-time versioning. */
#define DISPATCH_D(call) \
    switch (D) { \
    case 16: call(16); break; \
    case 32: call(32); break; \
    case 64: call(64); break; \
    case 128: call(128); break; \
    default: call(D); \
    }

void attention_forward(const float *q, const float *k_table, const float *v_table, const int32_t *keys, float *p,
                       float *out, float *mean, i64 T, i64 H, i64 G, i64 S, i64 D, i64 K, i64 start, float scale,
                       i64 r0, i64 r1) {
#define CALL(width) attention_forward_impl(q, k_table, v_table, keys, p, out, mean, T, H, G, S, width, K, start, \
                                           scale, r0, r1)
    DISPATCH_D(CALL)
#undef CALL
}

void indexer_kl(const float *scores, const float *p, const float *w, const float *terms, const float *k_table,
                const float *q, const int32_t *keys, float *loss, float *grad_w, float *grad_q, float *grad_k,
                float *row, i64 T, i64 J, i64 S, i64 D, i64 K, i64 start, float inv_n, i64 r0, i64 r1) {
#define CALL(width) indexer_kl_impl(scores, p, w, terms, k_table, q, keys, loss, grad_w, grad_q, grad_k, row, T, J, \
                                    S, width, K, start, inv_n, r0, r1)
    DISPATCH_D(CALL)
#undef CALL
}

void attention_backward(const float *q, const float *k_table, const float *v_table, const int32_t *keys,
                        const float *p, const float *grad_out, const float *delta, float *grad_q, float *grad_k,
                        float *grad_v, i64 T, i64 H, i64 G, i64 S, i64 D, i64 K, i64 start, float scale,
                        i64 h0, i64 h1, i64 r0, i64 r1) {
#define CALL(width) attention_backward_impl(q, k_table, v_table, keys, p, grad_out, delta, grad_q, grad_k, \
                                            grad_v, T, H, G, S, width, K, start, scale, h0, h1, r0, r1)
    DISPATCH_D(CALL)
#undef CALL
}

/* A float's bits as an unsigned key with the same order (-inf lowest; no NaNs expected). */
static inline uint32_t ordered(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits ^ ((uint32_t)((int32_t)bits >> 31) | 0x80000000u);
}

/* The k-th largest of a[0..m) (1 <= k <= m; ties count separately) by a radix selection on its
 * bytes, most significant first; *greater: how many are strictly larger. */
static uint32_t kth_largest(const uint32_t *a, i64 m, i64 k, i64 *greater) {
    uint32_t prefix = 0, mask = 0;
    i64 above = 0;  /* elements above the current prefix */
    for (int shift = 24; shift >= 0; shift -= 8) {
        i64 counts[256] = {0};
        for (i64 i = 0; i < m; ++i)  /* no branch: whether a value matches the prefix is data */
            counts[(a[i] >> shift) & 0xFF] += (a[i] & mask) == prefix;
        int digit = 255;
        while (above + counts[digit] < k) above += counts[digit--];
        prefix |= (uint32_t)digit << shift;
        mask |= 0xFFu << shift;
    }
    *greater = above;
    return prefix;
}

#define SAMPLE_STRIDE 8

/* The k highest of row[0..n), ties at the threshold going to the latest positions, written to
 * out[0..k) in ascending position order (n > k); kept and kept_at hold n entries each.
 *
 * Every SAMPLE_STRIDE-th entry gives a value that about k + 3 sqrt(k) entries reach (a lower bound
 * on the k-th value as a rule); one pass keeps the entries at or above it, in position order, and a
 * radix selection among those few finds the exact k-th value. Where the bound keeps fewer than k
 * (a row whose sample misleads), the selection runs on the whole row. */
static void select_row(const float *row, i64 n, i64 k, uint32_t *kept, uint32_t *kept_at, int32_t *out) {
    const i64 n_sample = n / SAMPLE_STRIDE;
    const double expected = (double)k / SAMPLE_STRIDE;
    const i64 rank = (i64)(expected + 3.0 * __builtin_sqrt(expected)) + 1;
    uint32_t bound = 0;
    i64 unused;
    if (rank < n_sample) {
        for (i64 i = 0; i < n_sample; ++i) kept[i] = ordered(row[i * SAMPLE_STRIDE]);
        bound = kth_largest(kept, n_sample, rank, &unused);
    }
    i64 m = 0;
    for (i64 s = 0; s < n; ++s) {
        const uint32_t key = ordered(row[s]);
        kept[m] = key;
        kept_at[m] = (uint32_t)s;
        m += key >= bound;
    }
    if (m < k) {  /* the bound was too high: every position is a candidate */
        for (i64 s = 0; s < n; ++s) { kept[s] = ordered(row[s]); kept_at[s] = (uint32_t)s; }
        m = n;
    }
    i64 greater;
    const uint32_t threshold = kth_largest(kept, m, k, &greater);
    i64 tied = 0;
    for (i64 i = 0; i < m; ++i) tied += kept[i] == threshold;
    i64 skip = tied - (k - greater);  /* the earliest tied positions that do not fit */
    i64 written = 0;
    for (i64 i = 0; i < m; ++i)
        if (kept[i] > threshold || (kept[i] == threshold && skip-- <= 0)) out[written++] = (int32_t)kept_at[i];
}

/* The lightning indexer's selection for the rows r = b * n + t of a query chunk, each row while its
 * heads' product rows are in cache, from the scores to the KL's terms:
 *   I[s] = sum_j w[r, j] ReLU(products[b, j, t, s]) over the row's causal positions s < n0 + t,
 *   its k highest (select_row) into keys, and, when out_scores is given, the KL's inputs there:
 *   out_scores[o, slot] = I[key], out_terms[o, j, slot] = ReLU(products[b, j, t, key]),
 * where o = b * out_rows + out_row0 + t is the row's place in outputs of out_rows rows per sequence.
 * products (B, J, n, E), w (B, out_rows, J) read at the row's place o, keys (B, out_rows, k); scratch:
 * 3 * E 32-bit words per thread.
 * The rows run on n_threads threads of the OpenMP team PyTorch uses (the same libgomp): no threads
 * of its own to start or to compete with PyTorch's spinning ones. */
void select_chunk(const float *products, const float *w, int32_t *keys, float *out_scores, float *out_terms,
                  uint32_t *scratch, i64 B, i64 n, i64 E, i64 J, i64 n0, i64 k, i64 out_rows, i64 out_row0,
                  i64 n_threads) {
#pragma omp parallel num_threads((int)n_threads)
    {
#ifdef _OPENMP
        uint32_t *own = scratch + 3 * E * omp_get_thread_num();
#else
        uint32_t *own = scratch;
#endif
        float *row = (float *)own;
#pragma omp for schedule(dynamic, 1)
        for (i64 r = 0; r < B * n; ++r) {
            const i64 b = r / n, t = r % n, count = n0 + t, o = b * out_rows + out_row0 + t;
            const float *first = products + (b * J * n + t) * E;  /* head j's row: first + j * n * E */
            for (i64 j = 0; j < J; ++j) {
                const float *p = first + j * n * E, weight = w[o * J + j];
                if (j == 0) for (i64 s = 0; s < count; ++s) row[s] = weight * (p[s] > 0.0f ? p[s] : 0.0f);
                else for (i64 s = 0; s < count; ++s) row[s] += weight * (p[s] > 0.0f ? p[s] : 0.0f);
            }
            int32_t *chosen = keys + o * k;
            select_row(row, count, k, own + E, own + 2 * E, chosen);
            if (!out_scores) continue;
            for (i64 slot = 0; slot < k; ++slot) out_scores[o * k + slot] = row[chosen[slot]];
            for (i64 j = 0; j < J; ++j) {
                const float *p = first + j * n * E;
                float *terms = out_terms + (o * J + j) * k;
                for (i64 slot = 0; slot < k; ++slot) terms[slot] = p[chosen[slot]] > 0.0f ? p[chosen[slot]] : 0.0f;
            }
        }
    }
}
