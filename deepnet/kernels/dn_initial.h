/* A model's initial core weights drawn again on the fly (deepnet diagnose's weight change), with the
   sums of ||row|| and ||row - initial row|| over a run of rows, in one pass and without a buffer.

   The initial weights are NumPy's Generator(PCG64).uniform(-s, s) draws, cast to float32
   (deepnet.formats.create). This is the same stream, bit for bit: PCG64 (128-bit LCG, XSL-RR output,
   the state stepped before each output), next_double = (next64 >> 11) * 2^-53, uniform = low + range * d
   rounded twice (never fused into one FMA: NumPy's is not). Four lanes, each one step ahead of the last
   and stepped by four (multiplier M^4), so the 128-bit multiplies do not wait on one another. */
#ifndef DN_INITIAL_H
#define DN_INITIAL_H

#include <stdint.h>
#include <math.h>

typedef unsigned __int128 dn_u128;

#define DN_2POW_M53 (1.0 / 9007199254740992.0)
#define DN_PCG_MULT (((dn_u128)2549297995355413924ULL << 64) | (dn_u128)4865540595714422341ULL)

static inline uint64_t dn_pcg_output(dn_u128 state) {
    uint64_t x = (uint64_t)(state >> 64) ^ (uint64_t)state;
    unsigned rot = (unsigned)(state >> 122);
    return (x >> rot) | (x << ((-rot) & 63u));
}

/* Rows first..first+n-1 of (n, r) floats whose first m columns were drawn from the stream at state
   (state_hi, state_lo) with increment (inc_hi, inc_lo), the rest 0: the sums of their norms and of the
   norms of their change. */
#if defined(__GNUC__) && !defined(__clang__)
/* NumPy rounds the product and the sum apart: no FMA. GCC's vectoriser (AVX2 build) changed roundings
   here too (the stored weights were not met exactly), so the loop stays scalar (it is bound by the
   128-bit multiplies anyway). Clang contracts only within one expression, which this code never asks. */
__attribute__((optimize("fp-contract=off", "no-tree-vectorize")))
#endif
static void dn_initial_change_sums(const float* rows, Py_ssize_t n, Py_ssize_t r, Py_ssize_t m,
                                   uint64_t state_hi, uint64_t state_lo, uint64_t inc_hi, uint64_t inc_lo,
                                   double low, double range, double* norms_out, double* changes_out) {
    const dn_u128 mult = DN_PCG_MULT;
    const dn_u128 inc = ((dn_u128)inc_hi << 64) | inc_lo;
    const dn_u128 mult4 = mult * mult * mult * mult;
    const dn_u128 inc4 = inc * (mult * mult * mult + mult * mult + mult + 1);
    dn_u128 s = ((dn_u128)state_hi << 64) | state_lo;
    dn_u128 s0 = s * mult + inc;
    dn_u128 s1 = s0 * mult + inc;
    dn_u128 s2 = s1 * mult + inc;
    dn_u128 s3 = s2 * mult + inc;
    double drawn[4];
    int next = 4;
    double norms = 0.0, changes = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float* row = rows + i * r;
        double sq[4] = {0.0, 0.0, 0.0, 0.0}, dq[4] = {0.0, 0.0, 0.0, 0.0};
        Py_ssize_t j = 0;
        if (next == 4) {
            /* four draws at a time while the row has four columns left (every row, at even widths) */
            for (; j + 4 <= m; j += 4) {
                double d0 = range * ((double)(dn_pcg_output(s0) >> 11) * DN_2POW_M53);
                double d1 = range * ((double)(dn_pcg_output(s1) >> 11) * DN_2POW_M53);
                double d2 = range * ((double)(dn_pcg_output(s2) >> 11) * DN_2POW_M53);
                double d3 = range * ((double)(dn_pcg_output(s3) >> 11) * DN_2POW_M53);
                s0 = s0 * mult4 + inc4;
                s1 = s1 * mult4 + inc4;
                s2 = s2 * mult4 + inc4;
                s3 = s3 * mult4 + inc4;
                double v0 = row[j], v1 = row[j + 1], v2 = row[j + 2], v3 = row[j + 3];
                double e0 = v0 - (double)(float)(low + d0), e1 = v1 - (double)(float)(low + d1);
                double e2 = v2 - (double)(float)(low + d2), e3 = v3 - (double)(float)(low + d3);
                sq[0] += v0 * v0; sq[1] += v1 * v1; sq[2] += v2 * v2; sq[3] += v3 * v3;
                dq[0] += e0 * e0; dq[1] += e1 * e1; dq[2] += e2 * e2; dq[3] += e3 * e3;
            }
        }
        for (; j < m; j++) {
            if (next == 4) {
                drawn[0] = (double)(dn_pcg_output(s0) >> 11) * DN_2POW_M53;
                drawn[1] = (double)(dn_pcg_output(s1) >> 11) * DN_2POW_M53;
                drawn[2] = (double)(dn_pcg_output(s2) >> 11) * DN_2POW_M53;
                drawn[3] = (double)(dn_pcg_output(s3) >> 11) * DN_2POW_M53;
                s0 = s0 * mult4 + inc4;
                s1 = s1 * mult4 + inc4;
                s2 = s2 * mult4 + inc4;
                s3 = s3 * mult4 + inc4;
                next = 0;
            }
            double scaled = range * drawn[next++];
            double v = (double)row[j], d = v - (double)(float)(low + scaled);
            sq[j & 3] += v * v;
            dq[j & 3] += d * d;
        }
        for (; j < r; j++) {
            double v = (double)row[j];
            sq[j & 3] += v * v;
            dq[j & 3] += v * v;
        }
        norms += sqrt((sq[0] + sq[1]) + (sq[2] + sq[3]));
        changes += sqrt((dq[0] + dq[1]) + (dq[2] + dq[3]));
    }
    *norms_out = norms;
    *changes_out = changes;
}

#endif
