"""Shared settings of the denoising diffusion GAN configs (Xiao et al. 2022).

Not a runnable config: `cifar10_ddgan.py`, `celebahq256_ddgan.py` and
`digits_ddgan.py` apply `make_ddgan` to their dataset's config.
"""


def make_ddgan(config, *, num_timesteps: int, latent_dim: int, n_mlp: int,
               generator: str = 'ncsnpp'):
    """Turns a denoiser config into a DDGAN one: the task, a generator G(x_t, z, t)
    whose mapped latent drives AdaGN and whose output is tanh'd, x_0 prediction
    stepped with the posterior on the discretised VP schedule, DDGAN's Adam (betas
    0.5, 0.9, cosine decay to 1e-5, no clipping) and the 'ddgan' sampler.

    `latent_dim` and `n_mlp` are DDGAN's --nz and --n_mlp: their mapping network is
    dense(nz) then n_mlp more dense layers, each followed by SiLU. `generator`
    'ncsnpp' is their network (NCSN++ with adaptive group norms: train_ddgan.py's
    defaults, FIR resampling, the residual input pyramid, the sinusoidal embedding of
    the step, dropout 0, z mapped to --z_emb_dim 256); 'unet' keeps the config's UNet
    (the latent added to its time embedding, which drives AdaGN), which can also be
    class-conditional.
    """
    config.task = 'ddgan'
    if generator == 'ncsnpp':
        config.model.name = 'ncsnpp'
        config.model.dropout = 0.0
        config.model.conv_resample = True
        ncsnpp = config.model.ncsnpp
        ncsnpp.fir, ncsnpp.fir_kernel, ncsnpp.skip_rescale = True, (1, 3, 3, 1), True
        ncsnpp.resblock_type, ncsnpp.progressive = 'biggan', 'none'
        ncsnpp.progressive_input, ncsnpp.progressive_combine = 'residual', 'sum'
        ncsnpp.embedding_type, ncsnpp.z_emb_dim = 'positional', 256
    elif generator != 'unet':
        raise ValueError(f"generator={generator!r}: choose 'ncsnpp' or 'unet'.")
    config.model.use_scale_shift_norm = True  # The latent enters through AdaGN.
    config.model.latent_dim = latent_dim
    config.model.mapping_layers = n_mlp + 1
    config.model.mapping_activation = 'silu'
    config.model.output_tanh = True  # NCSN++'s torch.tanh(h) (their --not_use_tanh off).
    config.model.class_dropout_prob = 0.0  # No classifier-free guidance for a GAN.
    diffusion = config.diffusion
    diffusion.num_timesteps = num_timesteps
    diffusion.schedule = 'vp'
    diffusion.mean_type = 'x0'
    diffusion.var_type = 'fixed_small'
    config.gan.b1, config.gan.b2 = 0.5, 0.9
    # CosineAnnealingLR(T_max=num_epoch, eta_min=1e-5) in train_ddgan.py. Theirs steps
    # once per epoch (a staircase over num_epoch + 1 epochs); ours decays every step
    # over train.num_train_steps, reaching 1e-5 at the last step.
    config.optim.lr_schedule = 'cosine'
    config.optim.min_learning_rate = 1e-5
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 0.0
    config.sample.sampler = 'ddgan'
    config.sample.respacing = ''
    config.sample.guidance_scale = 1.0
    return config
