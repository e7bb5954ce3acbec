"""Hand-written kernels, one file per op, stages in ladder order."""
