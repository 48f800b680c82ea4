/* CPU kernels for the rival quantizers (nulsq/quant/rivals), built with cpu_quant.c into one
   library by cpu_quant.py; their Python side is cpu_rivals.py.

   Each forward reads x once and writes y once; each backward reads dy and x once, writes dx
   once and recomputes what the forward found (the level of every element) rather than keeping
   it, so the autograd graph holds x alone. Arithmetic in fp32 for fp32 and bf16 inputs; sums go
   through fp32 vectors per BLOCK into float64. The small tables (levels, the compander's
   coefficients) are computed by the caller in torch, so both paths share their rounding. */
#include "cpu_common.h"

/* ---- level search: the index of v = the count of thresholds strictly below it ---- */

#define LINEAR_MAX 32       /* up to this many thresholds: one vector compare each */

typedef struct {
  int n;                   /* thresholds */
  int depth;               /* binary search: log2 of the padded count */
  float T[MAX_N + 1];      /* ascending; padded with +inf up to a power of two */
} search_t;

/* The thresholds between m ascending levels: their midpoints, (L_j + L_(j+1)) / 2 in fp32 as
   torch computes them, so that a search gives the nearest level (ties to the lower one). */
static void make_midpoints(search_t *s, const float *levels, int m) {
  int n = m - 1;
  s->n = n;
  for (int j = 0; j < n; j++) s->T[j] = (levels[j] + levels[j + 1]) / 2.f;
  int size = 1;
  s->depth = 0;
  while (size < n + 1) { size *= 2; s->depth++; }
  for (int k = n; k < size && k <= MAX_N; k++) s->T[k] = INFINITY;
}

/* NaN compares false everywhere: index 0. */
INLINE vi count_below(vf v, const search_t *s) {
  vi k = splati(0);
  if (s->n <= LINEAR_MAX) {
    for (int j = 0; j < s->n; j++) k -= v > splat(s->T[j]);
  } else {
    for (int h = 1 << (s->depth - 1); h > 0; h >>= 1)
      k += (v > gather(s->T, k + splati(h - 1))) & splati(h);
  }
  return k;
}

INLINE vf sign_of(vf v) {  /* torch.sign: -1, 0 or 1 (NaN: 0 here; only weights a sum) */
  return keep(v > splat(0.f), splat(1.f)) - keep(v < splat(0.f), splat(1.f));
}

INLINE vf with_sign_of(vf magnitude, vf v) {  /* magnitude >= 0 with v's sign bit */
  return (vf)((vi)magnitude | ((vi)v & splati((int32_t)0x80000000)));
}

/* One pass over [0, n) on nt threads running AT(i, valid) (an elementwise map: a forward); the
   caller's `dt` picks fp32 or bf16 loads. */
#define MAP_RANGE(DTV, AT) do { const int DT = DTV; FOR_VECTORS(b, e, AT, NOTHING); } while (0)
#define MAP_PASS(nt, n, AT)                                                \
  PARALLEL(nt, n, if (dt == F32) MAP_RANGE(F32, AT); else MAP_RANGE(BF16, AT))

/* One pass over [0, n) on nt threads in which AT(i, valid) adds its terms to the vector `acc`
   (it may also store dx); the float64 total, threads added in a fixed order, goes to *OUT
   unless OUT is NULL. The caller's `dt` picks fp32 or bf16 loads. */
#define SUM_FLUSH() do { total += hsum(acc); acc = splat(0.f); } while (0)
#define SUM_RANGE(DTV, AT) do {                                            \
    const int DT = DTV; vf acc = splat(0.f); double total = 0.0;           \
    FOR_VECTORS(b, e, AT, SUM_FLUSH); partial_[tid] = total;               \
  } while (0)
#define SUM_PASS(nt, n, AT, OUT) do {                                      \
    double partial_[256] = {0};                                            \
    PARALLEL(nt, n, if (dt == F32) SUM_RANGE(F32, AT); else SUM_RANGE(BF16, AT)) \
    if (OUT) {                                                             \
      double all_ = 0.0;                                                   \
      for (int t_ = 0; t_ < (nt); t_++) all_ += partial_[t_];              \
      *(OUT) = (float)all_;                                                \
    }                                                                      \
  } while (0)

/* ---- clip and project (APoT, LCQ's ternary weights; clip_base.clip_project) ----
   y = alpha P(clamp(x / alpha, lo, 1)), P the nearest of +-magnitudes (ties toward zero).
   dy/dx = dy inside [lo, 1] (and outside too with the unclipped STE); dy/dalpha = P(u) - u
   inside, P(clamped u) outside (APoT's RCF). */

