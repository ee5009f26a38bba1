"""python main.py --config=configs/imagenet64.py --workdir=/path

ADM on ImageNet 64x64, class-conditional: 295,904,454 parameters.

Architecture and training from Dhariwal & Nichol 2021 (Table 11 / App. I and the
released guided-diffusion flags): BigGAN up/down-sampling residual blocks, AdaGN,
attention at 32, 16 and 8 pixels, learned variances (learned_range) trained with
the hybrid loss (Nichol & Dhariwal 2021, Eq. 16), T = 1000, Adam, EMA 0.9999, no
gradient clipping; 192 channels, 3 residual blocks per level, multipliers 1,2,3,4,
64 channels per head, dropout 0.1, cosine schedule, lr 3e-4, batch 2048, 540k
steps. Sampled with 250 respaced steps.

Data: TFDS's `imagenet_resized/64x64` (Chrabaszcz et al.'s box-resized whole images,
their labels renumbered to sorted WordNet IDs by `data.wordnet_label_order`, as
guided-diffusion's). ADM itself trained on ILSVRC2012 centre-cropped and downsampled
by guided-diffusion's `center_crop_arr` (BOX halvings, a bicubic resize of the short
side, a centre crop of the uint8 result), which `data.resize='adm'` reproduces pixel
for pixel: `--config.data.dataset=imagenet2012` trains on that (on the 64x64 images
of imagenet_resized the same preprocessing leaves them as they are).
"""

from configs import adm


def get_config():
    """Returns the ADM ImageNet 64 config."""
    config = adm.get_adm_config()

    data = config.data
    data.dataset = 'imagenet_resized/64x64'
    data.image_size = 64
    # Kept from adm.py: center_crop=True, resize='adm' (a no-op on 64x64 images).

    model = config.model
    model.base_channels = 192
    model.channel_mult = (1, 2, 3, 4)
    model.num_res_blocks = 3
    model.dropout = 0.1

    config.diffusion.schedule = 'cosine'
    config.optim.learning_rate = 3e-4
    config.train.global_batch_size = 2048
    config.train.num_train_steps = 540_000
    return config
