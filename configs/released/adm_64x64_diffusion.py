"""python -m ddpm_jax.import_checkpoint --checkpoint=64x64_diffusion.pt --config=configs/released/adm_64x64_diffusion.py --workdir=/path

ADM, class-conditional ImageNet 64x64 (295,904,454 parameters; configs/imagenet64.py),
trained with --use_new_attention_order True: the only released file with the
new qkv order. Cosine schedule, T = 1000, 250 respaced steps.

Then sample with the published flags (classifier scale 1.0, respacing as set below):

    python main.py --config=configs/released/adm_64x64_diffusion.py --workdir=/path --mode=sample \
        --config.sample.classifier_workdir=/path_of_adm_64x64_classifier

(--config.sample.classifier_scale=0 samples the unguided model; import the
classifier with its own config first.)

FID in Dhariwal & Nichol 2021: 2.07 guided (scale 1.0) (guided-diffusion README).
"""

from configs import imagenet64
from configs import released


def get_config():
    """Returns the config of 64x64_diffusion.pt."""
    config = released.released_adm(imagenet64.get_config(), legacy_qkv_order=False,
                                   classifier_scale=1.0)
    return config
