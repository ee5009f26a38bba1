"""python -m ddpm_jax.import_checkpoint --checkpoint=128x128_diffusion.pt --config=configs/released/adm_128x128_diffusion.py --workdir=/path

ADM, class-conditional ImageNet 128x128 (421,529,606 parameters;
configs/imagenet128.py): 4 heads, legacy qkv order, linear schedule, T = 1000,
250 respaced steps.

Then sample with the published flags (classifier scale 0.5, respacing as set below):

    python main.py --config=configs/released/adm_128x128_diffusion.py \
        --workdir=/path --mode=sample \
        --config.sample.classifier_workdir=/path_of_adm_128x128_classifier

(--config.sample.classifier_scale=0 samples the unguided model; import the
classifier with its own config first.)

FID in Dhariwal & Nichol 2021: 2.97 guided (scale 0.5) (guided-diffusion README).
"""

from configs import imagenet128
from configs import released


def get_config():
    """Returns the config of 128x128_diffusion.pt."""
    config = released.released_adm(imagenet128.get_config(), legacy_qkv_order=True,
                                   classifier_scale=0.5)
    return config
