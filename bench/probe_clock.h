/* The probes' clock (bench/divider_probe.c, bench/slots_probe.c): a chain of dependent integer adds,
   one a cycle on every x86-64 core, timed by the monotonic clock. */
#ifndef PROBE_CLOCK_H
#define PROBE_CLOCK_H
#include <time.h>

#define CLOCK_ITERATIONS 20000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double clock_hz(void) {
    long x = 0;
    double t0 = now();
    for (long i = 0; i < CLOCK_ITERATIONS; i++)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    return 4.0 * CLOCK_ITERATIONS / (now() - t0);
}
#endif
