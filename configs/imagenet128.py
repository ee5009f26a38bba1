"""python main.py --config=configs/imagenet128.py --workdir=/path

ADM on ImageNet 128x128, class-conditional: 421,529,606 parameters.

Architecture and training from Dhariwal & Nichol 2021 (Table 11 / App. I and the
released guided-diffusion flags): BigGAN up/down-sampling residual blocks, AdaGN,
attention at 32, 16 and 8 pixels, learned variances (learned_range) trained with
the hybrid loss (Nichol & Dhariwal 2021, Eq. 16), T = 1000, Adam, EMA 0.9999, no
gradient clipping; 256 channels, 2 residual blocks per level, multipliers
1,1,2,3,4, 4 heads, no dropout, linear schedule, lr 1e-4, batch 256, 4360k steps.
Sampled with 250 respaced steps.
"""

from configs import adm


def get_config():
    """Returns the ADM ImageNet 128 config."""
    config = adm.get_adm_config()
    config.data.image_size = 128

    model = config.model
    model.channel_mult = (1, 1, 2, 3, 4)
    model.num_heads = 4
    model.num_head_channels = -1  # A fixed 4 heads, not 64 channels per head.

    config.train.num_train_steps = 4_360_000
    return config
