/* The register-blocked GEMM micro-kernels shared by the Cython matmul and conv2d chapters.
 *
 * What this file teaches: the innermost loop of a BLIS/GotoBLAS GEMM. A micro-kernel computes
 * one MR x NR block of C as a sum of kc rank-1 updates,
 *
 *     C[0:MR, 0:NR] (+)= sum_p  Ap[p, 0:MR]^T  Bp[p, 0:NR]
 *
 * where Ap is an MR-row sliver of A and Bp an NR-column sliver of B, both *packed* by the
 * caller into contiguous, 64-byte aligned buffers (Ap: kc x MR, Bp: kc x NR, p-major), so the
 * kernel streams two unit-stride arrays and touches nothing else until the write-back.
 *
 * Register budget (AVX-512, float32): 32 zmm registers of 16 floats. With NR = 32 = 2 zmm per
 * row of C and MR = 8 rows, the C block is 16 accumulators; each p step loads 2 zmm of B,
 * broadcasts 8 values of A and issues 16 independent FMAs. This core has 2 FMA ports with a
 * latency of 4 cycles, so >= 2 x 4 = 8 independent accumulator chains are needed to keep both
 * ports busy; 16 leaves slack. MR = 8 (not 12 or 14) because conv output-channel counts are
 * multiples of 8 (64 ... 512), so the M edge wastes nothing (chosen by measurement, see
 * gemm.pxi). float64 uses the same shape with 8 doubles per zmm (NR = 16).
 * AVX2 (16 ymm registers): MR = 6, NR = 16 floats / 8 doubles -> 12 accumulators.
 * Without either ISA a portable scalar C kernel with the same MR x NR runs instead.
 *
 * Epilogue: on the last kc block the caller passes the bias of the MR rows (or NULL) and the
 * ReLU flag; they are applied while the C block is still in registers, before the one store.
 * ReLU is max(0, x) with the operands ordered so that NaN propagates (x86 max returns its
 * second operand when either is NaN), matching numpy.maximum(x, 0).
 *
 * Edges: packed slivers are zero-padded to MR rows / NR columns, so the kernel always
 * computes a full block; only the write-back honours mr <= MR rows and nr <= NR columns
 * (masked stores on AVX-512).
 */
#ifndef FASTOPS_MICROKERNEL_H
#define FASTOPS_MICROKERNEL_H

#include <stddef.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FO_X86 1
#else
#define FO_X86 0
#endif

#if FO_X86 && defined(__AVX512F__)
#define FO_ISA_NAME "avx512"
#define FO_MR_F 8
#define FO_NR_F 32
#define FO_MR_D 8
#define FO_NR_D 16
#elif FO_X86 && defined(__AVX2__) && defined(__FMA__)
#define FO_ISA_NAME "avx2"
#define FO_MR_F 6
#define FO_NR_F 16
#define FO_MR_D 6
#define FO_NR_D 8
#else
#define FO_ISA_NAME "portable"
#define FO_MR_F 4
#define FO_NR_F 16
#define FO_MR_D 4
#define FO_NR_D 8
#endif

/* ------------------------------------------------------------------ ISA safety at run time
 * The extension is built for the CPU it was installed on (-march=native). Bits of what the
 * compiler was allowed to use, and of what the running CPU supports; the Cython side compares
 * them at import and disables the intrinsic kernels (fo_simd_enabled = 0) on a mismatch. */
enum { FO_HAS_AVX2 = 1, FO_HAS_FMA = 2, FO_HAS_AVX512F = 4 };

static int fo_compiled_isa(void) {
    int bits = 0;
#if defined(__AVX2__)
    bits |= FO_HAS_AVX2;
#endif
#if defined(__FMA__)
    bits |= FO_HAS_FMA;
#endif
#if defined(__AVX512F__)
    bits |= FO_HAS_AVX512F;
#endif
    return bits;
}

static int fo_runtime_isa(void) {
    int bits = 0;
#if FO_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) bits |= FO_HAS_AVX2;
    if (__builtin_cpu_supports("fma")) bits |= FO_HAS_FMA;
    if (__builtin_cpu_supports("avx512f")) bits |= FO_HAS_AVX512F;
#endif
    return bits;
}

/* One flag per extension module (each module compiles its own copy of this header). */
static int fo_simd_enabled = 1;

/* ------------------------------------------------------------------ portable kernels
 * Plain C over the same packed layout and the same MR x NR (so packing code never changes),
 * compiled for baseline x86-64 so it is safe to run on a CPU that lacks the build's ISA. */
#if FO_X86 && defined(__GNUC__) && !defined(__clang__)
#define FO_BASELINE __attribute__((noinline, target("arch=x86-64")))
#else
#define FO_BASELINE __attribute__((noinline))
#endif

