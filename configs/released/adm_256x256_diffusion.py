"""python -m ddpm_jax.import_checkpoint --checkpoint=256x256_diffusion.pt --config=configs/released/adm_256x256_diffusion.py --workdir=/path

ADM, class-conditional ImageNet 256x256 (553,838,086 parameters;
configs/imagenet256.py): legacy qkv order, linear schedule, T = 1000, 250
respaced steps.

Then sample with the published flags (classifier scale 1.0, respacing as set below):

    python main.py --config=configs/released/adm_256x256_diffusion.py \
        --workdir=/path --mode=sample \
        --config.sample.classifier_workdir=/path_of_adm_256x256_classifier

(--config.sample.classifier_scale=0 samples the unguided model; import the
classifier with its own config first.)

FID in Dhariwal & Nichol 2021: 4.59 guided (scale 1.0) (guided-diffusion README).
"""

from configs import imagenet256
from configs import released


def get_config():
    """Returns the config of 256x256_diffusion.pt."""
    config = released.released_adm(imagenet256.get_config(), legacy_qkv_order=True,
                                   classifier_scale=1.0)
    return config
