/* The checked calls' C: the two-thread backward driver and the CPU checks, compiled once per build into
   deepnet._kernels* only. A plugin module holds nothing but its loops (dn_runtime.h, the kernel table);
   its backward pass runs through this driver in the build module, so every module's backward pass is
   driven by the same code and the driver's settings (dn_fuse, dn_spin_seconds) hold for all of them.
   Cython reads the declarations it needs from dn_runtime.pxd. */
#ifndef DN_DRIVER_H
#define DN_DRIVER_H

#include "dn_runtime.h"

/* ---- the backward pass driver, shared by every activation and width ----
   Work comes in units: one segment (save_every layers; segments last first) for one batch block
   (8 samples; single samples below batch 8). A block is recomputed from the segment's saved state
   (layer inputs and derivatives into a buffer set), then back-propagated through the segment, its
   weight gradients summed into the segment's gradient buffer: the segment's first block starts the
   sums, the last one completes them and updates the weights (after g has passed the old ones), so
   every gradient flows through old weights; recomputation only reads segments below.

   Two threads, two blocks or more (dn_backward_halves): the first core takes the first half of the
   blocks, the second the rest, one segment behind, adding its blocks to the sums the first left in
   the segment's gradient buffer (DN_GRAD_BUFFERS of them, used in turn, so the first core can run
   a few segments ahead when the second is held up). Each core recomputes its own blocks, so only
   the gradient sums cross cores (handing the recomputed states across instead moves ~5x the bytes and
   was slower than one core alone). The blocks are summed in the same order as by one thread: the
   result is the same bit for bit.

   Two threads, segments in turn (dn_backward_segments; every batch of one block, and any batch when
   asked): each core takes every other segment whole, all its blocks, and recomputes it while the
   other core back-propagates the segment above, then back-propagates it once g has come down. Only g
   crosses cores (width x batch floats a segment); the back-propagations run one after the other, so
   a call takes about the longer of a back-propagation and half a recomputation and back-propagation
   per segment. Each core sums its segments' blocks in the one-thread order: the same result bit for
   bit. At the widths DN_TWO_PASS_WIDTH takes (layers whose back-propagation costs well over their
   recomputation), where the side holds all of a segment's blocks at once, a side carries g down
   its segment first, hands it on, and only then makes and applies the weight gradients: the serial
   path is g's own arithmetic, and the call takes about half of all the work per segment instead.
   At the narrow widths whose 16-sample layout has a paired recomputation (recompute2, widths 2 and
   4) a batch of one block goes the same way, a side taking the next two segments no side has taken
   yet and recomputing both in one loop first (dn_segments_run_paired): one narrow recomputation is
   a dependency chain, two fill each other's gaps, the short serial path keeps the split steady when
   the host slows the cores' traffic, and a core the host slows for a while takes fewer segments
   instead of holding the other back (bench/README.md). One thread runs the same pieces in turn; a
   batch of two such blocks goes in two passes without the pairing. The AVX2 build runs these pieces
   of width 4 on two 8-lane halves of the 16-sample layout (DN_V16_HALVES_WIDTH): the same buffers and
   results.

   The loops that apply a segment's updates note whether every weight they wrote is finite as they
   write it (dn_finite: the numerical guard's check of the new weights, without a pass over the rows
   afterwards), and the driver sets `nonfinite` if one was not. */
#include <pthread.h>
#include <sched.h>
#include <time.h>

/* Segments' gradient buffers in turn: how far ahead of the second core the first may run, so that a
   pause of one core (a virtual machine's vCPU stalls now and then) does not stop the other at once. */
#define DN_GRAD_BUFFERS 8
/* How long a thread that has to wait spins before it sleeps: long enough that the other thread's next
   unit usually arrives first, since a sleep and its wake-up can cost more than that unit and then make
   the other thread wait and sleep in turn. Timed by the clock, as a pause's length varies by CPU. */
#define DN_SPIN_SECONDS 2e-3
/* Multiply-adds (layers x row x batch) of one call from which a second thread is started: a
   thread's start-up costs ~20 us. */
#define DN_THREAD_MIN_WORK 2000000.0
/* The widths whose segments split back-propagates in two passes on their own: multiples of 8 from 8,
   where a layer's back-propagation costs ~1.5x its recomputation or more, so g's serial path is worth
   shortening; at width 4 the two cost about the same (two passes alone were slower there, with the
   paired recomputation not: dn_backward_run), and at widths 10-20 that are not multiples of 8 two
   passes gained nothing clear (bench/README.md). */
