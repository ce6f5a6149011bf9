/* Decode attention on the CPU: one query per head over cached keys and values read in place.
 *
 * The keys and values of a layer live in a page pool as (Hkv, slots, D) planes of bfloat16 or float32;
 * a sequence's cache is one or more runs of slots (a shared prefix, then its own pages). For each KV
 * head this reads every key row once, converts it to float32 in registers, and scores it against the
 * G query heads that share it (GQA); the softmax is computed online over blocks of keys (running max
 * and sum, rescaled as the max grows), and every value row is read once for the G queries too.
 * Nothing is copied or up-cast into a buffer, so the bytes moved are the cache's own.
 *
 * Pages of int8 codes (a float16 step and minimum per group of channels, longkv.kv.quant) are read too:
 * each row is decoded to float32 in registers (a block at a time into a small buffer where the 16-wide loops
 * do not apply), so a step moves 56 % of the bfloat16 cache's bytes at head_dim 64.
 *
 * Also here: the residual add fused with RMSNorm, and RoPE writing the rotated heads out (decode
 * steps are a row of tiny ops; each of these is one call instead of five to ten), and the 4-bit
 * weight-only linear layer of decode steps.
 *
 * Built at first use by longkv/kernels/__init__.py with the machine's C compiler (-O3 -march=native);
 * AVX2 intrinsics where the CPU has them, plain C elsewhere, and where it has AVX-512: bfloat16 pages
 * read 32 elements at a time, and the weight tiles' integer dot products in 512-bit vpdpbusd (VNNI).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LONGKV_AVX2 1
#if defined(__AVX512F__)
#define LONGKV_AVX512 1 /* bfloat16 pages read 32 elements at a time */
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LONGKV_VNNI512 1 /* 512-bit integer dot products (vpdpbusd) for the weight tiles */
#endif
#endif

/* d elements at base + off (bfloat16 when bf16, else float32) as float32 in dst. */
static inline void load_row(const void *base, int64_t off, int bf16, int d, float *restrict dst) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)base + off;
        int j = 0;
#ifdef LONGKV_AVX2
        for (; j + 8 <= d; j += 8)
            _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + j))), 16)));
#endif
        for (; j < d; j++) {
            uint32_t u = (uint32_t)src[j] << 16; /* bfloat16 is the top half of a float32 */
            float f;
            memcpy(&f, &u, sizeof f);
            dst[j] = f;
        }
    } else {
        memcpy(dst, (const float *)base + off, (size_t)d * sizeof(float));
    }
}

/* d float32 values times mul, stored at out + off as bfloat16 (round to nearest even) or float32. */
static inline void store_row(void *out, int64_t at, int q_bf16, int D, const float *x, float mul) {
    if (q_bf16) {
        uint16_t *o = (uint16_t *)out + at;
        for (int j = 0; j < D; j++) {
            float f = x[j] * mul;
            uint32_t u;
            memcpy(&u, &f, sizeof u);
            o[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); /* round to nearest even */
        }
    } else {
        float *o = (float *)out + at;
        for (int j = 0; j < D; j++) o[j] = x[j] * mul;
    }
}


#ifdef LONGKV_AVX2
/* 8 elements of a row (bfloat16 or float32) as float32 lanes. */
static inline __m256 load8(const void *base, int64_t off, int bf16) {
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)base + off);
}

static inline float hsum8(__m256 a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

static inline float hmax8(__m256 a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

#endif

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
#ifdef LONGKV_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t u;
    if (exp == 0) { /* zero or subnormal */
        float f = (float)man * (1.0f / 16777216.0f);
        memcpy(&u, &f, sizeof u);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7F800000u | (man << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

/* float32 to float16, rounded to nearest even (as PyTorch's .to(torch.float16)); overflow gives infinity. */
static inline uint16_t float_to_half(float f) {
#ifdef LONGKV_AVX2
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7FFFFFFFu;
    if (u >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (u > 0x7F800000u ? 0x200u : 0u)); /* inf, nan */
    if (u >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds past the largest half */
    if (u < 0x38800000u) { /* a subnormal half (or zero): round the value times 2^24 to an integer */
        float x;
        memcpy(&x, &u, sizeof x);
        return (uint16_t)(sign | (uint32_t)nearbyintf(x * 16777216.0f));
    }
    const uint32_t mant = u & 0x1FFFu, base = (u - 0x38000000u) >> 13; /* rebias the exponent, drop 13 bits */
    return (uint16_t)(sign | (base + (mant > 0x1000u || (mant == 0x1000u && (base & 1u)))));
#endif
}

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define BLK 64      /* keys scored before each softmax update */
#define MAX_G 32    /* query heads per KV head */
#define MAX_D 512   /* head_dim */

/* exp(x) for x <= 0 to float32 precision (relative error ~2e-7): 2^n times a degree-6 polynomial of the
 * remainder (the classic Cephes expf coefficients); inputs below -87 give 0. Branch-free, vectorisable. */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x <= -87.0f ? 0.0f : p * scale;
}

#ifdef LONGKV_AVX2
static inline __m256 exp_neg8(__m256 x) { /* exp_neg, 8 lanes */
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 dead = _mm256_cmp_ps(x, lo, _CMP_LE_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(dead, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

/* s[i][t] = scale * q[i] . K row t, for the nb rows of a block (row t at element off + t * ts). */
static void score_block(const float *q, int G, int D, const void *k, int64_t off, int64_t ts, int nb, int bf16,
                        float scale, float s[][BLK]) {
#ifdef LONGKV_AVX2
    if (D % 8 == 0) {
        for (int t = 0; t < nb; t++) {
            const int64_t o = off + t * ts;
            for (int i0 = 0; i0 < G; i0 += 4) { /* four queries per pass over the row */
                const int w = G - i0 < 4 ? G - i0 : 4;
                const float *q0 = q + (int64_t)i0 * D;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int c = 0; c < D; c += 8) {
                    const __m256 kv = load8(k, o + c, bf16);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c), kv, a0);
                    if (w > 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + c), kv, a1);
                    if (w > 2) a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + c), kv, a2);
                    if (w > 3) a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + c), kv, a3);
                }
                s[i0][t] = hsum8(a0) * scale;
                if (w > 1) s[i0 + 1][t] = hsum8(a1) * scale;
                if (w > 2) s[i0 + 2][t] = hsum8(a2) * scale;
                if (w > 3) s[i0 + 3][t] = hsum8(a3) * scale;
            }
        }
        return;
    }
#endif
    float row[MAX_D];
    for (int t = 0; t < nb; t++) {
        load_row(k, off + t * ts, bf16, D, row);
        for (int i = 0; i < G; i++) {
            const float *qi = q + (int64_t)i * D;
            float dot = 0.0f;
            for (int j = 0; j < D; j++) dot += qi[j] * row[j];
            s[i][t] = dot * scale;
        }
    }
}

/* s[i][:nb] = exp(s[i][:nb] - mx) */
static void exp_block(float *s, int nb, float mx) {
    int t = 0;
#ifdef LONGKV_AVX2
    const __m256 m8 = _mm256_set1_ps(mx);
    for (; t + 8 <= nb; t += 8) _mm256_storeu_ps(s + t, exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m8)));
#endif
    for (; t < nb; t++) s[t] = exp_neg(s[t] - mx);
}

/* acc[i] += sum_t s[i][t] * V row t, for the nb rows of a block. */
static void value_block(float acc[][MAX_D], int G, int D, const void *v, int64_t off, int64_t ts, int nb, int bf16,
                        float s[][BLK]) {
#ifdef LONGKV_AVX2
    if (D % 8 == 0) {
        for (int c = 0; c < D; c += 8) {
            for (int i0 = 0; i0 < G; i0 += 4) {
                const int w = G - i0 < 4 ? G - i0 : 4;
                __m256 a0 = _mm256_loadu_ps(acc[i0] + c);
                __m256 a1 = w > 1 ? _mm256_loadu_ps(acc[i0 + 1] + c) : a0;
                __m256 a2 = w > 2 ? _mm256_loadu_ps(acc[i0 + 2] + c) : a0;
                __m256 a3 = w > 3 ? _mm256_loadu_ps(acc[i0 + 3] + c) : a0;
                for (int t = 0; t < nb; t++) {
                    const __m256 vv = load8(v, off + t * ts + c, bf16);
                    a0 = _mm256_fmadd_ps(_mm256_set1_ps(s[i0][t]), vv, a0);
                    if (w > 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(s[i0 + 1][t]), vv, a1);
                    if (w > 2) a2 = _mm256_fmadd_ps(_mm256_set1_ps(s[i0 + 2][t]), vv, a2);
                    if (w > 3) a3 = _mm256_fmadd_ps(_mm256_set1_ps(s[i0 + 3][t]), vv, a3);
                }
                _mm256_storeu_ps(acc[i0] + c, a0);
                if (w > 1) _mm256_storeu_ps(acc[i0 + 1] + c, a1);
                if (w > 2) _mm256_storeu_ps(acc[i0 + 2] + c, a2);
                if (w > 3) _mm256_storeu_ps(acc[i0 + 3] + c, a3);
            }
        }
        return;
    }
#endif
    float row[MAX_D];
    for (int t = 0; t < nb; t++) {
        load_row(v, off + t * ts, bf16, D, row);
        for (int i = 0; i < G; i++) {
            const float p = s[i][t];
            for (int j = 0; j < D; j++) acc[i][j] += p * row[j];
        }
    }
}

#ifdef LONGKV_AVX2
/* bfloat16 rows of D % 16 == 0 elements, read 16 at a time: one 256-bit load gives the even elements
 * (shifted up into float32) and the odd ones (the high halves masked), two instructions for 16 values.
 * The queries and the value accumulators are kept in that order ("paired": per 16 elements, the 8 even
 * ones then the 8 odd ones), so every product pairs the right elements; see pair_order. */
static inline void split_pairs(const uint16_t *row, __m256 *even, __m256 *odd) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)row);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* The 8 horizontal sums of a[0..7] as one vector (lane t: the sum of a[t]'s lanes). */
static inline __m256 sum8x8(const __m256 *a) {
    const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* The sum of a's lanes in sum8x8's order ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)): a key's score is then the
 * same whether its block's keys come 8 at a time or not. */
static inline float hsum8_tree(__m256 a) {
    const __m256 h = _mm256_hadd_ps(a, a);
    const __m256 hh = _mm256_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(hh), _mm256_extractf128_ps(hh, 1)));
}

/* Rows of a block as the 16-wide loops read them: bfloat16 (coded = 0), or int8 codes with a float16 step
 * and minimum per group of `group` codes (coded = 1, group a multiple of 16): row t at element (code)
 * off + t * ts, its group g's step and minimum at st / mn + soff + t * sts + g. */
typedef struct {
    const void *p;
    int64_t off, ts;
    const uint16_t *st, *mn;
    int64_t soff, sts;
    int group;
} Rows;

/* Elements c .. c + 15 of row t as float32 in two vectors: bfloat16 rows in the paired order (the 8 even
 * elements in *even, the 8 odd ones in *odd), codes in their own order (c .. c + 7, then c + 8 .. c + 15),
 * decoded with their group's step s8 and minimum m8 (see group_scale). The queries and accumulators of a
 * sequence are kept in the order of its rows. */
