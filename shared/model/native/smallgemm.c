/* streamoe's CPU kernels for a few bf16 rows against weights that are read once (issue #15), and the
 * routed experts in fp32 (the last section: AVX2 with FMA, else plain C).
 *
 * At a few rows a matmul is a read of its weights: the time is bytes / bandwidth if the loop keeps
 * the loads streaming. torch's bf16 GEMM paths at these sizes read the weights at a fraction of
 * the bandwidth on some CPUs (loadgen/README.md), so these loops do it plainly: each weight row is
 * multiplied into every input row while it is in registers, accumulated in fp32, and each output
 * rounded to bf16 once, to nearest even. Three paths, by what the compiler targets:
 * - AVX512-BF16: 32 bf16 pair products per instruction (vdpbf16ps) into fp32; an fp32 input (the
 *   experts' silu(gate) * up) is rounded to bf16 first, as torch's bf16 path rounds it;
 * - AVX-512: each weight row widened to fp32 (bf16 is the top half of an fp32), fp32 FMAs;
 * - plain C elsewhere (correct; the calibration only picks these loops where they are fast).
 *
 * Built by shared/model/native.py with `cc -O3 -march=native -fopenmp -ffp-contract=off` (no fused
 * multiply-add the source does not write: the MoE combine must round as torch does). OpenMP resolves to the
 * runtime torch has already loaded (the same soname), so these loops share torch's thread pool
 * and thread count (the caller passes torch.get_num_threads()).
 *
 * Layouts (row-major, element strides): w [N, K] with row stride ldw; x [M, K] with ldx; y [M, N] with ldy;
 * the per-head products read weights packed by input pairs instead (streamoe_heads_bf16).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define STREAMOE_AVX512 1
#endif

#define MAX_ROWS 8
#define PREFETCH_BYTES 16384
#define WHOLE_EXPERTS 2
#define CHUNK_ROWS 16 /* pairs per pass over a slot's tiles (more pairs: the tiles streamed again) */
#define SCORE_AHEAD 8 /* context rows: the next block of 8, prefetched while this one is scored */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays a quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The bf16 bits of 16 fp32 lanes (rounded to nearest even, as f32_to_bf16), in each lane's low half. */
static inline __m512i bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_srli_epi32(r, 16);
}
#endif

/* dst[i] = f32_to_bf16(src[i]) for i < n, 16 at a time with AVX-512 (the same integer rounding). */
static inline void round_bf16(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtepi32_epi16(bf16_bits(_mm512_loadu_ps(src + i))));
#endif
    for (; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

#ifdef STREAMOE_AVX512
/* The sums of four accumulators' lanes, as [sum a, sum b, sum c, sum d]: one tree for four, about
 * half the shuffles of four separate reductions (at short K the reductions cost as much as the dots). */
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
#define HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), \
                                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    __m256 ab = _mm256_hadd_ps(HALVES(a), HALVES(b)), cd = _mm256_hadd_ps(HALVES(c), HALVES(d));
#undef HALVES
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* 16 bf16 values (masked) widened to fp32: bf16 is the top half of an fp32. */
static inline __m512 load_bf16(const uint16_t *p, __mmask16 mask) {
    __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* out[m * ldo + n + i] = the sum of acc[i][m]'s lanes, for the r <= R rows of this pass. */
static inline __attribute__((always_inline)) void store_sums(__m512 acc[4][MAX_ROWS], int r, int R, int M,
                                                             float *out, int64_t ldo, int64_t n) {
    int m = 0;
    if (r == 4 && R == 4) {
        for (; m < M; m++) _mm_storeu_ps(out + m * ldo + n, sum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
    } else if (r == 2 && R == 2) {
        for (; m + 1 < M; m += 2) {
            float s[4];
            _mm_storeu_ps(s, sum4(acc[0][m], acc[1][m], acc[0][m + 1], acc[1][m + 1]));
            out[m * ldo + n] = s[0];
            out[m * ldo + n + 1] = s[1];
            out[(m + 1) * ldo + n] = s[2];
            out[(m + 1) * ldo + n + 1] = s[3];
        }
    }
    for (; m < M; m++)
        for (int i = 0; i < r; i++) out[m * ldo + n + i] = _mm512_reduce_add_ps(acc[i][m]);
}
#endif

/* The input rows as the dot products take them (`xval`, row stride `ldx` >= K, zero-padded past K):
 * bf16 where the CPU multiplies bf16 pairs into fp32 (AVX512-BF16: x is bf16 already, or the
 * intermediate rounded to bf16 as torch's bf16 path rounds it), else fp32.
 * dot_rows: out[m * ldo + n] = sum_k x[m, k] * w[n, k] for n in [n0, n1), fp32 out. */
#if defined(STREAMOE_AVX512) && defined(__AVX512BF16__)
#define STREAMOE_DPBF16 1
typedef uint16_t xval;
#define XALIGN 32
static inline xval to_xval_bf16(uint16_t h) { return h; }
static inline void store_xval(const float *src, xval *dst, int64_t n) { round_bf16(src, dst, n); }

static inline __attribute__((always_inline)) void dot_rows_mr(const uint16_t *w, int64_t ldw, const xval *x,
                                                              int64_t ldx, int64_t K, int M, int R, int64_t n0,
                                                              int64_t n1, float *out, int64_t ldo,
                                                              const uint16_t *next) {
    const int64_t body = K & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((1ull << (K - body)) - 1ull);
    for (int64_t n = n0; n < n1; n += R) {
        const int r = (int)(n1 - n < R ? n1 - n : R);
        __m512 acc[4][MAX_ROWS];
        for (int i = 0; i < R; i++)
            for (int m = 0; m < M; m++) acc[i][m] = _mm512_setzero_ps();
        if (r == R) {
            for (int64_t k = 0; k < body; k += 32) {
                __m512bh wv[4];
                for (int i = 0; i < R; i++) {
                    wv[i] = (__m512bh)_mm512_loadu_si512(w + (n + i) * ldw + k);
                    if (next) _mm_prefetch((const char *)(next + (n + i) * ldw + k), _MM_HINT_T1);
                }
                for (int m = 0; m < M; m++) {
                    __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
                    for (int i = 0; i < R; i++) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wv[i], xv);
                }
            }
            if (tail) {
                for (int i = 0; i < R; i++) {
                    __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (n + i) * ldw + body);
                    for (int m = 0; m < M; m++)
                        acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wv, (__m512bh)_mm512_loadu_si512(x + m * ldx + body));
                }
            }
        } else {
            for (int i = 0; i < r; i++)
                for (int64_t k = 0; k < K; k += 32) {
                    __mmask32 mask = k < body ? (__mmask32)0xffffffffu : tail;
                    __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (n + i) * ldw + k);
                    for (int m = 0; m < M; m++)
                        acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wv, (__m512bh)_mm512_loadu_si512(x + m * ldx + k));
                }
        }
        store_sums(acc, r, R, M, out, ldo, n);
    }
}
#else
typedef float xval;
#define XALIGN 16
static inline xval to_xval_bf16(uint16_t h) { return bf16_to_f32(h); }
static inline void store_xval(const float *src, xval *dst, int64_t n) { memcpy(dst, src, sizeof(float) * (size_t)n); }
#ifdef STREAMOE_AVX512

static inline __attribute__((always_inline)) void dot_rows_mr(const uint16_t *w, int64_t ldw, const xval *x,
                                                              int64_t ldx, int64_t K, int M, int R, int64_t n0,
                                                              int64_t n1, float *out, int64_t ldo,
                                                              const uint16_t *next) {
    (void)next;
    const int64_t body = K & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (K - body)) - 1u);
    for (int64_t n = n0; n < n1; n += R) {
        const int r = (int)(n1 - n < R ? n1 - n : R);
        __m512 acc[4][MAX_ROWS];
        for (int i = 0; i < R; i++)
            for (int m = 0; m < M; m++) acc[i][m] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mask = k < body ? (__mmask16)0xffff : tail;
            for (int i = 0; i < r; i++) {
                __m512 wv = load_bf16(w + (n + i) * ldw + k, mask);
                for (int m = 0; m < M; m++) acc[i][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k), acc[i][m]);
            }
        }
        store_sums(acc, r, R, M, out, ldo, n);
    }
}
#else
static inline void dot_rows_mr(const uint16_t *w, int64_t ldw, const xval *x, int64_t ldx, int64_t K, int M, int R,
                               int64_t n0, int64_t n1, float *out, int64_t ldo, const uint16_t *next) {
    (void)R;
    (void)next;
    for (int64_t n = n0; n < n1; n++) {
        float acc[MAX_ROWS][8];
        memset(acc, 0, sizeof acc);
        const uint16_t *row = w + n * ldw;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8)
            for (int m = 0; m < M; m++)
                for (int j = 0; j < 8; j++) acc[m][j] += bf16_to_f32(row[k + j]) * x[m * ldx + k + j];
        for (int m = 0; m < M; m++) {
            float s = 0.0f;
            for (int j = 0; j < 8; j++) s += acc[m][j];
            for (int64_t kk = k; kk < K; kk++) s += bf16_to_f32(row[kk]) * x[m * ldx + kk];
            out[m * ldo + n] = s;
        }
    }
}
#endif
#endif

/* One specialised copy per row count, so the accumulators live in registers. */
/* Four weight rows at a time up to 4 input rows, two beyond: more loads in flight, each input load reused. */
#define DOT_CASE(MM) case MM: dot_rows_mr(w, ldw, x, ldx, K, MM, MM <= 4 ? 4 : 2, n0, n1, out, ldo, next); break;
static void dot_rows(const uint16_t *w, int64_t ldw, const xval *x, int64_t ldx, int64_t K, int M, int64_t n0,
                     int64_t n1, float *out, int64_t ldo, const uint16_t *next) {
    switch (M) {
        DOT_CASE(1) DOT_CASE(2) DOT_CASE(3) DOT_CASE(4) DOT_CASE(5) DOT_CASE(6) DOT_CASE(7) DOT_CASE(8)
        default: break;
    }
}

static int64_t padded(int64_t K) { return (K + XALIGN - 1) / XALIGN * XALIGN; }

/* bf16 rows x [M, K] (row stride ldx) -> xp [M, padded(K)], zeros past K. */
static void prepare(const uint16_t *x, int64_t ldx, int M, int64_t K, xval *xp) {
    const int64_t kp = padded(K);
    for (int m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k++) xp[m * kp + k] = to_xval_bf16(x[m * ldx + k]);
        for (int64_t k = K; k < kp; k++) xp[m * kp + k] = 0;
    }
}

/* This thread's share [*lo, *hi) of n rows, in runs of `align` rows. */
static void share(int64_t n, int64_t align, int64_t *lo, int64_t *hi) {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    int64_t per = ((n + nt - 1) / nt + align - 1) / align * align;
    *lo = t * per < n ? t * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

int streamoe_native_version(void) { return 1; }

/* 2: AVX512-BF16 dot products, 1: AVX-512 with fp32 FMAs, 0: plain C. */
int streamoe_native_avx512(void) {
#if defined(STREAMOE_DPBF16)
    return 2;
#elif defined(STREAMOE_AVX512)
    return 1;
#else
    return 0;
#endif
}

#if defined(STREAMOE_DPBF16)
/* From OUTER_ROWS rows on, `linear` runs outer products instead of dot products: the input rows are
 * packed by channel pairs, xp [K/2][Mp] (one 32-bit word per row holding its channels 2k and 2k+1;
 * Mp = M rounded up to 16, zeros past M), and each weight row's pair is broadcast against 16 rows'
 * pairs at a time. No sum across vector lanes is left to do, each input load serves R weight rows
 * and each broadcast MB blocks of 16 rows, so the loop runs at the rate of the dot-product
 * instruction (at 64 rows: 1.1-1.3x the dot products' rate, and 1.1-1.4x torch's, AVX512-BF16 EPYC). */
#define OUTER_ROWS 16
#define OUTER_GROUP 48 /* output columns per pass, kept as fp32 [column][64 rows] until rounded */
typedef int32_t __attribute__((may_alias, aligned(2))) i32u; /* a bf16 pair at any even address */

/* tmp[i * ldt + m] = sum over pairs kk of xp[kk][m] . w[i][2kk, 2kk+1], for R weight rows and MB blocks of 16 rows */
static inline __attribute__((always_inline)) void outer_mr(const uint32_t *xp, int64_t Mp, const uint16_t *w,
                                                           int64_t ldw, int64_t kpairs, const int MB, const int R,
                                                           float *tmp, int64_t ldt) {
    __m512 acc[12][4];
    for (int i = 0; i < R; i++)
        for (int b = 0; b < MB; b++) acc[i][b] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < kpairs; kk++) {
        __m512bh xv[4];
        for (int b = 0; b < MB; b++) xv[b] = (__m512bh)_mm512_loadu_si512(xp + kk * Mp + 16 * b);
        if ((kk & 15) == 0) /* the next R weight rows' next cache line (1.03-1.1x on the larger matrices) */
            for (int i = 0; i < R; i++) _mm_prefetch((const char *)(w + (R + i) * ldw + 2 * kk), _MM_HINT_T1);
        for (int i = 0; i < R; i++) {
            const __m512bh wb = (__m512bh)_mm512_set1_epi32(*(const i32u *)(w + i * ldw + 2 * kk));
            for (int b = 0; b < MB; b++) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], xv[b], wb);
        }
    }
    for (int i = 0; i < R; i++)
        for (int b = 0; b < MB; b++) _mm512_storeu_ps(tmp + i * ldt + 16 * b, acc[i][b]);
}

