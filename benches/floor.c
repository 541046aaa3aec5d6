/* The floor for `tpc bench limit benches/mlp10.tp`: the same NNGP + NTK recursion of a
 * depth-10 ReLU MLP (W_std^2 = 2, no bias, NTK parameterization, d = 32, f64) written
 * as plainly fast C, to measure how close tpc's closed-form path gets.
 *
 *   gcc -O3 -march=native -fno-math-errno -fopenmp -o benches/out/floor benches/floor.c -lm
 *   benches/out/floor POINTS.csv REPEAT [DUMP_PREFIX]
 *
 * Per repeat (timed; the two M x M outputs are allocated and touched once before): Gram matrix
 * X X^T, the diagonal recursion (per point, all layers), then every entry of the upper
 * triangle runs its whole depth recursion on its own, in 32 x 32 tiles (OpenMP,
 * dynamic schedule, both cores), vectorized by gcc over a tile column with a
 * branch-free acos (fdlibm's rational approximation with the ranges selected, not
 * branched: < 1e-15 relative); each tile is written to both triangles.
 * Prints one JSON line {"seconds": [...], "peak_rss_bytes": B, "points": M}. With
 * DUMP_PREFIX, writes DUMP_PREFIX_nngp.csv and DUMP_PREFIX_ntk.csv (last repeat) for
 * the kernel check against tpc.
 *
 * The network's constants (theory.md §3.1, NTK parameterization, sigma_w^2 = 2):
 *   S^1 = T^1 = 2 G / d (G = X X^T); per layer, with n = sqrt(S_pp S_qq),
 *   rho = S_pq / n, K = n J(rho) / (2 pi), Sdot = (pi - theta) / (2 pi),
 *   J(rho) = sqrt(1 - rho^2) + (pi - theta) rho, then the next Dense (or the readout):
 *   S <- 2 K, T <- 2 K + 2 Sdot T.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define D 32
#define DEPTH 10
#define TILE 32

static const double PS0 = 1.66666666666666657415e-01, PS1 = -3.25565818622400915405e-01,
                    PS2 = 2.01212532134862925881e-01, PS3 = -4.00555345006794114027e-02,
                    PS4 = 7.91534994289814532176e-04, PS5 = 3.47933107596021167570e-05,
                    QS1 = -2.40339491173441421878e+00, QS2 = 2.02094576023350569471e+00,
                    QS3 = -6.88283971605453293030e-01, QS4 = 7.70381505559019352791e-02;

static inline double acos_v(double x) {
    double a = fabs(x);
    int small = a <= 0.5;
    double zb = (1.0 - a) * 0.5;
    double z = small ? x * x : zb;
    double sb = sqrt(zb);
    double s = small ? x : sb;
    double p = z * (PS0 + z * (PS1 + z * (PS2 + z * (PS3 + z * (PS4 + z * PS5)))));
    double q = 1.0 + z * (QS1 + z * (QS2 + z * (QS3 + z * QS4)));
    double t = s + s * (p / q);
    double big = x > 0.0 ? 2.0 * t : M_PI - 2.0 * t;
    return small ? M_PI_2 - t : big;
}

/* One entry through one layer and the next Dense: (x, t) -> (S', T'). */
static inline void step(double *x, double *t, double n) {
    double r = *x / n;
    r = r >= 1.0 - 1e-14 ? 1.0 : r;
    r = r <= -1.0 + 1e-14 ? -1.0 : r;
    double pt = acos_v(-r);
    double j = sqrt((1.0 - r) * (1.0 + r)) + pt * r;
    int ok = n > 0.0;
    double k = ok ? (1.0 / (2.0 * M_PI)) * (n * j) : 0.0;
    double sd = ok ? (1.0 / (2.0 * M_PI)) * pt : 0.0;
    double tv = *t * sd;
    *x = 2.0 * k;
    *t = 2.0 * k + 2.0 * tv;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static long peak_rss(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kb = atol(line + 6);
    if (f) fclose(f);
    return kb * 1024;
}

/* An M x M output: fresh pages, 2 MiB-aligned and marked for transparent huge pages
 * (fewer page faults and TLB misses on the transposed writes). */
static double *big(size_t len) {
    size_t bytes = (len * sizeof(double) + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1);
    double *p = aligned_alloc(2u << 20, bytes ? bytes : (2u << 20));
    if (!p) { perror("aligned_alloc"); exit(1); }
    madvise(p, bytes, MADV_HUGEPAGE);
    return p;
}

static void dump(const char *path, const double *m, size_t n) {
    FILE *f = fopen(path, "w");
    if (!f) { perror(path); exit(1); }
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++)
            fprintf(f, "%.17g%c", m[i + j * n], j + 1 == n ? '\n' : ',');
    fclose(f);
}