#define FO_DEFINE_PORTABLE(NAME, T, MR, NR)                                                    \
    FO_BASELINE static void NAME(long kc, const T *Ap, long a_rs, long a_ks, const T *Bp, T *C, \
                                 long ldc, int mr, int nr, int first, const T *bias,           \
                                 int relu) {                                                   \
        T acc[MR][NR];                                                                         \
        for (int i = 0; i < MR; i++)                                                           \
            for (int j = 0; j < NR; j++) acc[i][j] = 0;                                        \
        for (long p = 0; p < kc; p++)                                                          \
            for (int i = 0; i < mr; i++) {                                                     \
                T a = Ap[i * a_rs + p * a_ks];                                                 \
                for (int j = 0; j < NR; j++) acc[i][j] += a * Bp[p * NR + j];                  \
            }                                                                                  \
        for (int i = 0; i < mr; i++) {                                                         \
            T *row = C + (long)i * ldc;                                                        \
            for (int j = 0; j < nr; j++) {                                                     \
                T v = first ? acc[i][j] : row[j] + acc[i][j];                                  \
                if (bias) v += bias[i];                                                        \
                if (relu && !(v > 0) && v == v) v = 0; /* NaN stays NaN */                     \
                row[j] = v;                                                                    \
            }                                                                                  \
        }                                                                                      \
    }

FO_DEFINE_PORTABLE(fo_ukernel_f_portable, float, FO_MR_F, FO_NR_F)
FO_DEFINE_PORTABLE(fo_ukernel_d_portable, double, FO_MR_D, FO_NR_D)

/* ------------------------------------------------------------------ AVX-512 kernels */
#if FO_X86 && defined(__AVX512F__)

/* Prefetch (for writing) the mr rows x 128 bytes of the C tile a micro-kernel call ends on,
 * before its k loop: the write-back reads C back (every KC block but the first) and stores
 * it, and a large C (2048^2 float32: 16 MiB, revisited once per KC block) is no longer in
 * cache by then; issued first, the misses overlap the loop's FMAs. Three addresses per row
 * cover its 128 bytes however the row is aligned. Measured (matmul tiled vs numpy.matmul
 * interleaved in one process, builds with and without alternating, medians, load ~1):
 * 1 thread, 1024^3 93.6-93.7 -> 98.5-99.1 GF/s (0.94 -> 1.00x NumPy), 2048^3 93.7-93.8 ->
 * 101.0-101.2 (0.91 -> 1.01x); 2 threads, 2048^3 0.90-0.94 -> 0.96-1.00x over 3 runs each.
 * Fused conv shapes on this kernel (1x1, 3x3/2, stem; 1 thread) unchanged or faster. */
static inline void fo_prefetch_c(const void *C, long ldc_bytes, int mr) {
    for (int i = 0; i < mr; i++) {
        const char *row = (const char *)C + i * ldc_bytes;
        __builtin_prefetch(row, 1, 3);
        __builtin_prefetch(row + 64, 1, 3);
        __builtin_prefetch(row + 127, 1, 3);
    }
}

/* float32: 8 rows x 32 columns = 16 zmm accumulators; A broadcast from the packed sliver. */
static inline void fo_ukernel_f_simd(long kc, const float *restrict Ap, long a_rs, long a_ks,
                                     const float *restrict Bp, float *C, long ldc, int mr,
                                     int nr, int first, const float *bias, int relu) {
    __m512 c0[FO_MR_F], c1[FO_MR_F];
    const float *ar[FO_MR_F]; /* row i of the A sliver; rows past mr repeat row mr-1 */
#pragma GCC unroll 8
    for (int i = 0; i < FO_MR_F; i++) {
        c0[i] = c1[i] = _mm512_setzero_ps();
        ar[i] = Ap + (long)(i < mr ? i : mr - 1) * a_rs;
    }
    fo_prefetch_c(C, ldc * (long)sizeof(float), mr);
    for (long p = 0; p < kc; p++) {
        __m512 b0 = _mm512_load_ps(Bp + p * FO_NR_F);
        __m512 b1 = _mm512_load_ps(Bp + p * FO_NR_F + 16);
#pragma GCC unroll 8
        for (int i = 0; i < FO_MR_F; i++) {
            __m512 a = _mm512_set1_ps(ar[i][p * a_ks]);
            c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        }
    }
    /* Write-back: masks select the nr valid columns of the two 16-lane halves. */
    int n0 = nr < 16 ? nr : 16, n1 = nr > 16 ? nr - 16 : 0;
    __mmask16 m0 = (__mmask16)((1u << n0) - 1u), m1 = (__mmask16)((1u << n1) - 1u);
    __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < FO_MR_F; i++) {
        if (i >= mr) break;
        float *row = C + (long)i * ldc;
        __m512 v0 = c0[i], v1 = c1[i];
        if (!first) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row + 16));
        }
        if (bias) {
            __m512 bv = _mm512_set1_ps(bias[i]);
            v0 = _mm512_add_ps(v0, bv);
            v1 = _mm512_add_ps(v1, bv);
        }
        if (relu) { /* max(0, v): returns v when v is NaN */
            v0 = _mm512_max_ps(zero, v0);
            v1 = _mm512_max_ps(zero, v1);
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row + 16, m1, v1);
    }
}

