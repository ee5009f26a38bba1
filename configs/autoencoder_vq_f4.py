"""python main.py --config=configs/autoencoder_vq_f4.py --workdir=/path/to/vq_f4

LDM's VQ-f4 first stage (Rombach et al. 2022, Tab. 8; the released
models/first_stage_models/vq-f4/config.yaml), the first stage of the LDM-4 CelebA-HQ
and class-conditional ImageNet models: 256x256x3 images to 64x64x3 latents quantised
against 8,192 codes of width 3, channels 128 with multipliers 1, 2, 4, two residual
blocks per level, no attention but the middle block's; taming's VQ loss: the
reconstruction loss averaged over the pixels (the KL config sums it) plus the
quantiser's loss with weight 1 in taming's legacy form, commitment + 0.25 codebook
(VectorQuantizer2(beta=0.25) with legacy=True, as LDM's VQModel); the patch
discriminator on from step 0 with adaptive weight x 0.75. Adam
(0.5, 0.9) at 4.5e-6 per image of the batch of 8. Trained here on ImageNet (the
released weights saw OpenImages). taming's VQ loss adds LPIPS with perceptual_weight
1.0, inherited from autoencoder_kl_f4 with its two files: the term is on once
autoencoder.lpips_weights_path (vgg.pth) and autoencoder.vgg16_weights_path
(vgg16-397923af.pth) are set. Parameters (jax.eval_shape): autoencoder 55,322,782,
discriminator 2,765,633.
"""

from configs import autoencoder_kl_f4


def get_config():
    """Returns the VQ-f4 autoencoder config: KL-f4's data, networks and optimiser with a
    quantised latent, the discriminator from the start and the batch of 8."""
    config = autoencoder_kl_f4.get_config()
    a = config.autoencoder
    a.kind = 'vq'
    a.codebook_size = 8192
    a.vq_beta = 0.25  # Weights the codebook term (taming's legacy VQ loss).
    a.disc_start = 0
    a.disc_weight = 0.75
    config.optim.learning_rate = 4.5e-6 * 8
    config.optim.ema_decays = (0.999,)  # For the reconstruction grids only.
    config.train.global_batch_size = 8
    return config
