// The loss library of src/loss/ on the device: each group's loss (docs/losses.md) with its
// gradient with respect to every response's S, A and E, and the metrics the CLI logs, from
// the per-response statistics the scoring leaves on the device. Two launches:
//
//   loss_groups_f64  one thread per group. Reads stats [responses][3] = (S, A, E) and spans
//                    [responses][3] = (start, len, has_eos) (the tables of cuda/scoring.cu;
//                    E is read only where has_eos), S_ref (every `ref_stride`-th value: 1 for
//                    a column, 3 for a reference model's stats table; null when the loss needs
//                    none), rewards and offsets. OVERWRITES per_group[g], grads [responses][3]
//                    = (dL/dS, dL/dA, dL/dE), already times 1/groups for the batch mean as
//                    `batch_loss` returns them (what scoring_row_coef reads), and the group's
//                    metric values (rank_reward, group_metrics); `scratch` holds 2 doubles per
//                    response;
//   loss_finish_f64  one block. OVERWRITES summary: the batch loss and every metric, each a sum
//                    by one thread over the groups (or responses) in order.
//
// Everything is f64, formula for formula and in the order of the CPU library
// (src/loss/mod.rs, numeric.rs, metrics.rs): the stable log-sigmoid and log-sum-exp, the
// softmax-minus-labels gradient written without cancellation, the sums left to right. The
// work is a few dozen operations per response, so f64 costs nothing measurable even where
// FP64 throughput is low, while fp32 cannot hold the gradients of margins in the hundreds
// (σ(-300) ≈ 5e-131). No atomics: the results are the same bit for bit from run to run.
#include "contralign.cuh"

// Matches `LossParams` in src/engine/loss.rs field for field.
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

// One group's responses in the scoring's tables, three values per response.
struct Group {
    const double* stats;
    const int* spans;
    const double* s_ref;  // null when the loss reads none
    int ref_stride;
    const double* r;
    int k;
    __device__ double s(int i) const { return stats[3 * i]; }
    __device__ double a(int i) const { return stats[3 * i + 1]; }
    __device__ double e(int i) const { return stats[3 * i + 2]; }
    __device__ bool has_eos(int i) const { return spans[3 * i + 2] != 0; }
    __device__ double ref(int i) const { return s_ref[ref_stride * i]; }
};

// The group's gradients, (dL/dS, dL/dA, dL/dE) per response.
struct Grads {
    double* g;
    __device__ double& s(int i) const { return g[3 * i]; }
    __device__ double& a(int i) const { return g[3 * i + 1]; }
    __device__ double& e(int i) const { return g[3 * i + 2]; }
};

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
// times `scale` into grad(i). `softmax` is scratch of k values.
template <class X, class Grad>
__device__ double soft_cross_entropy(int k, X x, const double* q, double* softmax, double scale,
                                     Grad grad) {
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
        grad(i) = scale * (softmax[i] * q_others - q[i] * softmax_others);
    }
    return loss;
}

// NCA with soft labels q: `-Σ q_i log σ(ρ_i) - (1/K) Σ log σ(-ρ_i)`.
template <class Rho>
__device__ double nca(int k, Rho rho, const double* q, double beta, const Grads& d) {
    const double kf = k;
    double loss = 0.0;
    for (int i = 0; i < k; ++i) {
        const double r = rho(i);
        loss -= q[i] * log_sigmoid(r) + log_sigmoid(-r) / kf;
        d.s(i) = beta * (-q[i] * sigmoid(-r) + sigmoid(r) / kf);
    }
    return loss;
}

// `loss + R_eos`, R_eos = λ Σ exp(E_i) over the responses that end with EOS (added to the
// loss term by term, as the CPU does), and dR/dE_i.
__device__ double eos_regularizer(double loss, const Group& g, double lambda, const Grads& d) {
    for (int i = 0; i < g.k; ++i) {
        if (!g.has_eos(i)) continue;
        const double p = exp(g.e(i));
        loss += lambda * p;
        d.e(i) += lambda * p;
    }
    return loss;
}

