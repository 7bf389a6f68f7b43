/* exo-lab's CPU kernels: decode-time matrix products (y = x @ W^T for a few rows), RMSNorm and
 * rotary embedding (exo_rms_norm_*, exo_rotary_*, at the end of this file).
 *
 * Built on the PC that runs it by exo_lab.model.kernels (cc -O3 -march=native -fopenmp) and
 * called through ctypes with the tensors' data pointers. Why it exists: at decode a stage
 * multiplies 1-16 rows by every weight matrix once per token, so a step is a stream of weight
 * bytes, and torch's CPU kernels for int8 weights (_weight_int8pack_mm) and bfloat16 weights
 * (oneDNN) reach 6-10 GB/s on it where the memory gives 16-20. Two things close the gap:
 *   - software prefetch PREFETCH_BYTES ahead in each weight row (hardware prefetchers stop at
 *     4 KiB pages; measured on 576x576..576x1536 matrices streamed from DRAM, 2 threads:
 *     9.7 GB/s without, 16-17 with);
 *   - 4 weight rows x up to 4 activation rows per register block, so each weight vector is
 *     converted to float32 once and used for every activation row.
 *
 * Numbers: weights int8 with one bfloat16 scale per output row, or bfloat16; activations and
 * results bfloat16; every product and sum in float32, rounded to bfloat16 once at the end
 * (round to nearest even), as torch's bfloat16 products do. Only the summation order differs
 * (and, for bfloat16 weights on AVX512_BF16 CPUs, vdpbf16ps adds each pair of products before
 * adding them in, flushing subnormals).
 *
 * Threads: an OpenMP loop over blocks of 4 output rows. It must run on the OpenMP runtime torch
 * uses (GNU libgomp: the loader reuses the libgomp.so.1 torch loaded), so torch.set_num_threads
 * on the calling thread sets its team size and no second thread pool competes for the cores.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>
#include <omp.h>

#if defined(__AVX512F__)
#define VL 16
typedef __m512 vec;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vsum(v) _mm512_reduce_add_ps(v)
#define load_int8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define load_bf16(p) _mm512_castsi512_ps(_mm512_slli_epi32( \
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define EXO_ISA 512
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
typedef __m256 vec;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float vsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define load_int8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define load_bf16(p) _mm256_castsi256_ps(_mm256_slli_epi32( \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define EXO_ISA 256
#else
#define EXO_ISA 0
#endif

#define PREFETCH_BYTES 4096
#define NR 4                /* weight (output) rows per block */
#define MR 4                /* activation rows per pass over a block */
#define MAX_ROWS 64         /* rows of activations one call takes */
#define SERIAL_WEIGHTS 65536 /* below this many weights one thread does it all */

/* Which vector code this build has: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (none: do not call). */
int exo_gemv_isa(void) { return EXO_ISA; }

/* The OpenMP team size a call from this thread would use (tests check it follows torch's). */
int exo_gemv_threads(void) { return omp_get_max_threads(); }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if EXO_ISA

/* One block: nr (<= NR) weight rows starting at row n, times mr (<= MR) activation rows.
 * nr and mr are literals at every call site, so each instance keeps its accumulators in registers. */
#define DEFINE_BLOCK(NAME, WT, LOADW, WSCALAR)                                                        \
static inline __attribute__((always_inline)) void NAME(                                              \
        const float *x, int64_t K, const WT *w, int64_t n, const int nr, const int mr,              \
        float out[MR][NR]) {                                                                         \
    const WT *rows[NR];                                                                              \
    for (int r = 0; r < nr; r++) rows[r] = w + (n + r) * K;                                          \
    vec acc[MR][NR];                                                                                 \
    for (int m = 0; m < mr; m++)                                                                     \
        for (int r = 0; r < nr; r++) acc[m][r] = vzero();                                            \
    const int64_t kv = K - K % VL;                                                                   \
    const int64_t line = 64 / sizeof(WT);                                                            \
    for (int64_t k = 0; k < kv; k += VL) {                                                           \
        if (k % line == 0)                                                                           \
            for (int r = 0; r < nr; r++)                                                             \
                _mm_prefetch((const char *)(rows[r] + k) + PREFETCH_BYTES, _MM_HINT_T0);             \
        vec wv[NR];                                                                                  \
        for (int r = 0; r < nr; r++) wv[r] = LOADW(rows[r] + k);                                     \
        for (int m = 0; m < mr; m++) {                                                               \
            vec xv = vload(x + m * K + k);                                                           \
            for (int r = 0; r < nr; r++) acc[m][r] = vfma(wv[r], xv, acc[m][r]);                     \
        }                                                                                            \
    }                                                                                                \
    for (int m = 0; m < mr; m++)                                                                     \
        for (int r = 0; r < nr; r++) {                                                               \
            float s = vsum(acc[m][r]);                                                               \
            for (int64_t k = kv; k < K; k++) s += WSCALAR(rows[r][k]) * x[m * K + k];                \
            out[m][r] = s;                                                                           \
        }                                                                                            \
}

