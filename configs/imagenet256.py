"""python main.py --config=configs/imagenet256.py --workdir=/path

ADM on ImageNet 256x256, class-conditional: 553,838,086 parameters.

Architecture and training from Dhariwal & Nichol 2021 (Table 11 / App. I and the
released guided-diffusion flags): BigGAN up/down-sampling residual blocks, AdaGN,
attention at 32, 16 and 8 pixels, learned variances (learned_range) trained with
the hybrid loss (Nichol & Dhariwal 2021, Eq. 16), T = 1000, Adam, EMA 0.9999, no
gradient clipping; 256 channels, 2 residual blocks per level, multipliers
1,1,2,2,4,4, 64 channels per head, no dropout, linear schedule, lr 1e-4, batch 256,
1980k steps. Sampled with 250 respaced steps.
"""

from configs import adm


def get_config():
    """Returns the ADM ImageNet 256 config."""
    config = adm.get_adm_config()
    config.data.image_size = 256
    config.model.channel_mult = (1, 1, 2, 2, 4, 4)
    config.train.num_train_steps = 1_980_000

    config.train.num_grid_samples = 16
    config.sample.num_images = 16
    config.sample.global_batch_size = 16
    config.eval.global_batch_size = 16
    return config
