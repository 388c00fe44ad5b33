// The loss library of src/loss/ on the device: each group's loss (losses.md) with its
// gradient with respect to every response's S, A and E, and the metrics the CLI logs, from
// per-response statistics that are already on the device. Two launches:
//
//   loss_groups_f64  one thread per group: the group's loss, dL/dS, dL/dA, dL/dE (overwritten,
//                    already scaled by 1/groups for the batch mean, as `batch_loss` returns
//                    them) and the group's metric values;
//   loss_finish_f64  one block: the batch loss and every metric, each a sum by one thread over
//                    the groups (or responses) in order.
//
// Everything is f64, formula for formula and in the order of the CPU library
// (src/loss/mod.rs, numeric.rs, metrics.rs): the stable log-sigmoid and log-sum-exp, the
// softmax-minus-labels gradient written without cancellation, the sums left to right. The
// work is a few dozen operations per response, so f64 costs nothing measurable even where
// FP64 throughput is low, and fp32 would lose the margins: S of -500 holds only 3e-5 in fp32,
// more than a typical S - S_ref. No atomics: the results are the same bit for bit from run to
// run.
#include "contralign.cuh"

// Matches `LossParams` in src/ops/cuda/loss.rs field for field.
struct LossParams {
    int kind;        // LossKind in its declaration order (below)
    int p;           // REFA deviation exponent, 1 or 2
    int one_vs_all;  // REFA-1-vs-all
    int normalize;   // REFA scores with A (1) or S (0)
    double beta;
    double alpha;
    double gamma;
    double ln_gamma;  // ln(gamma), computed by the host as the CPU computes it
    double lambda;
    double label_smoothing;
    double sft_weight;
};

enum LossKind {
    INFONCA = 0,
    NCA = 1,
    DPO = 2,
    NCA_PAIR = 3,
    SIMPO = 4,
    REFA = 5,
    INFONCA_FREE = 6,
    SFT = 7,
};

// Per-group metric values, one column of `groups` each, in the order loss_finish_f64 reads.
enum GroupMetric {
    CHOSEN = 0,
    REJECTED = 1,
    MARGIN = 2,
    CORRECT = 3,
    LOGP_CHOSEN = 4,
    LOGP_REJECTED = 5,
    GROUP_METRICS = 6,
};