#define I8(v) ((float)(v))
DEFINE_BLOCK(block_int8, int8_t, load_int8, I8)
DEFINE_BLOCK(block_bf16, uint16_t, load_bf16, bf16_to_f32)

/* All activation rows against nr weight rows at n, MR at a time; out[m][r] -> y[m, n + r]. */
#define DEFINE_ROWS(NAME, WT, BLOCK, XT)                                                             \
static inline __attribute__((always_inline)) void NAME(                                              \
        const XT *x, int64_t M, int64_t K, const WT *w, int64_t n, const int nr,                    \
        const uint16_t *scales, int64_t N, uint16_t *y) {                                            \
    float out[MR][NR];                                                                               \
    for (int64_t m0 = 0; m0 < M; m0 += MR) {                                                         \
        const XT *xm = x + m0 * K;                                                                   \
        switch (M - m0 >= MR ? MR : (int)(M - m0)) {                                                 \
            case 4: BLOCK(xm, K, w, n, nr, 4, out); break;                                           \
            case 3: BLOCK(xm, K, w, n, nr, 3, out); break;                                           \
            case 2: BLOCK(xm, K, w, n, nr, 2, out); break;                                           \
            default: BLOCK(xm, K, w, n, nr, 1, out); break;                                          \
        }                                                                                            \
        for (int64_t m = m0; m < M && m < m0 + MR; m++)                                              \
            for (int r = 0; r < nr; r++) {                                                           \
                float v = out[m - m0][r];                                                            \
                if (scales) v *= bf16_to_f32(scales[n + r]);                                         \
                y[m * N + n + r] = f32_to_bf16(v);                                                   \
            }                                                                                        \
    }                                                                                                \
}

DEFINE_ROWS(rows_int8, int8_t, block_int8, float)
#if defined(__AVX512BF16__)
/* bfloat16 weights on CPUs with AVX512_BF16 (Zen 4, Sapphire Rapids): vdpbf16ps multiplies 32
 * bfloat16 pairs straight from memory and adds each pair's sum into float32 lanes, one
 * instruction where the float32 path needs three; the activations stay bfloat16 (they are). */
static inline __attribute__((always_inline)) void block_bf16dp(
        const uint16_t *x, int64_t K, const uint16_t *w, int64_t n, const int nr, const int mr,
        float out[MR][NR]) {
    const uint16_t *rows[NR];
    for (int r = 0; r < nr; r++) rows[r] = w + (n + r) * K;
    __m512 acc[MR][NR];
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) acc[m][r] = _mm512_setzero_ps();
    const int64_t kv = K - K % 32;
    for (int64_t k = 0; k < kv; k += 32) {
        __m512bh wv[NR];
        for (int r = 0; r < nr; r++) {
            _mm_prefetch((const char *)(rows[r] + k) + PREFETCH_BYTES, _MM_HINT_T0);
            wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(rows[r] + k));
        }
        for (int m = 0; m < mr; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + m * K + k));
            for (int r = 0; r < nr; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) {
            float s = _mm512_reduce_add_ps(acc[m][r]);
            for (int64_t k = kv; k < K; k++) s += bf16_to_f32(rows[r][k]) * bf16_to_f32(x[m * K + k]);
            out[m][r] = s;
        }
}
DEFINE_ROWS(rows_bf16, uint16_t, block_bf16dp, uint16_t)
#else
DEFINE_ROWS(rows_bf16, uint16_t, block_bf16, float)
#endif

static const uint16_t *as_is(const uint16_t *x, int64_t count) { (void)count; return x; }

static float *to_f32(const uint16_t *x, int64_t count) {
    float *out = (float *)malloc(sizeof(float) * (size_t)count);
    if (out)
        for (int64_t i = 0; i < count; i++) out[i] = bf16_to_f32(x[i]);
    return out;
}

