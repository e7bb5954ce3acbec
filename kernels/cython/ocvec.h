/* Direct convolution with output channels in the vector lanes ("ocvec"), for the Cython
 * conv2d chapter: the tiled stage's path for batched convs with 3-wide kernel rows (kW = 3,
 * unit horizontal stride and dilation: every 3x3 ResNet layer), chosen by conv2d.pyx.
 *
 * The implicit-GEMM kernel (microkernel.h, fo_ukernel_*_direct) puts output PIXELS in the
 * lanes: per reduction step it loads 2 vectors of the image (32 pixels) and broadcasts 8
 * weights: 10 loads per 16 FMAs, and it multiplies the zero padding like any other input.
 * Here, as in oneDNN's AVX-512 direct convolution, the lanes hold 16 output CHANNELS:
 *
 *   register tile: 28 output pixels x 16 output channels = 28 zmm accumulators, made of
 *   SEGS segments of SEGW consecutive pixels of one output row (28 x 1 for rows of 28 or
 *   56, 14 x 2 for 14, 7 x 4 for 7), + 3 zmm of weights + 1 broadcast = all 32 registers.
 *   per (input channel c, kernel row r): load the 3 weight vectors w[c, r, 0..2] (16 output
 *   channels each), then per segment broadcast its SEGW + 2 input values of that row once
 *   each: input value i feeds up to 3 pixels (j = i - s for the taps s = 0, 1, 2), so
 *   3 loads + ~34 broadcasts serve 84 FMAs (0.44 loads per FMA, against 0.63).
 *
 * Zero padding is skipped, not multiplied: a segment whose input row is padding for
 * kernel row r is left out of that row's FMAs, and the padding column left of a row
 * (right of it) is never broadcast. oneDNN does the same, which is how PyTorch measured
 * 119 GF/s on one thread for res5 3x3 C512 7x7 at batch 8, "above" the 117 GF/s FMA peak:
 * 18 % of that layer's multiply-adds touch padding (9 % at 14x14, 5 % at 28x28).
 *
 * A call owns its tile for the whole reduction, so the tile is written exactly once, with
 * bias + ReLU, through a small buffer that turns pixel-major registers into NCHW rows.
 *
 *   xq:   what the kernel reads: the zero-padded planes (conv2d.pyx pad_phases; stride 1,
 *         so one plane per channel), or, when every padding tap is skipped anyway (<= 1
 *         equal padding column each side, whole segments: the 3x3 'same' convs), x itself;
 *         row stride `rstride` / dh, channel stride `plane`. Segment g, kernel row r, tap s
 *         reads xq[c * plane + seg[g].x + r * rstride + i] for broadcast i = j + s.
 *   wr:   the weights reordered for 16 output channels: wr[((c * kh + r) * 3 + s) * L + l]
 *         = w[k0 + l, c, r, s] (zeros past the last channel), by each task for its block
 *         (fo_ocvec_pack_*), into a per-thread buffer its tiles read from L2.
 *   seg:  the tile's segments (image and output row, first column, what they may skip);
 *         tiles run on across rows and images, so 7-wide rows at batch 8 fill every tile.
 */
#ifndef FASTOPS_OCVEC_H
#define FASTOPS_OCVEC_H

#include "microkernel.h"

/* One row segment of a tile. */
typedef struct {
    long x;     /* offset of its first pixel's tap (c=0, r=0, s=0) in xq (image included) */
    long o;     /* offset of its first pixel in out (image included): n*K*P + oh*Wo + ow0 */
    int n;      /* pixels to store (<= SEGW; 0: an unused segment) */
    int r0, r1; /* kernel rows whose input row is inside the image (others: padding) */
    int left;   /* 1: the input column left of the segment is padding (skip it) */
    int right;  /* 1: the input column right of the segment is padding (skip it) */
} fo_ocseg;

#define FO_OCVEC_PIXELS 28 /* pixels per tile */

#if FO_X86 && defined(__AVX512F__)
#define FO_HAVE_OCVEC 1

/* dst (16 x 16) = src (16 rows of stride ld) transposed: 16 loads, 4 rounds of in-register
 * shuffles (pairs, quads, 128-bit lanes twice), 16 stores. The network leaves the rows in
 * the order 0 2 1 3 4 6 5 7 ..., undone by the store addresses. */
static inline void fo_transpose16_f(const float *src, long ld, float *dst) {
    static const int order[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ld);
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 2; j++) {
            r[4 * i + j] = _mm512_shuffle_ps(t[4 * i + j], t[4 * i + 2 + j], 0x44);
            r[4 * i + 2 + j] = _mm512_shuffle_ps(t[4 * i + j], t[4 * i + 2 + j], 0xEE);
        }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + order[i] * 16, r[i]);
}