#define DN_TWO_PASS_WIDTH(w) ((w) >= 8 && (w) % 8 == 0)

typedef struct {
    dn_recompute_fn recompute;
    dn_backprop_fn backprop;
    dn_fused_fn fused;               /* NULL: recompute, then back-propagate, one after the other */
    dn_carry_fn carry;               /* NULL: the segments split back-propagates in one pass */
    dn_update_fn update;
    dn_recompute2_fn recompute2;     /* non-NULL: the segments split recomputes two segments at once */
    float* params; Py_ssize_t n_layers; const float* saves; Py_ssize_t save_every;
    float* g; Py_ssize_t w, B, unit, n_seg, n_blocks, row;
    float alpha, lr;
    float* hbuf[4]; float* dbuf[4]; float* grad[DN_GRAD_BUFFERS]; float* scratch[2];
    Py_ssize_t half;                 /* the second core's first block */
    /* units done by each side, and pairs of units taken (dn_segments_run_paired), accessed with
       __atomic builtins */
    Py_ssize_t produced, consumed, claimed;
    int sleepers;
    int nonfinite;                   /* some updated weight is inf or nan (__atomic stores) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
} dn_job;

static inline void dn_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* DN_SPIN_SECONDS unless changed with set_spin_seconds (tests use 0 to take the sleeping path every
   time); dn_sleeps counts the waits that slept, for those tests. */
static double dn_spin_seconds = DN_SPIN_SECONDS;
static long dn_sleeps = 0;
/* 0: never fuse (set_fused_backward; tests compare the two ways bit for bit) */
static int dn_fuse = 1;
/* 0: never back-propagate in two passes (set_two_pass_backward; likewise) */
static int dn_two_pass = 1;

static double dn_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Wait until *counter >= value: spin for up to DN_SPIN_SECONDS (a unit takes tens of microseconds,
   so the other thread is usually about to publish), then sleep on the condition variable so that a
   thread held up for longer gives its core away instead of burning it (a loaded machine). */
static void dn_wait_at_least(dn_job* J, Py_ssize_t* counter, Py_ssize_t value) {
    double give_up = 0.0;
    for (;;) {
        for (int spins = 0; spins < 32; spins++) {
            if (__atomic_load_n(counter, __ATOMIC_SEQ_CST) >= value) return;
            dn_pause();
        }
        double now = dn_seconds();
        if (give_up == 0.0) give_up = now + dn_spin_seconds;
        else if (now > give_up) break;
    }
    __atomic_add_fetch(&dn_sleeps, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&J->mu);
    __atomic_add_fetch(&J->sleepers, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(counter, __ATOMIC_SEQ_CST) < value) pthread_cond_wait(&J->cv, &J->mu);
    __atomic_sub_fetch(&J->sleepers, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&J->mu);
}

/* Publish *counter = value and wake a sleeping waiter, if any (no system call when none sleeps). */
static void dn_publish(dn_job* J, Py_ssize_t* counter, Py_ssize_t value) {
    __atomic_store_n(counter, value, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&J->sleepers, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&J->mu);
        pthread_cond_broadcast(&J->cv);
        pthread_mutex_unlock(&J->mu);
    }
}

/* The segment of unit u (segments are taken last first): its index, first layer and length. */
static inline void dn_segment(const dn_job* J, Py_ssize_t u, Py_ssize_t* seg, Py_ssize_t* start,
                              Py_ssize_t* n) {
    *seg = J->n_seg - 1 - u;
    *start = *seg * J->save_every;
    *n = J->n_layers - *start < J->save_every ? J->n_layers - *start : J->save_every;
}

static inline Py_ssize_t dn_block_samples(const dn_job* J, Py_ssize_t blk) {
    Py_ssize_t s0 = blk * J->unit;
    return J->B - s0 < J->unit ? J->B - s0 : J->unit;
}

/* A loop that applied updates found a weight it wrote not finite (`finite` is its result). */
static inline void dn_note_finite(dn_job* J, int finite) {
    if (!finite) __atomic_store_n(&J->nonfinite, 1, __ATOMIC_RELAXED);
}

