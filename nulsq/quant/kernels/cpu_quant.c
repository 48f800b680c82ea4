/* CPU kernels for nulsq's `lsq` and `nulsq` ops, built by cpu_quant.py on first use.

   Vectors of W = 8 floats (GCC vector extensions: AVX2 with -march=native, pairs of SSE
   registers elsewhere). A b-bit nuLSQ grid of N = 2^b - 1 intervals is classified with N
   vector compares per element up to 5 bits (2-4 bits: 3, 7, 15), by a binary search with
   gathers beyond. Levels and thresholds come from the steps as in the reference's bucketize
   path (c = cumsum rounded to fp32, t = c - s/2, negative thresholds one ulp down so that
   ties go toward zero). */
#include "cpu_common.h"

/* ---- LSQ (supplement Eq. 1 and 4) ---- */

INLINE void lsq_fwd_at(const void *x, void *y, int64_t i, int valid, int dt, vf s, vf lo, vf hi) {
  vf v = clamp(load(x, i, dt, valid) / s, lo, hi);
  store(y, i, round_even(v) * s, dt, valid);
}

/* dx (if any) for the W elements at i; returns dy * G (Eq. 4) for the step's gradient. */
INLINE vf lsq_bwd_at(const void *dy, const void *x, void *dx, int64_t i, int valid, int dt,
                     vf s, vf lo, vf hi, int need_step) {
  vf v = load(x, i, dt, valid) / s, d = load(dy, i, dt, valid);
  if (dx) store(dx, i, keep((v >= lo) & (v <= hi), d), dt, valid);
  if (!need_step) return splat(0.f);
  /* the closed clip branches give -Qn / Qp (= round of the clamped value), rint(v) - v between */
  vf g = round_even(clamp(v, lo, hi)) - keep((v > lo) & (v < hi), v);
  return valid < W ? keep(live_lanes(valid), d * g) : d * g;
}

INLINE void lsq_fwd_range(const void *x, void *y, int64_t b, int64_t e, int dt, float s,
                          float lo, float hi) {
  vf sv = splat(s), lov = splat(lo), hiv = splat(hi);
#define AT(i, valid) lsq_fwd_at(x, y, i, valid, dt, sv, lov, hiv)
  FOR_VECTORS(b, e, AT, NOTHING);
#undef AT
}

INLINE double lsq_bwd_range(const void *dy, const void *x, void *dx, int64_t b, int64_t e,
                            int dt, float s, float lo, float hi, int need_step) {
  vf sv = splat(s), lov = splat(lo), hiv = splat(hi), acc = splat(0.f);
  double total = 0.0;
#define AT(i, valid) acc += lsq_bwd_at(dy, x, dx, i, valid, dt, sv, lov, hiv, need_step)
#define FLUSH() do { total += hsum(acc); acc = splat(0.f); } while (0)
  FOR_VECTORS(b, e, AT, FLUSH);
#undef AT
#undef FLUSH
  return total;
}

void lsq_forward(const void *x, void *y, int64_t n, int dt, const float *step, int qn, int qp,
                 int nthreads) {
  float s = *step;
  int nt = threads_for(n, nthreads, 256);
  PARALLEL(nt, n, if (dt == F32) lsq_fwd_range(x, y, b, e, F32, s, -qn, qp);
                  else lsq_fwd_range(x, y, b, e, BF16, s, -qn, qp))
}

/* dx may be NULL; dstep (NULL = not needed) receives grad_scale * sum(dy * G). */
void lsq_backward(const void *dy, const void *x, void *dx, int64_t n, int dt, const float *step,
                  int qn, int qp, double grad_scale, float *dstep, int nthreads) {
  float s = *step;
  double partial[256] = {0};
  int nt = threads_for(n, nthreads, 256), need_step = dstep != 0;
  PARALLEL(nt, n, partial[tid] =
      dt == F32 ? lsq_bwd_range(dy, x, dx, b, e, F32, s, -qn, qp, need_step)
                : lsq_bwd_range(dy, x, dx, b, e, BF16, s, -qn, qp, need_step))
  if (need_step) {
    double total = 0.0;
    for (int t = 0; t < nt; t++) total += partial[t];
    *dstep = (float)(total * grad_scale);
  }
}

/* ---- nuLSQ (supplement Eq. 5 and 10-12) ---- */

typedef struct {
  int n;                 /* intervals = Qn + Qp; levels L[0..n], thresholds T[0..n-1] */
  int steps;             /* binary search: log2 of the padded threshold count */
  float L[MAX_N + 1];
  float T[MAX_N + 1];    /* padded with +inf up to a power of two */
  float width[MAX_N];
} grid_t;

/* Levels and thresholds in fp32 as the reference's bucketize path computes them: c_k = cumsum
   of the steps rounded to fp32 (torch's CPU cumsum accumulates fp32 in double), t = c - s/2 in
   fp32, negative thresholds one ulp down so that x == t (a tie) lands on the level nearer 0. */
