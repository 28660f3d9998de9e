/* optim.c - AdamW, gradient-norm clipping, LR schedule (see optim.h). */
#include "train/optim.h"

#include <math.h>
#include <string.h>

/* Below this many elements a parallel region costs more than it saves. */
#define PAR_MIN 32768

int tp_adamw_cfg_validate(const tp_adamw_cfg *c, tp_err *err) {
    if (!(c->beta1 >= 0.0 && c->beta1 < 1.0))
        return tp_fail(err, TP_EINVAL, "adamw: beta1 must be in [0, 1), got %g", c->beta1);
    if (!(c->beta2 >= 0.0 && c->beta2 < 1.0))
        return tp_fail(err, TP_EINVAL, "adamw: beta2 must be in [0, 1), got %g", c->beta2);
    if (!(c->eps >= 0.0 && isfinite(c->eps)))
        return tp_fail(err, TP_EINVAL, "adamw: eps must be finite and >= 0, got %g", c->eps);
    return TP_OK;
}

/* The scalars of one update, as torch forms them: in Python double, then
 * cast to float by each CPU kernel that takes a scalar operand (mul_, add_'s
 * alpha, addcmul_'s value, div_, add_, addcdiv_'s value). */
typedef struct adamw_scalars {
    float decay, b1, omb1, b2, omb2, eps, neg_step_size, bc2_sqrt;
} adamw_scalars;

/* The update of param[lo..hi), in torch's operation order. Inlined into a
 * generic and an FMA-enabled kernel: fmaf is exact in both, so they give the
 * same bits; the second only avoids libm's slow software fmaf. */
