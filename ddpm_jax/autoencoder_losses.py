"""Losses of the first-stage autoencoder of latent diffusion (pure functions of arrays).

The first stage of Rombach et al. 2022 ("LDM") is trained as in Esser et al. 2021
("taming transformers", VQGAN): a reconstruction loss (L1, plus a perceptual
distance that the caller computes, LPIPS), a latent regulariser (a KL to N(0, I)
or vector quantisation) and a patch-discriminator loss switched on after a number
of steps and weighted adaptively. Everything here is a plain function of arrays:
no Flax, no I/O, no state.

The two first stages reduce their reconstruction loss differently, and this sets
the scale of every other term against it: LDM's KL loss (LPIPSWithDiscriminator,
ldm/modules/losses/contperceptual.py) sums it over the pixels and averages over the
batch (`torch.sum(nll_loss) / nll_loss.shape[0]`), which its 1e-6 KL weight assumes;
taming's VQ loss (VQLPIPSWithDiscriminator, taming/modules/losses/vqperceptual.py,
which LDM's VQ-f4 uses) averages it over the pixels too (`torch.mean(nll_loss)`) and
adds the quantiser's loss with weight 1. `reduction='sum'` / `'mean'` below.

Per-example terms have shape [B]; images are [B, H, W, C].
"""

import jax
import jax.numpy as jnp

# LDM's DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# Esser et al. 2021 (taming's calculate_adaptive_weight): eps and the clip.
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


# How a reconstruction loss is reduced over each example's pixels and channels:
# 'sum' (LDM's KL autoencoders) or 'mean' (taming's VQ loss); see the module docstring.
REDUCTIONS = ('sum', 'mean')


def _sum_per_example(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _reduce_per_example(x: jax.Array, reduction: str) -> jax.Array:
    if reduction not in REDUCTIONS:
        raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}.')
    reduce = jnp.sum if reduction == 'sum' else jnp.mean
    return reduce(x, axis=tuple(range(1, x.ndim)))


def l1_reconstruction(x: jax.Array, x_rec: jax.Array, reduction: str = 'sum') -> jax.Array:
    """|x - x_rec| summed (or averaged) over each example's pixels and channels [B].

    Args:
        x, x_rec: Images [B, H, W, C].
        reduction: 'sum' (LDM's KL loss: its NLL is summed over the pixels and averaged
            over the batch, the scale its 1e-6 KL weight assumes) or 'mean' (taming's
            VQ loss: the mean over all pixels).
    """
    return _reduce_per_example(
        jnp.abs(x.astype(jnp.float32) - x_rec.astype(jnp.float32)), reduction)


def perceptual_reconstruction(x: jax.Array, x_rec: jax.Array, perceptual: jax.Array,
                              weight: float, reduction: str = 'sum') -> jax.Array:
    """(|x - x_rec| + weight * perceptual) summed (or averaged) over pixels, per example [B].

    Both losses add the perceptual distance of each example to the L1 error of every
    one of its pixels and channels before reducing them into the NLL. Summed (LDM's
    LPIPSWithDiscriminator, ldm/modules/losses/contperceptual.py) the term counts
    H * W * C times: sum |x - x_rec| + weight * H * W * C * perceptual. Averaged
    (taming's VQLPIPSWithDiscriminator) it counts once: mean |x - x_rec| + weight *
    perceptual. The ratio of the two terms is the same.

    Args:
        x, x_rec: Images [B, H, W, C].
        perceptual: A per-example distance [B] (LPIPS of x and x_rec).
        weight: Its weight (LDM's perceptual_weight, 1.0).
        reduction: 'sum' or 'mean' (see `l1_reconstruction`).
    """
    pixels = x.shape[1] * x.shape[2] * x.shape[3] if reduction == 'sum' else 1
    return (l1_reconstruction(x, x_rec, reduction)
            + weight * pixels * perceptual.astype(jnp.float32))


def clip_logvar(logvar: jax.Array) -> jax.Array:
    """The log-variance clamped to [-30, 20] (LDM's DiagonalGaussianDistribution)."""
    return jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def sample_diagonal_gaussian(mean: jax.Array, logvar: jax.Array,
                             noise: jax.Array) -> jax.Array:
    """z = mean + exp(logvar / 2) * noise: the reparameterisation (Kingma & Welling 2014)."""
    return mean + jnp.exp(0.5 * logvar) * noise


