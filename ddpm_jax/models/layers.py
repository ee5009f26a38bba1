"""Building blocks shared by the diffusion UNet and the noise-aware classifier.

Owns the timestep embedding, group normalisation with float32 statistics, dropout
(`nn.Dropout`'s masks from a hash XLA can fuse on a CPU), `gradient_boundary` (the
residual sum whose value and gradient XLA:CPU computes once), the residual block
(additive or adaptive-group-norm conditioning, optional BigGAN-style up/down-sampling),
plain up/down-sampling layers, multi-head self-attention over pixels and ADM's
attention pooling head, plus the architecture validation that names the offending
config field.

Two variants share these blocks and differ only where the papers differ:

* 'ddpm' (Ho et al. 2020, Appendix B; hojonathanho/diffusion): sinusoidal embedding
  [sin, cos] with frequencies exp(-log(10000) k / (d/2 - 1)); one attention head with
  separate q, k, v and output NIN (1x1) layers; GroupNorm epsilon 1e-6;
  Glorot-uniform ("fan_avg") initialisation; TensorFlow 'SAME' padding in the
  strided downsampling convolution.
* 'adm' (Dhariwal & Nichol 2021, Sec. 3; openai/guided-diffusion): embedding
  [cos, sin] with frequencies exp(-log(10000) k / (d/2)); one fused qkv projection
  and several heads (num_heads, or num_head_channels per head); GroupNorm epsilon
  1e-5; PyTorch's default fan-in uniform initialisation of the weights (biases
  start at zero, or, with `model.bias_init='torch'`, from the same uniform as
  PyTorch's: `torch_default_biases`); symmetric padding.

Both zero-initialise the last convolution of every residual branch and the
attention output projection, so every block starts as the identity.

All blocks compute in `dtype` (float32 or bfloat16) with float32 parameters;
normalisation statistics and the attention softmax are always float32.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ddpm_jax import parallel

VARIANTS = ('ddpm', 'adm')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
POOLS = ('attention', 'adaptive')

Dtype = Any


def get_dtype(name: str) -> Dtype:
    """Maps config.model.dtype to a JAX dtype.

    Args:
        name: 'float32' or 'bfloat16'.

    Returns:
        The jnp dtype.

    Raises:
        ValueError: for any other name.
    """
    if name not in DTYPES:
        raise ValueError(f'model.dtype must be one of {tuple(DTYPES)}, got {name!r}.')
    return DTYPES[name]


def timestep_embedding(t: jax.Array, dim: int, variant: str = 'adm',
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep embedding (Vaswani et al. 2017, Sec. 3.5; Ho et al. 2020).

    Args:
        t: [B] timesteps (integer or float; fractional values allowed).
        dim: embedding width (odd widths get a trailing zero column).
        variant: 'ddpm' gives [sin, cos] with frequencies
            exp(-log(max_period) * k / (dim/2 - 1)); 'adm' gives [cos, sin] with
            exp(-log(max_period) * k / (dim/2)).
        max_period: the longest period of the sinusoids.

    Returns:
        [B, dim] float32 embedding.
    """
    half = dim // 2
    k = jnp.arange(half, dtype=jnp.float32)
    if variant == 'ddpm':
        # DDPM's get_timestep_embedding (and score_sde's): the step log(P) / (half - 1)
        # in double precision, rounded to float32 once, times k.
        freqs = jnp.exp(k * jnp.float32(-math.log(max_period) / max(half - 1, 1)))
    else:  # guided-diffusion's: -log(P) (a float32 factor) * k / half.
        freqs = jnp.exp(jnp.float32(-math.log(max_period)) * k / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    if variant == 'ddpm':
        emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    else:
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


BIAS_INITS = ('zeros', 'torch')  # model.bias_init


def torch_default_biases(params: Any, rng: jax.Array) -> Any:
    """PyTorch's default bias initialisation on a parameter tree: every 'bias' beside a
    'kernel' that is not all zeros drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in
    the kernel's input size (all but its last axis: kh kw C_in for a convolution, C_in
    for a dense layer), as `nn.Conv2d` / `nn.Linear`'s `reset_parameters` leave them in
    ADM's and Improved DDPM's networks. Biases beside a zero kernel (the zero-initialised
    layers, `zero_module` in the references, which zeroes both) stay zero; the kernels
    and every other parameter are returned as they are. Each bias draws from `rng`
    folded with a hash of its path, so the result does not depend on the tree's order.

    Args:
        params: A Flax parameter tree.
        rng: A `jax.random` key.

    Returns:
        The tree with those biases redrawn (same structure, shapes and dtypes).
    """
    return _torch_uniform(params, rng, kernels=False)


def torch_default_init(params: Any, rng: jax.Array) -> Any:
    """PyTorch's default initialisation of every layer of a parameter tree, as modules
    that never zero a layer start (taming's and LDM's autoencoder): each 'kernel' and
    the 'bias' beside it drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), whatever they
    were (`kaiming_uniform_(a=sqrt(5))` is that bound for the weights, and the bias
    uses it too); every other parameter (norms, codebooks, embeddings) as it is.

    Args, Returns: as `torch_default_biases`.
    """
    return _torch_uniform(params, rng, kernels=True)


def _torch_uniform(params: Any, rng: jax.Array, *, kernels: bool) -> Any:
    flat = flax.traverse_util.flatten_dict(params)
    out = dict(flat)

    def draw(path, like, bound):
        key = jax.random.fold_in(rng, zlib.crc32('/'.join(map(str, path)).encode()))
        return jax.random.uniform(key, like.shape, jnp.float32, -bound, bound).astype(like.dtype)

    for path, value in flat.items():
        if path[-1] not in ('kernel', 'bias'):
            continue
        kernel = flat.get(path[:-1] + ('kernel',))
        if kernel is None:
            continue
        bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
        if kernels:
            out[path] = draw(path, value, bound)
        elif path[-1] == 'bias':
            out[path] = jnp.where(jnp.any(kernel != 0), draw(path, value, bound), value)
    return flax.traverse_util.unflatten_dict(out)


def default_init(variant: str) -> nn.initializers.Initializer:
    """Weight initialiser of each variant.

    DDPM uses variance scaling 1.0 with fan_avg and a uniform distribution; ADM keeps
    PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. scale 1/3 with fan_in
    (for the weights: biases start at zero in both variants, where PyTorch's layers
    draw theirs from the same uniform).

    Args:
        variant: 'ddpm' or 'adm'.

    Returns:
        A Flax initializer.
    """
    if variant == 'ddpm':
        return nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
    return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _epsilon(variant: str) -> float:
    # tf.contrib group_norm (DDPM) defaults to 1e-6, torch.nn.GroupNorm (ADM) to 1e-5.
    return 1e-6 if variant == 'ddpm' else 1e-5


def _group_mean(v: jax.Array, num_groups: int) -> jax.Array:
    """[B, *S, C] -> [B, G]: the mean over the spatial axes and each group's channels.

    Sums over the spatial axes first (a reduction that keeps the channel axis, which
    XLA vectorises along it), then over each group's few channels: XLA:CPU runs the
    one-step reduction over a [B, *S, G, C/G] view about 10x more slowly.
    """
    batch, channels = v.shape[0], v.shape[-1]
    per_channel = jnp.sum(v, axis=tuple(range(1, v.ndim - 1)))
    per_group = jnp.sum(per_channel.reshape(batch, num_groups, channels // num_groups), axis=-1)
    return per_group / (v.size // (batch * num_groups))


def _to_channels(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[B, G] -> [B, 1, ..., 1, C], each group's value repeated over its channels."""
    batch, groups, channels = shape[0], v.shape[-1], shape[-1]
    v = jnp.broadcast_to(v[:, :, None], (batch, groups, channels // groups))
    return v.reshape((batch,) + (1,) * (len(shape) - 2) + (channels,))


GROUP_NORM_STATISTICS = ('two_pass', 'one_pass')
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')
CONVOLUTION_ALGORITHMS = ('auto', 'direct', 'winograd')
WINOGRAD_OUTPUT = 'conv3x3_winograd'  # checkpoint_name of conv3x3_winograd's output.
WINOGRAD_VENDORS = ('AuthenticAMD', 'GenuineIntel')  # Where it was measured to pay.


def _environment_choice(name: str, allowed: Sequence[str]) -> str:
    """The environment variable `name` if set and not empty, else `allowed[0]`.

    Raises:
        ValueError: It is set to a value outside `allowed`.
    """
    choice = os.environ.get(name) or allowed[0]
    if choice not in allowed:
        raise ValueError(f'{name} must be one of {tuple(allowed)}, got {choice!r}.')
    return choice


def check_environment() -> None:
    """Checks DDPM_JAX_ATTENTION, DDPM_JAX_GROUP_NORM and DDPM_JAX_CONVOLUTION (read when
    the models are traced) up front, without starting JAX's backends (main.py, before
    anything runs).

    Raises:
        ValueError: One is set to a value it does not take.
    """
    _environment_choice('DDPM_JAX_ATTENTION', ATTENTION_IMPLEMENTATIONS)
    _environment_choice('DDPM_JAX_GROUP_NORM', GROUP_NORM_STATISTICS)
    _environment_choice('DDPM_JAX_CONVOLUTION', CONVOLUTION_ALGORITHMS)


def group_norm_statistics() -> str:
    """How `normalize_groups` computes each group's mean and variance: 'two_pass' (the
    default), or 'one_pass' where the environment variable DDPM_JAX_GROUP_NORM says so.

    'two_pass' reduces x for the mean, then (x - m)^2 for the variance: two passes
    over the activations, the second waiting on the first. 'one_pass' takes both sums
    of d = x - k in one pass, k each group's mean at the first spatial position (a
    value of the group, so near its mean): v = E[d^2] - E[d]^2, which does not cancel
    the way the unshifted E[x^2] - E[x]^2 does when |m| >> std; its rounding grows
    with (m - k)^2 / v (k 5.6 std from m: 3e-5 off float64 against 6e-7 two-pass, on
    outputs of order 1). On the CPU both take the same time (a [8, 32, 32, 128] norm,
    SiLU and their gradients: 4.0-4.3 ms each; the CIFAR-10 train step 1.47-1.51 s
    each); 'one_pass' is there for the accelerators, where the norms' reductions are
    memory-bound (17% of the CIFAR-10 step on an H200), to be chosen by benchmark
    (`bench/gpu_figures.sh`). Read at trace time.

    Raises:
        ValueError: DDPM_JAX_GROUP_NORM is set to something else.
    """
    return _environment_choice('DDPM_JAX_GROUP_NORM', GROUP_NORM_STATISTICS)


def _centred(x: jax.Array, num_groups: int, epsilon: float
             ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """(d, mu, r): x less a per-group centre, d's group mean ([B, G], or None where it is
    0 by construction) and 1/sqrt(v + epsilon) ([B, G]), so y = (d - mu) r.

    'two_pass' (`group_norm_statistics`) centres on the mean: d = x - m, v = mean(d^2).
    'one_pass' centres on each group's mean at the first spatial position, k, and takes
    both sums of d = x - k in one pass: v = E[d^2] - E[d]^2.
    """
    batch, channels = x.shape[0], x.shape[-1]
    if group_norm_statistics() == 'two_pass':
        d = x - _to_channels(_group_mean(x, num_groups), x.shape)
        return d, None, jax.lax.rsqrt(_group_mean(d * d, num_groups) + epsilon)
    first = x[(slice(None),) + (0,) * (x.ndim - 2)]  # [B, C]
    shift = jnp.mean(first.reshape(batch, num_groups, channels // num_groups), axis=-1)
    d = x - _to_channels(shift, x.shape)
    m1, m2 = _group_mean(d, num_groups), _group_mean(d * d, num_groups)
    return d, m1, jax.lax.rsqrt(jnp.maximum(m2 - m1 * m1, 0.0) + epsilon)


def _normalized(d: jax.Array, mu: jax.Array | None, inv_std: jax.Array) -> jax.Array:
    """y = (d - mu) r from `_centred`'s (d, mu, r)."""
    if mu is not None:
        d = d - _to_channels(mu, d.shape)
    return d * _to_channels(inv_std, d.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def normalize_groups(x: jax.Array, num_groups: int, epsilon: float) -> jax.Array:
    """Group normalisation of [B, *S, C] without the affine transform.

    y = (x - m) / sqrt(v + epsilon), with m and v the mean and the (biased) variance
    over the spatial axes and each group's C/G channels; the variance is the mean of
    (x - m)^2 (two passes), or of a shifted one-pass form (`group_norm_statistics`):
    never E[x^2] - E[x]^2, which loses precision when |m| >> std. Its
    derivative is the closed form dy = r (dx - mean(dx) - y mean(y dx)), r = 1/sqrt(v +
    epsilon) (a custom JVP, so forward mode, reverse mode by transposition, and
    higher orders all hold); XLA:CPU runs it and its gradient about 2x faster than
    `nn.GroupNorm`, which differentiates through the statistics op by op. With a
    per-channel scale and bias, use `group_norm`.

    Args:
        x: [B, *S, C], C divisible by num_groups.
        num_groups: channel groups G.
        epsilon: added to the variance.

    Returns:
        y: x's shape and dtype.
    """
    return _normalized(*_centred(x, num_groups, epsilon))


@normalize_groups.defjvp
def _normalize_groups_jvp(num_groups: int, epsilon: float, primals, tangents):
    (x,), (dx,) = primals, tangents
    d, mu, inv_std = _centred(x, num_groups, epsilon)
    y = _normalized(d, mu, inv_std)
    # mean(y) = 0, so the centred tangent's mean(y (dx - mean(dx))) is mean(y dx).
    dy = _to_channels(inv_std, x.shape) * (
        dx - _to_channels(_group_mean(dx, num_groups), x.shape)
        - y * _to_channels(_group_mean(y * dx, num_groups), x.shape))
    return y, dy


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               epsilon: float) -> jax.Array:
    """`normalize_groups(x, num_groups, epsilon) * scale + bias`, scale and bias [C].

    The same values and derivatives (a custom JVP: forward mode, reverse mode by
    transposition, higher orders), with the tangent written so that its transpose, the
    gradient, reduces the full-size arrays twice instead of four times: the output
    gradient g and g * d (d = x less the group centre, which the variance already
    writes out) are summed over space once each, per sample and channel, and every
    gradient (the bias', the scale's, and both group means in x's) is a sum of those
    [B, C] sums. Without the affine transform inside, reverse mode summed g and g * y
    per channel for the bias and scale, then g * scale * r and that times y per group
    for x, each over a product XLA:CPU writes out first (YNNPACK reduces only arrays
    in memory). GroupNorm + SiLU at [8, 32, 32, 128], forward and gradient: 11 passes
    over full-size arrays -> 7.

    Args:
        x: [B, *S, C], C divisible by num_groups.
        scale: [C].
        bias: [C].
        num_groups: channel groups G.
        epsilon: added to the variance.

    Returns:
        x's shape and dtype.
    """
    return _normalized(*_centred(x, num_groups, epsilon)) * scale + bias


@group_norm.defjvp
def _group_norm_jvp(num_groups: int, epsilon: float, primals, tangents):
    (x, scale, bias), (dx, dscale, dbias) = primals, tangents
    batch, channels = x.shape[0], x.shape[-1]
    spatial = tuple(range(1, x.ndim - 1))
    full = lambda v: v.reshape((batch,) + (1,) * len(spatial) + (channels,))  # [B, C]
    group_mean = lambda v: _to_channels(_group_mean(v, num_groups), v.shape)  # [B, C]
    d, mu, inv_std = _centred(x, num_groups, epsilon)
    y = _normalized(d, mu, inv_std)
    r = _to_channels(inv_std, (batch, channels))  # [B, C]
    rs = r * scale
    # dy = r (dx - mean(dx) - y mean(y dx)), mean(y dx) = r (mean(d dx) - mu mean(dx)),
    # and d(y s + b) = s dy + y ds + db, with every [B, C] term broadcast once: each
    # transposes to one spatial sum of g (or g * d). Dividing ds and db by an exact 1
    # keeps XLA from turning their sums over the batch of those [B, C] sums into sums
    # of the full-size arrays.
    one = _exactly_one(rs)
    dx_mean = jnp.mean(dx, axis=spatial)
    d_dx_mean = jnp.mean(d * dx, axis=spatial)
    if mu is not None:
        d_dx_mean = d_dx_mean - _to_channels(mu, (batch, channels)) * dx_mean
    u = jnp.broadcast_to(dbias, (batch, channels)) / one - rs * group_mean(dx_mean)
    w = r * (jnp.broadcast_to(dscale, (batch, channels)) / one - rs * group_mean(r * d_dx_mean))
    tangent = full(rs) * dx + full(u) + d * full(w)
    if mu is not None:
        tangent = tangent - full(_to_channels(mu, (batch, channels)) * w)
    return y * scale + bias, tangent


class _GroupNormAffine(nn.Module):
    """`group_norm` with nn.GroupNorm's parameters (`scale` ones, `bias` zeros, [C]), so
    checkpoints and imported weights carry over."""
    num_groups: int
    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f'GroupNorm: {channels} channels do not divide into '
                             f'{self.num_groups} groups.')
        scale = self.param('scale', nn.initializers.ones_init(), (channels,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros_init(), (channels,), jnp.float32)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon)


class GroupNorm(nn.Module):
    """GroupNorm whose statistics and affine transform are computed in float32.

    Attributes:
        num_groups: number of channel groups.
        variant: 'ddpm' or 'adm' (sets epsilon).
        dtype: dtype of the returned activations.
        epsilon: overrides the variant's epsilon when given.
    """
    num_groups: int
    variant: str = 'adm'
    dtype: Dtype = jnp.float32
    epsilon: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        epsilon = _epsilon(self.variant) if self.epsilon is None else self.epsilon
        h = _GroupNormAffine(self.num_groups, epsilon, name='norm')(x.astype(jnp.float32))
        return h.astype(self.dtype)


def pointwise_as_convolution() -> bool:
    """Whether channel products (`PointwiseConv`, `ChannelDense` on tokens) run as 1x1
    convolutions; else as matrix products.

    True in a process whose jits get `parallel.compiler_options()` (one CPU device:
    XLA's own convolutions). There the 1x1 convolution's input and filter gradients
    take 0.4-0.7x the product's, whose filter gradient XLA:CPU computes as a
    transposed copy then a dot (the UNets' skips: the DDPM CIFAR-10 train step ~3%
    faster; its attention block's forward and backward 18.9 -> 16.3 ms). With
    YNNPACK's convolutions (XLA's defaults: several CPU devices, or a jit without those
    options) the product is 1.3-2.3x faster than the convolution, so everywhere else
    they stay products. Read at trace time.
    """
    return parallel.compiler_options() is not None


def _channel_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., C] times kernel [C, F] over the channels: a 1x1 convolution on [B, H, W, C]
    or [B, T, C] where `pointwise_as_convolution()`, else a matrix product."""
    if pointwise_as_convolution() and x.ndim in (3, 4):
        x4 = x if x.ndim == 4 else x[:, :, None, :]
        y = jax.lax.conv_general_dilated(x4, kernel[None, None], (1, 1), 'VALID',
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return y if x.ndim == 4 else y[:, :, 0, :]
    return jnp.einsum('...c,cf->...f', x, kernel)


def _exactly_one(x: jax.Array) -> jax.Array:
    """1.0 of x's shape and dtype, for every x (NaN and infinities too), computed from x
    so that XLA cannot fold it."""
    return 1 + jnp.isnan(x).astype(x.dtype) * 0


def gradient_boundary(x: jax.Array) -> jax.Array:
    """x, unchanged; on a CPU, x and its gradient each become one array that XLA
    computes once.

    A residual network's gradient flows back through every block's skip connection:
    the gradient at a block's input is an elementwise function of the gradient at its
    output, the group norms' gradient terms and the convolutions' input gradients, so
    along a level's chain of blocks each is an elementwise function of all the later
    ones. XLA:CPU fuses such cheap producers into every consumer that can take them
    (the filter gradients' layout transposes, the norms' reductions) instead of
    computing them once, so each consumer recomputed the chain back to the level's
    end: loop fusions of up to 100 operands (451 ops) in DDPM++'s train step; its
    first-level transposes took 7-20 ms each for what a plain transpose does in 0.3 ms.
    The forward's residual sums form the same kind of chain (DDPM++'s attention
    projections' filter gradients each recomputed their level's sums, 33 operands).
    Here x is divided by an exact 1 computed at run time, so its tangent, and
    transposed its gradient, are divided too: each chain ends at a division, which XLA
    does not duplicate into consumers, so it writes the value and the gradient once and
    every consumer reads them (largest such fusions: 20 operands in DDPM++'s step). The
    values are the same, NaN, infinities and signed zeros included (subnormals flush
    to zero, as in all of XLA:CPU's arithmetic). Used at the end of every residual
    block and attention block. Elsewhere than on a CPU, x is returned as it is. Read
    at trace time.
    """
    if jax.default_backend() != 'cpu':
        return x
    return x / _exactly_one(x)


class ChannelDense(nn.Module):
    """nn.Dense over the last axis (`_channel_product`): the same parameters (`kernel`
    [C, F], `bias` [F] unless `use_bias` is False, the same initialisers) and numbers to
    float32 rounding."""
    features: int
    kernel_init: Any
    dtype: Dtype
    use_bias: bool = True
    kernel_prefix = ()  # Leading kernel axes of size 1 (PointwiseConv: nn.Conv's).

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.features)
        kernel = self.param('kernel', self.kernel_init, self.kernel_prefix + shape,
                            jnp.float32)
        if not self.use_bias:
            x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
            return _channel_product(x, kernel.reshape(shape))
        bias = self.param('bias', nn.initializers.zeros_init(), (self.features,),
                          jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return _channel_product(x, kernel.reshape(shape)) + bias


class PointwiseConv(ChannelDense):
    """A 1x1 convolution of [B, H, W, C]: nn.Conv's parameters (`kernel` [1, 1, C, F],
    `bias` [F], the same initialisers), so checkpoints and imported weights do not
    change; the numbers agree with nn.Conv's to float32 rounding."""
    kernel_prefix = (1, 1)


@functools.cache
def cpu_vendor(cpuinfo: str = '/proc/cpuinfo') -> str:
    """The host CPU's vendor as /proc/cpuinfo names it ('AuthenticAMD', 'GenuineIntel'),
    or '' where there is no such file (not Linux) or it names none."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == 'vendor_id':
                    return value.strip()
    except OSError:
        pass
    return ''


def convolution_algorithm() -> str:
    """How the models' 3x3 stride-1 convolutions run: 'winograd' (`conv3x3_winograd`,
    where `winograd_pays` for the shape on this CPU) in a process whose jits get
    `parallel.compiler_options()` (one CPU device) on an AMD or Intel CPU, else 'direct'
    (XLA's convolution). The environment variable DDPM_JAX_CONVOLUTION='direct' or
    'winograd' overrides the choice for the whole process; 'winograd' takes every
    float32 convolution of even height and width, whatever its size (to test it, or to
    compare). Read at trace time.

    Raises:
        ValueError: DDPM_JAX_CONVOLUTION is set to something else.
    """
    choice = _environment_choice('DDPM_JAX_CONVOLUTION', CONVOLUTION_ALGORITHMS)
    return _automatic_algorithm() if choice == 'auto' else choice


def _automatic_algorithm() -> str:
    """convolution_algorithm() under DDPM_JAX_CONVOLUTION=auto."""
    if parallel.compiler_options() is not None and cpu_vendor() in WINOGRAD_VENDORS:
        return 'winograd'
    return 'direct'


def winograd_pays(shape: Sequence[int], features: int, vendor: str) -> bool:
    """Whether `conv3x3_winograd` of an input [B, H, W, C] to `features` channels beats
    XLA:CPU's own convolution in the train step on a CPU of this vendor
    (`cpu_vendor()`): both channel counts >= 128, and T C F >= 2^24 (T = B H W / 4
    tiles) or both >= 256 and T >= 128; on an Intel CPU also T <= 512. Never for other
    vendors (not measured).

    Measured on 2-core machines, jax 0.10.2, float32 (README, "Winograd's convolutions
    on a CPU"). An AMD EPYC (AVX-512 on 256-bit units): 1.2-1.5x from 128 channels at
    [8, 32, 32, 128] to [8, 8, 8, 512] (shapes of the CIFAR-10 networks at batch 8),
    level at [8, 4, 4, 256] (T = 32), 0.85-0.97x at 128 channels with T <= 512,
    0.7-0.9x at 64 channels, 0.45x from or to 3 channels: with fewer channels the
    transforms outweigh the saving. An Intel Xeon (AVX-512 on two 512-bit FMA units a
    core), whose own convolutions run near its peak, both gradients: 1.4x at [8, 16,
    16, 128] -> 256 and [2, 32, 32, 128] -> 128 (T = 512), 1.13-1.24x at [8, 8, 8, 256]
    and [8, 8, 8, 512] -> 256 (T = 128), but 0.5-0.8x from T = 2048 ([8, 32, 32, 128],
    [32, 16, 16, 256]; presumably its transformed input, 16 T C floats, outgrowing the
    caches); with Winograd at every shape above, the train steps lost 3%.
    """
    batch, height, width, channels = shape
    tiles, least = batch * height * width // 4, min(channels, features)
    if vendor not in WINOGRAD_VENDORS:
        return False
    wide = least >= 128 and (tiles * channels * features >= 2**24
                             or (least >= 256 and tiles >= 128))
    return wide and (vendor == 'AuthenticAMD' or tiles <= 512)


def _tile_phases(p: jax.Array, n: int) -> tuple[jax.Array, ...]:
    """p [B, 2n + 2, ...] -> its rows 2i, 2i + 1, 2i + 2, 2i + 3 for i < n: the four
    rows of n tiles of height 4 overlapping by 2, as four [B, n, ...] arrays."""
    pairs = p.reshape(p.shape[0], n + 1, 2, *p.shape[2:])
    return pairs[:, :n, 0], pairs[:, :n, 1], pairs[:, 1:, 0], pairs[:, 1:, 1]


def _winograd_bt(d0, d1, d2, d3):
    """B^T of F(2, 3) applied to four rows (Lavin & Gray 2016)."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@jax.custom_jvp
def _stack_in_place(arrays: tuple[jax.Array, ...]) -> jax.Array:
    """jnp.stack(arrays), written as updates of one buffer: XLA:CPU computes each part
    straight into its slice (a fused concatenation selects among its operands element
    by element: 2.65 against 2.15 ms for Winograd's input transform at [8, 32, 32,
    128]). The tangent is a plain stack, whose transpose is slices (the chain of
    updates transposes to a zeroed copy of the whole gradient per part)."""
    out = jnp.zeros((len(arrays),) + arrays[0].shape, arrays[0].dtype)
    for i, a in enumerate(arrays):
        out = jax.lax.dynamic_update_slice(out, a[None], (i,) + (0,) * a.ndim)
    return out


@_stack_in_place.defjvp
def _stack_in_place_jvp(primals, tangents):
    (arrays,), (dots,) = primals, tangents
    return _stack_in_place(arrays), jnp.stack(dots)


def winograd_input_transform(x: jax.Array) -> jax.Array:
    """[B, H, W, C] (H, W even) -> V [16, T, C]: B^T d B of each 4x4 tile d of x padded by
    1, the tiles at stride 2 (T = B H W / 4), the 16 entries row-major."""
    batch, height, width, channels = x.shape
    h, w = height // 2, width // 2
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    parts = []
    for rows in _winograd_bt(*_tile_phases(p, h)):  # [B, h, W + 2, C] each
        cols = _tile_phases(jnp.swapaxes(rows, 1, 2), w)
        parts += [v.reshape(batch * h * w, channels)
                  for v in _winograd_bt(*(jnp.swapaxes(c, 1, 2) for c in cols))]
    return _stack_in_place(tuple(parts))


def winograd_kernel_transform(kernel: jax.Array) -> jax.Array:
    """[3, 3, C, F] -> U [16, C, F]: G g G^T of F(2, 3), entries row-major."""
    def g(r0, r1, r2):
        return r0, (r0 + r1 + r2) * 0.5, (r0 - r1 + r2) * 0.5, r2
    return jnp.stack([u for rows in g(*kernel) for u in g(*rows)])


def winograd_output_transform(m: jax.Array, shape: Sequence[int]) -> jax.Array:
    """M [16, T, F] -> [B, H, W, F]: A^T M A of each tile, its 2x2 outputs in place."""
    batch, height, width = shape[:3]
    h, w = height // 2, width // 2
    m = m.reshape(4, 4, batch, h, w, m.shape[-1])

    def a(m0, m1, m2, m3):  # A^T of F(2, 3).
        return m0 + m1 + m2, m1 - m2 - m3
    rows = a(m[0], m[1], m[2], m[3])  # [4, B, h, w, F] each: A^T over the first index.
    out = [a(r[0], r[1], r[2], r[3]) for r in rows]  # out[i][j]
    y = jnp.stack([jnp.stack(out[i], axis=3) for i in range(2)], axis=2)
    return y.reshape(batch, height, width, y.shape[-1])


def conv3x3_winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 3x3 stride-1 convolution of x [B, H, W, C] (H, W even) padded by 1 with
    kernel [3, 3, C, F] (HWIO): Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray
    2016), 16 products per 2x2 outputs instead of 36.

    Each 4x4 tile of the padded input (stride 2) is transformed, B^T d B, the kernel
    G g G^T, and the 16 entries multiplied over the channels as one batched matrix
    product [16, T, C] x [16, C, F]; A^T M A gives each tile's four outputs. B and A
    hold only 0 and +-1, G halves: the result equals the direct convolution to float32
    rounding (1e-6 relative at 128-512 channels). Differentiable in both modes;
    reverse mode gives both gradients as batched products of the same shape (the input
    gradient through the transposed transforms). Keeps V [16, T, C], four times x, for
    the filter gradient. The output is named WINOGRAD_OUTPUT for remat policies
    (`unet._save_convs` keeps it, as it keeps convolutions' outputs).
    """
    v = winograd_input_transform(x)
    m = jnp.einsum('ntc,ncf->ntf', v, winograd_kernel_transform(kernel))
    return checkpoint_name(winograd_output_transform(m, x.shape), WINOGRAD_OUTPUT)


def _is_3x3_same(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count, batch_group_count) -> bool:
    """Whether a conv_general_dilated call is an NHWC / HWIO 3x3 stride-1 convolution
    padded by 1 of even height and width, in float32."""
    ones = lambda v: v is None or tuple(v) == (1, 1)
    if not (lhs.ndim == 4 and rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
            and ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
            and batch_group_count == 1 and not isinstance(padding, str)
            and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
            and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0
            and lhs.dtype == rhs.dtype == jnp.float32):
        return False
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
    return jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None,
                         preferred_element_type=None) -> jax.Array:
    """`jax.lax.conv_general_dilated`, or `conv3x3_winograd` for a 3x3 stride-1
    convolution padded by 1 where `convolution_algorithm()` is 'winograd' (and, in
    'auto', `winograd_pays`). What the models' 3x3 convolutions (`conv`) use."""
    if preferred_element_type is None and _is_3x3_same(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, batch_group_count):
        choice = _environment_choice('DDPM_JAX_CONVOLUTION', CONVOLUTION_ALGORITHMS)
        if choice == 'winograd' or (
                choice == 'auto' and _automatic_algorithm() == 'winograd'
                and winograd_pays(lhs.shape, rhs.shape[-1], cpu_vendor())):
            return conv3x3_winograd(lhs, rhs)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)


def conv(features: int, variant: str, dtype: Dtype, *, kernel: int = 3, stride: int = 1,
         zero_init: bool = False, name: str | None = None) -> nn.Module:
    """A square convolution with the variant's padding and initialisation.

    Args:
        features: output channels.
        variant: 'ddpm' or 'adm'.
        dtype: compute dtype (parameters are float32).
        kernel: kernel side (1 is a NIN layer: a `PointwiseConv`).
        stride: spatial stride.
        zero_init: zero kernel (residual branch ends, output layer).
        name: submodule name.

    Returns:
        An unbound nn.Conv (convolving through `conv_general_dilated`: Winograd's
        algorithm where it pays), or `PointwiseConv` for a 1x1 kernel of stride 1.
    """
    init = nn.initializers.zeros_init() if zero_init else default_init(variant)
    if kernel == 1 and stride == 1:
        return PointwiseConv(features, init, dtype, name=name)
    if kernel == 1:
        padding = 'VALID'
    elif stride == 1 or variant == 'adm':
        padding = ((kernel // 2, kernel // 2),) * 2
    else:
        padding = 'SAME'  # TensorFlow's asymmetric (0, 1) padding for stride 2 (DDPM).
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   kernel_init=init, dtype=dtype, param_dtype=jnp.float32, name=name,
                   conv_general_dilated=conv_general_dilated)


def dense(features: int, variant: str, dtype: Dtype, *, zero_init: bool = False,
          use_bias: bool = True, name: str | None = None) -> ChannelDense:
    """A dense layer with the variant's initialisation (see `conv`)."""
    init = nn.initializers.zeros_init() if zero_init else default_init(variant)
    return ChannelDense(features, init, dtype, use_bias=use_bias, name=name)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of [B, H, W, C] to [B, 2H, 2W, C]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsample_bilinear(x: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of [B, h, w, C] to [B, size, size, C] with half-pixel centres.

    PyTorch's `F.interpolate(mode='bilinear', align_corners=False)`, which ADM's
    super-resolution model applies to its low-resolution input: output pixel i samples
    the input at max(0, (i + 0.5) h / size - 0.5), between the two nearest pixels
    (the last one repeated at the border). Computed in float32.
    """
    def weights(n_in: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        src = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (n_in / size) - 0.5
        src = jnp.maximum(src, 0.0)
        lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
        hi = jnp.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo.astype(jnp.float32)

    x = x.astype(jnp.float32)
    lo, hi, frac = weights(x.shape[2])  # Along the width first, as PyTorch.
    x = x[:, :, lo] * (1 - frac)[None, None, :, None] + x[:, :, hi] * frac[None, None, :, None]
    lo, hi, frac = weights(x.shape[1])
    return x[:, lo] * (1 - frac)[None, :, None, None] + x[:, hi] * frac[None, :, None, None]


def avg_pool_2x(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2 of [B, H, W, C] to [B, H/2, W/2, C]."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Halves the resolution: strided 3x3 convolution or 2x2 average pooling.

    Attributes:
        out_channels: output channels (must equal the input's without a conv).
        use_conv: strided convolution (config.model.conv_resample) or average pool.
        variant: 'ddpm' or 'adm'.
        dtype: compute dtype.
    """
    out_channels: int
    use_conv: bool = True
    variant: str = 'adm'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return conv(self.out_channels, self.variant, self.dtype, stride=2,
                        name='conv')(x)
        return avg_pool_2x(x)


class Upsample(nn.Module):
    """Doubles the resolution: nearest-neighbour upsampling, then optionally a 3x3 conv.

    Attributes:
        out_channels: output channels (used with the convolution).
        use_conv: follow the upsampling by a convolution (config.model.conv_resample).
        variant: 'ddpm' or 'adm'.
        dtype: compute dtype.
    """
    out_channels: int
    use_conv: bool = True
    variant: str = 'adm'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest(x)
        if self.use_conv:
            x = conv(self.out_channels, self.variant, self.dtype, name='conv')(x)
        return x


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
    return (x << jnp.uint32(r)) | (x >> jnp.uint32(32 - r))


def _threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as plain elementwise ops.

    Args:
        key: uint32[2], the key words.
        x0, x1: uint32 arrays of one shape, the two counter words.

    Returns:
        The two uint32 output words, each of the counters' shape.
    """
    ks = (key[0], key[1], key[0] ^ key[1] ^ jnp.uint32(_THREEFRY_PARITY))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotate_left(x1, r)
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def _fused_bernoulli_applies(key: jax.Array, shape: Sequence[int]) -> bool:
    """Whether `bernoulli` can reproduce `jax.random.bernoulli` for this key."""
    return (str(jax.random.key_impl(key)) == 'threefry2x32'
            and jax.config.jax_threefry_partitionable
            and not jax.config.jax_enable_x64  # p would be float64, 52-bit uniforms
            and math.prod(shape) < 2 ** 32)    # one counter word


def bernoulli(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
    """`jax.random.bernoulli(key, p, shape)`, bit for bit, as one elementwise fusion.

    JAX lowers its threefry hash on a CPU as a rolled loop of five round groups, each
    a pass over the counters in memory (on GPUs and TPUs it unrolls it). Here the
    same hash of the same counters (each element's row-major index, JAX's
    partitionable threefry) is written out round by round, so XLA fuses the hash,
    the float32 uniform and the comparison into one loop: a dropout mask for
    [8, 32, 32, 256] takes 2.3 instead of 11 ms on a 2-core CPU. Falls back to
    `jax.random.bernoulli` wherever the two streams could differ: other PRNG
    implementations, `jax_threefry_partitionable` off, 64-bit mode, or 2^32
    elements or more.

    Args:
        key: a PRNG key (typed or raw uint32[2]).
        p: the probability of True (a Python float).
        shape: the mask's shape.

    Returns:
        A boolean array of `shape`.
    """
    shape = tuple(shape)
    if not _fused_bernoulli_applies(key, shape):
        return jax.random.bernoulli(key, p, shape)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    hi, lo = _threefry2x32(jax.random.key_data(key), jnp.zeros(shape, jnp.uint32), index)
    bits = hi ^ lo
    # jax.random.uniform's float32 in [0, 1): 23 random mantissa bits under 1.0's
    # exponent, minus 1.
    one = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000),
                                       jnp.float32)
    return one - jnp.float32(1.0) < jnp.float32(p)


class Dropout(nn.Module):
    """`nn.Dropout` (no broadcast dimensions) with the mask from `bernoulli`.

    The same outputs as `nn.Dropout` bit for bit, in the same place of the rng tree
    (Flax names both 'Dropout_<n>'), only faster on a CPU.

    Attributes:
        rate: the probability of zeroing an element.
        deterministic: return the inputs unchanged (inference).
    """
    rate: float
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.rate == 0.0 or self.deterministic:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        mask = bernoulli(self.make_rng('dropout'), keep, x.shape)
        return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class ResBlock(nn.Module):
    """Residual block conditioned on the (time + class) embedding.

    h = conv(silu(norm(x))); then either h + dense(silu(emb)) followed by
    silu(norm(.)) (Ho et al. 2020), or adaptive group norm
    silu(norm(h) * (1 + scale) + shift) with (scale, shift) = dense(silu(emb))
    (Dhariwal & Nichol 2021, Sec. 3, "AdaGN"); then dropout and a zero-initialised
    conv. With `up`/`down` the block also resamples both branches without
    parameters (BigGAN, Brock et al. 2019). The skip is a 1x1 conv when the channels
    change.

    Attributes:
        out_channels: output channels.
        num_groups: GroupNorm groups.
        dropout: dropout rate before the last conv.
        use_scale_shift_norm: AdaGN conditioning.
        up: upsample 2x inside the block.
        down: downsample 2x inside the block.
        deterministic: disable dropout (inference).
        variant: 'ddpm' or 'adm'.
        dtype: compute dtype.
    """
    out_channels: int
    num_groups: int = 32
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    deterministic: bool = True
    variant: str = 'adm'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """Applies the block.

        Args:
            x: [B, H, W, C] activations.
            emb: [B, E] conditioning embedding.

        Returns:
            [B, H', W', out_channels] with H' = 2H (up), H/2 (down) or H.
        """
        x = x.astype(self.dtype)
        h = nn.silu(GroupNorm(self.num_groups, self.variant, self.dtype, name='in_norm')(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool_2x(h), avg_pool_2x(x)
        h = conv(self.out_channels, self.variant, self.dtype, name='in_conv')(h)

        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = dense(emb_width, self.variant, self.dtype, name='emb_proj')(nn.silu(emb))
        emb_out = emb_out.astype(self.dtype)[:, None, None, :]  # [B, 1, 1, E']
        out_norm = GroupNorm(self.num_groups, self.variant, self.dtype, name='out_norm')
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        h = nn.silu(h)
        if self.dropout > 0:
            h = Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = conv(self.out_channels, self.variant, self.dtype, zero_init=True,
                 name='out_conv')(h)

        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, self.variant, self.dtype, kernel=1, name='skip')(x)
        return gradient_boundary(x + h)


def num_attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention layer: channels // num_head_channels, or num_heads."""
    return num_heads if num_head_channels == -1 else channels // num_head_channels


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all pixels (Wang et al. 2018 non-local).

    'ddpm' has one head with separate q, k, v and proj NIN layers (Ho et al. 2020);
    'adm' a fused qkv projection and several heads (Dhariwal & Nichol 2021, Sec. 3).
    The output projection is zero-initialised.

    Attributes:
        num_heads: heads when num_head_channels == -1.
        num_head_channels: fixed channels per head (-1: use num_heads).
        num_groups: GroupNorm groups.
        variant: 'ddpm' or 'adm'.
        dtype: compute dtype.
        legacy_qkv_order: 'adm' only. False splits the fused qkv output into q, k, v
            and then each into heads (guided-diffusion's QKVAttention); True splits it
            into heads first, each head's slice holding its q, k, v (QKVAttentionLegacy,
            used by every released ADM and Improved DDPM model except 64x64_diffusion.pt).
    """
    num_heads: int = 1
    num_head_channels: int = -1
    num_groups: int = 32
    variant: str = 'adm'
    dtype: Dtype = jnp.float32
    legacy_qkv_order: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block.

        Args:
            x: [B, H, W, C] activations.

        Returns:
            [B, H, W, C].
        """
        x = x.astype(self.dtype)
        b, height, width, c = x.shape
        heads = num_attention_heads(c, self.num_heads, self.num_head_channels)
        h = GroupNorm(self.num_groups, self.variant, self.dtype, name='norm')(x)
        h = h.reshape(b, height * width, c)  # [B, T, C]
        split = lambda a: a.reshape(b, height * width, heads, -1)  # [B, T, N, D or 3D]
        if self.variant == 'ddpm':
            q = dense(c, self.variant, self.dtype, name='q')(h)
            k = dense(c, self.variant, self.dtype, name='k')(h)
            v = dense(c, self.variant, self.dtype, name='v')(h)
            q, k, v = split(q), split(k), split(v)
        else:
            qkv = dense(3 * c, self.variant, self.dtype, name='qkv')(h)
            if self.legacy_qkv_order:  # Channels [3Dn, 3D(n+1)) are head n's q, k, v.
                q, k, v = jnp.split(split(qkv), 3, axis=-1)
            else:
                q, k, v = (split(a) for a in jnp.split(qkv, 3, axis=-1))
        h = attention(q, k, v).reshape(b, height * width, c)
        h = dense(c, self.variant, self.dtype, zero_init=True, name='proj_out')(h)
        return gradient_boundary(x + h.reshape(b, height, width, c))


class AttentionPool2d(nn.Module):
    """ADM's attention pooling head (Dhariwal & Nichol 2021, App. F; CLIP, Radford 2021).

    The mean token is prepended to the flattened pixels, a learned positional
    embedding is added, and the mean token attends to all tokens; its output is
    projected to `out_features`.

    Attributes:
        out_features: output width (number of classes).
        num_heads: heads when num_head_channels == -1.
        num_head_channels: channels per head (-1: use num_heads).
        dtype: compute dtype.
    """
    out_features: int
    num_heads: int = 1
    num_head_channels: int = -1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Pools [B, H, W, C] to [B, out_features]."""
        b, height, width, c = x.shape
        heads = num_attention_heads(c, self.num_heads, self.num_head_channels)
        tokens = x.reshape(b, height * width, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        pos = self.param('positional_embedding', nn.initializers.normal(c ** -0.5),
                         (height * width + 1, c), jnp.float32)
        tokens = (tokens + pos).astype(self.dtype)  # [B, T+1, C]
        qkv = dense(3 * c, 'adm', self.dtype, name='qkv')(tokens)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q = q[:, :1]  # Only the mean token's output is used.
        split = lambda a: a.reshape(b, a.shape[1], heads, c // heads)
        h = jax.nn.dot_product_attention(split(q), split(k), split(v)).reshape(b, c)
        return dense(self.out_features, 'adm', self.dtype, name='c_proj')(h)


def attention_implementation(dtype: Any, head_dim: int) -> str:
    """The `jax.nn.dot_product_attention` implementation for inputs of `dtype`.

    'cudnn' (cuDNN's fused flash attention) on a GPU for bfloat16 / float16 inputs with
    a head dim that is a multiple of 8 and at most 256, else 'xla' (float32 models, the
    CPU, TPUs). The environment variable DDPM_JAX_ATTENTION='xla' or 'cudnn' overrides
    the choice for the whole process (to compare the two, or to step round a cuDNN
    that rejects a shape at compile time).

    Raises:
        ValueError: DDPM_JAX_ATTENTION is set to something else.
    """
    choice = _environment_choice('DDPM_JAX_ATTENTION', ATTENTION_IMPLEMENTATIONS)
    if choice != 'auto':
        return choice
    fused = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
             and head_dim % 8 == 0 and head_dim <= 256)
    return 'cudnn' if fused and jax.default_backend() == 'gpu' else 'xla'


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax(q k^T / sqrt(D)) v over [B, T, N, D] queries and [B, S, N, D] keys and
    values (`jax.nn.dot_product_attention`; `attention_implementation` picks the
    kernel). Where cuDNN turns the shapes down while tracing (an older cuDNN, an
    unsupported GPU), XLA's implementation is used.
    """
    implementation = attention_implementation(q.dtype, q.shape[-1])
    if implementation == 'cudnn' and os.environ.get('DDPM_JAX_ATTENTION') != 'cudnn':
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
        except (NotImplementedError, RuntimeError, ValueError):
            implementation = 'xla'
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def level_channels(base_channels: int, channel_mult: Sequence[float]) -> list[int]:
    """Channels of each resolution level: int(mult * base_channels)."""
    return [int(m * base_channels) for m in channel_mult]


def check_levels(arch: Any) -> None:
    """The level fields every network shares (dtype, channel_mult, num_res_blocks,
    dropout), naming the config field."""
    get_dtype(arch.dtype)
    if not arch.channel_mult:
        raise ValueError('model.channel_mult must not be empty.')
    if arch.num_res_blocks < 1:
        raise ValueError(f'model.num_res_blocks must be >= 1, got {arch.num_res_blocks}.')
    if not 0.0 <= arch.dropout < 1.0:
        raise ValueError(f'model.dropout must be in [0, 1), got {arch.dropout}.')


def level_resolutions(arch: Any, image_size: int) -> list[int]:
    """The side of each level at `image_size`, after checking that the levels can halve
    it and that every attention resolution occurs (ValueError naming the field)."""
    levels = len(arch.channel_mult)
    factor = 2 ** (levels - 1)
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f'data.image_size={image_size} is not divisible by the total downsampling '
            f'{factor} of {levels} levels (model.channel_mult).')
    resolutions = [image_size // 2 ** level for level in range(levels)]
    unknown = sorted(set(arch.attention_resolutions) - set(resolutions))
    if unknown:
        raise ValueError(
            f'model.attention_resolutions {unknown} never occur: the resolutions at '
            f'data.image_size={image_size} are {resolutions}.')
    return resolutions


def check_architecture(arch: Any, image_size: int | None = None) -> None:
    """Validates UNet/classifier hyperparameters, naming the offending config field.

    Args:
        arch: any object with the config.model fields (a UNet, a Classifier or
            config.model itself).
        image_size: input side in pixels; enables the resolution checks.

    Raises:
        ValueError: on an unknown variant or dtype, channels not divisible by
            num_groups or by the head width, a DDPM model with several heads, an image
            size not divisible by the total downsampling, or attention resolutions
            that never occur.
    """
    if arch.variant not in VARIANTS:
        raise ValueError(f'model.variant must be one of {VARIANTS}, got {arch.variant!r}.')
    if arch.base_channels <= 0:
        raise ValueError(f'model.base_channels must be positive, got {arch.base_channels}.')
    check_levels(arch)
    if arch.num_groups <= 0:
        raise ValueError(f'model.num_groups must be positive, got {arch.num_groups}.')
    chans = level_channels(arch.base_channels, arch.channel_mult)
    for mult, ch in zip(arch.channel_mult, chans):
        if ch <= 0:
            raise ValueError(f'model.channel_mult entry {mult} gives {ch} channels.')
        if ch % arch.num_groups:
            raise ValueError(
                f'model.num_groups={arch.num_groups} does not divide the {ch} channels of '
                f'level model.channel_mult={tuple(arch.channel_mult)} x '
                f'model.base_channels={arch.base_channels}.')
    if arch.variant == 'ddpm' and (arch.num_heads != 1 or arch.num_head_channels != -1):
        raise ValueError(
            "model.variant='ddpm' has a single attention head: set model.num_heads=1 and "
            f'model.num_head_channels=-1 (got {arch.num_heads}, {arch.num_head_channels}).')
    if arch.num_head_channels == -1 and arch.num_heads < 1:
        raise ValueError(f'model.num_heads must be >= 1, got {arch.num_heads}.')
    if arch.num_head_channels != -1 and arch.num_head_channels < 1:
        raise ValueError(
            f'model.num_head_channels must be -1 or positive, got {arch.num_head_channels}.')

    # The middle block always has attention, at the last level's channels.
    attn_channels = {chans[-1]}
    if image_size is not None:
        resolutions = level_resolutions(arch, image_size)
        attn_channels |= {ch for res, ch in zip(resolutions, chans)
                          if res in arch.attention_resolutions}
    for ch in sorted(attn_channels):
        if arch.num_head_channels != -1:
            if ch % arch.num_head_channels:
                raise ValueError(
                    f'model.num_head_channels={arch.num_head_channels} does not divide the '
                    f'{ch} channels of an attention layer.')
        elif ch % arch.num_heads:
            raise ValueError(f'model.num_heads={arch.num_heads} does not divide the {ch} '
                             'channels of an attention layer.')
