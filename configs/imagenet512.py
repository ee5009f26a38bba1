"""python main.py --config=configs/imagenet512.py --workdir=/path

ADM on ImageNet 512x512, class-conditional: 558,997,638 parameters (559M).

Architecture and training from Dhariwal & Nichol 2021 (Table 11 / App. I and the
released guided-diffusion flags): BigGAN up/down-sampling residual blocks, AdaGN,
attention at 32, 16 and 8 pixels, learned variances (learned_range) trained with
the hybrid loss (Nichol & Dhariwal 2021, Eq. 16), T = 1000, Adam, EMA 0.9999, no
gradient clipping; 256 base channels, 2 residual blocks per level, multipliers
0.5,1,1,2,2,4,4 (128 channels at 512x512), 64 channels per head, no dropout, linear
schedule, lr 1e-4, batch 256, 1940k steps; released in float32 (use_fp16 False).
Sampled with 250 respaced steps.
"""

from configs import adm


def get_config():
    """Returns the ADM ImageNet 512 config."""
    config = adm.get_adm_config()
    config.data.image_size = 512
    config.model.channel_mult = (0.5, 1, 1, 2, 2, 4, 4)
    config.model.dtype = 'float32'  # The released model is float32 (use_fp16 False).
    config.train.num_train_steps = 1_940_000

    config.train.num_grid_samples = 16
    config.sample.num_images = 16
    config.sample.global_batch_size = 16
    config.eval.global_batch_size = 16
    return config