ALWAYS_INLINE void row16(const Rows *r, const int coded, int64_t t, int c, __m256 s8, __m256 m8, __m256 *even, __m256 *odd) {
    if (!coded) {
        split_pairs((const uint16_t *)r->p + r->off + t * r->ts + c, even, odd);
        return;
    }
    const uint8_t *x = (const uint8_t *)r->p + r->off + t * r->ts + c; /* codes: elements in their own order */
    *even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)x))), s8, m8);
    *odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(x + 8)))), s8, m8);
}

/* The step (*s8) and minimum (*m8) of group gi of row t, in every lane (coded rows only). */
ALWAYS_INLINE void group_scale(const Rows *r, const int coded, int64_t t, int gi, __m256 *s8, __m256 *m8) {
    if (coded) {
        const int64_t at = r->soff + t * r->sts + gi;
        *s8 = _mm256_set1_ps(_cvtsh_ss(r->st[at]));
        *m8 = _mm256_set1_ps(_cvtsh_ss(r->mn[at]));
    }
}

/* The start of row t (for prefetching). */
static inline const char *row_at(const Rows *r, const int coded, int64_t t) {
    return coded ? (const char *)r->p + r->off + t * r->ts : (const char *)((const uint16_t *)r->p + r->off + t * r->ts);
}

/* score_block for paired queries over bfloat16 or int8-coded keys; 8 keys' dot products are summed across
 * lanes at once. Fetches ahead: keys a block on (reads past the cache never fault), this block's values. */
ALWAYS_INLINE void score_pairs_of(const float *q, int G, int D, const Rows *k, const int coded, int nb, float scale,
                                  float s[][BLK], const Rows *v) {
    const __m256 sc = _mm256_set1_ps(scale);
    const int row_bytes = coded ? D : 2 * D, span = coded ? k->group : D; /* elements under one step and minimum */
    for (int i0 = 0; i0 < G; i0 += 4) {
        const int w = G - i0 < 4 ? G - i0 : 4;
        const float *q0 = q + (int64_t)i0 * D;
        __m256 part[4][8];
        for (int t = 0; t < nb; t++) {
            if (i0 == 0)
                for (int c = 0; c < row_bytes; c += 64) {
                    _mm_prefetch(row_at(k, coded, t + BLK) + c, _MM_HINT_T0);
                    _mm_prefetch(row_at(v, coded, t) + c, _MM_HINT_T0);
                }
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, s8 = a0, m8 = a0;
            for (int c0 = 0, gi = 0; c0 < D; c0 += span, gi++) {
                group_scale(k, coded, t, gi, &s8, &m8);
                for (int c = c0; c < c0 + span; c += 16) {
                    __m256 ke, ko;
                    row16(k, coded, t, c, s8, m8, &ke, &ko);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c + 8), ko, _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c), ke, a0));
                    if (w > 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + c + 8), ko, _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + c), ke, a1));
                    if (w > 2) a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + c + 8), ko, _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + c), ke, a2));
                    if (w > 3) a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + c + 8), ko, _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + c), ke, a3));
                }
            }
            part[0][t & 7] = a0;
            part[1][t & 7] = a1;
            part[2][t & 7] = a2;
            part[3][t & 7] = a3;
            if ((t & 7) == 7)
                for (int i = 0; i < w; i++) _mm256_storeu_ps(&s[i0 + i][t - 7], _mm256_mul_ps(sum8x8(part[i]), sc));
        }
        for (int t = nb & ~7; t < nb; t++)
            for (int i = 0; i < w; i++) s[i0 + i][t] = hsum8_tree(part[i][t & 7]) * scale;
    }
}

/* value_block for bfloat16 or int8-coded values into paired accumulators. */
ALWAYS_INLINE void value_pairs_of(float acc[][MAX_D], int G, int D, const Rows *v, const int coded, int nb, float s[][BLK]) {
    for (int c = 0, gi = 0, end = coded ? v->group : D; c < D; c += 16) {
        if (c == end) {
            gi++;
            end += v->group;
        }
        for (int i0 = 0; i0 < G; i0 += 4) {
            const int w = G - i0 < 4 ? G - i0 : 4;
            __m256 e0 = _mm256_loadu_ps(acc[i0] + c), o0 = _mm256_loadu_ps(acc[i0] + c + 8);
            __m256 e1 = e0, o1 = o0, e2 = e0, o2 = o0, e3 = e0, o3 = o0;
            if (w > 1) e1 = _mm256_loadu_ps(acc[i0 + 1] + c), o1 = _mm256_loadu_ps(acc[i0 + 1] + c + 8);
            if (w > 2) e2 = _mm256_loadu_ps(acc[i0 + 2] + c), o2 = _mm256_loadu_ps(acc[i0 + 2] + c + 8);
            if (w > 3) e3 = _mm256_loadu_ps(acc[i0 + 3] + c), o3 = _mm256_loadu_ps(acc[i0 + 3] + c + 8);
            for (int t = 0; t < nb; t++) {
                __m256 ve, vo, s8 = e0, m8 = e0;
                group_scale(v, coded, t, gi, &s8, &m8);
                row16(v, coded, t, c, s8, m8, &ve, &vo);
                __m256 p = _mm256_broadcast_ss(&s[i0][t]);
                e0 = _mm256_fmadd_ps(p, ve, e0);
                o0 = _mm256_fmadd_ps(p, vo, o0);
                if (w > 1) {
                    p = _mm256_broadcast_ss(&s[i0 + 1][t]);
                    e1 = _mm256_fmadd_ps(p, ve, e1);
                    o1 = _mm256_fmadd_ps(p, vo, o1);
                }
                if (w > 2) {
                    p = _mm256_broadcast_ss(&s[i0 + 2][t]);
                    e2 = _mm256_fmadd_ps(p, ve, e2);
                    o2 = _mm256_fmadd_ps(p, vo, o2);
                }
                if (w > 3) {
                    p = _mm256_broadcast_ss(&s[i0 + 3][t]);
                    e3 = _mm256_fmadd_ps(p, ve, e3);
                    o3 = _mm256_fmadd_ps(p, vo, o3);
                }
            }
            _mm256_storeu_ps(acc[i0] + c, e0);
            _mm256_storeu_ps(acc[i0] + c + 8, o0);
            if (w > 1) _mm256_storeu_ps(acc[i0 + 1] + c, e1), _mm256_storeu_ps(acc[i0 + 1] + c + 8, o1);
            if (w > 2) _mm256_storeu_ps(acc[i0 + 2] + c, e2), _mm256_storeu_ps(acc[i0 + 2] + c + 8, o2);
            if (w > 3) _mm256_storeu_ps(acc[i0 + 3] + c, e3), _mm256_storeu_ps(acc[i0 + 3] + c + 8, o3);
        }
    }
}

static void score_pairs(const float *q, int G, int D, const Rows *k, int coded, int nb, float scale, float s[][BLK],
                        const Rows *v) {
    if (coded)
        score_pairs_of(q, G, D, k, 1, nb, scale, s, v);
    else
        score_pairs_of(q, G, D, k, 0, nb, scale, s, v);
}

static void value_pairs(float acc[][MAX_D], int G, int D, const Rows *v, int coded, int nb, float s[][BLK]) {
    if (coded)
        value_pairs_of(acc, G, D, v, 1, nb, s);
    else
        value_pairs_of(acc, G, D, v, 0, nb, s);
}
#endif

#ifdef LONGKV_AVX512
/* With AVX-512 the paired order is per 32 elements where D allows (paired = 32): one 512-bit load of a
 * bfloat16 row gives its 16 even elements and its 16 odd ones (see split_pairs). */
static inline void split32(const uint16_t *row, __m512 *even, __m512 *odd) {
    const __m512i v = _mm512_loadu_si512((const void *)row);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* The two halves of a summed: 8 lanes with the same total. */
static inline __m256 halves_sum(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

/* Key t's dot products with queries i0 .. i0 + w - 1 (a[i], 16 lanes each) folded into part; the scores of 8
 * keys stored once they are all in (sum8x8). */
ALWAYS_INLINE void keep_scores16(__m256 part[4][8], const __m512 *a, int w, int t, int i0, float s[][BLK], __m256 sc) {
    for (int i = 0; i < w; i++) part[i][t & 7] = halves_sum(a[i]);
    if ((t & 7) == 7)
        for (int i = 0; i < w; i++) _mm256_storeu_ps(&s[i0 + i][t - 7], _mm256_mul_ps(sum8x8(part[i]), sc));
}

/* The scores of the block's keys after its last multiple of 8, summed in sum8x8's order (hsum8_tree). */
ALWAYS_INLINE void score_tail(__m256 part[4][8], int w, int nb, int i0, float s[][BLK], float scale) {
    for (int t = nb & ~7; t < nb; t++)
        for (int i = 0; i < w; i++) s[i0 + i][t] = hsum8_tree(part[i][t & 7]) * scale;
}

/* score_pairs_of for bfloat16 keys, 32 elements of a row at a time. */
static void score_bf16_wide(const float *q, int G, int D, const Rows *k, int nb, float scale, float s[][BLK], const Rows *v) {
    const __m256 sc = _mm256_set1_ps(scale);
    const uint16_t *kp = (const uint16_t *)k->p + k->off, *vp = (const uint16_t *)v->p + v->off;
    for (int i0 = 0; i0 < G; i0 += 4) {
        const int w = G - i0 < 4 ? G - i0 : 4;
        const float *q0 = q + (int64_t)i0 * D;
        __m256 part[4][8];
        for (int t = 0; t < nb; t++) {
            const uint16_t *row = kp + t * k->ts;
            if (i0 == 0)
                for (int c = 0; c < 2 * D; c += 64) {
                    _mm_prefetch((const char *)(row + BLK * k->ts) + c, _MM_HINT_T0);
                    _mm_prefetch((const char *)(vp + t * v->ts) + c, _MM_HINT_T0);
                }
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int c = 0; c < D; c += 32) {
                __m512 ke, ko;
                split32(row + c, &ke, &ko);
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + c + 16), ko, _mm512_fmadd_ps(_mm512_loadu_ps(q0 + c), ke, a0));
                if (w > 1) a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + D + c + 16), ko, _mm512_fmadd_ps(_mm512_loadu_ps(q0 + D + c), ke, a1));
                if (w > 2) a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 2 * D + c + 16), ko, _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 2 * D + c), ke, a2));
                if (w > 3) a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 3 * D + c + 16), ko, _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 3 * D + c), ke, a3));
            }
            const __m512 a[4] = {a0, a1, a2, a3};
            keep_scores16(part, a, w, t, i0, s, sc);
        }
        score_tail(part, w, nb, i0, s, scale);
    }
}