/* Weight rows per pass by blocks of 16 input rows: 24 accumulators with 3 or 4 blocks, 8 weight rows with
 * 1 or 2 (measured against 12: 16 and 32 rows 1.02-1.4x faster per matrix of the small preset, hot, on an
 * EPYC Zen 4; each weight row is its own stream of broadcasts, and fewer streams ran faster). */
#define OUTER_R(MB) ((MB) >= 3 ? 24 / (MB) : 8)
#define OUTER_CASE(MB, R) \
    case (MB) * 16 + (R): outer_mr(xp + m0, Mp, w + n * ldw, ldw, kpairs, MB, R, tmp + (n - n0) * 64, 64); break;
#define OUTER_UP_TO_6(MB) OUTER_CASE(MB, 1) OUTER_CASE(MB, 2) OUTER_CASE(MB, 3) OUTER_CASE(MB, 4) OUTER_CASE(MB, 5) \
    OUTER_CASE(MB, 6)
#define OUTER_7_TO_12(MB) OUTER_CASE(MB, 7) OUTER_CASE(MB, 8) OUTER_CASE(MB, 9) OUTER_CASE(MB, 10) OUTER_CASE(MB, 11) \
    OUTER_CASE(MB, 12)

static int linear_outer(const uint16_t *w, int64_t ldw, const uint16_t *x, int64_t ldx, int64_t M, int64_t K,
                        int64_t N, uint16_t *y, int64_t ldy, int nthreads) {
    const int64_t kpairs = K / 2, Mp = (M + 15) / 16 * 16;
    uint32_t *xp = malloc(sizeof(uint32_t) * (size_t)(kpairs * Mp));
    if (!xp) return -1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        int64_t lo, hi;
        share(kpairs, 16, &lo, &hi); /* each thread packs a share of the pairs: 16 rows' pair kk in one gather */
        const __m512i row = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)ldx)); /* in bf16 units (scale 2) */
        for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
            const __mmask16 valid = M - m0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (M - m0)) - 1u);
            for (int64_t kk = lo; kk < hi; kk++)
                _mm512_storeu_si512(xp + kk * Mp + m0, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, row,
                                                                                  x + m0 * ldx + 2 * kk, 2));
        }
        float *tmp = malloc(sizeof(float) * (size_t)(OUTER_GROUP * 64));
#pragma omp atomic
        failed += !tmp;
#pragma omp barrier
        share(N, 2, &lo, &hi);
        const __m512i column = _mm512_mullo_epi32(lane, _mm512_set1_epi32(64));
        for (int64_t n0 = lo; !failed && n0 < hi; n0 += OUTER_GROUP) {
            const int64_t g = hi - n0 < OUTER_GROUP ? hi - n0 : OUTER_GROUP;
            for (int64_t m0 = 0; m0 < Mp; m0 += 64) { /* 64 rows at a time; the group's weights stay in L1/L2 */
                const int mb = (int)((Mp - m0) / 16 < 4 ? (Mp - m0) / 16 : 4), R = OUTER_R(mb);
                for (int64_t n = n0; n < n0 + g; n += R) {
                    switch (mb * 16 + (int)(n0 + g - n < R ? n0 + g - n : R)) {
                        OUTER_UP_TO_6(4) OUTER_UP_TO_6(3) OUTER_CASE(3, 7) OUTER_CASE(3, 8)
                        OUTER_UP_TO_6(2) OUTER_7_TO_12(2) OUTER_UP_TO_6(1) OUTER_7_TO_12(1)
                        default: break;
                    }
                }
                const int64_t rows = M - m0 < 64 ? M - m0 : 64;
                for (int64_t j0 = 0; j0 < g; j0 += 16) { /* transposed back: 16 columns of a row in one gather */
                    const __mmask16 cols = g - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (g - j0)) - 1u);
                    for (int64_t m = 0; m < rows; m++) {
                        const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), cols, column, tmp + j0 * 64 + m, 4);
                        _mm256_mask_storeu_epi16(y + (m0 + m) * ldy + n0 + j0, cols, _mm512_cvtepi32_epi16(bf16_bits(v)));
                    }
                }
            }
        }
        free(tmp);
    }
    free(xp);
    return failed ? -1 : 0;
}
#endif

/* y [M, N] bf16 = x [M, K] bf16 @ w [N, K]^T bf16, any M: up to 8 rows one pass over the weights;
 * beyond, every block of 16 weight rows (in L1/L2 once read) meets the rows 8 at a time, so the
 * weights still come from memory once; from OUTER_ROWS rows with AVX512-BF16 and K even, outer
 * products (linear_outer). Returns 0, or -1 for a bad argument. */
int streamoe_linear_bf16(const uint16_t *w, int64_t ldw, const uint16_t *x, int64_t ldx, int64_t M, int64_t K,
                         int64_t N, uint16_t *y, int64_t ldy, int nthreads) {
    if (M < 1 || K < 1 || N < 1) return -1;
#if defined(STREAMOE_DPBF16)
    if (M >= OUTER_ROWS && K % 2 == 0) return linear_outer(w, ldw, x, ldx, M, K, N, y, ldy, nthreads);
#endif
    /* the weight rows ~16 KiB ahead are prefetched into L2 while these are multiplied: a cold
     * matrix of a few MB read at ~1.25x the rate the hardware prefetchers alone reach (an EPYC Zen 4) */
    const int64_t ahead = PREFETCH_BYTES / (2 * ldw) > 4 ? PREFETCH_BYTES / (2 * ldw) : 4;
    const int64_t kp = padded(K), block = M > MAX_ROWS ? 16 : 64;
    xval *xp = malloc(sizeof(xval) * (size_t)(M * kp));
    if (!xp) return -1;
    prepare(x, ldx, (int)M, K, xp);
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        int64_t lo, hi;
        share(N, 16, &lo, &hi);
        float acc[MAX_ROWS * 64];
        for (int64_t n = lo; n < hi; n += block) { /* `block` outputs at a time, then rounded */
            int64_t end = n + block < hi ? n + block : hi;
            for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
                const int rows = (int)(M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS);
                dot_rows(w, ldw, xp + m0 * kp, kp, K, rows, n, end, acc - n, block, m0 == 0 ? w + ahead * ldw : NULL);
                for (int64_t m = 0; m < rows; m++)
                    round_bf16(acc + m * block, y + (m0 + m) * ldy + n, end - n);
            }
        }
    }
    free(xp);
    return 0;
}

/* Per-head products against weights packed in pairs: y[m, h, n] = sum_k x[m, h, k] * w[h][n, k] for
 * m < M, h < H, n < N, with w[h] given as wp[h] [ceil(K/2), Np, 2] (wp[h][j][n] holds w[h][n, 2j]
 * and w[h][n, 2j+1], zero past K; Np = N rounded up to 16, zero rows past N; native.pack_heads).
 * Strides in elements: x (row ldxm, head ldxh), y (row ldym, head ldyh). With AVX512-BF16 each pair
 * of x is broadcast against 16 outputs' pairs (vdpbf16ps), 4 rows x 64 outputs in registers, so no
 * sum crosses lanes: the absorbed attention's W_UK (K = 64, a short dot product) and W_UV products
 * (MLA). Threads share the (head, 4 rows) blocks. Returns 0, or -1 for a bad argument. */
#if defined(STREAMOE_DPBF16)
/* acc [R][64] = R rows' products with 64 outputs (vs vectors of 16 in use) of one head's packed weights w
 * (at the block's first output): each pair of a row read as one 32-bit word and broadcast (K odd: the last
 * channel alone), R x vs sums in registers. */
static inline __attribute__((always_inline)) void heads_mr(const uint16_t *x, int64_t ldxm, const uint16_t *w,
                                                           int64_t Np, int64_t K, const int R, int vs, float *acc) {
    __m512 sum[6][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) sum[r][v] = _mm512_setzero_ps();
    const int64_t full = K / 2;
    for (int64_t j = 0; j <= full; j++) {
        if (j == full && K % 2 == 0) break;
        const uint16_t *wj = w + j * Np * 2;
        __m512bh wv[4];
        for (int v = 0; v < 4; v++)
            wv[v] = (__m512bh)(v < vs ? _mm512_loadu_si512(wj + 32 * v) : _mm512_setzero_si512());
        for (int r = 0; r < R; r++) { /* fixed counts, unrolled: the sums stay in registers */
            const uint16_t *row = x + r * ldxm + 2 * j;
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(j < full ? *(const i32u *)row : (int32_t)row[0]);
            for (int v = 0; v < 4; v++) sum[r][v] = _mm512_dpbf16_ps(sum[r][v], wv[v], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) _mm512_storeu_ps(acc + r * 64 + 16 * v, sum[r][v]);
}
#define HEADS_CASE(RR) case RR: heads_mr(row0, ldxm, w + n0 * 2, Np, K, RR, vs, acc); break;
#endif

int streamoe_heads_bf16(const uint16_t *x, int64_t ldxm, int64_t ldxh, int64_t M, int64_t H, int64_t K,
                        const uint16_t *wp, int64_t Np, int64_t N, uint16_t *y, int64_t ldym, int64_t ldyh,
                        int nthreads) {
    if (M < 1 || H < 1 || K < 1 || N < 1 || Np < N || Np % 16) return -1;
    const int64_t pairs = (K + 1) / 2;
#if defined(STREAMOE_DPBF16)
    const int64_t mblocks = (M + 5) / 6; /* 6 rows x 64 outputs in registers */
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int64_t b = 0; b < H * mblocks; b++) {
        const int64_t h = b / mblocks, m0 = (b % mblocks) * 6;
        const int rows = (int)(M - m0 < 6 ? M - m0 : 6);
        const uint16_t *w = wp + h * pairs * Np * 2, *row0 = x + m0 * ldxm + h * ldxh;
        float acc[6 * 64];
        for (int64_t n0 = 0; n0 < N; n0 += 64) {
            const int64_t width = N - n0 < 64 ? N - n0 : 64;
            const int vs = (int)((width + 15) / 16);
            switch (rows) {
                HEADS_CASE(1) HEADS_CASE(2) HEADS_CASE(3) HEADS_CASE(4) HEADS_CASE(5) HEADS_CASE(6)
                default: break;
            }
            for (int r = 0; r < rows; r++) round_bf16(acc + r * 64, y + (m0 + r) * ldym + h * ldyh + n0, width);
        }
    }
    return 0;
#else
    const int64_t mblocks = (M + 3) / 4;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int64_t b = 0; b < H * mblocks; b++) {
        const int64_t h = b / mblocks, m0 = (b % mblocks) * 4;
        const int rows = (int)(M - m0 < 4 ? M - m0 : 4);
        const uint16_t *w = wp + h * pairs * Np * 2;
        uint32_t xs[4 * 256]; /* this block's rows as pairs, a 256-pair slice at a time */
        int64_t built = -1;   /* the slice xs holds: with K <= 512 one slice, built once for every n0 */
        float acc[4 * 64];
        for (int64_t n0 = 0; n0 < N; n0 += 64) {
            const int64_t width = N - n0 < 64 ? N - n0 : 64;
            for (int i = 0; i < rows * 64; i++) acc[i] = 0.0f;
            for (int64_t j0 = 0; j0 < pairs; j0 += 256) {
                const int64_t jn = pairs - j0 < 256 ? pairs - j0 : 256;
                for (int r = 0; r < 4 && built != j0; r++) {
                    const uint16_t *row = x + (m0 + (r < rows ? r : 0)) * ldxm + h * ldxh;
                    for (int64_t j = 0; j < jn; j++) {
                        const int64_t k = 2 * (j0 + j);
                        xs[r * 256 + j] = (uint32_t)row[k] | (k + 1 < K ? (uint32_t)row[k + 1] << 16 : 0u);
                    }
                }
                built = j0;
                for (int r = 0; r < rows; r++)
                    for (int64_t j = 0; j < jn; j++) {
                        const float x0 = bf16_to_f32((uint16_t)xs[r * 256 + j]), x1 = bf16_to_f32((uint16_t)(xs[r * 256 + j] >> 16));
                        const uint16_t *wj = w + ((j0 + j) * Np + n0) * 2;
                        for (int64_t n = 0; n < width; n++)
                            acc[r * 64 + n] += x0 * bf16_to_f32(wj[2 * n]) + x1 * bf16_to_f32(wj[2 * n + 1]);
                    }
            }
            for (int r = 0; r < rows; r++) round_bf16(acc + r * 64, y + (m0 + r) * ldym + h * ldyh + n0, width);
        }
    }
    return 0;
#endif
}

