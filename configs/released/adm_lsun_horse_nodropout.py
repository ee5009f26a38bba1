"""python -m ddpm_jax.import_checkpoint --checkpoint=lsun_horse_nodropout.pt --config=configs/released/adm_lsun_horse_nodropout.py --workdir=/path

ADM, unconditional LSUN horse 256x256 (552,814,086 parameters; the network of
configs/lsun_bedroom256.py, dropout 0.0): legacy qkv order, linear schedule,
T = 1000, sampled with all 1000 steps (best for LSUN, guided-diffusion's README):

    python main.py --config=configs/released/adm_lsun_horse_nodropout.py \
        --workdir=/path --mode=sample

FID in Dhariwal & Nichol 2021: 2.57 is of lsun_horse.pt; this is its dropout-free twin.
"""

from configs import lsun_bedroom256
from configs import released


def get_config():
    """Returns the config of lsun_horse_nodropout.pt."""
    config = released.released_adm(lsun_bedroom256.get_config())
    config.data.dataset = 'lsun/horse'
    config.model.dropout = 0.0
    config.sample.respacing = ''  # All 1000 steps.
    return config
