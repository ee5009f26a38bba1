"""python -m ddpm_jax.import_checkpoint --checkpoint=cifar10_uncond_50M_500K.pt --config=configs/released/iddpm_cifar10.py --workdir=/path

Improved DDPM (Nichol & Dhariwal 2021), unconditional CIFAR-10 with L_hybrid and the
cosine schedule (cifar10_uncond_50M_500K.pt; improved-diffusion's README flags --image_size 32
--num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3
--diffusion_steps 4000 --noise_schedule cosine; rescale_timesteps on by default, so the
network sees t / 4). Sampled with all 4000 steps, as in the paper's FID:

    python main.py --config=configs/released/iddpm_cifar10.py --workdir=/path --mode=sample

"""

from configs import released


def get_config():
    """Returns the config of cifar10_uncond_50M_500K.pt."""
    config = released.iddpm(32, (1, 2, 2, 2), dropout=0.3)
    config.data.dataset = 'cifar10'
    return config
