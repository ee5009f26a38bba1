"""python main.py --config=configs/lsun_bedroom256.py --workdir=/path

ADM on LSUN Bedroom 256x256, unconditional: 552,814,086 parameters.

Architecture and training from Dhariwal & Nichol 2021 (Table 11 / App. I and the
released guided-diffusion flags): BigGAN up/down-sampling residual blocks, AdaGN,
attention at 32, 16 and 8 pixels, learned variances (learned_range) trained with
the hybrid loss (Nichol & Dhariwal 2021, Eq. 16), T = 1000, Adam, EMA 0.9999, no
gradient clipping; the ImageNet-256 network without the class embedding, dropout
0.1, linear schedule, lr 1e-4, batch 256, 500k steps (the paper's bedroom run).
Sampled with all 1000 steps, which the paper finds best for LSUN.
"""

from configs import adm


def get_config():
    """Returns the ADM LSUN Bedroom 256 config."""
    config = adm.get_adm_config()
    config.data.dataset = 'lsun/bedroom'
    config.data.image_size = 256

    model = config.model
    model.channel_mult = (1, 1, 2, 2, 4, 4)
    model.dropout = 0.1
    model.num_classes = 0  # Unconditional.

    config.train.num_train_steps = 500_000
    config.sample.respacing = ''  # All 1000 steps.

    config.train.num_grid_samples = 16
    config.sample.num_images = 16
    config.sample.global_batch_size = 16
    config.eval.global_batch_size = 16
    return config