/* s[i] = a[i] + b[i] for n bf16 values, as torch adds bf16: in fp32, rounded to nearest even once. */
static inline void add_rows(const uint16_t *a, const uint16_t *b, uint16_t *s, int64_t n) {
    int64_t i = 0;
#ifdef STREAMOE_AVX512
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_add_ps(load_bf16(a + i, (__mmask16)0xffff), load_bf16(b + i, (__mmask16)0xffff));
        _mm256_storeu_si256((__m256i *)(s + i), _mm512_cvtepi32_epi16(bf16_bits(v)));
    }
#endif
    for (; i < n; i++) s[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}

/* RMSNorm of one row as the model computes it (norm.py): the mean square and the scale in fp32, the
 * normalised row rounded to bf16, then times the bf16 weight and rounded again. */
static inline void norm_row(const uint16_t *row, int64_t K, const uint16_t *weight, float eps, uint16_t *y) {
    float total = 0.0f;
    int64_t k = 0;
#ifdef STREAMOE_AVX512
    __m512 sq = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m512 v = load_bf16(row + k, (__mmask16)0xffff);
        sq = _mm512_fmadd_ps(v, v, sq);
    }
    total = _mm512_reduce_add_ps(sq);
#endif
    for (; k < K; k++) total += bf16_to_f32(row[k]) * bf16_to_f32(row[k]);
    const float scale = 1.0f / sqrtf(total / (float)K + eps);
    for (k = 0; k < K; k++) y[k] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(row[k]) * scale)) * bf16_to_f32(weight[k]));
}

/* RMSNorm of M rows: x [M, K] (row stride ldx), weight [K], y [M, K] (row stride ldy). Returns 0, or
 * -1 for a bad argument. */
int streamoe_rms_norm_bf16(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, const uint16_t *weight, float eps,
                           uint16_t *y, int64_t ldy) {
    if (M < 1 || K < 1) return -1;
    /* a decode batch's rows shared over torch's threads (the runtime's default count is torch's) */
#pragma omp parallel for if (M * K >= 16384) schedule(static)
    for (int64_t m = 0; m < M; m++) norm_row(x + m * ldx, K, weight, eps, y + m * ldy);
    return 0;
}

/* The residual sum and the next norm in one pass: s = x + r as torch adds bf16 (in fp32, rounded once),
 * y = RMSNorm(s). x, r, s, y [M, K] with row strides ldx, ldr, lds, ldy. Returns 0, or -1 for a bad argument. */
int streamoe_add_rms_norm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *r, int64_t ldr, int64_t M, int64_t K,
                               const uint16_t *weight, float eps, uint16_t *s, int64_t lds, uint16_t *y, int64_t ldy) {
    if (M < 1 || K < 1) return -1;
#pragma omp parallel for if (M * K >= 16384) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        add_rows(x + m * ldx, r + m * ldr, s + m * lds, K);
        norm_row(s + m * lds, K, weight, eps, y + m * ldy);
    }
    return 0;
}

#ifdef STREAMOE_AVX512
/* e^x in fp32 lanes (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, scaled by 2^n; within
 * 2 ulp), below -87.3 the result is ~1e-38 instead of smaller, above 88.7 infinity. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

#endif

/* silu(g) * u for the n fp32 pairs g[i], u[i], into g, 16 at a time with AVX-512 (the exp within 2 ulp). */
static inline void silu_mul(float *g, const float *u, int64_t n) {
    int64_t i = 0;
#ifdef STREAMOE_AVX512
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* h[i] = silu(g[i]) * u[i] for n bf16 values as torch computes them in bf16: the silu in fp32 as
 * g / (1 + e^-g) (the exp within 2 ulp), rounded; the product in fp32, rounded. Into g. */
static void silu_mul_bf16(uint16_t *g, const uint16_t *u, int64_t n, int nthreads) {
#pragma omp parallel for if (n >= 16384) num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += 1024) {
        const int64_t end = i0 + 1024 < n ? i0 + 1024 : n;
        int64_t i = i0;
#ifdef STREAMOE_AVX512
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= end; i += 16) {
            const __m512 gv = load_bf16(g + i, (__mmask16)0xffff);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            const __m512i s = bf16_bits(_mm512_div_ps(gv, _mm512_add_ps(one, e)));
            const __m512 h = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(s, 16)), load_bf16(u + i, (__mmask16)0xffff));
            _mm256_storeu_si256((__m256i *)(g + i), _mm512_cvtepi32_epi16(bf16_bits(h)));
        }
#endif
        for (; i < end; i++) {
            const float v = bf16_to_f32(g[i]);
            g[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(v / (1.0f + expf(-v)))) * bf16_to_f32(u[i]));
        }
    }
}

/* A SwiGLU MLP of M rows as experts.MLP computes it in bf16 through `linear`, in one call: g = x wg^T and
 * u = x wu^T rounded to bf16, silu(g) * u as torch's bf16 silu and mul, y = h wd^T rounded; with `add`
 * (or NULL) then y + add as torch adds bf16 (the MoE layer's routed sum). wg, wu [I, D] and wd [D, I] with
 * contiguous rows; x [M, D] (row stride ldx); add and y [M, D] contiguous. Returns 0, or -1 for a bad
 * argument. */
int streamoe_mlp_bf16(const uint16_t *x, int64_t ldx, int64_t M, int64_t D, const uint16_t *wg, const uint16_t *wu,
                      int64_t I, const uint16_t *wd, const uint16_t *add, uint16_t *y, int nthreads) {
    if (M < 1 || D < 1 || I < 1) return -1;
    uint16_t *g = malloc(sizeof(uint16_t) * (size_t)(2 * M * I));
    if (!g) return -1;
    uint16_t *u = g + M * I;
    int rc = streamoe_linear_bf16(wg, D, x, ldx, M, D, I, g, I, nthreads);
    if (rc == 0) rc = streamoe_linear_bf16(wu, D, x, ldx, M, D, I, u, I, nthreads);
    if (rc == 0) {
        silu_mul_bf16(g, u, M * I, nthreads);
        rc = streamoe_linear_bf16(wd, I, g, I, M, I, D, y, D, nthreads);
    }
    if (rc == 0 && add) {
#pragma omp parallel for if (M * D >= 16384) num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
        for (int64_t m = 0; m < M; m++) add_rows(y + m * D, add + m * D, y + m * D, D);
    }
    free(g);
    return rc;
}

/* rows [T, W] (row stride ldr) into a cache layer by slot, pool[slots[t]] (row stride W), after asking
 * for every destination line for writing (index_copy_ writes the rows one by one, each line a miss
 * in turn: ~2x the time). Returns 0, or -1 for a slot outside [0, nslots). */
int streamoe_store_rows_bf16(const uint16_t *rows, int64_t ldr, int64_t T, int64_t W, const int64_t *slots,
                             int64_t nslots, uint16_t *pool) {
    if (T < 0 || W < 1) return -1;
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= nslots) return -1;
#ifdef STREAMOE_AVX512
    for (int64_t t = 0; t < T; t++)
        for (int64_t b = 0; b < 2 * W; b += 64) _mm_prefetch((const char *)(pool + slots[t] * W) + b, _MM_HINT_ET0);
#endif
    for (int64_t t = 0; t < T; t++) memcpy(pool + slots[t] * W, rows + t * ldr, sizeof(uint16_t) * (size_t)W);
    return 0;
}

/* Rotary embedding as rope.apply_rotary computes it in bf16, bit for bit: x [T, n, R] (strides ldxt, ldxh;
 * channels contiguous), cos/sin [T, R/2] bf16 -> out [T, n, R] (ldot, ldoh) = [x1 c - x2 s, x2 c + x1 s],
 * each product and each sum rounded to bf16 as torch's operators round them; the pairs (x1, x2) are
 * (x[2i], x[2i+1]) with `interleave` (the result de-interleaved), else the two halves. Returns 0, or -1. */
int streamoe_rope_bf16(const uint16_t *x, int64_t ldxt, int64_t ldxh, int64_t T, int64_t n, int64_t R,
                       const uint16_t *cos, const uint16_t *sin, int interleave, uint16_t *out, int64_t ldot,
                       int64_t ldoh) {
    if (T < 1 || n < 1 || R < 2 || R % 2) return -1;
    const int64_t half = R / 2;
#define BF(v) bf16_to_f32(f32_to_bf16(v))
#pragma omp parallel for if (T * n * R >= 16384) schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < n; h++) {
            const uint16_t *xr = x + t * ldxt + h * ldxh;
            uint16_t *o = out + t * ldot + h * ldoh;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = bf16_to_f32(xr[interleave ? 2 * i : i]), x2 = bf16_to_f32(xr[interleave ? 2 * i + 1 : half + i]);
                const float c = bf16_to_f32(cos[t * half + i]), sn = bf16_to_f32(sin[t * half + i]);
                o[i] = f32_to_bf16(BF(x1 * c) - BF(x2 * sn));
                o[half + i] = f32_to_bf16(BF(x2 * c) + BF(x1 * sn));
            }
        }
#undef BF
    return 0;
}

#if defined(STREAMOE_DPBF16)
/* The routed experts packed for outer products (native.pack_experts), each slot's matrices in tiles of
 * 64 output columns by input pairs, a tile [ceil(K/2)][64][2] (lane j of pair kk: its column's inputs
 * 2kk and 2kk + 1), zeros past the edges:
 * - w13p [S][ceil(I/32)][D/2][64][2]: tile t's lanes 0-31 are gate columns 32t.., lanes 32-63 the same
 *   up columns, so a tile's sums give silu(gate) * up for 32 columns at once;
 * - w2p [S][ceil(D/64)][ceil(I/2)][64][2].
 * Each pair of an input row is broadcast against the tile's 64 columns (4 vectors): no sum crosses
 * lanes and each weight load serves every row (on an EPYC Zen 4 the layer 1.1-1.25x the dot products).
 * A tile is one contiguous stream, read without software prefetches (the hardware's alone read it
 * 1.1-1.2x faster from 4 tokens up, and as fast at 1). */
#define TILE 64

/* out [M][TILE] = the tile's columns for the rows x [M] (row stride ldx), M <= 6 (24 sums in registers) */
static inline __attribute__((always_inline)) void tile_mr(const uint32_t *tile, int64_t kpairs, const uint16_t *x,
                                                          int64_t ldx, const int M, float *out) {
    __m512 acc[6][4];
    for (int m = 0; m < M; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < kpairs; kk++) {
        const uint32_t *w = tile + kk * TILE;
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 16);
        const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 32), w3 = (__m512bh)_mm512_loadu_si512(w + 48);
        for (int m = 0; m < M; m++) { /* a fixed count, unrolled: the sums stay in registers */
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(*(const i32u *)(x + m * ldx + 2 * kk));
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xb);
            acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, xb);
        }
    }
    for (int m = 0; m < M; m++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + m * TILE + 16 * j, acc[m][j]);
}

/* out [M][TILE] for any M <= MAX_ROWS: the rows in even groups of at most 6 (the tile re-read from L1/L2) */
#define TILE_CASE(MM) case MM: tile_mr(tile, kpairs, x + m0 * ldx, ldx, MM, out + m0 * TILE); break;
static void tile_rows(const uint32_t *tile, int64_t kpairs, const uint16_t *x, int64_t ldx, int64_t M, float *out) {
    const int64_t groups = (M + 5) / 6;
    for (int64_t g = 0, m0 = 0; g < groups; m0 += (M - m0) / (groups - g), g++) {
        switch ((int)((M - m0) / (groups - g))) {
            TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
            default: break;
        }
    }
}