/* float64: 8 rows x 16 columns (2 zmm of 8 doubles per row) = 16 accumulators. */
static inline void fo_ukernel_d_simd(long kc, const double *restrict Ap, long a_rs, long a_ks,
                                     const double *restrict Bp, double *C, long ldc, int mr,
                                     int nr, int first, const double *bias, int relu) {
    __m512d c0[FO_MR_D], c1[FO_MR_D];
    const double *ar[FO_MR_D];
#pragma GCC unroll 8
    for (int i = 0; i < FO_MR_D; i++) {
        c0[i] = c1[i] = _mm512_setzero_pd();
        ar[i] = Ap + (long)(i < mr ? i : mr - 1) * a_rs;
    }
    fo_prefetch_c(C, ldc * (long)sizeof(double), mr);
    for (long p = 0; p < kc; p++) {
        __m512d b0 = _mm512_load_pd(Bp + p * FO_NR_D);
        __m512d b1 = _mm512_load_pd(Bp + p * FO_NR_D + 8);
#pragma GCC unroll 8
        for (int i = 0; i < FO_MR_D; i++) {
            __m512d a = _mm512_set1_pd(ar[i][p * a_ks]);
            c0[i] = _mm512_fmadd_pd(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_pd(a, b1, c1[i]);
        }
    }
    int n0 = nr < 8 ? nr : 8, n1 = nr > 8 ? nr - 8 : 0;
    __mmask8 m0 = (__mmask8)((1u << n0) - 1u), m1 = (__mmask8)((1u << n1) - 1u);
    __m512d zero = _mm512_setzero_pd();
#pragma GCC unroll 8
    for (int i = 0; i < FO_MR_D; i++) {
        if (i >= mr) break;
        double *row = C + (long)i * ldc;
        __m512d v0 = c0[i], v1 = c1[i];
        if (!first) {
            v0 = _mm512_add_pd(v0, _mm512_maskz_loadu_pd(m0, row));
            v1 = _mm512_add_pd(v1, _mm512_maskz_loadu_pd(m1, row + 8));
        }
        if (bias) {
            __m512d bv = _mm512_set1_pd(bias[i]);
            v0 = _mm512_add_pd(v0, bv);
            v1 = _mm512_add_pd(v1, bv);
        }
        if (relu) {
            v0 = _mm512_max_pd(zero, v0);
            v1 = _mm512_max_pd(zero, v1);
        }
        _mm512_mask_storeu_pd(row, m0, v0);
        _mm512_mask_storeu_pd(row + 8, m1, v1);
    }
}

/* ------------------------------------------------------------------ AVX2 kernels */
#elif FO_X86 && defined(__AVX2__) && defined(__FMA__)

/* Write one row of an AVX2 block: full rows with vector stores, partial rows via a buffer. */
#define FO_DEFINE_AVX2(NAME, T, VT, W, MR, NR, LOAD, LOADU, STOREU, SET1, FMA, ADD, MAX, ZERO)  \
    static inline void NAME(long kc, const T *restrict Ap, long a_rs, long a_ks,                \
                            const T *restrict Bp, T *C, long ldc, int mr, int nr, int first,   \
                            const T *bias, int relu) {                                         \
        VT c0[MR], c1[MR];                                                                     \
        const T *ar[MR];                                                                       \
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                                 \
            c0[i] = c1[i] = ZERO();                                                            \
            ar[i] = Ap + (long)(i < mr ? i : mr - 1) * a_rs;                                   \
        }                                                                                      \
        for (long p = 0; p < kc; p++) {                                                        \
            VT b0 = LOAD(Bp + p * NR), b1 = LOAD(Bp + p * NR + W);                             \
            _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                             \
                VT a = SET1(ar[i][p * a_ks]);                                                  \
                c0[i] = FMA(a, b0, c0[i]);                                                     \
                c1[i] = FMA(a, b1, c1[i]);                                                     \
            }                                                                                  \
        }                                                                                      \
        T tmp[NR] __attribute__((aligned(32)));                                                \
        for (int i = 0; i < mr; i++) {                                                         \
            T *row = C + (long)i * ldc;                                                        \
            T *dst = nr == NR ? row : tmp;                                                     \
            if (!first && nr != NR) memcpy(tmp, row, sizeof(T) * nr);                          \
            VT v0 = c0[i], v1 = c1[i];                                                         \
            if (!first) { v0 = ADD(v0, LOADU(dst)); v1 = ADD(v1, LOADU(dst + W)); }            \
            if (bias) { VT bv = SET1(bias[i]); v0 = ADD(v0, bv); v1 = ADD(v1, bv); }           \
            if (relu) { v0 = MAX(ZERO(), v0); v1 = MAX(ZERO(), v1); }                          \
            STOREU(dst, v0);                                                                   \
            STOREU(dst + W, v1);                                                               \
            if (nr != NR) memcpy(row, tmp, sizeof(T) * nr);                                    \
        }                                                                                      \
    }

