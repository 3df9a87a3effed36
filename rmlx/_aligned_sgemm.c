/* cblas_sgemm with a 64-byte-aligned output, in front of MKL's (rmlx/blas.py).
 *
 * MLX's CPU allocator hands out buffers 8 bytes past a malloc'd pointer (a size header), so the
 * output of every MLX fp32 matmul starts 8 bytes off a 16-byte boundary. MKL's sgemm writes such a C
 * in 17-40 % more time than a 64-byte-aligned one at the 12B decoder's shapes on a 2-core AMD EPYC
 * (docs/performance.md, `python benchmarks/bench.py --only gemm`). This cblas_sgemm, loaded into the
 * global symbol scope before MKL, computes a large product whose C is not 64-byte aligned into an
 * aligned scratch (rows padded to 64 bytes) with MKL's own cblas_sgemm and copies it into C. The
 * same MKL kernel computes every element; only where it stores them changes.
 *
 * Built by setup.py as an optional extension; a Python module only so that it installs like one:
 * rmlx/blas.py loads it with ctypes and hands it MKL's cblas_sgemm.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn forward_to = NULL; /* MKL's cblas_sgemm */
static double min_products;        /* m * n * k from which: rmlx.blas.ALIGN_FROM, set with forward_to */
static long long redirected = 0;           /* calls computed through the scratch */

enum { ROW_MAJOR = 101, COL_MAJOR = 102, NO_TRANS = 111, CONJ_TRANS = 113, ALIGN = 64 };
/* the largest scratch of one product (rows padded to 64 bytes): a larger C (a whole-vocabulary lm_head:
 * 1127 x 262144 fp32 is 1.2 GB) goes to MKL as it is. MLX's two CPU streams may each have one. */
#define MAX_SCRATCH ((size_t)256 << 20)

/* MKL's cblas_sgemm, where every call ends, and the size (m * n * k) from which a misaligned C goes
 * through the scratch. Call it while no product runs: a product reads the two apart. */
void rmlx_aligned_sgemm_setup(void *fn, double products) {
    __atomic_store_n(&forward_to, (sgemm_fn)fn, __ATOMIC_RELEASE);
    __atomic_store(&min_products, &products, __ATOMIC_RELEASE);
}

size_t rmlx_aligned_sgemm_max_scratch(void) { return MAX_SCRATCH; }

long long rmlx_aligned_sgemm_redirected(void) { return __atomic_load_n(&redirected, __ATOMIC_RELAXED); }

void cblas_sgemm(const int layout, const int transa, const int transb, const int m, const int n,
                 const int k, const float alpha, const float *a, const int lda, const float *b,
                 const int ldb, const float beta, float *c, const int ldc) {
    const sgemm_fn next_sgemm = __atomic_load_n(&forward_to, __ATOMIC_ACQUIRE);
    double from;
    __atomic_load(&min_products, &from, __ATOMIC_ACQUIRE);
    if (next_sgemm == NULL) { /* loaded into the global scope without MKL behind it: never compute nothing */
        fputs("rmlx._aligned_sgemm: cblas_sgemm called before rmlx.blas gave it MKL's\n", stderr);
        abort();
    }
    /* C is rows x cols with row stride ldc in memory order, whatever the layout. Anything MKL would
     * reject goes to MKL as it is, for MKL to report and leave C alone: a layout or transpose that is
     * neither, a negative size, a leading dimension shorter than its matrix's row in memory order. */
    const int rows = layout == ROW_MAJOR ? m : n, cols = layout == ROW_MAJOR ? n : m;
    const int row_major = layout == ROW_MAJOR, a_t = transa != NO_TRANS, b_t = transb != NO_TRANS;
    /* in memory order, A's rows hold k values (row-major, no transpose) or m; B's n or k */
    const int a_row = row_major ? (a_t ? m : k) : (a_t ? k : m), b_row = row_major ? (b_t ? k : n) : (b_t ? n : k);
    const int valid = (layout == ROW_MAJOR || layout == COL_MAJOR) && (transa >= NO_TRANS && transa <= CONJ_TRANS) &&
                      (transb >= NO_TRANS && transb <= CONJ_TRANS) && m >= 0 && n >= 0 && k >= 0 &&
                      lda >= (a_row > 1 ? a_row : 1) && ldb >= (b_row > 1 ? b_row : 1) && ldc >= (cols > 1 ? cols : 1);
    float *scratch = NULL;
    const size_t ld = ((size_t)(cols > 0 ? cols : 0) + ALIGN / sizeof(float) - 1) & ~(ALIGN / sizeof(float) - 1);
    const size_t bytes = (size_t)(rows > 0 ? rows : 0) * ld * sizeof(float);
    if (!valid || (uintptr_t)c % ALIGN == 0 || rows <= 0 || cols <= 0 || ld > INT32_MAX ||
        (double)m * (double)n * (double)k < from || bytes > MAX_SCRATCH ||
        posix_memalign((void **)&scratch, ALIGN, bytes) != 0) {
        next_sgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    if (beta != 0.0f)
        for (int r = 0; r < rows; ++r) memcpy(scratch + r * ld, c + (size_t)r * ldc, cols * sizeof(float));
    next_sgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, scratch, (int)ld);
    for (int r = 0; r < rows; ++r) memcpy(c + (size_t)r * ldc, scratch + r * ld, cols * sizeof(float));
    free(scratch);
    __atomic_add_fetch(&redirected, 1, __ATOMIC_RELAXED);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_aligned_sgemm",
                                    "cblas_sgemm with a 64-byte-aligned output (loaded by rmlx.blas)", -1, NULL,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__aligned_sgemm(void) { return PyModule_Create(&module); }