/* Gate/up tile t of one slot for M rows x (stride D) -> act columns [32t, 32t + 32) (stride ip): silu(gate) * up
 * in fp32, rounded to bf16 as the dot products' path rounds it. `out` is scratch [MAX_ROWS][TILE]. */
static void gate_up_tile(const uint16_t *w13p, int64_t t, int64_t D, int64_t I, const uint16_t *x, int64_t M,
                         xval *act, int64_t ip, float *out) {
    tile_rows((const uint32_t *)w13p + t * (D / 2) * TILE, D / 2, x, D, M, out);
    const int64_t cols = I - 32 * t < 32 ? I - 32 * t : 32;
    for (int64_t m = 0; m < M; m++) {
        silu_mul(out + m * TILE, out + m * TILE + 32, cols);
        store_xval(out + m * TILE, act + m * ip + 32 * t, cols);
    }
}

/* Down tile t of one slot for M rows act (stride ip) -> ys columns [64t, 64t + 64) (stride D), rounded. */
static void down_tile(const uint16_t *w2p, int64_t t, int64_t D, int64_t I, const xval *act, int64_t ip, int64_t M,
                      uint16_t *ys, float *out) {
    const int64_t kpairs = (I + 1) / 2;
    tile_rows((const uint32_t *)w2p + t * kpairs * TILE, kpairs, act, ip, M, out);
    const int64_t cols = D - TILE * t < TILE ? D - TILE * t : TILE;
    for (int64_t m = 0; m < M; m++) round_bf16(out + m * TILE, ys + m * D + TILE * t, cols);
}
#endif

/* Routed experts: xs [P, D] bf16, the (token, expert) pairs sorted by slot, counts [S] pairs per
 * slot; w13 [S, 2I, D] (gate rows, then up rows), w2 [S, D, I] -> ys [P, D] bf16, each pair through
 * its slot's SwiGLU expert: down(silu(gate x) * up x). Slots without pairs are not read. A slot's
 * pairs go 8 at a time (16 through the tiles); every thread takes a share of the gate/up rows (the
 * same rows of both, so it finishes its share of silu(gate) * up alone), then, after one barrier, a
 * share of the down rows. The intermediate stays fp32. With AVX512-BF16 and the packed copies w13p and w2p (not NULL;
 * D even), the slots' tiles instead (no sum across lanes). Returns 0, or -1 for a bad argument. */
int streamoe_experts_bf16(const uint16_t *xs, const int64_t *counts, int64_t S, const uint16_t *w13,
                          const uint16_t *w2, const uint16_t *w13p, const uint16_t *w2p, int64_t D, int64_t I,
                          uint16_t *ys, int nthreads) {
    if (S < 1 || D < 1 || I < 1) return -1;
#if defined(STREAMOE_DPBF16)
    const int tiles = w13p && w2p && D % 2 == 0;
    const int64_t tiles13 = (I + 31) / 32, tiles2 = (D + TILE - 1) / TILE;
    const int64_t slot13 = tiles13 * (D / 2) * TILE * 2, slot2 = tiles2 * ((I + 1) / 2) * TILE * 2; /* bf16 per slot */
#else
    (void)w13p;
    (void)w2p;
#endif
    for (int64_t s = 0; s < S; s++)
        if (counts[s] < 0) return -1;
    const int64_t dp = padded(D), ip = padded(I);
    const int threads = nthreads > 0 ? nthreads : 1;
    /* with at least WHOLE_EXPERTS slots in use per thread, each thread runs whole experts (no barrier) */
    int64_t used = 0;
    for (int64_t s = 0; s < S; s++) used += counts[s] > 0;
    const int whole = used >= WHOLE_EXPERTS * threads;
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(S + 1)), *order = malloc(sizeof(int64_t) * (size_t)(used + 1));
    /* rows per pass over a slot's weights: the tiles take CHUNK_ROWS (groups of up to 6 re-read each tile
     * from L2), the dot products MAX_ROWS; `act` holds two passes' silu(gate) * up (shared), or one per
     * thread (whole experts), zeros past I */
#if defined(STREAMOE_DPBF16)
    const int64_t chunk_rows = tiles ? CHUNK_ROWS : MAX_ROWS;
#else
    const int64_t chunk_rows = MAX_ROWS;
#endif
    xval *act = calloc((size_t)((whole ? threads : 2) * chunk_rows * ip), sizeof(xval));
    if (!act || !first || !order) {
        free(act);
        free(first);
        free(order);
        return -1;
    }
    for (int64_t s = 0, n = 0; s < S; s++) { /* each slot's first pair, and the slots in use */
        first[s + 1] = (first[s] = s ? first[s - 1] + counts[s - 1] : 0) + counts[s];
        if (counts[s] > 0) order[n++] = s;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        xval *xp = malloc(sizeof(xval) * (size_t)(MAX_ROWS * dp));
        float *gate = malloc(sizeof(float) * (size_t)(CHUNK_ROWS * 64 * 2)); /* also the tiles' scratch */
        float *out = malloc(sizeof(float) * (size_t)(MAX_ROWS * 64));
        int ok = xp && gate && out;
#pragma omp atomic
        failed += !ok;
#pragma omp barrier
        if (!failed && whole) {
#ifdef _OPENMP
            xval *a = act + omp_get_thread_num() * chunk_rows * ip;
#else
            xval *a = act;
#endif
#pragma omp for schedule(dynamic, 1)
            for (int64_t u = 0; u < used; u++) {
                const int64_t s = order[u];
                const uint16_t *g = w13 + s * 2 * I * D, *down = w2 + s * D * I;
                for (int64_t r0 = 0; r0 < counts[s]; r0 += chunk_rows) {
                    const int M = (int)(counts[s] - r0 < chunk_rows ? counts[s] - r0 : chunk_rows);
                    const uint16_t *next_g = r0 == 0 ? g + (PREFETCH_BYTES / (2 * D)) * D : NULL;
                    const uint16_t *next_down = r0 == 0 ? down + (PREFETCH_BYTES / (2 * I)) * I : NULL;
#if defined(STREAMOE_DPBF16)
                    if (tiles) {
                        for (int64_t t = 0; t < tiles13; t++)
                            gate_up_tile(w13p + s * slot13, t, D, I, xs + (first[s] + r0) * D, M, a, ip, gate);
                        for (int64_t t = 0; t < tiles2; t++)
                            down_tile(w2p + s * slot2, t, D, I, a, ip, M, ys + (first[s] + r0) * D, gate);
                        continue;
                    }
#endif
                    prepare(xs + (first[s] + r0) * D, D, M, D, xp);
                    for (int64_t j = 0; j < I; j += 64) {
                        const int64_t end = j + 64 < I ? j + 64 : I;
                        dot_rows(g, D, xp, dp, D, M, j, end, gate - j, 128, next_g);
                        dot_rows(g + I * D, D, xp, dp, D, M, j, end, gate + 64 - j, 128, next_g ? next_g + I * D : NULL);
                        for (int m = 0; m < M; m++) {
                            silu_mul(gate + m * 128, gate + m * 128 + 64, end - j);
                            store_xval(gate + m * 128, a + m * ip + j, end - j);
                        }
                    }
                    for (int64_t n = 0; n < D; n += 64) {
                        const int64_t end = n + 64 < D ? n + 64 : D;
                        dot_rows(down, I, a, ip, I, M, n, end, out - n, 64, next_down);
                        for (int m = 0; m < M; m++) round_bf16(out + m * 64, ys + (first[s] + r0 + m) * D + n, end - n);
                    }
                }
            }
        } else if (!failed) {
            int64_t lo_i, hi_i, lo_d, hi_d, start = 0, chunk = 0;
            share(I, 16, &lo_i, &hi_i);
            share(D, 16, &lo_d, &hi_d);
            for (int64_t s = 0; s < S; s++) {
                const uint16_t *g = w13 + s * 2 * I * D, *down = w2 + s * D * I;
                for (int64_t r0 = 0; r0 < counts[s]; r0 += chunk_rows, chunk++) {
                    int M = (int)(counts[s] - r0 < chunk_rows ? counts[s] - r0 : chunk_rows);
                    /* the rows ~16 KiB ahead prefetched on the first pass (faster here than fetching the
                     * next expert whole during this one's last pass: 1.05-1.2x on an EPYC Zen 4) */
                    const uint16_t *next_g = r0 == 0 ? g + (PREFETCH_BYTES / (2 * D)) * D : NULL;
                    const uint16_t *next_down = r0 == 0 ? down + (PREFETCH_BYTES / (2 * I)) * I : NULL;
                    const uint16_t *x = xs + (start + r0) * D;
                    xval *a = act + (chunk & 1) * chunk_rows * ip;
#if defined(STREAMOE_DPBF16)
                    if (tiles) { /* this thread's share of the tiles, then of the down tiles */
                        int64_t lo, hi;
                        share(tiles13, 1, &lo, &hi);
                        for (int64_t t = lo; t < hi; t++) gate_up_tile(w13p + s * slot13, t, D, I, x, M, a, ip, gate);
#pragma omp barrier
                        share(tiles2, 1, &lo, &hi);
                        for (int64_t t = lo; t < hi; t++) down_tile(w2p + s * slot2, t, D, I, a, ip, M, ys + (start + r0) * D, gate);
                        continue;
                    }
#endif
                    prepare(x, D, M, D, xp);
                    for (int64_t j = lo_i; j < hi_i; j += 64) {
                        int64_t end = j + 64 < hi_i ? j + 64 : hi_i;
                        dot_rows(g, D, xp, dp, D, M, j, end, gate - j, 128, next_g); /* gate rows */
                        dot_rows(g + I * D, D, xp, dp, D, M, j, end, gate + 64 - j, 128,
                                 next_g ? next_g + I * D : NULL); /* up rows */
                        for (int m = 0; m < M; m++) {
                            silu_mul(gate + m * 128, gate + m * 128 + 64, end - j);
                            store_xval(gate + m * 128, a + m * ip + j, end - j);
                        }
                    }
#pragma omp barrier
                    for (int64_t n = lo_d; n < hi_d; n += 64) {
                        int64_t end = n + 64 < hi_d ? n + 64 : hi_d;
                        dot_rows(down, I, a, ip, I, M, n, end, out - n, 64, next_down);
                        for (int m = 0; m < M; m++) round_bf16(out + m * 64, ys + (start + r0 + m) * D + n, end - n);
                    }
                }
                start += counts[s];
            }
        }
        free(xp);
        free(gate);
        free(out);
    }
    free(act);
    free(first);
    free(order);
    return failed ? -1 : 0;
}

/* The decode attention's scores, probabilities and pairs are kept by context row: p [len, hs] holds
 * row l's scores (then probabilities) for a group's heads in p[l * hs + h], hs the group's head count
 * rounded up to 16, so the softmax runs down the rows with 16 heads per vector and no sum crosses lanes. */

/* Each head's softmax in place, p [len, hs] scores -> probabilities, in fp32. */
#ifdef STREAMOE_AVX512
static void softmax_rows(float *p, int64_t hs, int64_t len) {
    for (int64_t h = 0; h < hs; h += 16) {
        __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
        for (int64_t l = 0; l < len; l++) top = _mm512_max_ps(top, _mm512_loadu_ps(p + l * hs + h));
        for (int64_t l = 0; l < len; l++) {
            const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + l * hs + h), top));
            total = _mm512_add_ps(total, e);
            _mm512_storeu_ps(p + l * hs + h, e);
        }
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), total);
        for (int64_t l = 0; l < len; l++) _mm512_storeu_ps(p + l * hs + h, _mm512_mul_ps(_mm512_loadu_ps(p + l * hs + h), inv));
    }
}
#else
static void softmax_rows(float *p, int64_t hs, int64_t len) {
    for (int64_t h = 0; h < hs; h++) {
        float top = p[h], total = 0.0f;
        for (int64_t l = 1; l < len; l++) top = p[l * hs + h] > top ? p[l * hs + h] : top;
        for (int64_t l = 0; l < len; l++) total += (p[l * hs + h] = expf(p[l * hs + h] - top));
        const float inv = 1.0f / total;
        for (int64_t l = 0; l < len; l++) p[l * hs + h] *= inv;
    }
}
#endif

