# cython: language_level=3
"""conv2d + bias + ReLU in Cython: the fused stage.

The un-fused stages (naive ... tiled conv, then a bias pass and a ReLU pass over the output)
are derived automatically by fastops.registry from conv2d.pyx; this chapter adds only the
last step: do the bias and ReLU inside the tiled conv's write-back.
"""
from fastops.kernels.cython.conv2d import conv2d_tiled_epilogue
from fastops.registry import register


@register("conv2d_bias_relu", "cython", "fused",
          "tiled implicit-GEMM conv with bias + ReLU in the micro-kernel write-back")
def conv2d_bias_relu_fused(x, w, bias, out, p):
    """Stage 5 · fused.

    Changed since `tiled` (+ separate passes): the bias add and the ReLU run in the
    micro-kernel's epilogue, on the MR x NR block of out while it is still in zmm registers,
    on the last KC block only (microkernel.h: add the row's bias, then max(0, v), which keeps
    NaN like numpy.maximum), in the masked segment write-back of the direct kernel too. The
    depthwise kernel (depthwise.h) starts its register accumulators at the bias and applies
    the ReLU before its one store of each block of output columns.
    Bottleneck removed: two extra sweeps over out (read + write each) that the un-fused
    ladder makes after the conv: for a 64 x 56 x 56 float32 output that is 4 x 0.8 MB of
    memory traffic per image.
    Measured against PyTorch 2.13 eager relu(conv2d(x, w, b)) (oneDNN), float32, 2 threads
    each, GOMP_SPINCOUNT=30000, interleaved blocks of 6 calls (first of each block dropped),
    6 rounds, four runs on an AMD EPYC Zen 4 VM shared with other jobs (run-to-run spread
    +-5-10 %); time ratio torch / ours, median call of each run, and the median GF/s:
                                batch 1                       batch 8
                                runs 1-4             ours     runs 1-4             ours
      res2 3x3 C64 56x56        1.00 0.96 1.02 1.10  179      0.98 1.05 1.00 0.85  183
      res3 3x3 C128 28x28       0.90 0.93 0.97 0.96  174      0.91 0.97 0.89 0.81  172
      res4 3x3 C256 14x14       0.88 0.93 0.96 0.91  171      0.86 0.91 0.84 0.89  177
      res5 3x3 C512 7x7         1.35 1.32 1.23 1.13  144      0.83 0.87 0.81 0.83  173
      1x1 C256 -> K64 56x56     1.21 1.15 1.21 1.44  176      1.09 0.91 1.06 1.02  104
      stem 7x7/2 C3 224x224     0.95 1.06 0.98 0.88  167      1.12 1.11 1.70 3.51  157
      depthwise 3x3 C128 56x56  1.36 1.32 1.60 1.26   44      2.15 2.29 2.15 2.08   30
      median of the set         1.00 1.06 1.02 1.10           0.98 0.97 1.00 0.89
    (before the dense-column variant for small outputs, the vectorised padding copy and the
    equal reduction blocks, same method: batch 1 median 0.94 / 1.06, batch 8 0.95 / 0.96,
    res5 at batch 8 0.70 / 0.71; before the direct path and the depthwise kernel: res3-res5
    0.67-0.75, depthwise ~0.5.) oneDNN runs the batch-8 3x3 layers at ~190-230 GF/s, up to
    the 2-thread peak (~230).
    Still missing: everything `tiled` lacks.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  bias: (K,)  out: (N, K, Ho, Wo)
    conv2d_tiled_epilogue(x, w, out, p, bias, True)
