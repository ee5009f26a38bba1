"""python main.py --config=configs/cifar10_ve.py --workdir=/path

A VE SDE score model on CIFAR-10 32x32 with the SDE and training hyperparameters of
score_sde's `configs/ve/cifar10_ncsnpp_continuous.py` (Song et al. 2021b, Sec. 4 and
App. C/D; FID 2.38, IS 9.83): sigma_min 0.01, sigma_max 50 on their [0, 1] data
(below), continuous t ~ U(1e-5, 1), the standard
weighting lambda = sigma^2 with the loss summed over pixels (their reduce_mean=False),
Adam 2e-4 with 5000 warmup steps, gradient clipping at 1, EMA 0.999, batch 128,
1.3M steps, random flips; PC sampling (reverse diffusion + Langevin, snr 0.16, 1000
steps, ending at t = 1e-5).

The network is NCSN++ cont. itself (`model.name='ncsnpp'`): DDPM++'s blocks with FIR
(1, 3, 3, 1) resampling, the input pyramid added at every resolution
(progressive_input='residual') and random Fourier features (scale 16) of log sigma,
fed sigma(t) as score_sde's continuous VE models are (`tasks.score.label_kind`);
62,758,915 parameters, the reference's exactly. Its output is divided by sigma
(their scale_by_sigma) when read as the score.

score_sde's VE models see data x in [0, 1] (data.centered=False) and map it to 2x - 1
inside the network; our images are y = 2x - 1 already, where every noise level is
twice theirs. So this config runs their process in our units: sigma from 0.02 to 100,
the network fed sigma and embedding log(sigma / 2), the level in its own units
(`model.ncsnpp.centered=False`); then s_y = s_x / 2 and the loss, the predictor's and
the corrector's steps are theirs mapped by y = 2x - 1, and their released checkpoints
import and sample unchanged (`python -m ddpm_jax.import_checkpoint
--checkpoint=checkpoint_24.pth --config=configs/cifar10_ve.py --workdir=...`).
"""

from configs import cifar10_vp


def get_config():
    """Returns the CIFAR-10 VE SDE config: the VP config's data, optimiser, schedule of
    saves and likelihood evaluation, with score_sde's VE settings and NCSN++."""
    config = cifar10_vp.get_config()

    # score_sde's configs/ve/cifar10_ncsnpp_continuous.py: DDPM++ with FIR, the residual
    # input pyramid and Fourier features (kernel (1, 3, 3, 1) and scale 16: the defaults).
    ncsnpp = config.model.ncsnpp
    ncsnpp.fir = True
    ncsnpp.progressive_input = 'residual'
    ncsnpp.embedding_type = 'fourier'

    sde = config.sde
    sde.kind = 've'
    sde.sigma_min = 0.02  # score_sde's 0.01 and 50 on [0, 1] data, in [-1, 1] units.
    sde.sigma_max = 100.0
    config.model.ncsnpp.centered = False  # Embeds log(sigma / 2): their units.
    sde.sampling_eps = 1e-5
    sde.reduce_mean = False

    config.optim.ema_decays = (0.999,)

    sample = config.sample
    sample.sampler = 'pc'
    sample.predictor = 'reverse_diffusion'
    sample.pc_snr = 0.16
    return config