// REFA-dynamic or -1-vs-all with the EOS regularizer. With every reward equal REFA-dynamic
// has no positive and only R_eos remains.
__device__ double refa(const LossParams& p, const Group& g, const Grads& d) {
    const int k = g.k;
    const double* r = g.r;
    double sum = 0.0;
    for (int i = 0; i < k; ++i) sum += r[i];
    const double mean = sum / k;
    const int b = extreme(r, k, false);
    auto positive = [&](int i) { return p.one_vs_all ? i == b : r[i] > mean; };
    bool any = false;
    for (int i = 0; i < k; ++i) any |= positive(i);
    double loss = 0.0;
    if (any) {
        auto score = [&](int i) {
            const double dev = r[i] - mean;
            const double x = p.normalize ? g.a(i) : g.s(i);
            return p.beta * (x + p.alpha * (p.p == 1 ? dev : dev * dev));
        };
        // Negatives enter the denominator with weight gamma: their scores shift by ln(gamma).
        auto shifted = [&](int i) { return positive(i) ? score(i) : score(i) + p.ln_gamma; };
        const MaxLse pos = max_and_log_sum_exp(k, score, positive);
        const MaxLse all = max_and_log_sum_exp(k, shifted, [](int) { return true; });
        const double lse_pos = pos.max + pos.shifted;
        const double lse_all = all.max + all.shifted;
        loss = lse_all - lse_pos;
        for (int i = 0; i < k; ++i) {
            double di = exp(shifted(i) - lse_all);
            if (positive(i)) di -= exp(score(i) - lse_pos);
            (p.normalize ? d.a(i) : d.s(i)) = p.beta * di;
        }
    }
    return eos_regularizer(loss, g, p.lambda, d);
}

// The group's loss without the sft anchor, its gradients into d (zeros on entry). `q` and
// `softmax` are scratch of k values.
__device__ double base_loss(const LossParams& p, const Group& g, double* q, double* softmax,
                            const Grads& d) {
    const int k = g.k;
    auto rho = [&](int i) { return p.beta * (g.s(i) - g.ref(i)); };
    switch (p.kind) {
        case INFONCA:
            soft_labels(g.r, k, p.alpha, q);
            return soft_cross_entropy(k, rho, q, softmax, p.beta,
                                      [&](int i) -> double& { return d.s(i); });
        case NCA:
            soft_labels(g.r, k, p.alpha, q);
            return nca(k, rho, q, p.beta, d);
        case NCA_PAIR:
            q[0] = 1.0;
            q[1] = 0.0;
            return nca(k, rho, q, p.beta, d);
        case DPO: {
            const double eps = p.label_smoothing;
            const double z = rho(0) - rho(1);
            const double dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
            d.s(0) = p.beta * dz;
            d.s(1) = -p.beta * dz;
            return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
        }
        case SIMPO: {
            const double z = p.beta * (g.a(0) - g.a(1)) - p.gamma;
            const double dz = -sigmoid(-z);
            d.a(0) = p.beta * dz;
            d.a(1) = -p.beta * dz;
            return -log_sigmoid(z);
        }
        case REFA:
            return refa(p, g, d);
        case INFONCA_FREE: {
            soft_labels(g.r, k, p.alpha, q);
            auto x = [&](int i) { return p.beta * g.a(i); };
            const double loss = soft_cross_entropy(k, x, q, softmax, p.beta,
                                                   [&](int i) -> double& { return d.a(i); });
            return eos_regularizer(loss, g, p.lambda, d);
        }
        default: {  // SFT
            const int b = extreme(g.r, k, false);
            d.a(b) = -1.0;
            return -g.a(b);
        }
    }
}

}  // namespace

