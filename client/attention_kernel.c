/* The batch-invariant attention of client/attention_kernel.py in C (built with client/row_kernel.c into one library
 * by client/native.py: gcc -O3 -march=native -fopenmp).
 *
 * For each query r and head h: out[r, h] = softmax(scale * q[h, r] . k[j]) @ v[j] over the keys j that r may see,
 * idx[indptr[r] .. indptr[r + 1] - 1] (ascending cache positions). A query's result must depend only on that query
 * and that ordered list of keys, never on the other queries of the call, where its keys sit in the cache, which
 * other keys are masked, or the thread count: then a tree node gets the bits a decoding step over the same keys
 * gets. So every sum below has one fixed shape, indexed by the key's ordinal in the list:
 * - a score: 16 lane sums over the head dimension in order (lane l adds dims l, l + 16, ...; fused
 *   multiply-adds), then one fixed pairwise tree over the 16 lanes (``hsum``);
 * - the softmax: the exact maximum, exp(s - max) by one vector polynomial (Cephes' expf) for every key, and the
 *   denominator as 16 lane sums by ordinal (lane l adds keys l, l + 16, ...) and ``hsum``;
 * - the output: per head dimension, one chain of fused multiply-adds over the keys in order, divided by the
 *   denominator.
 * Masked keys are skipped, not added as zeros. Every element goes through the same vector code (no scalar
 * epilogue that a vectorizer might compile differently): buffers are padded to 16 and the padding never reaches
 * a sum.
 *
 * Layout: q [H, Q, D] C-contiguous; k and v: head g's position p at k + g * head_stride + p * D; out [Q, H, D].
 * Head h reads key/value head h / (H / KV). One task per (query, key/value head) does that head's query heads
 * (up to HC at a time) so that each key and value row is read once for all of them. D must be a multiple of 16.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define L 16                 /* lanes of the sums (a zmm on AVX-512, two ymm on AVX2) */
#define HC 4                 /* query heads per pass over the keys */
#define DMAX 512
#if defined(__AVX512F__)
#define ACC 24               /* vectors of output sums kept in registers (32 zmm) */
#else
#define ACC 6                /* (16 ymm, two per vector) */
#endif

typedef float vf __attribute__((vector_size(L * 4)));
typedef int32_t vi __attribute__((vector_size(L * 4)));

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){0} + x; }

static inline float hsum(vf a) {
    a = a + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    a = a + __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    a = a + __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    a = a + __builtin_shufflevector(a, a, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return a[0];
}

/* exp(x) for x <= 0 (Cephes' expf; below -87 gives ~0): the same polynomial as client/attention_kernel.py's */
static inline vf exp_neg(vf x) {
    vf lo = splat(-87.0f);
    vi below = x < lo;
    x = (vf)(((vi)x & ~below) | ((vi)lo & below));
    vf y = x * 1.44269504088896341f + 0.5f;
    vf k = __builtin_convertvector(__builtin_convertvector(y, vi), vf);     /* floor(y), y in [-126, 1]: */
    k = k - (vf)((vi)splat(1.0f) & (k > y));                               /* truncated, less one if above */
    vf r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vf e = p * r * r + r + 1.0f;
    vi bits = (__builtin_convertvector(k, vi) + 127) << 23;    /* 2**k, k in [-125, 0]: a normal float */
    return e * (vf)bits;
}

/* output sums of hc heads over dims [t0, t0 + tv * L): each (head, dim) one fused multiply-add chain over the keys */
static inline __attribute__((always_inline)) void weigh(int hc, int tv, const float *vb, const int64_t *keys,
                                                       int64_t n, int64_t d, int64_t t0, const float *e,
                                                       int64_t np, const float *inv_z, float *out, int64_t out_head) {
    vf acc[HC][ACC];
    for (int hh = 0; hh < hc; hh++)
        for (int c = 0; c < tv; c++) acc[hh][c] = (vf){0};
    for (int64_t j = 0; j < n; j++) {
        const float *vj = vb + keys[j] * d + t0;
        for (int c = 0; c < tv; c++) {
            vf x = ld(vj + c * L);
            for (int hh = 0; hh < hc; hh++) acc[hh][c] += e[hh * np + j] * x;
        }
    }
    for (int hh = 0; hh < hc; hh++)
        for (int c = 0; c < tv; c++) st(out + hh * out_head + t0 + c * L, acc[hh][c] * inv_z[hh]);
}

#define WEIGH(h, t) if (hc == h && tv == t) { \
        for (int64_t t0 = 0; t0 < d; t0 += t * L) { weigh(h, t, vb, keys, n, d, t0, e, np, inv_z, out, d); } \
        return; }

static void weigh_all(int hc, int tv, const float *vb, const int64_t *keys, int64_t n, int64_t d, const float *e,
                      int64_t np, const float *inv_z, float *out) {
    WEIGH(1, 1) WEIGH(1, 2) WEIGH(1, 4) WEIGH(1, 8)
    WEIGH(2, 1) WEIGH(2, 2) WEIGH(2, 4) WEIGH(2, 8)
    WEIGH(3, 1) WEIGH(3, 2) WEIGH(3, 4) WEIGH(3, 8)
    WEIGH(4, 1) WEIGH(4, 2) WEIGH(4, 4) WEIGH(4, 8)
}

