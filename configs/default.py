"""The one config schema of ddpm_jax: every field, with its default and meaning.

Other configs import this file and override only what differs. Nothing in the
library reads a field that is not defined here, and nothing uses
`config.get(field, default)`: a missing or misspelt field fails loudly.

      python main.py --config=configs/default.py --workdir=/tmp/ddpm_default
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config (a tiny unconditional model on the digits)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # Root seed: parameters, data order, per-step noise.
    config.task = 'diffusion'  # What is trained (ddpm_jax.tasks): 'diffusion' (a denoiser),
    #                            'classifier' (a noise-aware classifier for guidance) or
    #                            'ddgan' (a denoising diffusion GAN).

    # --- data -------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.dataset = 'digits'  # 'digits' (bundled 8x8), 'fake' (synthetic) or a TFDS name.
    data.split = 'train'  # TFDS split used for training.
    data.eval_split = 'test'  # TFDS split used by --mode=eval.
    data.data_dir = ''  # TFDS data_dir; '' uses TFDS's default (~/tensorflow_datasets).
    data.image_size = 8  # Side of the square images fed to the model, in pixels.
    data.channels = 1  # Image channels (1 for digits, 3 for RGB datasets).
    data.center_crop = False  # Centre-crop to a square before resizing (ImageNet, LSUN).
    data.random_flip = True  # Random horizontal flips during training.
    data.num_workers = 0  # grain worker processes per host (0 = in the main process).
    data.prefetch_batches = 2  # Batches prepared ahead of the train step.

    # --- model --------------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.name = 'unet'  # Network (ddpm_jax.models.MODELS): 'unet' or 'classifier'.
    model.variant = 'adm'  # 'ddpm' (Ho et al. 2020) or 'adm' (Dhariwal & Nichol 2021).
    model.base_channels = 32  # Channels at the first resolution.
    model.channel_mult = (1, 2)  # Channel multiplier per resolution level.
    model.num_res_blocks = 1  # Residual blocks per resolution level.
    model.attention_resolutions = (4,)  # Resolutions (pixels) with self-attention.
    model.num_heads = 1  # Attention heads (used when num_head_channels == -1).
    model.num_head_channels = -1  # Channels per head; -1 derives it from num_heads.
    model.dropout = 0.0  # Dropout rate in the residual blocks.
    model.resblock_updown = False  # BigGAN-style residual up/down-sampling blocks.
    model.use_scale_shift_norm = False  # Adaptive group norm ("AdaGN") conditioning.
    model.conv_resample = True  # Convolutions in the plain up/down-sampling layers.
    model.num_groups = 32  # GroupNorm groups.
    model.num_classes = 0  # Class-conditional if > 0 (labels 0..num_classes-1).
    model.class_dropout_prob = 0.0  # If > 0, train for classifier-free guidance: labels
    #                                   are replaced by the null label (= num_classes).
    model.learn_sigma = False  # Output 2*channels: eps and the variance interpolation.
    model.latent_dim = 0  # > 0: a DDGAN generator G(x_t, z, t) with z of this size.
    model.mapping_layers = 3  # Dense layers of the generator's latent mapping network.
    model.pool = 'attention'  # Classifier head: 'attention' pooling or 'adaptive' (mean).
    model.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (params stay f32).
    model.remat = False  # Rematerialise each block (less memory, more compute).

    # --- diffusion ----------------------------------------------------------------
    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.num_timesteps = 1000  # T, the training timesteps.
    diffusion.schedule = 'linear'  # Beta schedule: linear, cosine, sigmoid, quadratic, vp, ...
    diffusion.mean_type = 'eps'  # Model predicts 'eps', 'x0', 'xprev' or 'v'.
    diffusion.var_type = 'fixed_large'  # fixed_small, fixed_large, learned, learned_range.
    diffusion.loss_type = 'mse'  # mse, rescaled_mse (hybrid), kl, rescaled_kl.
    diffusion.timestep_sampling = 'uniform'  # Loss timesteps: 'uniform' or 'loss_aware'.

    # --- GAN (task='ddgan': a denoising diffusion GAN, Xiao et al. 2022) ----------------
    config.gan = gan = ml_collections.ConfigDict()
    gan.disc_base_channels = 32  # Discriminator D(x_{t-1}, x_t, t): channels at level 0.
    gan.disc_channel_mult = (1, 2)  # Its channel multiplier per resolution level.
    gan.disc_num_res_blocks = 1  # Its residual blocks per level.
    gan.disc_attention_resolutions = ()  # Its self-attention resolutions (pixels).
    gan.disc_num_groups = 8  # Its GroupNorm groups.
    gan.lr_generator = 1.6e-4  # Generator Adam learning rate (optim.* gives the schedule).
    gan.lr_discriminator = 1.25e-4  # Discriminator Adam learning rate.
    gan.b1 = 0.5  # Adam beta1 of both networks.
    gan.b2 = 0.9  # Adam beta2 of both networks.
    gan.r1_gamma = 0.02  # R1 penalty weight: (r1_gamma / 2) E||grad D(real)||^2.
    gan.lazy_reg = 15  # Apply R1 every N steps (lazy regularisation).

    # --- optimisation -------------------------------------------------------------
    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = 'adam'  # 'adam' or 'adamw'.
    optim.learning_rate = 2e-4  # Peak learning rate.
    optim.lr_schedule = 'constant'  # After warmup: 'constant', 'cosine' or 'linear' decay.
    optim.warmup_steps = 0  # Linear learning-rate warmup, in steps.
    optim.b1 = 0.9  # Adam beta1.
    optim.b2 = 0.999  # Adam beta2.
    optim.eps = 1e-8  # Adam epsilon.
    optim.weight_decay = 0.0  # Decoupled weight decay (adamw only).
    optim.grad_clip_norm = 1.0  # Clip gradients to this global norm (0 = off).
    optim.ema_decays = (0.9999,)  # One EMA copy of the parameters per decay rate.

    # --- training -----------------------------------------------------------------
    config.train = train = ml_collections.ConfigDict()
    train.global_batch_size = 128  # Images per step, over all devices and processes.
    train.grad_accum_steps = 1  # Micro-batches per step (global batch split into these).
    train.num_train_steps = 1000  # Total optimiser steps.
    train.log_every_steps = 50  # Metrics to stdout and TensorBoard every N steps.
    train.checkpoint_every_steps = 500  # Save a checkpoint every N steps.
    train.keep_checkpoints = 3  # Most recent checkpoints kept.
    train.keep_checkpoint_every_steps = 0  # Also keep every checkpoint at multiples of N.
    train.sample_every_steps = 0  # Write an EMA sample grid every N steps (0 = only at end).
    train.num_grid_samples = 64  # Images in each sample grid.
    train.fid_every_steps = 0  # Score EMA samples (eval.metrics_network) every N steps (0 = off).
    train.fid_num_samples = 1000  # Samples per periodic score (FID is biased upwards for few).

    # --- sampling (--mode=sample and the training grids) ------------------------------
    config.sample = sample = ml_collections.ConfigDict()
    sample.sampler = 'ddpm'  # 'ddpm' (ancestral), 'ddim', 'dpm_solver' or 'ddgan' (a GAN's).
    sample.respacing = ''  # Steps to sample with: '' (all), '250', 'ddim50', '10,15,20'.
    sample.eta = 0.0  # DDIM eta (0 = deterministic).
    sample.clip_denoised = True  # Clip predicted x_0 to [-1, 1].
    sample.ema_decay = -1.0  # EMA copy to sample from (-1 = the first in optim.ema_decays).
    sample.guidance_scale = 1.0  # Classifier-free scale (1 = plain conditional).
    sample.classifier_scale = 0.0  # Classifier-guidance gradient scale (0 = off).
    sample.classifier_workdir = ''  # Workdir of a trained noise-aware classifier.
    sample.num_images = 64  # Images written by --mode=sample.
    sample.global_batch_size = 64  # Images per sampling batch, over all devices.
    sample.label = -1  # Class to sample (-1 = uniformly random labels).

    # --- evaluation ---------------------------------------------------------------
    config.eval = evaluation = ml_collections.ConfigDict()
    evaluation.num_images = 256  # Test images in the bits/dim estimate.
    evaluation.global_batch_size = 64  # Images per evaluation batch.
    # --mode=fid (and train.fid_every_steps): FID, sFID, IS, precision/recall.
    evaluation.metrics_network = 'inception'  # 'inception' (FID's) or 'digits' (bundled).
    evaluation.inception_path = ''  # pt_inception-2015-12-05-6726825d.pth; '' = $DDPM_JAX_INCEPTION.
    evaluation.fid_num_samples = 50_000  # Samples scored by --mode=fid.
    evaluation.fid_batch_size = 250  # Images per sampling / feature batch, over all devices.
    evaluation.fid_reference = ''  # Reference .npz (ours, or an ADM reference batch); '' =
    #                                computed from the split below, cached in the workdir.
    evaluation.fid_reference_split = 'train'  # Split the reference statistics come from.
    evaluation.fid_reference_num_images = 50_000  # Images of that split used (at most).
    evaluation.fid_samples = ''  # Score this samples .npz instead of sampling the model.

    return config