typedef struct {
  search_t mids;           /* midpoints of consecutive magnitudes */
  float M[MAX_N + 1];      /* the magnitudes, M[0] = 0 */
  lut_t magnitudes;        /* M as a lookup table */
  float lo;                /* -1 (signed) or 0 */
  int is_signed;
} project_t;

static void make_project(project_t *p, const float *mags, int m, int is_signed) {
  make_midpoints(&p->mids, mags, m);
  memcpy(p->M, mags, (size_t)m * sizeof(float));
  p->magnitudes = make_lut(p->M, m);
  p->lo = is_signed ? -1.f : 0.f;
  p->is_signed = is_signed;
}

INLINE vf project_at(vf u, const project_t *p) {  /* P(clamp(u)) */
  vf c = clamp(u, splat(p->lo), splat(1.f));
  if (!p->is_signed) return lut_get(&p->magnitudes, count_below(c, &p->mids));
  vf magnitude = lut_get(&p->magnitudes, count_below((vf)((vi)c & splati(0x7FFFFFFF)), &p->mids));
  return with_sign_of(magnitude, c);
}

void project_forward(const void *x, void *y, int64_t n, int dt, const float *alpha,
                     const float *mags, int m, int is_signed, int nthreads) {
  project_t p;
  make_project(&p, mags, m, is_signed);
  vf a = splat(*alpha);
  int nt = threads_for(n, nthreads, 256);
#define AT(i, valid) store(y, i, project_at(load(x, i, DT, valid) / a, &p) * a, DT, valid)
  MAP_PASS(nt, n, AT);
#undef AT
}

/* dx may be NULL; dalpha (NULL = not needed) receives the sum of dy * dy/dalpha. */
void project_backward(const void *dy, const void *x, void *dx, int64_t n, int dt,
                      const float *alpha, const float *mags, int m, int is_signed, int clipped,
                      float *dalpha, int nthreads) {
  project_t p;
  make_project(&p, mags, m, is_signed);
  vf a = splat(*alpha), lo = splat(p.lo), one = splat(1.f);
  int nt = threads_for(n, nthreads, 256);
#define AT(i, valid) do {                                                  \
    vf d = load(dy, i, DT, valid), u = load(x, i, DT, valid) / a;          \
    vi inside = (u >= lo) & (u <= one);                                    \
    if (dx) store(dx, i, clipped ? keep(inside, d) : d, DT, valid);        \
    if (dalpha) {                                                          \
      vf q = project_at(u, &p), g = q - keep(inside, u);                   \
      acc += keep(valid < W ? live_lanes(valid) : splati(-1), d * g);      \
    }                                                                      \
  } while (0)
  SUM_PASS(nt, n, AT, dalpha);
#undef AT
}

/* ---- PACT's backward (rivals/pact.py; its forward is LSQ's kernel) ----
   u = x / alpha. dx = dy on [0, 1) (unsigned) or (-1, 1) (signed); dL/dalpha = the sum of dy
   over u >= 1, minus (signed) the sum over u <= -1. */
void pact_backward(const void *dy, const void *x, void *dx, int64_t n, int dt, const float *alpha,
                   int is_signed, float *dalpha, int nthreads) {
  vf a = splat(*alpha), one = splat(1.f), lo = splat(is_signed ? -1.f : 0.f);
  int nt = threads_for(n, nthreads, 256);
#define AT(i, valid) do {                                                  \
    vf d = load(dy, i, DT, valid), u = load(x, i, DT, valid) / a;          \
    vi inside = (is_signed ? u > lo : u >= lo) & (u < one);                \
    if (dx) store(dx, i, keep(inside, d), DT, valid);                      \
    acc += keep(u >= one, d);                                              \
    if (is_signed) acc -= keep(u <= -one, d);                              \
  } while (0)
  SUM_PASS(nt, n, AT, dalpha);
#undef AT
}

/* ---- the nearest of m ascending levels (LQ-Nets' forward, rivals/lqnets.py) ----
   Ties (x on a midpoint) go to the lower level, as a search on the midpoints. */
void nearest_forward(const void *x, void *y, int64_t n, int dt, const float *levels, int m,
                     int nthreads) {
  search_t s;
  make_midpoints(&s, levels, m);
  lut_t table = make_lut(levels, m);
  int nt = threads_for(n, nthreads, 256);
#define AT(i, valid) do {                                                  \
    vf xv = load(x, i, DT, valid);                                         \
    store(y, i, lut_get(&table, count_below(xv, &s)), DT, valid);          \
  } while (0)
  MAP_PASS(nt, n, AT);
#undef AT
}

/* ---- LCQ's compander (rivals/lcq.py) ----
   t = |x| / alpha (signed) or x / alpha; v K = clamp(t, 0, 1-) K, its integer part the input
   interval k; the level q = round(c_k + s_k v K) with c, s the caller's coefficient tables
   (L g(v) on interval k); y = out[q] (alpha g^-1(q / L)), with x's sign when signed. */

