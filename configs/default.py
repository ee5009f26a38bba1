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
    #                            'ddgan' (a denoising diffusion GAN), 'autoencoder' (the
    #                            first stage of latent diffusion), 'latent_diffusion',
    #                            'super_resolution' (ADM-U, model.low_res_size > 0) or
    #                            'score' (a continuous-time score model on config.sde).

    # --- data -------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.dataset = 'digits'  # 'digits' (bundled 8x8), 'fake' (synthetic) or a TFDS name.
    data.split = 'train'  # TFDS split used for training.
    data.eval_split = 'test'  # TFDS split used by --mode=eval.
    data.data_dir = ''  # TFDS data_dir; '' uses TFDS's default (~/tensorflow_datasets).
    data.image_size = 8  # Side of the square images fed to the model, in pixels.
    data.channels = 1  # Image channels (1 for digits, 3 for RGB datasets).
    data.center_crop = False  # Centre-crop to a square before resizing (ImageNet, LSUN).
    data.resize = 'bicubic'  # 'bicubic' (one antialiased float resize after the crop) or
    #                          'adm' (guided-diffusion's center_crop_arr: BOX halvings, a
    #                          bicubic short side, the uint8 centre; needs center_crop).
    data.random_crop = False  # Training: guided-diffusion's random_crop_arr (its
    #                           classifiers), a random square of a 1-1.25x short side.
    data.random_flip = True  # Random horizontal flips during training.
    data.wordnet_label_order = True  # WordNet-ID labels (ImageNet) in sorted-ID order, as
    #                                  guided-diffusion: renumbers imagenet_resized's.
    data.num_workers = 0  # grain worker processes per host (0 = in the main process).
    data.prefetch_batches = 2  # Batches prepared ahead of the train step.

    # --- model --------------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.name = 'unet'  # Network (ddpm_jax.models.MODELS): 'unet', 'ncsnpp' or 'classifier'.
    model.variant = 'adm'  # 'ddpm' (Ho et al. 2020) or 'adm' (Dhariwal & Nichol 2021).
    model.bias_init = 'zeros'  # Biases start at 'zeros' or 'torch' (PyTorch's U(+-1/sqrt(
    #                            fan_in)) beside non-zero kernels, as ADM / Improved DDPM).
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
    model.mapping_activation = 'silu'  # Its activation: 'silu' (DDGAN's) or 'leaky_relu'.
    model.output_tanh = False  # tanh on the output (a DDGAN generator's x_0 in (-1, 1)).
    model.pool = 'attention'  # Classifier head: 'attention' pooling or 'adaptive' (mean).
    # Released checkpoints (ddpm_jax.released) and ADM's upsamplers:
    model.legacy_qkv_order = False  # Split the fused qkv into heads before q/k/v (ADM's
    #                                  QKVAttentionLegacy: released weights but 64x64's).
    model.timestep_scale = 1.0  # The network sees t * this (Improved DDPM's released
    #                              models: rescale_timesteps, 1000 / T).
    model.low_res_size = 0  # > 0: a super-resolution UNet (ADM-U) conditioned on a
    #                         low-resolution image of this side, upsampled bilinearly.
    # Cross-attention conditioning (task='latent_diffusion'; Rombach et al. 2022, Sec. 3.3):
    model.context_encoder = 'none'  # What the attention blocks also attend to: 'none',
    #                                 'class' (the label's embedding as one token) or
    #                                 'tokens' (a learned transformer over label tokens).
    model.context_dim = 0  # Width of the context tokens (> 0 with a context encoder).
    model.context_layers = 1  # 'tokens': transformer layers of the context encoder.
    model.context_vocab_size = 0  # 'tokens': token ids 0..this-1 (this = the null token).
    model.context_block = 'cross_attention'  # How: 'cross_attention' (a cross-attention
    #   block after each self-attention block) or 'spatial_transformer' (LDM's: in place
    #   of it, self- and cross-attention and a GEGLU feed-forward layer per block).
    model.context_depth = 1  # 'spatial_transformer': its blocks (LDM's transformer_depth).
    # model.name='ncsnpp' (NCSN++ / DDPM++ of score_sde, DDGAN's generator): the fields
    # of score_sde's configs that the UNet has no counterpart for. base_channels,
    # channel_mult, num_res_blocks, attention_resolutions, dropout and conv_resample are
    # their nf, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv.
    model.ncsnpp = ncsnpp = ml_collections.ConfigDict()
    ncsnpp.fir = True  # FIR up/down-sampling (StyleGAN2's upfirdn2d) with fir_kernel.
    ncsnpp.fir_kernel = (1, 3, 3, 1)
    ncsnpp.skip_rescale = True  # Residual sums divided by sqrt(2).
    ncsnpp.resblock_type = 'biggan'  # 'biggan' (blocks resample) or 'ddpm'.
    ncsnpp.progressive = 'none'  # Output pyramid: 'none', 'output_skip', 'residual'.
    ncsnpp.progressive_input = 'residual'  # Input pyramid: 'none', 'input_skip', 'residual'.
    ncsnpp.progressive_combine = 'sum'  # How 'input_skip' joins: 'sum' or 'cat'.
    ncsnpp.embedding_type = 'positional'  # 'positional' (of t) or 'fourier' (of log sigma).
    ncsnpp.fourier_scale = 16.0  # Std of the Fourier features' frequencies.
    ncsnpp.init_scale = 0.0  # Init scale of each branch's last conv (0 = 1e-10).
    ncsnpp.centered = True  # False: trained on [0, 1] data (score_sde's VE): the
    #                         Fourier embedding takes log(sigma / 2), sigma in [-1, 1] units.
    ncsnpp.z_emb_dim = 256  # DDGAN generator (latent_dim > 0): width of the mapped z.
    model.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (params stay f32).
    model.remat = False  # Rematerialise each block (less memory, more compute).
    model.remat_policy = 'full'  # What a remat block stores: 'full' (inputs only), 'save_convs'.

    # --- diffusion ----------------------------------------------------------------
    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.num_timesteps = 1000  # T, the training timesteps.
    diffusion.schedule = 'linear'  # Beta schedule: linear, cosine, sigmoid, quadratic, vp, ...
    diffusion.beta_start = 0.0  # First and last beta of linear, quadratic, sigmoid, ...: 0 =
    diffusion.beta_end = 0.0  # Ho et al.'s 1e-4, 0.02 scaled by 1000 / T (LDM: 0.0015, 0.0195).
    diffusion.mean_type = 'eps'  # Model predicts 'eps', 'x0', 'xprev' or 'v'.
    diffusion.var_type = 'fixed_large'  # fixed_small, fixed_large, learned, learned_range.
    diffusion.loss_type = 'mse'  # mse, rescaled_mse (hybrid), kl, rescaled_kl.
    diffusion.timestep_sampling = 'uniform'  # Loss timesteps: 'uniform' or 'loss_aware'.

    # --- score-based SDE (task='score'; Song et al. 2021b; ddpm_jax/tasks/score.py) -------
    config.sde = sde = ml_collections.ConfigDict()
    sde.kind = 'vp'  # 'vp', 'subvp' or 've' (variance preserving / sub-VP / exploding).
    sde.beta_min = 0.1  # VP, sub-VP: beta(0) (score_sde: 0.1).
    sde.beta_max = 20.0  # VP, sub-VP: beta(1) (score_sde: 20).
    sde.sigma_min = 0.01  # VE: sigma(0) (score_sde CIFAR-10: 0.01).
    sde.sigma_max = 50.0  # VE: sigma(1) (score_sde CIFAR-10: 50).
    sde.num_scales = 1000  # N: steps of the 'pc' / 'sde' samplers; NCSN's noise levels.
    sde.continuous = True  # False: NCSN's N discrete noise levels (sde.kind='ve' only).
    sde.training_eps = 1e-5  # Smallest training time t (score_sde: 1e-5).
    sde.sampling_eps = 1e-3  # Last sampling time (score_sde: 1e-3 VP / sub-VP, 1e-5 VE).
    sde.weighting = 'standard'  # DSM weight lambda(t): 'standard' (std^2) or 'likelihood'
    #                             (g^2; Song et al. 2021a, maximum likelihood training).
    sde.importance_sampling = True  # 'likelihood': draw t ~ g^2 / std^2 (their Sec. 5).
    sde.reduce_mean = True  # Loss per image: mean over pixels, or False: half the sum.

    # --- GAN (task='ddgan': a denoising diffusion GAN, Xiao et al. 2022) ----------------
    config.gan = gan = ml_collections.ConfigDict()
    gan.disc_base_channels = 32  # Discriminator D(x_{t-1}, x_t, t): its input conv's width.
    gan.disc_channel_mult = (1, 2)  # Its multiplier per residual block; blocks 1.. halve
    #                                 the resolution (models/ddgan_discriminator.py).
    gan.disc_downsample_first = False  # Block 0 halves it too (the paper's large D).
    gan.disc_temb_dim = 256  # Width of D's timestep embedding (DDGAN's --t_emb_dim).
    gan.disc_init = 'ddgan'  # D's initialisation: 'ddgan' (their dense_layer.py) or 'adm'.
    gan.disc_blocks = 'ddgan'  # D's blocks: 'ddgan' (FIR (1,3,3,1) down, 1x1 skips) or
    #                            'simple' (2x2 average, identity skips where shapes keep).
    gan.lr_generator = 1.6e-4  # Generator Adam learning rate (optim.* gives the schedule).
    gan.lr_discriminator = 1.25e-4  # Discriminator Adam learning rate.
    gan.b1 = 0.5  # Adam beta1 of both networks.
    gan.b2 = 0.9  # Adam beta2 of both networks.
    gan.r1_gamma = 0.02  # R1 penalty weight: (r1_gamma / 2) E||grad D(real)||^2.
    gan.lazy_reg = 15  # Apply R1 every N steps (lazy regularisation).

    # --- first-stage autoencoder (task='autoencoder'; Esser et al. 2021, Rombach 2022) ---
    config.autoencoder = ae = ml_collections.ConfigDict()
    ae.kind = 'kl'  # Latent: 'kl' (Gaussian, KL to N(0, I)) or 'vq' (vector-quantised).
    ae.base_channels = 128  # Encoder/decoder channels at the first level.
    ae.channel_mult = (1, 2, 4)  # Multiplier per level; downsampling f = 2^(levels - 1).
    ae.num_res_blocks = 2  # Residual blocks per level (the decoder has one more).
    ae.attention_resolutions = ()  # Image-side pixels with self-attention (besides the mid).
    ae.z_channels = 3  # Latent channels (the VQ codebook's entry width too).
    ae.num_groups = 32  # GroupNorm groups of the autoencoder.
    ae.codebook_size = 8192  # 'vq': codebook entries.
    ae.vq_beta = 0.25  # 'vq': codebook loss weight beta (taming's legacy form; commitment 1).
    ae.kl_weight = 1e-6  # 'kl': weight of the KL term (the L1 term is summed over pixels).
    ae.disc_start = 50_001  # Step from which the adversarial loss and D's updates are on.
    ae.disc_weight = 0.5  # Factor on the adaptive adversarial weight (taming's disc_weight).
    ae.disc_base_channels = 64  # Patch discriminator: channels of its first layer.
    ae.disc_num_layers = 3  # Its stride-2 layers (patch size grows with it).
    ae.disc_num_groups = 32  # Its GroupNorm groups (0 = no normalisation; taming: BatchNorm).
    ae.lr_discriminator = 0.0  # Discriminator Adam rate; 0 = optim.learning_rate.
    ae.lpips_weights_path = ''  # LPIPS v0.1 linear layers (lpips' weights/v0.1/vgg.pth);
    #                               with vgg16_weights_path: the perceptual term; '' = none.
    ae.vgg16_weights_path = ''  # torchvision's VGG16 (vgg16-397923af.pth): LPIPS backbone.
    ae.perceptual_weight = 1.0  # Weight of the LPIPS term (LDM: 1.0) when both are given.
    ae.lpips_dropout = 0.5  # Dropout on LPIPS's squared differences in training, as taming's
    #                        and LDM's LPIPS (its lin layers' Dropout(), on in Lightning's
    #                        train mode); 0 = none.
    ae.init = 'ddpm'  # 'ddpm' (fan_avg kernels, zero biases and attention outputs) or
    #                   'torch' (LDM's: PyTorch's U(+-1/sqrt(fan_in)) on every layer).

    # --- latent diffusion (task='latent_diffusion'; Rombach et al. 2022) -------------
    config.latent = latent = ml_collections.ConfigDict()
    latent.autoencoder_workdir = ''  # Workdir of a trained task='autoencoder' run (frozen).
    latent.scale_factor = 0.0  # Latents are multiplied by this; 0 = measure 1/std of the
    #                            latents of the first batch (kept in the checkpoint).
    latent.cache = 'none'  # 'none': encode each batch inside the jitted step;
    #                        'autoencoder_workdir': encode the training split once into
    #                        <autoencoder_workdir>/latent_cache/ and train on those latents.

    # --- optimisation -------------------------------------------------------------
    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = 'adam'  # 'adam' or 'adamw'.
    optim.learning_rate = 2e-4  # Peak learning rate.
    optim.lr_schedule = 'constant'  # After warmup: 'constant', 'cosine' or 'linear' decay.
    optim.min_learning_rate = 0.0  # Where 'cosine' / 'linear' decay ends (at the last step).
    optim.warmup_steps = 0  # Linear learning-rate warmup, in steps.
    optim.b1 = 0.9  # Adam beta1.
    optim.b2 = 0.999  # Adam beta2.
    optim.eps = 1e-8  # Adam epsilon.
    optim.eps_before_bias_correction = False  # True: TensorFlow's AdamOptimizer (DDPM's):
    #   m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t)); False: optax's and PyTorch's.
    optim.weight_decay = 0.0  # Decoupled weight decay (adamw only).
    optim.grad_clip_norm = 1.0  # Clip gradients to this global norm (0 = off).
    optim.grad_clip_groups = 1  # > 1: clip the gradient of each of this many equal groups
    #                             of the batch, then average (DDPM's per-replica clipping).
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
    train.fid_num_samples = 10_000  # Samples per periodic score (> 2,048 for Inception's FID).

    # --- sampling (--mode=sample and the training grids) ------------------------------
    config.sample = sample = ml_collections.ConfigDict()
    sample.sampler = 'ddpm'  # 'ddpm' (ancestral), 'ddim', 'dpm_solver' (2M), 'ddgan' (a
    #                          GAN's), 'dpm_solver_3m', 'dpm_solver_2s', 'heun' (Karras et
    #                          al. 2022), 'ode' (adaptive probability-flow ODE), 'pc'
    #                          (predictor-corrector), 'sde' (reverse-time SDE) or 'langevin'
    #                          (annealed Langevin dynamics, NCSN); the last five through the
    #                          VP view, or the trained SDE (task='score').
    sample.respacing = ''  # Steps to sample with: '' (all), '250', 'ddim50', '10,15,20'.
    sample.eta = 0.0  # DDIM eta (0 = deterministic).
    sample.num_steps = 18  # 'heun': Karras et al. 2022's steps N (NFE 2N - 1).
    sample.s_churn = 0.0  # 'heun': Karras et al.'s S_churn (0 = deterministic).
    sample.heun_sigma_max = 0.0  # 'heun': cap on the first sigma (0 = the model's largest;
    #                              Karras et al.: 80).
    sample.heun_round_sigma = False  # 'heun': every sigma on a trained level, as EDM's
    #                                  round_sigma for discrete models (iDDPMPrecond).
    sample.ode_solver = 'tsit5'  # 'ode': adaptive diffrax solver, 'tsit5' or 'dopri5' (RK45).
    sample.ode_rtol = 1e-5  # 'ode': relative tolerance (score_sde: 1e-5).
    sample.ode_atol = 1e-5  # 'ode': absolute tolerance (score_sde: 1e-5).
    sample.ode_denoise = True  # 'ode': then one reverse-diffusion mean step at eps, NFE + 1
    #                            (score_sde's sampling.noise_removal, on in its configs).
    sample.predictor = 'reverse_diffusion'  # 'pc' / 'sde' predictor, 'euler_maruyama' or
    #                                         'ancestral_sampling' (VP / VE SDEs).
    sample.corrector = 'langevin'  # 'pc' corrector: 'langevin' (score_sde's PC) or 'ald'
    #                                (NCSN's annealed Langevin dynamics, step by std(t)).
    sample.pc_snr = 0.16  # 'pc': Langevin corrector's signal-to-noise ratio r (score_sde:
    #                       0.16 for VE, 0.01 for VP DDPM models).
    # 'langevin' (Song & Ermon 2019, Alg. 1): x += alpha_i s + sqrt(2 alpha_i) z,
    # alpha_i = eps sigma_i^2 / sigma_L^2, T steps at each of L geometric levels.
    sample.langevin_step_size = 2e-5  # eps (NCSN: 2e-5).
    sample.langevin_steps_per_level = 100  # T (NCSN: 100); NFE = L T (+ 1).
    sample.langevin_num_levels = 10  # L (NCSN: 10); 0 = sde.num_scales (task='score').
    sample.langevin_sigma_max = 0.0  # sigma_1 (0 = the model's largest sigma).
    sample.langevin_sigma_min = 0.0  # sigma_L (0 = the model's smallest sigma).
    sample.langevin_denoise = False  # A final Tweedie step x + sigma_L^2 s (NCSNv2).
    sample.langevin_init = 'prior'  # Start: 'prior' (sigma_1 N(0, I), score_sde) or
    #                                 'uniform' (U(-1, 1) over the data, NCSN's code).
    sample.clip_denoised = True  # Clip predicted x_0 to [-1, 1].
    sample.ema_decay = -1.0  # EMA copy to sample from (-1 = the first in optim.ema_decays).
    sample.guidance_scale = 1.0  # Classifier-free scale (1 = plain conditional).
    sample.classifier_scale = 0.0  # Classifier-guidance gradient scale (0 = off).
    sample.classifier_workdir = ''  # Workdir of a trained noise-aware classifier.
    sample.num_images = 64  # Images written by --mode=sample.
    sample.global_batch_size = 64  # Images per sampling batch, over all devices.
    sample.quantize = 'round'  # Samples to uint8 (.npz files, FID/IS features, grids, a
    #                            cascade's base): 'round' (the inverse of the data's map) or
    #                            'truncate' (guided-diffusion's scripts: floor, -0.5 level).
    sample.label = -1  # Class to sample (-1 = uniformly random labels).
    # task='super_resolution': what --mode=sample upsamples (one of the two).
    sample.low_res_npz = ''  # .npz of uint8 [N, s, s, C] images ('images' or 'arr_0';
    #                          labels from 'labels' or 'arr_1'); the first num_images.
    sample.base_workdir = ''  # Cascade: a base model's workdir, sampled first with its own
    #                           config (and the overrides below), then upsampled.
    sample.base_sampler = ''  # Cascade: the base's sampler ('' = its config's).
    sample.base_respacing = ''  # Cascade: the base's respacing ('' = its config's).
    sample.base_guidance_scale = -1.0  # Cascade: the base's classifier-free scale (-1 = its own).
    sample.base_classifier_scale = -1.0  # Cascade: the base's classifier guidance (-1 = its own).
    sample.base_classifier_workdir = ''  # Cascade: the base's classifier ('' = its config's).

    # --- evaluation ---------------------------------------------------------------
    config.eval = evaluation = ml_collections.ConfigDict()
    evaluation.num_images = 256  # Test images in the bits/dim estimate.
    evaluation.likelihood = 'vb'  # --mode=eval: 'vb' (variational bound, task=diffusion) or
    #                               'ode' (exact, probability-flow ODE; Song et al. 2021b).
    evaluation.ode_trace = 'rademacher'  # 'ode': divergence by 'rademacher' / 'gaussian'
    #                                      Hutchinson probes, or 'exact' (D JVPs).
    evaluation.ode_solver = 'tsit5'  # 'ode': adaptive diffrax solver, 'tsit5' or 'dopri5'.
    evaluation.ode_rtol = 1e-5  # 'ode': relative tolerance (score_sde: 1e-5).
    evaluation.ode_atol = 1e-5  # 'ode': absolute tolerance (score_sde: 1e-5).
    evaluation.ode_eps = 1e-5  # 'ode': the likelihood of x(eps) (score_sde: 1e-5).
    evaluation.global_batch_size = 64  # Images per evaluation batch.
    # --mode=fid (and train.fid_every_steps): FID, sFID, IS, precision/recall.
    evaluation.metrics_network = 'inception'  # 'inception' (FID's) or 'digits' (bundled).
    evaluation.inception_path = ''  # pt_inception-2015-12-05-6726825d.pth; '' = $DDPM_JAX_INCEPTION.
    evaluation.inception_input = 'pytorch_fid'  # Its input resize and scaling: pytorch-fid's
    #                                             or 'tf' (the TF graph's, ADM evaluator's).
    evaluation.fid_num_samples = 50_000  # Samples scored by --mode=fid.
    evaluation.fid_batch_size = 250  # Images per sampling / feature batch, over all devices.
    evaluation.fid_reference = ''  # Reference .npz (ours, or an ADM reference batch); '' =
    #                                computed from the split below, cached in the workdir.
    evaluation.fid_reference_split = 'train'  # Split the reference statistics come from.
    evaluation.fid_reference_num_images = 50_000  # Images of that split used (at most).
    evaluation.fid_samples = ''  # Score this samples .npz instead of sampling the model.
    evaluation.is_split_size = 0  # Inception Score over 10 equal splits (0), or chunks of
    #                               this many (the ADM evaluator: 5000; equal at 50k).
    evaluation.precision_recall_distances = 'auto'  # 'float16' (as Kynkaanniemi et al.'s
    #   code and the ADM evaluator: float32 where float16 overflows), 'float32'; 'auto':
    #   float16 for 'inception', float32 for the 'digits' network.
    evaluation.precision_recall_reference_images = 10_000  # Reference features P/R uses:
    #   the first N (an ADM evaluator reference batch holds 10,000 images); 0 = all.

    return config
