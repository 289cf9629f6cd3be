"""The CUDA C source of the fused GPU optimizer kernels: one table, one body per update rule.

Each body is the loop body of one element ``i``: exactly the operations of its optimizer's
xp rule, in the same order and the same dtype ``T``, written with the macros ``ADD SUB MUL
DIV SQRT`` (never ``+ - * /``). Per dtype the macros are CUDA's round-to-nearest intrinsics
(``__fadd_rn`` ... for float32, ``__dadd_rn`` ... for float64), which NVRTC never contracts
into a fused multiply-add; the module is compiled with ``--fmad=false`` besides, so nothing
else is contracted either. Every operation is then one correctly rounded IEEE operation, as in
NumPy, and the result is bit-identical to the NumPy rule. The helpers below copy NumPy's
``maximum``, ``sign`` and ``clip`` (NaN propagation, signed zeros).

One exception: Ftrl's ``pow`` (no IEEE basic operation) is computed in float64 and rounded
once to float32, which gives the correctly rounded float32 power (for float64, CUDA's ``pow``).
See ``fused_gpu.ftrl``.

tests/optim/gpu_kernel_harness.py compiles these same strings with gcc on the CPU (the
intrinsics defined as plain C operations) to check them against the NumPy rules.
"""

from __future__ import annotations

from typing import NamedTuple


class KernelSource(NamedTuple):
    """One rule: its arrays (in argument order; the first is the model variable), which of
    them are only read, its scalars (in the variable's dtype) and the loop body."""

    arrays: tuple[str, ...]
    reads: tuple[str, ...]
    scalars: tuple[str, ...]
    body: str