#define DEFINE_GEMV(NAME, WT, ROWS, XT, TO_X)                                                        \
int NAME(const uint16_t *xb, int64_t M, int64_t K, const WT *w, const uint16_t *scales,            \
         int64_t N, uint16_t *y) {                                                                   \
    if (M < 1 || M > MAX_ROWS || K < 1 || N < 1) return -1;                                          \
    const XT *x = TO_X(xb, M * K);                                                                   \
    if (!x) return -2;                                                                               \
    const int64_t blocks = N / NR;                                                                   \
    _Pragma("omp parallel for schedule(static) if (N * K >= SERIAL_WEIGHTS)")                       \
    for (int64_t b = 0; b < blocks; b++) ROWS(x, M, K, w, b * NR, NR, scales, N, y);                 \
    for (int64_t n = blocks * NR; n < N; n++) ROWS(x, M, K, w, n, 1, scales, N, y);                  \
    if ((const void *)x != (const void *)xb) free((void *)x);    /* to_f32's copy */                \
    return 0;                                                                                        \
}

/* y (M, N) bf16 = x (M, K) bf16 @ (w (N, K) int8 * scales (N,) bf16)^T. 0 on success. */
DEFINE_GEMV(exo_gemv_int8, int8_t, rows_int8, float, to_f32)
/* y (M, N) bf16 = x (M, K) bf16 @ w (N, K) bf16 ^T (scales: NULL). 0 on success. */
#if defined(__AVX512BF16__)
DEFINE_GEMV(exo_gemv_bf16, uint16_t, rows_bf16, uint16_t, as_is)
#else
DEFINE_GEMV(exo_gemv_bf16, uint16_t, rows_bf16, float, to_f32)
#endif



/* ------------------------------------------------------------------------------------------
 * RMSNorm (bfloat16) and rotary embedding, one call each where transformers' layer code makes 8 and 16
 * small torch calls (a SmolLM2 decode step makes ~60 norms and 30 rotaries). Each reproduces
 * transformers' arithmetic rounding for rounding: float32 math, bfloat16 results rounded where
 * torch rounds them. Built with -std=c11, so the compiler does not fuse a*b+c into an FMA.
 */

/* y = w * bf16(x * r), r = 1 / sqrt(mean(x^2) + eps), per row of `width` (LlamaRMSNorm). */
static void rms_norm_row(const uint16_t *xr, int64_t width, const uint16_t *w, float eps, uint16_t *yr) {
    float sum = 0.0f;
    for (int64_t j = 0; j < width; j++) { float v = bf16_to_f32(xr[j]); sum += v * v; }
    float r = 1.0f / sqrtf(sum / (float)width + eps);
    for (int64_t j = 0; j < width; j++) {
        float h = bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[j]) * r));
        yr[j] = f32_to_bf16(bf16_to_f32(w[j]) * h);
    }
}

int exo_rms_norm_bf16(const uint16_t *x, int64_t rows, int64_t width, const uint16_t *w, float eps,
                      uint16_t *y) {
    #pragma omp parallel for schedule(static) if (rows * width >= SERIAL_WEIGHTS)
    for (int64_t i = 0; i < rows; i++) rms_norm_row(x + i * width, width, w, eps, y + i * width);
    return 0;
}

/* x (positions, heads, dim) rotated in place by cos/sin (positions, dim): transformers'
 * x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[half:], x[:half]); every product and
 * the sum rounded to T as torch rounds them (ROUND: float32 -> T -> float32). */
static inline float same(float v) { return v; }
static inline float bf16_round(float v) { return bf16_to_f32(f32_to_bf16(v)); }

#define DEFINE_ROTARY(NAME, T, TO_F32, ROUND, FROM_F32)                                               \
int NAME(T *x, int64_t positions, int64_t heads, int64_t dim, const T *cos, const T *sin) {         \
    const int64_t half = dim / 2;                                                                    \
    for (int64_t p = 0; p < positions; p++)                                                          \
        for (int64_t h = 0; h < heads; h++) {                                                        \
            T *v = x + (p * heads + h) * dim;                                                        \
            const T *c = cos + p * dim, *s = sin + p * dim;                                          \
            for (int64_t j = 0; j < half; j++) {                                                     \
                float a = TO_F32(v[j]), b = TO_F32(v[j + half]);                                     \
                float lo = ROUND(a * TO_F32(c[j])) + ROUND(-b * TO_F32(s[j]));                       \
                float hi = ROUND(b * TO_F32(c[j + half])) + ROUND(a * TO_F32(s[j + half]));          \
                v[j] = FROM_F32(lo);                                                                 \
                v[j + half] = FROM_F32(hi);                                                          \
            }                                                                                        \
        }                                                                                            \
    return 0;                                                                                        \
}

