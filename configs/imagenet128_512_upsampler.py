"""python main.py --config=configs/imagenet128_512_upsampler.py --workdir=/path

ADM-U on ImageNet, 128x128 -> 512x512, class-conditional: 308,835,270 parameters
(the released 128_512_upsampler.pt, configs/released/adm_128_512_upsampler.py).

Dhariwal & Nichol 2021 (Table 11 / App. I and the released guided-diffusion flags):
the ADM UNet at 512x512 whose input is the noisy image concatenated with the
bilinearly upsampled 128x128 image; 192 channels, 2 residual blocks per level,
multipliers 1,1,2,2,4,4, 64 channels per head, attention at 32 and 16 pixels (the
released file's), BigGAN up/down-sampling, AdaGN, no dropout, learned variances
(hybrid loss), linear schedule, T = 1000; Adam at 1e-4, EMA 0.9999, batch 256,
1050k steps. The 128x128 inputs are the training images area-downsampled by 4 in the
step. Sampled with 250 respaced steps, from an .npz of 128x128 images or as a
cascade from an ImageNet 128 model (optionally classifier-guided):

    python main.py --config=configs/imagenet128_512_upsampler.py --workdir=/path \
        --mode=sample --config.sample.base_workdir=/path/to/imagenet128 \
        --config.sample.base_classifier_scale=0.5 \
        --config.sample.base_classifier_workdir=/path/to/classifier128
"""

from configs import adm


def get_config():
    """Returns the ADM-U 128 -> 512 training config."""
    config = adm.get_adm_config()
    config.task = 'super_resolution'
    config.data.image_size = 512

    model = config.model
    model.low_res_size = 128
    model.base_channels = 192
    model.channel_mult = (1, 1, 2, 2, 4, 4)
    model.attention_resolutions = (32, 16)

    config.train.num_train_steps = 1_050_000
    config.train.num_grid_samples = 16
    config.sample.num_images = 16
    config.sample.global_batch_size = 16
    config.eval.global_batch_size = 16
    return config
