/* How often this CPU's divider accepts a packed single-precision division (vdivps), in cycles, for 8-lane
   (ymm) and, where the compiler targets AVX-512, 16-lane (zmm) vectors; and the clock (probe_clock.h).
   bench/floor.py compiles it with -march=native and reads its one line:
   "clock_ghz C div8_cycles D8 [div16_cycles D16]".

   Eight independent chains q = d / q (each value stays normal: it alternates between two numbers) keep
   the divider busy, since a division's latency (~10 cycles) is shorter than eight issues. The empty asm
   statements keep the compiler from merging the chains, which start equal. Best of several repetitions
   (the fastest clock, the shortest time a division): a shared machine only ever makes a run slower. */
#include <immintrin.h>
#include <stdio.h>

#include "probe_clock.h"

#define ITERATIONS 20000000L
#define REPETITIONS 5

#define CHAINS(OP, R) \
    q0 = OP(d, q0); q1 = OP(d, q1); q2 = OP(d, q2); q3 = OP(d, q3); \
    q4 = OP(d, q4); q5 = OP(d, q5); q6 = OP(d, q6); q7 = OP(d, q7); \
    __asm__ volatile("" : "+" R(q0), "+" R(q1), "+" R(q2), "+" R(q3), "+" R(q4), "+" R(q5), "+" R(q6), "+" R(q7))

static float sink;

/* Seconds between two independent divisions of one vector type (its set1, div and first-lane intrinsics,
   and the asm constraint of its registers). */
#define SECONDS_PER_DIVISION(NAME, VEC, SET1, DIV, ADD, FIRST, R) \
    static double NAME(void) { \
        VEC d = SET1(1.0001f), q0 = d, q1 = d, q2 = d, q3 = d, q4 = d, q5 = d, q6 = d, q7 = d; \
        double t0 = now(); \
        for (long i = 0; i < ITERATIONS; i++) { CHAINS(DIV, R); } \
        double t = now() - t0; \
        sink += FIRST(ADD(q0, q7)); \
        return t / (8.0 * ITERATIONS); \
    }

SECONDS_PER_DIVISION(seconds_div8, __m256, _mm256_set1_ps, _mm256_div_ps, _mm256_add_ps, _mm256_cvtss_f32, "x")
#ifdef __AVX512F__
SECONDS_PER_DIVISION(seconds_div16, __m512, _mm512_set1_ps, _mm512_div_ps, _mm512_add_ps, _mm512_cvtss_f32, "v")
#endif

/* The least disturbed figures: the fastest clock seen and the shortest time between divisions. */
static void keep_min(double* best, double x) { if (x < *best) *best = x; }

int main(void) {
    double hz = 0.0, div8 = 1e9, div16 = 1e9;
    for (int r = 0; r < REPETITIONS; r++) {
        double f = clock_hz();
        if (f > hz) hz = f;
        keep_min(&div8, seconds_div8());
#ifdef __AVX512F__
        keep_min(&div16, seconds_div16());
#endif
    }
    printf("clock_ghz %.3f div8_cycles %.2f", hz / 1e9, div8 * hz);
#ifdef __AVX512F__
    printf(" div16_cycles %.2f", div16 * hz);
#else
    (void)div16;
#endif
    printf("\n");
    return sink == 12345.0f;   /* uses the chains' results, so they are computed */
}
