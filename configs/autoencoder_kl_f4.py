"""python main.py --config=configs/autoencoder_kl_f4.py --workdir=/path/to/kl_f4

LDM's KL-f4 first stage (Rombach et al. 2022, Tab. 8; the released
models/first_stage_models/kl-f4/config.yaml): 256x256x3 images to 64x64x3 latents,
channels 128 with multipliers 1, 2, 4, two residual blocks per level, no attention
but the middle block's, a Gaussian latent with KL weight 1e-6; the patch
discriminator (taming's 3-layer PatchGAN, 64 channels; GroupNorm for BatchNorm)
from step 50,001 with adaptive weight x 0.5. Adam (0.5, 0.9) at 4.5e-6 per image of
the batch (LDM's scaled base rate). Trained here on ImageNet (the repository's
autoencoder_kl_64x64x3.yaml; the released weights saw OpenImages). LDM adds LPIPS
with perceptual_weight 1.0 to every pixel's L1 error; here the term needs two files
the user supplies (nothing is downloaded), so it is off until both paths are set:

    --config.autoencoder.lpips_weights_path=/path/to/vgg.pth \
    --config.autoencoder.vgg16_weights_path=/path/to/vgg16-397923af.pth

(vgg.pth: the lpips package's lpips/weights/v0.1/vgg.pth; vgg16-397923af.pth:
https://download.pytorch.org/models/vgg16-397923af.pth). Not as the paper: no learned
output log-variance. Parameters (jax.eval_shape): autoencoder 55,312,063,
discriminator 2,765,633; LPIPS adds 14.7M frozen VGG16 weights (not trained or
checkpointed) and about 4% to the FLOPs of a step.
"""

from configs import default


def get_config():
    """Returns the KL-f4 autoencoder config."""
    config = default.get_config()
    config.task = 'autoencoder'

    data = config.data
    data.dataset = 'imagenet2012'
    data.image_size = 256
    data.channels = 3
    data.center_crop = True  # LDM's ImageNetTrain crops at random (taming's RandomCrop).
    data.random_flip = False  # ... and does not flip.

    config.model.attention_resolutions = ()  # Validated for every task; unused here.

    a = config.autoencoder
    a.kind = 'kl'
    a.init = 'torch'  # LDM's PyTorch-default initialisation.
    a.base_channels = 128
    a.channel_mult = (1, 2, 4)
    a.num_res_blocks = 2
    a.attention_resolutions = ()
    a.z_channels = 3
    a.num_groups = 32
    a.kl_weight = 1e-6
    a.disc_start = 50_001
    a.disc_weight = 0.5
    a.disc_base_channels = 64
    a.disc_num_layers = 3
    a.disc_num_groups = 32
    # LDM's perceptual term: on once both files are given (see the docstring).
    a.perceptual_weight = 1.0
    a.lpips_weights_path = ''  # The lpips package's lpips/weights/v0.1/vgg.pth.
    a.vgg16_weights_path = ''  # torchvision's vgg16-397923af.pth.

    optim = config.optim
    optim.optimizer = 'adam'
    optim.b1, optim.b2 = 0.5, 0.9
    optim.learning_rate = 4.5e-6 * 24
    optim.lr_schedule = 'constant'
    optim.grad_clip_norm = 0.0
    optim.ema_decays = (0.999,)  # For the reconstruction grids only; LDM uses the raw weights.

    train = config.train
    train.global_batch_size = 24  # 12 per step x 2 accumulated, as the repository's config.
    train.num_train_steps = 200_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.num_grid_samples = 8
    return config
