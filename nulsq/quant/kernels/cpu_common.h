/* Shared by the CPU kernel files (cpu_quant.c: LSQ and nuLSQ; cpu_rivals.c: the rivals):
   W-float vectors (GCC vector extensions), bf16 loads and stores, rounding, the thread
   split and the block loop in which partial sums stay fp32 before going to float64. */
#ifndef NULSQ_CPU_COMMON_H
#define NULSQ_CPU_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define W 8
#define BLOCK 4096           /* elements summed in fp32 before flushing into float64 */
#define MAX_N 511
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
enum { F32 = 0, BF16 = 1 };
#define INLINE static inline __attribute__((always_inline))

INLINE vf splat(float a) { return (vf){a, a, a, a, a, a, a, a}; }
INLINE vi splati(int32_t a) { return (vi){a, a, a, a, a, a, a, a}; }
INLINE vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
INLINE vf keep(vi m, vf a) { return (vf)((vi)a & m); }
INLINE vi live_lanes(int valid) { return (vi){0, 1, 2, 3, 4, 5, 6, 7} < splati(valid); }
INLINE double hsum(vf v) { double s = 0.0; for (int k = 0; k < W; k++) s += v[k]; return s; }

INLINE float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}

/* The W elements at i, of which `valid` exist (the others read as 0); bf16 -> fp32 is exact. */
INLINE vf load(const void *p, int64_t i, int dt, int valid) {
  if (valid < W) {
    vf v = splat(0.f);
    for (int k = 0; k < valid; k++)
      v[k] = dt == F32 ? ((const float *)p)[i + k] : bf16_to_float(((const uint16_t *)p)[i + k]);
    return v;
  }
  if (dt == F32) { vf v; memcpy(&v, (const float *)p + i, sizeof v); return v; }
  vh h; memcpy(&h, (const uint16_t *)p + i, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

/* fp32 -> bf16, round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16). */
INLINE vh to_bf16(vf v) {
  vu u = (vu)v;
  vu r = (u + splati(0x7FFF) + ((u >> 16) & 1)) >> 16;
  vi nan = v != v;
  r = (vu)(((vi)r & ~nan) | (nan & splati(0x7FC0)));
  return __builtin_convertvector(r, vh);
}

INLINE void store(void *p, int64_t i, vf v, int dt, int valid) {
  if (dt == F32) {
    if (valid == W) memcpy((float *)p + i, &v, sizeof v);
    else for (int k = 0; k < valid; k++) ((float *)p)[i + k] = v[k];
  } else {
    vh h = to_bf16(v);
    if (valid == W) memcpy((uint16_t *)p + i, &h, sizeof h);
    else for (int k = 0; k < valid; k++) ((uint16_t *)p)[i + k] = h[k];
  }
}

/* rint (half to even) of |v| <= 2^22, keeping the sign (rint(-0.3) = -0.0); NaN stays NaN. */
INLINE vf round_even(vf v) {
  vf r = (v + splat(12582912.f)) - splat(12582912.f);
  return (vf)(((vi)r & splati(0x7FFFFFFF)) | ((vi)v & splati((int32_t)0x80000000)));
}

/* clamp that lets NaN through, like torch.clamp */
INLINE vf clamp(vf v, vf lo, vf hi) {
  v = sel(v < lo, lo, v);
  return sel(v > hi, hi, v);
}

/* This thread's share of [0, n): equal W-aligned chunks, so only the last one has a tail. */
INLINE void chunk(int64_t n, int64_t *b, int64_t *e) {
  int t = omp_get_thread_num(), nt = omp_get_num_threads();
  int64_t per = ((n + nt - 1) / nt + W - 1) / W * W;
  *b = per * t < n ? per * t : n;
  *e = *b + per < n ? *b + per : n;
}

static int threads_for(int64_t n, int nthreads, int most) {
  int64_t t = n / 32768;  /* below ~32K elements per thread the fork costs more than it saves */
  if (t > nthreads) t = nthreads;
  if (t > most) t = most;
  return t < 1 ? 1 : (int)t;
}

/* Runs BODY over this thread's [b, e) (thread index tid) on nt threads; one thread calls it
   directly: entering a parallel region costs more than a small tensor's whole kernel. */
#define PARALLEL(nt, n, BODY)                                              \
  if ((nt) == 1) {                                                         \
    int64_t b = 0, e = (n); int tid = 0; (void)tid; BODY;                  \
  } else {                                                                 \
    _Pragma("omp parallel num_threads(nt)")                                \
    { int64_t b, e; chunk(n, &b, &e); int tid = omp_get_thread_num(); (void)tid; BODY; } \
  }

/* Runs AT(i, valid) over [b, e) in full vectors, then the tail; BLOCK_END() after every BLOCK
   elements and at the end (where fp32 partial sums go into float64). */
#define FOR_VECTORS(b, e, AT, BLOCK_END)                                   \
  do {                                                                     \
    int64_t i_ = (b);                                                      \
    while (i_ + W <= (e)) {                                                \
      int64_t stop_ = i_ + BLOCK < (e) ? i_ + BLOCK : (e);                 \
      for (; i_ + W <= stop_; i_ += W) AT(i_, W);                          \
      BLOCK_END();                                                         \
    }                                                                      \
    if (i_ < (e)) { AT(i_, (int)((e) - i_)); BLOCK_END(); }                \
  } while (0)
#define NOTHING() do {} while (0)

/* W table lookups at once: one AVX2 gather, or W scalar loads elsewhere. */
#ifdef __AVX2__
#include <immintrin.h>
INLINE vf gather(const float *table, vi index) {
  return (vf)_mm256_i32gather_ps(table, (__m256i)index, 4);
}
#else
INLINE vf gather(const float *table, vi index) {
  vf r; for (int l = 0; l < W; l++) r[l] = table[index[l]]; return r;
}
#endif

/* A table read by W indices at once. Up to 16 entries it sits in two vectors and is read with
   one two-register permute (__builtin_shuffle: vpermt2ps with AVX-512, permutes with AVX2):
   much faster than a gather, which microcode mitigations make slow on recent x86 parts. */
typedef struct {
  vf lo, hi;
  const float *p;
  int small;
} lut_t;

INLINE lut_t make_lut(const float *p, int n) {
  lut_t t = {splat(0.f), splat(0.f), p, n <= 2 * W};
  if (t.small)
    for (int k = 0; k < n; k++) { if (k < W) t.lo[k] = p[k]; else t.hi[k - W] = p[k]; }
  return t;
}

INLINE vf lut_get(const lut_t *t, vi index) {
  return t->small ? __builtin_shuffle(t->lo, t->hi, index) : gather(t->p, index);
}

#endif