static void tile(double *cov, double *tan, const double *xt, const double *sq, size_t n,
                 size_t bi, size_t bj) {
    double cb[TILE * TILE], tb[TILE * TILE];
    size_t i0 = bi * TILE, j0 = bj * TILE;
    size_t ni = n - i0 < TILE ? n - i0 : TILE, nj = n - j0 < TILE ? n - j0 : TILE;
    int diag = bi == bj;
    for (size_t jj = 0; jj < nj; jj++) {
        size_t rows = diag ? jj + 1 : ni;
        double *c = cb + jj * TILE, *t = tb + jj * TILE;
        /* Gram entries, vectorized over rows (xt is X column by column) */
        for (size_t ii = 0; ii < rows; ii++) c[ii] = 0.0;
        for (int k = 0; k < D; k++) {
            const double *xk = xt + k * n + i0;
            double xj = xt[k * n + j0 + jj];
#pragma omp simd
            for (size_t ii = 0; ii < rows; ii++) c[ii] += xk[ii] * xj;
        }
        for (size_t ii = 0; ii < rows; ii++) {
            double g = c[ii];
            c[ii] = g * (2.0 / D);
            t[ii] = g * (2.0 / D);
        }
        for (int l = 0; l < DEPTH; l++) {
            const double *row = sq + l * n + i0;
            double sqq = sq[l * n + j0 + jj];
#pragma omp simd
            for (size_t ii = 0; ii < rows; ii++) step(&c[ii], &t[ii], row[ii] * sqq);
        }
        memcpy(cov + i0 + (j0 + jj) * n, c, rows * sizeof(double));
        memcpy(tan + i0 + (j0 + jj) * n, t, rows * sizeof(double));
    }
    for (size_t ii = 0; ii < ni; ii++) {
        size_t from = diag ? ii + 1 : 0;
        double *c = cov + j0 + (i0 + ii) * n, *t = tan + j0 + (i0 + ii) * n;
        for (size_t jj = from; jj < nj; jj++) {
            c[jj] = cb[ii + jj * TILE];
            t[jj] = tb[ii + jj * TILE];
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: floor POINTS.csv REPEAT [DUMP_PREFIX]\n");
        return 2;
    }
    FILE *f = fopen(argv[1], "r");
    if (!f) { perror(argv[1]); return 1; }
    size_t cap = 1024, m = 0;
    double *x = malloc(cap * D * sizeof(double));
    for (;;) {
        if (m == cap) x = realloc(x, (cap *= 2) * D * sizeof(double));
        int k;
        for (k = 0; k < D; k++)
            if (fscanf(f, k ? ",%lf" : "%lf", &x[m * D + k]) != 1) break;
        if (k == 0) break;
        if (k != D) { fprintf(stderr, "bad row %zu\n", m + 1); return 1; }
        m++;
    }
    fclose(f);
    int repeat = atoi(argv[2]);
    double *xt = malloc((m ? m : 1) * D * sizeof(double));
    for (size_t i = 0; i < m; i++)
        for (int k = 0; k < D; k++) xt[k * m + i] = x[i * D + k];
    size_t n = m, nb = (n + TILE - 1) / TILE;
    printf("{\"seconds\": [");
    /* The outputs are allocated and touched once, outside the timed loop: a floor should
     * not pay page faults that a warm process may not (tpc's repeats include its own
     * allocation, so this makes the floor stricter, never looser). */
    double *cov = big(n * n), *tan = big(n * n);
    memset(cov, 0, n * n * sizeof(double));
    memset(tan, 0, n * n * sizeof(double));
    double *sq = malloc((DEPTH * n ? DEPTH * n : 1) * sizeof(double));
    for (int r = 0; r < repeat; r++) {
        double t0 = now();
        /* the diagonal recursion, per point */
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) {
            double g = 0.0;
            for (int k = 0; k < D; k++) g += x[i * D + k] * x[i * D + k];
            double c = g * (2.0 / D), t = g * (2.0 / D);
            for (int l = 0; l < DEPTH; l++) {
                double s = sqrt(c > 0.0 ? c : 0.0);
                sq[l * n + i] = s;
                step(&c, &t, s * s);
            }
        }
        size_t ntiles = nb * (nb + 1) / 2;
#pragma omp parallel for schedule(dynamic, 4)
        for (size_t k = 0; k < ntiles; k++) {
            /* k -> (bi, bj), bi <= bj, column-block major */
            size_t bj = (size_t)((sqrt(8.0 * k + 1.0) - 1.0) / 2.0);
            while (bj * (bj + 1) / 2 > k) bj--;
            while ((bj + 1) * (bj + 2) / 2 <= k) bj++;
            size_t bi = k - bj * (bj + 1) / 2;
            tile(cov, tan, xt, sq, n, bi, bj);
        }
        double dt = now() - t0;
        printf("%s%.6f", r ? ", " : "", dt);
        if (r + 1 == repeat && argc > 3) {
            char path[4096];
            snprintf(path, sizeof path, "%s_nngp.csv", argv[3]);
            dump(path, cov, n);
            snprintf(path, sizeof path, "%s_ntk.csv", argv[3]);
            dump(path, tan, n);
        }
    }
    free(cov);
    free(tan);
    free(sq);
    printf("], \"peak_rss_bytes\": %ld, \"points\": %zu, \"threads\": %d}\n", peak_rss(), n,
           omp_get_max_threads());
    return 0;
}
