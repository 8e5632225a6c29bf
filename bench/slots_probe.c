/* What a 16-lane (zmm) instruction costs this CPU's floating-point pipes, beside FMAs and adds: the
   measurements behind bench/README.md's count of the width-4 backward's FP work on AVX-512 (issue 23).

       gcc -O2 -march=native bench/slots_probe.c -o /tmp/slots_probe && /tmp/slots_probe

   Each row times a block of eight independent instructions of one kind, alone and with eight
   independent FMAs, eight adds, or both in the same loop body, in core cycles per block (the clock of
   probe_clock.h); a kind that shares no pipe with FMAs adds nothing to the FMAs' 8 cycles of a Zen 4
   (one 16-lane FMA a cycle on its two 256-bit pipes). The divisions' row puts four vdivps beside
   16, 24 and 32 FMAs (how many FMA issues a division takes from the pipes it shares), 32 shuffles
   and 32 adds. The stores' rows put eight 64-byte stores (vmovups, or vextractf64x4 of both halves)
   beside 32 FMAs that read three registers and beside 32 with a {1to16} memory operand, as the
   kernels' are. Best of three
   repetitions (a shared machine only ever makes a run slower). Needs AVX-512. */
#include <stdio.h>

#include "probe_clock.h"

#ifdef __AVX512F__

#define ITERATIONS 2000000L
#define REPETITIONS 3

static float memory[256] __attribute__((aligned(64)));

/* Cycles per iteration of one asm body, which may read `memory` through operand 0. */
#define PROBE(NAME, BODY) \
    static double NAME(double hz) { \
        double best = 1e30; \
        for (int r = 0; r < REPETITIONS; r++) { \
            double t0 = now(); \
            for (long i = 0; i < ITERATIONS; i++) __asm__ volatile(BODY : : "r"(memory)); \
            double t = (now() - t0) / ITERATIONS * hz; \
            if (t < best) best = t; \
        } \
        return best; \
    }

/* Eight FMAs on eight accumulators (4-cycle chains, so up to two a cycle); eight adds writing four
   registers they never read; eight of kind X, written to registers 0-7 from the sources 20 and 21. */
#define FMA8 \
    "vfmadd231ps %%zmm20, %%zmm21, %%zmm8\n\t vfmadd231ps %%zmm20, %%zmm21, %%zmm9\n\t" \
    "vfmadd231ps %%zmm20, %%zmm21, %%zmm10\n\t vfmadd231ps %%zmm20, %%zmm21, %%zmm11\n\t" \
    "vfmadd231ps %%zmm20, %%zmm21, %%zmm12\n\t vfmadd231ps %%zmm20, %%zmm21, %%zmm13\n\t" \
    "vfmadd231ps %%zmm20, %%zmm21, %%zmm14\n\t vfmadd231ps %%zmm20, %%zmm21, %%zmm15\n\t"
#define ADD8 \
    "vaddps %%zmm20, %%zmm21, %%zmm16\n\t vaddps %%zmm20, %%zmm21, %%zmm17\n\t" \
    "vaddps %%zmm20, %%zmm21, %%zmm18\n\t vaddps %%zmm20, %%zmm21, %%zmm19\n\t" \
    "vaddps %%zmm20, %%zmm21, %%zmm16\n\t vaddps %%zmm20, %%zmm21, %%zmm17\n\t" \
    "vaddps %%zmm20, %%zmm21, %%zmm18\n\t vaddps %%zmm20, %%zmm21, %%zmm19\n\t"
#define X8(I) \
    I "%%zmm0\n\t" I "%%zmm1\n\t" I "%%zmm2\n\t" I "%%zmm3\n\t" I "%%zmm4\n\t" I "%%zmm5\n\t" I "%%zmm6\n\t" I "%%zmm7\n\t"
#define DIV4 \
    "vdivps %%zmm20, %%zmm21, %%zmm0\n\t vdivps %%zmm20, %%zmm21, %%zmm1\n\t" \
    "vdivps %%zmm20, %%zmm21, %%zmm2\n\t vdivps %%zmm20, %%zmm21, %%zmm3\n\t"