DEFINE_ROTARY(exo_rotary_bf16, uint16_t, bf16_to_f32, bf16_round, f32_to_bf16)
DEFINE_ROTARY(exo_rotary_f32, float, same, same, same)


/* ------------------------------------------------------------------------------------------
 * Group-quantized weights (GGUF's Q4_0 / Q4_1 / Q4_K / Q8_0 / Q6_K, and exo-lab's own int4),
 * repacked once at load (exo_lab.model.quant4) into two layouts:
 *   q4: 4-bit codes u in 0..15, groups of 32 along K: w = scale[g] * u + min[g];
 *       row n holds K/2 bytes, group g's 16 bytes: byte i = u[i] | u[i + 16] << 4 (GGUF's own
 *       Q4_0/Q4_1 order); scale and min: float16, (N, K/32) each.
 *   q8: 8-bit codes u in 0..255, groups of 16: w = scale[g] * (u - zero), one integer zero point
 *       per matrix (128 for Q8_0, 32 for Q6_K); scale: float16 (N, K/16).
 * The activations are quantized per call, as llama.cpp does (its Q8_1 / Q8_K), to int8 in
 * blocks of 32 with one float32 scale dx each (round to nearest): then a group's product is
 * integer multiply-adds (u8 x s8: vpdpbusd where AVX512_VNNI is, else maddubs/madd), scaled
 * once: y += scale * dx * sum(u * qx) + min * dx * sum(qx). Results are float32 sums rounded
 * to bfloat16 once. Any number of activation rows (decode: 1-16; prefill: more, taken 64 at a
 * time so that they stay in cache while the weights stream past once per 64 rows).
 */
#define QBLOCK 32
#define QROWS 4            /* activation rows per pass over a weight row */
#define QTILE 64           /* activation rows per stream of the weights */

typedef struct {
    int8_t *q;       /* (M, K) */
    float *dx;       /* (M, K/32) */
    float *sx16;     /* (M, K/16): dx * sum of the 16 codes */
    float *sx32;     /* (M, K/32): dx * sum of the 32 codes */
    float *dx16;     /* (M, K/16): dx of the block each 16 codes are in */
} qacts;

static inline float fp16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

static int quantize_acts(const uint16_t *x, int64_t M, int64_t K, qacts *a) {
    a->q = (int8_t *)malloc((size_t)(M * K));
    a->dx = (float *)malloc(sizeof(float) * (size_t)(M * K / QBLOCK));
    a->sx16 = (float *)malloc(sizeof(float) * (size_t)(M * K / 16));
    a->sx32 = (float *)malloc(sizeof(float) * (size_t)(M * K / QBLOCK));
    a->dx16 = (float *)malloc(sizeof(float) * (size_t)(M * K / 16));
    if (!a->q || !a->dx || !a->sx16 || !a->sx32 || !a->dx16) return -2;
    #pragma omp parallel for schedule(static) if (M * K >= SERIAL_WEIGHTS)
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / QBLOCK; b++) {
            const uint16_t *xb = x + m * K + b * QBLOCK;
            float v[QBLOCK], amax = 0.0f;
            for (int i = 0; i < QBLOCK; i++) { v[i] = bf16_to_f32(xb[i]); amax = fmaxf(amax, fabsf(v[i])); }
            const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int8_t *q = a->q + m * K + b * QBLOCK;
            int s0 = 0, s1 = 0;
            for (int i = 0; i < QBLOCK; i++) {
                q[i] = (int8_t)lrintf(v[i] * inv);
                if (i < 16) s0 += q[i]; else s1 += q[i];
            }
            a->dx[m * (K / QBLOCK) + b] = d;
            a->dx16[m * (K / 16) + 2 * b] = a->dx16[m * (K / 16) + 2 * b + 1] = d;
            a->sx16[m * (K / 16) + 2 * b] = d * (float)s0;
            a->sx16[m * (K / 16) + 2 * b + 1] = d * (float)s1;
            a->sx32[m * (K / QBLOCK) + b] = d * (float)(s0 + s1);
        }
    return 0;
}

static void free_acts(qacts *a) { free(a->q); free(a->dx); free(a->sx16); free(a->sx32); free(a->dx16); }