/* The tile's write-back, float32: the 28 (+4 unused) pixel rows of buf transposed by two
 * 16 x 16 transposes into one row of 32 pixels per output channel (lo: pixels 0-15, hi:
 * 16-31), then per segment one permute picks its pixels out of lo:hi, bias, ReLU
 * (max(0, v) keeps NaN) and one masked store of its n columns. Scalar, this write-back was
 * 448 loads + adds + compares + stores per tile (~10 % of a 144-step reduction). */
static inline void fo_ocvec_store_f(const float *buf, int segw, int segs, const fo_ocseg *seg,
                                    float *out, long P, long k0, long kmax, const float *bias,
                                    int relu) {
    float tr[2][256] __attribute__((aligned(64)));
    fo_transpose16_f(buf, 16, tr[0]);
    fo_transpose16_f(buf + 256, 16, tr[1]);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 zero = _mm512_setzero_ps();
    long kend = k0 + 16 < kmax ? k0 + 16 : kmax;
    for (long k = k0; k < kend; k++) {
        __m512 lo = _mm512_load_ps(tr[0] + (k - k0) * 16);
        __m512 hi = _mm512_load_ps(tr[1] + (k - k0) * 16);
        __m512 bv = _mm512_set1_ps(bias ? bias[k] : 0.0f);
        for (int g = 0; g < segs; g++) {
            for (int h = 0; h < seg[g].n; h += 16) { /* 16 columns at a time (28: 16 + 12) */
                __m512i idx = _mm512_add_epi32(iota, _mm512_set1_epi32(g * segw + h));
                __m512 v = _mm512_add_ps(_mm512_permutex2var_ps(lo, idx, hi), bv);
                if (relu) v = _mm512_max_ps(zero, v);
                int m = seg[g].n - h < 16 ? seg[g].n - h : 16;
                _mm512_mask_storeu_ps(out + k * P + seg[g].o + h, (__mmask16)((1u << m) - 1u), v);
            }
        }
    }
}

/* float64 (L = 8): the plain scalar write-back. */
static inline void fo_ocvec_store_d(const double *buf, int segw, int segs, const fo_ocseg *seg,
                                    double *out, long P, long k0, long kmax, const double *bias,
                                    int relu) {
    long kend = k0 + 8 < kmax ? k0 + 8 : kmax;
    for (long k = k0; k < kend; k++) {
        double bk = bias ? bias[k] : 0.0;
        const double *col = buf + (k - k0);
        for (int g = 0; g < segs; g++) {
            double *o = out + k * P + seg[g].o;
            for (int j = 0; j < seg[g].n; j++) {
                double v = col[(g * segw + j) * 8] + bk;
                o[j] = (relu && v < 0.0) ? 0.0 : v; /* NaN stays NaN */
            }
        }
    }
}