/* One kind: its four probes. */
#define KIND(NAME, I) \
    PROBE(NAME##_alone, X8(I)) PROBE(NAME##_fma, X8(I) FMA8) PROBE(NAME##_add, X8(I) ADD8) \
    PROBE(NAME##_both, X8(I) FMA8 ADD8)

KIND(fma, "vfmadd231ps %%zmm20, %%zmm21, ")
KIND(add, "vaddps %%zmm20, %%zmm21, ")
KIND(mul, "vmulps %%zmm20, %%zmm21, ")
KIND(shufps, "vshufps $0x4e, %%zmm20, %%zmm21, ")
KIND(unpcklps, "vunpcklps %%zmm20, %%zmm21, ")
KIND(permilps, "vpermilps $0x4e, %%zmm20, ")
KIND(shuff32x4, "vshuff32x4 $0x4e, %%zmm20, %%zmm21, ")
KIND(permps, "vpermps %%zmm20, %%zmm21, ")
KIND(permt2ps, "vpermt2ps %%zmm20, %%zmm21, ")
KIND(blendmps, "vblendmps %%zmm20, %%zmm21, %%zmm22%{%%k1%}\n\t vmovaps %%zmm22, ")
KIND(bcastss, "vbroadcastss 4(%0), ")
KIND(bcastf32x4, "vbroadcastf32x4 16(%0), ")
KIND(load, "vmovups 64(%0), ")
KIND(fma_bcast, "vfmadd231ps 4(%0)%{1to16%}, %%zmm21, ")
PROBE(div4_alone, DIV4)
PROBE(div4_fma16, DIV4 FMA8 FMA8)
PROBE(div4_fma24, DIV4 FMA8 FMA8 FMA8)
PROBE(div4_fma32, DIV4 FMA8 FMA8 FMA8 FMA8)
#define SHUF8 X8("vshufps $0x4e, %%zmm20, %%zmm21, ")
PROBE(div4_shuf32, DIV4 SHUF8 SHUF8 SHUF8 SHUF8)
PROBE(div4_add32, DIV4 ADD8 ADD8 ADD8 ADD8)

/* Eight 64-byte stores to memory[64..191] (the loads and broadcasts read below 64), and eight FMAs
   with a broadcast memory operand. */
#define ST(I) "vmovups %%zmm20, " #I "(%0)\n\t"
#define STORE8 ST(256) ST(320) ST(384) ST(448) ST(512) ST(576) ST(640) ST(704)
#define XST(I) "vextractf64x4 $0, %%zmm20, " #I "(%0)\n\t vextractf64x4 $1, %%zmm20, 32+" #I "(%0)\n\t"
#define XSTORE8 XST(256) XST(320) XST(384) XST(448) XST(512) XST(576) XST(640) XST(704)
#define FMAB8 X8("vfmadd231ps 4(%0)%{1to16%}, %%zmm21, ")
PROBE(store_alone, STORE8)
PROBE(store_fma, FMA8 STORE8 FMA8 FMA8 FMA8)
PROBE(store_fmab, FMAB8 STORE8 FMAB8 FMAB8 FMAB8)
PROBE(fmab_alone, FMAB8 FMAB8 FMAB8 FMAB8)
PROBE(xstore_alone, XSTORE8)
PROBE(xstore_fma, FMA8 XSTORE8 FMA8 FMA8 FMA8)
PROBE(xstore_fmab, FMAB8 XSTORE8 FMAB8 FMAB8 FMAB8)

#define ROW(NAME, LABEL) \
    printf("%-38s %6.1f %6.1f %6.1f %6.1f\n", LABEL, NAME##_alone(hz), NAME##_fma(hz), NAME##_add(hz), \
           NAME##_both(hz));

int main(void) {
    __asm__ volatile("movl $0xcccc, %%eax\n\t kmovw %%eax, %%k1" : : : "eax");
    __asm__ volatile("vxorps %%xmm20, %%xmm20, %%xmm20\n\t vxorps %%xmm21, %%xmm21, %%xmm21" : : : "xmm20", "xmm21");
    double hz = 0.0;
    for (int r = 0; r < 3; r++) {
        double f = clock_hz();
        if (f > hz) hz = f;
    }
    printf("clock %.2f GHz; core cycles per block of 8 instructions of a kind (16 lanes each)\n", hz / 1e9);
    printf("%-38s %6s %6s %6s %6s\n", "kind", "alone", "+8 FMA", "+8 add", "+both");
    ROW(fma, "vfmadd231ps")
    ROW(add, "vaddps")
    ROW(mul, "vmulps")
    ROW(shufps, "vshufps (within 128-bit lanes)")
    ROW(unpcklps, "vunpcklps (within 128-bit lanes)")
    ROW(permilps, "vpermilps imm (within 128-bit lanes)")
    ROW(shuff32x4, "vshuff32x4 (128-bit blocks)")
    ROW(permps, "vpermps (any lane)")
    ROW(permt2ps, "vpermt2ps (any lane, two sources)")
    ROW(blendmps, "vblendmps (mask)")
    ROW(bcastss, "vbroadcastss from memory")
    ROW(bcastf32x4, "vbroadcastf32x4 from memory")
    ROW(load, "vmovups load")
    ROW(fma_bcast, "vfmadd231ps with {1to16} operand")
    printf("4 vdivps: alone %.1f, +16 FMA %.1f, +24 FMA %.1f, +32 FMA %.1f, +32 vshufps %.1f, +32 vaddps %.1f\n",
           div4_alone(hz), div4_fma16(hz), div4_fma24(hz), div4_fma32(hz), div4_shuf32(hz), div4_add32(hz));
    printf("32 FMAs with {1to16} operands alone: %.1f\n", fmab_alone(hz));
    printf("8 vmovups stores: alone %.1f, +32 FMA %.1f, +32 FMA with {1to16} operands %.1f\n", store_alone(hz),
           store_fma(hz), store_fmab(hz));
    printf("8 stores as vextractf64x4 halves: alone %.1f, +32 FMA %.1f, +32 FMA with {1to16} operands %.1f\n",
           xstore_alone(hz), xstore_fma(hz), xstore_fmab(hz));
    return 0;
}

#else
int main(void) {
    printf("slots_probe: needs AVX-512 (compile with -march=native on a CPU that has it)\n");
    return 0;
}
#endif