/* Recompute block blk through unit u's segment into buffer set `set`. */
static void dn_recompute_unit(const dn_job* J, Py_ssize_t u, Py_ssize_t blk, int set, float* scratch) {
    Py_ssize_t seg, start, n;
    dn_segment(J, u, &seg, &start, &n);
    J->recompute(J->params + start * J->row, n, J->saves + seg * J->w * J->B, J->w, J->B, blk * J->unit,
                 dn_block_samples(J, blk), J->alpha, J->hbuf[set], J->dbuf[set], scratch);
}

/* Back-propagate block blk through unit u's segment from buffer set `set`, into gradient buffer
   G (started by the first block, applied to the weights by the last). */
static void dn_backprop_unit(dn_job* J, Py_ssize_t u, Py_ssize_t blk, int set, float* G, float* scratch) {
    Py_ssize_t seg, start, n;
    dn_segment(J, u, &seg, &start, &n);
    dn_note_finite(J, J->backprop(J->params + start * J->row, n, J->g, J->w, J->B, blk * J->unit,
                                  dn_block_samples(J, blk), J->hbuf[set], J->dbuf[set], G, scratch, J->lr,
                                  blk == 0, blk == J->n_blocks - 1));
}

/* Blocks [b0, b1) through unit u's segment into gradient buffer G, on buffer set and scratch `side`. */
static void dn_blocks_unit(dn_job* J, Py_ssize_t u, Py_ssize_t b0, Py_ssize_t b1, int side, float* G) {
    for (Py_ssize_t b = b0; b < b1; b++) {
        dn_recompute_unit(J, u, b, side, J->scratch[side]);
        dn_backprop_unit(J, u, b, side, G, J->scratch[side]);
    }
}

/* ---- recomputation in the shadow of back-propagation ----
   A thread's work is a sequence of items (unit u, block b): recompute b through u's segment, then
   back-propagate it. The recomputation is one dependency chain a layer long (like the forward pass)
   with little arithmetic; the back-propagation is much arithmetic with a
   short chain. One after the other, the core waits on the chain half the time; in one loop
   (J->fused: item i back-propagated while item i+1 is recomputed, into the thread's other buffer
   set) the chain runs while the back-propagation's instructions issue. Each item's arithmetic is
   unchanged, so results are the same bit for bit. role 0: the only thread (all blocks, one
   gradient buffer); 1: the first half of two (waits for its gradient buffer to be free, publishes
   `produced`); 2: the second half (waits for `produced`, publishes `consumed`). */
static void dn_fused_run(dn_job* J, Py_ssize_t b0, Py_ssize_t b1, int side, int role) {
    const Py_ssize_t nb = b1 - b0, n_items = J->n_seg * nb;
    float* scratch = J->scratch[side];
    dn_recompute_unit(J, 0, b0, 2 * side, scratch);
    for (Py_ssize_t i = 0; i < n_items; i++) {
        const Py_ssize_t u = i / nb, b = b0 + i % nb;
        const int set = 2 * side + (int)(i % 2);
        float* G = role == 0 ? J->grad[0] : J->grad[u % DN_GRAD_BUFFERS];
        if (b == b0 && role == 1)        /* gradient buffer u % DN_GRAD_BUFFERS last held unit u - DN_GRAD_BUFFERS */
            dn_wait_at_least(J, &J->consumed, u - DN_GRAD_BUFFERS + 1);
        else if (b == b0 && role == 2)   /* the first half's sums of unit u are in */
            dn_wait_at_least(J, &J->produced, u + 1);
        if (i + 1 < n_items) {
            const Py_ssize_t u2 = (i + 1) / nb, b2 = b0 + (i + 1) % nb;
            const int set2 = 2 * side + (int)((i + 1) % 2);
            Py_ssize_t seg, start, n, seg2, start2, n2;
            dn_segment(J, u, &seg, &start, &n);
            dn_segment(J, u2, &seg2, &start2, &n2);
            dn_note_finite(J, J->fused(J->params + start * J->row, n, J->g, J->B, b * J->unit,
                                       dn_block_samples(J, b), J->hbuf[set], J->dbuf[set], G, J->lr, b == 0,
                                       b == J->n_blocks - 1, J->params + start2 * J->row, n2,
                                       J->saves + seg2 * J->w * J->B, b2 * J->unit, dn_block_samples(J, b2),
                                       J->alpha, J->hbuf[set2], J->dbuf[set2]));
        } else
            dn_backprop_unit(J, u, b, set, G, scratch);
        if (b == b1 - 1 && role == 1) dn_publish(J, &J->produced, u + 1);
        else if (b == b1 - 1 && role == 2) dn_publish(J, &J->consumed, u + 1);
    }
}