KERNELS: dict[str, KernelSource] = {
    # m += (g - m)*omb1; v += (g*g - v)*omb2; w -= (m*alpha)/(sqrt(v) + eps)
    "adam": KernelSource(
        ("w", "g", "m", "v"),
        ("g",),
        ("alpha", "omb1", "omb2", "eps"),
        """
        const T gi = g[i];
        const T mi = ADD(m[i], MUL(SUB(gi, m[i]), omb1));
        const T vi = ADD(v[i], MUL(SUB(MUL(gi, gi), v[i]), omb2));
        m[i] = mi;
        v[i] = vi;
        w[i] = SUB(w[i], DIV(MUL(mi, alpha), ADD(SQRT(vi), eps)));
        """,
    ),
    # As adam, with v_hat = maximum(v_hat, v) used in place of v.
    "adam_amsgrad": KernelSource(
        ("w", "g", "m", "v", "v_hat"),
        ("g",),
        ("alpha", "omb1", "omb2", "eps"),
        """
        const T gi = g[i];
        const T mi = ADD(m[i], MUL(SUB(gi, m[i]), omb1));
        const T vi = ADD(v[i], MUL(SUB(MUL(gi, gi), v[i]), omb2));
        const T vh = np_maximum(v_hat[i], vi);
        m[i] = mi;
        v[i] = vi;
        v_hat[i] = vh;
        w[i] = SUB(w[i], DIV(MUL(mi, alpha), ADD(SQRT(vh), eps)));
        """,
    ),
    # w -= g*lr
    "sgd": KernelSource(
        ("w", "g"),
        ("g",),
        ("lr",),
        """
        w[i] = SUB(w[i], MUL(g[i], lr));
        """,
    ),
    # m = m*mu - g*lr; w += m
    "sgd_momentum": KernelSource(
        ("w", "g", "m"),
        ("g",),
        ("mu", "lr"),
        """
        const T mi = SUB(MUL(m[i], mu), MUL(g[i], lr));
        m[i] = mi;
        w[i] = ADD(w[i], mi);
        """,
    ),
    # m = m*mu - g*lr; w += m*mu - g*lr (with the new m)
    "sgd_nesterov": KernelSource(
        ("w", "g", "m"),
        ("g",),
        ("mu", "lr"),
        """
        const T gl = MUL(g[i], lr);
        const T mi = SUB(MUL(m[i], mu), gl);
        m[i] = mi;
        w[i] = ADD(w[i], SUB(MUL(mi, mu), gl));
        """,
    ),
    # w = w - w*wd*lr (the base class's decoupled weight decay)
    "weight_decay": KernelSource(
        ("w",),
        (),
        ("wd", "lr"),
        """
        w[i] = SUB(w[i], MUL(MUL(w[i], wd), lr));
        """,
    ),
    # average = mu*average + (1 - mu)*w (the base class's EMA of the model variables)
    "ema": KernelSource(
        ("average", "w"),
        ("w",),
        ("mu", "one_minus_mu"),
        """
        average[i] = ADD(MUL(mu, average[i]), MUL(one_minus_mu, w[i]));
        """,
    ),
    # w -= lr*sign(m*b1 + g*(1 - b1)) with the old m; m = m*b2 + g*(1 - b2)
    "lion": KernelSource(
        ("w", "g", "m"),
        ("g",),
        ("lr", "beta_1", "one_minus_beta_1", "beta_2", "one_minus_beta_2"),
        """
        const T gi = g[i];
        const T mi = m[i];
        const T direction = np_sign(ADD(MUL(mi, beta_1), MUL(gi, one_minus_beta_1)));
        w[i] = SUB(w[i], MUL(lr, direction));
        m[i] = ADD(MUL(mi, beta_2), MUL(gi, one_minus_beta_2));
        """,
    ),
    # v = rho*v + (1 - rho)*g*g; w -= (lr*g)/sqrt(v + eps)
    "rmsprop": KernelSource(
        ("w", "g", "velocity"),
        ("g",),
        ("lr", "rho", "one_minus_rho", "eps"),
        """
        const T gi = g[i];
        const T vi = ADD(MUL(rho, velocity[i]), MUL(one_minus_rho, MUL(gi, gi)));
        velocity[i] = vi;
        w[i] = SUB(w[i], DIV(MUL(lr, gi), SQRT(ADD(vi, eps))));
        """,
    ),
    # As rmsprop, then mom = mu*mom + increment; w -= mom
    "rmsprop_momentum": KernelSource(
        ("w", "g", "velocity", "mom"),
        ("g",),
        ("lr", "rho", "one_minus_rho", "eps", "mu"),
        """
        const T gi = g[i];
        const T vi = ADD(MUL(rho, velocity[i]), MUL(one_minus_rho, MUL(gi, gi)));
        velocity[i] = vi;
        const T increment = DIV(MUL(lr, gi), SQRT(ADD(vi, eps)));
        const T mom_i = ADD(MUL(mu, mom[i]), increment);
        mom[i] = mom_i;
        w[i] = SUB(w[i], mom_i);
        """,
    ),
    # Centered: avg = rho*avg + (1 - rho)*g; w -= (lr*g)/sqrt(v - avg*avg + eps)
    "rmsprop_centered": KernelSource(
        ("w", "g", "velocity", "avg"),
        ("g",),
        ("lr", "rho", "one_minus_rho", "eps"),
        """
        const T gi = g[i];
        const T vi = ADD(MUL(rho, velocity[i]), MUL(one_minus_rho, MUL(gi, gi)));
        velocity[i] = vi;
        const T ai = ADD(MUL(rho, avg[i]), MUL(one_minus_rho, gi));
        avg[i] = ai;
        w[i] = SUB(w[i], DIV(MUL(lr, gi), SQRT(ADD(SUB(vi, MUL(ai, ai)), eps))));
        """,
    ),
    # Centered, with momentum.
    "rmsprop_centered_momentum": KernelSource(
        ("w", "g", "velocity", "avg", "mom"),
        ("g",),
        ("lr", "rho", "one_minus_rho", "eps", "mu"),
        """
        const T gi = g[i];
        const T vi = ADD(MUL(rho, velocity[i]), MUL(one_minus_rho, MUL(gi, gi)));
        velocity[i] = vi;
        const T ai = ADD(MUL(rho, avg[i]), MUL(one_minus_rho, gi));
        avg[i] = ai;
        const T increment = DIV(MUL(lr, gi), SQRT(ADD(SUB(vi, MUL(ai, ai)), eps)));
        const T mom_i = ADD(MUL(mu, mom[i]), increment);
        mom[i] = mom_i;
        w[i] = SUB(w[i], mom_i);
        """,
    ),
    # acc += g*g; w -= (lr*g)/sqrt(acc + eps)
    "adagrad": KernelSource(
        ("w", "g", "acc"),
        ("g",),
        ("lr", "eps"),
        """
        const T gi = g[i];
        const T ai = ADD(acc[i], MUL(gi, gi));
        acc[i] = ai;
        w[i] = SUB(w[i], DIV(MUL(lr, gi), SQRT(ADD(ai, eps))));
        """,
    ),
    # Eg = rho*Eg + (1-rho)*g*g; d = -(sqrt(Ex + eps)*g)/sqrt(Eg + eps) (old Ex);
    # Ex = rho*Ex + (1-rho)*d*d; w += lr*d
    "adadelta": KernelSource(
        ("w", "g", "grad_sq", "delta_sq"),
        ("g",),
        ("lr", "rho", "one_minus_rho", "eps"),
        """
        const T gi = g[i];
        const T eg = ADD(MUL(rho, grad_sq[i]), MUL(one_minus_rho, MUL(gi, gi)));
        grad_sq[i] = eg;
        const T ex = delta_sq[i];
        const T delta = -DIV(MUL(SQRT(ADD(ex, eps)), gi), SQRT(ADD(eg, eps)));
        delta_sq[i] = ADD(MUL(rho, ex), MUL(one_minus_rho, MUL(delta, delta)));
        w[i] = ADD(w[i], MUL(lr, delta));
        """,
    ),
    # m += (g - m)*omb1; u = maximum(b2*u, |g|); w -= (lr*m)/((1 - b1^t)*(u + eps))
    "adamax": KernelSource(
        ("w", "g", "m", "u"),
        ("g",),
        ("lr", "omb1", "beta_2", "one_minus_b1_power", "eps"),
        """
        const T gi = g[i];
        const T mi = ADD(m[i], MUL(SUB(gi, m[i]), omb1));
        m[i] = mi;
        const T ui = np_maximum(MUL(beta_2, u[i]), ABS(gi));
        u[i] = ui;
        w[i] = SUB(w[i], DIV(MUL(lr, mi), MUL(one_minus_b1_power, ADD(ui, eps))));
        """,
    ),
    # m += (g-m)(1-b1); v += (g*g-v)(1-b2);
    # w -= ((mu'*m)/(1-P') + ((1-mu)*g)/(1-P))*lr / (sqrt(v/(1-b2^t)) + eps)
    "nadam": KernelSource(
        ("w", "g", "m", "v"),
        ("g",),
        (
            "lr",
            "omb1",
            "omb2",
            "mu_next",
            "one_minus_product_next",
            "one_minus_mu_t",
            "one_minus_product",
            "one_minus_beta_2_power",
            "eps",
        ),
        """
        const T gi = g[i];
        const T mi = ADD(m[i], MUL(SUB(gi, m[i]), omb1));
        const T vi = ADD(v[i], MUL(SUB(MUL(gi, gi), v[i]), omb2));
        m[i] = mi;
        v[i] = vi;
        const T m_hat = ADD(DIV(MUL(mu_next, mi), one_minus_product_next),
                            DIV(MUL(one_minus_mu_t, gi), one_minus_product));
        const T v_hat = DIV(vi, one_minus_beta_2_power);
        w[i] = SUB(w[i], DIV(MUL(m_hat, lr), ADD(SQRT(v_hat), eps)));
        """,
    ),
    # n' = n + g*g; z += g + l2s2*w - ((n'^p - n^p)/lr)*w;
    # w = (clip(z, -l1, l1) - z)/(n'^p/lr + 2*l2); n = n'   (p = -learning_rate_power)
    "ftrl": KernelSource(
        ("w", "g", "accum", "linear"),
        ("g",),
        ("lr", "power", "l1", "neg_l1", "two_l2", "l2s2"),
        """
        const T gi = g[i];
        const T wi = w[i];
        const T ai = accum[i];
        const T shrunk = ADD(gi, MUL(l2s2, wi));
        const T new_accum = ADD(ai, MUL(gi, gi));
        const T new_accum_pow = POW(new_accum, power);
        const T sigma = DIV(SUB(new_accum_pow, POW(ai, power)), lr);
        const T z = ADD(linear[i], SUB(shrunk, MUL(sigma, wi)));
        linear[i] = z;
        const T quadratic = ADD(DIV(new_accum_pow, lr), two_l2);
        w[i] = DIV(SUB(np_clip(z, neg_l1, l1), z), quadratic);
        accum[i] = new_accum;
        """,
    ),
}

