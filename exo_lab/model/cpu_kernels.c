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
int exo_rms_norm_bf16(const uint16_t *x, int64_t rows, int64_t width, const uint16_t *w, float eps,
                      uint16_t *y) {
    #pragma omp parallel for schedule(static) if (rows * width >= SERIAL_WEIGHTS)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *xr = x + i * width;
        float sum = 0.0f;
        for (int64_t j = 0; j < width; j++) { float v = bf16_to_f32(xr[j]); sum += v * v; }
        float r = 1.0f / sqrtf(sum / (float)width + eps);
        for (int64_t j = 0; j < width; j++) {
            float h = bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[j]) * r));
            y[i * width + j] = f32_to_bf16(bf16_to_f32(w[j]) * h);
        }
    }
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

#endif