/* ---- two halves of the blocks ---- */

static void* dn_second_half_main(void* arg) {
    dn_job* J = (dn_job*)arg;
    if (J->fused) {
        dn_fused_run(J, J->half, J->n_blocks, 1, 2);
        return NULL;
    }
    for (Py_ssize_t u = 0; u < J->n_seg; u++) {
        dn_wait_at_least(J, &J->produced, u + 1);   /* the first half's sums of unit u are in */
        dn_blocks_unit(J, u, J->half, J->n_blocks, 1, J->grad[u % DN_GRAD_BUFFERS]);
        dn_publish(J, &J->consumed, u + 1);
    }
    return NULL;
}

static int dn_backward_halves(dn_job* J) {
    pthread_t second;
    J->half = J->n_blocks / 2;
    if (pthread_create(&second, NULL, dn_second_half_main, J) != 0) return 0;
    if (J->fused) {
        dn_fused_run(J, 0, J->half, 0, 1);
        pthread_join(second, NULL);
        return 1;
    }
    for (Py_ssize_t u = 0; u < J->n_seg; u++) {
        /* gradient buffer u % DN_GRAD_BUFFERS last held unit u - DN_GRAD_BUFFERS */
        dn_wait_at_least(J, &J->consumed, u - DN_GRAD_BUFFERS + 1);
        dn_blocks_unit(J, u, 0, J->half, 0, J->grad[u % DN_GRAD_BUFFERS]);
        dn_publish(J, &J->produced, u + 1);
    }
    pthread_join(second, NULL);
    return 1;
}

/* ---- two threads, segments in turn ---- */

/* Unit u's back-propagation in two passes, all its blocks recomputed (block b in buffer set set0 + b):
   once g has come down, carry it through every block and hand it on, then make and apply the weight
   gradients. */
static void dn_two_pass_unit(dn_job* J, Py_ssize_t u, int set0, float* G, float* scratch) {
    Py_ssize_t seg, start, n;
    dn_segment(J, u, &seg, &start, &n);
    float* p = J->params + start * J->row;
    dn_wait_at_least(J, &J->produced, u);
    for (Py_ssize_t b = 0; b < J->n_blocks; b++)
        J->carry(p, n, J->g, J->w, J->B, b * J->unit, dn_block_samples(J, b), J->dbuf[set0 + b], G, b == 0,
                 scratch);
    dn_publish(J, &J->produced, u + 1);
    for (Py_ssize_t b = 0; b < J->n_blocks; b++)
        dn_note_finite(J, J->update(p, n, J->w, dn_block_samples(J, b), J->hbuf[set0 + b], J->dbuf[set0 + b], G,
                                    scratch, J->lr, b == 0, b == J->n_blocks - 1));
}

/* The segments split of a batch of one block at the narrow widths (J->recompute2): a side takes the
   next two units no side has taken (u, u + 1: `claimed` counts the pairs taken), recomputes both in one
   loop into its two buffer sets, then back-propagates each in two passes. One narrow layer's
   recomputation is a chain that leaves the core idle about a quarter of the time; two chains fill
   it, and only g's own arithmetic (the carry) runs in series across the cores. Taking pairs as they
   come (not every other one) lets a core the host slows take fewer; a unit's arithmetic is the same
   whichever core runs it. */
static void dn_segments_run_paired(dn_job* J, int side) {
    float* G = J->grad[side];
    float* scratch = J->scratch[side];
    for (;;) {
        const Py_ssize_t u = 2 * __atomic_fetch_add(&J->claimed, 1, __ATOMIC_SEQ_CST);
        if (u >= J->n_seg) break;
        const int pair = u + 1 < J->n_seg;
        if (pair) {
            Py_ssize_t seg, start, n, seg2, start2, n2;
            dn_segment(J, u, &seg, &start, &n);
            dn_segment(J, u + 1, &seg2, &start2, &n2);
            J->recompute2(J->params + start * J->row, n, J->saves + seg * J->w * J->B, J->hbuf[2 * side],
                          J->dbuf[2 * side], J->params + start2 * J->row, n2, J->saves + seg2 * J->w * J->B,
                          J->hbuf[2 * side + 1], J->dbuf[2 * side + 1], J->w, J->B, 0, J->B, J->alpha);
        } else
            dn_recompute_unit(J, u, 0, 2 * side, scratch);
        dn_two_pass_unit(J, u, 2 * side, G, scratch);
        if (pair) dn_two_pass_unit(J, u + 1, 2 * side + 1, G, scratch);
    }
}

