"""python main.py --config=configs/imagenet64_256_upsampler.py --workdir=/path

ADM-U on ImageNet, 64x64 -> 256x256, class-conditional: 311,795,910 parameters (the
released 64_256_upsampler.pt, configs/released/adm_64_256_upsampler.py).

Dhariwal & Nichol 2021 (Table 11 / App. I and the released guided-diffusion flags):
the ADM UNet at 256x256 whose input is the noisy image concatenated with the
bilinearly upsampled 64x64 image; 192 channels, 2 residual blocks per level,
multipliers 1,1,2,2,4,4, 4 heads, attention at 32, 16 and 8 pixels, BigGAN
up/down-sampling, AdaGN, no dropout, learned variances (hybrid loss), linear
schedule, T = 1000; Adam at 1e-4, EMA 0.9999, batch 256, 500k steps. The 64x64
inputs are the training images area-downsampled by 4 in the step (as
guided-diffusion's super_res_train.py). Sampled with 250 respaced steps, from an
.npz of 64x64 images or as a cascade from an ImageNet 64 model:

    python main.py --config=configs/imagenet64_256_upsampler.py --workdir=/path \
        --mode=sample --config.sample.base_workdir=/path/to/imagenet64
"""

from configs import adm


def get_config():
    """Returns the ADM-U 64 -> 256 training config."""
    config = adm.get_adm_config()
    config.task = 'super_resolution'
    config.data.image_size = 256

    model = config.model
    model.low_res_size = 64
    model.base_channels = 192
    model.channel_mult = (1, 1, 2, 2, 4, 4)
    model.num_heads = 4
    model.num_head_channels = -1  # A fixed 4 heads, as the released file.

    config.train.num_train_steps = 500_000
    config.train.num_grid_samples = 16
    config.sample.num_images = 16
    config.sample.global_batch_size = 16
    config.eval.global_batch_size = 16
    return config