typedef struct {
  int K, L, is_signed;
  float below_one;
  lut_t intercepts, slopes, out;   /* K, K and L + 1 entries */
} compander_t;

static compander_t make_compander(const float *intercepts, const float *slopes, int K,
                                  const float *out, int L, float below_one, int is_signed) {
  compander_t c = {K, L, is_signed, below_one, make_lut(intercepts, K), make_lut(slopes, K),
                   make_lut(out, L + 1)};
  return c;
}

/* t, the interval k and the level q of the W elements in xv; y their output. */
INLINE vf compand_at(vf xv, const compander_t *c, vf a, vf *t_out, vi *k_out, vi *q_out) {
  vf t = (c->is_signed ? (vf)((vi)xv & splati(0x7FFFFFFF)) : xv) / a;
  vf tc = sel(t > splat(0.f), t, splat(0.f));          /* NaN and t <= 0: 0 */
  tc = sel(tc < splat(c->below_one), tc, splat(c->below_one));
  vf vk = tc * splat((float)c->K);
  vi k = __builtin_convertvector(vk, vi);              /* floor: vk >= 0 */
  vf level = round_even(lut_get(&c->intercepts, k) + lut_get(&c->slopes, k) * vk);
  level = clamp(level, splat(0.f), splat((float)c->L));  /* finite here: stays in the table */
  vi q = __builtin_convertvector(level, vi);
  vf y = lut_get(&c->out, q);
  if (c->is_signed) y = with_sign_of(y, xv);
  y = sel(xv == xv, y, xv);                            /* NaN in, NaN out */
  *t_out = t; *k_out = k; *q_out = q;
  return y;
}

void lcq_forward(const void *x, void *y, int64_t n, int dt, const float *alpha,
                 const float *intercepts, const float *slopes, int K, const float *out, int L,
                 float below_one, int is_signed, int nthreads) {
  compander_t c = make_compander(intercepts, slopes, K, out, L, below_one, is_signed);
  vf a = splat(*alpha);
  int nt = threads_for(n, nthreads, 256);
#define AT(i, valid) do {                                                  \
    vf t; vi k, q;                                                         \
    store(y, i, compand_at(load(x, i, DT, valid), &c, a, &t, &k, &q), DT, valid); \
  } while (0)
  MAP_PASS(nt, n, AT);
#undef AT
}

/* dx may be NULL. sums[0], sums[1] receive sum(dy y) and sum(dx x) (dL/dalpha is their
   difference over alpha). cells (NULL = not needed), 2 K (L + 1) float64: per cell (k, q), the
   sums of w = dy sign(x) over the inside and of w t. ratio (K (L + 1), NULL under the authors'
   STE) multiplies dx per cell. Inside: 0 <= t < 1 (authors) or <= 1. */
void lcq_backward(const void *dy, const void *x, void *dx, int64_t n, int dt, const float *alpha,
                  const float *intercepts, const float *slopes, int K, const float *out, int L,
                  float below_one, int is_signed, const float *ratio, double *sums, double *cells,
                  int nthreads) {
  compander_t c = make_compander(intercepts, slopes, K, out, L, below_one, is_signed);
  vf a = splat(*alpha), low = splat(-1.17549435e-38f), top = splat(1.f);
  int nt = threads_for(n, nthreads, 64), levels = L + 1, ncell = K * levels;
  /* per thread: sum(dy y), sum(dx x), then 4 copies of the cells (lanes l and l + 4 share one;
     the copies break chains of adds into one cell, as ReLU's zeros make) */
  size_t row = 2 + (cells ? 8 * (size_t)ncell : 0);
  double *partial = calloc((size_t)nt * row, sizeof(double));
  int authors = ratio == 0;
#define AT(i, valid) do {                                                  \
    vf xv = load(x, i, DT, valid), d = load(dy, i, DT, valid), t; vi k, q; \
    vf yv = compand_at(xv, &c, a, &t, &k, &q);                         \
    vi inside = (t > low) & (authors ? t < top : t <= top);                \
    vi live = valid < W ? live_lanes(valid) : splati(-1);                  \
    vf w = keep(inside & live, d);                                         \
    vi cell = k * splati(levels) + q;                                      \
    vf dxv = authors ? w : w * gather(ratio, cell);                        \
    if (dx) store(dx, i, dxv, DT, valid);                                  \
    acc_y += keep(live, d * yv);                                           \
    acc_x += dxv * xv;                                                     \
    if (cells) {                                                           \
      if (c.is_signed) w *= sign_of(xv);                                   \
      vf wt = w * t;                                                       \
      for (int l = 0; l < valid; l++) {                                    \
        double *bin = mine + 2 + (size_t)(l & 3) * 2 * ncell + 2 * (size_t)cell[l]; \
        bin[0] += w[l]; bin[1] += wt[l];                                   \
      }                                                                    \
    }                                                                      \
  } while (0)