# The element type and the operation macros, per dtype.
DTYPE_HEADERS: dict[str, str] = {
    "float32": """
typedef float T;
#define ADD(a, b) __fadd_rn((a), (b))
#define SUB(a, b) __fsub_rn((a), (b))
#define MUL(a, b) __fmul_rn((a), (b))
#define DIV(a, b) __fdiv_rn((a), (b))
#define SQRT(a) __fsqrt_rn(a)
#define ABS(a) fabsf(a)
/* float64 pow rounded once: the correctly rounded float32 power. */
#define POW(a, b) ((float)pow((double)(a), (double)(b)))
""",
    "float64": """
typedef double T;
#define ADD(a, b) __dadd_rn((a), (b))
#define SUB(a, b) __dsub_rn((a), (b))
#define MUL(a, b) __dmul_rn((a), (b))
#define DIV(a, b) __ddiv_rn((a), (b))
#define SQRT(a) __dsqrt_rn(a)
#define ABS(a) fabs(a)
#define POW(a, b) pow((a), (b))
""",
}

# NumPy's semantics for the few non-arithmetic operations; PS_DEVICE is set by the wrapper.
HELPERS = """
/* np.maximum(a, b): NaN if either is NaN; b when they compare equal (as NumPy's SIMD loops). */
PS_DEVICE T np_maximum(T a, T b) { return (a > b || a != a) ? a : b; }
/* np.sign: -1, 0 (also for -0) or 1; NaN stays NaN. */
PS_DEVICE T np_sign(T x) {
    return x > (T)0 ? (T)1 : (x < (T)0 ? (T)-1 : (x == (T)0 ? (T)0 : x));
}
/* np.clip(x, lo, hi): a bound only when x is strictly outside it; NaN stays NaN. */
PS_DEVICE T np_clip(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
"""

