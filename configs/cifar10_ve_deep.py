"""python main.py --config=configs/cifar10_ve_deep.py --workdir=/path

NCSN++ cont. (deep, VE) on CIFAR-10: score_sde's `configs/ve/cifar10_ncsnpp_deep_continuous.py`
(Song et al. 2021b, Table 3: FID 2.20, IS 9.89), `cifar10_ve.py` with 8 residual blocks
per level (107,587,075 parameters, the reference's) and 950,001 training steps.
"""

from configs import cifar10_ve


def get_config():
    """Returns the deep NCSN++ VE config."""
    config = cifar10_ve.get_config()
    config.model.num_res_blocks = 8
    config.train.num_train_steps = 950_001
    return config
