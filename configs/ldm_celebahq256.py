"""python main.py --config=configs/ldm_celebahq256.py --workdir=/path --config.latent.autoencoder_workdir=/path/to/vq_f4

LDM-4 on CelebA-HQ 256 (Rombach et al. 2022, Tab. 1: FID 5.11, 274M parameters; the
released configs/latent-diffusion/celebahq-ldm-vq-4.yaml): an unconditional ADM UNet
on the 64x64x3 latents of the VQ-f4 autoencoder (configs/autoencoder_vq_f4.py),
channels 224 with multipliers 1, 2, 3, 4, two residual blocks per level, attention at
latent sides 32, 16, 8 (image pixels 128, 64, 32 here), 32 channels per head; eps
prediction, T = 1000; AdamW at 2e-6 per image of the batch of 48 (9.6e-5), 410k
steps, EMA 0.9999; latents unscaled (a VQ first stage: scale factor 1), sampled with
DDIM; LDM's betas (its 'linear': a line from sqrt(0.0015) to sqrt(0.0195), squared,
i.e. 'quadratic' with diffusion.beta_start / beta_end = 0.0015 / 0.0195). Differs
from the paper: the EMA has no warm-up: LDM's LitEma
(use_ema defaults to True) decays at min(0.9999, (1 + n) / (10 + n)) after update n,
reaching 0.9999 only at n = 89,990, while ours is 0.9999 from the first step (the
generic EMA of ddpm_jax.state has no warm-up). From then on both follow the same
recursion, so their difference shrinks by 0.9999 a step: e^-32 after the 410k steps
(negligible), but early checkpoints' EMAs differ. UNet parameters
(jax.eval_shape): 274,056,163.
"""

from configs import default


def get_config():
    """Returns the LDM-4 CelebA-HQ 256 config."""
    config = default.get_config()
    config.task = 'latent_diffusion'

    data = config.data
    data.dataset = 'celeb_a_hq/256'
    data.eval_split = 'train'
    data.image_size = 256
    data.channels = 3

    config.latent.autoencoder_workdir = '/path/to/vq_f4'
    data.random_flip = False  # LDM's CelebAHQTrain (taming's faceshq.py) does not flip.

    config.latent.scale_factor = 1.0
    # Encode the 30,000 images once: 1.5 GB of float32 VQ latents next to the
    # autoencoder's checkpoints, instead of the VQ-f4 encoder in each of the 410k steps.
    config.latent.cache = 'autoencoder_workdir'

    m = config.model
    m.bias_init = 'torch'  # PyTorch's uniform biases, as LDM's UNet starts.
    m.variant = 'adm'
    m.base_channels = 224
    m.channel_mult = (1, 2, 3, 4)
    m.num_res_blocks = 2
    m.attention_resolutions = (128, 64, 32)  # Image pixels: latent sides 32, 16, 8.
    m.num_head_channels = 32
    m.legacy_qkv_order = True  # LDM's AttentionBlock: QKVAttentionLegacy (no new order).
    m.num_groups = 32

    d = config.diffusion
    d.num_timesteps = 1000
    d.schedule = 'quadratic'  # LDM's 'linear': linspace(sqrt(start), sqrt(end), T) ** 2.
    d.beta_start, d.beta_end = 0.0015, 0.0195
    d.mean_type = 'eps'
    d.var_type = 'fixed_small'

    optim = config.optim
    optim.optimizer = 'adamw'
    optim.weight_decay = 0.01  # torch.optim.AdamW's default, which LDM uses.
    optim.learning_rate = 2e-6 * 48
    optim.grad_clip_norm = 0.0
    optim.ema_decays = (0.9999,)

    train = config.train
    train.global_batch_size = 48
    train.num_train_steps = 410_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.keep_checkpoint_every_steps = 100_000
    train.num_grid_samples = 16

    s = config.sample
    s.sampler = 'ddim'
    s.respacing = 'ddim500'
    s.clip_denoised = False
    s.num_images = 16
    s.global_batch_size = 16
    return config
