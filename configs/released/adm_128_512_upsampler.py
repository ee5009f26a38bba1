"""python -m ddpm_jax.import_checkpoint --checkpoint=128_512_upsampler.pt --config=configs/released/adm_128_512_upsampler.py --workdir=/path

ADM-U, the class-conditional 128x128 -> 512x512 super-resolution model
(Dhariwal & Nichol 2021, App. I; guided-diffusion's SuperResModel): width 192, 64
channels per head, attention at 32 and 16 pixels.
The input is the noisy 512x512 image concatenated with the bilinearly upsampled
128x128 image (model.low_res_size=128). Published sampling: 250 respaced steps.

Upsample the 128x128 images of an .npz (uint8 'images' or 'arr_0', with 'labels'
or 'arr_1'), or run the cascade from the imported 128x128 model (writes both
resolutions to <workdir>/samples/):

    python main.py --config=configs/released/adm_128_512_upsampler.py --workdir=/path \
        --mode=sample --config.sample.low_res_npz=samples_128.npz
    python main.py --config=configs/released/adm_128_512_upsampler.py --workdir=/path \
        --mode=sample --config.sample.base_workdir=/path/128x128_diffusion
"""

from configs import released


def get_config():
    """Returns the config of 128_512_upsampler.pt."""
    config = released.adm_upsampler(512, 128)
    config.model.num_head_channels = 64
    config.model.attention_resolutions = (32, 16)
    return config
