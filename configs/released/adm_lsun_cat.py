"""python -m ddpm_jax.import_checkpoint --checkpoint=lsun_cat.pt --config=configs/released/adm_lsun_cat.py --workdir=/path

ADM, unconditional LSUN cat 256x256 (552,814,086 parameters; the network of
configs/lsun_bedroom256.py, dropout 0.1): legacy qkv order, linear schedule,
T = 1000, sampled with all 1000 steps (best for LSUN, guided-diffusion's README):

    python main.py --config=configs/released/adm_lsun_cat.py --workdir=/path --mode=sample

FID in Dhariwal & Nichol 2021: 5.57.
"""

from configs import lsun_bedroom256
from configs import released


def get_config():
    """Returns the config of lsun_cat.pt."""
    config = released.released_adm(lsun_bedroom256.get_config())
    config.data.dataset = 'lsun/cat'
    config.sample.respacing = ''  # All 1000 steps.
    return config