/* 32 unsigned codes x 32 signed activations -> 8 int32 partial sums (codes <= 127 off VNNI). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define EXO_VNNI 1
static inline __m256i dot_u8s8(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
#else
#define EXO_VNNI 0
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#endif
/* 16 codes of 0..255 x 16 signed activations -> 8 int32 partial sums, exact on any AVX2 CPU. */
static inline __m256i dot16_u8s8(const uint8_t *u, const int8_t *s) {
    __m256i a = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)u));
    __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)s));
    return _mm256_madd_epi16(a, b);
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Each weight row's groups are taken CHUNK at a time: first their float16 scales become float32
 * and are multiplied by the activation blocks' scales (8 groups per instruction), and the
 * mins' (q4) or the zero point's (q8) share of the sum is added up the same way; then the
 * integer products run with each group's factor broadcast straight from that table. */
#define CHUNK 64

/* scaled[r][j] = scale[c0 + j] * dxs[m0 + r][c0 + j]; returns sum_j other[c0 + j] * sxs[m0 + r][c0 + j]
 * per row into extra[r] (other may be NULL). groups: the row's groups (stride of dxs, sxs). */
static inline __attribute__((always_inline)) void scale_chunk(
        const uint16_t *scale, const uint16_t *other, const float *dxs, const float *sxs, int64_t groups,
        int64_t c0, int64_t cn, int64_t m0, const int mr, float scaled[QROWS][CHUNK], __m256 extra[QROWS]) {
    int64_t j = 0;
    for (; j + 8 <= cn; j += 8) {
        const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + c0 + j)));
        const __m256 ot = other ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(other + c0 + j))) : sc;
        for (int r = 0; r < mr; r++) {
            const int64_t at = (m0 + r) * groups + c0 + j;
            _mm256_storeu_ps(&scaled[r][j], _mm256_mul_ps(sc, _mm256_loadu_ps(dxs + at)));
            extra[r] = _mm256_fmadd_ps(ot, _mm256_loadu_ps(sxs + at), extra[r]);
        }
    }
    for (; j < cn; j++) {
        const float sc = fp16_to_f32(scale[c0 + j]), ot = other ? fp16_to_f32(other[c0 + j]) : sc;
        for (int r = 0; r < mr; r++) {
            const int64_t at = (m0 + r) * groups + c0 + j;
            scaled[r][j] = sc * dxs[at];
            extra[r] = _mm256_add_ps(extra[r], _mm256_setr_ps(ot * sxs[at], 0, 0, 0, 0, 0, 0, 0));
        }
    }
}

/* One weight row (n) of q4 against mr activation rows starting at m0. */
static inline __attribute__((always_inline)) void q4_row(
        const qacts *a, int64_t K, const uint8_t *qrow, const uint16_t *srow, const uint16_t *mrow,
        int64_t m0, const int mr, float out[QROWS]) {
    const int64_t groups = K / QBLOCK;
    __m256 acc[QROWS], mins[QROWS];
    float scaled[QROWS][CHUNK];
    for (int r = 0; r < mr; r++) { acc[r] = _mm256_setzero_ps(); mins[r] = _mm256_setzero_ps(); }
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int64_t c0 = 0; c0 < groups; c0 += CHUNK) {
        const int64_t cn = groups - c0 < CHUNK ? groups - c0 : CHUNK;
        scale_chunk(srow, mrow, a->dx, a->sx32, groups, c0, cn, m0, mr, scaled, mins);
        for (int64_t j = 0; j < cn; j++) {
            const int64_t g = c0 + j;
            if ((g & 3) == 0) _mm_prefetch((const char *)(qrow + g * 16) + PREFETCH_BYTES, _MM_HINT_T0);
            __m128i packed = _mm_loadu_si128((const __m128i *)(qrow + g * 16));
            __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
            for (int r = 0; r < mr; r++) {
                __m256i s = _mm256_loadu_si256((const __m256i *)(a->q + (m0 + r) * K + g * QBLOCK));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u, s)), _mm256_broadcast_ss(&scaled[r][j]), acc[r]);
            }
        }
    }
    for (int r = 0; r < mr; r++) out[r] = hsum256(acc[r]) + hsum256(mins[r]);
}

