"""python main.py --config=configs/cifar10_vp.py --workdir=/path

A VP SDE score model on CIFAR-10 32x32 with the SDE and training hyperparameters of
score_sde's `configs/vp/cifar10_ddpmpp_continuous.py` (Song et al. 2021b, Sec. 4 and
App. B/D): beta(t) from 0.1 to 20, continuous t ~ U(1e-5, 1), the standard weighting
lambda = std^2 with the loss averaged over pixels (reduce_mean=True), Adam 2e-4 with
5000 warmup steps, gradient clipping at 1, EMA 0.9999, batch 128, 1.3M steps, random
flips; sampling by the reverse-time SDE (Euler-Maruyama, 1000 steps, no corrector)
ending at t = 1e-3, and --mode=eval's likelihood by the probability-flow ODE from
t = 1e-5 (score_sde's likelihood eps). For the likelihood weighting with importance
sampling (Song et al. 2021a) set sde.weighting='likelihood'.

The network is DDPM++ cont. itself (`model.name='ncsnpp'`, models/ncsnpp.py): 128
channels, multipliers 1-2-2-2, 4 BigGAN residual blocks per level (resampling inside,
no FIR), skip connections rescaled by 1/sqrt(2), attention at 16x16, dropout 0.1, the
sinusoidal embedding of 999 t; 61,804,419 parameters, the reference's exactly (its
PyTorch state dict imports: `released.import_state_dict`).
"""

from configs import default


def get_config():
    """Returns the CIFAR-10 VP SDE config."""
    config = default.get_config()
    config.task = 'score'

    data = config.data
    data.dataset = 'cifar10'
    data.image_size = 32
    data.channels = 3

    model = config.model
    model.name = 'ncsnpp'
    model.base_channels = 128
    model.channel_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attention_resolutions = (16,)
    model.dropout = 0.1
    model.conv_resample = True
    ncsnpp = model.ncsnpp  # score_sde's configs/vp/cifar10_ddpmpp_continuous.py.
    ncsnpp.fir = False
    ncsnpp.skip_rescale = True
    ncsnpp.resblock_type = 'biggan'
    ncsnpp.progressive = 'none'
    ncsnpp.progressive_input = 'none'
    ncsnpp.embedding_type = 'positional'
    ncsnpp.init_scale = 0.0

    sde = config.sde
    sde.kind = 'vp'
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.num_scales = 1000
    sde.continuous = True
    sde.training_eps = 1e-5
    sde.sampling_eps = 1e-3
    sde.weighting = 'standard'
    sde.reduce_mean = True

    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip_norm = 1.0
    config.optim.ema_decays = (0.9999,)

    train = config.train
    train.global_batch_size = 128
    train.num_train_steps = 1_300_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.keep_checkpoint_every_steps = 50_000
    train.sample_every_steps = 50_000

    sample = config.sample
    sample.sampler = 'sde'
    sample.predictor = 'euler_maruyama'

    config.eval.likelihood = 'ode'
    config.eval.ode_eps = 1e-5
    config.eval.num_images = 10_000
    config.eval.global_batch_size = 256
    return config
