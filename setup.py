"""The one compiled piece: rmlx/_aligned_sgemm.c (why: its header comment and rmlx/blas.py). Optional:
without a C compiler the install goes on and MLX calls MKL's cblas_sgemm directly (``rmlx.blas.in_use``)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("rmlx._aligned_sgemm", ["rmlx/_aligned_sgemm.c"], optional=True,
                             extra_compile_args=["-O2"])])