#define FO_DEFINE_OCVEC(NAME, T, VT, L, SET1, ZERO, LOADU, STORE, FMA, STORE_TILE)                       \
    /* Segment g's FMAs for one (c, r): broadcasts i = lo .. SEGW + 1 - hi_skip. */             \
    static inline __attribute__((always_inline)) void NAME##_seg(                               \
        const int SEGW, const int skip_l, const int skip_r, const T *xs, VT w0, VT w1, VT w2,   \
        VT *acc) {                                                                              \
        _Pragma("GCC unroll 30") for (int i = skip_l; i < SEGW + 2 - skip_r; i++) {             \
            VT b = SET1(xs[i]);                                                                 \
            if (i < SEGW) acc[i] = FMA(b, w0, acc[i]);                     /* s = 0, j = i */   \
            if (i >= 1 && i - 1 < SEGW) acc[i - 1] = FMA(b, w1, acc[i - 1]); /* s = 1 */        \
            if (i >= 2) acc[i - 2] = FMA(b, w2, acc[i - 2]);               /* s = 2 */          \
        }                                                                                       \
    }                                                                                           \
    static inline __attribute__((always_inline)) void NAME##_segs(                              \
        const int SEGW, const int SEGS, const int edges, long C, long kh, long plane,           \
        long rstride, const T *xq, const T *wr, const fo_ocseg *seg, VT (*acc)[FO_OCVEC_PIXELS]) {         \
        /* edges: the skip pattern shared by all segments (bit 0 left, bit 1 right). */        \
        /* Channel-major, kernel rows inner: a channel's input rows (the segments' rows and  \
         * the kh - 1 below them) are loaded into L1 once and serve all kh rows of taps, and  \
         * the weight records are read in storage order. */                                   \
        unsigned on[SEGS]; /* bit r: kernel row r reads a real input row for segment g */    \
        _Pragma("GCC unroll 4") for (int g = 0; g < SEGS; g++) {                                \
            on[g] = 0;                                                                          \
            if (seg[g].n > 0)                                                                   \
                for (int r = seg[g].r0; r < seg[g].r1; r++) on[g] |= 1u << r;                   \
        }                                                                                       \
        const T *xc = xq;                                                                       \
        const T *wp = wr;                                                                       \
        for (long c = 0; c < C; c++) {                                                          \
            for (long r = 0; r < kh; r++) {                                                     \
                VT w0 = LOADU(wp), w1 = LOADU(wp + L), w2 = LOADU(wp + 2 * L);                  \
                const T *xr = xc + r * rstride;                                                 \
                _Pragma("GCC unroll 4") for (int g = 0; g < SEGS; g++) if (on[g] >> r & 1u) {   \
                    const T *xs = xr + seg[g].x;                                                \
                    __asm__("" : "+r"(xs)); /* one base register, constant displacements */    \
                    NAME##_seg(SEGW, edges & 1, (edges >> 1) & 1, xs, w0, w1, w2, acc[g]);      \
                }                                                                               \
                wp += 3 * L;                                                                    \
            }                                                                                   \
            xc += plane;                                                                        \
        }                                                                                       \
    }                                                                                           \
    static inline __attribute__((always_inline)) void NAME##_tile(                              \
        const int SEGW, const int SEGS, long C, long kh, long plane, long rstride,              \
        const T *xq, const T *wr, const fo_ocseg *seg, T *out, long P, long k0, long kmax,      \
        const T *bias, int relu) {                                                              \
        VT acc[4][FO_OCVEC_PIXELS]; /* [segment][pixel]; only SEGS x SEGW are used */          \
        _Pragma("GCC unroll 4") for (int g = 0; g < SEGS; g++)                                  \
            _Pragma("GCC unroll 28") for (int j = 0; j < SEGW; j++) acc[g][j] = ZERO();         \
        /* The skip pattern is the same for every segment of a tile whenever segments are   \
         * whole rows (SEGW >= Wo); otherwise (28-pixel halves of 56-wide rows) segments   \
         * differ, and the conservative pattern 0 (skip nothing) is exact too. */           \
        int edges = seg[0].left | (seg[0].right << 1);                                          \
        for (int g = 1; g < SEGS; g++)                                                          \
            if (seg[g].n > 0 && (seg[g].left | (seg[g].right << 1)) != edges) edges = 0;        \
        switch (edges) {                                                                        \
        case 3: NAME##_segs(SEGW, SEGS, 3, C, kh, plane, rstride, xq, wr, seg, acc); break;     \
        case 1: NAME##_segs(SEGW, SEGS, 1, C, kh, plane, rstride, xq, wr, seg, acc); break;     \
        case 2: NAME##_segs(SEGW, SEGS, 2, C, kh, plane, rstride, xq, wr, seg, acc); break;     \
        default: NAME##_segs(SEGW, SEGS, 0, C, kh, plane, rstride, xq, wr, seg, acc); break;    \
        }                                                                                       \
        /* Pixel-major registers -> channel-major rows of out, with bias and ReLU: through  \
         * buf (32 pixel rows of L lanes; rows 28-31 unused), then STORE_TILE. */             \
        T buf[32 * L] __attribute__((aligned(64)));                                             \
        _Pragma("GCC unroll 4") for (int g = 0; g < SEGS; g++)                                  \
            _Pragma("GCC unroll 28") for (int j = 0; j < SEGW; j++)                             \
                STORE(buf + (g * SEGW + j) * L, acc[g][j]);                                     \
        STORE_TILE(buf, SEGW, SEGS, seg, out, P, k0, kmax, bias, relu);                         \
    }                                                                                           \
    /* One tile: `segw` = 28, 14 or 7 pixels per segment (28 / segw segments). */             \
    static void NAME(int segw, long C, long kh, long plane, long rstride, const T *xq,          \
                     const T *wr, const fo_ocseg *seg, T *out, long P, long k0, long kmax,      \
                     const T *bias, int relu) {                                                 \
        if (segw == 28)                                                                         \
            NAME##_tile(28, 1, C, kh, plane, rstride, xq, wr, seg, out, P, k0, kmax, bias, relu); \
        else if (segw == 14)                                                                    \
            NAME##_tile(14, 2, C, kh, plane, rstride, xq, wr, seg, out, P, k0, kmax, bias, relu); \
        else                                                                                    \
            NAME##_tile(7, 4, C, kh, plane, rstride, xq, wr, seg, out, P, k0, kmax, bias, relu);  \
    }

FO_DEFINE_OCVEC(fo_ocvec_tile_f, float, __m512, 16, _mm512_set1_ps, _mm512_setzero_ps,
                _mm512_loadu_ps, _mm512_store_ps, _mm512_fmadd_ps, fo_ocvec_store_f)
