"""python main.py --config=configs/ldm_imagenet256.py --workdir=/path --config.latent.autoencoder_workdir=/path/to/vq_f4

Class-conditional LDM-4 on ImageNet 256 (Rombach et al. 2022, Tab. 3: FID 3.60 with
classifier-free guidance 1.5 and 250 DDIM steps; the released
configs/latent-diffusion/cin256-v2.yaml): an ADM UNet on the 64x64x3 latents of the
VQ-f4 autoencoder (configs/autoencoder_vq_f4.py), channels 192 with multipliers
1, 2, 3, 5, two residual blocks per level, one attention head, at latent sides 32,
16, 8 (image pixels 128, 64, 32 here) and in the middle LDM's SpatialTransformer of
depth 1 (model.context_block; self-attention, cross-attention to the label's learned
512-wide embedding and a GEGLU feed-forward layer; the embedding one token, 1,001
rows, the last the null label of classifier-free guidance, which the label becomes 10%
of the time: LDM's repository has no label-dropout code, so that rate is ours, as in
Ho & Salimans' experiments);
eps prediction, T = 1000, LDM's betas ('quadratic' from 0.0015 to 0.0195); AdamW at
1e-4. Batch and steps are ours (the repository's config gives neither). As
cin256-v2.yaml (use_ema: False), samples, grids and FID use the raw parameters:
optim.ema_decays = (0.0,) keeps the one "EMA" copy equal to them (e <- 0 e + 1 p,
exactly). Parameters (jax.eval_shape): 401,433,091, LDM's UNetModel of this config
counted in PyTorch (400,920,579) and its ClassEmbedder (1,001 x 512).
"""

from configs import default


def get_config():
    """Returns the class-conditional LDM-4 ImageNet 256 config."""
    config = default.get_config()
    config.task = 'latent_diffusion'

    data = config.data
    data.dataset = 'imagenet2012'
    data.image_size = 256
    data.channels = 3
    data.center_crop = True  # LDM's ImageNetTrain crops at random (taming's RandomCrop).
    data.random_flip = False  # ... and does not flip.

    config.latent.autoencoder_workdir = '/path/to/vq_f4'
    config.latent.scale_factor = 1.0
    # Encoded in the step: a cache of the 1.28M images would take 63 GB of float32
    # latents (latent.cache='autoencoder_workdir' if you have it).
    config.latent.cache = 'none'

    m = config.model
    m.bias_init = 'torch'  # PyTorch's uniform biases, as LDM's UNet starts.
    m.variant = 'adm'
    m.base_channels = 192
    m.channel_mult = (1, 2, 3, 5)
    m.num_res_blocks = 2
    m.attention_resolutions = (128, 64, 32)  # Image pixels: latent sides 32, 16, 8.
    m.num_heads = 1
    m.num_head_channels = -1
    m.num_groups = 32
    m.num_classes = 1000
    m.class_dropout_prob = 0.1
    m.context_encoder = 'class'
    m.context_dim = 512
    m.context_block = 'spatial_transformer'  # use_spatial_transformer: true
    m.context_depth = 1  # transformer_depth: 1

    d = config.diffusion
    d.num_timesteps = 1000
    d.schedule = 'quadratic'  # LDM's 'linear': linspace(sqrt(start), sqrt(end), T) ** 2.
    d.beta_start, d.beta_end = 0.0015, 0.0195
    d.mean_type = 'eps'
    d.var_type = 'fixed_small'

    optim = config.optim
    optim.optimizer = 'adamw'
    optim.weight_decay = 0.01  # torch.optim.AdamW's default, which LDM uses.
    optim.learning_rate = 1e-4
    optim.grad_clip_norm = 0.0
    optim.ema_decays = (0.0,)  # The raw parameters: cin256-v2.yaml has use_ema: False.

    train = config.train
    train.global_batch_size = 256
    train.num_train_steps = 500_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.keep_checkpoint_every_steps = 100_000
    train.num_grid_samples = 16

    s = config.sample
    s.sampler = 'ddim'
    s.respacing = 'ddim250'
    s.guidance_scale = 1.5
    s.clip_denoised = False
    s.num_images = 16
    s.global_batch_size = 16
    return config
