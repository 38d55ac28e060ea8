// Fused elementwise optimizer updates: the GPU twins of the plain-Rust loops in src/optim/
// (`zip_mut` bodies). Each kernel reads every operand once and writes the parameter and its
// moments in place.
//
// Calling convention (mirrored by `Args` in src/cuda/mod.rs; keep the two in sync):
//   out[0..4]  buffers updated in place, in the order the Rust call site lists them
//   in[0..2]   read-only buffers (the gradient first)
//   scratch    f64 workspace (Adalayer's block sums), else null
//   n          elements of every elementwise operand
//   aux[0..2]  integer parameters of the kernel
//   s[0..16]   scalar hyperparameters, in the order documented at each kernel
// Every kernel is instantiated for float and double as NAME_f32 / NAME_f64.
//
// Rounding: build.rs compiles without --use_fast_math and with --fmad=false, so every
// operation below rounds exactly like the Rust expression it copies (IEEE division and square
// root, no fused multiply-add). Keep the operation order of the CPU twin when editing.

#include <stddef.h>

template <typename T>
struct Args {
    T* out[4];
    const T* in[2];
    double* scratch;
    unsigned long long n;
    unsigned long long aux[2];
    T s[16];
};

#define GRID_STRIDE(i, n)                                                              \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n);   \
         i += (size_t)blockDim.x * gridDim.x)

__device__ __forceinline__ float root(float x) { return sqrtf(x); }
__device__ __forceinline__ double root(double x) { return sqrt(x); }

// torch.sign: ±0 -> 0, NaN stays NaN (src/optim/algorithms/lion.rs `sign`).
template <typename T>
__device__ __forceinline__ T sign_of(T x) {
    if (x > T(0)) return T(1);
    if (x < T(0)) return T(-1);
    return x != x ? x : T(0);
}

// torch.lerp: exact at both ends (src/optim/algorithms/adalayer.rs, schedule_free.rs `lerp`).
template <typename T>
__device__ __forceinline__ T lerp(T a, T b, T w) {
    T aw = w < T(0) ? -w : w;
    if (aw < T(0.5)) return a + w * (b - a);
    return b - (b - a) * (T(1) - w);
}

