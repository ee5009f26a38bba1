"""python main.py --config=configs/cifar10_ve.py --workdir=/path

A VE SDE score model on CIFAR-10 32x32 with the SDE and training hyperparameters of
score_sde's `configs/ve/cifar10_ncsnpp_continuous.py` (Song et al. 2021b, Sec. 4 and
App. C/D): sigma_min 0.01, sigma_max 50, continuous t ~ U(1e-5, 1), the standard
weighting lambda = sigma^2 with the loss summed over pixels (their reduce_mean=False),
Adam 2e-4 with 5000 warmup steps, gradient clipping at 1, EMA 0.999, batch 128,
1.3M steps, random flips; PC sampling (reverse diffusion + Langevin, snr 0.16, 1000
steps, ending at t = 1e-5).

The architecture differs: NCSN++ (FIR resampling, skip rescaling, random Fourier
features of log sigma) is not in ddpm_jax, so this is our UNet at NCSN++'s width and
depth (128 channels, multipliers 1-2-2-2, 4 residual blocks per level, BigGAN-style
up/down-sampling, attention at 16x16, dropout 0.1), conditioned on 999 t, an affine
embedding of log sigma (`score_matching.noise_label`). Our images are in [-1, 1]
where score_sde's VE models saw [0, 1]; sigma_max is kept at the paper's 50.
"""

from configs import cifar10_vp


def get_config():
    """Returns the CIFAR-10 VE SDE config: the VP config's data, network, optimiser,
    schedule of saves and likelihood evaluation, with score_sde's VE settings."""
    config = cifar10_vp.get_config()

    sde = config.sde
    sde.kind = 've'
    sde.sigma_min = 0.01
    sde.sigma_max = 50.0
    sde.sampling_eps = 1e-5
    sde.reduce_mean = False

    config.optim.ema_decays = (0.999,)

    sample = config.sample
    sample.sampler = 'pc'
    sample.predictor = 'reverse_diffusion'
    sample.pc_snr = 0.16
    return config
