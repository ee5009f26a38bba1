"""The settings shared by the ADM configs (Dhariwal & Nichol 2021): not a run itself.

configs/imagenet64.py, imagenet128.py, imagenet256.py, imagenet512.py and
lsun_bedroom256.py start from `get_adm_config()` and override only what differs
(image size, dataset, width, depth, channel multipliers, heads, dropout, schedule,
learning rate, batch, steps, dtype). What they share, from Table 11 / App. I and the
released guided-diffusion flags: BigGAN up/down-sampling residual blocks, AdaGN,
attention at 32, 16 and 8 pixels with 64 channels per head, 256 base channels, two
residual blocks per level, 1000 classes, learned variances (learned_range) trained
with the hybrid loss (Nichol & Dhariwal 2021, Eq. 16), T = 1000, linear betas, Adam
at 1e-4 with EMA 0.9999 and no gradient clipping, batch 256, and sampling with 250
respaced steps; ImageNet 2012, preprocessed as guided-diffusion's `center_crop_arr`
(`data.resize='adm'`). Ours compute in bfloat16 with float32 parameters (theirs:
--use_fp16, float16 with loss scaling and float32 master weights).
"""

import ml_collections

from configs import default


def get_adm_config() -> ml_collections.ConfigDict:
    """Returns the shared ADM base; callers set data.image_size and model.channel_mult."""
    config = default.get_config()

    data = config.data
    data.dataset = 'imagenet2012'
    data.eval_split = 'validation'
    data.channels = 3
    data.center_crop = True
    data.resize = 'adm'  # guided-diffusion's center_crop_arr.

    model = config.model
    model.base_channels = 256
    model.num_res_blocks = 2
    model.attention_resolutions = (32, 16, 8)
    model.num_head_channels = 64
    model.resblock_updown = True
    model.use_scale_shift_norm = True
    model.num_classes = 1000
    model.learn_sigma = True
    model.bias_init = 'torch'  # PyTorch's uniform biases, as guided-diffusion's start.
    model.dtype = 'bfloat16'

    diffusion = config.diffusion
    diffusion.var_type = 'learned_range'
    diffusion.loss_type = 'rescaled_mse'  # L_hybrid = L_simple + 0.001 L_vlb.

    optim = config.optim
    optim.learning_rate = 1e-4
    optim.grad_clip_norm = 0.0  # ADM does not clip gradients.

    train = config.train
    train.global_batch_size = 256
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.keep_checkpoint_every_steps = 100_000
    train.sample_every_steps = 50_000

    config.sample.respacing = '250'
    return config