static inline __attribute__((always_inline)) void adamw_range(const adamw_scalars *k, float *param,
                                                             const float *grad, float *m, float *v,
                                                             size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; i++) {
        const float g = grad[i];
        /* param.mul_(1 - lr*wd) */
        const float p = param[i] * k->decay;
        /* exp_avg.mul_(b1).add_(g, alpha=1-b1): add_ is vec::fmadd */
        const float mi = fmaf(g, k->omb1, m[i] * k->b1);
        /* exp_avg_sq.mul_(b2).addcmul_(g, g, value=1-b2): torch's build
         * contracts self + (value*t1)*t2 into fma(value*t1, t2, self) */
        const float vi = fmaf(k->omb2 * g, g, v[i] * k->b2);
        /* denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps) */
        const float denom = sqrtf(vi) / k->bc2_sqrt + k->eps;
        /* param.addcdiv_(exp_avg, denom, value=-step_size) */
        param[i] = p + (k->neg_step_size * mi) / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

static void adamw_generic(const adamw_scalars *k, float *param, const float *grad, float *m, float *v,
                          size_t lo, size_t hi) {
    adamw_range(k, param, grad, m, v, lo, hi);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_FMA_KERNEL 1
__attribute__((target("fma"))) static void adamw_fma(const adamw_scalars *k, float *param, const float *grad,
                                                     float *m, float *v, size_t lo, size_t hi) {
    adamw_range(k, param, grad, m, v, lo, hi);
}
#endif

/* Elements per parallel work item of tp_adamw_update. */
#define ADAMW_CHUNK 8192

void tp_adamw_update(const tp_adamw_cfg *c, int64_t step, double lr, double weight_decay, float *param,
                     const float *grad, float *m, float *v, size_t n) {
    const double bc1 = 1.0 - pow(c->beta1, (double)step);
    const double bc2 = 1.0 - pow(c->beta2, (double)step);
    const adamw_scalars k = {
        .decay = (float)(1.0 - lr * weight_decay),
        .b1 = (float)c->beta1,
        .omb1 = (float)(1.0 - c->beta1),
        .b2 = (float)c->beta2,
        .omb2 = (float)(1.0 - c->beta2),
        .eps = (float)c->eps,
        .neg_step_size = (float)(-(lr / bc1)),
        .bc2_sqrt = (float)sqrt(bc2),
    };
    void (*kernel)(const adamw_scalars *, float *, const float *, float *, float *, size_t, size_t) = adamw_generic;
#ifdef HAVE_FMA_KERNEL
    if (__builtin_cpu_supports("fma")) kernel = adamw_fma;
#endif
    const size_t nchunks = (n + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t j = 0; j < nchunks; j++) {
        const size_t lo = j * ADAMW_CHUNK, hi = lo + ADAMW_CHUNK < n ? lo + ADAMW_CHUNK : n;
        kernel(&k, param, grad, m, v, lo, hi);
    }
}

/* Blocks handled per parallel region; their sums wait in a stack array and
 * are added in order afterwards, so no allocation is needed. */
#define SUMSQ_GROUP 256

double tp_sum_squares(const float *x, size_t n) {
    const size_t nb = (n + TP_SUMSQ_BLOCK - 1) / TP_SUMSQ_BLOCK;
    double total = 0.0;
    for (size_t b0 = 0; b0 < nb; b0 += SUMSQ_GROUP) {
        const size_t gb = nb - b0 < SUMSQ_GROUP ? nb - b0 : SUMSQ_GROUP;
        double part[SUMSQ_GROUP];
#pragma omp parallel for schedule(static) if (gb > 1)
        for (size_t j = 0; j < gb; j++) {
            const size_t lo = (b0 + j) * TP_SUMSQ_BLOCK;
            const size_t hi = lo + TP_SUMSQ_BLOCK < n ? lo + TP_SUMSQ_BLOCK : n;
            double s = 0.0;
            for (size_t i = lo; i < hi; i++) s += (double)x[i] * (double)x[i];
            part[j] = s;
        }
        for (size_t j = 0; j < gb; j++) total += part[j];
    }
    return total;
}

float tp_clip_coef(double total_norm, double max_norm) {
    if (!(max_norm > 0.0)) return 1.0f;
    double coef = max_norm / (total_norm + 1e-6);
    if (coef > 1.0) coef = 1.0; /* NaN stays NaN, as torch.clamp */
    return (float)coef;
}

void tp_scale(float *x, size_t n, float s) {
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

static const char *const kind_names[] = {"cosine", "linear", "constant"};

const char *tp_lr_kind_name(int kind) {
    return kind >= 0 && kind < 3 ? kind_names[kind] : "?";
}

int tp_lr_schedule_parse_kind(const char *s, int *kind) {
    if (!s) return TP_EINVAL;
    for (int k = 0; k < 3; k++)
        if (!strcmp(s, kind_names[k])) {
            *kind = k;
            return TP_OK;
        }
    return TP_EINVAL;
}

int tp_lr_schedule_validate(const tp_lr_schedule *s, tp_err *err) {
    if (!(isfinite(s->peak_lr) && s->peak_lr >= 0.0))
        return tp_fail(err, TP_EINVAL, "lr schedule: peak_lr must be finite and >= 0, got %g", s->peak_lr);
    if (!(isfinite(s->min_lr) && s->min_lr >= 0.0))
        return tp_fail(err, TP_EINVAL, "lr schedule: min_lr must be finite and >= 0, got %g", s->min_lr);
    if (s->min_lr > s->peak_lr)
        return tp_fail(err, TP_EINVAL, "lr schedule: min_lr (%g) > peak_lr (%g)", s->min_lr, s->peak_lr);
    if (s->warmup_steps < 0)
        return tp_fail(err, TP_EINVAL, "lr schedule: warmup_steps must be >= 0, got %lld",
                       (long long)s->warmup_steps);
    if (s->total_steps < 1)
        return tp_fail(err, TP_EINVAL, "lr schedule: total_steps must be >= 1, got %lld",
                       (long long)s->total_steps);
    if (s->warmup_steps > s->total_steps)
        return tp_fail(err, TP_EINVAL, "lr schedule: warmup_steps (%lld) > total_steps (%lld)",
                       (long long)s->warmup_steps, (long long)s->total_steps);
    if (s->kind < 0 || s->kind > 2)
        return tp_fail(err, TP_EINVAL, "lr schedule: unknown kind %d (expected cosine, linear or constant)",
                       s->kind);
    return TP_OK;
}

static double max1(int64_t x) {
    return x > 1 ? (double)x : 1.0;
}

double tp_lr_at(const tp_lr_schedule *s, int64_t step) {
    const int64_t w = s->warmup_steps, T = s->total_steps;
    /* transformers: float(current_step) / float(max(1, num_warmup_steps)) */
    if (step < w) return s->peak_lr * ((double)step / max1(w));
    double f;
    switch (s->kind) {
    case TP_LR_COSINE: {
        /* progress = float(step - w) / float(max(1, T - w));
         * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))),
         * where pi * 0.5 * 2.0 is exactly pi */
        const double progress = (double)(step - w) / max1(T - w);
        f = 0.5 * (1.0 + cos(M_PI * progress));
        if (!(f > 0.0)) f = 0.0;
        break;
    }
    case TP_LR_LINEAR:
        f = (double)(T - step) / max1(T - w);
        if (!(f > 0.0)) f = 0.0;
        break;
    default: f = 1.0; break;
    }
    /* min_lr = 0: 0 + peak*f == peak*f, transformers' base_lr * lambda */
    return s->min_lr + (s->peak_lr - s->min_lr) * f;
}