FO_DEFINE_AVX2(fo_ukernel_f_simd, float, __m256, 8, FO_MR_F, FO_NR_F, _mm256_load_ps,
               _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps,
               _mm256_add_ps, _mm256_max_ps, _mm256_setzero_ps)
FO_DEFINE_AVX2(fo_ukernel_d_simd, double, __m256d, 4, FO_MR_D, FO_NR_D, _mm256_load_pd,
               _mm256_loadu_pd, _mm256_storeu_pd, _mm256_set1_pd, _mm256_fmadd_pd,
               _mm256_add_pd, _mm256_max_pd, _mm256_setzero_pd)

#else
#define fo_ukernel_f_simd fo_ukernel_f_portable
#define fo_ukernel_d_simd fo_ukernel_d_portable
#endif


#if FO_X86 && defined(__AVX512F__)
#define FO_HAVE_SKINNY 1

/* ------------------------------------------------------------------ one row (M = 1): GEMV
 * C[0, 0:nc] = A[0, :] @ B[:, 0:nc], B read in place. A single row of A gives each element
 * of B one FMA, so this is bound by how fast B streams in. The loop reads U = 8 whole rows
 * of B at a time (k .. k+7), each over the full column range nc (a few KiB contiguous per
 * row, which the hardware prefetcher follows), into C's row (nc <= SKINNY_COLUMNS, in L1):
 * per vector of columns 8 loads of B, one load + one store of C, 8 FMAs. Walking B down
 * 64-column strips with register accumulators (the fo_skinny kernel below) touches 4 lines
 * per 4 KiB page of B and measured 0.72x of OpenBLAS on 1 x 2048 x 1000; this kernel 1.0x.
 * (For 2-4 rows fo_skinny wins again: 1.3x vs 0.8x on 4 x 2048 x 1000, since it reuses
 * each B vector from a register for every row instead of re-loading/storing C per row.) */
