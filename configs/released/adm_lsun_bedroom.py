"""python -m ddpm_jax.import_checkpoint --checkpoint=lsun_bedroom.pt --config=configs/released/adm_lsun_bedroom.py --workdir=/path

ADM, unconditional LSUN bedroom 256x256 (552,814,086 parameters; the network of
configs/lsun_bedroom256.py, dropout 0.1): legacy qkv order, linear schedule,
T = 1000, sampled with all 1000 steps (best for LSUN, guided-diffusion's README):

    python main.py --config=configs/released/adm_lsun_bedroom.py --workdir=/path --mode=sample

FID in Dhariwal & Nichol 2021: 1.90.
"""

from configs import lsun_bedroom256
from configs import released


def get_config():
    """Returns the config of lsun_bedroom.pt."""
    config = released.released_adm(lsun_bedroom256.get_config())
    config.data.dataset = 'lsun/bedroom'
    config.sample.respacing = ''  # All 1000 steps.
    return config