/* One weight row (n) of q8 (groups of 16, zero point z) against mr activation rows. */
static inline __attribute__((always_inline)) void q8_row(
        const qacts *a, int64_t K, const uint8_t *qrow, const uint16_t *srow, float z,
        int64_t m0, const int mr, float out[QROWS]) {
    const int64_t groups = K / 16;
    __m256 acc[QROWS], zs[QROWS];
    float scaled[QROWS][CHUNK];
    for (int r = 0; r < mr; r++) { acc[r] = _mm256_setzero_ps(); zs[r] = _mm256_setzero_ps(); }
    for (int64_t c0 = 0; c0 < groups; c0 += CHUNK) {
        const int64_t cn = groups - c0 < CHUNK ? groups - c0 : CHUNK;    /* even: K is a multiple of 32 */
        scale_chunk(srow, NULL, a->dx16, a->sx16, groups, c0, cn, m0, mr, scaled, zs);
        for (int64_t j = 0; j < cn; j += 2) {
            const int64_t g = c0 + j;
            if ((g & 3) == 0) _mm_prefetch((const char *)(qrow + g * 16) + PREFETCH_BYTES, _MM_HINT_T0);
#if EXO_VNNI
            __m256i u = _mm256_loadu_si256((const __m256i *)(qrow + g * 16));
#endif
            for (int r = 0; r < mr; r++) {
                const int8_t *s = a->q + (m0 + r) * K + g * 16;
#if EXO_VNNI
                __m256 d = _mm256_cvtepi32_ps(dot_u8s8(u, _mm256_loadu_si256((const __m256i *)s)));
                __m256 sc = _mm256_set_m128(_mm_broadcast_ss(&scaled[r][j + 1]), _mm_broadcast_ss(&scaled[r][j]));
                acc[r] = _mm256_fmadd_ps(d, sc, acc[r]);
#else
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot16_u8s8(qrow + g * 16, s)),
                                         _mm256_broadcast_ss(&scaled[r][j]), acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot16_u8s8(qrow + g * 16 + 16, s + 16)),
                                         _mm256_broadcast_ss(&scaled[r][j + 1]), acc[r]);
#endif
            }
        }
    }
    for (int r = 0; r < mr; r++) out[r] = hsum256(acc[r]) - z * hsum256(zs[r]);
}

#define QCALL(ROW, ...)                                                                              \
    switch (mr) {                                                                                    \
        case 4: ROW(__VA_ARGS__, 4, out); break;                                                     \
        case 3: ROW(__VA_ARGS__, 3, out); break;                                                     \
        case 2: ROW(__VA_ARGS__, 2, out); break;                                                     \
        default: ROW(__VA_ARGS__, 1, out); break;                                                    \
    }

/* y (M, N) bf16 = x (M, K) bf16 @ W^T, W in the q4 layout (kind 4) or q8 (kind 8, zero z).
 * K must be a multiple of 32 (q4: of 32 too). 0 on success. */
static int gemm_q(int kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *q,
                  const uint16_t *scales, const uint16_t *mins, int64_t z, int64_t N, uint16_t *y) {
    if (M < 1 || K < QBLOCK || K % QBLOCK || N < 1) return -1;
    qacts a = {0};
    if (quantize_acts(x, M, K, &a) != 0) { free_acts(&a); return -2; }
    const int64_t row_bytes = kind == 4 ? K / 2 : K;
    const int64_t row_scales = kind == 4 ? K / QBLOCK : K / 16;
    for (int64_t t0 = 0; t0 < M; t0 += QTILE) {
        const int64_t t1 = t0 + QTILE < M ? t0 + QTILE : M;
        #pragma omp parallel for schedule(dynamic, 64) if (N * K >= SERIAL_WEIGHTS)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *qrow = q + n * row_bytes;
            const uint16_t *srow = scales + n * row_scales;
            float out[QROWS];
            for (int64_t m0 = t0; m0 < t1; m0 += QROWS) {
                const int mr = t1 - m0 >= QROWS ? QROWS : (int)(t1 - m0);
                if (kind == 4) { QCALL(q4_row, &a, K, qrow, srow, mins + n * row_scales, m0) }
                else { QCALL(q8_row, &a, K, qrow, srow, (float)z, m0) }
                for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = f32_to_bf16(out[r]);
            }
        }
    }
    free_acts(&a);
    return 0;
}

int exo_gemm_q4(const uint16_t *x, int64_t M, int64_t K, const uint8_t *q, const uint16_t *scales,
                const uint16_t *mins, int64_t N, uint16_t *y) {
    return gemm_q(4, x, M, K, q, scales, mins, 0, N, y);
}

int exo_gemm_q8(const uint16_t *x, int64_t M, int64_t K, const uint8_t *q, const uint16_t *scales,
                int64_t zero, int64_t N, uint16_t *y) {
    return gemm_q(8, x, M, K, q, scales, NULL, zero, N, y);
}

/* ------------------------------------------------------------------------------------------
 * One decode step of a Llama-family decoder layer whose matrices are group-quantized, in one
 * call (exo_lab.model.lean.DecodeLayers): B rows of one new token each. What the lean layer
 * forward computes with ~20 torch calls, with the same roundings to bfloat16 (after each norm,
 * product, rotary, attention, activation, product and residual add); attention sums in float32
 * over each row's own positions [0, position]. Writes the token's key and value into the row's
 * KV slot (cache (slots, kv_heads, max_context, head_dim) bfloat16) and updates x in place.
 */
