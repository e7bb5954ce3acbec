/* Direct depthwise convolution of one plane with AVX-512, for the Cython conv2d chapter.
 *
 * A depthwise conv (one input channel per group) has no reduction to block: each output
 * element is a kH x kW dot product (9 taps for 3x3) of one input plane. It is memory bound
 * (3x3 C128 56x56 float32: 1.6 MB in, 1.6 MB out, 29 MFLOP), so the aim is to read every
 * input element from memory once and write every output element once, with the taps summed
 * in registers.
 *
 * Per plane (Ho, Wo) <- plane (H, W), horizontal stride 1 only (any vertical stride,
 * dilation, padding):
 *   1. copy the plane into a per-thread buffer `buf` (H rows of Wb columns), shifted right by
 *      the left padding and zero-filled on both sides, so that output column t of tap s reads
 *      buf[ih * Wb + t + s * dw] with no bounds test (Wb leaves room for whole vectors);
 *   2. for each output row, a block of NB vectors of columns (NB x 16 floats) accumulates all
 *      kH x kW taps in NB registers: NB independent FMA chains hide the FMA latency, and the
 *      rows ih outside the image are skipped (zero padding adds nothing);
 *   3. the block gets the bias and ReLU (max(0, v) keeps NaN, as numpy.maximum) and is stored
 *      once, masked at the right edge.
 * The buffer (H x Wb floats, 14 KiB for 56 x 56) stays in L1/L2 across the Kg output channels
 * of the group, which all read the same input plane.
 */
#ifndef FASTOPS_DEPTHWISE_H
#define FASTOPS_DEPTHWISE_H

#include "microkernel.h"

#if FO_X86 && defined(__AVX512F__)
#define FO_HAVE_DW 1

/* Columns of the padded buffer: blocks read output columns up to round_up(Wo, lanes), plus
 * the tap reach (kw - 1) * dw; rounded to whole vectors. */
static inline long fo_dw_buffer_width(long Wo, long kw, long dw, long lanes) {
    long cols = (Wo + lanes - 1) / lanes * lanes + (kw - 1) * dw;
    return (cols + lanes - 1) / lanes * lanes;
}