/* value_pairs_of for bfloat16 values, 32 elements of a row at a time. */
static void value_bf16_wide(float acc[][MAX_D], int G, int D, const Rows *v, int nb, float s[][BLK]) {
    const uint16_t *vp = (const uint16_t *)v->p + v->off;
    for (int c = 0; c < D; c += 32)
        for (int i0 = 0; i0 < G; i0 += 4) {
            const int w = G - i0 < 4 ? G - i0 : 4;
            __m512 e0 = _mm512_loadu_ps(acc[i0] + c), o0 = _mm512_loadu_ps(acc[i0] + c + 16);
            __m512 e1 = e0, o1 = o0, e2 = e0, o2 = o0, e3 = e0, o3 = o0;
            if (w > 1) e1 = _mm512_loadu_ps(acc[i0 + 1] + c), o1 = _mm512_loadu_ps(acc[i0 + 1] + c + 16);
            if (w > 2) e2 = _mm512_loadu_ps(acc[i0 + 2] + c), o2 = _mm512_loadu_ps(acc[i0 + 2] + c + 16);
            if (w > 3) e3 = _mm512_loadu_ps(acc[i0 + 3] + c), o3 = _mm512_loadu_ps(acc[i0 + 3] + c + 16);
            for (int t = 0; t < nb; t++) {
                __m512 ve, vo;
                split32(vp + t * v->ts + c, &ve, &vo);
                __m512 p = _mm512_set1_ps(s[i0][t]);
                e0 = _mm512_fmadd_ps(p, ve, e0);
                o0 = _mm512_fmadd_ps(p, vo, o0);
                if (w > 1) {
                    p = _mm512_set1_ps(s[i0 + 1][t]);
                    e1 = _mm512_fmadd_ps(p, ve, e1);
                    o1 = _mm512_fmadd_ps(p, vo, o1);
                }
                if (w > 2) {
                    p = _mm512_set1_ps(s[i0 + 2][t]);
                    e2 = _mm512_fmadd_ps(p, ve, e2);
                    o2 = _mm512_fmadd_ps(p, vo, o2);
                }
                if (w > 3) {
                    p = _mm512_set1_ps(s[i0 + 3][t]);
                    e3 = _mm512_fmadd_ps(p, ve, e3);
                    o3 = _mm512_fmadd_ps(p, vo, o3);
                }
            }
            _mm512_storeu_ps(acc[i0] + c, e0);
            _mm512_storeu_ps(acc[i0] + c + 16, o0);
            if (w > 1) _mm512_storeu_ps(acc[i0 + 1] + c, e1), _mm512_storeu_ps(acc[i0 + 1] + c + 16, o1);
            if (w > 2) _mm512_storeu_ps(acc[i0 + 2] + c, e2), _mm512_storeu_ps(acc[i0 + 2] + c + 16, o2);
            if (w > 3) _mm512_storeu_ps(acc[i0 + 3] + c, e3), _mm512_storeu_ps(acc[i0 + 3] + c + 16, o3);
        }
}
#endif

#ifdef LONGKV_AVX512
/* 16 int8 codes of row t from element c, decoded with their group's step and minimum (16 lanes each). */
ALWAYS_INLINE __m512 codes16(const Rows *r, int64_t t, int c, __m512 s16, __m512 m16) {
    const __m128i x = _mm_loadu_si128((const __m128i *)((const uint8_t *)r->p + r->off + t * r->ts + c));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x)), s16, m16);
}

/* The step and minimum of group gi of row t, in every lane. */
ALWAYS_INLINE void group_scale16(const Rows *r, int64_t t, int gi, __m512 *s16, __m512 *m16) {
    const int64_t at = r->soff + t * r->sts + gi;
    *s16 = _mm512_set1_ps(_cvtsh_ss(r->st[at]));
    *m16 = _mm512_set1_ps(_cvtsh_ss(r->mn[at]));
}

/* score_pairs_of for int8-coded keys, 16 codes of a row at a time (queries in the rows' own order). */
static void score_q8_wide(const float *q, int G, int D, const Rows *k, int nb, float scale, float s[][BLK], const Rows *v) {
    const __m256 sc = _mm256_set1_ps(scale);
    for (int i0 = 0; i0 < G; i0 += 4) {
        const int w = G - i0 < 4 ? G - i0 : 4;
        const float *q0 = q + (int64_t)i0 * D;
        __m256 part[4][8];
        for (int t = 0; t < nb; t++) {
            if (i0 == 0)
                for (int c = 0; c < D; c += 64) {
                    _mm_prefetch(row_at(k, 1, t + BLK) + c, _MM_HINT_T0);
                    _mm_prefetch(row_at(v, 1, t) + c, _MM_HINT_T0);
                }
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, s16, m16;
            for (int c0 = 0, gi = 0; c0 < D; c0 += k->group, gi++) {
                group_scale16(k, t, gi, &s16, &m16);
                for (int c = c0; c < c0 + k->group; c += 16) {
                    const __m512 x = codes16(k, t, c, s16, m16);
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + c), x, a0);
                    if (w > 1) a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + D + c), x, a1);
                    if (w > 2) a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 2 * D + c), x, a2);
                    if (w > 3) a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 3 * D + c), x, a3);
                }
            }
            const __m512 a[4] = {a0, a1, a2, a3};
            keep_scores16(part, a, w, t, i0, s, sc);
        }
        score_tail(part, w, nb, i0, s, scale);
    }
}

/* value_pairs_of for int8-coded values, 16 codes of a row at a time (accumulators in the rows' own order). */
static void value_q8_wide(float acc[][MAX_D], int G, int D, const Rows *v, int nb, float s[][BLK]) {
    for (int c = 0; c < D; c += 16) {
        const int gi = c / v->group;
        for (int i0 = 0; i0 < G; i0 += 4) {
            const int w = G - i0 < 4 ? G - i0 : 4;
            __m512 e0 = _mm512_loadu_ps(acc[i0] + c), e1 = e0, e2 = e0, e3 = e0, s16, m16;
            if (w > 1) e1 = _mm512_loadu_ps(acc[i0 + 1] + c);
            if (w > 2) e2 = _mm512_loadu_ps(acc[i0 + 2] + c);
            if (w > 3) e3 = _mm512_loadu_ps(acc[i0 + 3] + c);
            for (int t = 0; t < nb; t++) {
                group_scale16(v, t, gi, &s16, &m16);
                const __m512 x = codes16(v, t, c, s16, m16);
                e0 = _mm512_fmadd_ps(_mm512_set1_ps(s[i0][t]), x, e0);
                if (w > 1) e1 = _mm512_fmadd_ps(_mm512_set1_ps(s[i0 + 1][t]), x, e1);
                if (w > 2) e2 = _mm512_fmadd_ps(_mm512_set1_ps(s[i0 + 2][t]), x, e2);
                if (w > 3) e3 = _mm512_fmadd_ps(_mm512_set1_ps(s[i0 + 3][t]), x, e3);
            }
            _mm512_storeu_ps(acc[i0] + c, e0);
            if (w > 1) _mm512_storeu_ps(acc[i0 + 1] + c, e1);
            if (w > 2) _mm512_storeu_ps(acc[i0 + 2] + c, e2);
            if (w > 3) _mm512_storeu_ps(acc[i0 + 3] + c, e3);
        }
    }
}
#endif

/* x (D) to (to_pairs) or from the paired order: per `width` (16 or 32) elements, the even ones then the odd ones. */
static void pair_order(const float *x, float *out, int D, int width, int to_pairs) {
    const int h = width / 2;
    for (int c = 0; c < D; c += width)
        for (int j = 0; j < h; j++) {
            if (to_pairs) {
                out[c + j] = x[c + 2 * j];
                out[c + h + j] = x[c + 2 * j + 1];
            } else {
                out[c + 2 * j] = x[c + j];
                out[c + 2 * j + 1] = x[c + h + j];
            }
        }
}

/* Segment formats of decode attention (meta word 0). */
#define SEG_F32 0
#define SEG_BF16 1
#define SEG_INT8 8 /* int8 codes with a float16 step and minimum per group: x = code * step + min */
#define META 17    /* int64 words per segment, see longkv_decode_attention */

/* The nb rows of a block of int8-coded K or V decoded to float32 in dst (nb x D): row t's codes at
 * codes + off + t * ts, its group g's step and minimum (float16) at step / lo + soff + t * sts + g. For the
 * rows the paired loops do not take (no AVX2, a head_dim or group not a multiple of 16). */
static void decode_q8_block(const uint8_t *codes, int64_t off, int64_t ts, const uint16_t *step, const uint16_t *lo,
                            int64_t soff, int64_t sts, int nb, int D, int group, float *dst) {
    for (int t = 0; t < nb; t++) {
        const uint8_t *row = codes + off + t * ts;
        const uint16_t *st = step + soff + t * sts, *mn = lo + soff + t * sts;
        float *o = dst + (int64_t)t * D;
        for (int j = 0; j < D; j++)
            o[j] = (float)row[j] * half_to_float((const uint8_t *)(st + j / group)) + half_to_float((const uint8_t *)(mn + j / group));
    }
}

/* s[i][0 .. nb) for keys lo + 0 .. nb of one segment (md: its META words), KV head g; kbuf for int8 keys the
 * paired loops do not take. v: the values, for prefetching. */
static void score_piece(const int64_t *md, int64_t b, int nb, const float *qg, int g, int G, int D, float scale, int paired,
                        float s[][BLK], float *kbuf) {
    const int fmt = (int)md[0], bf16 = fmt == SEG_BF16;
    const void *kp = (const void *)(intptr_t)md[1];
    const int64_t k_hs = md[4], k_ts = md[5], s_hs = md[12], s_ts = md[13];
    const uint16_t *ks = (const uint16_t *)(intptr_t)md[8], *km = (const uint16_t *)(intptr_t)md[9];
    const int group = (int)md[14];
#ifdef LONGKV_AVX2
    const void *vp = (const void *)(intptr_t)md[2];
    const int64_t v_hs = md[6], v_ts = md[7];
    const uint16_t *vs = (const uint16_t *)(intptr_t)md[10], *vm = (const uint16_t *)(intptr_t)md[11];
    const Rows kr = {kp, g * k_hs + b * k_ts, k_ts, ks, km, g * s_hs + b * s_ts, s_ts, group};
    const Rows vr = {vp, g * v_hs + b * v_ts, v_ts, vs, vm, g * s_hs + b * s_ts, s_ts, group};
    const int wide = (fmt == SEG_BF16 && paired) || (fmt == SEG_INT8 && !paired && D % 16 == 0 && group % 16 == 0);
#ifdef LONGKV_AVX512
    if (wide && fmt == SEG_BF16 && paired == 32) {
        score_bf16_wide(qg, G, D, &kr, nb, scale, s, &vr);
        return;
    }
    if (wide && fmt == SEG_INT8) {
        score_q8_wide(qg, G, D, &kr, nb, scale, s, &vr);
        return;
    }
#endif
    if (wide) {
        score_pairs(qg, G, D, &kr, fmt == SEG_INT8, nb, scale, s, &vr);
        return;
    }
#else
    (void)paired;
#endif
    if (fmt == SEG_INT8) {
        decode_q8_block((const uint8_t *)kp, g * k_hs + b * k_ts, k_ts, ks, km, g * s_hs + b * s_ts, s_ts, nb, D, group, kbuf);
        score_block(qg, G, D, kbuf, 0, D, nb, 0, scale, s);
    } else
        score_block(qg, G, D, kp, g * k_hs + b * k_ts, k_ts, nb, bf16, scale, s);
}