#define FO_DEFINE_GEMV(NAME, T, VT, L, MASKT, SET1, ZERO, LOADU, MLOADU, FMA, STOREU, MSTOREU) \
    static inline __attribute__((always_inline)) void NAME##_step(                             \
        const int m, const int U, const T *A, long lda, long k, const T *B, long ldb, T *C,    \
        long ldc, long nc) {                                                                   \
        VT a[4][8];                                                                            \
        for (int i = 0; i < m; i++)                                                            \
            for (int u = 0; u < U; u++) a[i][u] = SET1(A[i * lda + k + u]);                    \
        const T *brow = B + k * ldb;                                                           \
        long j = 0;                                                                            \
        for (; j + L <= nc; j += L) {                                                          \
            VT b[8];                                                                           \
            for (int u = 0; u < U; u++) b[u] = LOADU(brow + u * ldb + j);                      \
            for (int i = 0; i < m; i++) {                                                      \
                VT o = LOADU(C + i * ldc + j);                                                 \
                for (int u = 0; u < U; u++) o = FMA(a[i][u], b[u], o);                         \
                STOREU(C + i * ldc + j, o);                                                    \
            }                                                                                  \
        }                                                                                      \
        if (j < nc) { /* the last partial vector: masked loads and stores */                   \
            MASKT mk = (MASKT)((1u << (nc - j)) - 1u);                                         \
            VT b[8];                                                                           \
            for (int u = 0; u < U; u++) b[u] = MLOADU(mk, brow + u * ldb + j);                 \
            for (int i = 0; i < m; i++) {                                                      \
                VT o = MLOADU(mk, C + i * ldc + j);                                            \
                for (int u = 0; u < U; u++) o = FMA(a[i][u], b[u], o);                         \
                MSTOREU(C + i * ldc + j, mk, o);                                               \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    static inline __attribute__((always_inline)) void NAME##_m(                                \
        const int m, const int U, long K, const T *A, long lda, const T *B, long ldb, T *C,    \
        long ldc, long nc) {                                                                   \
        for (int i = 0; i < m; i++) memset(C + i * ldc, 0, sizeof(T) * nc);                    \
        long k = 0;                                                                            \
        for (; k + U <= K; k += U) NAME##_step(m, U, A, lda, k, B, ldb, C, ldc, nc);           \
        for (; k < K; k++) NAME##_step(m, 1, A, lda, k, B, ldb, C, ldc, nc);                   \
    }                                                                                          \
    static void NAME(long K, const T *A, const T *B, long ldb, T *C, long nc) {                \
        NAME##_m(1, 8, K, A, 0, B, ldb, C, 0, nc);                                             \
    }

FO_DEFINE_GEMV(fo_gemv_f, float, __m512, 16, __mmask16, _mm512_set1_ps, _mm512_setzero_ps,
                 _mm512_loadu_ps, _mm512_maskz_loadu_ps, _mm512_fmadd_ps, _mm512_storeu_ps,
                 _mm512_mask_storeu_ps)
FO_DEFINE_GEMV(fo_gemv_d, double, __m512d, 8, __mmask8, _mm512_set1_pd, _mm512_setzero_pd,
                 _mm512_loadu_pd, _mm512_maskz_loadu_pd, _mm512_fmadd_pd, _mm512_storeu_pd,
                 _mm512_mask_storeu_pd)

/* ------------------------------------------------------------------ skinny rows (M < MR)
 * out[0:m, 0:nc] = A[0:m, :] @ B[:, 0:nc] for m <= 3 rows and nc <= 4 vectors of columns,
 * B read in place (no packing): a GEMV-like product streams B once, so packing it would
 * double the memory traffic. The accumulators stay in registers over the whole K loop:
 * 2 (k, k+1 interleaved) x m x 4 vectors, i.e. 8 independent FMA chains even for m = 1
 * (2 FMA ports x latency 4). The row count is a compile-time constant in each instance. */
#define FO_DEFINE_SKINNY(NAME, T, VT, L, MASKT, SET1, ZERO, LOADU, FMA, ADD, STOREU)            \
    static inline __attribute__((always_inline)) void NAME##_m(                                \
        const int m, long K, const T *A, long lda, const T *B, long ldb, T *C, long ldc,       \
        long nc) {                                                                             \
        VT acc[2][3][4];                                                                       \
        MASKT mk[4];                                                                           \
        for (int v = 0; v < 4; v++) {                                                          \
            long cols = nc - (long)v * L;                                                      \
            cols = cols < 0 ? 0 : (cols > L ? L : cols);                                       \
            mk[v] = (MASKT)((1u << cols) - 1u);                                                \
            for (int i = 0; i < 3; i++) acc[0][i][v] = acc[1][i][v] = ZERO();                  \
        }                                                                                      \
        long k = 0;                                                                            \
        for (; k < K; k += 2) {                                                                \
            int steps = k + 1 < K ? 2 : 1;                                                     \
            for (int u = 0; u < steps; u++) {                                                  \
                const T *brow = B + (k + u) * ldb;                                             \
                VT b[4];                                                                       \
                for (int v = 0; v < 4; v++) b[v] = LOADU(mk[v], brow + v * L);                 \
                for (int i = 0; i < m; i++) {                                                  \
                    VT a = SET1(A[i * lda + k + u]);                                           \
                    for (int v = 0; v < 4; v++) acc[u][i][v] = FMA(a, b[v], acc[u][i][v]);     \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int i = 0; i < m; i++)                                                            \
            for (int v = 0; v < 4; v++)                                                        \
                STOREU(C + i * ldc + v * L, mk[v], ADD(acc[0][i][v], acc[1][i][v]));           \
    }                                                                                          \
    static void NAME(int m, long K, const T *A, long lda, const T *B, long ldb, T *C,          \
                     long ldc, long nc) {                                                      \
        if (m == 1) NAME##_m(1, K, A, lda, B, ldb, C, ldc, nc);                                \
        else if (m == 2) NAME##_m(2, K, A, lda, B, ldb, C, ldc, nc);                           \
        else NAME##_m(3, K, A, lda, B, ldb, C, ldc, nc);                                       \
    }

FO_DEFINE_SKINNY(fo_skinny_f, float, __m512, 16, __mmask16, _mm512_set1_ps, _mm512_setzero_ps,
                 _mm512_maskz_loadu_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_mask_storeu_ps)
FO_DEFINE_SKINNY(fo_skinny_d, double, __m512d, 8, __mmask8, _mm512_set1_pd, _mm512_setzero_pd,
                 _mm512_maskz_loadu_pd, _mm512_fmadd_pd, _mm512_add_pd, _mm512_mask_storeu_pd)
#else
#define FO_HAVE_SKINNY 0
static void fo_gemv_f(long K, const float *A, const float *B, long ldb, float *C, long nc) {}
static void fo_gemv_d(long K, const double *A, const double *B, long ldb, double *C, long nc) {}
static void fo_skinny_f(int m, long K, const float *A, long lda, const float *B, long ldb,
                        float *C, long ldc, long nc) {}
static void fo_skinny_d(int m, long K, const double *A, long lda, const double *B, long ldb,
                        double *C, long ldc, long nc) {}
#endif

/* ------------------------------------------------------------------ image runs (packing)
 * fo_copy_run_*(dst, row, iw0, sw, W, run, lo, hi): dst[t] = row[iw0 + t*sw] for
 * lo <= t < hi (the columns inside the image) and 0 for the other t < run: one output row's
 * piece of a packed B sliver row in the implicit-GEMM conv (gemm.pxi, pack_b). Runs are
 * short (<= NR = 32 floats, often 7-28), so instead of memcpy/memset calls and a scalar
 * strided loop, each 16-lane piece is one masked load (zeros where the column is padding;
 * masked-off lanes never fault) and one masked store. Stride 2 (the 7x7/2 stem, 1x1/2
 * downsampling) loads two vectors and keeps the even lanes with one permute. Returns 0 when
 * it has no vector code for the case (the caller runs its scalar loop). */
#if FO_X86 && defined(__AVX512F__)
static inline __mmask16 fo_bits16(long from, long to) { /* lanes [from, to) of 0..15 */
    from = from < 0 ? 0 : (from > 16 ? 16 : from);
    to = to < 0 ? 0 : (to > 16 ? 16 : to);
    return to <= from ? 0 : (__mmask16)(((1u << to) - 1u) & ~((1u << from) - 1u));
}
static inline __mmask8 fo_bits8(long from, long to) {
    return (__mmask8)(fo_bits16(from, to > 8 ? 8 : to) & 0xff);
}
#define FO_DEFINE_COPY_RUN(NAME, T, VT, L, MASKT, BITS, MLOADU, MSTOREU, PERMUTE2, EVEN)        \
    static inline int NAME(T *dst, const T *row, long iw0, int sw, long W, long run, long lo,   \
                           long hi) {                                                          \
        if (!fo_simd_enabled || (sw != 1 && sw != 2)) return 0;                                \
        for (long t0 = 0; t0 < run; t0 += L) {                                                 \
            MASKT keep = BITS(lo - t0, hi - t0), store = BITS(0, run - t0);                    \
            VT v;                                                                              \
            if (sw == 1) {                                                                     \
                v = MLOADU(keep, row + iw0 + t0);                                              \
            } else { /* source columns c = iw0 + 2*t0 + q, q < 2L; even q are the outputs */   \
                long c0 = iw0 + 2 * t0;                                                        \
                VT lo_v = MLOADU(BITS(-c0, W - c0), row + c0);                                 \
                VT hi_v = MLOADU(BITS(-c0 - L, W - c0 - L), row + c0 + L);                     \
                v = PERMUTE2(lo_v, EVEN, hi_v); /* padding columns were loaded as 0 */         \
            }                                                                                  \
            MSTOREU(dst + t0, store, v);                                                       \
        }                                                                                      \
        return 1;                                                                              \
    }
FO_DEFINE_COPY_RUN(fo_copy_run_f, float, __m512, 16, __mmask16, fo_bits16, _mm512_maskz_loadu_ps,
                   _mm512_mask_storeu_ps, _mm512_permutex2var_ps,
                   _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30))
FO_DEFINE_COPY_RUN(fo_copy_run_d, double, __m512d, 8, __mmask8, fo_bits8, _mm512_maskz_loadu_pd,
                   _mm512_mask_storeu_pd, _mm512_permutex2var_pd,
                   _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14))
#else
static inline int fo_copy_run_f(float *dst, const float *row, long iw0, int sw, long W, long run,
                                long lo, long hi) { return 0; }
static inline int fo_copy_run_d(double *dst, const double *row, long iw0, int sw, long W,
                                long run, long lo, long hi) { return 0; }
#endif

/* ------------------------------------------------------------------ B read in place (conv)
 * The stride-1 conv's "direct" variant of the micro-kernel (gemm.pxi, B source kind 2).
 * On a zero-padded image xp (C, Hp, Wp), reduction row p = (c, r, s) of the implicit GEMM
 * is xp[c, oh + r*dh, ow + s*dw] = xp_flat[boff[p] + j'] with j' = oh * Wp + ow: every row
 * of B is one contiguous run of the padded image, so no packing at all. The GEMM runs over
 * the padded pixel grid (Ho x Wp); the Wp - Wo columns past each output row are computed
 * and dropped. Per k step the kernel loads 2 vectors of B at xp + boff[p] + j0 (unaligned,
 * from L1/L2; masked past the last column so nothing beyond the image is read) and 8
 * broadcasts of A: the same 16 FMAs as fo_ukernel_*. The write-back scatters the tile's
 * columns by segments (one per output row the tile crosses): lanes [lo, hi) of every C row
 * go to C + dest + (lane - lo), via masked loads/stores at the shifted pointer. */
typedef struct {
    int lo, hi; /* tile columns [lo, hi) ... */
    long dest;  /* ... land at C row + dest + (lane - lo) */
} fo_seg;

#if FO_X86 && defined(__AVX512F__)
#define FO_HAVE_DIRECT 1
#define FO_DEFINE_DIRECT(NAME, T, VT, L, MR, NV, MASKT, BITS, SET1, ZERO, LOADU, MLOADU, FMA, ADD, \
                         MAX, MSTOREU)                                                          \
    static inline __attribute__((always_inline)) VT NAME##_finish(VT v, const T *d, MASKT m,    \
                                                                  int first, const T *bias,     \
                                                                  int i, int relu) {            \
        if (!first) v = ADD(v, MLOADU(m, d));                                                   \
        if (bias) v = ADD(v, SET1(bias[i]));                                                    \
        if (relu) v = MAX(ZERO(), v); /* max(0, NaN) = NaN */                                   \
        return v;                                                                               \
    }                                                                                           \
    static inline __attribute__((always_inline)) void NAME##_loop(                              \
        const int masked, const int nv, long kc, const T **ar, long a_ks, const T *B0,          \
        const int *boff, const MASKT *m, VT (*acc)[NV]) {                                       \
        for (long p = 0; p < kc; p++) {                                                         \
            const T *bp = B0 + boff[p];                                                         \
            VT b[NV];                                                                           \
            _Pragma("GCC unroll 4") for (int v = 0; v < nv; v++)                                \
                b[v] = masked ? MLOADU(m[v], bp + v * L) : LOADU(bp + v * L);                   \
            _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                              \
                VT a = SET1(ar[i][p * a_ks]);                                                   \
                _Pragma("GCC unroll 4") for (int v = 0; v < nv; v++)                            \
                    acc[i][v] = FMA(a, b[v], acc[i][v]);                                        \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    static void NAME(long kc, const T *restrict Ap, long a_rs, long a_ks, const T *B0,          \
                     const int *boff, int ncols, T *C, long ldc, const fo_seg *seg, int nseg,   \
                     int mr, int first, const T *bias, int relu) {                              \
        VT acc[MR][NV];                                                                         \
        const T *ar[MR];                                                                        \
        MASKT m[NV];                                                                            \
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                                  \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] = ZERO();            \
            ar[i] = Ap + (long)(i < mr ? i : mr - 1) * a_rs;                                    \
        }                                                                                       \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) m[v] = BITS(0, ncols - v * L);    \
        if (ncols == NV * L) /* full tile: plain unaligned loads */                             \
            NAME##_loop(0, NV, kc, ar, a_ks, B0, boff, m, acc);                                 \
        else if (ncols <= L) /* one vector of columns: half the FMAs (acc[i][1..] stay 0) */    \
            NAME##_loop(1, 1, kc, ar, a_ks, B0, boff, m, acc);                                  \
        else                                                                                    \
            NAME##_loop(1, NV, kc, ar, a_ks, B0, boff, m, acc);                                 \
        /* i and v unrolled (constant register indices: a runtime index would put the       \
         * accumulators on the stack for the whole k loop). */                                  \
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                                  \
            if (i >= mr) break;                                                                 \
            for (int g = 0; g < nseg; g++) {                                                    \
                T *d = C + (long)i * ldc + seg[g].dest - seg[g].lo; /* lane l -> d + l */       \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                          \
                    MASKT sv = BITS(seg[g].lo - v * L, seg[g].hi - v * L);                      \
                    if (sv)                                                                     \
                        MSTOREU(d + v * L, sv,                                                  \
                                NAME##_finish(acc[i][v], d + v * L, sv, first, bias, i, relu)); \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }
/* Vectors of columns per tile (NR = 2 x 16 floats, as fo_ukernel_*). 3 (8 x 48, 24
 * accumulators) measured +3 % on res3 3x3 C128 28x28 but -5 % / -28 % on res4 / res5
 * (14x14 / 7x7 outputs: more padded columns), 1 thread, so 2 it is. */
#define FO_DIRECT_NV 2
FO_DEFINE_DIRECT(fo_ukernel_f_direct, float, __m512, 16, FO_MR_F, FO_DIRECT_NV, __mmask16,
                 fo_bits16, _mm512_set1_ps, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_maskz_loadu_ps,
                 _mm512_fmadd_ps, _mm512_add_ps, _mm512_max_ps, _mm512_mask_storeu_ps)
FO_DEFINE_DIRECT(fo_ukernel_d_direct, double, __m512d, 8, FO_MR_D, FO_DIRECT_NV, __mmask8,
                 fo_bits8, _mm512_set1_pd, _mm512_setzero_pd, _mm512_loadu_pd, _mm512_maskz_loadu_pd,
                 _mm512_fmadd_pd, _mm512_add_pd, _mm512_max_pd, _mm512_mask_storeu_pd)
/* The copy for the dense variant (gemm.pxi kind 3): one row of an NR-column B sliver from
 * its runs, runs[3q] source offset, runs[3q + 1] destination column, runs[3q + 2] length
 * (<= NR = 2 vectors). Plain unaligned loads/stores of whole vectors: a run's spill past
 * its length lands on the next run (or the next row), which is written after it, and the
 * source is read at most NR - 1 elements past a run (the padded planes carry >= 64
 * elements of slack). Masked copies with clamped lane masks cost ~3x more per run. */
#define FO_DEFINE_COPY_RUNS(NAME, T, L, LOADU, STOREU)                                         \
    static inline void NAME(T *dst, const T *row, const long *runs, long q0, long q1) {        \
        for (long q = q0; q < q1; q++) {                                                       \
            const T *s = row + runs[3 * q];                                                    \
            T *d = dst + runs[3 * q + 1];                                                      \
            STOREU(d, LOADU(s));                                                               \
            if (runs[3 * q + 2] > L) STOREU(d + L, LOADU(s + L));                              \
        }                                                                                      \
    }
FO_DEFINE_COPY_RUNS(fo_copy_runs_f, float, 16, _mm512_loadu_ps, _mm512_storeu_ps)
FO_DEFINE_COPY_RUNS(fo_copy_runs_d, double, 8, _mm512_loadu_pd, _mm512_storeu_pd)
#else
#define FO_HAVE_DIRECT 0
#define FO_DIRECT_NV 2
static inline void fo_copy_runs_f(float *dst, const float *row, const long *runs, long q0,
                                  long q1) {}
static inline void fo_copy_runs_d(double *dst, const double *row, const long *runs, long q0,
                                  long q1) {}
static void fo_ukernel_f_direct(long kc, const float *Ap, long a_rs, long a_ks, const float *B0,
                                const int *boff, int ncols, float *C, long ldc,
                                const fo_seg *seg, int nseg, int mr, int first,
                                const float *bias, int relu) {}
static void fo_ukernel_d_direct(long kc, const double *Ap, long a_rs, long a_ks,
                                const double *B0, const int *boff, int ncols, double *C,
                                long ldc, const fo_seg *seg, int nseg, int mr, int first,
                                const double *bias, int relu) {}
#endif

/* Prefetch into L2 the B rows a direct-kernel tile will read: row p at base + boff[p],
 * `bytes` bytes from there (a cache line at a time). gemm.pxi issues it for the NEXT tile
 * while the MR-row slivers of the current one run: the rows of an unpadded 1x1 conv's B are
 * whole image planes apart (12.5 KiB for 56x56), far too many streams for the hardware
 * prefetcher, so the first sliver of every tile otherwise waited on L3 / DRAM. Measured
 * (fused conv, 2 threads, interleaved with / without, two runs): 1x1 C256 56x56 -> K64 at
 * batch 8 +11 / +12 %, 3x3/2 C128 56x56 b8 +3 / +5 %, the stem and batch-1 1x1 within +-3 %. */
static inline void fo_prefetch_rows(const char *base, const int *boff, long kc, long elem,
                                    long bytes) {
    for (long p = 0; p < kc; p++) {
        const char *row = base + (long)boff[p] * elem;
        for (long b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
    }
}

/* ------------------------------------------------------------------ dispatch */
/* A is read as Ap[i * a_rs + p * a_ks]: a packed sliver (a_rs = 1, a_ks = MR) or rows of a
 * row-major matrix read in place (a_rs = lda, a_ks = 1; conv weights, see gemm.pxi). */
static inline void fo_ukernel_f(long kc, const float *Ap, long a_rs, long a_ks, const float *Bp,
                                float *C, long ldc, int mr, int nr, int first,
                                const float *bias, int relu) {
    if (fo_simd_enabled)
        fo_ukernel_f_simd(kc, Ap, a_rs, a_ks, Bp, C, ldc, mr, nr, first, bias, relu);
    else
        fo_ukernel_f_portable(kc, Ap, a_rs, a_ks, Bp, C, ldc, mr, nr, first, bias, relu);
}

static inline void fo_ukernel_d(long kc, const double *Ap, long a_rs, long a_ks,
                                const double *Bp, double *C, long ldc, int mr, int nr,
                                int first, const double *bias, int relu) {
    if (fo_simd_enabled)
        fo_ukernel_d_simd(kc, Ap, a_rs, a_ks, Bp, C, ldc, mr, nr, first, bias, relu);
    else
        fo_ukernel_d_portable(kc, Ap, a_rs, a_ks, Bp, C, ldc, mr, nr, first, bias, relu);
}

#endif /* FASTOPS_MICROKERNEL_H */