#define FO_DEFINE_DW(NAME, T, VT, L, MASKT, SET1, ZERO, LOADU, FMA, MAX, MSTOREU)                 \
    /* One output row, columns [t0, t0 + NB*L), NB a compile-time constant. */                  \
    static inline __attribute__((always_inline)) void NAME##_block(                              \
        const int NB, const T *buf, long Wb, long H, const T *w, long kh, long kw, long ih0,     \
        long dh, long dw, long t0, T *orow, long Wo, T bias, int relu) {                        \
        VT acc[4];                                                                               \
        for (int v = 0; v < NB; v++) acc[v] = SET1(bias);                                        \
        for (long r = 0; r < kh; r++) {                                                          \
            long ih = ih0 + r * dh;                                                              \
            if (ih < 0 || ih >= H) continue; /* a padding row: contributes zero */               \
            const T *src = buf + ih * Wb + t0;                                                   \
            for (long s = 0; s < kw; s++) {                                                      \
                VT wv = SET1(w[r * kw + s]);                                                     \
                for (int v = 0; v < NB; v++)                                                     \
                    acc[v] = FMA(wv, LOADU(src + s * dw + v * L), acc[v]);                       \
            }                                                                                    \
        }                                                                                        \
        for (int v = 0; v < NB; v++) {                                                           \
            long cols = Wo - t0 - (long)v * L;                                                   \
            if (cols <= 0) break;                                                                \
            MASKT m = cols >= L ? (MASKT)~0u : (MASKT)((1u << cols) - 1u);                       \
            VT o = relu ? MAX(ZERO(), acc[v]) : acc[v]; /* max(0, NaN) = NaN */                  \
            MSTOREU(orow + t0 + v * L, m, o);                                                    \
        }                                                                                        \
    }                                                                                            \
    /* Pad plane x (H, W) into buf (H, Wb): buf[ih, u] = x[ih, u - pl], zero outside. */         \
    static void NAME##_pad(const T *x, long H, long W, long pl, T *buf, long Wb) {               \
        for (long ih = 0; ih < H; ih++) {                                                        \
            T *dst = buf + ih * Wb;                                                              \
            const T *row = x + ih * W;                                                           \
            for (long u = 0; u < Wb; u++) {                                                      \
                long iw = u - pl;                                                                \
                dst[u] = (iw >= 0 && iw < W) ? row[iw] : (T)0;                                   \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    /* Output planes out[k0:k1] (each Ho x Wo, consecutive) from one padded input plane. */     \
    static void NAME(const T *x, long H, long W, const T *w, long k0, long k1, long kh,         \
                     long kw, long sh, long pt, long pl, long dh, long dw, T *out, long Ho,      \
                     long Wo, const T *bias, int relu, T *buf) {                                \
        long Wb = fo_dw_buffer_width(Wo, kw, dw, L);                                             \
        NAME##_pad(x, H, W, pl, buf, Wb);                                                        \
        for (long k = k0; k < k1; k++) {                                                         \
            const T *wk = w + k * kh * kw;                                                       \
            T b = bias ? bias[k] : (T)0;                                                         \
            T *plane = out + (k - k0) * Ho * Wo;                                                 \
            for (long oh = 0; oh < Ho; oh++) {                                                   \
                long ih0 = oh * sh - pt;                                                         \
                T *orow = plane + oh * Wo;                                                       \
                long t0 = 0;                                                                     \
                for (; t0 + 4 * L <= Wo; t0 += 4 * L)                                            \
                    NAME##_block(4, buf, Wb, H, wk, kh, kw, ih0, dh, dw, t0, orow, Wo, b, relu); \
                long rest = (Wo - t0 + L - 1) / L; /* 0 .. 4 vectors left, the last partial */  \
                if (rest == 4)                                                                   \
                    NAME##_block(4, buf, Wb, H, wk, kh, kw, ih0, dh, dw, t0, orow, Wo, b, relu); \
                else if (rest == 3)                                                              \
                    NAME##_block(3, buf, Wb, H, wk, kh, kw, ih0, dh, dw, t0, orow, Wo, b, relu); \
                else if (rest == 2)                                                              \
                    NAME##_block(2, buf, Wb, H, wk, kh, kw, ih0, dh, dw, t0, orow, Wo, b, relu); \
                else if (rest == 1)                                                              \
                    NAME##_block(1, buf, Wb, H, wk, kh, kw, ih0, dh, dw, t0, orow, Wo, b, relu); \
            }                                                                                    \
        }                                                                                        \
    }

FO_DEFINE_DW(fo_dw_planes_f, float, __m512, 16, __mmask16, _mm512_set1_ps, _mm512_setzero_ps,
             _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_max_ps, _mm512_mask_storeu_ps)
FO_DEFINE_DW(fo_dw_planes_d, double, __m512d, 8, __mmask8, _mm512_set1_pd, _mm512_setzero_pd,
             _mm512_loadu_pd, _mm512_fmadd_pd, _mm512_max_pd, _mm512_mask_storeu_pd)
#else
#define FO_HAVE_DW 0
static inline long fo_dw_buffer_width(long Wo, long kw, long dw, long lanes) { return 0; }
static void fo_dw_planes_f(const float *x, long H, long W, const float *w, long k0, long k1,
                           long kh, long kw, long sh, long pt, long pl, long dh, long dw,
                           float *out, long Ho, long Wo, const float *bias, int relu,
                           float *buf) {}
static void fo_dw_planes_d(const double *x, long H, long W, const double *w, long k0, long k1,
                           long kh, long kw, long sh, long pt, long pl, long dh, long dw,
                           double *out, long Ho, long Wo, const double *bias, int relu,
                           double *buf) {}
#endif

#endif /* FASTOPS_DEPTHWISE_H */