#if defined(STREAMOE_DPBF16)
static inline uint32_t load_u32(const uint16_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Scores of the context rows `slot` [len] against a group's queries packed by channel pairs,
 * qp [hs / 16][npw][16] (npw = ceil(W / 2); lane h of qp[c][j] holds head 16c + h's channels 2j and
 * 2j + 1, zero for heads past the group): each pair of a context row is broadcast against 16 heads'
 * pairs (vdpbf16ps), 8 rows at a time, so no sum crosses lanes -> p [len, hs] = scale * q . k. */
static void score_rows(const uint32_t *qp, int64_t hs, int64_t W, const uint16_t *kv, const int64_t *slot,
                       int64_t len, float scale, float *p) {
    const int64_t full = W / 2, npw = (W + 1) / 2;
    const __m512 sv = _mm512_set1_ps(scale);
    for (int64_t l0 = 0; l0 < len; l0 += 8) {
        const int m = (int)(len - l0 < 8 ? len - l0 : 8);
        const uint16_t *row[8]; /* a block short of 8 rows repeats its last (not stored) */
        for (int i = 0; i < 8; i++) row[i] = kv + slot[l0 + (i < m ? i : m - 1)] * W;
        for (int64_t l = l0 + SCORE_AHEAD; l < l0 + SCORE_AHEAD + 8 && l < len; l++) /* rows read soon, into L2 */
            for (int64_t b = 0; b < 2 * W; b += 64) _mm_prefetch((const char *)(kv + slot[l] * W) + b, _MM_HINT_T1);
        for (int64_t c = 0; c < hs / 16; c++) {
            const uint32_t *qc = qp + c * npw * 16;
            __m512 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t j = 0; j < full; j++) {
                const __m512bh qv = (__m512bh)_mm512_loadu_si512(qc + j * 16);
                for (int i = 0; i < 8; i++) /* a fixed count, unrolled: the sums stay in registers */
                    acc[i] = _mm512_dpbf16_ps(acc[i], qv, (__m512bh)_mm512_set1_epi32((int)load_u32(row[i] + 2 * j)));
            }
            if (npw > full) { /* an odd width: the last channel alone */
                const __m512bh qv = (__m512bh)_mm512_loadu_si512(qc + full * 16);
                for (int i = 0; i < 8; i++)
                    acc[i] = _mm512_dpbf16_ps(acc[i], qv, (__m512bh)_mm512_set1_epi32((int)row[i][W - 1]));
            }
            for (int i = 0; i < m; i++) _mm512_storeu_ps(p + (l0 + i) * hs + 16 * c, _mm512_mul_ps(acc[i], sv));
        }
    }
}
#endif

/* out [hn, C] = sum_l p[l * hs + h] * k_l[c] in fp32 (`pairs` is scratch of hs * ceil(len / 2) words).
 * With AVX512-BF16, the context rows `next` [next_len] (the thread's next sequence, or NULL) are
 * prefetched into L2 meanwhile, a few per pass over these rows, which come from L2 themselves: the
 * memory is otherwise idle while they are weighed (cold rows: the attention ~1.13x, ad hoc).
 * With AVX512-BF16 the probabilities are rounded to bf16 and meet the latent rows as bf16 pairs, two
 * context rows per instruction (as torch's fused attention meets the values with probabilities in
 * their dtype), by blocks of 8 heads x 32 channels in registers; with AVX-512 in fp32, by blocks of
 * 4 heads x 64 channels; else in plain C. */
static void weigh_rows(const float *p, int64_t hs, int64_t len, const uint16_t *kv, const int64_t *slot, int64_t W,
                       int64_t H, int64_t C, uint32_t *pairs, float *out, const int64_t *next, int64_t next_len) {
#if defined(STREAMOE_DPBF16)
    int64_t block = 0; /* the next item's rows, a 16th per pass, into L2 while these are weighed */
    const int64_t blocks = ((H + 7) / 8) * ((C + 31) / 32);
    const int64_t np = (len + 1) / 2;
    for (int64_t j = 0; j < np; j++) /* pairs[j * hs + h]: head h's probabilities of rows 2j and 2j + 1 */
        for (int64_t h = 0; h < hs; h += 16) {
            const __m512i lo = bf16_bits(_mm512_loadu_ps(p + 2 * j * hs + h));
            const __m512i hi = 2 * j + 1 < len ? bf16_bits(_mm512_loadu_ps(p + (2 * j + 1) * hs + h)) : _mm512_setzero_si512();
            _mm512_storeu_si512(pairs + j * hs + h, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    /* unpacklo/hi interleave two rows within each 128-bit lane: the lo sums hold channels 8q..8q+3 of
     * lane q, the hi sums 8q+4..8q+7; these put them back in order, 16 channels at a time */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t h0 = 0; h0 < H; h0 += 8) {
        const int hm = (int)(H - h0 < 8 ? H - h0 : 8);
        for (int64_t c0 = 0; c0 < C; c0 += 32) {
            const int64_t left = C - c0;
            const __mmask32 mask = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1u);
            __m512 acc[8][2];
            for (int h = 0; h < 8; h++) acc[h][0] = acc[h][1] = _mm512_setzero_ps();
            int64_t head[8]; /* a block short of 8 heads repeats its last (not stored) */
            for (int h = 0; h < 8; h++) head[h] = h0 + (h < hm ? h : hm - 1);
            for (int64_t j = 0; j < np; j++) {
                if (next) {
                    const int64_t l = j * blocks + block; /* rows of the next item spread over every pass */
                    if (l < next_len)
                        for (int64_t b = 0; b < 2 * W; b += 64) _mm_prefetch((const char *)(kv + next[l] * W) + b, _MM_HINT_T1);
                }
                __m512i a = _mm512_maskz_loadu_epi16(mask, kv + slot[2 * j] * W + c0);
                /* an odd length's last pair meets a zero row (its probability is zero too) */
                __m512i b = _mm512_maskz_loadu_epi16(2 * j + 1 < len ? mask : 0, kv + slot[2 * j + (2 * j + 1 < len)] * W + c0);
                const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
                const uint32_t *pj = pairs + j * hs;
                for (int h = 0; h < 8; h++) { /* a fixed count, unrolled: the sums stay in registers */
                    const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pj[head[h]]);
                    acc[h][0] = _mm512_dpbf16_ps(acc[h][0], lo, w);
                    acc[h][1] = _mm512_dpbf16_ps(acc[h][1], hi, w);
                }
            }
            block++;
            const __mmask16 m0 = (__mmask16)mask, m1 = (__mmask16)(mask >> 16);
            for (int h = 0; h < 8; h++) {
                float *o = out + (h0 + h) * C + c0;
                if (h < hm) {
                    _mm512_mask_storeu_ps(o, m0, _mm512_permutex2var_ps(acc[h][0], first, acc[h][1]));
                    _mm512_mask_storeu_ps(o + 16, m1, _mm512_permutex2var_ps(acc[h][0], second, acc[h][1]));
                }
            }
        }
    }
#elif defined(STREAMOE_AVX512)
    (void)pairs;
    (void)next;
    (void)next_len;
    for (int64_t h0 = 0; h0 < H; h0 += 4) {
        const int hm = (int)(H - h0 < 4 ? H - h0 : 4);
        for (int64_t c0 = 0; c0 < C; c0 += 64) {
            __m512 acc[4][4];
            __mmask16 mask[4];
            for (int v = 0; v < 4; v++) {
                int64_t left = C - c0 - 16 * v;
                mask[v] = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1u) : 0;
                for (int h = 0; h < 4; h++) acc[h][v] = _mm512_setzero_ps();
            }
            int64_t head[4]; /* a block short of 4 heads repeats its last (not stored) */
            for (int h = 0; h < 4; h++) head[h] = h0 + (h < hm ? h : hm - 1);
            for (int64_t l = 0; l < len; l++) {
                const uint16_t *k = kv + slot[l] * W + c0;
                __m512 row[4];
                for (int v = 0; v < 4; v++) row[v] = load_bf16(k + 16 * v, mask[v]);
                for (int h = 0; h < 4; h++) { /* a fixed count, unrolled: the sums stay in registers */
                    __m512 w = _mm512_set1_ps(p[l * hs + head[h]]);
                    for (int v = 0; v < 4; v++) acc[h][v] = _mm512_fmadd_ps(w, row[v], acc[h][v]);
                }
            }
            for (int h = 0; h < 4; h++)
                if (h < hm)
                    for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(out + (h0 + h) * C + c0 + 16 * v, mask[v], acc[h][v]);
        }
    }
#else
    (void)pairs;
    (void)next;
    (void)next_len;
    for (int64_t h = 0; h < H; h++) {
        float *o = out + h * C;
        for (int64_t c = 0; c < C; c++) o[c] = 0.0f;
        for (int64_t l = 0; l < len; l++) {
            const uint16_t *k = kv + slot[l] * W;
            const float w = p[l * hs + h];
            for (int64_t c = 0; c < C; c++) o[c] += w * bf16_to_f32(k[c]);
        }
    }
#endif
}

/* The router of a DeepSeek-V3 MoE layer (moe.Gate) for T tokens x [T, D] bf16 (row stride ldx): sigmoid
 * scores s = sigmoid(x . w[e]) against the fp32 gate rows w [E, D], in fp32 (exp within 2 ulp); the choice s + bias picks
 * the experts (bias never weighs them): the top `topk_group` of G groups by the sum of each group's two
 * best choices, then the top K experts within those. Out: ids [T, K] ascending, weights [T, K] their
 * scores (divided by their sum + 1e-20 when `normalize`) times `scale`. Ties go to the lower index. The
 * dot products run 4 tokens x 4 experts at a time, shared over the threads, then each token's choice.
 * Returns 0, or -1 for a bad argument. */
int streamoe_gate_bf16(const uint16_t *x, int64_t ldx, int64_t T, int64_t D, const float *w, const float *bias,
                       int64_t E, int64_t G, int64_t topk_group, int64_t K, int normalize, float scale, int64_t *ids,
                       float *weights, int nthreads) {
    if (T < 1 || D < 1 || E < 1 || G < 1 || E % G || topk_group < 1 || topk_group > G || K < 1
        || K > 64 || K > topk_group * (E / G))
        return -1;
    float *sc = malloc(sizeof(float) * (size_t)(T * E));
    if (!sc) return -1;
    const int64_t tblocks = (T + 3) / 4, eblocks = (E + 3) / 4, per = E / G;
    int failed = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < tblocks * eblocks; b++) {
            const int64_t t0 = (b / eblocks) * 4, e0 = (b % eblocks) * 4;
            const int tn = (int)(T - t0 < 4 ? T - t0 : 4), en = (int)(E - e0 < 4 ? E - e0 : 4);
            float dot[4][4];
#ifdef STREAMOE_AVX512
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int t = 0; t < 4; t++) acc[i][t] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16) {
                const __mmask16 mask = D - d >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - d)) - 1u);
                __m512 xv[4], wv[4];
                for (int t = 0; t < 4; t++) xv[t] = load_bf16(x + (t0 + (t < tn ? t : 0)) * ldx + d, mask);
                for (int i = 0; i < 4; i++) wv[i] = _mm512_maskz_loadu_ps(mask, w + (e0 + (i < en ? i : 0)) * D + d);
                for (int i = 0; i < 4; i++)
                    for (int t = 0; t < 4; t++) acc[i][t] = _mm512_fmadd_ps(wv[i], xv[t], acc[i][t]);
            }
            for (int t = 0; t < 4; t++) _mm_storeu_ps(dot[t], sum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
            const __m512 v = _mm512_loadu_ps(&dot[0][0]); /* sigmoid, 16 at a time (the exp within 2 ulp) */
            _mm512_storeu_ps(&dot[0][0], _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                       exp512(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
#else
            for (int t = 0; t < tn; t++)
                for (int i = 0; i < en; i++) {
                    float total = 0.0f;
                    for (int64_t d = 0; d < D; d++) total += bf16_to_f32(x[(t0 + t) * ldx + d]) * w[(e0 + i) * D + d];
                    dot[t][i] = 1.0f / (1.0f + expf(-total));
                }
#endif
            for (int t = 0; t < tn; t++)
                for (int i = 0; i < en; i++) sc[(t0 + t) * E + e0 + i] = dot[t][i];
        }
        float *choice = malloc(sizeof(float) * (size_t)(E + G)); /* a token's choices, then its groups' */
        if (!choice) {
#pragma omp atomic
            failed += 1;
        } else {
            float *group = choice + E;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++) {
                const float *st = sc + t * E;
                for (int64_t e = 0; e < E; e++) choice[e] = st[e] + bias[e];
                for (int64_t g = 0; g < G; g++) { /* the sum of the group's two best choices */
                    float first = -INFINITY, second = -INFINITY;
                    for (int64_t e = g * per; e < (g + 1) * per; e++) {
                        if (choice[e] > first) {
                            second = first;
                            first = choice[e];
                        } else if (choice[e] > second) {
                            second = choice[e];
                        }
                    }
                    group[g] = per > 1 ? first + second : first;
                }
                for (int64_t n = 0; n < topk_group; n++) { /* the best groups, marked with +inf */
                    int64_t best = -1;
                    for (int64_t g = 0; g < G; g++)
                        if (group[g] != INFINITY && (best < 0 || group[g] > group[best])) best = g;
                    group[best] = INFINITY;
                }
                int64_t *pick = ids + t * K, chosen = 0;
                for (int64_t k = 0; k < K; k++) { /* the best experts of those groups, not chosen yet */
                    int64_t best = -1;
                    for (int64_t g = 0; g < G; g++) {
                        if (group[g] != INFINITY) continue;
                        for (int64_t e = g * per; e < (g + 1) * per; e++)
                            if (choice[e] != INFINITY && (best < 0 || choice[e] > choice[best])) best = e;
                    }
                    choice[best] = INFINITY;
                    int64_t j = chosen++; /* kept in ascending order */
                    for (; j > 0 && pick[j - 1] > best; j--) pick[j] = pick[j - 1];
                    pick[j] = best;
                }
                float total = 0.0f;
                for (int64_t k = 0; k < K; k++) {
                    weights[t * K + k] = st[pick[k]];
                    total += st[pick[k]];
                }
                for (int64_t k = 0; k < K; k++)
                    weights[t * K + k] = (normalize ? weights[t * K + k] / (total + 1e-20f) : weights[t * K + k]) * scale;
            }
            free(choice);
        }
    }
    free(sc);
    return failed ? -1 : 0;
}