/* acc[i] += sum_t s[i][t] * V row b + t of one segment, KV head g (see score_piece). */
static void value_piece(const int64_t *md, int64_t b, int nb, int g, int G, int D, int paired, float acc[][MAX_D],
                        float s[][BLK], float *vbuf) {
    const int fmt = (int)md[0], bf16 = fmt == SEG_BF16;
    const void *vp = (const void *)(intptr_t)md[2];
    const int64_t v_hs = md[6], v_ts = md[7], s_hs = md[12], s_ts = md[13];
    const uint16_t *vs = (const uint16_t *)(intptr_t)md[10], *vm = (const uint16_t *)(intptr_t)md[11];
    const int group = (int)md[14];
#ifdef LONGKV_AVX2
    const Rows vr = {vp, g * v_hs + b * v_ts, v_ts, vs, vm, g * s_hs + b * s_ts, s_ts, group};
    const int wide = (fmt == SEG_BF16 && paired) || (fmt == SEG_INT8 && !paired && D % 16 == 0 && group % 16 == 0);
#ifdef LONGKV_AVX512
    if (wide && fmt == SEG_BF16 && paired == 32) {
        value_bf16_wide(acc, G, D, &vr, nb, s);
        return;
    }
    if (wide && fmt == SEG_INT8) {
        value_q8_wide(acc, G, D, &vr, nb, s);
        return;
    }
#endif
    if (wide) {
        value_pairs(acc, G, D, &vr, fmt == SEG_INT8, nb, s);
        return;
    }
#else
    (void)paired;
#endif
    if (fmt == SEG_INT8) {
        decode_q8_block((const uint8_t *)vp, g * v_hs + b * v_ts, v_ts, vs, vm, g * s_hs + b * s_ts, s_ts, nb, D, group, vbuf);
        value_block(acc, G, D, vbuf, 0, D, nb, 0, s);
    } else
        value_block(acc, G, D, vp, g * v_hs + b * v_ts, v_ts, nb, bf16, s);
}

#define TRIG_RUNS 32 /* shifts whose cos and sin a decode attention task keeps (the same runs recur for each KV head) */

/* cos and sin of `shift` positions of RoPE: c[j], sn[j] for the rot_half frequencies, angles in float64 as the
 * model's own (shift * inv_freq[j]). */
static void rope_trig(int64_t shift, const double *inv_freq, int rot_half, float *c, float *sn) {
    for (int j = 0; j < rot_half; j++) {
        const double a = (double)shift * inv_freq[j];
        c[j] = (float)cos(a);
        sn[j] = (float)sin(a);
    }
}

/* out = the G query rows x (D each, as computed) turned by the RoPE angles with cos c and sin sn ("rotate
 * halves": channel j pairs with j + rot_half, channels past 2 rot_half pass), in the paired order of width
 * `paired` when it is not 0. */
static void turn_queries(const float *x, float *out, int G, int D, int paired, const float *c, const float *sn, int rot_half) {
    float tmp[MAX_D];
    for (int i = 0; i < G; i++) {
        const float *xi = x + (int64_t)i * D;
        float *y = paired ? tmp : out + (int64_t)i * D;
        for (int j = 0; j < rot_half; j++) {
            y[j] = xi[j] * c[j] - xi[j + rot_half] * sn[j];
            y[j + rot_half] = xi[j + rot_half] * c[j] + xi[j] * sn[j];
        }
        for (int j = 2 * rot_half; j < D; j++) y[j] = xi[j];
        if (paired) pair_order(tmp, out + (int64_t)i * D, D, paired, 1);
    }
}

/* Attention state of every query head over the tokens [lo, hi) of the concatenated segments, lo a multiple
 * of BLK: running max m (H), sum l (H) and the unnormalised output acc (H x D). The softmax is updated once
 * per block of BLK tokens at fixed offsets of the concatenation (a block may span segments), and every
 * key's score and every value's product are the same wherever a block or segment starts: so the result
 * depends on the tokens and on [lo, hi) alone, not on how the cache is cut into segments. q: (H, D) float32,
 * in the paired order of width `paired` (16 or 32) when it is not 0: then every segment is bfloat16. kbuf,
 * vbuf: BLK x D float32 each, for int8 blocks the 16-wide loops do not take (NULL when every int8 segment is
 * taken by them). */
static void attend_range(const int64_t *meta, int nseg, const float *q, int H, int Hkv, int D, float scale, int paired,
                         int64_t lo, int64_t hi, float *m_out, float *l_out, float *acc_out, float *kbuf, float *vbuf,
                         const double *inv_freq, int rot_half, float *qbuf) {
    const int G = H / Hkv;
    float acc[MAX_G][MAX_D];
    float s[MAX_G][BLK];
    int64_t first = 0, at0 = 0; /* the segment holding token lo, and its first token in the concatenation */
    while (first < nseg - 1 && at0 + meta[META * first + 3] <= lo) at0 += meta[META * first++ + 3];
    const int64_t *pm[BLK]; /* a block's pieces: segment, first row in it, rows, offset in the block, key shift */
    int64_t pr[BLK], pd[BLK];
    int pc[BLK], po[BLK];
    /* moved keys: the group's q as computed and turned, then the cos and sin of the first TRIG_RUNS shifts met
     * (met again in the same order for every KV head) and of one more */
    float *qnat = qbuf, *qrot = qbuf ? qbuf + (size_t)G * D : NULL, *trig = qbuf ? qrot + (size_t)G * D : NULL;
    int64_t shifts[TRIG_RUNS];
    int ntrig = 0;
    for (int g = 0; g < Hkv; g++) {
        const float *qg = q + (int64_t)g * G * D;
        float *m = m_out + g * G, *l = l_out + g * G;
        for (int i = 0; i < G; i++) {
            m[i] = -1e30f;
            l[i] = 0.0f;
            memset(acc[i], 0, (size_t)D * sizeof(float));
        }
        int64_t turned = 0; /* the shift qrot holds (0: none yet) */
        int cursor = 0;     /* the next of `shifts` this KV head should meet */
        if (qbuf)
            for (int i = 0; i < G; i++) {
                if (paired)
                    pair_order(qg + (int64_t)i * D, qnat + (int64_t)i * D, D, paired, 0);
                else
                    memcpy(qnat + (int64_t)i * D, qg + (int64_t)i * D, (size_t)D * sizeof(float));
            }
        int64_t sg = first, at = at0;
        for (int64_t b0 = lo; b0 < hi; b0 += BLK) {
            const int nb = (int)(hi - b0 < BLK ? hi - b0 : BLK);
            int np = 0;
            for (int f = 0; f < nb;) {
                while (at + meta[META * sg + 3] <= b0 + f) at += meta[META * sg++ + 3];
                const int64_t *md = meta + META * sg;
                const int64_t r = b0 + f - at, left = md[3] - r;
                int c = (int)(left < nb - f ? left : nb - f);
                int64_t d = 0;
                const int64_t *orig = (const int64_t *)(intptr_t)md[15];
                if (orig) { /* keys seen at md[16] + row, cached at orig[row]: a piece per run of one shift */
                    d = orig[r] - md[16] - r;
                    int e = 1;
                    while (e < c && orig[r + e] - md[16] - r - e == d) e++;
                    c = e;
                }
                pm[np] = md;
                pr[np] = r;
                pc[np] = c;
                po[np] = f;
                pd[np] = d;
                f += pc[np++];
            }
            for (int p = 0; p < np; p++) {
                const float *qp = qg;
                if (pd[p]) { /* q . R(-d) k = R(d) q . k: turn the queries once per shift, not every key */
                    if (pd[p] != turned) {
                        float *cs = trig + (size_t)2 * rot_half * TRIG_RUNS; /* the spare entry */
                        if (cursor < ntrig && shifts[cursor] == pd[p]) {
                            cs = trig + (size_t)2 * rot_half * cursor++;
                        } else {
                            if (g == 0 && ntrig < TRIG_RUNS && cursor == ntrig) {
                                shifts[ntrig] = pd[p];
                                cs = trig + (size_t)2 * rot_half * ntrig++;
                                cursor = ntrig;
                            }
                            rope_trig(pd[p], inv_freq, rot_half, cs, cs + rot_half);
                        }
                        turn_queries(qnat, qrot, G, D, paired, cs, cs + rot_half, rot_half);
                        turned = pd[p];
                    }
                    qp = qrot;
                }
                score_piece(pm[p], pr[p], pc[p], qp, g, G, D, scale, paired, (float(*)[BLK])(s[0] + po[p]), kbuf);
            }
            for (int i = 0; i < G; i++) {
                float mx = m[i];
                for (int t = 0; t < nb; t++) mx = s[i][t] > mx ? s[i][t] : mx;
                const float corr = exp_neg(m[i] - mx);
                exp_block(s[i], nb, mx);
                float sum = 0.0f;
                for (int t = 0; t < nb; t++) sum += s[i][t];
                l[i] = l[i] * corr + sum;
                m[i] = mx;
                if (corr != 1.0f)
                    for (int j = 0; j < D; j++) acc[i][j] *= corr;
            }
            for (int p = 0; p < np; p++)
                value_piece(pm[p], pr[p], pc[p], g, G, D, paired, acc, (float(*)[BLK])(s[0] + po[p]), vbuf);
        }
        for (int i = 0; i < G; i++) memcpy(acc_out + ((int64_t)g * G + i) * D, acc[i], (size_t)D * sizeof(float));
    }
}

/* Tokens per chunk of a sequence's n keys: each chunk's softmax is computed on its own and the chunks merged
 * in order, whatever the threads or the batch, so a sequence's output is the same alone or in any batch.
 * 256 keys (4 blocks), more past 64 chunks. */
static int64_t chunk_tokens(int64_t n) {
    const int64_t per = (n + 64 * BLK - 1) / (64 * BLK);
    return BLK * (per > 4 ? per : 4);
}

/* Decode attention of B sequences in one call: out[h, b] = softmax(scale * q[h, b] . K_b[g]) V_b[g] for every
 * query head h of KV head g = h / G, each sequence over its own cache.
 *
 * q, out: (H, B, D), contiguous, float32 or bfloat16 (flags bit 1 set: bfloat16).
 * nseg: (B,) segments per sequence; meta: META int64 per segment, the sequences' in order: its format
 * (SEG_F32, SEG_BF16 or SEG_INT8), key pointer, value pointer, tokens, then the element strides of a key
 * row's head and token, and of a value row's; for SEG_INT8 (pointers and strides in codes, one byte each)
 * also the pointers to the keys' steps and minimums and the values' steps and minimums (float16), the
 * element strides of a head and a token in those four planes, and the codes per group (else zeros); last,
 * for keys attention sees at other positions than the ones they were cached rotated at (an eviction policy
 * that renumbers what it kept), a pointer to the segment's original positions (int64, one per row) and the
 * position its first row is seen at (the next rows one after another), else two zeros: each run of rows
 * with one shift is scored with the queries turned by it (inv_freq: the RoPE's rot_half float64
 * frequencies; NULL and 0 when no segment moves). Rows
 * are contiguous. The work is cut into tasks, a chunk of one sequence's tokens each (chunk_tokens), run by
 * the OpenMP team of the calling thread (PyTorch's, when loaded beside it); the chunks' softmaxes of a
 * sequence are then merged in order. A sequence's output depends on its own keys only: not on the threads,
 * the other sequences of the batch, or where its segments start and end.
 * Returns 0, -1 when H is not a multiple of Hkv, G or D exceed the limits above, or a coded group does not
 * divide D, -2 out of memory. */