/* Side 0 takes units 0, 2, 4, ..., side 1 units 1, 3, ... (the paired split takes them as they come):
   a unit's blocks (as many as the side's two buffer sets hold) are recomputed before its g is awaited,
   the rest as they come. `produced` counts the units g has passed. */
static void dn_segments_run(dn_job* J, int side) {
    if (J->recompute2 != NULL) {
        dn_segments_run_paired(J, side);
        return;
    }
    float* G = J->grad[side];
    float* scratch = J->scratch[side];
    const Py_ssize_t ahead = J->n_blocks < 2 ? J->n_blocks : 2;
    const int two_pass = J->carry != NULL && J->n_blocks <= ahead;
    for (Py_ssize_t u = side; u < J->n_seg; u += 2) {
        for (Py_ssize_t b = 0; b < ahead; b++) dn_recompute_unit(J, u, b, 2 * side + (int)b, scratch);
        if (two_pass) {
            dn_two_pass_unit(J, u, 2 * side, G, scratch);
            continue;
        }
        dn_wait_at_least(J, &J->produced, u);   /* g has come down through the units above */
        for (Py_ssize_t b = 0; b < J->n_blocks; b++) {
            const int set = 2 * side + (int)(b % 2);
            if (b >= ahead) dn_recompute_unit(J, u, b, set, scratch);
            dn_backprop_unit(J, u, b, set, G, scratch);
        }
        dn_publish(J, &J->produced, u + 1);
    }
}

static void* dn_segments_second_main(void* arg) {
    dn_segments_run((dn_job*)arg, 1);
    return NULL;
}

static int dn_backward_segments(dn_job* J) {
    pthread_t second;
    if (pthread_create(&second, NULL, dn_segments_second_main, J) != 0) return 0;
    dn_segments_run(J, 0);
    pthread_join(second, NULL);
    return 1;
}

/* Back-propagate g through n_layers (recomputed from saves) and SGD-update every layer, in blocks
   of `unit` samples. hbuf and dbuf hold four buffer sets of set_floats each, grad DN_GRAD_BUFFERS gradient
   buffers of save_every * gstride floats, scratch two scratch areas of scratch_floats. Two threads
   split the work by blocks (halves) or, with by_segments or a batch of one block, by segments. */
static int dn_backward_run(dn_recompute_fn recompute, dn_backprop_fn backprop, dn_fused_fn fused, dn_carry_fn carry,
                           dn_update_fn update, dn_recompute2_fn recompute2, Py_ssize_t unit,
                           float* params, Py_ssize_t n_layers, const float* saves, Py_ssize_t save_every,
                           float* g, Py_ssize_t w, Py_ssize_t B, float alpha, float lr, float* hbuf,
                           float* dbuf, Py_ssize_t set_floats, float* grad, Py_ssize_t gstride,
                           float* scratch, Py_ssize_t scratch_floats, int threads, int by_segments) {
    dn_job J;
    int done = 0;
    J.recompute = recompute; J.backprop = backprop; J.fused = dn_fuse ? fused : NULL;
    J.params = params; J.n_layers = n_layers; J.saves = saves; J.save_every = save_every;
    J.g = g; J.w = w; J.B = B; J.unit = unit; J.row = w * w + w;
    J.alpha = alpha; J.lr = lr;
    J.n_seg = (n_layers + save_every - 1) / save_every;
    J.n_blocks = (B + unit - 1) / unit;
    /* two passes at the widths that gain by them alone, with two recomputations at once where the
       width has that loop and the batch is one block, and without at those widths for two blocks */
    const int paired = dn_two_pass && J.n_blocks == 1 && recompute2 != NULL && carry != NULL;
    const int narrow = recompute2 != NULL && J.n_blocks <= 2;
    J.carry = dn_two_pass && (DN_TWO_PASS_WIDTH(w) || narrow) ? carry : NULL; J.update = update;
    J.recompute2 = paired ? recompute2 : NULL;
    for (int k = 0; k < 4; k++) {            /* two sets per thread (dn_fused_run, dn_segments_run) */
        J.hbuf[k] = hbuf + k * set_floats;
        J.dbuf[k] = dbuf + k * set_floats;
    }
    for (int k = 0; k < 2; k++) J.scratch[k] = scratch + k * scratch_floats;
    for (int k = 0; k < DN_GRAD_BUFFERS; k++) J.grad[k] = grad + k * save_every * gstride;
    J.produced = J.consumed = J.claimed = 0;
    J.sleepers = 0;
    J.nonfinite = 0;
    by_segments = by_segments || J.n_blocks < 2;
    if (threads > 1 && (double)n_layers * J.row * B >= DN_THREAD_MIN_WORK && (!by_segments || J.n_seg >= 2)) {
        pthread_mutex_init(&J.mu, NULL);
        pthread_cond_init(&J.cv, NULL);
        done = by_segments ? dn_backward_segments(&J) : dn_backward_halves(&J);
        pthread_cond_destroy(&J.cv);
        pthread_mutex_destroy(&J.mu);
    }
    /* one thread (or no thread could start): the same arithmetic in the same order, with one
       gradient buffer (a segment's gradients stay in cache: 0.25 MB at width 32); the paired pieces
       where the batch is one block that has them (every wait is already met) */
    if (!done && J.recompute2 != NULL)
        dn_segments_run_paired(&J, 0);
    else if (!done && J.fused)
        dn_fused_run(&J, 0, J.n_blocks, 0, 0);
    else if (!done)
        for (Py_ssize_t u = 0; u < J.n_seg; u++) dn_blocks_unit(&J, u, 0, J.n_blocks, 0, J.grad[0]);
    return !J.nonfinite;
}