/* hsum of each of a[0..15], the 16 at once into lanes 0..15: the same additions as ``hsum`` (checked against it
 * symbolically), done as a transposing tree of two-vector shuffles, 31 shuffles and 15 adds for 16 scores instead
 * of 64 and 64 */
#define SHUF __builtin_shufflevector
static inline vf hsum16(const vf a[L]) {
    vf b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = SHUF(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 24, 25, 26, 27, 28, 29, 30, 31)
             + SHUF(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23);
    for (int i = 0; i < 4; i++)
        c[i] = SHUF(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
             + SHUF(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        d[i] = SHUF(c[2 * i], c[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
             + SHUF(c[2 * i], c[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    vf e = SHUF(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
         + SHUF(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    return SHUF(e, e, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

static inline vf vmax(vf a, vf b) {
    vi m = a < b;
    return (vf)(((vi)a & ~m) | ((vi)b & m));
}

/* the scores of one (scaled) query head qv [d] against n keys into s: sixteen keys at a time (16 independent
 * chains), the rest one by one; each score the same sums either way */
static void scores(const float *qv, const float *kb, const int64_t *keys, int64_t n, int64_t d, float *s) {
    int64_t j = 0;
    for (; j + L <= n; j += L) {
        const float *kj[L];
        vf acc[L];
        for (int m = 0; m < L; m++) {
            kj[m] = kb + keys[j + m] * d;
            acc[m] = (vf){0};
        }
        for (int64_t t = 0; t < d; t += L) {
            vf x = ld(qv + t);
            for (int m = 0; m < L; m++) acc[m] += x * ld(kj[m] + t);
        }
        st(s + j, hsum16(acc));
    }
    for (; j < n; j++) {
        const float *k1 = kb + keys[j] * d;
        vf acc = (vf){0};
        for (int64_t t = 0; t < d; t += L) acc += ld(qv + t) * ld(k1 + t);
        s[j] = hsum(acc);
    }
}

/* hc query heads (rows qh, each [d], already scaled) of one query over its n keys into out (hc rows of d) */
static void heads(int hc, const float *qh, const float *kb, const float *vb, const int64_t *keys, int64_t n,
                  int64_t d, float *s, float *out) {
    int64_t np = (n + L - 1) / L * L;
    for (int hh = 0; hh < hc; hh++) scores(qh + hh * d, kb, keys, n, d, s + hh * np);
    float inv_z[HC];
    for (int hh = 0; hh < hc; hh++) {
        float *sh = s + hh * np;
        vf most = splat(sh[0]);       /* the maximum: exact, whatever the order */
        int64_t j = 0;
        for (; j + L <= n; j += L) most = vmax(most, ld(sh + j));
        float best = sh[0];
        for (int l = 0; l < L; l++) best = most[l] > best ? most[l] : best;
        for (; j < n; j++) best = sh[j] > best ? sh[j] : best;
        for (j = n; j < np; j++) sh[j] = best;
        vf z = (vf){0};
        for (j = 0; j < np; j += L) {
            vf e = exp_neg(ld(sh + j) - best);
            if (j + L > n)           /* the padding: exactly zero, so that it adds nothing */
                for (int l = 0; l < L; l++) e[l] = j + l < n ? e[l] : 0.0f;
            st(sh + j, e);
            z += e;
        }
        inv_z[hh] = 1.0f / hsum(z);
    }
    int tv = 8;                  /* vectors of dims per pass: as many as the registers hold, dividing d / L */
    while (tv > 1 && (tv * hc > ACC || (d / L) % tv)) tv /= 2;
    weigh_all(hc, tv, vb, keys, n, d, s, np, inv_z, out);
}

/* Returns 0, or -1 for a head dimension this kernel does not take, -2 where memory ran out. */
int attend(const float *q, const float *k, const float *v, int64_t head_stride, const int64_t *indptr,
           const int64_t *idx, float scale, float *out, int64_t n_heads, int64_t n_q, int64_t n_kv, int64_t d,
           int threads) {
    if (d % L || d > DMAX || n_kv <= 0 || n_heads % n_kv) return -1;
    int64_t groups = n_heads / n_kv, most = 0;
    for (int64_t r = 0; r < n_q; r++)
        if (indptr[r + 1] - indptr[r] > most) most = indptr[r + 1] - indptr[r];
    int64_t np = (most + L - 1) / L * L;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *s = malloc(sizeof(float) * (HC * np + HC * DMAX + L));
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < n_q * n_kv; task++) {   /* key/value head major: a thread's tasks share keys */
            if (!s) continue;
            int64_t g = task / n_q, r = task - g * n_q;
            int64_t a = indptr[r], n = indptr[r + 1] - a;
            float *qs = s + HC * np;
            for (int64_t h0 = 0; h0 < groups; h0 += HC) {
                int hc = (int)(groups - h0 < HC ? groups - h0 : HC);
                float *o = out + (r * n_heads + g * groups + h0) * d;
                if (n == 0) {
                    memset(o, 0, sizeof(float) * hc * d);
                    continue;
                }
                for (int hh = 0; hh < hc; hh++) {
                    const float *qh = q + ((g * groups + h0 + hh) * n_q + r) * d;
                    for (int64_t t = 0; t < d; t++) qs[hh * d + t] = qh[t] * scale;
                }
                heads(hc, qs, k + g * head_stride, v + g * head_stride, idx + a, n, d, s, o);
            }
        }
        free(s);
    }
    return failed ? -2 : 0;
}