/* A whole routed MoE layer from the routing: x [T, D] bf16, ids [T, K] (each token's distinct expert
 * slots, < S), weights [T, K] fp32 -> out [T, D] bf16. The (token, expert) pairs are sorted by slot
 * (stable: token order within a slot) and run through streamoe_experts_bf16 (with the packed copies
 * w13p, w2p where not NULL), then each token's
 * outputs are combined in fp32 in slot order as experts.combine does (the first product, then one
 * product added at a time, each rounded: built with -ffp-contract=off, so no fused multiply-add),
 * and rounded to bf16 once. Each slot's pair count is added to load [S] where given (the layer's
 * expert load). Returns 0, or -1 for a bad argument. */
int streamoe_moe_bf16(const uint16_t *x, int64_t T, int64_t D, const int64_t *ids, const float *weights, int64_t K,
                      int64_t S, const uint16_t *w13, const uint16_t *w2, const uint16_t *w13p, const uint16_t *w2p,
                      int64_t I, uint16_t *out, int64_t *load, int nthreads) {
    if (T < 1 || D < 1 || K < 1 || K > 64 || S < 1 || I < 1) return -1;
    const int64_t P = T * K;
    for (int64_t i = 0; i < P; i++)
        if (ids[i] < 0 || ids[i] >= S) return -1;
    int64_t *counts = calloc((size_t)S, sizeof(int64_t)), *row = malloc(sizeof(int64_t) * (size_t)P);
    uint16_t *xs = malloc(sizeof(uint16_t) * (size_t)(P * D)), *ys = malloc(sizeof(uint16_t) * (size_t)(P * D));
    int rc = -1;
    if (counts && row && xs && ys) {
        for (int64_t i = 0; i < P; i++) counts[ids[i]]++;
        if (load)
            for (int64_t e = 0; e < S; e++) load[e] += counts[e];
        int64_t *next = malloc(sizeof(int64_t) * (size_t)S);
        if (next) {
            for (int64_t s = 0, start = 0; s < S; s++) {
                next[s] = start;
                start += counts[s];
            }
            for (int64_t i = 0; i < P; i++) { /* pair i = (token i / K, its k-th expert) */
                row[i] = next[ids[i]]++;
                memcpy(xs + row[i] * D, x + (i / K) * D, sizeof(uint16_t) * (size_t)D);
            }
            free(next);
            rc = streamoe_experts_bf16(xs, counts, S, w13, w2, w13p, w2p, D, I, ys, nthreads);
        }
    }
    if (rc == 0) {
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
        for (int64_t t = 0; t < T; t++) {
            int64_t order[64]; /* this token's pairs by slot (K <= 64; a token's slots are distinct) */
            float acc[4096];
            for (int64_t k = 0; k < K; k++) {
                int64_t j = k;
                for (; j > 0 && ids[t * K + order[j - 1]] > ids[t * K + k]; j--) order[j] = order[j - 1];
                order[j] = k;
            }
            for (int64_t d0 = 0; d0 < D; d0 += 4096) {
                const int64_t dn = D - d0 < 4096 ? D - d0 : 4096;
                for (int64_t k = 0; k < K; k++) {
                    const int64_t pair = t * K + order[k];
                    const uint16_t *y = ys + row[pair] * D + d0;
                    const float w = weights[pair];
                    if (k == 0)
                        for (int64_t d = 0; d < dn; d++) acc[d] = bf16_to_f32(y[d]) * w;
                    else
                        for (int64_t d = 0; d < dn; d++) {
                            const float product = bf16_to_f32(y[d]) * w;
                            acc[d] = acc[d] + product;
                        }
                }
                round_bf16(acc, out + t * D + d0, dn);
            }
        }
    }
    free(counts);
    free(row);
    free(xs);
    free(ys);
    return rc;
}

/* Single-token decode attention on the absorbed path, read in place from the latent cache (no gather):
 * q [S, H, W] bf16 (each head's query in latent space: C latent channels, then the rotary ones),
 * kv the cache rows [*, W] bf16, slots [S, L] the rows of each sequence's context (lens[s] <= L of
 * them real), out [S, H, C] bf16: softmax(scale * q . k) over the context, applied to its first C
 * channels (the latent is its own value). Scores (with AVX512-BF16 each context row's channel pairs
 * against 16 heads' at a time, score_rows; else 8 context rows at a time against every head),
 * softmax and the weighted sum in fp32; each output rounded to bf16 once. Sequences are spread over
 * the threads, and with fewer sequences than threads their heads too. Returns 0, or -1 for a bad
 * argument. */
int streamoe_decode_attention_bf16(const uint16_t *q, int64_t S, int64_t H, int64_t W, const uint16_t *kv,
                                   const int64_t *slots, int64_t L, const int64_t *lens, int64_t C, float scale,
                                   uint16_t *out, int nthreads) {
    if (S < 1 || H < 1 || W < 1 || C < 1 || C > W || L < 1) return -1;
    for (int64_t s = 0; s < S; s++)
        if (lens[s] < 1 || lens[s] > L) return -1;
    /* fewer sequences than threads: each sequence's heads are split in groups (of whole blocks of 8,
     * as weigh_rows takes them), so every thread has work; a group's softmax and sum are its own.
     * The items go round the threads in turn (static, 1), so each knows its next one and fetches its
     * rows while weighing this one's */
    const int threads = nthreads > 0 ? nthreads : 1;
    int64_t groups = S >= threads ? 1 : (threads + S - 1) / S;
    if (groups > (H + 7) / 8) groups = (H + 7) / 8;
    const int64_t per = ((H + groups - 1) / groups + 7) / 8 * 8; /* heads per group */
    const int64_t hs = (per + 15) / 16 * 16; /* the rows of p: a group's heads rounded up to 16 */
    groups = (H + per - 1) / per;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *p = malloc(sizeof(float) * (size_t)(hs * L));
        float *acc = malloc(sizeof(float) * (size_t)(per * C));
        uint32_t *pairs = malloc(sizeof(uint32_t) * (size_t)(hs * ((L + 1) / 2)));
#if defined(STREAMOE_DPBF16)
        const int64_t npw = (W + 1) / 2;
        uint32_t *qp = malloc(sizeof(uint32_t) * (size_t)(hs * npw));
        int ok = p && acc && pairs && qp;
#else
        const int64_t wp = padded(W);
        xval *rows = malloc(sizeof(xval) * (size_t)(MAX_ROWS * wp));
        float *dots = malloc(sizeof(float) * (size_t)(MAX_ROWS * per));
        int ok = p && acc && pairs && rows && dots;
#endif
        if (!ok) {
#pragma omp atomic
            failed += 1;
        } else {
#pragma omp for schedule(static, 1)
            for (int64_t item = 0; item < S * groups; item++) {
                const int64_t s = item / groups, h0 = (item % groups) * per;
                const int64_t after = item + threads < S * groups ? (item + threads) / groups : -1; /* this thread's next */
                const int64_t hn = H - h0 < per ? H - h0 : per;
                const int64_t len = lens[s];
                const int64_t *slot = slots + s * L;
                const uint16_t *qs = q + (s * H + h0) * W;
#if defined(STREAMOE_DPBF16)
                /* the group's queries by channel pairs, 16 heads to a vector (zeros past hn and W):
                 * each vector gathers one pair from 16 query rows */
                const __m512i heads16 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                             13, 14, 15), _mm512_set1_epi32((int)W));
                for (int64_t c = 0; c < hs / 16; c++) {
                    const int64_t live = hn - 16 * c;
                    const __mmask16 mask = live >= 16 ? (__mmask16)0xffff : live > 0 ? (__mmask16)((1u << live) - 1u) : 0;
                    const uint16_t *base = qs + 16 * c * W;
                    for (int64_t j = 0; j < W / 2; j++)
                        _mm512_storeu_si512(qp + (c * npw + j) * 16,
                                            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask,
                                                                        _mm512_add_epi32(heads16, _mm512_set1_epi32((int)(2 * j))),
                                                                        base, 2));
                    if (npw > W / 2) /* an odd width: the last channel alone */
                        for (int64_t h = 0; h < 16; h++) qp[(c * npw + W / 2) * 16 + h] = h < live ? base[h * W + W - 1] : 0u;
                }
                score_rows(qp, hs, W, kv, slot, len, scale, p);
#else
                /* scores: up to 8 context rows (gathered into `rows`) against the group's query rows */
                for (int64_t l0 = 0; l0 < len; l0 += MAX_ROWS) {
                    int m = (int)(len - l0 < MAX_ROWS ? len - l0 : MAX_ROWS);
                    for (int i = 0; i < m; i++) prepare(kv + slot[l0 + i] * W, W, 1, W, rows + i * wp);
                    dot_rows(qs, W, rows, wp, W, m, 0, hn, dots, hn, NULL);
                    for (int i = 0; i < m; i++)
                        for (int64_t h = 0; h < hs; h++) p[(l0 + i) * hs + h] = h < hn ? scale * dots[i * hn + h] : 0.0f;
                }
#endif
                softmax_rows(p, hs, len);
                weigh_rows(p, hs, len, kv, slot, W, hn, C, pairs, acc, after >= 0 && after != s ? slots + after * L : NULL,
                           after >= 0 ? lens[after] : 0);
                round_bf16(acc, out + (s * H + h0) * C, hn * C);
            }
        }
        free(p);
        free(acc);
        free(pairs);
#if defined(STREAMOE_DPBF16)
        free(qp);
#else
        free(rows);
        free(dots);
#endif
    }
    return failed ? -1 : 0;
}

/* MLA's attention for a step whose T rows are all single-token decodes, in one call (MLA.forward on the
 * `decodes_only` path), the same kernels in the same order as the module's calls, so the same bits:
 * q = q_b(norm(q_a x)) (or q_proj x where qa is NULL) as [T, H, N + R], its rotary part rotated; the
 * cache row norm(latent) | rotate(k_pe) of kv_a x stored at slot_mapping[t] of the layer `pool`
 * [nslots, C + R]; the latent query W_UK q_nope | q_pe; the attention over each row's context
 * (ctx [T, L] slots, lens [T]) in place; W_UV of its output, and o_proj -> out [T, D] (contiguous).
 * x [T, D] (row stride ldx); weights with contiguous rows; uk/uv packed by pack_heads (Np_uk, Np_uv
 * outputs rounded up to 16). Returns 0, or -1 for a bad argument or no memory. */
