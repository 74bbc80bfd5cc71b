/* The shm one-shot all-reduce's short path in C: copy in, the epoch-flag barrier, the sum.
 *
 * Built at first use by bench/backends/shm_native.py with the system's C compiler and called
 * through ctypes (which releases the GIL: the Python watchdog still runs). It speaks the same
 * protocol on the same segment as the Python FlagBarrier (bench/backends/shm_segment.py):
 * rank r's epoch flag at flags[r * stride], its `sleeping` word next to it, the generation at
 * flags[world_size * stride] (a futex on its low 32 bits); one-shot slots double-buffered by
 * the epoch's parity, slot (p * world_size + j) at slots + (p * world_size + j) * slot_bytes.
 * So calls of the two paths may alternate on one segment: the epoch is handed over each call.
 *
 * Waiting: `spin` checks (with `pause`; cut short when the late rank last ran on this cpu),
 * then sched_yield() between checks for `yield_ns`,
 * then FUTEX_WAIT naps of `nap_ns` on the generation until `timeout_ns` after the wait began
 * (returns 1 and names the late rank). A seq_cst fence between publishing and checking (flag
 * then sleeping words, sleeping word then flags) closes the missed wake-up that the Python
 * barrier can only bound by its nap.
 *
 * Sums run in rank order and, for bfloat16 and float16, accumulate in float32 and round once
 * (round to nearest even), so every rank computes the same bits.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    void *tensor;       /* per call: the caller's contiguous tensor */
    int64_t nbytes;     /* per call: its size (at most slot_bytes) */
    int32_t dtype;      /* per call: 0 float32, 1 bfloat16, 2 float16 */
    int32_t world_size;
    char *slots;        /* the segment's data area */
    int64_t slot_bytes;
    int64_t *flags;     /* the segment's flag words */
    int32_t rank;
    int32_t stride;     /* int64 words between two ranks' flags */
    int32_t spin;
    int32_t unused;
    int64_t yield_ns, timeout_ns, nap_ns;
    int64_t epoch;      /* in: the barrier's epoch; out: the epoch this call reached */
    int64_t late_rank, late_seen;  /* out, on a timeout */
} aat_call;

enum { AAT_OK = 0, AAT_TIMEOUT = 1, AAT_DTYPE = 2 };
#define BLOCK 256
/* the sums for x86-64-v4 (AVX-512 with BW: 16-bit lanes), v3 (AVX2) or plain x86-64, picked
 * at load time (GCC's function multiversioning; no -march, so the library runs on any x86-64
 * the cache is shared with) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define VECTOR __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#ifndef VECTOR
#define VECTOR
#endif

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int late(const aat_call *c, int64_t target) {
    for (int j = 0; j < c->world_size; j++)
        if (j != c->rank && __atomic_load_n(&c->flags[j * c->stride], __ATOMIC_ACQUIRE) < target)
            return j;
    return -1;
}

static void release(aat_call *c, int64_t target) {
    int64_t *generation = &c->flags[c->world_size * c->stride];
    if (__atomic_load_n(generation, __ATOMIC_ACQUIRE) >= target) return;
    __atomic_store_n(generation, target, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (int j = 0; j < c->world_size; j++) {
        if (j != c->rank && __atomic_load_n(&c->flags[j * c->stride + 1], __ATOMIC_ACQUIRE)) {
            syscall(SYS_futex, (int *)generation, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
            return;
        }
    }
}

static int sleep_until(aat_call *c, int64_t target, int64_t start) {
    int64_t *generation = &c->flags[c->world_size * c->stride];
    int64_t *sleeping = &c->flags[c->rank * c->stride + 1];
    struct timespec nap = {c->nap_ns / 1000000000LL, c->nap_ns % 1000000000LL};
    int rc = AAT_OK;
    __atomic_store_n(sleeping, 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (;;) {
        int64_t seen = __atomic_load_n(generation, __ATOMIC_ACQUIRE);
        if (seen >= target) break;
        int j = late(c, target);
        if (j < 0) {
            release(c, target);
            break;
        }
        if (now_ns() - start > c->timeout_ns) {
            c->late_rank = j;
            c->late_seen = __atomic_load_n(&c->flags[j * c->stride], __ATOMIC_ACQUIRE);
            rc = AAT_TIMEOUT;
            break;
        }
        syscall(SYS_futex, (int *)generation, FUTEX_WAIT, (int)seen, &nap, NULL, 0);
    }
    __atomic_store_n(sleeping, 0, __ATOMIC_RELAXED);
    return rc;
}

static int arrive_and_wait(aat_call *c) {
    int64_t target = ++c->epoch;
    int64_t *line = &c->flags[c->rank * c->stride];
    int64_t cpu = sched_getcpu();
    /* where this rank runs (word 2 of its line): a rank waiting for it on the same cpu stops
     * spinning at once, as the peer cannot run there while it spins */
    __atomic_store_n(&line[2], cpu, __ATOMIC_RELAXED);
    __atomic_store_n(&line[0], target, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (int i = 0; i < c->spin; i++) {
        int j = late(c, target);
        if (j < 0) {
            release(c, target);
            return AAT_OK;
        }
        if ((i & 63) == 0 && __atomic_load_n(&c->flags[j * c->stride + 2], __ATOMIC_RELAXED) == cpu)
            break;
        __builtin_ia32_pause();
    }
    int64_t start = now_ns();
    if (late(c, target) < 0) {
        release(c, target);
        return AAT_OK;
    }
    while (c->yield_ns > 0 && now_ns() - start < c->yield_ns) {
        sched_yield();
        if (late(c, target) < 0) {
            release(c, target);
            return AAT_OK;
        }
    }
    return sleep_until(c, target, start);
}