namespace {

// Rust's f64::total_cmp as an integer key: -0 below +0, NaN above everything.
__device__ __forceinline__ long long total_key(double x) {
    const long long bits = __double_as_longlong(x);
    return bits ^ static_cast<long long>(static_cast<unsigned long long>(bits >> 63) >> 1);
}

__device__ __forceinline__ double log_sigmoid(double x) {
    return x >= 0.0 ? -log1p(exp(-x)) : x - log1p(exp(x));
}

__device__ __forceinline__ double sigmoid(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    const double e = exp(x);
    return e / (1.0 + e);
}

// The first index of the maximum (the minimum with `lowest`) of r[0..k).
__device__ __forceinline__ int extreme(const double* r, int k, bool lowest) {
    int b = 0;
    for (int i = 1; i < k; ++i) {
        if (lowest ? r[i] < r[b] : r[i] > r[b]) b = i;
    }
    return b;
}

struct MaxLse {
    double max;
    double shifted;  // log Σ exp(x_i - max)
};

// numeric::max_and_log_sum_exp over the x(i) with keep(i), i < k: the maximum is the last
// one under total_cmp (Iterator::max_by), the others' exponentials are summed in order and
// the sum goes through log1p.
template <class X, class Keep>
__device__ MaxLse max_and_log_sum_exp(int k, X x, Keep keep) {
    int arg = -1;
    double max = 0.0;
    for (int i = 0; i < k; ++i) {
        if (!keep(i)) continue;
        const double v = x(i);
        if (arg < 0 || total_key(v) >= total_key(max)) {
            arg = i;
            max = v;
        }
    }
    if (arg < 0) return {-INFINITY, 0.0};
    if (max == -INFINITY) return {max, 0.0};
    double rest = 0.0;
    for (int i = 0; i < k; ++i) {
        if (i != arg && keep(i)) rest += exp(x(i) - max);
    }
    return {max, log1p(rest)};
}

// numeric::soft_labels: softmax(r / alpha), or uniform over the maximum for alpha = 0.
__device__ void soft_labels(const double* r, int k, double alpha, double* q) {
    double max = -INFINITY;
    for (int i = 0; i < k; ++i) max = fmax(max, r[i]);
    double sum = 0.0;
    for (int i = 0; i < k; ++i) {
        q[i] = alpha == 0.0 ? (r[i] == max ? 1.0 : 0.0) : exp((r[i] - max) / alpha);
        sum += q[i];
    }
    for (int i = 0; i < k; ++i) q[i] /= sum;
}

// `-Σ q_i log softmax(x)_i`; its gradient softmax_i Σ_{j≠i} q_j - q_i Σ_{j≠i} softmax_j
// times `scale` into grad. `softmax` is scratch of k values.
template <class X>
__device__ double soft_cross_entropy(int k, X x, const double* q, double* softmax, double scale,
                                     double* grad) {
    const MaxLse m = max_and_log_sum_exp(k, x, [](int) { return true; });
    const double lse = m.max + m.shifted;
    double loss = 0.0;
    for (int i = 0; i < k; ++i) {
        if (q[i] > 0.0) loss += q[i] * ((m.max - x(i)) + m.shifted);
    }
    for (int i = 0; i < k; ++i) softmax[i] = exp(x(i) - lse);
    for (int i = 0; i < k; ++i) {
        double q_others = 0.0, softmax_others = 0.0;
        for (int j = 0; j < k; ++j) {
            if (j == i) continue;
            q_others += q[j];
            softmax_others += softmax[j];
        }
        grad[i] = scale * (softmax[i] * q_others - q[i] * softmax_others);
    }
    return loss;
}

// NCA with soft labels q: `-Σ q_i log σ(ρ_i) - (1/K) Σ log σ(-ρ_i)`.
template <class Rho>
__device__ double nca(int k, Rho rho, const double* q, double beta, double* d_s) {
    const double kf = k;
    double loss = 0.0;
    for (int i = 0; i < k; ++i) {
        const double r = rho(i);
        loss -= q[i] * log_sigmoid(r) + log_sigmoid(-r) / kf;
        d_s[i] = beta * (-q[i] * sigmoid(-r) + sigmoid(r) / kf);
    }
    return loss;
}

// `loss + R_eos`, R_eos = λ Σ exp(E_i) over the responses that end with EOS (added to the
// loss term by term, as the CPU does), and dR/dE_i.
__device__ double eos_regularizer(double loss, int k, double lambda, const double* e,
                                  const unsigned char* has_eos, double* d_e) {
    for (int i = 0; i < k; ++i) {
        if (!has_eos[i]) continue;
        const double p = exp(e[i]);
        loss += lambda * p;
        d_e[i] += lambda * p;
    }
    return loss;
}

// REFA-dynamic or -1-vs-all with the EOS regularizer. With every reward equal REFA-dynamic
// has no positive and only R_eos remains.
__device__ double refa(const LossParams& p, int k, const double* s, const double* a,
                       const double* e, const unsigned char* has_eos, const double* r,
                       double* d_s, double* d_a, double* d_e) {
    double sum = 0.0;
    for (int i = 0; i < k; ++i) sum += r[i];
    const double mean = sum / k;
    const int b = extreme(r, k, false);
    auto positive = [&](int i) { return p.one_vs_all ? i == b : r[i] > mean; };
    bool any = false;
    for (int i = 0; i < k; ++i) any |= positive(i);
    double loss = 0.0;
    if (any) {
        const double* x = p.normalize ? a : s;
        double* d_x = p.normalize ? d_a : d_s;
        auto score = [&](int i) {
            const double dev = r[i] - mean;
            return p.beta * (x[i] + p.alpha * (p.p == 1 ? dev : dev * dev));
        };
        // Negatives enter the denominator with weight gamma: their scores shift by ln(gamma).
        auto shifted = [&](int i) { return positive(i) ? score(i) : score(i) + p.ln_gamma; };
        const MaxLse pos = max_and_log_sum_exp(k, score, positive);
        const MaxLse all = max_and_log_sum_exp(k, shifted, [](int) { return true; });
        const double lse_pos = pos.max + pos.shifted;
        const double lse_all = all.max + all.shifted;
        loss = lse_all - lse_pos;
        for (int i = 0; i < k; ++i) {
            double d = exp(shifted(i) - lse_all);
            if (positive(i)) d -= exp(score(i) - lse_pos);
            d_x[i] = p.beta * d;
        }
    }
    return eos_regularizer(loss, k, p.lambda, e, has_eos, d_e);
}

// The group's loss without the sft anchor, its gradients into d_s, d_a, d_e (zeros on entry).
__device__ double base_loss(const LossParams& p, int k, const double* s, const double* a,
                            const double* e, const unsigned char* has_eos, const double* s_ref,
                            const double* r, double* q, double* softmax, double* d_s,
                            double* d_a, double* d_e) {
    auto rho = [&](int i) { return p.beta * (s[i] - s_ref[i]); };
    switch (p.kind) {
        case INFONCA:
            soft_labels(r, k, p.alpha, q);
            return soft_cross_entropy(k, rho, q, softmax, p.beta, d_s);
        case NCA:
            soft_labels(r, k, p.alpha, q);
            return nca(k, rho, q, p.beta, d_s);
        case NCA_PAIR:
            q[0] = 1.0;
            q[1] = 0.0;
            return nca(k, rho, q, p.beta, d_s);
        case DPO: {
            const double eps = p.label_smoothing;
            const double z = rho(0) - rho(1);
            const double dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
            d_s[0] = p.beta * dz;
            d_s[1] = -p.beta * dz;
            return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
        }
        case SIMPO: {
            const double z = p.beta * (a[0] - a[1]) - p.gamma;
            const double dz = -sigmoid(-z);
            d_a[0] = p.beta * dz;
            d_a[1] = -p.beta * dz;
            return -log_sigmoid(z);
        }
        case REFA:
            return refa(p, k, s, a, e, has_eos, r, d_s, d_a, d_e);
        case INFONCA_FREE: {
            soft_labels(r, k, p.alpha, q);
            auto x = [&](int i) { return p.beta * a[i]; };
            const double loss = soft_cross_entropy(k, x, q, softmax, p.beta, d_a);
            return eos_regularizer(loss, k, p.lambda, e, has_eos, d_e);
        }
        default: {  // SFT
            const int b = extreme(r, k, false);
            d_a[b] = -1.0;
            return -a[b];
        }
    }
}

}  // namespace