typedef struct {
    int64_t layout;              /* 4: q4, 8: q8 */
    const uint8_t *codes;
    const uint16_t *scales;
    const uint16_t *mins;        /* q4 */
    int64_t zero;                /* q8 */
    int64_t n, k;                /* out, in features */
} exo_matrix;

static int matrix_product(const exo_matrix *w, const uint16_t *x, int64_t M, uint16_t *y) {
    return gemm_q((int)w->layout, x, M, w->k, w->codes, w->scales, w->mins, w->zero, w->n, y);
}

/* y (M, sum of the parts' n) = x @ [W_0; W_1; ...]^T for ``parts`` matrices held apart (a
 * Q4_K_M layer's q/k in Q4_K and v in Q6_K cannot be one matrix): each part's columns in turn. */
static int parts_product(const exo_matrix *w, int64_t parts, const uint16_t *x, int64_t M, uint16_t *y,
                         uint16_t *scratch) {
    if (parts == 1) return matrix_product(w, x, M, y);
    int64_t total = 0, offset = 0;
    for (int64_t p = 0; p < parts; p++) total += w[p].n;
    for (int64_t p = 0; p < parts; p++) {
        int status = matrix_product(&w[p], x, M, scratch);
        if (status != 0) return status;
        for (int64_t m = 0; m < M; m++)
            memcpy(y + m * total + offset, scratch + m * w[p].n, sizeof(uint16_t) * (size_t)w[p].n);
        offset += w[p].n;
    }
    return 0;
}

static void rms_norm_rows(const uint16_t *x, int64_t rows, int64_t width, const uint16_t *w, float eps,
                          uint16_t *y) {
    for (int64_t i = 0; i < rows; i++) rms_norm_row(x + i * width, width, w, eps, y + i * width);
}