int streamoe_mla_decode_bf16(const uint16_t *x, int64_t ldx, int64_t T, int64_t D, const uint16_t *qa, int64_t Q,
                             const uint16_t *qa_norm, float q_eps, const uint16_t *qb, int64_t H, int64_t N, int64_t R,
                             const uint16_t *kva, int64_t C, const uint16_t *kv_norm, float kv_eps,
                             const uint16_t *cos, const uint16_t *sin, int interleave, uint16_t *pool, int64_t nslots,
                             const int64_t *slot_mapping, const uint16_t *uk, int64_t Np_uk, const uint16_t *uv,
                             int64_t Np_uv, int64_t V, const int64_t *ctx, int64_t L, const int64_t *lens, float scale,
                             const uint16_t *o, uint16_t *out, int nthreads) {
    if (T < 1 || D < 1 || H < 1 || N < 1 || R < 2 || C < 1 || V < 1) return -1;
    const int64_t W = C + R, Qw = qa ? Q : 0;
    uint16_t *qa_out = malloc(sizeof(uint16_t) * (size_t)(T * (Qw + Qw + H * (N + R) + W + W + H * W + H * C + H * V)));
    if (!qa_out) return -1;
    uint16_t *qa_normed = qa_out + T * Qw, *q = qa_normed + T * Qw, *kv = q + T * H * (N + R), *rows = kv + T * W;
    uint16_t *q_abs = rows + T * W, *latent = q_abs + T * H * W, *heads_out = latent + T * H * C;
    int rc = 0;
    if (qa) {
        rc |= streamoe_linear_bf16(qa, D, x, ldx, T, D, Q, qa_out, Q, nthreads);
        rc |= streamoe_rms_norm_bf16(qa_out, Q, T, Q, qa_norm, q_eps, qa_normed, Q);
        rc |= streamoe_linear_bf16(qb, Q, qa_normed, Q, T, Q, H * (N + R), q, H * (N + R), nthreads);
    } else {
        rc |= streamoe_linear_bf16(qb, D, x, ldx, T, D, H * (N + R), q, H * (N + R), nthreads);
    }
    /* the rotary part straight into the latent query's last R channels */
    rc |= streamoe_rope_bf16(q + N, H * (N + R), N + R, T, H, R, cos, sin, interleave, q_abs + C, H * W, W);
    rc |= streamoe_linear_bf16(kva, D, x, ldx, T, D, W, kv, W, nthreads);
    rc |= streamoe_rms_norm_bf16(kv, W, T, C, kv_norm, kv_eps, rows, W);
    rc |= streamoe_rope_bf16(kv + C, W, W, T, 1, R, cos, sin, interleave, rows + C, W, W);
    if (rc == 0) rc = streamoe_store_rows_bf16(rows, W, T, W, slot_mapping, nslots, pool);
    if (rc == 0) {
        rc |= streamoe_heads_bf16(q, H * (N + R), N + R, T, H, N, uk, Np_uk, C, q_abs, H * W, W, nthreads);
        rc |= streamoe_decode_attention_bf16(q_abs, T, H, W, pool, ctx, L, lens, C, scale, latent, nthreads);
        rc |= streamoe_heads_bf16(latent, H * C, C, T, H, C, uv, Np_uv, V, heads_out, H * V, V, nthreads);
        rc |= streamoe_linear_bf16(o, H * V, heads_out, H * V, T, H * V, D, out, D, nthreads);
    }
    free(qa_out);
    return rc ? -1 : 0;
}

/* A MoE layer's feed-forward for a step, with the residual, in one call (MoE.forward_residual): the
 * gate's choice (streamoe_gate_bf16), the routed experts and their combine (streamoe_moe_bf16, the
 * slots' pairs added to `load`), the shared expert with the routed sum added (streamoe_mlp_bf16; none
 * where sg is NULL), then out = h + that, as torch adds bf16: the module's calls in the same order,
 * so the same bits. x, h, out [T, D] contiguous. Returns 0, or -1 for a bad argument or no memory. */
int streamoe_moe_block_bf16(const uint16_t *x, const uint16_t *h, int64_t T, int64_t D, const float *gw,
                            const float *bias, int64_t E, int64_t G, int64_t topk_group, int64_t K, int normalize,
                            float scale, const uint16_t *w13, const uint16_t *w2, const uint16_t *w13p,
                            const uint16_t *w2p, int64_t I, int64_t *load, const uint16_t *sg, const uint16_t *su,
                            const uint16_t *sd, int64_t Is, uint16_t *out, int nthreads) {
    if (T < 1 || D < 1 || K < 1 || K > 64) return -1;
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)(T * K));
    float *weights = malloc(sizeof(float) * (size_t)(T * K));
    uint16_t *routed = malloc(sizeof(uint16_t) * (size_t)(T * D));
    int rc = ids && weights && routed ? 0 : -1;
    if (rc == 0) rc = streamoe_gate_bf16(x, D, T, D, gw, bias, E, G, topk_group, K, normalize, scale, ids, weights, nthreads);
    if (rc == 0) rc = streamoe_moe_bf16(x, T, D, ids, weights, K, E, w13, w2, w13p, w2p, I, routed, load, nthreads);
    if (rc == 0 && sg) rc = streamoe_mlp_bf16(x, D, T, D, sg, su, Is, sd, routed, out, nthreads);
    if (rc == 0) {
        const uint16_t *y = sg ? out : routed;
#pragma omp parallel for if (T * D >= 16384) num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
        for (int64_t t = 0; t < T; t++) add_rows(h + t * D, y + t * D, out + t * D, D);
    }
    free(ids);
    free(weights);
    free(routed);
    return rc;
}

/* One decoder layer's weights for streamoe_decode_layers_bf16, as the modules hold them (the fields
 * of native.LayerWeights, every one 8 bytes wide so both sides lay them out alike). The attention is
 * streamoe_mla_decode_bf16's (qa NULL: q_proj in qb); gw not NULL: a MoE layer (streamoe_moe_block_bf16's
 * weights, sg NULL: no shared expert), else a dense MLP in sg, su, sd. */
typedef struct {
    const uint16_t *in_norm;
    double in_eps;
    const uint16_t *qa;
    int64_t Q;
    const uint16_t *qa_norm;
    double q_eps;
    const uint16_t *qb, *kva, *kv_norm;
    double kv_eps;
    const uint16_t *uk;
    int64_t Np_uk;
    const uint16_t *uv;
    int64_t Np_uv;
    const uint16_t *o, *post_norm;
    double post_eps;
    const float *gw, *bias;
    int64_t E, G, topk_group, K, normalize;
    double scale;
    const uint16_t *w13, *w2, *w13p, *w2p;
    int64_t I;
    int64_t *load;
    const uint16_t *sg, *su, *sd;
    int64_t Is;
} streamoe_layer;

/* The decoder layers of a step whose T rows are all single-token decodes, in one call (DeepseekV3.forward's
 * loop on a native plan): for each layer, x = RMSNorm(h), a = the attention (streamoe_mla_decode_bf16, into
 * pools[l] [nslots[l], C + R]), h = h + a and x = its norm (streamoe_add_rms_norm_bf16), then h = h + the
 * MoE layer (streamoe_moe_block_bf16) or h + the dense MLP (streamoe_mlp_bf16): the calls the modules make,
 * in their order, so the same bits, with no return to Python between them. h [T, D] (contiguous) in and
 * out; the model's shapes H, N, R, C, V and rotary layout; cos, sin [T, R]; the step's slots, contexts
 * (ctx [T, L], lens [T]); then normed [T, D] = RMSNorm(h) with the final norm's weight. Returns 0, or
 * -(layer + 1) where a layer's call failed (a slot outside the pool). */
int streamoe_decode_layers_bf16(const streamoe_layer *layers, int64_t n, uint16_t *h, int64_t T, int64_t D, int64_t H,
                                int64_t N, int64_t R, int64_t C, int64_t V, int interleave, double attn_scale,
                                const uint16_t *cos, const uint16_t *sin, const int64_t *slot_mapping,
                                const int64_t *ctx, int64_t L, const int64_t *lens, uint16_t *const *pools,
                                const int64_t *nslots, const uint16_t *final_norm, double final_eps,
                                uint16_t *normed, int nthreads) {
    if (n < 1 || T < 1 || D < 1) return -1;
    uint16_t *x = malloc(sizeof(uint16_t) * (size_t)(3 * T * D));
    if (!x) return -1;
    uint16_t *a = x + T * D, *s = a + T * D;
    int rc = 0;
    int64_t l = 0;
    for (; l < n && rc == 0; l++) {
        const streamoe_layer *w = &layers[l];
        rc = streamoe_rms_norm_bf16(h, D, T, D, w->in_norm, (float)w->in_eps, x, D);
        if (rc == 0)
            rc = streamoe_mla_decode_bf16(x, D, T, D, w->qa, w->Q, w->qa_norm, (float)w->q_eps, w->qb, H, N, R, w->kva,
                                          C, w->kv_norm, (float)w->kv_eps, cos, sin, interleave, pools[l], nslots[l],
                                          slot_mapping, w->uk, w->Np_uk, w->uv, w->Np_uv, V, ctx, L, lens,
                                          (float)attn_scale, w->o, a, nthreads);
        if (rc == 0) rc = streamoe_add_rms_norm_bf16(h, D, a, D, T, D, w->post_norm, (float)w->post_eps, s, D, x, D);
        if (rc == 0 && w->gw)
            rc = streamoe_moe_block_bf16(x, s, T, D, w->gw, w->bias, w->E, w->G, w->topk_group, w->K, (int)w->normalize,
                                         (float)w->scale, w->w13, w->w2, w->w13p, w->w2p, w->I, w->load, w->sg, w->su,
                                         w->sd, w->Is, h, nthreads);
        else if (rc == 0)
            rc = streamoe_mlp_bf16(x, D, T, D, w->sg, w->su, w->Is, w->sd, s, h, nthreads);
    }
    free(x);
    if (rc) return (int)-l;
    return streamoe_rms_norm_bf16(h, D, T, D, final_norm, (float)final_eps, normed, D) ? -(int)n : 0;
}

/* ---- fp32: the routed experts where the model computes in fp32 (hosts without fast bf16) ----
 *
 * The same plain loop as the bf16 dot products, for fp32 weights and rows: a few weight rows at a time,
 * each 8-lane load multiplied into every input row of a group of <= 6 while in registers (AVX2 with
 * FMA: 16 vector registers, so R weight rows x M input rows <= 12 sums), the group's sums reduced
 * across lanes once at the end. A block of R weight rows stays in L1 while every group of the slot's
 * rows meets it, so the weights are read from memory once per pass however many rows there are.
 * Without AVX2 the same order in plain C. (torch's fp32 batched products at these shapes reach ~66
 * GFLOP/s on an AVX2 EPYC, and pad each slot to the largest one's count: loadgen/README.md.) */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define STREAMOE_AVX2 1
#endif

/* 1: the fp32 loops use AVX2 with FMA, 0: plain C. */
int streamoe_native_avx2(void) {
#ifdef STREAMOE_AVX2
    return 1;
#else
    return 0;
#endif
}

#define F32_CHUNK 24 /* a slot's rows per pass (the gate/up sums of a pass: F32_CHUNK x 128 fp32) */
#define F32_GROUP 5  /* input rows met by one block of weight rows in registers */

#ifdef STREAMOE_AVX2
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Lanes [0, n) of a vector of 8 set, n in [0, 8]. */
static inline __m256i lanes8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* out[m * ldo + n + i] = sum_k x[m, k] w[n + i, k] for i < R, m < M (compile-time M, R: the sums in registers). */
static inline __attribute__((always_inline)) void dot_f32_mr(const float *w, int64_t ldw, const float *x, int64_t ldx,
                                                             int64_t K, const int M, const int R, int64_t n,
                                                             float *out, int64_t ldo) {
    __m256 acc[8][F32_GROUP];
    for (int i = 0; i < R; i++)
        for (int m = 0; m < M; m++) acc[i][m] = _mm256_setzero_ps();
    const int64_t body = K & ~(int64_t)7;
    for (int64_t k = 0; k < body; k += 8) {
        __m256 wv[8];
        if ((k & 15) == 0) /* the next block's line at this offset (a prefetch past the end does not fault) */
            for (int i = 0; i < R; i++) _mm_prefetch((const char *)(w + (n + R + i) * ldw + k), _MM_HINT_T0);
        for (int i = 0; i < R; i++) wv[i] = _mm256_loadu_ps(w + (n + i) * ldw + k);
        for (int m = 0; m < M; m++) {
            const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
            for (int i = 0; i < R; i++) acc[i][m] = _mm256_fmadd_ps(wv[i], xv, acc[i][m]);
        }
    }
    if (body < K) {
        const __m256i mask = lanes8(K - body);
        for (int i = 0; i < R; i++) {
            const __m256 wv = _mm256_maskload_ps(w + (n + i) * ldw + body, mask);
            for (int m = 0; m < M; m++)
                acc[i][m] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + m * ldx + body, mask), acc[i][m]);
        }
    }
    /* the R x M sums, four at a time (three horizontal adds and one 128-bit add for four) */
    __m256 flat[8 * F32_GROUP];
    float sums[8 * F32_GROUP];
    for (int m = 0; m < M; m++)
        for (int i = 0; i < R; i++) flat[m * R + i] = acc[i][m];
    int j = 0;
    for (; j + 4 <= R * M; j += 4) {
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(flat[j], flat[j + 1]), _mm256_hadd_ps(flat[j + 2], flat[j + 3]));
        _mm_storeu_ps(sums + j, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
    for (; j < R * M; j++) sums[j] = hsum256(flat[j]);
    for (int m = 0; m < M; m++)
        for (int i = 0; i < R; i++) out[m * ldo + n + i] = sums[m * R + i];
}