int longkv_decode_attention(const int64_t *meta, const int32_t *nseg, int B, const void *q_in, void *out, int H, int Hkv,
                            int D, float scale, int flags, const double *inv_freq, int rot_half) {
    const int q_bf16 = (flags >> 1) & 1;
    if (Hkv <= 0 || H % Hkv != 0 || D > MAX_D || H / Hkv > MAX_G || B <= 0) return -1;
    int moves = 0; /* some segment's keys are seen at other positions: queries are turned */
    /* per sequence: first segment, tokens, tasks, and whether its q and acc are in the paired order (every
     * segment bfloat16, D a multiple of 16: the 16-wide loops over bfloat16 rows) */
    int64_t *first = malloc(sizeof(int64_t) * 4 * (size_t)B);
    if (!first) return -2;
    int64_t *tokens = first + B, *tasks = tokens + B, *paired = tasks + B, ntask = 0, seg = 0;
    int buffered = 0; /* some int8 segment is decoded a block at a time (the 16-wide loops do not take it) */
    for (int b = 0; b < B; b++) {
        first[b] = seg;
        tokens[b] = 0;
        paired[b] = D % 16 == 0 ? 16 : 0; /* the width of its paired order */
#ifdef LONGKV_AVX512
        if (D % 32 == 0) paired[b] = 32;
#endif
#ifndef LONGKV_AVX2
        paired[b] = 0;
#endif
        for (int j = 0; j < nseg[b]; j++) {
            const int64_t *md = meta + META * (seg + j);
            tokens[b] += md[3];
            if (md[15]) moves = 1;
            if (md[0] != SEG_BF16) paired[b] = 0;
            if (md[0] == SEG_INT8) {
                if (md[14] <= 0 || D % md[14] != 0) {
                    free(first);
                    return -1;
                }
#ifdef LONGKV_AVX2
                if (D % 16 != 0 || md[14] % 16 != 0) buffered = 1;
#else
                buffered = 1;
#endif
            }
        }
        seg += nseg[b];
        const int64_t ch = chunk_tokens(tokens[b]);
        tasks[b] = tokens[b] > ch ? (tokens[b] + ch - 1) / ch : 1;
        ntask += tasks[b];
    }
    if (moves && (!inv_freq || rot_half <= 0 || 2 * rot_half > D)) {
        free(first);
        return -1;
    }
    /* per task: its sequence and part; the partial state: max m (H), sum l (H), acc (H x D) */
    int64_t *task = malloc(sizeof(int64_t) * 2 * (size_t)ntask);
    float *buf = malloc(sizeof(float) * ((size_t)H * D * (B + (size_t)ntask) + 2 * (size_t)H * ntask));
    float *blocks = buffered ? malloc(sizeof(float) * 2 * BLK * (size_t)D * ntask) : NULL; /* decoded K, V blocks per task */
    /* per task, where keys move: the group's queries as computed and turned, cos and sin of TRIG_RUNS + 1 shifts */
    const size_t qper = 2 * (size_t)(H / Hkv) * D + 2 * (size_t)rot_half * (TRIG_RUNS + 1);
    float *turned = moves ? malloc(sizeof(float) * qper * ntask) : NULL;
    if (!task || !buf || (buffered && !blocks) || (moves && !turned)) {
        free(first);
        free(task);
        free(buf);
        free(blocks);
        free(turned);
        return -2;
    }
    for (int64_t b = 0, at = 0; b < B; b++)
        for (int64_t p = 0; p < tasks[b]; p++, at++) {
            task[2 * at] = b;
            task[2 * at + 1] = p;
        }
    float *q = buf, *acc = q + (size_t)H * D * B, *m = acc + (size_t)H * D * ntask, *l = m + (size_t)H * ntask;
    float tmp[MAX_D];
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            float *qh = q + ((int64_t)b * H + h) * D;
            load_row(q_in, ((int64_t)h * B + b) * D, q_bf16, D, paired[b] ? tmp : qh);
            if (paired[b]) pair_order(tmp, qh, D, (int)paired[b], 1);
        }
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (ntask > 1)
#endif
    for (int64_t t = 0; t < ntask; t++) {
        const int64_t b = task[2 * t], p = task[2 * t + 1], n = tokens[b], ch = chunk_tokens(n);
        const int64_t lo = p * ch, hi = lo + ch < n ? lo + ch : n;
        float *kb = buffered ? blocks + 2 * BLK * (size_t)D * t : NULL;
        attend_range(meta + META * first[b], nseg[b], q + (int64_t)b * H * D, H, Hkv, D, scale, (int)paired[b], lo, hi,
                     m + (size_t)H * t, l + (size_t)H * t, acc + (size_t)H * D * t, kb, kb ? kb + BLK * (size_t)D : NULL,
                     inv_freq, rot_half, turned ? turned + qper * t : NULL);
    }
    for (int64_t b = 0, t0 = 0; b < B; t0 += tasks[b], b++) {
        for (int h = 0; h < H; h++) { /* merge the tasks' softmaxes: rescale each to the largest max */
            float mx = -1e30f, sum = 0.0f;
            for (int64_t t = t0; t < t0 + tasks[b]; t++) mx = m[H * t + h] > mx ? m[H * t + h] : mx;
            float *o = acc + ((int64_t)H * t0 + h) * D;
            for (int64_t t = t0; t < t0 + tasks[b]; t++) {
                const float w = exp_neg(m[H * t + h] - mx);
                sum += w * l[H * t + h];
                if (t == t0) {
                    for (int j = 0; j < D; j++) o[j] *= w;
                } else {
                    const float *x = acc + ((int64_t)H * t + h) * D;
                    for (int j = 0; j < D; j++) o[j] += w * x[j];
                }
            }
            if (paired[b]) {
                pair_order(o, tmp, D, (int)paired[b], 0);
                o = tmp;
            }
            store_row(out, ((int64_t)h * B + b) * D, q_bf16, D, o, sum > 0.0f ? 1.0f / sum : 0.0f);
        }
    }
    free(first);
    free(task);
    free(buf);
    free(blocks);
    free(turned);
    return 0;
}

/* x += delta (when delta is not NULL, rounded to x's dtype as PyTorch's add would), then
 * out = rms_norm(x) * w: x / sqrt(mean(x^2) + eps) * w in float32, rounded once (as F.rms_norm does).
 * x, delta, out: (T, C) contiguous, bfloat16 (bf16 = 1) or float32; w: (C,), bfloat16 (w_bf16 = 1) or float32
 * (Gemma keeps its norm weights in float32 under bfloat16 activations). */
static void add_rms_norm_impl(void *x, int x_bf16, const void *delta, int d_bf16, const void *w, int w_bf16, void *out,
                              int out_bf16, int T, int C, float eps) {
#ifdef _OPENMP
#pragma omp parallel if (T >= 32)
#endif
    {
        float *row = malloc(sizeof(float) * 3 * (size_t)C);
        if (row) {
            float *d = row + C, *wf = d + C;
            load_row(w, 0, w_bf16, C, wf);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int t = 0; t < T; t++) {
                const int64_t at = (int64_t)t * C;
                load_row(x, at, x_bf16, C, row);
                if (delta) {
                    load_row(delta, at, d_bf16, C, d);
                    for (int j = 0; j < C; j++) row[j] += d[j];
                    store_row(x, at, x_bf16, C, row, 1.0f);
                    if (x_bf16) load_row(x, at, x_bf16, C, row); /* the rounded sum, as the next layer reads it */
                }
                float ss = 0.0f;
                for (int j = 0; j < C; j++) ss += row[j] * row[j];
                const float rstd = 1.0f / sqrtf(ss / (float)C + eps);
                for (int j = 0; j < C; j++) row[j] *= rstd * wf[j];
                store_row(out, at, out_bf16, C, row, 1.0f);
            }
            free(row);
        }
    }
}

void longkv_add_rms_norm(void *x, const void *delta, const void *w, void *out, int T, int C, float eps, int bf16,
                         int w_bf16) {
    add_rms_norm_impl(x, bf16, delta, bf16, w, w_bf16, out, bf16, T, C, eps);
}

/* RoPE ("rotate halves") of the first nh heads of each of T rows: row t's head h is the D values at
 * src + t * row_stride + h * D; out[h][t] (nh, T, D) contiguous gets it rotated by cos[t], sin[t]
 * ((T, R/2) float32): channels j < R/2 become x_j cos - x_{j+R/2} sin, channels R/2 <= j < R become
 * x_j cos + x_{j-R/2} sin, channels from R on pass. src and out bfloat16 (bf16 = 1) or float32. */
static void rope_impl(const void *src, int src_bf16, int64_t row_stride, void *out, int out_bf16, int T, int nh, int D,
                      const float *cos, const float *sin, int R) {
    const int half = R / 2;
#ifdef _OPENMP
#pragma omp parallel for collapse(2) schedule(static) if (T >= 32)
#endif
    for (int h = 0; h < nh; h++) {
        for (int t = 0; t < T; t++) {
            float x[MAX_D], y[MAX_D];
            load_row(src, t * row_stride + (int64_t)h * D, src_bf16, D, x);
            const float *c = cos + (int64_t)t * half, *s = sin + (int64_t)t * half;
            for (int j = 0; j < half; j++) {
                y[j] = x[j] * c[j] - x[j + half] * s[j];
                y[j + half] = x[j + half] * c[j] + x[j] * s[j];
            }
            for (int j = R; j < D; j++) y[j] = x[j];
            store_row(out, ((int64_t)h * T + t) * D, out_bf16, D, y, 1.0f);
        }
    }
}

void longkv_rope(const void *src, int64_t row_stride, void *out, int T, int nh, int D, const float *cos,
                 const float *sin, int R, int bf16) {
    rope_impl(src, bf16, row_stride, out, bf16, T, nh, D, cos, sin, R);
}

/* Weight-only linear layers for a few rows (decode): y = x W^T, W read once, in 4-bit or 8-bit blocks.
 *
 * A decode step multiplies one row per sequence by every weight matrix, so it is bound by the bytes of
 * W it reads, and by the instructions spent per byte. x is coded to 8 bits per block of 32 inputs
 * (scale = max |x| / 127, as llama.cpp does for its 4-bit matrix products) and each block's dot product
 * is computed in integers; the result is exactly the product of the coded x with the weights.
 *
 * W is stored in tiles of 8 output rows by 32 inputs (N is padded to a multiple of 8 with zero rows).
 * Within a tile the inputs come in 8 chunks of 4, and a chunk's 32 bytes hold 4 codes of each of the 8
 * rows: one 256-bit register, multiplied (AVX2 maddubs) by x's 4 bytes of that chunk broadcast to every
 * lane, yields partial dot products of all 8 rows at once, so no horizontal sums are needed, and the
 * tile's per-row scales multiply 8 lanes in one instruction.
 *
 * - 4-bit tiles (160 bytes; weight = code * step + min, code in [0, 15], GGUF's Q4_1 arithmetic):
 *   4 x 32 bytes of codes, byte 32 c + 4 i + t holding input 4 c + t of row i in its low nibble and
 *   input 4 (c + 4) + t in its high one; then the 8 rows' steps, then their minimums, as float16.
 *   The codes are maddubs's unsigned operand; 8 chunks sum in 16 bits without overflow
 *   (8 * 2 * 15 * 127 < 2^15); the minimum multiplies the sum of the coded x.
 * - 8-bit tiles (272 bytes; weight = code * scale, GGUF's Q8_0 arithmetic): 8 x 32 bytes of signed
 *   codes, byte 32 c + 4 i + t holding input 4 c + t of row i; then the 8 rows' scales as float16.
 *   maddubs gets |x| and the code with x's sign.
 *
 * Tiles of one group of 8 rows follow each other along K; groups are split among the OpenMP threads.
 */