int exo_decode_layer(uint16_t *x, int64_t B, int64_t hidden, const uint16_t *norm1, const uint16_t *norm2,
                     float eps, const exo_matrix *qkv, int64_t qkv_parts, const exo_matrix *o,
                     const exo_matrix *gate_up, int64_t gate_up_parts, const exo_matrix *down, uint16_t *keys, uint16_t *values, const int64_t *slots,
                     const int64_t *positions, int64_t max_context, int64_t heads, int64_t kv_heads,
                     int64_t dim, float scaling, const uint16_t *cos, const uint16_t *sin) {
    const int64_t qw = heads * dim, kw = kv_heads * dim, width = qw + 2 * kw, inter = down->k;
    if (dim > 512 || dim % 2 || heads % kv_heads || B < 1) return -1;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = positions[b] + 1 > longest ? positions[b] + 1 : longest;
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)(B * (hidden > inter ? hidden : inter)));
    uint16_t *t = malloc(sizeof(uint16_t) * (size_t)(B * (width > 2 * inter ? width : 2 * inter)));
    uint16_t *attn = malloc(sizeof(uint16_t) * (size_t)(B * qw));
    uint16_t *out = malloc(sizeof(uint16_t) * (size_t)(B * hidden));
    float *scores = malloc(sizeof(float) * (size_t)(B * heads * longest));
    uint16_t *part = malloc(sizeof(uint16_t) * (size_t)(B * (width > 2 * inter ? width : 2 * inter)));
    int status = -2;
    if (!h || !t || !attn || !out || !scores || !part) goto done;
    rms_norm_rows(x, B, hidden, norm1, eps, h);
    if ((status = parts_product(qkv, qkv_parts, h, B, t, part)) != 0) goto done;
    for (int64_t b = 0; b < B; b++) {                       /* rotary, then K and V into the slot */
        uint16_t *row = t + b * width;
        exo_rotary_bf16(row, 1, heads, dim, cos + b * dim, sin + b * dim);
        exo_rotary_bf16(row + qw, 1, kv_heads, dim, cos + b * dim, sin + b * dim);
        for (int64_t g = 0; g < kv_heads; g++) {
            const int64_t at = ((slots[b] * kv_heads + g) * max_context + positions[b]) * dim;
            memcpy(keys + at, row + qw + g * dim, sizeof(uint16_t) * (size_t)dim);
            memcpy(values + at, row + qw + kw + g * dim, sizeof(uint16_t) * (size_t)dim);
        }
    }
    const int64_t group = heads / kv_heads;
    #pragma omp parallel for schedule(static) if (B * heads * longest * dim >= SERIAL_WEIGHTS)
    for (int64_t bh = 0; bh < B * heads; bh++) {
        const int64_t b = bh / heads, hd = bh % heads, g = hd / group, length = positions[b] + 1;
        const uint16_t *q = t + b * width + hd * dim;
        const uint16_t *kb = keys + (slots[b] * kv_heads + g) * max_context * dim;
        const uint16_t *vb = values + (slots[b] * kv_heads + g) * max_context * dim;
        float *sc = scores + bh * longest, top = -INFINITY, total = 0.0f;
        float qf[512];
        for (int64_t d = 0; d < dim; d++) qf[d] = bf16_to_f32(q[d]);
        for (int64_t j = 0; j < length; j++) {
            const uint16_t *kj = kb + j * dim;
            float dot = 0.0f;
            for (int64_t d = 0; d < dim; d++) dot += qf[d] * bf16_to_f32(kj[d]);
            sc[j] = dot * scaling;
            top = sc[j] > top ? sc[j] : top;
        }
        for (int64_t j = 0; j < length; j++) { sc[j] = expf(sc[j] - top); total += sc[j]; }
        float acc[512];
        for (int64_t d = 0; d < dim; d++) acc[d] = 0.0f;
        for (int64_t j = 0; j < length; j++) {
            const uint16_t *vj = vb + j * dim;
            const float p = sc[j] / total;
            for (int64_t d = 0; d < dim; d++) acc[d] += p * bf16_to_f32(vj[d]);
        }
        for (int64_t d = 0; d < dim; d++) attn[b * qw + hd * dim + d] = f32_to_bf16(acc[d]);
    }
    if ((status = matrix_product(o, attn, B, out)) != 0) goto done;
    for (int64_t i = 0; i < B * hidden; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(out[i]));
    rms_norm_rows(x, B, hidden, norm2, eps, h);
    if ((status = parts_product(gate_up, gate_up_parts, h, B, t, part)) != 0) goto done;
    for (int64_t b = 0; b < B; b++)                        /* silu(gate) * up, each rounded as torch */
        for (int64_t i = 0; i < inter; i++) {
            const float gate = bf16_to_f32(t[b * 2 * inter + i]), up = bf16_to_f32(t[b * 2 * inter + inter + i]);
            const float act = bf16_round(gate / (1.0f + expf(-gate)));
            h[b * inter + i] = f32_to_bf16(act * up);
        }
    if ((status = matrix_product(down, h, B, out)) != 0) goto done;
    for (int64_t i = 0; i < B * hidden; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(out[i]));
    status = 0;
done:
    free(h); free(t); free(attn); free(out); free(scores); free(part);
    return status;
}

/* out (N, K) bf16 = the matrix a q4 (kind 4) or q8 (kind 8, zero z) layout stands for, computed
 * as exo_lab.model.quant4.QuantWeight.dequantize computes it (float32 products, then one rounding):
 * prefill's many rows go through torch's bfloat16 GEMM on it, faster than the integer kernels. */
int exo_dequantize(int64_t kind, const uint8_t *q, const uint16_t *scales, const uint16_t *mins, int64_t z,
                   int64_t N, int64_t K, uint16_t *out) {
    if ((kind != 4 && kind != 8) || K % QBLOCK) return -1;
    #pragma omp parallel for schedule(static) if (N * K >= SERIAL_WEIGHTS)
    for (int64_t n = 0; n < N; n++) {
        uint16_t *o = out + n * K;
        if (kind == 4) {
            for (int64_t g = 0; g < K / QBLOCK; g++) {
                const uint8_t *b = q + n * (K / 2) + g * 16;
                const float s = fp16_to_f32(scales[n * (K / QBLOCK) + g]), m = fp16_to_f32(mins[n * (K / QBLOCK) + g]);
                for (int i = 0; i < 16; i++) {
                    o[g * QBLOCK + i] = f32_to_bf16((float)(b[i] & 15) * s + m);
                    o[g * QBLOCK + 16 + i] = f32_to_bf16((float)(b[i] >> 4) * s + m);
                }
            }
        } else {
            for (int64_t k = 0; k < K; k++)
                o[k] = f32_to_bf16(((float)q[n * K + k] - (float)z) * fp16_to_f32(scales[n * (K / 16) + k / 16]));
        }
    }
    return 0;
}

/* Whether the integer products use AVX512_VNNI (1) or AVX2's maddubs (0). */
int exo_gemm_vnni(void) { return EXO_VNNI; }

#endif
