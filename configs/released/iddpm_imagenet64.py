"""python -m ddpm_jax.import_checkpoint --checkpoint=imagenet64_uncond_100M_1500K.pt --config=configs/released/iddpm_imagenet64.py --workdir=/path

Improved DDPM (Nichol & Dhariwal 2021), unconditional ImageNet 64x64 with L_hybrid and the
cosine schedule (imagenet64_uncond_100M_1500K.pt; improved-diffusion's README flags --image_size 64
--num_channels 128 --num_res_blocks 3 --learn_sigma True
--diffusion_steps 4000 --noise_schedule cosine; rescale_timesteps on by default, so the
network sees t / 4). Sampled with all 4000 steps, as in the paper's FID:

    python main.py --config=configs/released/iddpm_imagenet64.py --workdir=/path --mode=sample

"""

from configs import released


def get_config():
    """Returns the config of imagenet64_uncond_100M_1500K.pt."""
    config = released.iddpm(64, (1, 2, 3, 4), dropout=0.0)
    config.data.dataset = 'imagenet_resized/64x64'
    config.data.eval_split = 'validation'
    return config