static void make_grid(grid_t *g, const float *pos, int qp, const float *neg, int qn) {
  g->n = qn + qp;
  g->L[qn] = 0.f;
  double c = 0.0;
  for (int k = 0; k < qn; k++) {            /* outward: s'_1, s'_2, ... */
    c += neg[k];
    float cf = (float)c;
    g->L[qn - 1 - k] = -cf;
    g->T[qn - 1 - k] = nextafterf(-(cf - neg[k] / 2), -INFINITY);
    g->width[qn - 1 - k] = neg[k];
  }
  c = 0.0;
  for (int k = 0; k < qp; k++) {
    c += pos[k];
    float cf = (float)c;
    g->L[qn + 1 + k] = cf;
    g->T[qn + k] = cf - pos[k] / 2;
    g->width[qn + k] = pos[k];
  }
  int size = 1;
  g->steps = 0;
  while (size < g->n + 1) { size *= 2; g->steps++; }
  for (int k = g->n; k < size && k <= MAX_N; k++) g->T[k] = INFINITY;
}

/* Vector classification (N compile-time small): y = the level, k = the count of thresholds
   below x, which is the level's index. */
INLINE vf classify(vf x, const grid_t *g, int n, vi *k_out) {
  vf y = splat(g->L[0]);
  vi k = splati(0);
#pragma GCC unroll 32
  for (int j = 0; j < n; j++) {
    vi m = x > splat(g->T[j]);
    y = sel(m, splat(g->L[j + 1]), y);
    k -= m;
  }
  *k_out = k;
  return y;
}

/* Wide grids (5+ bits): a binary search over the thresholds (padded with +inf to a power of
   two), W lanes at a time with gathers. NaN compares false everywhere: level 0. */
INLINE vf classify_search(vf x, const grid_t *g, vi *k_out) {
  vi k = splati(0);
  for (int h = 1 << (g->steps - 1); h > 0; h >>= 1)
    k += (x > gather(g->T, k + splati(h - 1))) & splati(h);
  *k_out = k;
  return gather(g->L, k);
}

INLINE void nu_fwd_vec(const void *x, void *y, int64_t b, int64_t e, int dt, const grid_t *g,
                       int n) {
  vi k;
#define AT(i, valid) store(y, i, classify(load(x, i, dt, valid), g, n, &k), dt, valid)
  FOR_VECTORS(b, e, AT, NOTHING);
#undef AT
}

INLINE void nu_fwd_search(const void *x, void *y, int64_t b, int64_t e, int dt,
                          const grid_t *g) {
  vi k;
#define AT(i, valid) store(y, i, classify_search(load(x, i, dt, valid), g, &k), dt, valid)
  FOR_VECTORS(b, e, AT, NOTHING);
#undef AT
}

/* sums: [0] dy over x <= L0, [1..n] dy * (y - x) over each interval's interior, [n+1] dy over
   x >= Ln. x above its level lies in the next interval; x on a level adds 0 either way. */
INLINE void nu_bwd_at(const void *dy, const void *x, void *dx, int64_t i, int valid, int dt,
                      const grid_t *g, int n, int need_steps, vf *acc) {
  vf xv = load(x, i, dt, valid), d = load(dy, i, dt, valid);
  vf lo = splat(g->L[0]), hi = splat(g->L[n]);
  if (dx) store(dx, i, keep((xv >= lo) & (xv <= hi), d), dt, valid);
  if (!need_steps) return;
  vi k, live = valid < W ? live_lanes(valid) : splati(-1);
  vf y = classify(xv, g, n, &k);
  vi interval = k - (xv > y);
  vf gx = keep((xv > lo) & (xv < hi) & live, d * (y - xv));
  acc[0] += keep((xv <= lo) & live, d);
  acc[n + 1] += keep((xv >= hi) & live, d);
#pragma GCC unroll 32
  for (int j = 1; j <= n; j++) acc[j] += keep(interval == splati(j), gx);
}

INLINE void nu_bwd_vec(const void *dy, const void *x, void *dx, int64_t b, int64_t e, int dt,
                       const grid_t *g, int n, int need_steps, double *sums) {
  vf acc[n + 2];
  for (int j = 0; j < n + 2; j++) acc[j] = splat(0.f);
#define AT(i, valid) nu_bwd_at(dy, x, dx, i, valid, dt, g, n, need_steps, acc)
#define FLUSH() do {                                                       \
    if (need_steps)                                                        \
      for (int j = 0; j < n + 2; j++) { sums[j] += hsum(acc[j]); acc[j] = splat(0.f); } \
  } while (0)
  FOR_VECTORS(b, e, AT, FLUSH);
#undef AT
#undef FLUSH
}

