"""Configs of the released ADM and Improved DDPM checkpoints, one per file.

Each config is named after the file it loads (configs/released/adm_64x64_diffusion.py
for guided-diffusion's 64x64_diffusion.pt, iddpm_cifar10.py for Improved DDPM's
cifar10_uncond_50M_500K.pt, ...) and holds the architecture of that file and the
sampling flags its authors published (guided-diffusion's and improved-diffusion's
READMEs). Import the weights, then sample:

    python -m ddpm_jax.import_checkpoint --checkpoint=64x64_diffusion.pt \
        --config=configs/released/adm_64x64_diffusion.py --workdir=/tmp/adm64
    python main.py --config=configs/released/adm_64x64_diffusion.py \
        --workdir=/tmp/adm64 --mode=sample --config.sample.classifier_workdir=/tmp/adm64_clf

The helpers below hold what the released models share; the files override only
what differs. Compute is float32 (the released networks' outputs to round-off);
`--config.model.dtype=bfloat16` is faster.
"""

import ml_collections

from configs import default


def released_adm(config: ml_collections.ConfigDict, *, legacy_qkv_order: bool = True,
                 classifier_scale: float = 0.0) -> ml_collections.ConfigDict:
    """A training config of ours (configs/imagenet*.py, lsun_*.py) as a released model.

    Args:
        config: The architecture's config.
        legacy_qkv_order: QKVAttentionLegacy; every released file but 64x64_diffusion.pt
            (trained with --use_new_attention_order True).
        classifier_scale: The published --classifier_scale (0 for unguided models).
            Guided sampling needs sample.classifier_workdir: the workdir of the
            imported classifier of the same resolution.
    """
    config.model.legacy_qkv_order = legacy_qkv_order
    config.model.dtype = 'float32'
    config.sample.classifier_scale = classifier_scale
    return config


def adm_classifier(image_size: int, channel_mult: tuple, depth: int = 2,
                   schedule: str = 'linear') -> ml_collections.ConfigDict:
    """A released guided-diffusion classifier (create_classifier in script_util.py).

    Width 128, `depth` residual blocks per level, attention at 32, 16 and 8 pixels
    with 64 channels per head (legacy qkv order), BigGAN down-sampling, AdaGN and
    attention pooling to 1000 logits; trained with AdamW (lr 3e-4 annealed, weight
    decay 0.05), batch 256, 300k steps, on the noise of the model it guides
    (`schedule`, T = 1000). For fine-tuning, note that guided-diffusion trained the
    classifiers on random crops (`classifier_train.py`: `random_crop=True`), which
    `data.random_crop` reproduces (with `data.resize='adm'`, its `center_crop_arr` in
    evaluation).
    """
    config = default.get_config()
    config.task = 'classifier'
    data = config.data
    data.dataset = 'imagenet2012' if image_size != 64 else 'imagenet_resized/64x64'
    data.eval_split = 'validation'
    data.image_size = image_size
    data.channels = 3
    data.center_crop = True
    data.resize = 'adm'  # guided-diffusion's center_crop_arr; a no-op on 64x64 images.
    data.random_crop = True

    model = config.model
    model.name = 'classifier'
    model.base_channels = 128
    model.channel_mult = channel_mult
    model.num_res_blocks = depth
    model.attention_resolutions = (32, 16, 8)
    model.num_head_channels = 64
    model.resblock_updown = True
    model.use_scale_shift_norm = True
    model.num_classes = 1000
    model.pool = 'attention'
    model.legacy_qkv_order = True
    model.bias_init = 'torch'  # PyTorch's uniform biases (for training from scratch).

    config.diffusion.schedule = schedule

    optim = config.optim
    optim.optimizer = 'adamw'
    optim.learning_rate = 3e-4
    optim.lr_schedule = 'linear'
    optim.weight_decay = 0.05
    optim.grad_clip_norm = 0.0

    train = config.train
    train.global_batch_size = 256
    train.num_train_steps = 300_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    return config


def adm_upsampler(large_size: int, small_size: int) -> ml_collections.ConfigDict:
    """A released guided-diffusion super-resolution model (sr_create_model).

    ADM-U (Dhariwal & Nichol 2021, App. I): the ADM UNet at `large_size` with width
    192, two residual blocks per level, multipliers 1,1,2,2,4,4, class-conditional,
    learned variances, BigGAN up/down-sampling and AdaGN, whose input is the noisy
    image concatenated with the bilinearly upsampled `small_size` image; linear
    schedule, T = 1000, legacy qkv order. Callers set the heads and attention.
    """
    config = default.get_config()
    config.task = 'super_resolution'  # Trained on area-downsampled inputs (ddpm_jax.tasks).
    data = config.data
    data.dataset = 'imagenet2012'
    data.eval_split = 'validation'
    data.image_size = large_size
    data.channels = 3
    data.center_crop = True
    data.resize = 'adm'  # guided-diffusion's center_crop_arr.

    model = config.model
    model.base_channels = 192
    model.channel_mult = (1, 1, 2, 2, 4, 4)
    model.num_res_blocks = 2
    model.resblock_updown = True
    model.use_scale_shift_norm = True
    model.num_classes = 1000
    model.learn_sigma = True
    model.legacy_qkv_order = True
    model.bias_init = 'torch'  # PyTorch's uniform biases (for training from scratch).
    model.low_res_size = small_size

    diffusion = config.diffusion
    diffusion.var_type = 'learned_range'
    diffusion.loss_type = 'rescaled_mse'

    config.optim.learning_rate = 1e-4
    config.optim.grad_clip_norm = 0.0
    config.train.global_batch_size = 256
    config.sample.respacing = '250'
    config.sample.num_images = 16
    config.sample.global_batch_size = 16
    config.train.num_grid_samples = 16
    return config


def iddpm(image_size: int, channel_mult: tuple, dropout: float) -> ml_collections.ConfigDict:
    """A released Improved DDPM model (improved-diffusion's create_model).

    Nichol & Dhariwal 2021: width 128, three residual blocks per level, attention at
    16 and 8 pixels with 4 heads (legacy qkv order), AdaGN, plain strided-conv /
    nearest up-sampling, learned variances (learned_range) trained with L_hybrid,
    cosine schedule with T = 4000, and the network fed t * 1000 / T
    (rescale_timesteps, on by default in improved-diffusion); Adam lr 1e-4, batch
    128, EMA 0.9999, no random flips (improved-diffusion's `ImageDataset` has none).
    Unconditional.
    """
    config = default.get_config()
    data = config.data
    data.image_size = image_size
    data.channels = 3
    data.random_flip = False

    model = config.model
    model.base_channels = 128
    model.channel_mult = channel_mult
    model.num_res_blocks = 3
    model.attention_resolutions = (16, 8)
    model.num_heads = 4
    model.dropout = dropout
    model.use_scale_shift_norm = True
    model.learn_sigma = True
    model.legacy_qkv_order = True
    model.bias_init = 'torch'  # PyTorch's uniform biases (for training from scratch).

    diffusion = config.diffusion
    diffusion.num_timesteps = 4000
    diffusion.schedule = 'cosine'
    diffusion.var_type = 'learned_range'
    diffusion.loss_type = 'rescaled_mse'
    model.timestep_scale = 1000.0 / diffusion.num_timesteps

    config.optim.learning_rate = 1e-4
    config.optim.grad_clip_norm = 0.0
    config.train.global_batch_size = 128
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 10_000
    return config