// f32::max / f64::max: a NaN operand yields the other operand (as fmax).
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }
// f32::min / f64::min: a NaN operand yields the other operand (as fmin).
__device__ __forceinline__ float min_of(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double min_of(double a, double b) { return fmin(a, b); }

// ---------------------------------------------------------------------------------------------
// AdamW (src/optim/algorithms/adamw.rs, AdamStep). out: p, m, v [, vmax]; in: g.
// s: decay, b1, c1, b2, c2, step_size, bc2_sqrt, eps, sign
template <typename T, bool AMSGRAD>
__device__ void adamw(const Args<T>& a) {
    T* p = a.out[0];
    T* m = a.out[1];
    T* v = a.out[2];
    T* vmax = a.out[3];
    const T* g = a.in[0];
    const T decay = a.s[0], b1 = a.s[1], c1 = a.s[2], b2 = a.s[3], c2 = a.s[4];
    const T step_size = a.s[5], bc2_sqrt = a.s[6], eps = a.s[7], sign = a.s[8];
    GRID_STRIDE(k, a.n) {
        const T gk = sign * g[k];
        const T mk = b1 * m[k] + c1 * gk;
        const T vk = b2 * v[k] + c2 * gk * gk;
        m[k] = mk;
        v[k] = vk;
        T denom;
        if (AMSGRAD) {
            const T vm = max_of(vmax[k], vk);
            vmax[k] = vm;
            denom = root(vm) / bc2_sqrt + eps;
        } else {
            denom = root(vk) / bc2_sqrt + eps;
        }
        p[k] = p[k] * decay - step_size * mk / denom;
    }
}

// ---------------------------------------------------------------------------------------------
// Lion / Signum (src/optim/algorithms/lion.rs, SignMomentumStep). out: p, m; in: g.
// s: decay, lr, b1, c1, b2, c2
template <typename T>
__device__ void sign_momentum(const Args<T>& a) {
    T* p = a.out[0];
    T* m = a.out[1];
    const T* g = a.in[0];
    const T decay = a.s[0], lr = a.s[1], b1 = a.s[2], c1 = a.s[3], b2 = a.s[4], c2 = a.s[5];
    GRID_STRIDE(k, a.n) {
        const T mk = m[k];
        const T gk = g[k];
        const T c = mk * b1 + gk * c1;
        p[k] = p[k] * decay - lr * sign_of(c);
        m[k] = mk * b2 + gk * c2;
    }
}

// ---------------------------------------------------------------------------------------------
// AdEMAMix (src/optim/algorithms/ademamix.rs). out: p, m2, v [, m1]; in: g. Without m1 (β1 = 0) the fast
// term is g itself.
// s: b1, c1, b2, c2, b3, c3, alpha, bc1, bc2_sqrt, eps, wd, neg_lr
template <typename T, bool FAST_EMA>
__device__ void ademamix(const Args<T>& a) {
    T* p = a.out[0];
    T* m2 = a.out[1];
    T* v = a.out[2];
    T* m1 = a.out[3];
    const T* g = a.in[0];
    const T b1 = a.s[0], c1 = a.s[1], b2 = a.s[2], c2 = a.s[3], b3 = a.s[4], c3 = a.s[5];
    const T alpha = a.s[6], bc1 = a.s[7], bc2_sqrt = a.s[8], eps = a.s[9], wd = a.s[10];
    const T neg_lr = a.s[11];
    GRID_STRIDE(k, a.n) {
        const T gk = g[k];
        T fast = gk;
        if (FAST_EMA) {
            fast = m1[k] * b1 + c1 * gk;
            m1[k] = fast;
        }
        const T m2k = m2[k] * b3 + c3 * gk;
        const T vk = v[k] * b2 + c2 * gk * gk;
        m2[k] = m2k;
        v[k] = vk;
        const T denom = root(vk) / bc2_sqrt + eps;
        const T pk = p[k];
        const T update = (fast / bc1 + alpha * m2k) / denom + wd * pk;
        p[k] = pk + neg_lr * update;
    }
}

// ---------------------------------------------------------------------------------------------
// ADOPT (src/optim/algorithms/adopt.rs, Adopt::update_typed). out: p, m, v; in: g.
// adopt_init (the first call only sets v): s: sign, l2
// adopt:  s: sign, l2, neg_decay, eps, clip, w1, b2, c2, neg_lr  (clip = +inf without clipping)
template <typename T>
__device__ void adopt_init(const Args<T>& a) {
    const T* p = a.out[0];
    T* v = a.out[2];
    const T* g = a.in[0];
    const T sign = a.s[0], l2 = a.s[1];
    GRID_STRIDE(k, a.n) {
        const T gk = sign * g[k] + l2 * p[k];
        v[k] = v[k] + gk * gk;
    }
}

template <typename T>
__device__ void adopt(const Args<T>& a) {
    T* p = a.out[0];
    T* m = a.out[1];
    T* v = a.out[2];
    const T* g = a.in[0];
    const T sign = a.s[0], l2 = a.s[1], neg_decay = a.s[2], eps = a.s[3], clip = a.s[4];
    const T w1 = a.s[5], b2 = a.s[6], c2 = a.s[7], neg_lr = a.s[8];
    GRID_STRIDE(k, a.n) {
        T pk = p[k];
        const T gk = sign * g[k] + l2 * pk;
        pk = pk + neg_decay * pk;
        const T vk = v[k];
        T n = gk / max_of(root(vk), eps);
        n = min_of(max_of(n, -clip), clip);
        const T mk = lerp(m[k], n, w1);
        m[k] = mk;
        p[k] = pk + neg_lr * mk;
        v[k] = vk * b2 + c2 * (gk * gk);
    }
}

// ---------------------------------------------------------------------------------------------
// Cautious AdamW (src/optim/algorithms/cautious_adamw.rs, CautiousAdamW::update_by_kernels): two
// launches with the mask counted between them.
// cautious_moments: out: m, v, mask; in: g. s: w1, w2
// cautious_update:  out: p, m, v (m, v read only); in: g. s: decay, bc2_sqrt, eps, step_size, kept
template <typename T>
__device__ void cautious_moments(const Args<T>& a) {
    T* m = a.out[0];
    T* v = a.out[1];
    T* mask = a.out[2];
    const T* g = a.in[0];
    const T w1 = a.s[0], w2 = a.s[1];
    GRID_STRIDE(k, a.n) {
        const T gk = g[k];
        const T mk = lerp(m[k], gk, w1);
        m[k] = mk;
        v[k] = lerp(v[k], gk * gk, w2);
        mask[k] = mk * gk > T(0) ? T(1) : T(0);
    }
}

template <typename T>
__device__ void cautious_update(const Args<T>& a) {
    T* p = a.out[0];
    const T* m = a.out[1];
    const T* v = a.out[2];
    const T* g = a.in[0];
    const T decay = a.s[0], bc2_sqrt = a.s[1], eps = a.s[2], step_size = a.s[3], kept = a.s[4];
    GRID_STRIDE(k, a.n) {
        const T mk = m[k];
        const T masked = mk * g[k] > T(0) ? mk : T(0);
        const T d = root(v[k]) / bc2_sqrt + eps;
        p[k] = p[k] * decay - ((masked / d) * step_size) / kept;
    }
}

// ---------------------------------------------------------------------------------------------
// Simplified-AdEMAMix (src/optim/algorithms/simplified_ademamix.rs). out: p, m, v; in: g.
// s: b1, b2, c2, alpha, eps_term, num_sum, den_sqrt, wd, neg_lr
// num_sum / den_sqrt are 1 when the corresponding bias correction is off: x / 1 and x * 1 are
// exact, so this rounds like the CPU twin that skips them.
template <typename T>
__device__ void simplified_ademamix(const Args<T>& a) {
    T* p = a.out[0];
    T* m = a.out[1];
    T* v = a.out[2];
    const T* g = a.in[0];
    const T b1 = a.s[0], b2 = a.s[1], c2 = a.s[2], alpha = a.s[3], eps_term = a.s[4];
    const T num_sum = a.s[5], den_sqrt = a.s[6], wd = a.s[7], neg_lr = a.s[8];
    GRID_STRIDE(k, a.n) {
        const T gk = g[k];
        const T mk = m[k] * b1 + gk;
        const T vk = v[k] * b2 + c2 * gk * gk;
        m[k] = mk;
        v[k] = vk;
        const T denom = root(vk) + eps_term;
        T u = (alpha * gk + mk) / denom;
        u = u / num_sum;
        u = u * den_sqrt;
        const T pk = p[k];
        u = u + wd * pk;
        p[k] = pk + neg_lr * u;
    }
}

// ---------------------------------------------------------------------------------------------
// Adalayer (src/optim/algorithms/adalayer.rs, Plan::apply). A parameter of n elements is split into nb
// consecutive blocks of len = n / nb elements, one second-moment scalar per block.

#define SUMSQ_THREADS 256

// Pass 1: partial sums of g² in f64. Launched with nb * chunks blocks of SUMSQ_THREADS threads;
// block (b, c) sums chunk c of block b into scratch[b * chunks + c].
// in: g; aux: len, chunk_len.
template <typename T>
__device__ void adalayer_sumsq(const Args<T>& a) {
    __shared__ double acc[SUMSQ_THREADS];
    const unsigned long long len = a.aux[0], chunk_len = a.aux[1];
    const unsigned long long chunks = (len + chunk_len - 1) / chunk_len;
    const unsigned long long b = blockIdx.x / chunks, c = blockIdx.x % chunks;
    const unsigned long long lo = b * len + c * chunk_len;
    unsigned long long hi = lo + chunk_len;
    if (hi > (b + 1) * len) hi = (b + 1) * len;
    double s = 0.0;
    for (unsigned long long k = lo + threadIdx.x; k < hi; k += blockDim.x) {
        const double x = (double)a.in[0][k];
        s += x * x;
    }
    acc[threadIdx.x] = s;
    __syncthreads();
    for (unsigned int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) acc[threadIdx.x] += acc[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) a.scratch[blockIdx.x] = acc[0];
}

// Pass 2: one block of SUMSQ_THREADS threads per Adalayer block b: v[b] ← lerp(v[b], Σg²/len,
// w2), the sum taken over the partials of pass 1 in a fixed order (deterministic).
// out: v (nb scalars); aux: len, chunks; s: w2.
template <typename T>
__device__ void adalayer_v(const Args<T>& a) {
    __shared__ double acc[SUMSQ_THREADS];
    const unsigned long long len = a.aux[0], chunks = a.aux[1];
    const unsigned long long b = blockIdx.x;
    double s = 0.0;
    for (unsigned long long c = threadIdx.x; c < chunks; c += blockDim.x) {
        s += a.scratch[b * chunks + c];
    }
    acc[threadIdx.x] = s;
    __syncthreads();
    for (unsigned int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) acc[threadIdx.x] += acc[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        T* v = a.out[0];
        v[b] = lerp(v[b], (T)(acc[0] / (double)len), a.s[0]);
    }
}

// Pass 3: the scaled update. out: p, m, v; in: g; n = nb * len; aux: len.
// s: w1, decay, neg_step, bc2_sqrt, eps
template <typename T>
__device__ void adalayer_update(const Args<T>& a) {
    T* p = a.out[0];
    T* m = a.out[1];
    const T* v = a.out[2];
    const T* g = a.in[0];
    const unsigned long long len = a.aux[0];
    const T w1 = a.s[0], decay = a.s[1], neg_step = a.s[2], bc2_sqrt = a.s[3], eps = a.s[4];
    GRID_STRIDE(k, a.n) {
        const T denom = root(v[k / len]) / bc2_sqrt + eps;
        const T mk = lerp(m[k], g[k], w1);
        m[k] = mk;
        p[k] = p[k] * decay + neg_step * (mk / denom);
    }
}

// SGD + Adalayer's non-adaptive parameters (denominator exactly 1). out: p, m; in: g.
// s: w1, decay, neg_step
template <typename T>
__device__ void adalayer_sgd(const Args<T>& a) {
    T* p = a.out[0];
    T* m = a.out[1];
    const T* g = a.in[0];
    const T w1 = a.s[0], decay = a.s[1], neg_step = a.s[2];
    GRID_STRIDE(k, a.n) {
        const T mk = lerp(m[k], g[k], w1);
        m[k] = mk;
        p[k] = p[k] * decay + neg_step * mk;
    }
}

// ---------------------------------------------------------------------------------------------
// Schedule-Free (src/optim/algorithms/schedule_free.rs). The parameter holds y.
// AdamW base: out: y, z, v; in: g. s: b2, c2, bias_correction2, eps, c, y_lr, lr, wd, decay
// (decay ≠ 0: add wd·y, as the CPU twin's `if decay`).
template <typename T>
__device__ void schedule_free_adam(const Args<T>& a) {
    T* y = a.out[0];
    T* z = a.out[1];
    T* v = a.out[2];
    const T* g = a.in[0];
    const T b2 = a.s[0], c2 = a.s[1], bc2 = a.s[2], eps = a.s[3], c = a.s[4], y_lr = a.s[5];
    const T lr = a.s[6], wd = a.s[7];
    const bool decay = a.s[8] != T(0);
    GRID_STRIDE(k, a.n) {
        const T gk = g[k];
        const T vk = v[k] * b2 + c2 * gk * gk;
        v[k] = vk;
        T d = gk / (root(vk / bc2) + eps);
        const T yk = y[k], zk = z[k];
        if (decay) d = d + wd * yk;
        y[k] = lerp(yk, zk, c) + y_lr * d;
        z[k] = zk - lr * d;
    }
}

// SGD base: out: y, z; in: g. s: c, y_lr, lr, wd, decay
template <typename T>
__device__ void schedule_free_sgd(const Args<T>& a) {
    T* y = a.out[0];
    T* z = a.out[1];
    const T* g = a.in[0];
    const T c = a.s[0], y_lr = a.s[1], lr = a.s[2], wd = a.s[3];
    const bool decay = a.s[4] != T(0);
    GRID_STRIDE(k, a.n) {
        const T yk = y[k], zk = z[k];
        const T d = decay ? g[k] + wd * yk : g[k];
        y[k] = lerp(yk, zk, c) + y_lr * d;
        z[k] = zk - lr * d;
    }
}

// Mode switch p ← lerp(p, z, w). out: p; in: z. s: w
template <typename T>
__device__ void lerp_toward(const Args<T>& a) {
    T* p = a.out[0];
    const T* z = a.in[0];
    const T w = a.s[0];
    GRID_STRIDE(k, a.n) { p[k] = lerp(p[k], z[k], w); }
}

// ---------------------------------------------------------------------------------------------
// Muon (src/optim/algorithms/muon.rs, Muon::matrix_typed): the momentum before Newton–Schulz and the
// parameter update after it (the orthogonalization itself is matrix products).
// out: m, u; in: g. s: w_in (1 − μ), w_out (μ), nesterov (≠ 0: u = lerp(g, m, μ), else u = m)
template <typename T>
__device__ void muon_momentum(const Args<T>& a) {
    T* m = a.out[0];
    T* u = a.out[1];
    const T* g = a.in[0];
    const T w_in = a.s[0], w_out = a.s[1];
    const bool nesterov = a.s[2] != T(0);
    GRID_STRIDE(k, a.n) {
        const T gk = g[k];
        const T mk = lerp(m[k], gk, w_in);
        m[k] = mk;
        u[k] = nesterov ? lerp(gk, mk, w_out) : mk;
    }
}

// out: p; in: o (the orthogonalized update). s: decay, neg_lr, scale
template <typename T>
__device__ void muon_apply(const Args<T>& a) {
    T* p = a.out[0];
    const T* o = a.in[0];
    const T decay = a.s[0], neg_lr = a.s[1], scale = a.s[2];
    GRID_STRIDE(k, a.n) { p[k] = p[k] * decay + neg_lr * (o[k] * scale); }
}

// ---------------------------------------------------------------------------------------------
// Kronecker-factor statistics (src/optim/math/kron.rs, ema_update): F ← EMA(F, S) in place.
// out: F; in: S. s: x, y, form with
//   form 0: F + x·(S − F)          (lerp, weight x < 0.5)
//   form 1: S − (S − F)·x          (lerp, x = 1 − weight)
//   form 2: F + x·S                (scale-add with decay 1)
//   form 3: y·F + x·S              (scale-add, decay y)
template <typename T>
__device__ void factor_ema(const Args<T>& a) {
    T* f = a.out[0];
    const T* s = a.in[0];
    const T x = a.s[0], y = a.s[1];
    const int form = (int)a.s[2];
    GRID_STRIDE(k, a.n) {
        const T fk = f[k], sk = s[k];
        T r;
        if (form == 0) {
            r = fk + x * (sk - fk);
        } else if (form == 1) {
            r = sk - (sk - fk) * x;
        } else if (form == 2) {
            r = fk + x * sk;
        } else {
            r = y * fk + x * sk;
        }
        f[k] = r;
    }
}

// ---------------------------------------------------------------------------------------------
// SOAP (src/optim/algorithms/soap.rs): the elementwise passes around the rotations, which are matrix
// products.
// Several EMAs of one input, m_j ← d_j·m_j + w_j·g: SOAP's original-space moments
// (update_moments) and the runner's weight averages (ewa::update_typed).
// out: m_0..m_{count−1}; in: g. s: count (≤ 4), d_0, w_0, d_1, w_1, ...
template <typename T>
__device__ void ema_many(const Args<T>& a) {
    const T* g = a.in[0];
    const int count = (int)a.s[0];
    GRID_STRIDE(k, a.n) {
        const T gk = g[k];
        for (int j = 0; j < count; ++j) {
            T* m = a.out[j];
            m[k] = a.s[1 + 2 * j] * m[k] + a.s[2 + 2 * j] * gk;
        }
    }
}

// Adam in the eigenbasis (AdamInner::direction): reads the rotated gradient from d, updates the
// rotated second moment v and overwrites d with m'/(√v + ε). out: d, v; in: m' (rotated first
// moment). s: b2, c2, eps
template <typename T>
__device__ void soap_adam(const Args<T>& a) {
    T* d = a.out[0];
    T* v = a.out[1];
    const T* m = a.in[0];
    const T b2 = a.s[0], c2 = a.s[1], eps = a.s[2];
    GRID_STRIDE(k, a.n) {
        const T g = d[k];
        const T vk = b2 * v[k] + c2 * (g * g);
        v[k] = vk;
        d[k] = m[k] / (root(vk) + eps);
    }
}

// The parameter update (apply_update): p ← p − step·(u / norm), then p ← p + decay·p.
// out: p; in: u. s: step, norm, decay, normalize (≠ 0), has_decay (≠ 0)
template <typename T>
__device__ void soap_apply(const Args<T>& a) {
    T* p = a.out[0];
    const T* u = a.in[0];
    const T step = a.s[0], norm = a.s[1], decay = a.s[2];
    const bool normalize = a.s[3] != T(0), has_decay = a.s[4] != T(0);
    GRID_STRIDE(k, a.n) {
        const T uk = normalize ? u[k] / norm : u[k];
        T pk = p[k] - step * uk;
        if (has_decay) pk = pk + decay * pk;
        p[k] = pk;
    }
}

// ---------------------------------------------------------------------------------------------
// Factor refresh (src/linalg/on_device.rs): SOAP's power iteration with a Cholesky-QR2
// orthogonalization, built from matrix products (cuBLAS) and the three kernels below. Their
// CPU twins are the plain loops in on_device.rs, with the same operation order.

// Column dot products d_j = Σ_i x[i][j]·y[i][j] of two row-major rows×cols matrices, summed in
// f64 in row order (the Rayleigh quotients q_jᵀ(F q)_j, or squared column norms with x = y).
// in: x, y; scratch: d (cols f64); n = cols; aux: rows. One thread per column: consecutive
// threads read consecutive elements of a row.
template <typename T>
__device__ void column_dots(const Args<T>& a) {
    const T* x = a.in[0];
    const T* y = a.in[1];
    const unsigned long long rows = a.aux[0], cols = a.n;
    GRID_STRIDE(j, cols) {
        double acc = 0.0;
        for (unsigned long long i = 0; i < rows; ++i) {
            acc += (double)x[i * cols + j] * (double)y[i * cols + j];
        }
        a.scratch[j] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// SGD (src/optim/algorithms/sgd.rs, Sgd::step_typed). Exactly one decay is active (decay = 1 − lr·wd with
// l2 = 0, or decay = 1 with l2 = wd).
// Without momentum: out: p; in: g. s: decay, sign, l2, lr
template <typename T>
__device__ void sgd(const Args<T>& a) {
    T* p = a.out[0];
    const T* g = a.in[0];
    const T decay = a.s[0], sign = a.s[1], l2 = a.s[2], lr = a.s[3];
    GRID_STRIDE(k, a.n) {
        const T pk = p[k] * decay;
        const T d = sign * g[k] + l2 * pk;
        p[k] = pk - lr * d;
    }
}

// With momentum: out: p, buf; in: g. s: decay, sign, l2, lr, mu, keep (1 − dampening),
// first (≠ 0: the buffer starts as d), nesterov (≠ 0)
template <typename T>
__device__ void sgd_momentum(const Args<T>& a) {
    T* p = a.out[0];
    T* b = a.out[1];
    const T* g = a.in[0];
    const T decay = a.s[0], sign = a.s[1], l2 = a.s[2], lr = a.s[3], mu = a.s[4], keep = a.s[5];
    const bool first = a.s[6] != T(0), nesterov = a.s[7] != T(0);
    GRID_STRIDE(k, a.n) {
        const T pk = p[k] * decay;
        const T d = sign * g[k] + l2 * pk;
        const T bk = first ? d : b[k] * mu + keep * d;
        b[k] = bk;
        const T u = nesterov ? d + mu * bk : bk;
        p[k] = pk - lr * u;
    }
}

// ---------------------------------------------------------------------------------------------
// SophiaG (src/optim/algorithms/sophia.rs). Update: out: p, m; in: g, h.
// s: decay, neg_lr, b1, c1, scale (ρ·bs), floor, sgn (−1 when maximizing)

template <typename T>
__device__ void sophia(const Args<T>& a) {
    T* p = a.out[0];
    T* m = a.out[1];
    const T* g = a.in[0];
    const T* h = a.in[1];
    const T decay = a.s[0], neg_lr = a.s[1], b1 = a.s[2], c1 = a.s[3], scale = a.s[4];
    const T floor_ = a.s[5], sgn = a.s[6];
    GRID_STRIDE(k, a.n) {
        const T pk = p[k] * decay;
        const T mk = m[k] * b1 + (sgn * g[k]) * c1;
        m[k] = mk;
        const T mag = mk < T(0) ? -mk : mk;
        const T ratio = min_of(mag / (scale * h[k] + floor_), T(1));
        p[k] = pk + neg_lr * sign_of(mk) * ratio;
    }
}

// Hessian EMA: h ← β2·h + (1 − β2)·e (or ·e², square ≠ 0). out: h; in: e. s: b2, c2, square
template <typename T>
__device__ void sophia_hessian(const Args<T>& a) {
    T* h = a.out[0];
    const T* e = a.in[0];
    const T b2 = a.s[0], c2 = a.s[1];
    const bool square = a.s[2] != T(0);
    GRID_STRIDE(k, a.n) {
        h[k] = square ? h[k] * b2 + c2 * e[k] * e[k] : h[k] * b2 + c2 * e[k];
    }
}

// ---------------------------------------------------------------------------------------------
// Shampoo (src/optim/algorithms/shampoo/). Its lerp takes the weight and its complement, both rounded
// from f64 by the caller, and picks the form on the f64 weight (flag `small`: w < 0.5).
template <typename T>
__device__ __forceinline__ T lerp_split(T a, T b, T w, T omw, bool small) {
    if (small) return a + w * (b - a);
    return b - (b - a) * omw;
}

// Grafting state, filtered gradient and grafted direction in one pass (Shampoo::apply, steps
// 2–3). The outputs present are packed in the order v, m, ḡ, a; their indices (−1: absent) are
// s[10..14]. in: g.
// s: bc1, b1w, 1−b1w, b3w, 1−b3w, flags (bit 0 use_bc1, 1 same_beta, 2 skip_decay, 3 b1w < ½,
//    4 b3w < ½), decay, wg, bcg, epsg, iv, im, ig, ia
template <typename T>
__device__ void shampoo_graft(const Args<T>& a) {
    const T* g = a.in[0];
    const T bc1 = a.s[0], b1w = a.s[1], omb1w = a.s[2], b3w = a.s[3], omb3w = a.s[4];
    const int flags = (int)a.s[5];
    const bool use_bc1 = flags & 1, same_beta = flags & 2, skip_decay = flags & 4;
    const bool small1 = flags & 8, small3 = flags & 16;
    const T decay = a.s[6], wg = a.s[7], bcg = a.s[8], epsg = a.s[9];
    const int iv = (int)a.s[10], im = (int)a.s[11], ig = (int)a.s[12], ia = (int)a.s[13];
    GRID_STRIDE(k, a.n) {
        const T gk = g[k];
        if (iv >= 0) {
            T* v = a.out[iv];
            const T old = skip_decay ? v[k] : decay * v[k];
            v[k] = old + wg * gk * gk;
        }
        T gb = gk;
        if (im >= 0) {
            T* m = a.out[im];
            const T old = m[k];
            const T nw = lerp_split(old, gk, b1w, omb1w, small1);
            m[k] = nw;
            gb = same_beta ? nw : lerp_split(old, gk, b3w, omb3w, small3);
            if (use_bc1) gb = gb / bc1;
        }
        if (ig >= 0) a.out[ig][k] = gb;
        if (ia >= 0 && iv >= 0) a.out[ia][k] = gb / (root(a.out[iv][k] / bcg) + epsg);
    }
}

// Weight decay and update without momentum (steps 5 and 7). out: p; in: d.
// s: alpha, neg_lr, decay (≠ 0: add alpha·p)
template <typename T>
__device__ void shampoo_update(const Args<T>& a) {
    T* p = a.out[0];
    const T* d = a.in[0];
    const T alpha = a.s[0], neg_lr = a.s[1];
    const bool decay = a.s[2] != T(0);
    GRID_STRIDE(k, a.n) {
        T dk = d[k];
        if (decay) dk = dk + alpha * p[k];
        p[k] = p[k] + dk * neg_lr;
    }
}

// With classic momentum (steps 5–7). out: p, buf; in: d.
// s: alpha, neg_lr, decay (≠ 0), mu, keep (1 − dampening), nesterov (≠ 0)
template <typename T>
__device__ void shampoo_update_momentum(const Args<T>& a) {
    T* p = a.out[0];
    T* b = a.out[1];
    const T* d = a.in[0];
    const T alpha = a.s[0], neg_lr = a.s[1], mu = a.s[3], keep = a.s[4];
    const bool decay = a.s[2] != T(0), nesterov = a.s[5] != T(0);
    GRID_STRIDE(k, a.n) {
        T dk = d[k];
        if (decay) dk = dk + alpha * p[k];
        const T bk = b[k] * mu + keep * dk;
        b[k] = bk;
        dk = nesterov ? dk * keep + mu * bk : bk;
        p[k] = p[k] + dk * neg_lr;
    }
}

// out = x / divisor (Shampoo's bias-corrected factors; `divided`). out: o; in: x. s: divisor
// out = g + λ·w (Shampoo's L2 decay; `with_l2`): add_scaled. out: o; in: g, w. s: λ
template <typename T>
__device__ void divide_by(const Args<T>& a) {
    T* o = a.out[0];
    const T* x = a.in[0];
    const T div = a.s[0];
    GRID_STRIDE(k, a.n) { o[k] = x[k] / div; }
}

template <typename T>
__device__ void add_scaled(const Args<T>& a) {
    T* o = a.out[0];
    const T* g = a.in[0];
    const T* w = a.in[1];
    const T lambda = a.s[0];
    GRID_STRIDE(k, a.n) { o[k] = g[k] + lambda * w[k]; }
}

// ---------------------------------------------------------------------------------------------
// MARS (src/optim/algorithms/mars.rs, Mars::mars_typed pass 2 and 3). The corrected gradient
// c = (g − last)·coef + g, divided by its norm when clipping. last ← g afterwards when
// approximate.
template <typename T>
__device__ __forceinline__ T mars_corrected(T g, T l, T coef, bool clip, T norm) {
    const T c = (g - l) * coef + g;
    return clip ? c / norm : c;
}

// AdamW form. out: last, m, p, v; in: g. (AMSGrad needs a fifth output and keeps the CPU pass.)
// s: coef, clip (≠ 0), norm, b1, c1, b2, c2, neg_lr, wd, eps, inv_sqrt_bc2, bc1, approx (≠ 0)
template <typename T>
__device__ void mars_adam(const Args<T>& a) {
    T* last = a.out[0];
    T* m = a.out[1];
    T* p = a.out[2];
    T* v = a.out[3];
    const T* g = a.in[0];
    const T coef = a.s[0], norm = a.s[2], b1 = a.s[3], c1 = a.s[4], b2 = a.s[5], c2 = a.s[6];
    const T neg_lr = a.s[7], wd = a.s[8], eps = a.s[9], inv_sqrt_bc2 = a.s[10], bc1 = a.s[11];
    const bool clip = a.s[1] != T(0), approx = a.s[12] != T(0);
    GRID_STRIDE(k, a.n) {
        const T gk = g[k];
        const T c = mars_corrected(gk, last[k], coef, clip, norm);
        const T mk = m[k] * b1 + c1 * c;
        m[k] = mk;
        const T vk = v[k] * b2 + c2 * c * c;
        v[k] = vk;
        const T denom = (root(vk) * inv_sqrt_bc2 + eps) * bc1;
        const T pk = p[k];
        p[k] = pk + neg_lr * (pk * wd + mk / denom);
        if (approx) last[k] = gk;
    }
}

// Lion form. out: last, m, p; in: g. s: as mars_adam (b2, c2, eps, inv_sqrt_bc2, bc1 unused)
template <typename T>
__device__ void mars_lion(const Args<T>& a) {
    T* last = a.out[0];
    T* m = a.out[1];
    T* p = a.out[2];
    const T* g = a.in[0];
    const T coef = a.s[0], norm = a.s[2], b1 = a.s[3], c1 = a.s[4], neg_lr = a.s[7];
    const T wd = a.s[8];
    const bool clip = a.s[1] != T(0), approx = a.s[12] != T(0);
    GRID_STRIDE(k, a.n) {
        const T gk = g[k];
        const T c = mars_corrected(gk, last[k], coef, clip, norm);
        const T mk = m[k] * b1 + c1 * c;
        m[k] = mk;
        // 0 for ±0 and NaN, as the CPU twin's comparisons.
        const T sign = mk > T(0) ? T(1) : (mk < T(0) ? T(-1) : T(0));
        const T pk = p[k];
        p[k] = pk + neg_lr * (pk * wd + sign);
        if (approx) last[k] = gk;
    }
}

// Shampoo form, before Newton–Schulz. out: last, m; in: g. s: as mars_adam
template <typename T>
__device__ void mars_momentum(const Args<T>& a) {
    T* last = a.out[0];
    T* m = a.out[1];
    const T* g = a.in[0];
    const T coef = a.s[0], norm = a.s[2], b1 = a.s[3], c1 = a.s[4];
    const bool clip = a.s[1] != T(0), approx = a.s[12] != T(0);
    GRID_STRIDE(k, a.n) {
        const T gk = g[k];
        const T c = mars_corrected(gk, last[k], coef, clip, norm);
        m[k] = m[k] * b1 + c1 * c;
        if (approx) last[k] = gk;
    }
}

// Shampoo form, after Newton–Schulz: p ← p + (o·factor + wd·p)·(−lr). out: p; in: o.
// s: factor, wd, neg_lr
template <typename T>
__device__ void mars_apply(const Args<T>& a) {
    T* p = a.out[0];
    const T* o = a.in[0];
    const T factor = a.s[0], wd = a.s[1], neg_lr = a.s[2];
    GRID_STRIDE(k, a.n) {
        const T pk = p[k];
        p[k] = pk + (o[k] * factor + wd * pk) * neg_lr;
    }
}

// out = x·s (ewa::scale_into: bias-corrected averages). out: o; in: x. s: s
template <typename T>
__device__ void scale_by(const Args<T>& a) {
    T* o = a.out[0];
    const T* x = a.in[0];
    const T f = a.s[0];
    GRID_STRIDE(k, a.n) { o[k] = x[k] * f; }
}

// ---------------------------------------------------------------------------------------------
// Finiteness check (the driver's gradient check). in: x; scratch: one f64, set to 1 when some
// element is ±inf or NaN (every writer stores the same value, so the race is benign).
template <typename T>
__device__ void nonfinite(const Args<T>& a) {
    const T* x = a.in[0];
    bool bad = false;
    GRID_STRIDE(k, a.n) { bad = bad || !isfinite(x[k]); }
    if (bad) a.scratch[0] = 1.0;
}

// ---------------------------------------------------------------------------------------------
// Entry points. (kernels/emulate/host.cpp defines these macros itself to compile this file as
// host code; ENTRY_SYNC marks the kernels that use __syncthreads.)
#ifndef ENTRY
#define ENTRY(name, body)                                                                 \
    extern "C" __global__ void name##_f32(const Args<float> a) { body<float>(a); }        \
    extern "C" __global__ void name##_f64(const Args<double> a) { body<double>(a); }
#define ENTRY2(name, body, flag)                                                          \
    extern "C" __global__ void name##_f32(const Args<float> a) { body<float, flag>(a); }  \
    extern "C" __global__ void name##_f64(const Args<double> a) { body<double, flag>(a); }
#define ENTRY_SYNC(name, body) ENTRY(name, body)
#endif

ENTRY2(adamw, adamw, false)
ENTRY2(adamw_amsgrad, adamw, true)
ENTRY(sign_momentum, sign_momentum)
ENTRY2(ademamix, ademamix, true)
ENTRY2(ademamix_no_m1, ademamix, false)
ENTRY(simplified_ademamix, simplified_ademamix)
ENTRY(adopt_init, adopt_init)
ENTRY(adopt, adopt)
ENTRY(cautious_moments, cautious_moments)
ENTRY(cautious_update, cautious_update)
ENTRY_SYNC(adalayer_sumsq, adalayer_sumsq)
ENTRY_SYNC(adalayer_v, adalayer_v)
ENTRY(adalayer_update, adalayer_update)
ENTRY(adalayer_sgd, adalayer_sgd)
ENTRY(schedule_free_adam, schedule_free_adam)
ENTRY(schedule_free_sgd, schedule_free_sgd)
ENTRY(lerp_toward, lerp_toward)
ENTRY(nonfinite, nonfinite)
ENTRY(muon_momentum, muon_momentum)
ENTRY(muon_apply, muon_apply)
ENTRY(factor_ema, factor_ema)
ENTRY(ema_many, ema_many)
ENTRY(soap_adam, soap_adam)
ENTRY(soap_apply, soap_apply)
ENTRY(sgd, sgd)
ENTRY(sgd_momentum, sgd_momentum)
ENTRY(sophia, sophia)
ENTRY(sophia_hessian, sophia_hessian)
ENTRY(shampoo_graft, shampoo_graft)
ENTRY(shampoo_update, shampoo_update)
ENTRY(shampoo_update_momentum, shampoo_update_momentum)
ENTRY(divide_by, divide_by)
ENTRY(add_scaled, add_scaled)
ENTRY(mars_adam, mars_adam)
ENTRY(mars_lion, mars_lion)
ENTRY(mars_momentum, mars_momentum)
ENTRY(mars_apply, mars_apply)
ENTRY(scale_by, scale_by)
ENTRY(column_dots, column_dots)

// ---------------------------------------------------------------------------------------------
// Adafactor (src/optim/algorithms/adafactor.rs torch form, src/optim/algorithms/adafactor_hf.rs HF form; the twins
// are `adafactor::cpu_pass` and the helpers it calls). One step of one parameter of n elements
// is a sequence of launches that share one argument block (except `adafactor_scale`) and one
// f64 workspace, so no statistic leaves the device:
//   factored (aux = rows, cols > 0; batch = n / (rows·cols) matrices):
//     adafactor_row_partials → adafactor_col_partials → adafactor_cols → adafactor_rows →
//     adafactor_sumsq → adafactor_scale → adafactor_apply
//   full (aux = 0, 0; v has n elements): adafactor_sumsq → adafactor_scale → adafactor_apply
// Every sum is in f64 and in a fixed order that does not depend on the grid, and the CPU twin
// sums in the same order, so kernel and twin agree bit for bit:
//   block sum   thread t adds elements t, t + 256, … in turn, then the 256 lanes are folded
//               pairwise (lane t += lane t + w for w = 128, 64, …, 1)  [af_block_sum]
//   row sums    sequential over each chunk of AF_PART columns, then the chunks in order
//   column sums sequential over each chunk of AF_PART rows, then the chunks in order
//   row means   one block sum per matrix over its rows, divided by rows
//   Σp², Σu²    one block sum per chunk of AF_CHUNK consecutive elements, then a block sum of
//               the chunk partials
// out: p, r (or v), c (or null), m (HF first moment, or null); in: g.
// s (T): torch  variant = 0, w, eps1, eps1², sign, decay, has_decay
//        HF     variant = 1, b2, c2, eps1, b1, c1, has_momentum, has_decay
// Workspace (f64): 4 slots (torch: step scale; HF: lr_t, decay, den, RMS(p)), row means
// [batch], Σp² partials [chunks], Σu² partials [chunks], row partials
// [batch·rows·col_chunks], column partials [batch·row_chunks·cols] (src/launch.rs,
// AdafactorPlan). The row and column sums need no barrier, so a step has few blocks that
// synchronize (one per matrix, one per chunk, one), which also keeps the host emulation fast.

#define AF_THREADS 256
#define AF_CHUNK 8192
#define AF_PART 64

struct AfLayout {
    unsigned long long n, rows, cols, batch, chunks, row_chunks, col_chunks;
    double* slots;
    double* mean;
    double* p_part;
    double* u_part;
    double* row_part;
    double* col_part;
};

template <typename T>
__device__ AfLayout af_layout(const Args<T>& a) {
    AfLayout l;
    l.n = a.n;
    l.rows = a.aux[0];
    l.cols = a.aux[1];
    l.batch = l.rows * l.cols > 0 ? l.n / (l.rows * l.cols) : 0;
    l.chunks = (l.n + AF_CHUNK - 1) / AF_CHUNK;
    l.row_chunks = (l.rows + AF_PART - 1) / AF_PART;
    l.col_chunks = (l.cols + AF_PART - 1) / AF_PART;
    l.slots = a.scratch;
    l.mean = l.slots + 4;
    l.p_part = l.mean + l.batch;
    l.u_part = l.p_part + l.chunks;
    l.row_part = l.u_part + l.chunks;
    l.col_part = l.row_part + l.batch * l.rows * l.col_chunks;
    return l;
}

// The fold of a block sum: every thread passes its lane, every thread gets the total. Starts
// and ends with a barrier so that `acc` can be reused right away.
__device__ double af_block_sum(double v, double* acc) {
    __syncthreads();
    acc[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) acc[threadIdx.x] += acc[threadIdx.x + w];
        __syncthreads();
    }
    const double total = acc[0];
    __syncthreads();
    return total;
}

// The summand of the factored statistics: torch g² in f64, HF g² + ε1 in T.
template <typename T>
__device__ __forceinline__ double af_sq(T g, bool hf, T eps1) {
    if (hf) return (double)(g * g + eps1);
    const double x = (double)g;
    return x * x;
}

// Row partials: thread k = row·col_chunks + q sums columns q·AF_PART.. of its row in order.
template <typename T>
__device__ void adafactor_row_partials(const Args<T>& a) {
    const AfLayout l = af_layout(a);
    const bool hf = a.s[0] != T(0);
    const T eps1 = hf ? a.s[3] : a.s[2];
    const T* g = a.in[0];
    GRID_STRIDE(k, l.batch * l.rows * l.col_chunks) {
        const unsigned long long row = k / l.col_chunks, q = k % l.col_chunks;
        unsigned long long hi = (q + 1) * AF_PART;
        if (hi > l.cols) hi = l.cols;
        double s = 0.0;
        for (unsigned long long j = q * AF_PART; j < hi; ++j) {
            s += af_sq(g[row * l.cols + j], hf, eps1);
        }
        l.row_part[k] = s;
    }
}

// Column partials: thread k = (b·row_chunks + q)·cols + j sums rows q·AF_PART.. of column
// j of matrix b in order.
template <typename T>
__device__ void adafactor_col_partials(const Args<T>& a) {
    const AfLayout l = af_layout(a);
    const bool hf = a.s[0] != T(0);
    const T eps1 = hf ? a.s[3] : a.s[2];
    const T* g = a.in[0];
    GRID_STRIDE(k, l.batch * l.row_chunks * l.cols) {
        const unsigned long long j = k % l.cols, q = k / l.cols;
        const unsigned long long b = q / l.row_chunks, c = q % l.row_chunks;
        unsigned long long hi = (c + 1) * AF_PART;
        if (hi > l.rows) hi = l.rows;
        double s = 0.0;
        for (unsigned long long i = c * AF_PART; i < hi; ++i) {
            s += af_sq(g[(b * l.rows + i) * l.cols + j], hf, eps1);
        }
        l.col_part[k] = s;
    }
}

// Column factor: thread k = b·cols + j folds its partials and updates c[k].
template <typename T>
__device__ void adafactor_cols(const Args<T>& a) {
    const AfLayout l = af_layout(a);
    const bool hf = a.s[0] != T(0);
    T* c = a.out[2];
    GRID_STRIDE(k, l.batch * l.cols) {
        const unsigned long long j = k % l.cols, b = k / l.cols;
        double s = 0.0;
        for (unsigned long long q = 0; q < l.row_chunks; ++q) {
            s += l.col_part[(b * l.row_chunks + q) * l.cols + j];
        }
        const T x = (T)(s / (double)l.rows);
        c[k] = hf ? a.s[1] * c[k] + a.s[2] * x : lerp(c[k], x, a.s[1]);
    }
}

// Row factor and its mean: block-stride over the batch matrices; block b folds the row
// partials of matrix b, updates its r and stores the mean of the new values.
template <typename T>
__device__ void adafactor_rows(const Args<T>& a) {
    __shared__ double acc[AF_THREADS];
    const AfLayout l = af_layout(a);
    const bool hf = a.s[0] != T(0);
    T* r = a.out[1];
    for (unsigned long long b = blockIdx.x; b < l.batch; b += gridDim.x) {
        double s = 0.0;
        for (unsigned long long i = threadIdx.x; i < l.rows; i += blockDim.x) {
            const unsigned long long k = b * l.rows + i;
            double rs = 0.0;
            for (unsigned long long q = 0; q < l.col_chunks; ++q) {
                rs += l.row_part[k * l.col_chunks + q];
            }
            const T x = (T)(rs / (double)l.cols);
            const T rk = hf ? a.s[1] * r[k] + a.s[2] * x : lerp(r[k], x, a.s[1]);
            r[k] = rk;
            s += (double)rk;
        }
        const double total = af_block_sum(s, acc);
        if (threadIdx.x == 0) l.mean[b] = total / (double)l.rows;
    }
}

// U at element k (after the second-moment update; full: from v[k]).
template <typename T>
__device__ __forceinline__ T af_u(const Args<T>& a, const AfLayout& l, unsigned long long k) {
    const bool hf = a.s[0] != T(0);
    const T gk = a.in[0][k];
    const T* rv = a.out[1];
    if (l.batch == 0) {
        if (hf) return T(1) / root(rv[k]) * gk;
        return a.s[4] * gk / root(max_of(rv[k], a.s[3]));
    }
    const unsigned long long row = k / l.cols, j = k % l.cols, b = row / l.rows;
    const T ck = a.out[2][b * l.cols + j];
    if (hf) {
        const T mean = (T)l.mean[b];
        const T row_f = T(1) / root(rv[row] / mean);
        const T col_f = T(1) / root(ck);
        return row_f * col_f * gk;
    }
    const T norm = max_of((T)l.mean[b], a.s[2]);
    const T v = rv[row] * ck / norm;
    return a.s[4] * gk / root(max_of(v, a.s[3]));
}

// Σp² and Σu² partials: block q sums chunk q. Full storage updates v here, before its U.
template <typename T>
__device__ void adafactor_sumsq(const Args<T>& a) {
    __shared__ double acc[AF_THREADS];
    const AfLayout l = af_layout(a);
    const bool hf = a.s[0] != T(0);
    const T* p = a.out[0];
    T* v = a.out[1];
    const T* g = a.in[0];
    const unsigned long long q = blockIdx.x, lo = q * AF_CHUNK;
    unsigned long long hi = lo + AF_CHUNK;
    if (hi > l.n) hi = l.n;
    double sp = 0.0, su = 0.0;
    for (unsigned long long k = lo + threadIdx.x; k < hi; k += blockDim.x) {
        const double pk = (double)p[k];
        sp += pk * pk;
        if (l.batch == 0) {
            if (hf) {
                const T gk = g[k];
                v[k] = a.s[1] * v[k] + a.s[2] * (gk * gk + a.s[3]);
            } else {
                const T gk = a.s[4] * g[k];
                v[k] = lerp(v[k], gk * gk, a.s[1]);
            }
        }
        const double u = (double)af_u(a, l, k);
        su += u * u;
    }
    const double tp = af_block_sum(sp, acc);
    const double tu = af_block_sum(su, acc);
    if (threadIdx.x == 0) {
        l.p_part[q] = tp;
        l.u_part[q] = tu;
    }
}

// The step's scalars from Σp² and Σu², in f64 (launched as adafactor_scale_f64 for either
// parameter dtype: it only touches the workspace, and out[0], HF's f64 RMS(p) state, when not
// null). One block. n, aux as the other launches.
// s: torch  variant = 0, eps2, rho, d, to_f32
//    HF     variant = 1, eps2, rho, clip_threshold, to_f32, weight_decay, scale_parameter
// to_f32 ≠ 0 rounds the stored scalars to f32 (the T::of of the twin for f32 parameters).
template <typename T>
__device__ void adafactor_scale(const Args<T>& a) {
    __shared__ double acc[AF_THREADS];
    const AfLayout l = af_layout(a);
    double sp = 0.0, su = 0.0;
    for (unsigned long long q = threadIdx.x; q < l.chunks; q += blockDim.x) {
        sp += l.p_part[q];
        su += l.u_part[q];
    }
    const double p_ss = af_block_sum(sp, acc);
    const double u_ss = af_block_sum(su, acc);
    if (threadIdx.x != 0) return;
    const bool hf = (double)a.s[0] != 0.0, to_f32 = (double)a.s[4] != 0.0;
    const double eps2 = (double)a.s[1], rho = (double)a.s[2], d = (double)a.s[3];
    const double sqrt_numel = sqrt((double)l.n);
    if (!hf) {
        const double alpha = fmax(eps2, sqrt(p_ss) / sqrt_numel) * rho;
        const double den = fmax(sqrt(u_ss) / (sqrt_numel * d), 1.0);
        const double s = -alpha / den;
        l.slots[0] = to_f32 ? (double)(float)s : s;
        return;
    }
    const double wd = (double)a.s[5];
    const double rms = sqrt(p_ss) / sqrt_numel;
    const double scale = (double)a.s[6] != 0.0 ? fmax(eps2, rms) : 1.0;
    const double lr_t = rho * scale;
    const double decay = -wd * lr_t;
    const double den = fmax(sqrt(u_ss) / sqrt_numel / d, 1.0);
    l.slots[0] = to_f32 ? (double)(float)lr_t : lr_t;
    l.slots[1] = to_f32 ? (double)(float)decay : decay;
    l.slots[2] = to_f32 ? (double)(float)den : den;
    l.slots[3] = rms;
    if (a.out[0]) a.out[0][0] = (T)rms;
}

// The update. torch: p ← p·decay + s·U. HF: U·lr_t/den through the momentum, coupled decay.
template <typename T>
__device__ void adafactor_apply(const Args<T>& a) {
    const AfLayout l = af_layout(a);
    const bool hf = a.s[0] != T(0);
    T* p = a.out[0];
    T* m = a.out[3];
    GRID_STRIDE(k, l.n) {
        const T u = af_u(a, l, k);
        if (!hf) {
            const T s = (T)l.slots[0];
            const T pk = a.s[6] != T(0) ? p[k] * a.s[5] : p[k];
            p[k] = pk + s * u;
            continue;
        }
        const T lr_t = (T)l.slots[0], decay = (T)l.slots[1], den = (T)l.slots[2];
        T step = u / den * lr_t;
        if (a.s[6] != T(0)) {
            const T mk = a.s[4] * m[k] + a.s[5] * step;
            m[k] = mk;
            step = mk;
        }
        T pk = p[k];
        if (a.s[7] != T(0)) pk = pk + decay * pk;
        p[k] = pk - step;
    }
}

ENTRY(adafactor_row_partials, adafactor_row_partials)
ENTRY(adafactor_col_partials, adafactor_col_partials)
ENTRY(adafactor_cols, adafactor_cols)
ENTRY_SYNC(adafactor_rows, adafactor_rows)
ENTRY_SYNC(adafactor_sumsq, adafactor_sumsq)
ENTRY_SYNC(adafactor_scale, adafactor_scale)
ENTRY(adafactor_apply, adafactor_apply)
