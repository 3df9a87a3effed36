/* MXFP8 quantization with MLX's arithmetic, vectorised (rmlx/nn/mxcodec.py).
 *
 * MLX 0.32's CPU backend quantizes to mxfp8 in a scalar loop, ~9 ns per value on one thread: ~107 s of
 * one core for the 11.8 G decoder weights of a 12B-shaped checkpoint quantized on load
 * (docs/quantization.md, `python benchmarks/bench.py --only codec`). These loops compute the same
 * bytes, one block of 32 values at a time in straight-line code the compiler vectorises, over a range
 * of blocks, so that the caller splits a weight over threads (ctypes releases the GIL).
 *
 * Per block of 32 (reference/mxfp8.py's docstring derives MLX's steps):
 *   k = max|w| / 448 in float32 (rounded to bfloat16 for a bfloat16 input), e = ceil(log2 k)
 *   (0 for k == 0), element = E4M3(w / 2**e) rounded to nearest even and saturated to +-448,
 *   scale byte = e + 127.
 * A block whose k is not finite, or whose e is below -127 (MLX's scale byte wraps there), is left to
 * MLX: the functions return how many such blocks they met, and the caller runs mx.quantize instead.
 * A trained checkpoint has none.
 *
 * Built by setup.py as an optional extension; a Python module only so that it installs like one:
 * rmlx/nn/mxcodec.py loads it with ctypes. Without it, mx.quantize runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { BLOCK = 32 };
#define E4M3_MAX_BITS 0x43E00000        /* 448.0f */
#define E4M3_MIN_NORMAL_BITS (121 << 23) /* 2**-6 */
#define INF_BITS 0x7F800000

/* AVX2 where the CPU has it (chosen at load), else the baseline; the same arithmetic either way */
#if defined(__x86_64__) && defined(__GNUC__)
#define TARGETS __attribute__((target_clones("avx2", "default")))
#else
#define TARGETS
#endif

static inline uint32_t bits_of(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline float float_of(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* round-to-nearest-even of a float32 to bfloat16, as a float32 (k is finite and >= 0 here) */
static inline float round_to_bf16(float x) {
    uint32_t u = bits_of(x);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return float_of(u & 0xFFFF0000u);
}

/* e = ceil(log2 k) for a finite k > 0; sets *ok = 0 when e < -127 */
static inline int ceil_log2(float k, int *ok) {
    int ex;
    const float mant = frexpf(k, &ex); /* k = mant * 2**ex, 0.5 <= mant < 1: exact */
    const int e = mant == 0.5f ? ex - 1 : ex;
    if (e < -127)
        *ok = 0;
    return e;
}

/* one block: q[i] = w[i] / 2**e (exact but where the quotient is a float32 subnormal, which rounds to
 * an E4M3 zero either way), then E4M3. |q| <= 448 * (1 + 2**-23) at most: saturate, then round to the
 * E4M3 grid by adding and subtracting m = 2**(max(E, -6) + 20), E = floor(log2 |q|): the float32
 * addition rounds |q| to a multiple of 2**(max(E, -6) - 3), three mantissa bits (subnormal steps of
 * 2**-9 below 2**-6). The code is the rounded value's bits: exponent - 120 and the top three
 * mantissa bits for a normal E4M3 value, the value times 2**9 for a subnormal one. */
static inline void encode_block(const float *restrict w, float inv, uint8_t *restrict codes) {
    for (int i = 0; i < BLOCK; i++) { /* branch-free: vectorised (setup.py: -fno-trapping-math) */
        const uint32_t qb = bits_of(w[i] * inv);
        const int32_t sign = (int32_t)(qb >> 24) & 0x80;
        int32_t ab = (int32_t)(qb & 0x7FFFFFFFu);
        ab = ab > E4M3_MAX_BITS ? E4M3_MAX_BITS : ab; /* saturate: |q| <= 448 */
        const float a = float_of((uint32_t)ab);
        int32_t mbits = ab & 0x7F800000;
        mbits = mbits < E4M3_MIN_NORMAL_BITS ? E4M3_MIN_NORMAL_BITS : mbits;
        const float m = float_of((uint32_t)(mbits + (20 << 23)));
        const float r = (a + m) - m;
        const int32_t rb = (int32_t)bits_of(r);
        const int32_t normal = (rb >> 20) - (120 << 3);
        const int32_t sub = (int32_t)(r * 512.0f);
        codes[i] = (uint8_t)((rb < E4M3_MIN_NORMAL_BITS ? sub : normal) | sign);
    }
}

/* max |x| over a block as float32 bits: for non-negative floats the integer order is the float order,
 * and a NaN's bits exceed infinity's (0x7F800000), so one integer max finds both */
static inline int32_t amax_bits(const float *restrict x) {
    int32_t m = 0;
    for (int i = 0; i < BLOCK; i++) {
        const int32_t b = (int32_t)(bits_of(x[i]) & 0x7FFFFFFFu);
        m = b > m ? b : m;
    }
    return m;
}

/* one block -> 32 codes and its scale byte; 0 (nothing written) for a block of MLX's own arithmetic
 * (non-finite or tiny: see the header). bf16: k rounded to bfloat16, as MLX divides in the input dtype */
static inline int quantize_block(const float *restrict x, int bf16, uint8_t *restrict codes, uint8_t *scale) {
    const int32_t amax = amax_bits(x);
    float k = float_of((uint32_t)amax) / 448.0f;
    if (!(amax < INF_BITS && isfinite(k)))
        return 0;
    if (bf16)
        k = round_to_bf16(k);
    int ok = isfinite(k);
    const int e = ok && k > 0.0f ? ceil_log2(k, &ok) : 0;
    if (!ok)
        return 0;
    encode_block(x, ldexpf(1.0f, -e), codes); /* -127 <= e <= 120: 2**-e exact */
    *scale = (uint8_t)(e + 127);
    return 1;
}

/* blocks [0, n) of w (float32) -> codes (32 bytes a block) and scale bytes; returns the number of
 * blocks MLX's arithmetic must compute instead */
TARGETS long long rmlx_mxfp8_quantize_f32(const float *w, long long n, uint8_t *codes, uint8_t *scales) {
    long long odd = 0;
    for (long long b = 0; b < n; b++)
        odd += !quantize_block(w + b * BLOCK, 0, codes + b * BLOCK, scales + b);
    return odd;
}

/* the same for bfloat16 input (uint16 bit patterns), widened to float32 (exact). w / 2**e needs no
 * rounding to bfloat16 (8 significant bits stay 8, but for float32 subnormal quotients, which E4M3
 * takes to zero either way) */
TARGETS long long rmlx_mxfp8_quantize_bf16(const uint16_t *w, long long n, uint8_t *codes, uint8_t *scales) {
    long long odd = 0;
    float x[BLOCK];
    for (long long b = 0; b < n; b++) {
        const uint16_t *h = w + b * BLOCK;
        for (int i = 0; i < BLOCK; i++)
            x[i] = float_of((uint32_t)h[i] << 16);
        odd += !quantize_block(x, 1, codes + b * BLOCK, scales + b);
    }
    return odd;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mxfp8",
                                    "MXFP8 quantization loops; loaded with ctypes by rmlx.nn.mxcodec.", -1, NULL};

PyMODINIT_FUNC PyInit__mxfp8(void) { return PyModule_Create(&module); }
