# cython: language_level=3
"""conv2d + bias + ReLU in Cython: the fused stage.

The un-fused stages (naive ... tiled conv, then a bias pass and a ReLU pass over the output)
are derived automatically by fastops.registry from conv2d.pyx; this chapter adds only the
last step: do the bias and ReLU inside the tiled conv's write-back.
"""
from fastops.kernels.cython.conv2d import conv2d_tiled_epilogue, ocvec_prepack
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
    Measured by `fastops bench --full --op conv2d_bias_relu --backend cython --stage fused`
    (kernel called directly, out allocated once, interleaved round-robin with PyTorch 2.13
    eager relu_(conv2d(x, w, b)) on oneDNN, float32, 2 threads, medians; AMD EPYC Zen 4 VM
    shared with other jobs): time ratio torch / ours per run, and our GF/s in the last run.
    Runs 5-8 (benchmarks/results/cpu-fused-resnet50-run5..8) are after the ocvec variant of
    the tiled conv (3x3 layers; run 5 before its in-place read and the guided padding pass,
    run 8 with the B-row prefetch of the GEMM path):
                                batch 1                         batch 8
                                runs 5-8             ours       runs 5-8             ours
      res2 3x3 C64 56x56        1.02 1.17 1.08 1.10  220        1.02 1.05 1.05 1.08  216
      res3 3x3 C128 28x28       1.00 1.18 1.10 1.07  226        1.04 1.05 1.05 1.06  228
      res4 3x3 C256 14x14       1.07 1.19 1.12 1.27  237        1.02 1.04 1.06 1.07  232
      res5 3x3 C512 7x7         1.42 1.43 1.35 1.75  235        1.06 1.11 1.12 1.19  261
      1x1 C256 -> K64 56x56     1.26 1.25 1.24 1.23  212        1.16 1.08 1.56 1.29  131
      stem 7x7/2 C3 224x224     1.00 1.03 1.01 0.94  191        0.86 2.23 1.06 2.27  175
      depthwise 3x3 C128 56x56  1.65 1.58 1.55 1.49   58        2.03 2.29 2.42 1.89   43
      median of the set         1.07 1.19 1.12 1.23             1.04 1.08 1.06 1.19
    ("ours": GF/s in run 7; run 8 ran on a busier host, 150-246 GF/s, PyTorch slowed alike.)
    (GF/s count every tap; ocvec skips the ones on zero padding, so res4 / res5 pass the
    230 GF/s FMA peak. PyTorch's own time varies between processes: its stem at batch 8 ran
    at 68-175 GF/s in this session's runs.) Runs 1-4, before ocvec (implicit GEMM for every
    3x3 layer): batch-1 medians 1.00 / 1.06 / 1.02 / 1.10, batch-8 0.98 / 0.97 / 1.00 / 0.89,
    with the batch-8 3x3 layers at 0.81-0.98 (we 172-183 GF/s, oneDNN ~190-230); before the
    dense-column variant, the vectorised padding copy and the equal reduction blocks: batch 1
    0.94 / 1.06, batch 8 0.95 / 0.96; before the direct path and the depthwise kernel: res3-res5
    0.67-0.75, depthwise ~0.5.
    Still missing: everything `tiled` lacks.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  bias: (K,)  out: (N, K, Ho, Wo)
    conv2d_tiled_epilogue(x, w, out, p, bias, True)


def conv2d_bias_relu_fused_run_packed(x, packed, bias, out, p):
    """The fused stage with weights from ocvec_prepack (fastops.nn's run_packed hook)."""
    conv2d_tiled_epilogue(x, packed.w, out, p, bias, True, prepacked=packed.ocvec)


conv2d_bias_relu_fused.prepack = ocvec_prepack
conv2d_bias_relu_fused.run_packed = conv2d_bias_relu_fused_run_packed
