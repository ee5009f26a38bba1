"""python -m ddpm_jax.import_checkpoint --checkpoint=lsun_horse.pt --config=configs/released/adm_lsun_horse.py --workdir=/path

ADM, unconditional LSUN horse 256x256 (552,814,086 parameters; the network of
configs/lsun_bedroom256.py, dropout 0.1): legacy qkv order, linear schedule,
T = 1000, sampled with all 1000 steps (best for LSUN, guided-diffusion's README):

    python main.py --config=configs/released/adm_lsun_horse.py --workdir=/path --mode=sample

FID in Dhariwal & Nichol 2021: 2.57.
"""

from configs import lsun_bedroom256
from configs import released


def get_config():
    """Returns the config of lsun_horse.pt."""
    config = released.released_adm(lsun_bedroom256.get_config())
    config.data.dataset = 'lsun/horse'
    config.sample.respacing = ''  # All 1000 steps.
    return config