static float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    /* NaN stays a (quiet) NaN; written as a select so that the loop vectorizes */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

/* out = terms[0] + terms[1] + ... in rank order (out is never one of the terms) */
VECTOR static void sum_float(float *restrict out, const char *const *terms, int ws, int64_t n) {
    const float *restrict s0 = (const float *)terms[0];
    const float *restrict s1 = (const float *)terms[1];
    for (int64_t i = 0; i < n; i++) out[i] = s0[i] + s1[i];
    for (int j = 2; j < ws; j++) {
        const float *restrict s = (const float *)terms[j];
        for (int64_t i = 0; i < n; i++) out[i] += s[i];
    }
}

/* the 16-bit sums: accumulate in float32 over blocks, round once */
#define SUM_HALF(name, type, to_float, from_float)                                           \
    VECTOR static void name(type *restrict out, const char *const *terms, int ws, int64_t n) {\
        float acc[BLOCK];                                                                    \
        for (int64_t at = 0; at < n; at += BLOCK) {                                          \
            int64_t m = n - at < BLOCK ? n - at : BLOCK;                                     \
            const type *restrict s0 = (const type *)terms[0] + at;                           \
            for (int64_t i = 0; i < m; i++) acc[i] = to_float(s0[i]);                        \
            for (int j = 1; j < ws; j++) {                                                   \
                const type *restrict s = (const type *)terms[j] + at;                        \
                for (int64_t i = 0; i < m; i++) acc[i] += to_float(s[i]);                    \
            }                                                                                \
            for (int64_t i = 0; i < m; i++) out[at + i] = from_float(acc[i]);                \
        }                                                                                    \
    }

SUM_HALF(sum_bf16, uint16_t, bf16_to_float, float_to_bf16)

#ifdef __FLT16_MAX__
static float f16_to_float(_Float16 h) { return (float)h; }
static _Float16 float_to_f16(float f) { return (_Float16)f; }
SUM_HALF(sum_f16, _Float16, f16_to_float, float_to_f16)
#endif

int aat_has_float16(void) {
#ifdef __FLT16_MAX__
    return 1;
#else
    return 0;
#endif
}

static int sum_terms(void *out, const char *const *terms, int ws, int64_t n, int dtype) {
    if (dtype < 0 || dtype > 2 || (dtype == 2 && !aat_has_float16()) || ws < 2) return AAT_DTYPE;
    if (dtype == 0)
        sum_float((float *)out, terms, ws, n);
    else if (dtype == 1)
        sum_bf16((uint16_t *)out, terms, ws, n);
#ifdef __FLT16_MAX__
    else
        sum_f16((_Float16 *)out, terms, ws, n);
#endif
    return AAT_OK;
}

/* out = the sum of `ws` arrays of n elements in rank order, the arithmetic of aat_one_shot:
 * the Python paths' exact sum of pieces larger than the short path takes */
int aat_sum(void *out, const void *const *terms, int32_t ws, int64_t n, int32_t dtype) {
    return sum_terms(out, (const char *const *)terms, ws, n, dtype);
}

/* One one-shot all-reduce of c->nbytes <= c->slot_bytes, in place in c->tensor. */
int aat_one_shot(aat_call *c) {
    int ws = c->world_size;
    int parity = (int)((c->epoch + 1) & 1);
    char *set = c->slots + (int64_t)parity * ws * c->slot_bytes;
    if (c->dtype < 0 || c->dtype > 2 || (c->dtype == 2 && !aat_has_float16())) return AAT_DTYPE;
    memcpy(set + c->rank * c->slot_bytes, c->tensor, (size_t)c->nbytes);
    int rc = arrive_and_wait(c);
    if (rc != AAT_OK) return rc;
    const char *terms[ws];  /* the slots of this parity, in rank order */
    for (int j = 0; j < ws; j++) terms[j] = set + j * c->slot_bytes;
    return sum_terms(c->tensor, terms, ws, c->nbytes / (c->dtype == 0 ? 4 : 2), c->dtype);
}