#define Q4_BLOCK 32
#define TILE_ROWS 8
#define Q4_TILE 160
#define Q8_TILE 272
#define MAX_ROWS 8 /* rows of x per pass over W (more rows: further passes) */
#define PREFETCH_TILES 8 /* tiles fetched ahead of the one read (reads past W's end never fault) */

/* The passes below take the row count mr as a constant: each is inlined into a switch over mr = 1..MAX_ROWS
 * (ROWS_SWITCH), so the per-row accumulators are unrolled into registers. A pass reads each tile of W
 * once and uses it for all mr rows of x. */

/* The 8 outputs of row r of x for tile group g: y[r, 8 g + i] for the i that are real rows (< N). */
static inline void store_group(void *y, int y_bf16, int64_t r, int64_t N, int64_t g, const float *tot) {
    const int64_t n0 = g * TILE_ROWS;
    store_row(y, r * N + n0, y_bf16, (int)(N - n0 < TILE_ROWS ? N - n0 : TILE_ROWS), tot, 1.0f);
}

#ifdef LONGKV_AVX2
static inline __m256i bcast4(const int8_t *p) { /* 4 bytes at p in every 32-bit lane */
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
}
#endif

/* x coded for the tiles, per row and block of 32 inputs: q the codes (M, K), a their absolute values,
 * s the scale, sum the coded block's sum (s times isum, for the 4-bit minimums), isum the codes' sum. */
typedef struct {
    const int8_t *q, *a;
    const float *s, *sum;
    const int32_t *isum;
} CodedX;

#ifdef LONGKV_VNNI512
/* A 64-byte run of a tile: chunks j and j + 1 (8 rows by 4 inputs each), one per 256-bit half. x's 4
 * bytes of chunk j go to every lane of the low half, those of chunk j + 1 to the high half: xw holds the
 * block's 32 codes as 8 words, sel the words (j in lanes 0-7, j + 1 in lanes 8-15). */
static inline __m512i pair_words(__m512i xw, __m512i sel) { return _mm512_permutexvar_epi32(sel, xw); }

static inline __m512i pair_sel(int j) { return _mm512_set_epi32(j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j, j, j, j, j, j, j, j); }

/* The 8 rows' sums over both halves, in 8 lanes. */
static inline __m256i fold16(__m512i s) { return _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1)); }
#endif

/* One pass of 4-bit W: rows [m0, m0 + mr) of x (coded, see CodedX) against
 * tile groups [g0, g1). */
ALWAYS_INLINE void q4_rows(const uint8_t *w, int K, const CodedX *x, int m0, const int mr, int64_t g0, int64_t g1,
                           int64_t N, int y_bf16, void *y) {
    const int8_t *xq = x->q;
    const float *xs = x->s, *xsum = x->sum;
    const int nblk = K / Q4_BLOCK;
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *grp = w + g * (int64_t)nblk * Q4_TILE;
        float tot[MAX_ROWS][TILE_ROWS];
#ifdef LONGKV_AVX2
        __m256 acc[MAX_ROWS];
        for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
#ifdef LONGKV_VNNI512
        const __m512i m16 = _mm512_set1_epi8(0x0F);
        const __m512i sel[4] = {pair_sel(0), pair_sel(2), pair_sel(4), pair_sel(6)};
#else
        const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
#endif
        for (int b = 0; b < nblk; b++) {
            const uint8_t *t = grp + (int64_t)b * Q4_TILE;
            for (int l = 0; l < Q4_TILE; l += 64) _mm_prefetch((const char *)(t + PREFETCH_TILES * Q4_TILE + l), _MM_HINT_T0);
#ifdef LONGKV_VNNI512
            __m512i c16[4]; /* chunks (0, 1), (2, 3), (4, 5), (6, 7) */
            for (int j = 0; j < 2; j++) {
                const __m512i v = _mm512_loadu_si512((const void *)(t + 64 * j));
                c16[j] = _mm512_and_si512(v, m16);
                c16[j + 2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m16);
            }
#else
            __m256i c[8];
            for (int j = 0; j < 4; j++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(t + 32 * j));
                c[j] = _mm256_and_si256(v, m4);
                c[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
#endif
            const __m256 step = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 128)));
            const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 144)));
            for (int r = 0; r < mr; r++) {
                const int64_t xb = (int64_t)(m0 + r) * nblk + b;
                const int8_t *xv = xq + xb * Q4_BLOCK;
#ifdef LONGKV_VNNI512
                /* chunks (0, 1), (2, 3) in the low nibbles of the two 64-byte runs, (4, 5), (6, 7) in the high */
                const __m512i xw = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)xv));
                __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c16[0], pair_words(xw, sel[0]));
                s = _mm512_dpbusd_epi32(s, c16[1], pair_words(xw, sel[1]));
                s = _mm512_dpbusd_epi32(s, c16[2], pair_words(xw, sel[2]));
                s = _mm512_dpbusd_epi32(s, c16[3], pair_words(xw, sel[3]));
                const __m256 dot = _mm256_cvtepi32_ps(fold16(s));
#else
                __m256i s = _mm256_maddubs_epi16(c[0], bcast4(xv));
                for (int j = 1; j < 8; j++) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c[j], bcast4(xv + 4 * j)));
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones));
#endif
                acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(step, _mm256_set1_ps(xs[xb])), acc[r]);
                acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xsum[xb]), acc[r]);
            }
        }
        for (int r = 0; r < mr; r++) _mm256_storeu_ps(tot[r], acc[r]);
#else
        for (int r = 0; r < mr; r++)
            for (int i = 0; i < TILE_ROWS; i++) tot[r][i] = 0.0f;
        for (int b = 0; b < nblk; b++) {
            const uint8_t *t = grp + (int64_t)b * Q4_TILE;
            for (int i = 0; i < TILE_ROWS; i++) {
                const float step = half_to_float(t + 128 + 2 * i), mn = half_to_float(t + 144 + 2 * i);
                for (int r = 0; r < mr; r++) {
                    const int64_t xb = (int64_t)(m0 + r) * nblk + b;
                    const int8_t *xv = xq + xb * Q4_BLOCK;
                    int32_t dot = 0;
                    for (int c = 0; c < 4; c++)
                        for (int u = 0; u < 4; u++) {
                            const uint8_t code = t[32 * c + 4 * i + u];
                            dot += (code & 0x0F) * xv[4 * c + u] + (code >> 4) * xv[4 * (c + 4) + u];
                        }
                    tot[r][i] += (float)dot * step * xs[xb] + mn * xsum[xb];
                }
            }
        }
#endif
        for (int r = 0; r < mr; r++) store_group(y, y_bf16, m0 + r, N, g, tot[r]);
    }
}

/* As q4_rows, for 8-bit W. */
ALWAYS_INLINE void q8_rows(const uint8_t *w, int K, const CodedX *x, int m0, const int mr, int64_t g0, int64_t g1,
                           int64_t N, int y_bf16, void *y) {
    const int8_t *xq = x->q;
    const float *xs = x->s;
    const int nblk = K / Q4_BLOCK;
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *grp = w + g * (int64_t)nblk * Q8_TILE;
        float tot[MAX_ROWS][TILE_ROWS];
#ifdef LONGKV_AVX2
        __m256 acc[MAX_ROWS];
        for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
#ifdef LONGKV_VNNI512
        const __m512i bias = _mm512_set1_epi8((char)0x80);
        const __m512i sel[4] = {pair_sel(0), pair_sel(2), pair_sel(4), pair_sel(6)};
#else
        const __m256i ones = _mm256_set1_epi16(1);
#endif
        for (int b = 0; b < nblk; b++) {
            const uint8_t *t = grp + (int64_t)b * Q8_TILE;
            for (int l = 0; l < Q8_TILE; l += 64) _mm_prefetch((const char *)(t + PREFETCH_TILES * Q8_TILE + l), _MM_HINT_T0);
            const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 256)));
#ifdef LONGKV_VNNI512
            /* vpdpbusd multiplies unsigned by signed bytes: the codes + 128 (unsigned) by x, less 128 times the
             * block's sum of x; exact in 32 bits */
            __m512i u[4];
            for (int j = 0; j < 4; j++) u[j] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(t + 64 * j)), bias);
#endif
            for (int r = 0; r < mr; r++) {
                const int64_t xb = (int64_t)(m0 + r) * nblk + b;
#ifdef LONGKV_VNNI512
                const __m512i xw = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(xq + xb * Q4_BLOCK)));
                __m512i s16 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[0], pair_words(xw, sel[0]));
                for (int j = 1; j < 4; j++) s16 = _mm512_dpbusd_epi32(s16, u[j], pair_words(xw, sel[j]));
                const __m256i s = _mm256_sub_epi32(fold16(s16), _mm256_set1_epi32(128 * x->isum[xb]));
#else
                const int8_t *xv = xq + xb * Q4_BLOCK, *av = x->a + xb * Q4_BLOCK;
                __m256i s = _mm256_setzero_si256();
                for (int j = 0; j < 8; j++) {
                    const __m256i codes = _mm256_loadu_si256((const __m256i *)(t + 32 * j));
                    const __m256i p = _mm256_maddubs_epi16(bcast4(av + 4 * j), _mm256_sign_epi8(codes, bcast4(xv + 4 * j)));
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                }
#endif
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scale, _mm256_set1_ps(xs[xb])), acc[r]);
            }
        }
        for (int r = 0; r < mr; r++) _mm256_storeu_ps(tot[r], acc[r]);
#else
        for (int r = 0; r < mr; r++)
            for (int i = 0; i < TILE_ROWS; i++) tot[r][i] = 0.0f;
        for (int b = 0; b < nblk; b++) {
            const uint8_t *t = grp + (int64_t)b * Q8_TILE;
            for (int i = 0; i < TILE_ROWS; i++) {
                const float scale = half_to_float(t + 256 + 2 * i);
                for (int r = 0; r < mr; r++) {
                    const int64_t xb = (int64_t)(m0 + r) * nblk + b;
                    const int8_t *xv = xq + xb * Q4_BLOCK;
                    int32_t dot = 0;
                    for (int c = 0; c < 8; c++)
                        for (int u = 0; u < 4; u++) dot += (int8_t)t[32 * c + 4 * i + u] * xv[4 * c + u];
                    tot[r][i] += (float)dot * scale * xs[xb];
                }
            }
        }
#endif
        for (int r = 0; r < mr; r++) store_group(y, y_bf16, m0 + r, N, g, tot[r]);
    }
}

/* fn(..., mr, ...) with mr a constant 1..MAX_ROWS (MAX_ROWS is 8). */
#define ROWS_CASE(fn, R) \
    case R: fn(w, K, x, m0, R, g0, g1, N, y_bf16, y); break;
#define ROWS_SWITCH(fn)                                                                                              \
    switch (mr) {                                                                                                    \
        ROWS_CASE(fn, 1) ROWS_CASE(fn, 2) ROWS_CASE(fn, 3) ROWS_CASE(fn, 4) ROWS_CASE(fn, 5) ROWS_CASE(fn, 6)       \
        ROWS_CASE(fn, 7) ROWS_CASE(fn, 8)                                                                            \
        default: break;                                                                                              \
    }

