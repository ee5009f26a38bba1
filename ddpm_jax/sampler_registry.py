"""The one table of image samplers selectable by name (`sample.sampler`), and how to run one.

`samplers.SAMPLERS` holds the discrete-schedule samplers (DDPM, DDIM, DPM-Solver++(2M),
DDGAN) and `sde_samplers.SDE_SAMPLERS` the fast and score-based ones that fit the same
call (DPM-Solver++(3M) / (2S), and Karras et al.'s Heun, the probability-flow ODE and PC
through the VP view, and NCSN's annealed Langevin dynamics). `sde_samplers` imports
`samplers`, so the merged table lives here,
where it is consumed (`config_lib` checks names against it, `tasks.diffusion` runs it),
with one more entry, 'sde': the reverse-time SDE without a corrector (Song et al. 2021b,
Sec. 4.1; Euler-Maruyama or the reverse-diffusion predictor).

`OPTION_FIELDS` maps each keyword a sampler takes from the config (its `SamplerSpec.options`)
to the config field that sets it, so adding an option is one line here and one field in
`configs/default.py`. `run_sampler` returns every sampler's samples with its number of
model evaluations (NFE).

Everything here is pure JAX: no Flax, no I/O, no global state.
"""

import inspect
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from ddpm_jax import samplers
from ddpm_jax import sde_samplers
from ddpm_jax.schedules import Schedule

Array = jax.Array

# The predictors of the 'pc' and 'sde' samplers (`sample.predictor`), and the
# correctors of 'pc' (`sample.corrector`).
PREDICTORS = ('reverse_diffusion', 'euler_maruyama', 'ancestral_sampling')
CORRECTORS = ('langevin', 'ald')


def vp_sde_sample(model_fn, sched: Schedule, shape: Sequence[int], rng: Array, *,
                  mean_type: str = 'eps', var_type: str = 'fixed_small',
                  clip_denoised: bool = True, denoised_fn=None, model_kwargs=None,
                  cond_fn=None, classifier_scale: float = 1.0, x_T: Optional[Array] = None,
                  return_intermediates: bool = False, predictor: str = 'reverse_diffusion',
                  eps: float = 1e-3, return_nfe: bool = False):
    """The reverse-time SDE of a discrete model's VP view, without a corrector, with the
    registry's signature: `sde_samplers.vp_pc_sample` with corrector 'none'.

    'reverse_diffusion' steps the schedule's own chain (Song et al. 2021b, Eq. 46-47; on
    the VP view of a DDPM model this is ancestral sampling with the posterior variance
    beta_i); 'ancestral_sampling' is score_sde's ancestral predictor on that chain
    (`sde.ancestral_step`); 'euler_maruyama' discretises dx = [f - g^2 s] dt + g dw-bar
    uniformly in t.
    N model calls on a schedule of N steps (respacing sets N).

    Returns:
        The samples, or (samples, nfe) with `return_nfe`.
    """
    return sde_samplers.vp_pc_sample(
        model_fn, sched, shape, rng, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        cond_fn=cond_fn, classifier_scale=classifier_scale, x_T=x_T,
        return_intermediates=return_intermediates, predictor=predictor, corrector='none',
        eps=eps, return_nfe=return_nfe)


# Every image sampler selectable by `sample.sampler`. The config comment and the README
# are checked against this table by tests/test_config_lib.py.
SAMPLERS: Mapping[str, samplers.SamplerSpec] = {
    **samplers.SAMPLERS,
    **sde_samplers.SDE_SAMPLERS,
    'pc': sde_samplers.SDE_SAMPLERS['pc']._replace(options=('snr', 'predictor', 'corrector')),
    'sde': samplers.SamplerSpec(
        vp_sde_sample, ('predictor',),
        'reverse-time SDE, reverse diffusion or Euler-Maruyama (Song et al. 2021b)'),
}

# The config field of each sampler option (`SamplerSpec.options`) and its type.
OPTION_FIELDS: Mapping[str, tuple[str, type]] = {
    'eta': ('sample.eta', float),
    'latent_dim': ('model.latent_dim', int),
    'num_steps': ('sample.num_steps', int),
    's_churn': ('sample.s_churn', float),
    'solver': ('sample.ode_solver', str),
    'rtol': ('sample.ode_rtol', float),
    'atol': ('sample.ode_atol', float),
    'denoise': ('sample.ode_denoise', bool),
    'snr': ('sample.pc_snr', float),
    'predictor': ('sample.predictor', str),
    'corrector': ('sample.corrector', str),
    'sigma_max': ('sample.heun_sigma_max', float),
    'round_sigma': ('sample.heun_round_sigma', bool),
    'step_size': ('sample.langevin_step_size', float),
    'steps_per_level': ('sample.langevin_steps_per_level', int),
    'num_levels': ('sample.langevin_num_levels', int),
    'langevin_sigma_max': ('sample.langevin_sigma_max', float),
    'langevin_sigma_min': ('sample.langevin_sigma_min', float),
    'final_denoise': ('sample.langevin_denoise', bool),
    'langevin_init': ('sample.langevin_init', str),
}

# Samplers that pick their own times on the model's full training schedule (the VP
# view's knots), so `sample.respacing` must be ''.
FULL_SCHEDULE_SAMPLERS = ('heun', 'ode')


def sampler_options(config: Any, name: str) -> dict[str, Any]:
    """The keyword arguments sampler `name` takes from the config (Python scalars).

    Args:
        config: The run's config (a `ConfigDict`, or any mapping of groups).
        name: A key of `SAMPLERS`.

    Returns:
        {keyword: value} for the options of `SAMPLERS[name]`.
    """
    options = {}
    for option in SAMPLERS[name].options:
        field, kind = OPTION_FIELDS[option]
        group, key = field.split('.')
        options[option] = kind(config[group][key])
    return options


def run_sampler(name: str, model_fn, sched: Schedule, shape: Sequence[int],
                rng: Optional[Array], **kwargs) -> tuple[Array, Array]:
    """Runs `SAMPLERS[name]` and returns (samples, nfe).

    NFE counts the calls of `model_fn` (a classifier-free-guided model_fn counts once
    per call although it runs the network on a doubled batch): what the sampler
    reports for those that take `return_nfe`, else one per schedule step (DDPM, DDIM,
    DPM-Solver++(2M) and DDGAN call the model once per step).

    Args:
        name: A key of `SAMPLERS`.
        model_fn, sched, shape, rng, kwargs: The sampler's arguments.

    Returns:
        (samples [B, ...], nfe int32 scalar).
    """
    fn = SAMPLERS[name].fn
    if 'return_nfe' in inspect.signature(fn).parameters:
        x, nfe = fn(model_fn, sched, shape, rng, return_nfe=True, **kwargs)
        return x, jnp.asarray(nfe, jnp.int32)
    x = fn(model_fn, sched, shape, rng, **kwargs)
    return x, jnp.asarray(sched.num_timesteps, jnp.int32)
