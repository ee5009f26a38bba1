"""python -m ddpm_jax.import_checkpoint --checkpoint=64_256_upsampler.pt --config=configs/released/adm_64_256_upsampler.py --workdir=/path

ADM-U, the class-conditional 64x64 -> 256x256 super-resolution model
(Dhariwal & Nichol 2021, App. I; guided-diffusion's SuperResModel): width 192, 4 heads,
attention at 32, 16 and 8 pixels.
The input is the noisy 256x256 image concatenated with the bilinearly upsampled
64x64 image (model.low_res_size=64). Published sampling: 250 respaced steps.

Upsample the 64x64 images of an .npz (uint8 'images' or 'arr_0', with 'labels'
or 'arr_1'), or run the cascade from the imported 64x64 model (writes both
resolutions to <workdir>/samples/):

    python main.py --config=configs/released/adm_64_256_upsampler.py --workdir=/path \
        --mode=sample --config.sample.low_res_npz=samples_64.npz
    python main.py --config=configs/released/adm_64_256_upsampler.py --workdir=/path \
        --mode=sample --config.sample.base_workdir=/path/64x64_diffusion
"""

from configs import released


def get_config():
    """Returns the config of 64_256_upsampler.pt."""
    config = released.adm_upsampler(256, 64)
    config.model.num_heads = 4  # A fixed 4 heads (num_head_channels=-1).
    config.model.attention_resolutions = (32, 16, 8)
    return config
