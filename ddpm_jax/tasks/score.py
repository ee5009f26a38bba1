"""The score task: a continuous-time score model trained by denoising score matching on an
SDE (Song et al. 2021b), and its samplers.

Training (task='score', the `sde` config group): t ~ U(sde.training_eps, 1) (or, with the
likelihood weighting and `sde.importance_sampling`, t ~ g^2 / std^2, Song et al. 2021a,
Sec. 5; or NCSN's discrete noise levels with `sde.continuous=False`, VE only), x_t =
alpha(t) x_0 + std(t) z on a VP, sub-VP or VE SDE (`ddpm_jax.sde`), the network
conditioned on 999 t (for VE an embedding of log sigma, see `score_matching.noise_label`;
NCSN++ on a continuous VE SDE gets sigma(t) itself, as score_sde: `label_kind`) and its
output read as the score with score_sde's convention (VP / sub-VP: s = -output / std, the
network predicts eps; VE: s = output / sigma, it predicts -eps), and the loss of
`score_matching.dsm_loss` with `sde.weighting` 'standard' (lambda = std^2) or
'likelihood' (lambda = g^2).

Sampling (`make_sample_fn`, used by --mode=sample / fid and the training grids): the
trained SDE's samplers of `sde_samplers` selected by `sample.sampler`: 'pc' (predictor
`sample.predictor` + corrector `sample.corrector` of snr `sample.pc_snr`, `sde.num_scales`
steps),
'sde' (the predictor alone), 'ode' (adaptive probability-flow ODE), 'heun' (Karras
et al. 2022 on the denoiser of the score, any SDE, first sigma capped at
`sample.heun_sigma_max`), all ending at `sde.sampling_eps`, and 'langevin' (NCSN's
annealed Langevin dynamics in y = x / alpha on `sample.langevin_num_levels` geometric
levels, by default the model's range: for a discrete NCSN model exactly its levels);
jitted once per batch size with the batch sharded `P('data')`, like the diffusion task.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import diffusion
from ddpm_jax import parallel
from ddpm_jax import samplers
from ddpm_jax import score_matching
from ddpm_jax import sde as sde_lib
from ddpm_jax import sde_samplers
from ddpm_jax.models import make_model_fn
from ddpm_jax.tasks import base
from ddpm_jax.tasks import diffusion as diffusion_task

SDE_KINDS = ('vp', 'subvp', 've')
# The samplers of `sampler_registry.SAMPLERS` that run on a trained SDE.
SCORE_SAMPLERS = ('pc', 'sde', 'ode', 'heun', 'langevin')


def create_sde(config: ml_collections.ConfigDict):
    """The SDE of `config.sde` (a `VPSDE`, `SubVPSDE` or `VESDE`).

    A VE NCSN++ trained on [0, 1] data (`model.ncsnpp.centered=False`, score_sde's VE
    models) gets score_sde's prior in our units, N(-1, sigma_max^2): theirs is
    N(0, (sigma_max / 2)^2) on x, and y = 2x - 1.
    """
    s = config.sde
    if s.kind == 've':
        uncentred = config.model.name == 'ncsnpp' and not config.model.ncsnpp.centered
        return sde_lib.VESDE(float(s.sigma_min), float(s.sigma_max), int(s.num_scales),
                             prior_mean=-1.0 if uncentred else 0.0)
    kind = sde_lib.VPSDE if s.kind == 'vp' else sde_lib.SubVPSDE
    return kind(float(s.beta_min), float(s.beta_max), int(s.num_scales))


def label_kind(config: ml_collections.ConfigDict) -> str:
    """What the network is fed (`score_matching.noise_label`): 'sigma' for NCSN++ on a
    continuous VE SDE (score_sde's labels there), else 'time' (999 t)."""
    m, c = config.model, config.sde
    if m.name == 'ncsnpp' and c.kind == 've' and c.continuous:
        return 'sigma'
    return 'time'


def make_score_fn(config: ml_collections.ConfigDict, sde, model_fn: Callable,
                  model_kwargs: Mapping[str, Any] | None = None) -> Callable:
    """The score s(x, t) of a network `model_fn(x, label, **model_kwargs)`.

    With `sde.continuous=False` (NCSN's discrete levels) t is rounded to the nearest
    trained level t_i = i / (N - 1), as score_sde does for its discrete models.

    Returns:
        score_fn(x [B, ...], t [B]) -> [B, ...].
    """
    continuous = bool(config.sde.continuous)
    n = int(config.sde.num_scales)
    kwargs = dict(model_kwargs or {})
    label = label_kind(config)

    def score_fn(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        if not continuous:
            t = jnp.round(t * (n - 1)) / (n - 1)
        out = model_fn(x, score_matching.noise_label(t, sde, label), **kwargs)
        return score_matching.score_from_output(sde, out.astype(jnp.float32), t)

    return score_fn


def sigma_range(config: ml_collections.ConfigDict, sde) -> tuple[float, float]:
    """(largest, smallest) sigma = std / alpha the model was trained at: sigma(1) and
    sigma(sde.sampling_eps), or sigma(0) for NCSN's discrete levels (its last level)."""
    t_lo = 0.0 if not config.sde.continuous else float(config.sde.sampling_eps)
    lo, hi = (float(v) for v in sde_lib.sigma_of_t(sde, jnp.asarray([t_lo, 1.0])))
    return hi, lo


def _heun_constants(config, sde) -> tuple[jax.Array, float]:
    """Karras et al.'s sigmas between sigma(eps) and sigma(1) (capped at
    `sample.heun_sigma_max`), and the std of the start y (concrete): the prior's, alpha(1)
    scaled to the first sigma."""
    ts = jnp.asarray([config.sde.sampling_eps, 1.0], jnp.float32)
    sigma_lo, sigma_hi = (float(v) for v in sde_lib.sigma_of_t(sde, ts))
    first = sde_samplers.capped_sigma_max(sigma_hi, float(config.sample.heun_sigma_max))
    sigmas = sde_samplers.karras_sigmas(int(config.sample.num_steps), sigma_lo, first)
    alpha_1 = float(sde_lib.marginal_coefs(sde, ts[1:])[0][0])
    return sigmas, sde_lib.prior_std(sde) / alpha_1 * first / sigma_hi


def _langevin_levels(config, sde) -> tuple[float, float, int]:
    """(sigma_1, sigma_L, L) of the 'langevin' sampler: the `sample.langevin_*` fields,
    0 meaning the model's own (`sigma_range`, sde.num_scales)."""
    s = config.sample
    hi, lo = sde_samplers.langevin_sigma_range(*sigma_range(config, sde),
                                               float(s.langevin_sigma_max),
                                               float(s.langevin_sigma_min))
    num_levels = int(s.langevin_num_levels) or int(config.sde.num_scales)
    return hi, lo, num_levels


def _run_sampler(config, sde, score_fn, shape, rng, constants=None):
    """(samples, nfe) of `config.sample.sampler` on the trained SDE."""
    s, c = config.sample, config.sde
    eps = float(c.sampling_eps)
    if s.sampler == 'ode':
        out = sde_samplers.ode_sample(sde, score_fn, shape, rng, eps=eps, solver=s.ode_solver,
                                      rtol=float(s.ode_rtol), atol=float(s.ode_atol),
                                      denoise=bool(s.ode_denoise))
    elif s.sampler in ('pc', 'sde'):
        out = sde_samplers.pc_sample(
            sde, score_fn, shape, rng, num_steps=int(c.num_scales), eps=eps,
            predictor=s.predictor, corrector=s.corrector if s.sampler == 'pc' else 'none',
            snr=float(s.pc_snr))
    elif s.sampler == 'langevin':  # In y = x / alpha, from sigma_1 N(0, I) or U(-1, 1).
        hi, lo, num_levels = constants
        out = sde_samplers.sde_langevin_sample(
            sde, score_fn, shape, rng, sigma_max=hi, sigma_min=lo, num_levels=num_levels,
            step_size=float(s.langevin_step_size),
            steps_per_level=int(s.langevin_steps_per_level), denoise=bool(s.langevin_denoise),
            init=s.langevin_init)
    else:  # 'heun' in Karras et al.'s variables y = x / alpha, from a prior draw.
        sigmas, y_std = constants
        init_rng, noise_rng = jax.random.split(rng)
        y_init = y_std * jax.random.normal(init_rng, tuple(shape), jnp.float32)
        out = sde_samplers.karras_sample(sde_lib.denoiser_from_score(sde, score_fn), sigmas,
                                         shape, noise_rng, s_churn=float(s.s_churn),
                                         x_init=y_init)
    return out.samples, out.nfe


def make_sample_fn(config: ml_collections.ConfigDict, model: nn.Module, *,
                   classifier: nn.Module | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> Callable:
    """The sharded, jitted sampler of a score model (the contract of
    `tasks.diffusion.make_sample_fn`; classifier guidance is not supported).

    Returns:
        `sample_fn(params, rng, labels, classifier_params=None, *, task_state=None,
        return_nfe=False) -> images` (or `(images, nfe)`): float32 [B, H, W, C] in [-1, 1] sharded
        `P('data')`, labels int32 [B] (zeros for an unconditional model).

    Raises:
        ValueError: A classifier (task='score' has no classifier guidance).
    """
    if classifier is not None and config.sample.classifier_scale > 0:
        raise ValueError("sample.classifier_scale > 0: task='score' has no classifier "
                         'guidance; set sample.classifier_scale=0.')
    mesh = parallel.create_mesh() if mesh is None else mesh
    num_devices = parallel.num_mesh_devices(mesh)
    replicated = parallel.replicated_sharding(mesh)
    batch_sharded = parallel.batch_sharding(mesh)
    m = config.model
    sde = create_sde(config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    conditional = m.num_classes > 0
    guidance_scale = float(config.sample.guidance_scale)
    config = ml_collections.ConfigDict(config.to_dict())  # Later edits do not leak in.
    constants = {'heun': _heun_constants, 'langevin': _langevin_levels}.get(
        config.sample.sampler, lambda *_: None)(config, sde)

    def constrain(x):
        return jax.lax.with_sharding_constraint(x, batch_sharded)

    def sample(params, rng, labels):
        base_fn = make_model_fn(model, params, pass_labels=conditional)
        if guidance_scale != 1.0:
            # The scores combine as the outputs do: the output is linear in the score.
            base_fn = samplers.make_cfg_model_fn(base_fn, guidance_scale, m.num_classes)

        def model_fn(x, t, **kwargs):
            return constrain(base_fn(constrain(x), t, **kwargs))

        score_fn = make_score_fn(config, sde, model_fn,
                                 {'y': labels} if conditional else None)
        x, nfe = _run_sampler(config, sde, score_fn, (labels.shape[0],) + image_shape, rng,
                              constants)
        return jnp.clip(x, -1.0, 1.0), nfe

    jitted = jax.jit(sample, in_shardings=(replicated, replicated, batch_sharded),
                     out_shardings=(batch_sharded, replicated),
                     compiler_options=parallel.compiler_options())

    def sample_fn(params, rng, labels, classifier_params=None, *, task_state=None,
                  return_nfe=False):
        del task_state  # A score model needs only its parameters.
        del classifier_params
        if not isinstance(labels, jax.Array):
            labels = diffusion_task._check_labels(labels, num_devices,  # noqa: SLF001
                                                  m.num_classes)
            labels = parallel.shard_host_array(labels, mesh)
        images, nfe = jitted(params, rng, labels)
        return (images, nfe) if return_nfe else images

    sample_fn.jitted = jitted
    return sample_fn


class ScoreTask(base.SingleModelTask):
    """A continuous-time score model (`model.name` 'unet' or 'ncsnpp') as one part, 'model'."""
    name = 'score'
    sample_part = 'model'

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.sde = create_sde(config)
        self.conditional = config.model.num_classes > 0
        c = config.sde
        self.importance = c.weighting == 'likelihood' and bool(c.importance_sampling)

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        m, c, s = config.model, config.sde, config.sample
        base.check_denoiser_model(config)
        if m.learn_sigma or m.latent_dim != 0:
            raise ValueError("task='score' needs model.learn_sigma=False and "
                             f'model.latent_dim=0 (got {m.learn_sigma}, {m.latent_dim}).')
        if c.kind not in SDE_KINDS:
            raise ValueError(f'sde.kind={c.kind!r} is not valid; choose one of {SDE_KINDS}.')
        if c.weighting not in score_matching.WEIGHTINGS:
            raise ValueError(f'sde.weighting={c.weighting!r} is not valid; choose one of '
                             f'{score_matching.WEIGHTINGS}.')
        if isinstance(c.num_scales, bool) or not isinstance(c.num_scales, int) or (
                c.num_scales < 2):
            raise ValueError(f'sde.num_scales={c.num_scales!r} must be an int >= 2.')
        if c.kind == 've':
            if not 0.0 < c.sigma_min < c.sigma_max:
                raise ValueError(f'sde.sigma_min={c.sigma_min}, sde.sigma_max={c.sigma_max}: '
                                 'need 0 < sigma_min < sigma_max.')
        else:
            if not 0.0 < c.beta_min < c.beta_max:
                raise ValueError(f'sde.beta_min={c.beta_min}, sde.beta_max={c.beta_max}: '
                                 'need 0 < beta_min < beta_max.')
            if c.beta_max / c.num_scales >= 1.0:
                raise ValueError(f'sde.num_scales={c.num_scales} is too small for '
                                 f'sde.beta_max={c.beta_max} (beta_max / num_scales >= 1).')
        for field in ('training_eps', 'sampling_eps'):
            if not 0.0 < c[field] < 1.0:
                raise ValueError(f'sde.{field}={c[field]} must be in (0, 1).')
        if not c.continuous and c.kind != 've':
            raise ValueError(f"sde.continuous=False (NCSN's discrete noise levels) needs "
                             f"sde.kind='ve', got {c.kind!r}; a discrete VP model is "
                             "task='diffusion'.")
        if not c.continuous and c.weighting != 'standard':
            raise ValueError("sde.weighting='likelihood' needs sde.continuous=True.")
        if s.sampler not in SCORE_SAMPLERS:
            raise ValueError(f"task='score' samples with sample.sampler in {SCORE_SAMPLERS}, "
                             f'got {s.sampler!r}.')
        if (s.sampler in ('pc', 'sde') and s.predictor == 'ancestral_sampling'
                and c.kind == 'subvp'):
            raise ValueError("sample.predictor='ancestral_sampling' steps the DDPM or SMLD "
                             "chain: it takes sde.kind='vp' or 've', got 'subvp'.")
        if s.sampler == 'langevin':
            sde = create_sde(config)
            model_hi, model_lo = sigma_range(config, sde)
            for field in ('langevin_sigma_max', 'langevin_sigma_min'):
                v = s[field]
                if v != 0 and not model_lo * 0.999 <= v <= model_hi * 1.001:
                    raise ValueError(f'sample.{field}={v} is outside the model\'s noise levels '
                                     f'(sigma in [{model_lo:.4g}, {model_hi:.4g}]); 0 = '
                                     'that end.')
        if s.classifier_scale != 0:
            raise ValueError(f'sample.classifier_scale={s.classifier_scale}: task=\'score\' '
                             'has no classifier guidance; set it to 0.')
        if s.heun_round_sigma:
            raise ValueError('sample.heun_round_sigma=True rounds sigmas to a discrete '
                             "model's trained levels; task='score' is continuous in t "
                             '(EDM rounds only for iDDPMPrecond): set it to False.')
        if s.respacing:
            raise ValueError(f'sample.respacing={s.respacing!r}: task=\'score\' samples its '
                             'SDE (steps: sde.num_scales for pc / sde, sample.num_steps for '
                             "heun); set it to ''.")

    def prepare_batch(self, batch, rng, task_state):
        del task_state
        t_rng, noise_rng, label_rng = jax.random.split(rng, 3)
        x0 = batch['image'].astype(jnp.float32)  # [B, H, W, C]
        labels = batch['label'].astype(jnp.int32)  # [B]
        batch_size = x0.shape[0]
        c = self.config.sde
        eps = float(c.training_eps)
        if not c.continuous:  # NCSN: one of the N levels, uniformly (score_sde's SMLD loss).
            i = jax.random.randint(t_rng, (batch_size,), 0, c.num_scales)
            t = i.astype(jnp.float32) / (c.num_scales - 1)
        elif self.importance:
            t = score_matching.sample_importance_t(self.sde, t_rng, (batch_size,), eps)
        else:
            t = jax.random.uniform(t_rng, (batch_size,), jnp.float32, eps, 1.0)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        dropout = self.config.model.class_dropout_prob
        if self.conditional and dropout > 0:
            drop = jax.random.bernoulli(label_rng, dropout, (batch_size,))
            labels = jnp.where(drop, self.config.model.num_classes, labels)
        return {'image': x0, 'label': labels, 't': t, 'noise': noise}

    def loss(self, phase, params, examples, rng):
        del phase
        c = self.config.sde
        model_fn = make_model_fn(self.model, params['model'], train=True,
                                 rngs={'dropout': rng}, pass_labels=self.conditional)
        t, noise = examples['t'], examples['noise']
        mean, std = sde_lib.marginal_prob(self.sde, examples['image'], t)
        x_t = mean + std.reshape((-1,) + (1,) * (noise.ndim - 1)) * noise
        out = model_fn(x_t, score_matching.noise_label(t, self.sde, label_kind(self.config)),
                       **({'y': examples['label']} if self.conditional else {}))
        score = score_matching.score_from_output(self.sde, out.astype(jnp.float32), t)
        _, g = sde_lib.drift_diffusion(self.sde, x_t, t)
        # Importance-sampled t turns the likelihood weighting into the standard loss
        # (up to the constant normaliser, dropped as score_flow does).
        weighting = 'standard' if self.importance else c.weighting
        losses = score_matching.dsm_loss(score, noise, std, jnp.square(g),
                                         weighting=weighting,
                                         reduce_mean=bool(c.reduce_mean))
        return jnp.mean(losses), {'loss': losses}

    def step_metrics(self, examples, terms):
        """The loss summed per quarter of [0, 1] in t, with example counts."""
        losses = terms[0]['loss']
        quarter = jnp.clip(jnp.floor(examples['t'] * diffusion.NUM_QUARTERS), 0,
                           diffusion.NUM_QUARTERS - 1).astype(jnp.int32)
        metrics = {}
        for q in range(diffusion.NUM_QUARTERS):
            mask = (quarter == q).astype(jnp.float32)
            metrics[f'count_q{q}'] = jnp.sum(mask)
            metrics[f'loss_q{q}_sum'] = jnp.sum(losses * mask)
        return metrics

    def make_grid_fn(self, mesh, rng):
        """Samples `train.num_grid_samples` images with the EMA parameters and the same
        noise at every grid (as the diffusion task's grids)."""
        if self.config.train.num_grid_samples <= 0:
            return None
        return diffusion_task.sampled_grid_fn(
            self.config, make_sample_fn(self.config, self.model, mesh=mesh),
            self.sample_part, mesh, rng)
