/* Depthwise convolution of one channel plane, with an optional bias + ReLU epilogue.
 *
 * Used by the tiled conv2d (and the fused stage) when every group has one input channel.
 * There is no reduction to block (kH*kW = 9 multiply-adds per output for 3x3) and the plane
 * is read and written once, so the goal is a single pass over the output: each output row is
 * computed in one vectorised sweep that sums all kH x kW taps per column in registers
 * (`#pragma omp simd` over the output columns), instead of one read-modify-write of the row
 * per tap. Columns whose taps all fall inside the image (the interior, [lo, hi)) take the
 * vector loop; the few border columns take a checked scalar loop.
 */
#ifndef FASTOPS_DEPTHWISE_H
#define FASTOPS_DEPTHWISE_H

#define FO_DW_MAX_KH 64

#define FO_DEFINE_DEPTHWISE(NAME, T)                                                           \
    static inline __attribute__((always_inline)) void NAME##_rows(                             \
        const T *const *rows, const T *const *wrows, int nrows, int kw, int sw, int dw,        \
        long lo, long hi, T *orow, T b, int relu) {                                            \
        _Pragma("omp simd")                                                                    \
        for (long ow = lo; ow < hi; ow++) {                                                    \
            T acc = 0;                                                                         \
            for (int r = 0; r < nrows; r++)                                                    \
                for (int s = 0; s < kw; s++) acc += wrows[r][s] * rows[r][ow * sw + s * dw];   \
            acc += b;                                                                          \
            if (relu) acc = (acc > 0 || acc != acc) ? acc : 0; /* NaN stays NaN */             \
            orow[ow] = acc;                                                                    \
        }                                                                                      \
    }                                                                                          \
    static void NAME(const T *x, const T *w, T *out, long H, long W, int kh, int kw, int sh,   \
                     int sw, int pt, int pl, int dh, int dw, long Ho, long Wo, const T *bias,  \
                     int relu) {                                                               \
        /* x: (H, W) one input channel; w: (kh, kw); out: (Ho, Wo); bias: one value or NULL */ \
        const T *rows[FO_DW_MAX_KH], *wrows[FO_DW_MAX_KH];                                     \
        T b = bias ? *bias : 0;                                                                \
        /* interior: 0 <= ow*sw - pl and ow*sw - pl + (kw-1)*dw <= W-1 */                      \
        long lo = (pl + sw - 1) / sw;                                                          \
        long last = W - 1 + pl - (long)(kw - 1) * dw;                                          \
        long hi = last < 0 ? 0 : last / sw + 1;                                                \
        if (lo > Wo) lo = Wo;                                                                  \
        if (hi > Wo) hi = Wo;                                                                  \
        if (hi < lo) hi = lo;                                                                  \
        for (long oh = 0; oh < Ho; oh++) {                                                     \
            int nrows = 0;                                                                     \
            for (int r = 0; r < kh; r++) {                                                     \
                long ih = oh * sh - pt + (long)r * dh;                                         \
                if (ih < 0 || ih >= H) continue; /* a padding row contributes nothing */       \
                rows[nrows] = x + ih * W - pl; /* column ow*sw + s*dw of this pointer */       \
                wrows[nrows++] = w + (long)r * kw;                                             \
            }                                                                                  \
            T *orow = out + oh * Wo;                                                           \
            for (long ow = 0; ow < Wo; ow++) {                                                 \
                if (ow == lo && hi > lo) { ow = hi - 1; continue; } /* interior */         \
                T acc = 0;                                                                     \
                for (int r = 0; r < nrows; r++)                                                \
                    for (int s = 0; s < kw; s++) {                                             \
                        long iw = ow * sw + (long)s * dw - pl;                                 \
                        if (iw >= 0 && iw < W) acc += wrows[r][s] * rows[r][iw + pl];          \
                    }                                                                          \
                acc += b;                                                                      \
                if (relu) acc = (acc > 0 || acc != acc) ? acc : 0;                             \
                orow[ow] = acc;                                                                \
            }                                                                                  \
            if (sw == 1) /* unit stride: contiguous vector loads */                            \
                NAME##_rows(rows, wrows, nrows, kw, 1, dw, lo, hi, orow, b, relu);             \
            else                                                                               \
                NAME##_rows(rows, wrows, nrows, kw, sw, dw, lo, hi, orow, b, relu);            \
        }                                                                                      \
    }

FO_DEFINE_DEPTHWISE(fo_depthwise_f, float)
FO_DEFINE_DEPTHWISE(fo_depthwise_d, double)

#endif /* FASTOPS_DEPTHWISE_H */
