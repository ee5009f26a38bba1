"""python main.py --config=configs/digits_ncsn.py --workdir=/tmp/digits_ncsn

NCSN (Song & Ermon 2019) on the bundled 8x8 digits, on a laptop CPU: a noise-conditional
score network trained on L = 24 discrete noise levels (task='score', a VE SDE with
`sde.continuous=False`: each example draws one level uniformly, denoising score matching
with NCSN's weighting lambda = sigma^2) and sampled with annealed Langevin dynamics.

The levels follow NCSNv2's techniques (Song & Ermon 2020), worked out for these data
(64 pixels in [-1, 1]): sigma_1 = 10, about the largest distance between two training
digits (9.6; Technique 1); sigma_L = 0.01; geometric ratio gamma = (10 / 0.01)^(1/23) =
1.35, the solution of Technique 2's Phi(sqrt(2D)(gamma - 1) + 3 gamma) -
Phi(sqrt(2D)(gamma - 1) - 3 gamma) = 0.5 for D = 64 (1.36), hence L = 24. Sampling
(Technique 4): T = 5 steps per level with the step size eps = 2.37e-5 that brings
NCSNv2's Eq. 4 closest to 1 (`sde_samplers.ncsnv2_step_size(1.35, 0.01, 5)`), and the
final denoising step: 24 x 5 + 1 = 121 model evaluations, from NCSN's uniform start
(`sample.langevin_init='uniform'`, U(-1, 1)). The network, optimiser,
labels and guidance are the quick start's (configs/digits.py: width-32 UNet, 1,500
steps of 128, class-conditional with label dropout, guidance scale 2), conditioned on
an embedding of log sigma (`score_matching.noise_label`) with s = output / sigma. The
loss averages over the 64 pixels (`sde.reduce_mean=True`, the quick start's loss
scale); NCSN's code takes half the sum (score_sde: `reduce_mean=False`), the same
gradient direction 2 D = 128 times longer, which only gradient clipping would notice.

`--config.sample.sampler=pc|sde|heun|ode` sample the same model with the reverse-time
SDE on its 24 levels (`sde.num_scales`); `--config.sample.langevin_steps_per_level=20
--config.sample.langevin_step_size=9.84e-6` is Technique 4 at T = 20 (481 NFE).

Measured on a 2-core CPU shared with other jobs (2026-11-29, jax 0.10.2): 39 s to
compile the step, 2.2-4.3 steps/s, 9 min 38 s wall time for the whole command; the grid
shows the requested digits. `--mode=fid` (1,000 samples, the bundled digits network
against the 297 held-out digits): Frechet distance 11.1 with annealed Langevin dynamics
(T = 5, 121 NFE; label accuracy 99.7%; the same from the VE prior), 12.6 (T = 20, 481
NFE; 100%), 15.5 (Heun, 18 steps, 35 NFE), but 32.7 (PC, 48 NFE) and 47.3 (reverse-time SDE, 24 NFE): one
reverse step per level of a ladder this coarse is too few.
"""

from configs import digits


def get_config():
    """Returns the digits NCSN config."""
    config = digits.get_config()
    config.task = 'score'

    sde = config.sde
    sde.kind = 've'
    sde.continuous = False  # NCSN's discrete noise levels.
    sde.sigma_max = 10.0  # sigma_1: NCSNv2 Technique 1 (largest pairwise distance 9.6).
    sde.sigma_min = 0.01  # sigma_L.
    sde.num_scales = 24  # L: NCSNv2 Technique 2 for D = 64 (gamma = 1.35).
    sde.sampling_eps = 1e-5  # score_sde's VE value (the 'pc' / 'sde' / 'ode' end time).
    sde.weighting = 'standard'  # lambda(sigma) = sigma^2 (NCSN).

    sample = config.sample
    sample.respacing = ''
    sample.sampler = 'langevin'
    sample.langevin_num_levels = 0  # The model's 24 levels.
    sample.langevin_steps_per_level = 5  # T.
    sample.langevin_step_size = 2.37e-5  # NCSNv2 Technique 4 for gamma 1.35, T = 5.
    sample.langevin_denoise = True
    sample.langevin_init = 'uniform'  # NCSN's and NCSNv2's start, U(-1, 1) over the data.
    sample.pc_snr = 0.16  # score_sde's VE PC setting.
    sample.num_steps = 18  # 'heun'.

    config.eval.likelihood = 'ode'
    config.eval.num_images = 64
    config.eval.global_batch_size = 64
    return config
