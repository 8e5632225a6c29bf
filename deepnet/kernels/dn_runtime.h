/* deepnet's kernel runtime: the C every compiled kernel module shares, whatever its activation and width.

   Included by the rendered layer loops (deepnet/kernels/layer_loops.h.tp) of the built-in modules
   (deepnet._kernels*) and of every plugin module, so it is written once and never re-rendered. It holds the
   vector types, the math helpers an activation's C expression may call, the block helpers and reductions
   the loops are built from, and the kernel table through which a module hands its loops to the checked
   calls of deepnet._kernels (dn_driver.h runs them). Everything is static: each module gets its own copy,
   so no symbol is shared between extension modules. Cython reads the declarations it needs from
   dn_runtime.pxd. */
#ifndef DN_RUNTIME_H
#define DN_RUNTIME_H

#include <Python.h>   /* Py_ssize_t; already included first by any Cython module */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(__GNUC__)
#error "deepnet's kernels need GCC or Clang (vector extensions)"
#endif

typedef float dn_v8f __attribute__((vector_size(32)));
/* the same vector type at 4-byte alignment, for buffers whose alignment is not known */
typedef float dn_v8u __attribute__((vector_size(32), aligned(4)));

/* Vectors of 8 samples per unit in one batch block: two for narrow layers on AVX (256-bit registers,
   one per vector; two vectors per unit give each layer's dependency chain independent work), else
   one (SSE and NEON registers are 128 bits: two hold a vector). A block of 8 is also compiled for
   narrow layers, to split a batch of 16 over two threads. */
#if defined(__AVX__)
#define DN_NV_NARROW 2
#else
#define DN_NV_NARROW 1
#endif
#define DN_BLOCK_NARROW (8 * DN_NV_NARROW)

/* Largest batch block of any loop, and the batch from which blocks are used. */
#define DN_MAX_BLOCK 16
#define DN_BLOCKED_MIN_BATCH 8
/* Samples in one batch block of the backward pass (every width), and in the 16-sample layout's
   blocks (narrow even widths, where compiled: the kernel table's *_block16). */
#define DN_BACKWARD_BLOCK 8
#define DN_BACKWARD_BLOCK16 16

/* What the compiler was told to target, from its predefined macros (a module's BUILT_FOR). */
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__FMA__)
#define DN_BUILT_FOR "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define DN_BUILT_FOR "avx2+fma"
#elif defined(__AVX__)
#define DN_BUILT_FOR "avx"
#elif defined(__SSE2__)
#define DN_BUILT_FOR "sse2"
#elif defined(__ARM_NEON)
#define DN_BUILT_FOR "neon"
#else
#define DN_BUILT_FOR "generic"
#endif

/* ---- math helpers any activation expression may call ---- */

/* tanh as a rational function, x P(x^2) / Q(x^2), fitted here (minimax in relative error on [0, 9],
   degree 4 over 4 in x^2: 2e-8 in exact arithmetic, a few float32 ulps as evaluated). Unlike libm's
   tanhf it vectorises. For |z| > 9, x^2 is held at 81 so x P / Q = z tanh(9) / 9 > 1, and the
   result is clamped to +-1 (float32 tanh is +-1 there). Written as two one-sided selects and a
   copysign, which the compiler turns into few vector instructions (nested ?: became a dozen).
   -0 stays -0 and NaN stays NaN (comparisons with NaN are false, so neither select touches it). */
static inline float dn_tanhf(float z) {
    float t = z * z;
    t = t > 81.0f ? 81.0f : t;
    float p = (((1.3355214323329534e-08f * t + 2.0609512665960457e-05f) * t + 0.003495615650690246f) * t
               + 0.1338104925017108f) * t + 0.9999999794709015f;
    float q = (((7.776793752266309e-07f * t + 0.00032856788720033787f) * t + 0.025877088278261906f) * t
               + 0.46714364860312746f) * t + 1.0f;
    float r = z * p / q;
    float m = fabsf(r);
    m = m > 1.0f ? 1.0f : m;
    return copysignf(m, r);
}

/* e^x without a libm call, so it vectorises: x = n ln2 + r, |r| <= ln2/2 (ln2 in two parts, so n * ln2_hi
   is exact), Cephes' degree-6 polynomial for e^r (under 1 ulp here), then 2^n as a product of two exact
   powers of two, so results come out right down into the subnormals and up to +inf (x > 88.72).
   NaN stays NaN. */
static inline float dn_pow2i(int n) {   /* 2^n, -126 <= n <= 127 */
    union { unsigned int u; float f; } v;
    v.u = (unsigned int)(n + 127) << 23;
    return v.f;
}
static inline float dn_expf(float x) {
    float xc = x > 89.0f ? 89.0f : (x < -104.0f ? -104.0f : x);
    float j = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* nearest integer */
    float r = (xc - j * 0.693359375f) - j * -2.12194440e-4f;
    float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
               + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    int n = (int)(j == j ? j : 0.0f);
    int h = n / 2;
    return (p * (r * r) + r + 1.0f) * dn_pow2i(h) * dn_pow2i(n - h);
}

/* sin and cos without a libm call, so they vectorise: x = j pi/2 + r, |r| <= pi/4 (pi/2 in three parts,
   Cephes' sinf), minimax polynomials of sin and cos on [-pi/4, pi/4], the quadrant from j. About 1e-7
   absolute for |x| up to 1e4 (1e-6 up to 1e5); beyond, the reduction loses accuracy (no Payne-Hanek)
   but the result stays in [-1, 1]. NaN stays NaN; sin(-0) = -0. */
