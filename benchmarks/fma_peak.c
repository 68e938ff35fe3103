/* The CPU's arithmetic peak, measured: each thread runs independent chains of fused multiply-adds on registers
 * (no memory traffic), enough chains to cover the FMA latency, and the program prints the GFLOP/s of all threads
 * together. The chains must stay in registers, so the inner loop is unrolled (at -O2 without it, gcc 12 kept them in
 * memory and measured a third of the peak). Built and run by benchmarks/machine.py (fma_peak); a multiply-add counts
 * as 2 FLOPs, as torch.utils.flop_counter counts a convolution's.
 *
 *   cc -O3 -march=native -fopenmp fma_peak.c -o fma_peak && ./fma_peak KIND THREADS SECONDS
 *
 * KIND: avx512 (16 float32 lanes per _mm512_fmadd_ps), avx2 (8 lanes per _mm256_fmadd_ps), or bf16
 * (_mm512_dpbf16_ps: 32 bfloat16 products summed pairwise into 16 float32 lanes, 64 FLOPs per instruction).
 * Prints one JSON object: {"kind", "threads", "seconds", "gflops"}. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHAINS 12
#define INNER 4096

static double now(void) { return omp_get_wtime(); }

/* One kernel per instruction: CHAINS accumulators of type VEC, each updated by STEP(acc, a, b) INNER times per
 * clock check, until SECONDS have passed; the accumulators' sum is printed only if it is an impossible value, so the
 * compiler must keep every chain. Returns the seconds run and sets *ITERATIONS to the steps per chain. */
#define FMA_KERNEL(NAME, VEC, ACC_INIT, A_TYPE, A_INIT, B_INIT, STEP)                                   \
    static double NAME(double seconds, long *iterations) {                                             \
        VEC acc[CHAINS];                                                                               \
        A_TYPE a = A_INIT, b = B_INIT;                                                                 \
        for (int i = 0; i < CHAINS; i++) acc[i] = ACC_INIT((float)i);                                  \
        long n = 0;                                                                                    \
        double start = now(), t;                                                                       \
        do {                                                                                           \
            for (int k = 0; k < INNER; k++) {                                                          \
                _Pragma("GCC unroll 16") for (int i = 0; i < CHAINS; i++) acc[i] = STEP(acc[i], a, b); \
            }                                                                                          \
            n += INNER;                                                                                \
        } while ((t = now() - start) < seconds);                                                       \
        float lanes[sizeof(VEC) / sizeof(float)], sink = 0;                                            \
        for (int i = 0; i < CHAINS; i++) {                                                             \
            memcpy(lanes, &acc[i], sizeof(VEC));                                                       \
            for (size_t j = 0; j < sizeof(VEC) / sizeof(float); j++) sink += lanes[j];                 \
        }                                                                                              \
        if (sink == 12345.0f) printf("#");                                                             \
        *iterations = n;                                                                               \
        return t;                                                                                      \
    }

#if defined(__AVX512F__)
FMA_KERNEL(run_avx512, __m512, _mm512_set1_ps, __m512, _mm512_set1_ps(1.0000001f), _mm512_set1_ps(0.9999999f),
           _mm512_fmadd_ps)
#endif
#if defined(__AVX512BF16__)
/* bfloat16 pairs 1.0 (0x3f80) and 2^-7 (0x3c00) */
FMA_KERNEL(run_bf16, __m512, _mm512_set1_ps, __m512bh, (__m512bh)_mm512_set1_epi16(0x3f80),
           (__m512bh)_mm512_set1_epi16(0x3c00), _mm512_dpbf16_ps)
#endif
#if defined(__AVX2__) && defined(__FMA__)
FMA_KERNEL(run_avx2, __m256, _mm256_set1_ps, __m256, _mm256_set1_ps(1.0000001f), _mm256_set1_ps(0.9999999f),
           _mm256_fmadd_ps)
#endif

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s avx512|avx2|bf16 THREADS SECONDS\n", argv[0]);
        return 2;
    }
    const char *kind = argv[1];
    int threads = atoi(argv[2]);
    double seconds = atof(argv[3]);
    double flops_per_iteration;
    double (*run)(double, long *) = NULL;
#if defined(__AVX512F__)
    if (!strcmp(kind, "avx512")) { run = run_avx512; flops_per_iteration = CHAINS * 16 * 2.0; }
#endif
#if defined(__AVX512BF16__)
    if (!strcmp(kind, "bf16")) { run = run_bf16; flops_per_iteration = CHAINS * 16 * 4.0; }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (!strcmp(kind, "avx2")) { run = run_avx2; flops_per_iteration = CHAINS * 8 * 2.0; }
#endif
    if (run == NULL || threads < 1 || seconds <= 0) {
        fprintf(stderr, "%s: not built into this binary (the compiler's -march=native lacks it) or bad arguments\n",
                kind);
        return 3;
    }
    double flops = 0, longest = 0;
#pragma omp parallel num_threads(threads) reduction(+ : flops) reduction(max : longest)
    {
        long n;
        double t = run(seconds, &n);
        flops += n * flops_per_iteration;
        longest = t;
    }
    printf("{\"kind\": \"%s\", \"threads\": %d, \"seconds\": %.3f, \"gflops\": %.2f}\n", kind, threads, longest,
           flops / longest / 1e9);
    return 0;
}
