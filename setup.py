"""The compiled pieces, each optional: without a C compiler the install goes on and MLX's own kernels run.

- rmlx/_aligned_sgemm.c: cblas_sgemm with an aligned output in front of MKL's (its header comment and
  rmlx/blas.py); without it MLX calls MKL's cblas_sgemm directly (``rmlx.blas.in_use``).
- rmlx/_mxfp8.c: MXFP8 quantization loops with MLX's arithmetic (its header comment and
  rmlx/nn/mxcodec.py); without it ``mx.quantize`` runs (``rmlx.nn.kernels.in_use``).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("rmlx._aligned_sgemm", ["rmlx/_aligned_sgemm.c"], optional=True,
                             extra_compile_args=["-O2"]),
                   Extension("rmlx._mxfp8", ["rmlx/_mxfp8.c"], optional=True,
                             extra_compile_args=["-O3", "-fno-trapping-math"])])