static inline float dn_sincosf_q(float x, int quarter) {
    float t = x * 0.636619772367581343f;
    float j = fabsf(t) < 4194304.0f ? (t + 12582912.0f) - 12582912.0f : 0.0f;
    float r = ((x - j * 1.5703125f) - j * 4.837512969970703125e-4f) - j * 7.54978995489188216e-8f;
    r = r > 0.85f ? 0.85f : (r < -0.85f ? -0.85f : r);   /* only huge |x| gets clamped */
    float z = r * r;
    float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
    float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * (z * z)
              - 0.5f * z + 1.0f;
    int q = (int)j + quarter;
    float v = (q & 1) ? c : s;
    return (q & 2) ? -v : v;
}
static inline float dn_sinf(float x) { return x == 0.0f ? x : dn_sincosf_q(x, 0); }   /* keeps -0 */
static inline float dn_cosf(float x) { return dn_sincosf_q(x, 1); }

/* Fully unroll the small loops over units and vectors of narrow widths, so a block's state stays
   in registers (wide layers keep their loops: full unrolling would only bloat the code). */
#if defined(__clang__)
#define DN_UNROLL_FULL _Pragma("unroll")
#else
#define DN_UNROLL_FULL _Pragma("GCC unroll 64")
#endif

/* The loops over the 8 lanes that apply an activation's scalar C expression must become vector code,
   which GCC's own vectoriser does not always do (a ?: stays scalar); OpenMP's simd directive (built with
   -fopenmp-simd: no OpenMP runtime) makes it, with selects for ?:. */
#define DN_SIMD _Pragma("omp simd")

/* A chain that reads a layer's weights only when it reaches the layer waits for them when they stream
   from memory (the out-of-order window holds about two layers of a narrow chain, too few to hide a
   miss); so the narrow loops ask for the row DN_PREFETCH_BYTES ahead, every line of it. */
#define DN_PREFETCH_BYTES 2048
static inline __attribute__((always_inline)) void dn_prefetch_row(const float* row, const int row_floats) {
    for (int c = 0; c < (row_floats * 4 + 63) / 64; c++)
        __builtin_prefetch((const char*)row + DN_PREFETCH_BYTES + 64 * c, 0, 3);
}

static inline dn_v8f dn_splat(float x) { dn_v8f v = {x, x, x, x, x, x, x, x}; return v; }

/* a * b + c as one fused multiply-add where the build has them (else two roundings), so that where
   two products meet (x * y + u * v) it is written which one is fused: left to the compiler, the
   8-lane and 16-lane layouts could contract different products and differ in the last bit. */
#if defined(__FMA__)
#define DN_FMA_LANES(n, a, b, c, r) DN_SIMD for (int t_ = 0; t_ < (n); t_++) (r)[t_] = __builtin_fmaf((a)[t_], (b)[t_], (c)[t_])
#else
#define DN_FMA_LANES(n, a, b, c, r) for (int t_ = 0; t_ < (n); t_++) (r)[t_] = (a)[t_] * (b)[t_] + (c)[t_]
#endif
static inline __attribute__((always_inline)) dn_v8f dn_fma(dn_v8f a, dn_v8f b, dn_v8f c) {
    dn_v8f r;
    DN_FMA_LANES(8, a, b, c, r);
    return r;
}

/* The first level of the transposing reduction (dn_reduce8x8) for a pair of vectors (a, b):
   [a0+a2, b0+b2, a1+a3, b1+b3 | the same for lanes 4..7], as the sum of dn_unpacklo(a, b) and
   dn_unpackhi(a, b). Products shuffle like their factors (dn_unpacklo(h * x, h * y) ==
   dn_unpacklo(h, h) * dn_unpacklo(x, y)), so a pair of weight gradients sharing an input comes out
   of two multiplies of pre-shuffled factors with no shuffle of its own (dn_backprop_step of even
   narrow widths). */
#if (defined(__clang__) || __GNUC__ >= 12)
#define DN_UNPACK(name, l0, l1, l2, l3)                                                                    \
    static inline __attribute__((always_inline)) dn_v8f name(dn_v8f a, dn_v8f b) {                         \
        return __builtin_shufflevector(a, b, l0, l0 + 8, l1, l1 + 8, l2, l2 + 8, l3, l3 + 8);              \
    }
#else
#define DN_UNPACK(name, l0, l1, l2, l3)                                                                    \
    static inline __attribute__((always_inline)) dn_v8f name(dn_v8f a, dn_v8f b) {                         \
        dn_v8f r = {a[l0], b[l0], a[l1], b[l1], a[l2], b[l2], a[l3], b[l3]};                               \
        return r;                                                                                          \
    }
#endif
DN_UNPACK(dn_unpacklo, 0, 1, 4, 5)
DN_UNPACK(dn_unpackhi, 2, 3, 6, 7)
/* The remaining two levels of the reduction on n <= 4 pair sums e (e[k] from the vectors 2k, 2k+1):
   r[m] = the sum over the 8 lanes of vector m, m < 2n; lanes from 2n on are 0 (n <= 2 skips the
   pairing of empty halves: a row's last few gradients). */
