"""python main.py --config=configs/celebahq256.py --workdir=/path

DDPM's 256x256 model on CelebA-HQ (Ho et al. 2020, App. B): 113,673,219 parameters.

The same network serves DDPM's LSUN 256x256 runs (change data.dataset to e.g.
'lsun/church_outdoor' with data.center_crop = True and train.num_train_steps).
Channels 128 with multipliers 1,1,2,2,4,4, two residual blocks per level, attention
at 16x16, no dropout; unconditional eps prediction with the posterior variance
sigma_t^2 = beta~_t ('fixed_small': these runs' `diffusion_utils.GaussianDiffusion`
samples with `q_posterior`'s variance; only CIFAR-10's `diffusion_utils_2` takes
beta_t), MSE loss, linear betas over T = 1000; Adam at 2e-5 with 5000 warmup steps
(TensorFlow's epsilon placement, as cifar10.py), batch 64, 0.5M steps, gradient
clipping at norm 1 per 8 images (each TPU replica), EMA 0.9999. (DDPM's LSUN cat run
also turned random flips off: --randflip 0.)
"""

from configs import default


def get_config():
    """Returns the DDPM CelebA-HQ 256 config."""
    config = default.get_config()

    data = config.data
    data.dataset = 'celeb_a_hq/256'
    data.eval_split = 'train'  # The TFDS dataset has only a train split.
    data.image_size = 256
    data.channels = 3

    model = config.model
    model.variant = 'ddpm'
    model.base_channels = 128
    model.channel_mult = (1, 1, 2, 2, 4, 4)
    model.num_res_blocks = 2
    model.attention_resolutions = (16,)

    config.diffusion.var_type = 'fixed_small'  # The posterior variance (docstring).

    optim = config.optim
    optim.learning_rate = 2e-5
    optim.warmup_steps = 5000
    optim.eps_before_bias_correction = True  # tf.train.AdamOptimizer's epsilon.
    optim.grad_clip_groups = 8  # DDPM's per-replica clipping on a TPU v3-8 (8 images each).

    train = config.train
    train.global_batch_size = 64
    train.num_train_steps = 500_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.keep_checkpoint_every_steps = 100_000
    train.sample_every_steps = 50_000
    train.num_grid_samples = 16

    config.sample.num_images = 16
    config.sample.global_batch_size = 16
    config.eval.global_batch_size = 16
    return config