/* The forward pass of one (activation, width): its own loop (forward passes need no driver). */
static inline void dn_forward(const dn_kernel* k, const float* params, Py_ssize_t n_layers, float* h, Py_ssize_t w,
                              Py_ssize_t B, float alpha, float* saves, Py_ssize_t save_every, float* scratch,
                              Py_ssize_t part, Py_ssize_t n_parts) {
    k->forward(params, n_layers, h, w, B, alpha, saves, save_every, scratch, part, n_parts);
}

/* The backward pass of one (activation, width) through the driver: blocks of DN_BACKWARD_BLOCK samples
   (fused where the width has a fused loop) from batch DN_BLOCKED_MIN_BATCH, or of DN_BACKWARD_BLOCK16
   when `block` asks for them and the width has them (the same results), else one sample at a time;
   two threads or more split it by segments when `by_segments` (dn_backward_run).
   Returns whether every updated weight is finite. */
static int dn_backward(const dn_kernel* k, float* params, Py_ssize_t n_layers, const float* saves,
                        Py_ssize_t save_every, float* g, Py_ssize_t w, Py_ssize_t B, float alpha, float lr,
                        float* hbuf, float* dbuf, Py_ssize_t set_floats, float* grad, float* scratch,
                        Py_ssize_t scratch_floats, int threads, int block, int by_segments) {
    if (B >= DN_BLOCKED_MIN_BATCH && block == DN_BACKWARD_BLOCK16 && k->recompute_block16 != NULL)
        return dn_backward_run(k->recompute_block16, k->backprop_block16, k->fused_block16, k->carry_block16,
                               k->update_block16, k->recompute2_block16, DN_BACKWARD_BLOCK16,
                               params, n_layers, saves, save_every, g, w, B, alpha, lr, hbuf, dbuf, set_floats,
                               grad, dn_grad_stride(w), scratch, scratch_floats, threads, by_segments);
    else if (B >= DN_BLOCKED_MIN_BATCH)
        return dn_backward_run(k->recompute_block, k->backprop_block, k->fused_block, k->carry_block,
                               k->update_block, NULL, DN_BACKWARD_BLOCK, params,
                               n_layers, saves, save_every, g, w, B, alpha, lr, hbuf, dbuf, set_floats, grad,
                               dn_grad_stride(w), scratch, scratch_floats, threads, by_segments);
    else
        return dn_backward_run(k->recompute_sample, k->backprop_sample, NULL, NULL, NULL, NULL, 1, params,
                               n_layers, saves, save_every, g, w, B, alpha, lr, hbuf, dbuf, set_floats, grad,
                               dn_grad_stride(w), scratch, scratch_floats, threads, by_segments);
}

/* ---- which instructions this CPU runs (a faster build is loaded only if it says so) ---- */

static int dn_cpu_has_avx2_fma(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}
/* libgcc's checks also ask the OS (XCR0) whether it saves the 512-bit register state. */
static int dn_cpu_has_avx512(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return dn_cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

#endif /* DN_DRIVER_H */