#define FLUSH() do {                                                       \
    mine[0] += hsum(acc_y); mine[1] += hsum(acc_x);                        \
    acc_y = acc_x = splat(0.f);                                            \
  } while (0)
#define RANGE(DTV) do {                                                    \
    const int DT = DTV; double *mine = partial + (size_t)tid * row;        \
    vf acc_y = splat(0.f), acc_x = splat(0.f);                             \
    FOR_VECTORS(b, e, AT, FLUSH);                                          \
  } while (0)
  PARALLEL(nt, n, if (dt == F32) RANGE(F32); else RANGE(BF16))
#undef RANGE
#undef FLUSH
#undef AT
  /* threads and copies in a fixed order: the same sums for the same input */
  sums[0] = sums[1] = 0.0;
  if (cells) memset(cells, 0, 2 * (size_t)ncell * sizeof(double));
  for (int t = 0; t < nt; t++) {
    const double *r = partial + (size_t)t * row;
    sums[0] += r[0]; sums[1] += r[1];
    if (cells)
      for (int copy = 0; copy < 4; copy++)
        for (int j = 0; j < ncell; j++) {
          cells[j] += r[2 + (size_t)copy * 2 * ncell + 2 * j];
          cells[ncell + j] += r[2 + (size_t)copy * 2 * ncell + 2 * j + 1];
        }
  }
  free(partial);
}

/* ---- LQ-Nets' QEM statistics (rivals/lqnets.py counts_and_sums) ----
   Per level j of the `levels` ascending levels: the count and the sum of the elements nearest
   to it, i.e. with exactly j midpoints strictly below them (mid_(j-1) < x <= mid_j). */
void level_stats(const void *x, int64_t n, int dt, const float *levels, int bins, double *counts,
                 double *sums, int nthreads) {
  search_t s;
  make_midpoints(&s, levels, bins);
  int nt = threads_for(n, nthreads, 64), m = bins - 1;
  double *partial = calloc((size_t)nt * 2 * bins, sizeof(double));
#define RANGE(DTV) do {                                                    \
    const int DT = DTV; double *c = partial + (size_t)tid * 2 * bins, *sm = c + bins; \
    if (m <= 15) {  /* vector counts per level: fp32 is exact up to BLOCK elements */ \
      vf ac[16], as[16];                                                   \
      for (int j = 0; j < bins; j++) ac[j] = as[j] = splat(0.f);           \
      AT_VECTORS;                                                          \
    } else {                                                               \
      AT_SCALAR;                                                           \
    }                                                                      \
  } while (0)
#define VEC_AT(i, valid) do {                                              \
    vf xv = load(x, i, DT, valid);                                         \
    vi k = count_below(xv, &s);                                            \
    if (valid < W) k |= ~live_lanes(valid);  /* absent lanes: no level */   \
    for (int j = 0; j < bins; j++) {                                       \
      vi hit = k == splati(j);                                             \
      ac[j] += keep(hit, splat(1.f)); as[j] += keep(hit, xv);              \
    }                                                                      \
  } while (0)
#define VEC_FLUSH() do {                                                   \
    for (int j = 0; j < bins; j++) {                                       \
      c[j] += hsum(ac[j]); sm[j] += hsum(as[j]); ac[j] = as[j] = splat(0.f); \
    }                                                                      \
  } while (0)
#define SCALAR_AT(i, valid) do {                                           \
    vf xv = load(x, i, DT, valid);                                         \
    vi k = count_below(xv, &s);                                            \
    for (int l = 0; l < valid; l++) { c[k[l]] += 1.0; sm[k[l]] += xv[l]; } \
  } while (0)
#define AT_VECTORS FOR_VECTORS(b, e, VEC_AT, VEC_FLUSH)
#define AT_SCALAR FOR_VECTORS(b, e, SCALAR_AT, NOTHING)
  PARALLEL(nt, n, if (dt == F32) RANGE(F32); else RANGE(BF16))
#undef AT_SCALAR
#undef AT_VECTORS
#undef SCALAR_AT
#undef VEC_FLUSH
#undef VEC_AT
#undef RANGE
  for (int j = 0; j < 2 * bins; j++) {
    double total = 0.0;
    for (int t = 0; t < nt; t++) total += partial[(size_t)t * 2 * bins + j];
    if (j < bins) counts[j] = total; else sums[j - bins] = total;
  }
  free(partial);
}