// Group g holds responses offsets[g] .. offsets[g + 1] (at least 2; the pairwise losses
// exactly 2). `e` is read only where has_eos; `s_ref` only by the losses that need it (it
// may be null otherwise). `scratch` holds 2 doubles per response. Writes per_group[g], the
// responses' d_s, d_a, d_e (times 1 / groups), rank_reward (each group's implicit rewards
// sorted by decreasing reward, ties in index order) and group_metrics[m * groups + g].
extern "C" __global__ void loss_groups_f64(const double* __restrict__ s,
                                           const double* __restrict__ a,
                                           const double* __restrict__ e,
                                           const unsigned char* __restrict__ has_eos,
                                           const double* __restrict__ s_ref,
                                           const double* __restrict__ rewards,
                                           const int* __restrict__ offsets, int groups,
                                           int responses, LossParams p,
                                           double* __restrict__ scratch,
                                           double* __restrict__ per_group,
                                           double* __restrict__ d_s, double* __restrict__ d_a,
                                           double* __restrict__ d_e,
                                           double* __restrict__ rank_reward,
                                           double* __restrict__ group_metrics) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups) return;
    const int first = offsets[g];
    const int k = offsets[g + 1] - first;
    const double* r = rewards + first;
    double* ds = d_s + first;
    double* da = d_a + first;
    double* de = d_e + first;
    for (int i = 0; i < k; ++i) ds[i] = da[i] = de[i] = 0.0;
    const double* sr = s_ref != nullptr ? s_ref + first : nullptr;
    double loss = base_loss(p, k, s + first, a + first, e + first, has_eos + first, sr, r,
                            scratch + first, scratch + responses + first, ds, da, de);
    // The sft anchor: weight · (-A_b) on the best response.
    if (p.sft_weight > 0.0 && p.kind != SFT) {
        const int b = extreme(r, k, false);
        loss += p.sft_weight * -a[first + b];
        da[b] += p.sft_weight * -1.0;
    }
    const double scale = 1.0 / groups;
    per_group[g] = loss;
    for (int i = 0; i < k; ++i) {
        ds[i] *= scale;
        da[i] *= scale;
        de[i] *= scale;
    }

    // Metrics (metrics.rs): implicit rewards β(S - S_ref) for the losses with a reference,
    // βA otherwise; chosen is the best-rated response, rejected the worst.
    const bool reference = sr != nullptr && (p.kind == INFONCA || p.kind == NCA ||
                                             p.kind == DPO || p.kind == NCA_PAIR);
    auto implicit = [&](int i) {
        return reference ? p.beta * (s[first + i] - sr[i]) : p.beta * a[first + i];
    };
    const int c = extreme(r, k, false);
    const int w = extreme(r, k, true);
    const double chosen = implicit(c);
    const double rejected = implicit(w);
    group_metrics[CHOSEN * groups + g] = chosen;
    group_metrics[REJECTED * groups + g] = rejected;
    group_metrics[MARGIN * groups + g] = chosen - rejected;
    group_metrics[CORRECT * groups + g] = chosen > rejected ? 1.0 : 0.0;
    group_metrics[LOGP_CHOSEN * groups + g] = s[first + c];
    group_metrics[LOGP_REJECTED * groups + g] = s[first + w];
    for (int i = 0; i < k; ++i) {
        // The position of i in a stable sort by decreasing reward (total_cmp).
        const long long key = total_key(r[i]);
        int rank = 0;
        for (int j = 0; j < k; ++j) {
            const long long other = total_key(r[j]);
            rank += other > key || (other == key && j < i);
        }
        rank_reward[first + rank] = implicit(i);
    }
}
CONTRALIGN_KERNEL(loss_groups_f64)