static inline __attribute__((always_inline)) dn_v8f dn_reduce_pairs(const dn_v8f* e, const int n) {
    const dn_v8f zero = dn_splat(0.0f);
#if (defined(__clang__) || __GNUC__ >= 12)
    dn_v8f f0 = __builtin_shufflevector(e[0], n > 1 ? e[1] : zero, 0, 1, 8, 9, 4, 5, 12, 13)
              + __builtin_shufflevector(e[0], n > 1 ? e[1] : zero, 2, 3, 10, 11, 6, 7, 14, 15);
    if (n <= 2)
        return __builtin_shufflevector(f0, zero, 0, 1, 2, 3, 8, 9, 10, 11)
             + __builtin_shufflevector(f0, zero, 4, 5, 6, 7, 12, 13, 14, 15);
    dn_v8f f1 = __builtin_shufflevector(e[2], n > 3 ? e[3] : zero, 0, 1, 8, 9, 4, 5, 12, 13)
              + __builtin_shufflevector(e[2], n > 3 ? e[3] : zero, 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(f0, f1, 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(f0, f1, 4, 5, 6, 7, 12, 13, 14, 15);
#else
    dn_v8f r = zero;
    for (int k = 0; k < n; k++) {
        r[2 * k] = (e[k][0] + e[k][2]) + (e[k][4] + e[k][6]);
        r[2 * k + 1] = (e[k][1] + e[k][3]) + (e[k][5] + e[k][7]);
    }
    return r;
#endif
}

/* r[m] = sum over the 8 lanes of v[m], m = 0..7, by a transposing tree whose every shuffle is one
   AVX instruction (unpcklps/unpckhps, unpcklpd/unpckhpd, vperm2f128): 14 shuffles and 7 additions for
   8 sums, instead of a horizontal sum each. Lane order of the sum, the same on every path:
   ((v0 + v2) + (v1 + v3)) + ((v4 + v6) + (v5 + v7)). The first level pairs the vectors, the rest is
   dn_reduce_pairs. */
static inline __attribute__((always_inline)) dn_v8f dn_reduce8x8(const dn_v8f* v) {
    dn_v8f e[4];
    for (int k = 0; k < 4; k++)
        e[k] = dn_unpacklo(v[2 * k], v[2 * k + 1]) + dn_unpackhi(v[2 * k], v[2 * k + 1]);
    return dn_reduce_pairs(e, 4);
}

/* Wide layers (the specialised widths 16 and 32, and every width in the any-width loops) sum a
   layer's weight gradients down the columns instead: with dz transposed (t[s] = dz_j(s) for 8
   neighbouring j), the products of sample s for 8 gradients dW[i][j..j+7] are one vector, x[s] t[s],
   and the 8 samples' products are added in the tree dn_reduce8x8 uses,
   ((p0 + p2) + (p1 + p3)) + ((p4 + p6) + (p5 + p7)): the same sums bit for bit, without a shuffle per
   gradient. DN_ROUNDED keeps each product rounded on its own (a compiler
   that contracts a * b + c would otherwise fuse it into the add, as the shuffles prevent it doing in
   dn_reduce8x8). */
#if defined(__AVX512F__)
#define DN_ROUNDED(v) __asm__("" : "+v"(v))
#elif defined(__FMA__)
#define DN_ROUNDED(v) __asm__("" : "+x"(v))
#else
#define DN_ROUNDED(v) ((void)0)
#endif
static inline __attribute__((always_inline)) dn_v8f dn_column_pair(const float* x, const dn_v8f* t, int s) {
    dn_v8f a = x[s] * t[s], b = x[s + 2] * t[s + 2];   /* (products made in the tree's order: few live) */
    DN_ROUNDED(a);
    DN_ROUNDED(b);
    return a + b;
}
static inline __attribute__((always_inline)) dn_v8f dn_column_sum8(const float* x, const dn_v8f* t) {
    const dn_v8f lo = dn_column_pair(x, t, 0) + dn_column_pair(x, t, 1);
    return lo + (dn_column_pair(x, t, 4) + dn_column_pair(x, t, 5));
}
/* The same tree over the vectors themselves (the bias gradients: the products are dz). */
static inline __attribute__((always_inline)) dn_v8f dn_column_sum8_plain(const dn_v8f* t) {
    return ((t[0] + t[2]) + (t[1] + t[3])) + ((t[4] + t[6]) + (t[5] + t[7]));
}
/* t[s][j] = r[j][s]: an 8 x 8 transpose (24 shuffles; element by element where the compiler has no
   __builtin_shufflevector). */
static inline __attribute__((always_inline)) void dn_transpose8x8(const dn_v8f* r, dn_v8f* t) {
#if (defined(__clang__) || __GNUC__ >= 12)
    dn_v8f a[8], b[8];
    for (int k = 0; k < 4; k++) {
        a[2 * k] = dn_unpacklo(r[2 * k], r[2 * k + 1]);
        a[2 * k + 1] = dn_unpackhi(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        b[k] = __builtin_shufflevector(a[k], a[k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        b[k + 1] = __builtin_shufflevector(a[k], a[k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        b[k + 2] = __builtin_shufflevector(a[k + 1], a[k + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        b[k + 3] = __builtin_shufflevector(a[k + 1], a[k + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int s = 0; s < 4; s++) {
        t[s] = __builtin_shufflevector(b[s], b[s + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        t[s + 4] = __builtin_shufflevector(b[s], b[s + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
#else
    for (int s = 0; s < 8; s++)
        for (int j = 0; j < 8; j++) t[s][j] = r[j][s];
#endif
}

/* The three w*w loops of a wide layer (the specialised widths 16 and 32 call these with w a constant,
   the any-width loops, widths from 9, with w known at run time). A compiler keeps an array of w accumulators
   in memory, so every FMA would load and store its sum: these hold the sums of a group of 8 units (the
   last group of a width that is not a multiple of 8: fewer) in registers through all the inputs
   instead, each sum in the same order as one unit at a time. */

/* Call f(args..., n) with n a constant, for a last group of n = 1..7 units (nothing for 0). */
#define DN_LAST_GROUP(n, f, ...) do { switch (n) {                                                         \
    case 1: f(__VA_ARGS__, 1); break; case 2: f(__VA_ARGS__, 2); break; case 3: f(__VA_ARGS__, 3); break; \
    case 4: f(__VA_ARGS__, 4); break; case 5: f(__VA_ARGS__, 5); break; case 6: f(__VA_ARGS__, 6); break; \
    case 7: f(__VA_ARGS__, 7); break; default: break; } } while (0)

/* z_j = b_j + sum_i h_i W_ij for units jb .. jb + n - 1. */
static inline __attribute__((always_inline)) void dn_wide_z_group(const float* p, const dn_v8f* h, dn_v8f* z,
                                                                  const int w, const int jb, const int n) {
    dn_v8f acc[8];
    DN_UNROLL_FULL
    for (int j = 0; j < n; j++) acc[j] = dn_splat(p[w * w + jb + j]);
    for (int i = 0; i < w; i++) {
        const dn_v8f hi = h[i];
        const float* pr = p + i * w + jb;
        DN_UNROLL_FULL
        for (int j = 0; j < n; j++) acc[j] += hi * pr[j];
    }
    DN_UNROLL_FULL
    for (int j = 0; j < n; j++) z[jb + j] = acc[j];
}
/* z = b + h W (z and h one vector per unit). */
static inline __attribute__((always_inline)) void dn_wide_z(const float* p, const dn_v8f* h, dn_v8f* z, const int w) {
    int jb = 0;
    for (; jb + 8 <= w; jb += 8) dn_wide_z_group(p, h, z, w, jb, 8);
    DN_LAST_GROUP(w - jb, dn_wide_z_group, p, h, z, w, jb);
}

/* g_i += W[i] . dz for inputs ib .. ib + n - 1, j ascending. */
static inline __attribute__((always_inline)) void dn_wide_g_group(const float* p, dn_v8f* g, const dn_v8f* dz,
                                                                  const int w, const int ib, const int n) {
    dn_v8f acc[8];
    DN_UNROLL_FULL
    for (int i = 0; i < n; i++) acc[i] = g[ib + i];
    for (int j = 0; j < w; j++) {
        const dn_v8f dj = dz[j];
        DN_UNROLL_FULL
        for (int i = 0; i < n; i++) acc[i] += p[(ib + i) * w + j] * dj;
    }
    DN_UNROLL_FULL
    for (int i = 0; i < n; i++) g[ib + i] = acc[i];
}
/* g[i] += W[i] . dz: g through the layer's (old) weights. */
static inline __attribute__((always_inline)) void dn_wide_g(const float* p, dn_v8f* g, const dn_v8f* dz, const int w) {
    int ib = 0;
    for (; ib + 8 <= w; ib += 8) dn_wide_g_group(p, g, dz, w, ib, 8);
    DN_LAST_GROUP(w - ib, dn_wide_g_group, p, g, dz, w, ib);
}

/* n <= 8 gradient entries from v at e (started when `first`); a whole vector where n is 8. */
static inline __attribute__((always_inline)) void dn_add_entries(float* e, const dn_v8f v, const int n,
                                                                 const int first) {
    if (n == 8) {
        dn_v8u* q = (dn_v8u*)e;
        *q = first ? v : *q + v;
        return;
    }
    for (int j = 0; j < n; j++) e[j] = first ? v[j] : e[j] + v[j];
}
/* The gradients of units jb .. jb + n - 1: dz transposed (missing units as zeros) and each input's n
   gradients summed down the columns (dn_column_sum8), then the n bias gradients. */
static inline __attribute__((always_inline)) void dn_wide_gradients_group(const dn_v8u* hk, const dn_v8f* dz,
                                                                          float* gk, const int w, const int first,
                                                                          const int jb, const int n) {
    dn_v8f r[8], t[8];
    DN_UNROLL_FULL
    for (int j = 0; j < 8; j++) r[j] = j < n ? dz[jb + j] : dn_splat(0.0f);
    dn_transpose8x8(r, t);
    for (int i = 0; i < w; i++)
        dn_add_entries(gk + i * w + jb, dn_column_sum8((const float*)(hk + i), t), n, first);
    dn_add_entries(gk + w * w + jb, dn_column_sum8_plain(t), n, first);
}
/* The layer's gradient row [dW (i, j) | db] into gk (started when `first`), from the layer inputs hk
   and dz. */
static inline __attribute__((always_inline)) void dn_wide_gradients(const dn_v8u* hk, const dn_v8f* dz, dn_v8u* gk,
                                                                    const int w, const int first) {
    float* row = (float*)gk;
    int jb = 0;
    for (; jb + 8 <= w; jb += 8) dn_wide_gradients_group(hk, dz, row, w, first, jb, 8);
    DN_LAST_GROUP(w - jb, dn_wide_gradients_group, hk, dz, row, w, first, jb);
}

/* p[m] -= lr * gk[m] for one layer's row of n floats (neither need be aligned): vectors of 16 on
   AVX-512 (one register; elsewhere GCC moves such a vector in pieces), of 8, one of 4 (width 4's row is
   20 floats), then single floats. Always inlined, so that n is a constant at every call and the loops
   unroll (an out-of-line copy with n unknown is slow). */
typedef float dn_v4f __attribute__((vector_size(16)));
typedef float dn_v4u __attribute__((vector_size(16), aligned(4)));
typedef float dn_v16f __attribute__((vector_size(64)));
typedef float dn_v16u __attribute__((vector_size(64), aligned(4)));
/* Whether the weights an SGD pass wrote are all finite, summed as it writes them: x * 0 is 0 for a
   finite x and NaN for an infinite or NaN one, so these sums are NaN exactly when some x was not. One
   multiply-add per vector on values already in registers, instead of a pass over the rows afterwards;
   a loop keeps one in registers and returns dn_finite_ok of it. */
typedef struct {
#if defined(__AVX512F__)
    dn_v16f v16;
#endif
    dn_v8f v8;
    dn_v4f v4;
    float v1;
} dn_finite;
static inline dn_finite dn_finite_start(void) {
    dn_finite f;
    memset(&f, 0, sizeof(f));
    return f;
}
static inline int dn_finite_ok(const dn_finite* f) {
    float sum = f->v1;
    for (int t = 0; t < 8; t++) sum += f->v8[t] + (t < 4 ? f->v4[t] : 0.0f);
#if defined(__AVX512F__)
    for (int t = 0; t < 16; t++) sum += f->v16[t];
#endif
    return sum == sum;
}

/* p -= lr * gk over a row of n floats, noting in f whether the new values are finite. */
static inline __attribute__((always_inline)) void dn_sgd_row(float* p, const float* gk, float lr, const int n,
                                                             dn_finite* f) {
    int m = 0;
#if defined(__AVX512F__)
    for (; m + 16 <= n; m += 16) {
        const dn_v16f x = *(dn_v16u*)(p + m) - lr * *(const dn_v16u*)(gk + m);
        *(dn_v16u*)(p + m) = x;
        f->v16 += x * 0.0f;
    }
#endif
    for (; m + 8 <= n; m += 8) {
        const dn_v8f x = *(dn_v8u*)(p + m) - lr * *(const dn_v8u*)(gk + m);
        *(dn_v8u*)(p + m) = x;
        f->v8 += x * 0.0f;
    }
    for (; m + 4 <= n; m += 4) {
        const dn_v4f x = *(dn_v4u*)(p + m) - lr * *(const dn_v4u*)(gk + m);
        *(dn_v4u*)(p + m) = x;
        f->v4 += x * 0.0f;
    }
    for (; m < n; m++) {
        p[m] -= lr * gk[m];
        f->v1 += p[m] * 0.0f;
    }
}

/* f(args..., a, b, c), its value, with each flag a constant in its own call: an always-inlined loop then
   tests no flag per iteration (GCC does not unswitch them). */
#define DN_CONSTANT_FLAGS(f, a, b, c, ...)                                                                 \
    ((a) ? ((b) ? ((c) ? f(__VA_ARGS__, 1, 1, 1) : f(__VA_ARGS__, 1, 1, 0))                               \
                : ((c) ? f(__VA_ARGS__, 1, 0, 1) : f(__VA_ARGS__, 1, 0, 0)))                              \
         : ((b) ? ((c) ? f(__VA_ARGS__, 0, 1, 1) : f(__VA_ARGS__, 0, 1, 0))                               \
                : ((c) ? f(__VA_ARGS__, 0, 0, 1) : f(__VA_ARGS__, 0, 0, 0))))

/* The end of the run of layers a forward pass takes from `layer` before its next save (the rest of the
   chunk when it saves nothing; save_every >= 1 when it does). Each pass saves its state before a run and
   then runs the run's layers in a loop with no test of its own for the saves, so that the loop keeps
   the state in registers instead of storing it every layer for the save's sake. */
static inline Py_ssize_t dn_run_end(Py_ssize_t layer, Py_ssize_t n_layers, const float* saves,
                                    Py_ssize_t save_every) {
    return saves != NULL && n_layers - layer > save_every ? layer + save_every : n_layers;
}

/* The first 32-byte boundary in a scratch area (_scratch_size leaves 8 floats of slack for it):
   vectors of the any-width path live there, since a work buffer from NumPy or malloc is only
   16-byte aligned. */
static inline dn_v8f* dn_align32(float* p) {
    return (dn_v8f*)(((uintptr_t)p + 31) & ~(uintptr_t)31);
}

/* Block <-> [width][batch] array, columns s0 .. s0+nb (nb <= 8*nv), padding with zeros. */
static inline void dn_load_block(dn_v8f* dst, const float* src, int w, int nv, Py_ssize_t B,
                                 Py_ssize_t s0, Py_ssize_t nb) {
    for (int i = 0; i < w; i++)
        for (int v = 0; v < nv; v++) {
            dn_v8f x = dn_splat(0.0f);   /* whole, so no lane is ever left unset */
            for (int t = 0; t < 8; t++)
                if (v * 8 + t < nb) x[t] = src[i * B + s0 + v * 8 + t];
            dst[i * nv + v] = x;
        }
}
static inline void dn_store_block(float* dst, const dn_v8f* src, int w, int nv, Py_ssize_t B,
                                  Py_ssize_t s0, Py_ssize_t nb) {
    for (int i = 0; i < w; i++)
        for (int v = 0; v < nv; v++)
            for (int t = 0; t < 8; t++) {
                Py_ssize_t s = v * 8 + t;
                if (s < nb) dst[i * B + s0 + s] = src[i * nv + v][t];
            }
}

/* The 8-sample layout's names for what the backward's loops do per layout (layer_loops.h.tp renders
   them once per layout): one vector per unit, and a gradient row's 8 entries from a block's reduction
   r (`two` has a meaning in the 16-sample layout only). */
static inline void dn_load_block8(dn_v8f* dst, const float* src, int w, Py_ssize_t B, Py_ssize_t s0,
                                  Py_ssize_t nb) {
    dn_load_block(dst, src, w, 1, B, s0, nb);
}
static inline void dn_store_block8(float* dst, const dn_v8f* src, int w, Py_ssize_t B, Py_ssize_t s0,
                                   Py_ssize_t nb) {
    dn_store_block(dst, src, w, 1, B, s0, nb);
}
static inline __attribute__((always_inline)) dn_v8f dn_add_block(dn_v8f gk, dn_v8f r, int first, int two) {
    (void)two;
    return first ? r : gk + r;
}

/* ---- the 16-sample layout: one 16-lane vector per unit (AVX-512's registers) ----
   A 16-lane vector is the two 8-sample vectors of two neighbouring blocks side by side, and every
   helper below does to each 8-lane half exactly what its 8-lane namesake does to a vector: the same
   lanes meet in the same order, so a layer, a reduction and hence a whole backward pass in this layout
   give the 8-lane layout's results bit for bit. On AVX-512 each helper is one instruction on a zmm
   register (the unpacks and vshufps work within 128-bit lanes, the last level of the reduction is a
   vshuff32x4), so a batch of 16 costs about the instructions of one 8-sample block; elsewhere the
   compiler splits the vectors in two. Needs __builtin_shufflevector (GCC 12, Clang). */
#if (defined(__clang__) || __GNUC__ >= 12)
#define DN_HAS_V16 1
/* Whether a 16-lane vector is one register here (AVX-512): only then are the layout's loops fast
   (elsewhere their state spills: tests run them for their results, and training only the halves of
   DN_V16_HALVES_WIDTH below). The AVX-512 build prefers 256-bit vectors where GCC vectorises loops
   itself, which would cut the activation's lane loops of a 16-lane vector in two; the layout's
   functions (DN_V16_FN) ask for 512 bits. */
#if defined(__AVX512F__)
#define DN_V16_NATIVE 1
#if defined(__clang__)
#define DN_V16_FN
#else
#define DN_V16_FN __attribute__((target("prefer-vector-width=512")))
#endif
#else
#define DN_V16_NATIVE 0
/* (the halves below take the place of some of them, which then go unused) */
#define DN_V16_FN __attribute__((unused))
#endif
/* The width whose paired segments split (recompute2, carry, update) runs the 16-sample layout as two
   8-lane halves where a 16-lane vector is not one register but AVX2's sixteen hold a unit's halves
   (layer_loops.h.tp, "halves"); 0: none. GCC keeps a 64-byte vector it has no register for in memory,
   so the layout's own loops spill there. */
#if !DN_V16_NATIVE && defined(__AVX2__) && defined(__FMA__)
#define DN_V16_HALVES_WIDTH 4
#else
#define DN_V16_HALVES_WIDTH 0
#endif

static inline __attribute__((always_inline)) dn_v16f dn_splat16(float x) {
    dn_v16f v = {x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
    return v;
}
static inline __attribute__((always_inline)) dn_v16f dn_fma16(dn_v16f a, dn_v16f b, dn_v16f c) {
    dn_v16f r;
    DN_FMA_LANES(16, a, b, c, r);
    return r;
}
static inline __attribute__((always_inline)) dn_v16f dn_join16(dn_v8f lo, dn_v8f hi) {
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
static inline __attribute__((always_inline)) dn_v8f dn_low8(dn_v16f v) {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
}
static inline __attribute__((always_inline)) dn_v8f dn_high8(dn_v16f v) {
    return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}
/* dn_unpacklo / dn_unpackhi on each half */
static inline __attribute__((always_inline)) dn_v16f dn_unpacklo16(dn_v16f a, dn_v16f b) {
    return __builtin_shufflevector(a, b, 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29);
}
static inline __attribute__((always_inline)) dn_v16f dn_unpackhi16(dn_v16f a, dn_v16f b) {
    return __builtin_shufflevector(a, b, 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
}
/* The 16-sample layout's reduction past its first level (the pair sums e, made as in dn_reduce8x8):
   each 128-bit lane holds 4 samples, so the rest of the tree works on whole lanes. dn_quad16 is the
   second level: pair sums p and q (two gradients each) to 4 gradients' sums over each lane's 4 samples
   ([p's two, q's two] a lane, as dn_reduce_pairs's first step does for each half). */
static inline __attribute__((always_inline)) dn_v16f dn_quad16(dn_v16f p, dn_v16f q) {
    return __builtin_shufflevector(p, q, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
         + __builtin_shufflevector(p, q, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
/* [a's lane odd, a's lane 2 + odd, b's lane odd, b's lane 2 + odd] (one vshuff32x4) */
static inline __attribute__((always_inline)) dn_v16f dn_lanes16(dn_v16f a, dn_v16f b, const int odd) {
    return odd ? __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)
               : __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
}
/* The last two levels for n <= 4 quads f: lo[4k..4k+3] = quad k's sums over samples 0..7 (its lanes
   0 + 1), hi over samples 8..15 (lanes 2 + 3); what dn_reduce_pairs gives each 8-lane half, with 6
   whole-lane shuffles (one issue each) for 16 gradients instead of 4 two-source permutes (two each)
   and 2 extractions. */
static inline __attribute__((always_inline)) void dn_reduce_quads16(const dn_v16f* f, const int n, dn_v16f* lo,
                                                                    dn_v16f* hi) {
    if (n == 1) {   /* lanes (0 + 1, 1 + 0, 2 + 3, 3 + 2): the adds commute, so both halves are whole */
        const dn_v16f t = f[0] + __builtin_shufflevector(f[0], f[0], 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8,
                                                         9, 10, 11);
        *lo = t;
        *hi = __builtin_shufflevector(t, t, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
        return;
    }
    const dn_v16f zero = dn_splat16(0.0f);
    /* [f0 over 0..7, f0 over 8..15, f1 over 0..7, f1 over 8..15], and the same for f2, f3 */
    const dn_v16f s0 = dn_lanes16(f[0], f[1], 0) + dn_lanes16(f[0], f[1], 1);
    const dn_v16f s1 = n > 2 ? dn_lanes16(f[2], n > 3 ? f[3] : zero, 0) + dn_lanes16(f[2], n > 3 ? f[3] : zero, 1)
                             : s0;
    *lo = dn_lanes16(s0, s1, 0);
    *hi = dn_lanes16(s0, s1, 1);
}
/* count (4, 8, 12 or 16) gradients of a row from dn_reduce_quads16's halves: what two 8-sample blocks
   add in turn, the first block starting the sums when `first`; `two` = 0 when the high half holds
   padding only. */
static inline __attribute__((always_inline)) void dn_add_quads16(float* gk, dn_v16f lo, dn_v16f hi, const int count,
                                                                 int first, int two) {
    if (count == 16) {
        const dn_v16f started = first ? lo : *(const dn_v16u*)gk + lo;
        *(dn_v16u*)gk = two ? started + hi : started;
        return;
    }
    if (count >= 8) {
        const dn_v8f l = dn_low8(lo), started = first ? l : *(const dn_v8u*)gk + l;
        *(dn_v8u*)gk = two ? started + dn_low8(hi) : started;
    }
    if (count % 8) {
        const int o = count - 4;
        const dn_v4f l = o ? __builtin_shufflevector(lo, lo, 8, 9, 10, 11)
                           : __builtin_shufflevector(lo, lo, 0, 1, 2, 3);
        const dn_v4f h = o ? __builtin_shufflevector(hi, hi, 8, 9, 10, 11)
                           : __builtin_shufflevector(hi, hi, 0, 1, 2, 3);
        const dn_v4f started = first ? l : *(const dn_v4u*)(gk + o) + l;
        *(dn_v4u*)(gk + o) = two ? started + h : started;
    }
}
/* dn_load_block / dn_store_block of 16 columns, one 16-lane vector per unit. */
static inline void dn_load_block16(dn_v16f* dst, const float* src, int w, Py_ssize_t B, Py_ssize_t s0,
                                   Py_ssize_t nb) {
    dn_v8f halves[2];
    for (int i = 0; i < w; i++) {
        dn_load_block(halves, src + i * B, 1, 2, B, s0, nb);
        dst[i] = dn_join16(halves[0], halves[1]);
    }
}
static inline void dn_store_block16(float* dst, const dn_v16f* src, int w, Py_ssize_t B, Py_ssize_t s0,
                                    Py_ssize_t nb) {
    for (int i = 0; i < w; i++) {
        dn_v8f halves[2] = {dn_low8(src[i]), dn_high8(src[i])};
        dn_store_block(dst + i * B, halves, 1, 2, B, s0, nb);
    }
}
#else
#define DN_HAS_V16 0
#define DN_V16_NATIVE 0
#define DN_V16_HALVES_WIDTH 0
#endif

/* Floats per layer in a gradient buffer: a row padded to a multiple of 8 (whole vectors). */
static inline Py_ssize_t dn_grad_stride(Py_ssize_t w) { return (w * w + w + 7) / 8 * 8; }

/* ---- the kernel table: what a module's loops offer the checked calls (dn_driver.h) ---- */

/* The forward pass through n_layers on h [w][B], part `part` of n_parts of the batch (see dn_forward_*). */
typedef void (*dn_forward_fn)(const float* params, Py_ssize_t n_layers, float* h, Py_ssize_t w, Py_ssize_t B,
                              float alpha, float* saves, Py_ssize_t save_every, float* scratch,
                              Py_ssize_t part, Py_ssize_t n_parts);
/* Recompute one block (or sample) through one segment from its saved state into hbuf/dbuf. */
typedef void (*dn_recompute_fn)(const float* params, Py_ssize_t seg_n, const float* sv, Py_ssize_t w,
                                Py_ssize_t B, Py_ssize_t s0, Py_ssize_t nb, float alpha, float* hbuf,
                                float* dbuf, float* scratch);
/* Back-propagate one block (or sample) through a recomputed segment (gradients started when `first`,
   applied when `last`). Loops that apply weight updates return whether every weight they wrote is
   finite (dn_finite); the others return 1. */
typedef int (*dn_backprop_fn)(float* params, Py_ssize_t seg_n, float* g, Py_ssize_t w, Py_ssize_t B,
                              Py_ssize_t s0, Py_ssize_t nb, const float* hbuf, const float* dbuf, float* grad,
                              float* scratch, float lr, int first, int last);
/* Back-propagation of one (segment, block) (bp_*) and recomputation of the next (rc_*) in one loop. */
typedef int (*dn_fused_fn)(float* bp_params, Py_ssize_t bp_n, float* g, Py_ssize_t B, Py_ssize_t bp_s0,
                           Py_ssize_t bp_nb, const float* bp_hbuf, const float* bp_dbuf, float* grad, float lr,
                           int first, int last, const float* rc_params, Py_ssize_t rc_n, const float* rc_sv,
                           Py_ssize_t rc_s0, Py_ssize_t rc_nb, float alpha, float* rc_hbuf, float* rc_dbuf);

/* The back-propagation of one block through a recomputed segment in two passes, the same results as one
   dn_backprop_fn: carry g down (each layer's dz left in dbuf; a loop may start the gradient rows in grad
   there, started when `first`, as the 16-sample layout's carry does with db), then make and apply the
   rest of the weight gradients. */
typedef void (*dn_carry_fn)(const float* params, Py_ssize_t seg_n, float* g, Py_ssize_t w, Py_ssize_t B,
                            Py_ssize_t s0, Py_ssize_t nb, float* dbuf, float* grad, int first, float* scratch);
typedef int (*dn_update_fn)(float* params, Py_ssize_t seg_n, Py_ssize_t w, Py_ssize_t nb, const float* hbuf,
                            const float* dbuf, float* grad, float* scratch, float lr, int first, int last);
/* Two recomputations (of the same block through two segments, a and b) in one loop: each is one
   dependency chain a layer long, and one chain leaves the core idle part of the time (dn_driver.h). */
typedef void (*dn_recompute2_fn)(const float* params_a, Py_ssize_t n_a, const float* sv_a, float* hbuf_a,
                                 float* dbuf_a, const float* params_b, Py_ssize_t n_b, const float* sv_b,
                                 float* hbuf_b, float* dbuf_b, Py_ssize_t w, Py_ssize_t B, Py_ssize_t s0,
                                 Py_ssize_t nb, float alpha);

/* The loops of one (activation, width variant). */
typedef struct {
    dn_forward_fn forward;
    dn_recompute_fn recompute_block;    /* batch >= DN_BLOCKED_MIN_BATCH: blocks of DN_BACKWARD_BLOCK */
    dn_backprop_fn backprop_block;
    dn_fused_fn fused_block;            /* NULL: this width recomputes, then back-propagates */
    dn_carry_fn carry_block;            /* the same back-propagation in two passes (dn_driver.h; NULL: not
                                           compiled for this width) */
    dn_update_fn update_block;
    dn_recompute_fn recompute_sample;   /* smaller batches: one sample at a time */
    dn_backprop_fn backprop_sample;
    /* blocks of DN_BACKWARD_BLOCK16 samples in 16-lane vectors, the same results bit for bit (NULL:
       not compiled for this width) */
    dn_recompute_fn recompute_block16;
    dn_backprop_fn backprop_block16;
    dn_fused_fn fused_block16;
    dn_carry_fn carry_block16;
    dn_update_fn update_block16;
    dn_recompute2_fn recompute2_block16;    /* NULL: not compiled for this width */
} dn_kernel;

/* A module's loops: kernels[a * (n_widths + 1) + v] for activation a and variant v, where variant v <
   n_widths has width widths[v] as a compile-time constant and variant n_widths runs any width; with what
   they were compiled from. Handed between modules in a capsule named DN_TABLE_CAPSULE; the name carries
   the layout's version, and a plugin's cache key covers this header, so a module built against another
   layout is never used. */
typedef struct {
    int n_activations;
    int n_widths;
    const int* widths;
    const dn_kernel* kernels;
    const char* built_for;                 /* DN_BUILT_FOR of the loops' compile */
    const char* const* names;              /* [activation] */
    const char* const* forward_c;          /* [activation]: the C expressions compiled */
    const char* const* derivative_c;
} dn_kernel_table;

#define DN_TABLE_CAPSULE "deepnet.kernels.dn_kernel_table.v5"

/* The loops of activation `act` for width w: its own variant if it has one, else the any-width one. */
static inline const dn_kernel* dn_kernel_for(const dn_kernel_table* t, int act, Py_ssize_t w) {
    int v = 0;
    while (v < t->n_widths && t->widths[v] != w) v++;
    return &t->kernels[act * (t->n_widths + 1) + v];
}

/* ---- what a module with loops exports: the same for a build module and a plugin's ---- */

/* activation_index(name): the index of a compiled activation in the module's table (ValueError if the
   module does not hold it). */
static PyObject* dn_activation_index(PyObject* module, PyObject* name) {
    PyObject* names = PyObject_GetAttrString(module, "ACTIVATION_NAMES");
    if (names == NULL) return NULL;
    PyObject* index = PyObject_CallMethod(names, "index", "O", name);
    Py_DECREF(names);
    return index;
}

static PyMethodDef dn_table_methods[] = {
    {"activation_index", dn_activation_index, METH_O,
     "Index of a compiled activation in this module's kernel table (ValueError if not compiled here)."},
    {NULL, NULL, 0, NULL},
};

static int dn_add_object(PyObject* module, const char* name, PyObject* value) {
    if (value == NULL) return -1;
    int rc = PyModule_AddObject(module, name, value);
    if (rc < 0) Py_DECREF(value);
    return rc;
}

/* Adds to `module`: ACTIVATION_NAMES, WIDTH_VARIANTS, ACTIVATION_DEFINITIONS ((name, forward_c,
   derivative_c) per activation: a cached plugin build is checked against its source), BUILT_FOR,
   KERNEL_TABLE (the table, for the checked calls of a build module) and activation_index. */
static int dn_add_table_attributes(PyObject* module, const dn_kernel_table* t) {
    PyObject* names = PyList_New(t->n_activations);
    PyObject* definitions = PyList_New(t->n_activations);
    PyObject* widths = PyList_New(t->n_widths);
    if (names == NULL || definitions == NULL || widths == NULL) goto fail;
    for (int a = 0; a < t->n_activations; a++) {
        PyObject* name = PyUnicode_FromString(t->names[a]);
        PyObject* definition = Py_BuildValue("(sss)", t->names[a], t->forward_c[a], t->derivative_c[a]);
        if (name == NULL || definition == NULL) { Py_XDECREF(name); Py_XDECREF(definition); goto fail; }
        PyList_SET_ITEM(names, a, name);
        PyList_SET_ITEM(definitions, a, definition);
    }
    for (int v = 0; v < t->n_widths; v++) {
        PyObject* width = PyLong_FromLong(t->widths[v]);
        if (width == NULL) goto fail;
        PyList_SET_ITEM(widths, v, width);
    }
    if (dn_add_object(module, "ACTIVATION_NAMES", names) < 0) { names = NULL; goto fail; }
    names = NULL;
    if (dn_add_object(module, "ACTIVATION_DEFINITIONS", definitions) < 0) { definitions = NULL; goto fail; }
    definitions = NULL;
    if (dn_add_object(module, "WIDTH_VARIANTS", widths) < 0) { widths = NULL; goto fail; }
    widths = NULL;
    if (dn_add_object(module, "BUILT_FOR", PyUnicode_FromString(t->built_for)) < 0) goto fail;
    if (dn_add_object(module, "KERNEL_TABLE", PyCapsule_New((void*)t, DN_TABLE_CAPSULE, NULL)) < 0) goto fail;
    return PyModule_AddFunctions(module, dn_table_methods);
fail:
    Py_XDECREF(names);
    Py_XDECREF(definitions);
    Py_XDECREF(widths);
    return -1;
}

#endif /* DN_RUNTIME_H */
