"""python main.py --config=configs/cifar10_vp_deep.py --workdir=/path

DDPM++ cont. (deep, VP) on CIFAR-10: score_sde's `configs/vp/cifar10_ddpmpp_deep_continuous.py`
(Song et al. 2021b, Table 3: FID 2.41, 2.99 bits/dim), `cifar10_vp.py` with 8 residual
blocks per level (106,632,579 parameters, the reference's) and 950,001 training steps.
"""

from configs import cifar10_vp


def get_config():
    """Returns the deep DDPM++ VP config."""
    config = cifar10_vp.get_config()
    config.model.num_res_blocks = 8
    config.train.num_train_steps = 950_001
    return config