static void q4_pass(const uint8_t *w, int K, const CodedX *x, int m0, int mr, int64_t g0, int64_t g1, int64_t N,
                    int y_bf16, void *y) {
    ROWS_SWITCH(q4_rows)
}

static void q8_pass(const uint8_t *w, int K, const CodedX *x, int m0, int mr, int64_t g0, int64_t g1, int64_t N,
                    int y_bf16, void *y) {
    ROWS_SWITCH(q8_rows)
}

/* y (M, N) = x (M, K) W^T for W (N, K) in 4-bit (bits = 4) or 8-bit (bits = 8) tiles (see above); x and y
 * bfloat16 when x_bf16 / y_bf16, else float32. K a multiple of 32, checked by the callers.
 * Returns 0, -2 out of memory. */
static int tiled_linear(int bits, const uint8_t *w, int64_t N, int K, const void *x, int x_bf16, int M, void *y,
                        int y_bf16) {
    const int nblk = K / Q4_BLOCK;
    int8_t *xq = malloc(2 * (size_t)M * K);
    float *xs = malloc(sizeof(float) * 2 * (size_t)M * nblk), *row = malloc(sizeof(float) * (size_t)K);
    int32_t *xisum = malloc(sizeof(int32_t) * (size_t)M * nblk);
    if (!xq || !xs || !row || !xisum) {
        free(xq);
        free(xs);
        free(row);
        free(xisum);
        return -2;
    }
    int8_t *xa = xq + (size_t)M * K; /* |xq|, for the 8-bit tiles */
    float *xsum = xs + (size_t)M * nblk;
    for (int m = 0; m < M; m++) { /* code x: 8 bits per block of 32, scale max |x| / 127 */
        load_row(x, (int64_t)m * K, x_bf16, K, row);
        for (int b = 0; b < nblk; b++) {
            const float *v = row + b * Q4_BLOCK;
            const int64_t at = ((int64_t)m * nblk + b) * Q4_BLOCK;
            int32_t isum = 0;
#ifdef LONGKV_AVX2
            /* the same arithmetic 8 lanes at a time: cvtps rounds to nearest even, as lrintf does */
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 vx[4], mx = _mm256_setzero_ps();
            for (int j = 0; j < 4; j++) {
                vx[j] = _mm256_loadu_ps(v + 8 * j);
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, vx[j]));
            }
            const float amax = hmax8(mx);
            const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            const __m256 iv = _mm256_set1_ps(inv);
            __m256i qi[4], tot = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                qi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(vx[j], iv));
                tot = _mm256_add_epi32(tot, qi[j]);
            }
            /* 32 int32 to 32 int8 in order: the packs work within 128-bit lanes, the permute restores the order */
            const __m256i q16 = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
            const __m256i q8 = _mm256_permutevar8x32_epi32(q16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(xq + at), q8);
            _mm256_storeu_si256((__m256i *)(xa + at), _mm256_abs_epi8(q8));
            const __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(tot), _mm256_extracti128_si256(tot, 1));
            const __m128i t2 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
            isum = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32(t2, 0xB1)));
#else
            float amax = 0.0f;
            for (int j = 0; j < Q4_BLOCK; j++) amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
            const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int j = 0; j < Q4_BLOCK; j++) {
                const int8_t q = (int8_t)lrintf(v[j] * inv);
                xq[at + j] = q;
                xa[at + j] = (int8_t)(q < 0 ? -q : q);
                isum += q;
            }
#endif
            xs[(int64_t)m * nblk + b] = scale;
            xsum[(int64_t)m * nblk + b] = scale * (float)isum; /* the coded x's sum, for the 4-bit minimums */
            xisum[(int64_t)m * nblk + b] = isum;
        }
    }
    free(row);
    const CodedX xc = {xq, xa, xs, xsum, xisum};
    const int64_t G = (N + TILE_ROWS - 1) / TILE_ROWS;
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int64_t t = 0; t < 64; t++) { /* 64 slices of W's tile groups, static: each thread streams its own */
        const int64_t g0 = G * t / 64, g1 = G * (t + 1) / 64;
        for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {
            const int mr = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
            if (bits == 4)
                q4_pass(w, K, &xc, m0, mr, g0, g1, N, y_bf16, y);
            else
                q8_pass(w, K, &xc, m0, mr, g0, g1, N, y_bf16, y);
        }
    }
    free(xq);
    free(xs);
    free(xisum);
    return 0;
}

/* y (M, N) = x (M, K) W^T (tiled_linear); x and y bfloat16 when flags bit 0 / bit 1 is set, else float32.
 * Returns 0, -1 for a bad K, N, M or bits, -2 out of memory. */
int longkv_block_linear(int bits, const uint8_t *w, int64_t N, int K, const void *x, int M, void *y, int flags) {
    if (K <= 0 || K % Q4_BLOCK != 0 || M <= 0 || N <= 0 || (bits != 4 && bits != 8)) return -1;
    return tiled_linear(bits, w, N, K, x, flags & 1, M, y, (flags >> 1) & 1);
}

/* SwiGLU of M rows: y (M, C) = down(silu(gate(x)) * up(x)) for x (M, C), with gate_up (2 I, C) (gate rows
 * first) and down (C, I) in tiles of bits_gu / bits_dn bits; the gate, up and product rows stay float32.
 * Returns 0, -2 out of memory. */
static int gated_mlp_impl(int bits_gu, const uint8_t *w_gu, int bits_dn, const uint8_t *w_dn, int I, int C,
                          const void *x, int x_bf16, int M, void *y, int y_bf16) {
    float *gu = malloc(sizeof(float) * (size_t)M * 2 * I), *h = malloc(sizeof(float) * (size_t)M * I);
    int rc = (gu && h) ? tiled_linear(bits_gu, w_gu, 2 * (int64_t)I, C, x, x_bf16, M, gu, 0) : -2;
    if (rc == 0) {
        for (int m = 0; m < M; m++) {
            const float *g = gu + (int64_t)m * 2 * I, *u = g + I;
            float *o = h + (int64_t)m * I;
            int j = 0;
#ifdef LONGKV_AVX2
            const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
            for (; j + 8 <= I; j += 8) { /* sigmoid(g) from e = exp(-|g|): 1 / (1 + e), or e / (1 + e) for g < 0 */
                const __m256 gv = _mm256_loadu_ps(g + j);
                const __m256 e = exp_neg8(_mm256_or_ps(gv, sign));
                const __m256 sig = _mm256_div_ps(_mm256_blendv_ps(one, e, gv), _mm256_add_ps(one, e));
                _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + j)));
            }
#endif
            for (; j < I; j++) {
                const float e = exp_neg(-fabsf(g[j]));
                o[j] = g[j] * ((g[j] < 0.0f ? e : 1.0f) / (1.0f + e)) * u[j];
            }
        }
        rc = tiled_linear(bits_dn, w_dn, C, I, h, 0, M, y, y_bf16);
    }
    free(gu);
    free(h);
    return rc;
}

static int bad_bits(int bits) { return bits != 4 && bits != 8; }

/* The first half of a decoder layer for T decode rows, in one call: x += delta (skipped when NULL; x and
 * delta (T, C) in the activations' dtype), h = RMSNorm(x) * norm_w (float32), qkv = h Wqkv^T + bias
 * (Wqkv in tiles of `bits` bits, nqkv = (H + 2 Hkv) D rows; bias (nqkv,) or NULL), then the query and key
 * heads rotated (longkv_rope's arithmetic, R channels, cos/sin (T, R/2) float32) into qk (H + Hkv, T, D)
 * and the value heads into v (Hkv, T, D). The activations, qk and v are bfloat16 when bf16, else
 * float32; norm_w and bias when w_bf16. Returns 0, -1 for bad sizes or bits, -2 out of memory. */
int longkv_attn_in(void *x, const void *delta, const void *norm_w, int w_bf16, float eps, int T, int C, int bits,
                   const uint8_t *w, const void *bias, int H, int Hkv, int D, const float *cos, const float *sin, int R,
                   void *qk, void *v, int bf16) {
    const int64_t nqkv = (int64_t)(H + 2 * Hkv) * D;
    if (C <= 0 || C % Q4_BLOCK != 0 || T <= 0 || bad_bits(bits) || D > MAX_D || R > D) return -1;
    float *h = malloc(sizeof(float) * (size_t)T * C), *rows = malloc(sizeof(float) * (size_t)T * nqkv);
    float *b = bias ? malloc(sizeof(float) * (size_t)nqkv) : NULL;
    int rc = (h && rows && (b || !bias)) ? 0 : -2;
    if (rc == 0) {
        add_rms_norm_impl(x, bf16, delta, bf16, norm_w, w_bf16, h, 0, T, C, eps);
        rc = tiled_linear(bits, w, nqkv, C, h, 0, T, rows, 0);
    }
    if (rc == 0) {
        if (b) {
            load_row(bias, 0, w_bf16, (int)nqkv, b);
            for (int t = 0; t < T; t++)
                for (int64_t j = 0; j < nqkv; j++) rows[t * nqkv + j] += b[j];
        }
        rope_impl(rows, 0, nqkv, qk, bf16, T, H + Hkv, D, cos, sin, R);
        for (int g = 0; g < Hkv; g++)
            for (int t = 0; t < T; t++)
                store_row(v, ((int64_t)g * T + t) * D, bf16, D, rows + t * nqkv + (int64_t)(H + Hkv + g) * D, 1.0f);
    }
    free(h);
    free(rows);
    free(b);
    return rc;
}

/* The second half of a decoder layer for T decode rows, in one call: x += o Wo^T (o (T, Ho) in the
 * activations' dtype, Wo (C, Ho) in tiles of bits_o bits), h = RMSNorm(x) * norm_w, then out (T, C) =
 * SwiGLU(h) (gated_mlp_impl). The activations are bfloat16 when bf16, else float32; norm_w when w_bf16.
 * Returns 0, -1 for bad sizes or bits, -2 out of memory. */
int longkv_attn_out_mlp(void *x, const void *o, int Ho, int bits_o, const uint8_t *w_o, const void *norm_w, int w_bf16,
                        float eps, int bits_gu, const uint8_t *w_gu, int bits_dn, const uint8_t *w_dn, int I, int T,
                        int C, void *out, int bf16) {
    if (C <= 0 || I <= 0 || Ho <= 0 || C % Q4_BLOCK != 0 || I % Q4_BLOCK != 0 || Ho % Q4_BLOCK != 0 || T <= 0 ||
        bad_bits(bits_o) || bad_bits(bits_gu) || bad_bits(bits_dn))
        return -1;
    float *d = malloc(sizeof(float) * (size_t)T * C), *h = malloc(sizeof(float) * (size_t)T * C);
    int rc = (d && h) ? tiled_linear(bits_o, w_o, C, Ho, o, bf16, T, d, 0) : -2;
    if (rc == 0) {
        add_rms_norm_impl(x, bf16, d, 0, norm_w, w_bf16, h, 0, T, C, eps);
        rc = gated_mlp_impl(bits_gu, w_gu, bits_dn, w_dn, I, C, h, 0, T, out, bf16);
    }
    free(d);
    free(h);
    return rc;
}

