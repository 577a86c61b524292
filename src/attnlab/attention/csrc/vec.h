/* Eight-lane float vectors (GCC/Clang vector extensions: AVX2 or AVX-512 code where -march allows,
 * plain code elsewhere) and the exponential of the softmax kernels, shared by decode.c and
 * selected.c. */
#ifndef ATTNLAB_VEC_H
#define ATTNLAB_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

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

/* Scores to weights exp(s - max), in place: returns the maximum, *sum gets the weights' sum. */
static inline float exp_weights(float *s, int64_t n, float *sum) {
    v8 max8 = splat8(-INFINITY), sum8 = splat8(0.0f);
    int64_t j;
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

#endif