// Group g holds responses offsets[g] .. offsets[g + 1] (at least 2; the pairwise losses
// exactly 2). rank_reward gets each group's implicit rewards sorted by decreasing reward (ties
// in index order), group_metrics[m * groups + g] its GroupMetric values.
extern "C" __global__ void loss_groups_f64(const double* __restrict__ stats,
                                           const int* __restrict__ spans,
                                           const double* __restrict__ s_ref, int ref_stride,
                                           const double* __restrict__ rewards,
                                           const int* __restrict__ offsets, int groups,
                                           int responses, LossParams p,
                                           double* __restrict__ scratch,
                                           double* __restrict__ per_group,
                                           double* __restrict__ grads,
                                           double* __restrict__ rank_reward,
                                           double* __restrict__ group_metrics) {
    const int gi = blockIdx.x * blockDim.x + threadIdx.x;
    if (gi >= groups) return;
    const int first = offsets[gi];
    const Group g{stats + 3 * first,
                  spans + 3 * first,
                  s_ref != nullptr ? s_ref + ref_stride * first : nullptr,
                  ref_stride,
                  rewards + first,
                  offsets[gi + 1] - first};
    const Grads d{grads + 3 * first};
    for (int i = 0; i < 3 * g.k; ++i) d.g[i] = 0.0;
    double loss = base_loss(p, g, scratch + first, scratch + responses + first, d);
    // The sft anchor: weight · (-A_b) on the best response.
    if (p.sft_weight > 0.0 && p.kind != SFT) {
        const int b = extreme(g.r, g.k, false);
        loss += p.sft_weight * -g.a(b);
        d.a(b) += p.sft_weight * -1.0;
    }
    const double scale = 1.0 / groups;
    per_group[gi] = loss;
    for (int i = 0; i < 3 * g.k; ++i) d.g[i] *= scale;

    // Metrics (metrics.rs): implicit rewards β(S - S_ref) for the losses with a reference,
    // βA otherwise, and logps/* the statistic the rewards use (S, or A as CPOTrainer logs it
    // for SimPO); chosen is the best-rated response, rejected the worst.
    const bool reference = g.s_ref != nullptr && (p.kind == INFONCA || p.kind == NCA ||
                                                  p.kind == DPO || p.kind == NCA_PAIR);
    auto implicit = [&](int i) {
        return reference ? p.beta * (g.s(i) - g.ref(i)) : p.beta * g.a(i);
    };
    const int c = extreme(g.r, g.k, false);
    const int w = extreme(g.r, g.k, true);
    const double chosen = implicit(c);
    const double rejected = implicit(w);
    group_metrics[CHOSEN * groups + gi] = chosen;
    group_metrics[REJECTED * groups + gi] = rejected;
    group_metrics[MARGIN * groups + gi] = chosen - rejected;
    group_metrics[CORRECT * groups + gi] = chosen > rejected ? 1.0 : 0.0;
    group_metrics[LOGP_CHOSEN * groups + gi] = reference ? g.s(c) : g.a(c);
    group_metrics[LOGP_REJECTED * groups + gi] = reference ? g.s(w) : g.a(w);
    for (int i = 0; i < g.k; ++i) {
        // The position of i in a stable sort by decreasing reward (total_cmp).
        const long long key = total_key(g.r[i]);
        int rank = 0;
        for (int j = 0; j < g.k; ++j) {
            const long long other = total_key(g.r[j]);
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
                                           const double* __restrict__ stats,
                                           const int* __restrict__ spans, int groups,
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
                if (spans[3 * i + 2] == 0) continue;
                sum += exp(stats[3 * i + 2]);
                n += 1.0;
            }
        } else {
            for (int i = 0; i < responses; ++i) sum += spans[3 * i + 1];
            n = responses;
        }
        summary[t] = n == 0.0 ? NAN : (t == 0 ? sum : sum / n);
    }
}
CONTRALIGN_KERNEL(loss_finish_f64)