int longkv_kv_write_coded(uint8_t *kc, uint8_t *vc, uint16_t *k_step, uint16_t *k_min, uint16_t *v_step, uint16_t *v_min,
                          int64_t chs, int64_t shs, int64_t slot, int64_t *pos_d, const void *k, int64_t ks, int64_t kt,
                          const void *v, int64_t vs, int64_t vt, const int64_t *pos, int Hkv, int T, int D, int group, int bits,
                          int bf16);

/* int64 words per layer in longkv_decode_layers' lw, and per (layer, sequence) in its kv. */
#define LW 13
#define KVW 12

/* A decode step of B sequences through L decoder layers in one call, each layer as the calls one by one
 * would run it: longkv_attn_in (x += the last layer's output, RMSNorm, q/k/v, RoPE), each sequence's new key
 * and value written into its slot of the layer's planes, longkv_decode_attention over the parts of every
 * sequence's cache (those include the slot just written), then longkv_attn_out_mlp.
 *
 * x: (B, C) the embeddings in, the residual stream out (before the last layer's output is added); out: (B, C)
 * the last layer's MLP output. Activations and planes are bfloat16 when bf16, else float32. H, Hkv, D, I, Ho:
 * the layers' heads, KV heads, head_dim, MLP inner size and attention output width (every layer alike).
 * lw: LW int64 per layer: attention norm weight, whether it is bfloat16, q/k/v bits, q/k/v tiles, q/k/v bias
 * (0: none), output projection bits and tiles, MLP norm weight, whether it is bfloat16, gate/up bits and
 * tiles, down bits and tiles (pointers as integers).
 * kv: KVW int64 per (layer, sequence), layer-major: the pages' bits (0: keys and values as computed, 8: int8
 * codes), key plane, value plane, positions plane (int64), the planes' head stride (elements; for codes,
 * bytes), the slot the new token goes to; for codes also the key step, key minimum, value step and value
 * minimum planes (float16), their head stride and the codes per group (longkv_kv_write_coded); else zeros.
 * pos: (B,) the tokens' positions.
 * cos, sin: (B, R/2) float32, one RoPE for every layer. meta, nseg: every layer's segments in turn, as
 * longkv_decode_attention takes them (nseg: L x B); scale: the softmax scale; inv_freq: the RoPE's R/2 float64
 * frequencies, for segments whose keys are seen at other positions (NULL when none is); q_out: (L, B, H, D) in
 * the activations' dtype, every layer's rotated queries (what a policy that scores with queries keeps), or NULL.
 * Returns 0, or the first failing kernel's code (-1 sizes, -2 out of memory). */
int longkv_decode_layers(int L, const int64_t *lw, float eps, int C, int H, int Hkv, int D, int I, int Ho, void *x, void *out,
                         int B, int bf16, const int64_t *kv, const int64_t *pos, const float *cos, const float *sin, int R,
                         const int64_t *meta, const int32_t *nseg, float scale, const double *inv_freq, void *q_out) {
    const size_t es = bf16 ? 2 : 4, row = (size_t)D * es;
    if (L <= 0 || B <= 0 || Ho != H * D) return -1;
    char *qk = malloc(row * (size_t)B * (2 * (size_t)H + 2 * (size_t)Hkv)); /* q and k heads, v heads, attention out */
    char *o = malloc(row * (size_t)B * (size_t)H);
    if (!qk || !o) {
        free(qk);
        free(o);
        return -2;
    }
    char *v = qk + row * (size_t)B * (H + Hkv), *att = v + row * (size_t)B * Hkv;
    int rc = 0;
    for (int l = 0; l < L && rc == 0; l++) {
        const int64_t *w = lw + (int64_t)LW * l;
        rc = longkv_attn_in(x, l ? out : NULL, (const void *)(intptr_t)w[0], (int)w[1], eps, B, C, (int)w[2],
                            (const uint8_t *)(intptr_t)w[3], (const void *)(intptr_t)w[4], H, Hkv, D, cos, sin, R, qk, v, bf16);
        if (rc != 0) break;
        if (q_out) /* query head h of sequence b is row h B + b of qk */
            for (int b = 0; b < B; b++)
                for (int h = 0; h < H; h++)
                    memcpy((char *)q_out + row * (((size_t)l * B + b) * H + h), qk + row * ((size_t)h * B + b), row);
        for (int b = 0; b < B && rc == 0; b++) { /* the new token's key and value into its slot */
            const int64_t *s = kv + KVW * ((int64_t)l * B + b), hs = s[4], slot = s[5];
            const char *kr = qk + row * ((size_t)H * B + b), *vr = v + row * (size_t)b; /* head g: + g B rows */
            if (s[0]) { /* coded on the way in */
                rc = longkv_kv_write_coded((uint8_t *)(intptr_t)s[1], (uint8_t *)(intptr_t)s[2], (uint16_t *)(intptr_t)s[6],
                                           (uint16_t *)(intptr_t)s[7], (uint16_t *)(intptr_t)s[8], (uint16_t *)(intptr_t)s[9], hs,
                                           s[10], slot, (int64_t *)(intptr_t)s[3], kr, (int64_t)B * D, D, vr, (int64_t)B * D, D,
                                           pos + b, Hkv, 1, D, (int)s[11], (int)s[0], bf16);
                continue;
            }
            for (int g = 0; g < Hkv; g++) {
                memcpy((char *)(intptr_t)s[1] + (size_t)(g * hs + slot * D) * es, kr + row * (size_t)g * B, row);
                memcpy((char *)(intptr_t)s[2] + (size_t)(g * hs + slot * D) * es, vr + row * (size_t)g * B, row);
            }
            ((int64_t *)(intptr_t)s[3])[slot] = pos[b];
        }
        if (rc != 0) break;
        rc = longkv_decode_attention(meta, nseg + (int64_t)l * B, B, qk, att, H, Hkv, D, scale, bf16 << 1, inv_freq, R / 2);
        if (rc != 0) break;
        for (int b = 0; b < B; b++) {
            meta += META * nseg[(int64_t)l * B + b];
            for (int h = 0; h < H; h++) memcpy(o + row * ((size_t)b * H + h), att + row * ((size_t)h * B + b), row); /* (H, B, D) -> (B, H D) */
        }
        rc = longkv_attn_out_mlp(x, o, Ho, (int)w[5], (const uint8_t *)(intptr_t)w[6], (const void *)(intptr_t)w[7], (int)w[8],
                                 eps, (int)w[9], (const uint8_t *)(intptr_t)w[10], (int)w[11], (const uint8_t *)(intptr_t)w[12], I,
                                 B, C, out, bf16);
    }
    free(qk);
    free(o);
    return rc;
}

/* Write T tokens into a layer's page planes in place: kd[g, slot + t] = k[g, t] and vd[g, slot + t] = v[g, t]
 * (D elements of es bytes each) for every KV head g < Hkv, and pos_d[slot + t] = pos[t]. The planes' head
 * stride is hs elements; k and v have head strides ks / vs and token strides kt / vt elements, rows
 * contiguous. */
void longkv_kv_write(void *kd, void *vd, int64_t hs, int64_t slot, int64_t *pos_d, const void *k, int64_t ks, int64_t kt,
                     const void *v, int64_t vs, int64_t vt, const int64_t *pos, int Hkv, int T, int D, int es) {
    for (int g = 0; g < Hkv; g++)
        for (int t = 0; t < T; t++) {
            const int64_t at = ((int64_t)g * hs + (slot + t) * D) * es;
            memcpy((char *)kd + at, (const char *)k + ((int64_t)g * ks + (int64_t)t * kt) * es, (size_t)D * es);
            memcpy((char *)vd + at, (const char *)v + ((int64_t)g * vs + (int64_t)t * vt) * es, (size_t)D * es);
        }
    memcpy(pos_d + slot, pos, sizeof(int64_t) * (size_t)T);
}

/* One row of D values (bfloat16 when bf16, else float32) coded in groups of `group`: per group, the minimum
 * and the step (max - min) / (2^bits - 1) (at least 1e-4) as float16, and a code per value,
 * round((x - min) / step) clamped to [0, 2^bits - 1], computed from the float16-rounded minimum and step,
 * as longkv.kv.quant.quantize does; int4 codes two per byte, the even value in the low nibble. */
static void code_row(const void *x, int bf16, int D, int group, int bits, uint8_t *codes, uint16_t *step, uint16_t *lo) {
    float row[MAX_D];
    load_row(x, 0, bf16, D, row);
    const float top = (float)((1 << bits) - 1);
    for (int g = 0; g < D / group; g++) {
        const float *xg = row + g * group;
        float mn = xg[0], mx = xg[0];
        for (int j = 1; j < group; j++) {
            mn = xg[j] < mn ? xg[j] : mn;
            mx = xg[j] > mx ? xg[j] : mx;
        }
        const uint16_t lo16 = float_to_half(mn);
        const float lof = half_to_float((const uint8_t *)&lo16);
        float st = (mx - lof) / top;
        st = st < 1e-4f ? 1e-4f : st;
        const uint16_t st16 = float_to_half(st);
        const float stf = half_to_float((const uint8_t *)&st16);
        lo[g] = lo16;
        step[g] = st16;
        for (int j = 0; j < group; j++) {
            float c = nearbyintf((xg[j] - lof) / stf);
            c = c < 0.0f ? 0.0f : (c > top ? top : c);
            const int at = g * group + j;
            if (bits == 8)
                codes[at] = (uint8_t)c;
            else if (at % 2 == 0)
                codes[at / 2] = (uint8_t)c;
            else
                codes[at / 2] |= (uint8_t)((int)c << 4);
        }
    }
}

/* longkv_kv_write for coded pages: T tokens of K and V (bfloat16 when bf16, else float32; head strides
 * ks / vs and token strides kt / vt elements, rows contiguous) coded as int`bits` in groups of `group`
 * into the planes at slot: kc / vc (code planes, head stride chs bytes, D * bits / 8 bytes a token),
 * k_step, k_min, v_step, v_min (float16 planes, head stride shs elements, D / group a token); pos_d[slot + t]
 * = pos[t]. Returns 0, or -1 for bits other than 4 and 8, a group that does not divide D (or is odd), or
 * D beyond MAX_D. */
int longkv_kv_write_coded(uint8_t *kc, uint8_t *vc, uint16_t *k_step, uint16_t *k_min, uint16_t *v_step, uint16_t *v_min,
                          int64_t chs, int64_t shs, int64_t slot, int64_t *pos_d, const void *k, int64_t ks, int64_t kt,
                          const void *v, int64_t vs, int64_t vt, const int64_t *pos, int Hkv, int T, int D, int group, int bits,
                          int bf16) {
    if ((bits != 4 && bits != 8) || group <= 0 || group % 2 || D % group || D > MAX_D) return -1;
    const int es = bf16 ? 2 : 4, cb = D * bits / 8, sides = D / group;
    for (int g = 0; g < Hkv; g++)
        for (int t = 0; t < T; t++) {
            const int64_t c_at = g * chs + (slot + t) * cb, s_at = g * shs + (slot + t) * sides;
            code_row((const char *)k + ((int64_t)g * ks + (int64_t)t * kt) * es, bf16, D, group, bits, kc + c_at, k_step + s_at,
                     k_min + s_at);
            code_row((const char *)v + ((int64_t)g * vs + (int64_t)t * vt) * es, bf16, D, group, bits, vc + c_at, v_step + s_at,
                     v_min + s_at);
        }
    memcpy(pos_d + slot, pos, sizeof(int64_t) * (size_t)T);
    return 0;
}
