"""The first-stage autoencoder task of latent diffusion (Esser et al. 2021; Rombach et al. 2022).

Two parts, each with its own Adam, and two phases per step (as `ddgan`):

1. 'autoencoder': the L1 reconstruction loss (LDM's NLL with its log-variance fixed
   at 0; with the LPIPS term, each pixel's L1 error plus `perceptual_weight` *
   LPIPS(x, x_rec)), plus the latent's regulariser, plus, from step
   `autoencoder.disc_start` on, lambda * disc_weight * (-mean D(x_rec)), with lambda
   the adaptive weight of Esser et al. 2021, Eq. 7 (the ratio of the gradient norms
   of the reconstruction and adversarial losses at the decoder's last layer). As the
   two reference losses: a KL latent (LDM's LPIPSWithDiscriminator) sums the
   reconstruction loss over the pixels and adds `kl_weight` * KL(q(z|x) || N(0, I));
   a VQ latent (taming's VQLPIPSWithDiscriminator, LDM's VQ-f4) averages it over the
   pixels and adds the quantiser's loss with weight 1, in taming's legacy form
   (commitment + `vq_beta` * codebook; `autoencoder_losses.vq_losses`). The
   reduction sets the VQ term's scale against the reconstruction (a sum would make
   it 1 / (H W C) of taming's); lambda, a ratio of gradient norms of the
   reconstruction loss as reduced, follows it.
2. 'discriminator': the hinge loss of the patch discriminator on x against the
   (updated) reconstruction, from `disc_start` on (zero before: D is not trained,
   as taming's disc_factor = 0).

The step counter lives in the task state; the switch is a `lax.cond` inside the
jitted step, so the adversarial terms cost nothing before `disc_start`.

The perceptual term (Zhang et al. 2018; `ddpm_jax.models.lpips`) is on when
`autoencoder.lpips_weights_path` (the LPIPS linear layers, `vgg.pth`) and
`autoencoder.vgg16_weights_path` (torchvision's `vgg16-397923af.pth`) name the two
files and `perceptual_weight` > 0. Its parameters are constants of the jitted step,
read once when the task is built: not trained, not in the optimiser, not in the
checkpoint (a run can switch the term on or off when it resumes). It enters the
adaptive weight's reconstruction loss too, as in LDM. The output log-variance is 0,
as LDM's: its `logvar` is an `nn.Parameter` that AutoencoderKL's optimiser leaves
out, so it stays at `logvar_init` = 0. Departure from LDM: grey images are repeated
to RGB for LPIPS.
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import autoencoder_losses as ae_losses
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax.models import autoencoder as ae_lib
from ddpm_jax.models import layers
from ddpm_jax.models import lpips as lpips_lib
from ddpm_jax.tasks import base

LPIPS_FIELD = 'autoencoder.lpips_weights_path'
VGG16_FIELD = 'autoencoder.vgg16_weights_path'


def create_autoencoder(config: ml_collections.ConfigDict) -> ae_lib.Autoencoder:
    """The `Autoencoder` of `config.autoencoder` for `config.data` images."""
    a = config.autoencoder
    return ae_lib.Autoencoder(kind=a.kind, base_channels=a.base_channels,
                              channel_mult=tuple(a.channel_mult),
                              num_res_blocks=a.num_res_blocks,
                              attention_resolutions=tuple(a.attention_resolutions),
                              z_channels=a.z_channels, codebook_size=a.codebook_size,
                              num_groups=a.num_groups, out_channels=config.data.channels,
                              dtype=config.model.dtype)


def create_discriminator(config: ml_collections.ConfigDict) -> ae_lib.PatchDiscriminator:
    """The `PatchDiscriminator` of `config.autoencoder`."""
    a = config.autoencoder
    return ae_lib.PatchDiscriminator(base_channels=a.disc_base_channels,
                                     num_layers=a.disc_num_layers,
                                     num_groups=a.disc_num_groups, dtype=config.model.dtype)


def perceptual_weight(config: ml_collections.ConfigDict) -> float:
    """The LPIPS term's weight: `perceptual_weight` when its files are given, else 0.

    Reads `vgg16_weights_path` only then, so configs stored before that field
    existed (always without the term) still build.
    """
    a = config.autoencoder
    return float(a.perceptual_weight) if a.lpips_weights_path else 0.0


def num_grid_images(config: ml_collections.ConfigDict) -> int:
    """Images of the first batch kept for the reconstruction grid."""
    return min(config.train.num_grid_samples, config.train.global_batch_size)


class AutoencoderTask(base.Task):
    """Autoencoder and patch discriminator, alternating in one step (module docstring).

    Args:
        config: The run's config.
        perceptual: False builds the task without reading the LPIPS files (for its
            parameter shapes only, e.g. to restore a checkpoint); `loss` then
            refuses to run if the config has the perceptual term.

    Raises:
        ValueError: (with the perceptual term) a weights file missing, unreadable, or
            without the right tensors; the message names the config field.
    """
    name = 'autoencoder'
    parts = ('autoencoder', 'discriminator')
    ema_parts = ('autoencoder',)
    phases = (('autoencoder',), ('discriminator',))
    sample_part = None  # It reconstructs; it does not generate.

    def __init__(self, config: ml_collections.ConfigDict, *, perceptual: bool = True):
        super().__init__(config)
        self.autoencoder = create_autoencoder(config)
        self.discriminator = create_discriminator(config)
        self.vq = config.autoencoder.kind == 'vq'
        # Over each example's pixels: taming's VQ loss averages, LDM's KL loss sums.
        self.reduction = 'mean' if self.vq else 'sum'
        self.perceptual_weight = perceptual_weight(config)
        self.lpips = lpips_lib.LPIPS()
        self.lpips_params = None  # Host float32 arrays, closed over by the jitted step.
        if self.perceptual_weight > 0 and perceptual:
            a = config.autoencoder
            self.lpips_params = lpips_lib.load_lpips_params(
                a.lpips_weights_path, a.vgg16_weights_path, lpips_field=LPIPS_FIELD,
                vgg16_field=VGG16_FIELD)

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        a, size = config.autoencoder, config.data.image_size
        ae_lib.check_autoencoder(a, size)
        patches = size // 2 ** a.disc_num_layers - 2
        chans = [a.disc_base_channels * min(2 ** n, 8) for n in range(1, a.disc_num_layers + 1)]
        checks = [
            (a.kl_weight >= 0, f'autoencoder.kl_weight={a.kl_weight} must be >= 0.'),
            (a.vq_beta >= 0, f'autoencoder.vq_beta={a.vq_beta} must be >= 0.'),
            (a.disc_start >= 0, f'autoencoder.disc_start={a.disc_start} must be >= 0.'),
            (a.disc_weight >= 0, f'autoencoder.disc_weight={a.disc_weight} must be >= 0.'),
            (a.lr_discriminator >= 0,
             f'autoencoder.lr_discriminator={a.lr_discriminator} must be >= 0.'),
            (a.disc_base_channels >= 1 and a.disc_num_layers >= 1,
             'autoencoder.disc_base_channels and autoencoder.disc_num_layers must be >= 1.'),
            (patches >= 1, f'autoencoder.disc_num_layers={a.disc_num_layers} leaves no patch '
                           f'of a {size}x{size} image; use fewer layers.'),
            (a.disc_num_groups >= 0 and all(
                a.disc_num_groups == 0 or c % a.disc_num_groups == 0 for c in chans),
             f'autoencoder.disc_num_groups={a.disc_num_groups} must be 0 or divide the '
             f'discriminator channels {chans}.'),
            (a.perceptual_weight >= 0,
             f'autoencoder.perceptual_weight={a.perceptual_weight} must be >= 0.'),
            (0 <= a.lpips_dropout < 1,
             f'autoencoder.lpips_dropout={a.lpips_dropout} must be in [0, 1).'),
            (a.init in ae_lib.INITS, f'autoencoder.init={a.init!r} is not valid; choose one '
                                     f'of {ae_lib.INITS}.'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if not (a.lpips_weights_path or a.vgg16_weights_path):
            return
        # The perceptual term needs both files (also checked, with their tensors, when
        # the task is built); a set path must be right even at perceptual_weight=0.
        off = f" (or set both {LPIPS_FIELD} and {VGG16_FIELD} to '' for no LPIPS term)"
        lpips_lib.check_weight_file(a.lpips_weights_path, LPIPS_FIELD, vgg16=False, hint=off)
        lpips_lib.check_weight_file(a.vgg16_weights_path, VGG16_FIELD, vgg16=True, hint=off)
        if a.perceptual_weight == 0:
            return
        if size < lpips_lib.MIN_IMAGE_SIZE:
            raise ValueError(
                f'data.image_size={size} is too small for the LPIPS term '
                f'({LPIPS_FIELD}): its VGG16 needs at least {lpips_lib.MIN_IMAGE_SIZE}x'
                f'{lpips_lib.MIN_IMAGE_SIZE} images{off}.')
        if config.data.channels not in (1, 3):
            raise ValueError(
                f'data.channels={config.data.channels}: the LPIPS term ({LPIPS_FIELD}) '
                f'compares RGB (or grey) images, 3 (or 1) channels{off}.')

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        a_rng, d_rng = jax.random.split(rng)
        size, channels = self.config.data.image_size, self.config.data.channels
        x = jnp.zeros((1, size, size, channels), jnp.float32)
        ae = self.autoencoder.init(a_rng, x)['params']
        disc = self.discriminator.init(d_rng, x)['params']
        if self.config.autoencoder.init == 'torch':  # LDM's (taming's) PyTorch defaults.
            ae = layers.torch_default_init(ae, jax.random.fold_in(a_rng, 1))
            disc = layers.torch_default_biases(disc, jax.random.fold_in(d_rng, 1))
        return {'autoencoder': ae, 'discriminator': disc}

    def create_optimizers(self) -> dict[str, state_lib.Optimizer]:
        """`optim` for both; the discriminator at `autoencoder.lr_discriminator` if set."""
        out = {}
        for part in self.parts:
            optim = ml_collections.ConfigDict(self.config.optim.to_dict())
            if part == 'discriminator' and self.config.autoencoder.lr_discriminator > 0:
                optim.learning_rate = self.config.autoencoder.lr_discriminator
            out[part] = state_lib.create_optimizer(optim, self.config.train.num_train_steps)
        return out

    def init_task_state(self) -> dict[str, jax.Array]:
        """Steps taken (the adversarial switch) and the first batch's first images (the
        reconstruction grid's inputs, so every grid shows the same digits; absent
        without grids: orbax cannot save an empty array)."""
        size, channels = self.config.data.image_size, self.config.data.channels
        n = num_grid_images(self.config)
        state = {'step': jnp.zeros((), jnp.int32)}
        if n > 0:
            state['grid_images'] = jnp.zeros((n, size, size, channels), jnp.float32)
        return state

    def prepare_batch(self, batch, rng, task_state):
        x = batch['image'].astype(jnp.float32)
        side, _, z = ae_lib.latent_shape(x.shape[1], self.autoencoder)
        active = task_state['step'] >= self.config.autoencoder.disc_start
        return {'image': x,
                'noise': jax.random.normal(rng, (x.shape[0], side, side, z), jnp.float32),
                'adversarial': jnp.full((x.shape[0],), active)}

    def discriminate(self, disc_params, images):
        """Patch logits [B, h, w, 1]."""
        return self.discriminator.apply({'params': disc_params}, images)

    def reconstruct(self, ae_params, x, noise=None):
        """(decoder features before the last layer, the latent terms)."""
        return self.autoencoder.apply({'params': ae_params}, x, None if self.vq else noise,
                                      features_only=True)

    def perceptual_reference(self, x: jax.Array) -> tuple[jax.Array, ...] | None:
        """LPIPS features of the inputs x [B, H, W, C] (computed once per loss), or
        None without the perceptual term."""
        if self.perceptual_weight == 0:
            return None
        if self.lpips_params is None:
            raise ValueError('This AutoencoderTask was built with perceptual=False, but the '
                             f'config has the LPIPS term ({LPIPS_FIELD}); build it with '
                             'perceptual=True to train.')
        return jax.lax.stop_gradient(self.lpips.apply(
            {'params': self.lpips_params}, x, method=lpips_lib.LPIPS.features))

    def reconstruction_loss(self, x, x_rec, reference, dropout_rng=None):
        """(the reconstruction loss [B], LPIPS(x, x_rec) [B] or None): L1, plus the
        perceptual term when `reference` (of x) is given, summed over pixels for a KL
        latent, averaged for a VQ latent (`self.reduction`; module docstring). With
        `dropout_rng`, LPIPS drops `autoencoder.lpips_dropout` of its squared
        differences, as the reference's does in training."""
        if reference is None:
            return ae_losses.l1_reconstruction(x, x_rec, self.reduction), None
        apply = functools.partial(self.lpips.apply, {'params': self.lpips_params})
        rate = float(self.config.autoencoder.lpips_dropout)
        distance = apply(reference, apply(x_rec, method=lpips_lib.LPIPS.features),
                         dropout_rng if rate > 0 else None, rate,
                         method=lpips_lib.LPIPS.distance)
        return (ae_losses.perceptual_reconstruction(x, x_rec, distance,
                                                    self.perceptual_weight, self.reduction),
                distance)

    def adaptive_weight(self, params, x, features, reference=None,
                        dropout_rng=None) -> jax.Array:
        """lambda of Esser et al. 2021, Eq. 7 at the decoder's last-layer kernel, from
        the batch-mean losses (the scalars the total loss is made of; the
        reconstruction loss includes the perceptual term, as LDM's nll_loss, with the
        same LPIPS dropout mask: `dropout_rng` as the loss's).
        `reference`: `perceptual_reference(x)` if already computed."""
        conv = params['autoencoder']['decoder']['conv_out']
        if reference is None:
            reference = self.perceptual_reference(x)

        def output(kernel):
            return ae_lib.apply_output_layer({**conv, 'kernel': kernel}, features)

        def rec_loss(kernel):
            return jnp.mean(self.reconstruction_loss(x, output(kernel), reference,
                                                     dropout_rng)[0])

        def adv_loss(kernel):
            logits = self.discriminate(params['discriminator'], output(kernel))
            return jnp.mean(ae_losses.generator_adversarial_loss(logits))

        return ae_losses.adaptive_weight(jax.grad(rec_loss)(conv['kernel']),
                                         jax.grad(adv_loss)(conv['kernel']))

    def loss(self, phase, params, examples, rng):
        a = self.config.autoencoder
        x, noise = examples['image'], examples['noise']
        batch = x.shape[0]
        active = examples['adversarial'][0]
        if phase == 0:
            features, latent = self.reconstruct(params['autoencoder'], x, noise)
            x_rec = ae_lib.apply_output_layer(params['autoencoder']['decoder']['conv_out'],
                                              features)
            reference = self.perceptual_reference(x)
            rec, distance = self.reconstruction_loss(x, x_rec, reference, rng)
            # Mean |x - x_rec| per pixel.
            terms = {'rec_l1': ae_losses.l1_reconstruction(x, x_rec, 'mean')}
            if distance is not None:
                terms['lpips'] = distance
            if self.vq:
                # LDM's VQModel: taming's VectorQuantizer2(beta=0.25), legacy by default.
                vq = ae_losses.vq_losses(latent['z'], latent['z_q'], a.vq_beta, legacy=True)
                regulariser = vq['vq']
                perplexity, used = ae_losses.codebook_usage(latent['codes'], a.codebook_size)
                terms.update(codebook=vq['codebook'], commitment=vq['commitment'],
                             perplexity=jnp.full((batch,), perplexity),
                             codebook_usage=jnp.full((batch,), used))
            else:
                kl = ae_losses.kl_standard_normal(latent['mean'], latent['logvar'])
                regulariser = a.kl_weight * kl
                terms['kl'] = kl

            def adversarial():
                weight = a.disc_weight * self.adaptive_weight(params, x, features, reference,
                                                              rng)
                g = ae_losses.generator_adversarial_loss(
                    self.discriminate(params['discriminator'], x_rec))
                return weight, g

            weight, g = jax.lax.cond(active, adversarial,
                                     lambda: (jnp.zeros((), jnp.float32),
                                              jnp.zeros((batch,), jnp.float32)))
            per_example = rec + regulariser + weight * g
            terms.update(loss=per_example, g_loss=g, d_weight=jnp.full((batch,), weight))
            return jnp.mean(per_example), terms

        # The discriminator, against the autoencoder the first phase just updated.
        def hinge():
            features, _ = self.reconstruct(params['autoencoder'], x, noise)
            x_rec = jax.lax.stop_gradient(ae_lib.apply_output_layer(
                params['autoencoder']['decoder']['conv_out'], features))
            real = self.discriminate(params['discriminator'], x)
            fake = self.discriminate(params['discriminator'], x_rec)
            accuracy = 0.5 * (jnp.mean((real > 0).astype(jnp.float32), axis=(1, 2, 3))
                              + jnp.mean((fake < 0).astype(jnp.float32), axis=(1, 2, 3)))
            return ae_losses.hinge_discriminator_loss(real, fake), accuracy

        zeros = jnp.zeros((batch,), jnp.float32)
        d_loss, accuracy = jax.lax.cond(active, hinge, lambda: (zeros, zeros))
        return jnp.mean(d_loss), {'loss': d_loss, 'd_accuracy': accuracy}

    def update_task_state(self, task_state, examples, terms):
        out = {'step': task_state['step'] + 1}
        if 'grid_images' in task_state:
            n = task_state['grid_images'].shape[0]
            out['grid_images'] = jnp.where(task_state['step'] == 0, examples['image'][:n],
                                           task_state['grid_images'])
        return out

    def step_metrics(self, examples, terms):
        """Reconstruction L1 per pixel, LPIPS (with the perceptual term), KL (or
        codebook, commitment, perplexity and the fraction of codes used), the adaptive
        weight, G's and D's losses, D's accuracy on real and reconstructed patches,
        and whether the adversarial loss is on."""
        metrics = {name: jnp.mean(value) for name, value in terms[0].items() if name != 'loss'}
        metrics['d_accuracy'] = jnp.mean(terms[1]['d_accuracy'])
        metrics['adversarial'] = examples['adversarial'][0].astype(jnp.float32)
        return metrics

    def make_grid_fn(self, mesh: jax.sharding.Mesh, rng: jax.Array | None = None):
        """`grid_fn(ema_params, task_state) -> (images, columns)`: rows of the first
        batch's images (kept in the task state) alternating with rows of their EMA
        reconstructions (posterior mean or quantised latent), float32 [2N, H, W, C]
        in [-1, 1] on the host. Deterministic: `rng` is unused."""
        del rng
        n = num_grid_images(self.config)
        columns = max(1, min(n, 8))
        replicated = parallel.replicated_sharding(mesh)

        @functools.partial(jax.jit, compiler_options=parallel.compiler_options())
        def reconstruct(ae_params, images):
            return jnp.clip(self.autoencoder.apply({'params': ae_params}, images)[0], -1, 1)

        def grid_fn(ema_params: Mapping[str, Any], task_state: Mapping[str, Any]):
            images = jax.device_put(task_state['grid_images'], replicated)
            recon = np.asarray(parallel.to_host(reconstruct(ema_params['autoencoder'], images)))
            images = np.asarray(parallel.to_host(images))
            rows = []
            for start in range(0, n, columns):
                rows += [images[start:start + columns], recon[start:start + columns]]
            return np.concatenate(rows), columns

        return grid_fn
