"""Conditionals and loops around gradients that stay fast on XLA:CPU.

XLA:CPU (jax/jaxlib 0.10) computes convolution gradients far more slowly when they
sit inside a conditional or a loop body than in the entry computation: its fast
convolution paths serve only the latter (jax-ml/jax#12868). Measured on the 2-core
CPU, a 4-conv network at [64, 16, 16, 64]: the filter gradient 98 ms plain, 5.3 s
inside `lax.cond`, `lax.scan` or `fori_loop`; the input gradient 41 ms against
121 ms inside `lax.scan` (forward passes and JVPs are unaffected). So on the CPU
these helpers trace straight-line code (both branches then a select; the loop
unrolled), and everywhere else the plain `lax.cond` / `lax.scan`, which skip
the untaken branch and keep one micro-batch's activations alive. The choice is
`lax.platform_dependent`'s: made when lowering, so one traced function serves both.
Values are the same either way (up to float rounding where XLA fuses differently).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp


def cond(pred: jax.Array, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
    """`lax.cond(pred, true_fn, false_fn, *operands)`; on the CPU both branches
    computed and selected with `jnp.where`, which sends a zero cotangent into the
    branch not taken (so, as with any `where`, a branch whose derivative is infinite
    there would give NaN: keep both branches smooth, as the R1 penalty is)."""
    def select(*ops):
        return jax.tree.map(lambda a, b: jnp.where(pred, a, b), true_fn(*ops), false_fn(*ops))

    def branch(*ops):
        return jax.lax.cond(pred, true_fn, false_fn, *ops)

    return jax.lax.platform_dependent(*operands, cpu=select, default=branch)


def scan(body: Callable, init: Any, xs: Any) -> tuple[Any, Any]:
    """`lax.scan(body, init, xs)` over the leading axis of `xs`; on the CPU the loop
    unrolled in Python (for a few iterations: the trace grows with their number)."""
    def unrolled(carry, xs):
        outs = []
        for k in range(jax.tree.leaves(xs)[0].shape[0]):
            carry, out = body(carry, jax.tree.map(lambda x: x[k], xs))
            outs.append(out)
        return carry, jax.tree.map(lambda *ys: jnp.stack(ys), *outs)

    return jax.lax.platform_dependent(init, xs, cpu=unrolled,
                                      default=lambda c, x: jax.lax.scan(body, c, x))