FO_DEFINE_OCVEC(fo_ocvec_tile_d, double, __m512d, 8, _mm512_set1_pd, _mm512_setzero_pd,
                _mm512_loadu_pd, _mm512_store_pd, _mm512_fmadd_pd, fo_ocvec_store_d)

#else
#define FO_HAVE_OCVEC 0
static void fo_ocvec_tile_f(int segw, long C, long kh, long plane, long rstride,
                            const float *xq, const float *wr, const fo_ocseg *seg, float *out,
                            long P, long k0, long kmax, const float *bias, int relu) {}
static void fo_ocvec_tile_d(int segw, long C, long kh, long plane, long rstride,
                            const double *xq, const double *wr, const fo_ocseg *seg,
                            double *out, long P, long k0, long kmax, const double *bias,
                            int relu) {}
#endif

/* The weight reorder: wr (red, L) = rows k0 .. k0 + L of w (K rows of red values, row-major),
 * transposed, rows past kmax as zeros. Scalar version: in blocks of 64 reduction steps, so
 * the 64 x L block of wr being filled (4 KiB) stays in L1 while the L rows of w are read. */
#define FO_DEFINE_OCVEC_PACK(NAME, T)                                                           \
    static void NAME(const T *w, long red, long k0, long kmax, long L, T *wr) {                 \
        for (long p0 = 0; p0 < red; p0 += 64) {                                                 \
            long p1 = p0 + 64 < red ? p0 + 64 : red;                                            \
            for (long l = 0; l < L; l++) {                                                      \
                if (k0 + l < kmax) {                                                            \
                    const T *src = w + (k0 + l) * red;                                          \
                    for (long p = p0; p < p1; p++) wr[p * L + l] = src[p];                      \
                } else {                                                                        \
                    for (long p = p0; p < p1; p++) wr[p * L + l] = (T)0;                        \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }
FO_DEFINE_OCVEC_PACK(fo_ocvec_pack_scalar_f, float)
FO_DEFINE_OCVEC_PACK(fo_ocvec_pack_scalar_d, double)

#if FO_X86 && defined(__AVX512F__)
/* dst (8 x 8) = src (8 rows of stride ld) transposed, float64: pairs, then 256-bit halves
 * and 128-bit quarters by two rounds of shuffle_f64x2 (the rows come out in order). */
static inline void fo_transpose8_d(const double *src, long ld, double *dst) {
    __m512d r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = _mm512_loadu_pd(src + i * ld);
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            r[4 * i + j] = _mm512_shuffle_f64x2(t[4 * i + j], t[4 * i + 2 + j], 0x88);
            r[4 * i + 2 + j] = _mm512_shuffle_f64x2(t[4 * i + j], t[4 * i + 2 + j], 0xDD);
        }
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_f64x2(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_f64x2(r[j], r[4 + j], 0xDD);
    }
    for (int i = 0; i < 8; i++) _mm512_storeu_pd(dst + i * 8, t[i]);
}

/* The reorder with whole LANES x LANES blocks by TRANSPOSE (each source row read a cache line
 * at a time, each destination block written whole), the rest as the scalar version. Measured
 * on one thread for all 32 blocks of res5's float32 weights (512 x 4608, 9.4 MB): 1.5 ms
 * scalar, 0.7-0.8 ms with the transposes; res4's (256 x 2304): 0.27 -> 0.08 ms. */
#define FO_DEFINE_OCVEC_PACK_SIMD(NAME, T, LANES, TRANSPOSE, SCALAR)                          \
    static void NAME(const T *w, long red, long k0, long kmax, long L, T *wr) {                 \
        if (L != LANES || k0 + LANES > kmax || !fo_simd_enabled) {                              \
            SCALAR(w, red, k0, kmax, L, wr);                                                    \
            return;                                                                             \
        }                                                                                       \
        long full = red / LANES * LANES;                                                        \
        for (long p0 = 0; p0 < full; p0 += LANES)                                               \
            TRANSPOSE(w + k0 * red + p0, red, wr + p0 * LANES);                                 \
        for (long p = full; p < red; p++)                                                       \
            for (long l = 0; l < LANES; l++) wr[p * LANES + l] = w[(k0 + l) * red + p];         \
    }
FO_DEFINE_OCVEC_PACK_SIMD(fo_ocvec_pack_f, float, 16, fo_transpose16_f, fo_ocvec_pack_scalar_f)
FO_DEFINE_OCVEC_PACK_SIMD(fo_ocvec_pack_d, double, 8, fo_transpose8_d, fo_ocvec_pack_scalar_d)
#else
#define fo_ocvec_pack_f fo_ocvec_pack_scalar_f
#define fo_ocvec_pack_d fo_ocvec_pack_scalar_d
#endif

#endif /* FASTOPS_OCVEC_H */