def kl_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example [B], summed over the latent.

    0.5 * sum(mean^2 + exp(logvar) - 1 - logvar) (Kingma & Welling 2014, App. B).
    """
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * _sum_per_example(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Hinge loss of the discriminator per example [B] (Lim & Ye 2017; taming's
    hinge_d_loss): 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))), the means
    over each example's patch logits."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real), axis=tuple(range(1, logits_real.ndim)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake), axis=tuple(range(1, logits_fake.ndim)))
    return 0.5 * (real + fake)


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean D(x_rec) per example [B] (taming's g_loss)."""
    return -jnp.mean(logits_fake, axis=tuple(range(1, logits_fake.ndim)))


def adaptive_weight(rec_grad: jax.Array, adv_grad: jax.Array) -> jax.Array:
    """The adaptive weight of Esser et al. 2021, Eq. 7, detached.

    lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_adv|| + 1e-4), clipped to
    [0, 1e4], where G_L is the decoder's last layer.

    Args:
        rec_grad: Gradient of the reconstruction loss w.r.t. the last layer's weight.
        adv_grad: Gradient of the generator's adversarial loss w.r.t. the same weight.

    Returns:
        A float32 scalar with no gradient.
    """
    rec_norm = jnp.sqrt(jnp.sum(jnp.square(rec_grad.astype(jnp.float32))))
    adv_norm = jnp.sqrt(jnp.sum(jnp.square(adv_grad.astype(jnp.float32))))
    weight = jnp.clip(rec_norm / (adv_norm + ADAPTIVE_WEIGHT_EPS), 0.0, ADAPTIVE_WEIGHT_MAX)
    return jax.lax.stop_gradient(weight)


def quantize(z: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest codebook entries (van den Oord et al. 2017, Eq. 1-2).

    Args:
        z: Encoder outputs [..., D].
        codebook: [K, D].

    Returns:
        (z_q [..., D], codes int32 [...]): the nearest entries (in squared Euclidean
        distance) and their indices. No gradient flows to z through z_q; see
        `straight_through`.
    """
    flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    book = codebook.astype(jnp.float32)
    distances = (jnp.sum(jnp.square(flat), axis=1, keepdims=True)
                 - 2.0 * flat @ book.T + jnp.sum(jnp.square(book), axis=1)[None, :])
    codes = jnp.argmin(distances, axis=1).astype(jnp.int32)
    z_q = jnp.take(codebook, codes, axis=0).reshape(z.shape)
    return z_q, codes.reshape(z.shape[:-1])


def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """z + sg(z_q - z): the value of z_q, the gradient of z (van den Oord et al. 2017)."""
    return z + jax.lax.stop_gradient(z_q - z)


def vq_losses(z: jax.Array, z_q: jax.Array, beta: float,
              legacy: bool = True) -> dict[str, jax.Array]:
    """The codebook and commitment losses per example [B] (van den Oord et al. 2017, Eq. 3).

    codebook = mean ||sg(z) - z_q||^2 moves the codes; commitment = mean
    ||z - sg(z_q)||^2 keeps the encoder near them; means over each example's latent
    elements, as taming's VectorQuantizer2 (its scalar mean over the batch is the
    batch mean of these). beta weights one of them:

    * legacy=True (taming's default, which LDM's VQModel keeps): beta weights the
      codebook term and the commitment term has weight 1, `torch.mean((z_q.detach() -
      z)**2) + beta * torch.mean((z_q - z.detach())**2)`, a bug taming kept "for
      backwards compatibility" (taming/modules/vqvae/quantize.py);
    * legacy=False: the paper's codebook + beta * commitment.

    Returns:
        {'codebook': [B], 'commitment': [B], 'vq': their sum [B]}, each with its weight.
    """
    axes = tuple(range(1, z.ndim))
    codebook = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - z_q), axis=axes)
    commitment = jnp.mean(jnp.square(z - jax.lax.stop_gradient(z_q)), axis=axes)
    if legacy:
        codebook = beta * codebook
    else:
        commitment = beta * commitment
    return {'codebook': codebook, 'commitment': commitment, 'vq': codebook + commitment}


def codebook_usage(codes: jax.Array, codebook_size: int) -> tuple[jax.Array, jax.Array]:
    """(perplexity, fraction of codes used) of a batch of code indices.

    Perplexity exp(-sum_k p_k log p_k) of the codes' empirical distribution p: K when
    all K codes are used equally, 1 when one code is used.
    """
    counts = jnp.bincount(codes.reshape(-1), length=codebook_size).astype(jnp.float32)
    p = counts / jnp.sum(counts)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy), jnp.mean((counts > 0).astype(jnp.float32))