_CUDA_PRELUDE = "#define PS_DEVICE __device__ __forceinline__\n"

# Compiler options: no contraction (beyond the intrinsics), IEEE division, square root and
# denormals; these are NVRTC's defaults except --fmad, spelled out so none can drift.
COMPILE_OPTIONS = ("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")


def function_name(name: str, dtype: str) -> str:
    """The C name of kernel ``name`` for ``dtype`` (``float32`` or ``float64``)."""
    return f"paramserve_{name}_{dtype}"


def parameters(kernel: KernelSource) -> str:
    """The C parameter list: arrays (``const`` when only read), scalars, the element count."""
    arrays = [f"{'const ' if a in kernel.reads else ''}T* {a}" for a in kernel.arrays]
    scalars = [f"const T {s}" for s in kernel.scalars]
    return ", ".join([*arrays, *scalars, "const long long n"])


def body(kernel: KernelSource, indent: str) -> str:
    """The loop body, re-indented."""
    lines = [line.strip() for line in kernel.body.strip().splitlines()]
    out, depth = [], 0
    for line in lines:
        # Continuation lines of a call keep one extra level.
        out.append(indent + ("    " if depth else "") + line)
        depth += line.count("(") - line.count(")")
    return "\n".join(out)


def cuda_source(dtype: str) -> str:
    """The CUDA module for ``dtype``: every kernel, each a grid-stride loop over ``n``."""
    parts = [_CUDA_PRELUDE, DTYPE_HEADERS[dtype], HELPERS]
    for name, kernel in KERNELS.items():
        parts.append(
            f'extern "C" __global__ void {function_name(name, dtype)}({parameters(kernel)}) {{\n'
            "    const long long stride = (long long)blockDim.x * gridDim.x;\n"
            "    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;\n"
            "         i += stride) {\n"
            f"{body(kernel, ' ' * 8)}\n"
            "    }\n"
            "}\n"
        )
    return "\n".join(parts)
