/* The few-rows linear layer of client/small_linear.py in C (built by client/native_rows.py with the machine's gcc:
 * -O3 -march=native -fopenmp).
 *
 * out[t, o] = sum_i w[o, i] * x[t, i] for a handful of rows x (a decoding step, a tree verify), float32.
 *
 * The weights are read from a packed copy: panels of PW consecutive output rows, stored input-major
 * (panel b holds w[b*PW .. b*PW+PW-1, i] for i = 0, 1, ... contiguously, zero-padded past n_out). A panel's
 * PW weights at one i are two vectors; each input row's x[t, i] is broadcast against them, so one task keeps
 * 2 x RT sums in registers and needs 2 + RT loads for 2 x RT multiply-adds. The dot-product form (a weight row
 * against an input row, as client/row_kernel.py) needs a load per multiply-add and a horizontal sum at the
 * end; on a 2-core AMD EPYC (Zen 3, AVX2) this form ran 1.5-1.9x faster from 8 rows on (BENCHMARKS.md §10).
 *
 * Every output is one chain of fused multiply-adds over i = 0, 1, ..., n_in - 1 in its own vector lane, the
 * same chain whatever the number of rows, where the row falls in a block, the panel, or the thread count: a
 * row's outputs have the same bits alone as within any batch (row-invariant).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16          /* floats per vector */
#define RT_MAX 12      /* 32 vector registers: 2 weights + 24 sums + a broadcast */
#else
#define VL 8
#define RT_MAX 6       /* 16 vector registers (AVX2): 2 weights + 12 sums + a broadcast */
#endif
#define PW (2 * VL)    /* output rows per panel */
#define AHEAD 32       /* panel rows (i) prefetched ahead where the sums keep the core busy (4+ rows) */

typedef float vf __attribute__((vector_size(VL * 4)));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

int64_t panel_width(void) { return PW; }

/* w [n_out, n_in] -> p [ceil(n_out / PW), n_in, PW] */
void pack(const float *w, float *p, int64_t n_out, int64_t n_in) {
    int64_t panels = (n_out + PW - 1) / PW;
    for (int64_t b = 0; b < panels; b++)
        for (int64_t i = 0; i < n_in; i++)
            for (int64_t j = 0; j < PW; j++) {
                int64_t o = b * PW + j;
                p[(b * n_in + i) * PW + j] = o < n_out ? w[o * n_in + i] : 0.0f;
            }
}

/* rt rows of x against one panel (rt a constant after inlining: the sums stay in registers) */
static inline __attribute__((always_inline)) void block(int rt, const float *p, int64_t n_in, const float *x,
                                                        float *out, int64_t n_out, int64_t o0) {
    vf a0[RT_MAX], a1[RT_MAX];
    for (int t = 0; t < rt; t++) {
        a0[t] = (vf){0};
        a1[t] = (vf){0};
    }
    for (int64_t i = 0; i < n_in; i++) {
        /* With 4+ rows of multiply-adds per panel row the loop no longer keeps enough loads in flight for the
         * hardware prefetcher to stream the panel from memory: asked for explicitly, 8-16 rows ran 10-30% faster
         * over weights not in cache (BENCHMARKS.md §10). With 1-3 rows it did not help. */
        if (rt >= 4) __builtin_prefetch(p + (i + AHEAD) * PW, 0, 3);
        vf w0 = load(p + i * PW), w1 = load(p + i * PW + VL);
        for (int t = 0; t < rt; t++) {
            float xv = x[t * n_in + i];
            a0[t] += w0 * xv;          /* contracted into one fused multiply-add (-ffp-contract=fast) */
            a1[t] += w1 * xv;
        }
    }
    if (o0 + PW <= n_out) {
        for (int t = 0; t < rt; t++) {
            store(out + t * n_out + o0, a0[t]);
            store(out + t * n_out + o0 + VL, a1[t]);
        }
    } else {
        for (int t = 0; t < rt; t++)
            for (int j = 0; j < PW && o0 + j < n_out; j++) out[t * n_out + o0 + j] = j < VL ? a0[t][j] : a1[t][j - VL];
    }
}

#define CASE(k) case k: block(k, p, n_in, x, out, n_out, o0); break;

static void block_n(int rt, const float *p, int64_t n_in, const float *x, float *out, int64_t n_out, int64_t o0) {
    switch (rt) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
#if RT_MAX > 6
        CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#endif
    }
}

/* out [n, n_out] = x [n, n_in] @ w^T from p = pack(w); rows split into ceil(n / RT_MAX) blocks of near-equal size */
void rows_matmul(const float *p, const float *x, float *out, int64_t n_out, int64_t n_in, int64_t n, int threads) {
    int64_t panels = (n_out + PW - 1) / PW;
    int64_t blocks = (n + RT_MAX - 1) / RT_MAX;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < panels; b++) {
        const float *pb = p + b * n_in * PW;
        int64_t t = 0;
        for (int64_t k = 0; k < blocks; k++) {
            int64_t rt = (n - t) / (blocks - k) + ((n - t) % (blocks - k) != 0);
            block_n((int)rt, pb, n_in, x + t * n_in, out + t * n_out, n_out, b * PW);
            t += rt;
        }
    }
}