/* e^x in 8 fp32 lanes (Cephes' expf, as exp512 above; within 2 ulp), clamped to [-87.3, 88.3]. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.3762626647949f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* times 2^n: n (|n| <= 127) into the exponent field of 1.0, in two halves so 2^n never overflows */
    const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
    const __m256 s2 = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
}
#endif

/* silu(g) * u for the n fp32 pairs g[i], u[i], into g (8 at a time with AVX2: the exp within 2 ulp). */
static void silu_mul_f32(float *g, const float *u, int64_t n) {
    int64_t i = 0;
#ifdef STREAMOE_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* Weight rows per block for a group of M input rows (R x M <= 12 sums, and loads to spare). */
static inline int f32_block(int64_t M) { return M <= 1 ? 8 : M == 2 ? 4 : M == 3 ? 3 : 2; }

#ifdef STREAMOE_AVX2
#define F32_CASE(MM, RR) case MM * 16 + RR: dot_f32_mr(w, ldw, x, ldx, K, MM, RR, n, out, ldo); return;
#endif
/* One block: weight rows [n, n + R) against the M rows x (M <= F32_GROUP, R as f32_block gives, or 1). */
static void dot_f32_block(const float *w, int64_t ldw, const float *x, int64_t ldx, int64_t K, int64_t M, int R,
                          int64_t n, float *out, int64_t ldo) {
#ifdef STREAMOE_AVX2
    switch ((int)M * 16 + R) {
        F32_CASE(1, 8) F32_CASE(2, 4) F32_CASE(3, 3) F32_CASE(3, 2) F32_CASE(4, 2) F32_CASE(5, 2)
        F32_CASE(1, 1) F32_CASE(2, 1) F32_CASE(3, 1) F32_CASE(4, 1) F32_CASE(5, 1)
        default: break;
    }
#endif
    for (int i = 0; i < R; i++) { /* plain C, 8 partial sums per row as the vector lanes */
        const float *row = w + (n + i) * ldw;
        for (int64_t m = 0; m < M; m++) {
            float acc[8] = {0};
            int64_t k = 0;
            for (; k + 8 <= K; k += 8)
                for (int j = 0; j < 8; j++) acc[j] += row[k + j] * x[m * ldx + k + j];
            float s = 0.0f;
            for (int j = 0; j < 8; j++) s += acc[j];
            for (; k < K; k++) s += row[k] * x[m * ldx + k];
            out[m * ldo + n + i] = s;
        }
    }
}

/* out[m * ldo + n] = sum_k x[m, k] w[n, k] for n in [n0, n1) and every m < M: the rows in even groups of at
 * most F32_GROUP, and each block of weight rows met by every group while it is in L1. */
static void dot_f32(const float *w, int64_t ldw, const float *x, int64_t ldx, int64_t K, int64_t M, int64_t n0,
                    int64_t n1, float *out, int64_t ldo) {
    const int64_t groups = (M + F32_GROUP - 1) / F32_GROUP;
    const int R = f32_block((M + groups - 1) / groups); /* the largest group's; the others are one row smaller */
    int64_t n = n0;
    for (; n + R <= n1; n += R)
        for (int64_t g = 0, m0 = 0; g < groups; g++) {
            const int64_t rows = (M - m0) / (groups - g);
            dot_f32_block(w, ldw, x + m0 * ldx, ldx, K, rows, R, n, out + m0 * ldo, ldo);
            m0 += rows;
        }
    for (; n < n1; n++)
        for (int64_t g = 0, m0 = 0; g < groups; g++) {
            const int64_t rows = (M - m0) / (groups - g);
            dot_f32_block(w, ldw, x + m0 * ldx, ldx, K, rows, 1, n, out + m0 * ldo, ldo);
            m0 += rows;
        }
}

/* y [M, N] (row stride ldy) = x [M, K] (ldx) @ w [N, K]^T (ldw), fp32: each thread a share of the weight
 * rows, read once, met by every group of rows. Returns 0, or -1 for a bad argument. */
int streamoe_linear_f32(const float *w, int64_t ldw, const float *x, int64_t ldx, int64_t M, int64_t K, int64_t N,
                        float *y, int64_t ldy, int nthreads) {
    if (M < 1 || K < 1 || N < 1 || ldw < K || ldx < K || ldy < N) return -1;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        int64_t lo, hi;
        share(N, 8, &lo, &hi);
        if (lo < hi) dot_f32(w, ldw, x, ldx, K, M, lo, hi, y, ldy);
    }
    return 0;
}

/* One pass of M <= F32_CHUNK rows x (stride D) through gate/up rows [j0, j1) of a slot's w13 [2I, D]:
 * act [M][ip] columns [j0, j1) = silu(gate) * up, in fp32. `buf` is scratch [F32_CHUNK][128]. */
static void gate_up_f32(const float *w13, int64_t D, int64_t I, const float *x, int64_t M, int64_t j0, int64_t j1,
                        float *act, int64_t ip, float *buf) {
    for (int64_t j = j0; j < j1; j += 64) {
        const int64_t end = j + 64 < j1 ? j + 64 : j1;
        dot_f32(w13, D, x, D, D, M, j, end, buf - j, 128);               /* gate rows */
        dot_f32(w13 + I * D, D, x, D, D, M, j, end, buf + 64 - j, 128);  /* the same up rows */
        for (int64_t m = 0; m < M; m++) {
            silu_mul_f32(buf + m * 128, buf + m * 128 + 64, end - j);
            memcpy(act + m * ip + j, buf + m * 128, sizeof(float) * (size_t)(end - j));
        }
    }
}

/* Routed experts in fp32, as streamoe_experts_bf16 lays them out: xs [P, D] sorted by slot, counts [S],
 * w13 [S, 2I, D], w2 [S, D, I] -> ys [P, D]. With at least WHOLE_EXPERTS slots in use per thread each
 * thread runs whole slots (no barrier); else every thread takes a share of each slot's gate/up rows and,
 * after a barrier, of its down rows. Returns 0, or -1 for a bad argument or no memory. */
int streamoe_experts_f32(const float *xs, const int64_t *counts, int64_t S, const float *w13, const float *w2,
                         int64_t D, int64_t I, float *ys, int nthreads) {
    if (S < 1 || D < 1 || I < 1) return -1;
    for (int64_t s = 0; s < S; s++)
        if (counts[s] < 0) return -1;
    const int threads = nthreads > 0 ? nthreads : 1;
    int64_t used = 0;
    for (int64_t s = 0; s < S; s++) used += counts[s] > 0;
    const int whole = used >= WHOLE_EXPERTS * threads;
    const int64_t ip = I;
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(S + 1)), *order = malloc(sizeof(int64_t) * (size_t)(used + 1));
    float *act = malloc(sizeof(float) * (size_t)((whole ? threads : 2) * F32_CHUNK * ip));
    if (!act || !first || !order) {
        free(act);
        free(first);
        free(order);
        return -1;
    }
    for (int64_t s = 0, n = 0; s < S; s++) {
        first[s + 1] = (first[s] = s ? first[s - 1] + counts[s - 1] : 0) + counts[s];
        if (counts[s] > 0) order[n++] = s;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *buf = malloc(sizeof(float) * (size_t)(F32_CHUNK * 128));
#pragma omp atomic
        failed += !buf;
#pragma omp barrier
        if (!failed && whole) {
#ifdef _OPENMP
            float *a = act + omp_get_thread_num() * F32_CHUNK * ip;
#else
            float *a = act;
#endif
#pragma omp for schedule(dynamic, 1)
            for (int64_t u = 0; u < used; u++) {
                const int64_t s = order[u];
                for (int64_t r0 = 0; r0 < counts[s]; r0 += F32_CHUNK) {
                    const int64_t M = counts[s] - r0 < F32_CHUNK ? counts[s] - r0 : F32_CHUNK;
                    gate_up_f32(w13 + s * 2 * I * D, D, I, xs + (first[s] + r0) * D, M, 0, I, a, ip, buf);
                    dot_f32(w2 + s * D * I, I, a, ip, I, M, 0, D, ys + (first[s] + r0) * D, D);
                }
            }
        } else if (!failed) {
            int64_t lo_i, hi_i, lo_d, hi_d, chunk = 0;
            share(I, 8, &lo_i, &hi_i);
            share(D, 8, &lo_d, &hi_d);
            for (int64_t u = 0; u < used; u++) {
                const int64_t s = order[u];
                for (int64_t r0 = 0; r0 < counts[s]; r0 += F32_CHUNK, chunk++) {
                    const int64_t M = counts[s] - r0 < F32_CHUNK ? counts[s] - r0 : F32_CHUNK;
                    float *a = act + (chunk & 1) * F32_CHUNK * ip; /* two passes' worth: one barrier a pass */
                    gate_up_f32(w13 + s * 2 * I * D, D, I, xs + (first[s] + r0) * D, M, lo_i, hi_i, a, ip, buf);
#pragma omp barrier
                    dot_f32(w2 + s * D * I, I, a, ip, I, M, lo_d, hi_d, ys + (first[s] + r0) * D, D);
                }
            }
        }
        free(buf);
    }
    free(act);
    free(first);
    free(order);
    return failed ? -1 : 0;
}

/* A routed MoE layer in fp32 from its routing, as streamoe_moe_bf16 (the pairs sorted by slot, stable;
 * streamoe_experts_f32; each token's outputs combined in slot order, the first product then one product
 * added at a time, as experts.combine does; no rounding to bf16): x [T, D], ids [T, K], weights [T, K]
 * -> out [T, D]; each slot's pair count added to load [S] where given. Returns 0, or -1. */
int streamoe_moe_f32(const float *x, int64_t T, int64_t D, const int64_t *ids, const float *weights, int64_t K,
                     int64_t S, const float *w13, const float *w2, int64_t I, float *out, int64_t *load,
                     int nthreads) {
    if (T < 1 || D < 1 || K < 1 || K > 64 || S < 1 || I < 1) return -1;
    const int64_t P = T * K;
    for (int64_t i = 0; i < P; i++)
        if (ids[i] < 0 || ids[i] >= S) return -1;
    int64_t *counts = calloc((size_t)S, sizeof(int64_t)), *row = malloc(sizeof(int64_t) * (size_t)P);
    int64_t *next = malloc(sizeof(int64_t) * (size_t)S);
    float *xs = malloc(sizeof(float) * (size_t)(P * D)), *ys = malloc(sizeof(float) * (size_t)(P * D));
    int rc = -1;
    if (counts && row && next && xs && ys) {
        for (int64_t i = 0; i < P; i++) counts[ids[i]]++;
        if (load)
            for (int64_t e = 0; e < S; e++) load[e] += counts[e];
        for (int64_t s = 0, start = 0; s < S; s++) {
            next[s] = start;
            start += counts[s];
        }
        for (int64_t i = 0; i < P; i++) { /* pair i = (token i / K, its k-th expert) */
            row[i] = next[ids[i]]++;
            memcpy(xs + row[i] * D, x + (i / K) * D, sizeof(float) * (size_t)D);
        }
        rc = streamoe_experts_f32(xs, counts, S, w13, w2, D, I, ys, nthreads);
    }
    if (rc == 0) {
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
        for (int64_t t = 0; t < T; t++) {
            int64_t order[64]; /* this token's pairs by slot (a token's slots are distinct) */
            for (int64_t k = 0; k < K; k++) {
                int64_t j = k;
                for (; j > 0 && ids[t * K + order[j - 1]] > ids[t * K + k]; j--) order[j] = order[j - 1];
                order[j] = k;
            }
            float *o = out + t * D;
            for (int64_t k = 0; k < K; k++) {
                const int64_t pair = t * K + order[k];
                const float *y = ys + row[pair] * D;
                const float w = weights[pair];
                if (k == 0)
                    for (int64_t d = 0; d < D; d++) o[d] = y[d] * w;
                else
                    for (int64_t d = 0; d < D; d++) {
                        const float product = y[d] * w;
                        o[d] = o[d] + product;
                    }
            }
        }
    }
    free(counts);
    free(row);
    free(next);
    free(xs);
    free(ys);
    return rc;
}