// Launched with one block. summary gets, in this order: the batch loss (Σ per_group / groups,
// in group order), the means over groups of the six group metrics, rewards/rank_1 ..
// rewards/rank_{max_k} (the mean over the groups with that many responses), eos_prob (the mean
// of exp(E) over the responses that end with EOS; NaN when none does) and response_len.
extern "C" __global__ void loss_finish_f64(const double* __restrict__ per_group,
                                           const double* __restrict__ group_metrics,
                                           const double* __restrict__ rank_reward,
                                           const int* __restrict__ offsets,
                                           const double* __restrict__ e,
                                           const unsigned char* __restrict__ has_eos,
                                           const int* __restrict__ tokens, int groups,
                                           int responses, int max_k,
                                           double* __restrict__ summary) {
    const int count = 1 + GROUP_METRICS + max_k + 2;
    for (int t = threadIdx.x; t < count; t += blockDim.x) {
        double sum = 0.0;
        double n = 0.0;
        if (t == 0) {
            const double scale = 1.0 / groups;
            for (int g = 0; g < groups; ++g) sum += per_group[g] * scale;
            n = 1.0;
        } else if (t <= GROUP_METRICS) {
            const double* column = group_metrics + (t - 1) * groups;
            for (int g = 0; g < groups; ++g) sum += column[g];
            n = groups;
        } else if (t <= GROUP_METRICS + max_k) {
            const int rank = t - 1 - GROUP_METRICS;
            for (int g = 0; g < groups; ++g) {
                if (offsets[g + 1] - offsets[g] <= rank) continue;
                sum += rank_reward[offsets[g] + rank];
                n += 1.0;
            }
        } else if (t == count - 2) {
            for (int i = 0; i < responses; ++i) {
                if (!has_eos[i]) continue;
                sum += exp(e[i]);
                n += 1.0;
            }
        } else {
            for (int i = 0; i < responses; ++i) sum += tokens[i];
            n = responses;
        }
        summary[t] = n == 0.0 ? NAN : (t == 0 ? sum : sum / n);
    }
}
CONTRALIGN_KERNEL(loss_finish_f64)
