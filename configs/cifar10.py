"""python main.py --config=configs/cifar10.py --workdir=/path

DDPM on CIFAR-10 32x32 (Ho et al. 2020, Sec. 4 and Appendix B): 35.7M parameters.

Unconditional eps-prediction with fixed variances sigma_t^2 = beta_t ('fixed_large'),
the simple MSE loss (Eq. 14), linear betas 1e-4..0.02 over T = 1000; Adam at 2e-4
with 5000 warmup steps, batch 128, 800k steps, gradient clipping at norm 1 per 16
images (each TPU replica), EMA 0.9999, dropout 0.1, random horizontal flips. The
warmup and Adam are their TensorFlow code's: rate 2e-4 * step / 5000 (0 for the first
update) and epsilon added before the bias correction.
"""

from configs import default


def get_config():
    """Returns the DDPM CIFAR-10 config."""
    config = default.get_config()

    data = config.data
    data.dataset = 'cifar10'
    data.image_size = 32
    data.channels = 3

    model = config.model
    model.variant = 'ddpm'
    model.base_channels = 128
    model.channel_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attention_resolutions = (16,)
    model.dropout = 0.1

    config.optim.warmup_steps = 5000
    config.optim.eps_before_bias_correction = True  # tf.train.AdamOptimizer's epsilon.
    # DDPM clipped each of its TPU v3-8's 8 replicas' gradients (16 images each) to norm
    # 1, then averaged them (CrossShardOptimizer; tpu_utils.py: grad_clip / replicas).
    config.optim.grad_clip_groups = 8

    train = config.train
    train.num_train_steps = 800_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.keep_checkpoint_every_steps = 100_000
    train.sample_every_steps = 50_000

    config.eval.num_images = 10_000  # The whole test set, as in the paper's NLL.
    config.eval.global_batch_size = 256
    return config