INLINE void nu_bwd_search(const void *dy, const void *x, void *dx, int64_t b, int64_t e, int dt,
                          const grid_t *g, int need_steps, double *sums) {
  /* interiors go to fp32 bins, in 4 copies that break the dependency chains of adds into the
     same bin; the clip sums to vectors */
  int n = g->n, stride = n + 2;
  float *bins = calloc(4 * (size_t)stride, sizeof(float));
  vf lo = splat(g->L[0]), hi = splat(g->L[n]), below = splat(0.f), above = splat(0.f);
#define AT(i, valid) do {                                                  \
    vf xv = load(x, i, dt, valid), d = load(dy, i, dt, valid);             \
    if (dx) store(dx, i, keep((xv >= lo) & (xv <= hi), d), dt, valid);     \
    if (need_steps) {                                                      \
      vi k, live = valid < W ? live_lanes(valid) : splati(-1);             \
      vf y = classify_search(xv, g, &k);                                   \
      vi interval = k - (xv > y);                                          \
      vf gx = keep((xv > lo) & (xv < hi) & live, d * (y - xv));            \
      below += keep((xv <= lo) & live, d);                                 \
      above += keep((xv >= hi) & live, d);                                 \
      for (int l = 0; l < W; l++) bins[(l & 3) * stride + interval[l]] += gx[l]; \
    }                                                                      \
  } while (0)
#define FLUSH() do {                                                       \
    for (int c = 0; c < 4 * stride; c++) { sums[c % stride] += bins[c]; bins[c] = 0.f; } \
    sums[0] += hsum(below); sums[n + 1] += hsum(above);                    \
    below = above = splat(0.f);                                            \
  } while (0)
  FOR_VECTORS(b, e, AT, FLUSH);
#undef AT
#undef FLUSH
  free(bins);
}

/* N = 2^b - 1 intervals for b = 1..5 bits get unrolled vector code; other grids the search. */
#define NU_DISPATCH(VEC, SCALAR)                                           \
  switch (g.n) {                                                             \
    case 1: if (dt == F32) VEC(F32, 1); else VEC(BF16, 1); break;            \
    case 3: if (dt == F32) VEC(F32, 3); else VEC(BF16, 3); break;            \
    case 7: if (dt == F32) VEC(F32, 7); else VEC(BF16, 7); break;            \
    case 15: if (dt == F32) VEC(F32, 15); else VEC(BF16, 15); break;         \
    case 31: if (dt == F32) VEC(F32, 31); else VEC(BF16, 31); break;         \
    default: if (dt == F32) SCALAR(F32); else SCALAR(BF16);                  \
  }

void nulsq_forward(const void *x, void *y, int64_t n, int dt, const float *pos, int qp,
                   const float *neg, int qn, int nthreads) {
  grid_t g;
  make_grid(&g, pos, qp, neg, qn);
  int nt = threads_for(n, nthreads, 256);
#define FWD_VEC(DT, N) nu_fwd_vec(x, y, b, e, DT, &g, N)
#define FWD_SCALAR(DT) nu_fwd_search(x, y, b, e, DT, &g)
  PARALLEL(nt, n, NU_DISPATCH(FWD_VEC, FWD_SCALAR))
}

/* dx may be NULL; dpos (NULL = not needed) and dneg (NULL when qn = 0) receive the scaled step
   gradients. */
void nulsq_backward(const void *dy, const void *x, void *dx, int64_t n, int dt, const float *pos,
                    int qp, const float *neg, int qn, double grad_scale, float *dpos,
                    float *dneg, int nthreads) {
  grid_t g;
  make_grid(&g, pos, qp, neg, qn);
  int nt = threads_for(n, nthreads, 256), bins = g.n + 2, need_steps = dpos != 0;
  double *partial = calloc((size_t)nt * bins, sizeof(double));
#define ROW (partial + (size_t)tid * bins)
#define BWD_VEC(DT, N) nu_bwd_vec(dy, x, dx, b, e, DT, &g, N, need_steps, ROW)
#define BWD_SCALAR(DT) nu_bwd_search(dy, x, dx, b, e, DT, &g, need_steps, ROW)
  PARALLEL(nt, n, NU_DISPATCH(BWD_VEC, BWD_SCALAR))
  if (need_steps) {
    double *sums = partial;  /* thread 0's row collects the others, in a fixed order */
    for (int t = 1; t < nt; t++)
      for (int j = 0; j < bins; j++) sums[j] += partial[(size_t)t * bins + j];
    /* Eq. 11/13 interiors: sum(dy * (y - x)) / width; Eq. 10/12 clip branches: +1 above for
       every s_k, -1 below for every s'_k. Interval qn + k (1-based) holds s_k, qn + 1 - k s'_k. */
    for (int k = 1; k <= qp; k++)
      dpos[k - 1] = (float)((sums[qn + k] / g.width[qn + k - 1] + sums[g.n + 1]) * grad_scale);
    for (int k = 1; k <= qn; k++)
      dneg[k - 1] = (float)((sums[qn + 1 - k] / g.width[qn - k] - sums[0]) * grad_scale);
  }
  free(partial);
}
