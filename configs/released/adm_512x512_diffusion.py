"""python -m ddpm_jax.import_checkpoint --checkpoint=512x512_diffusion.pt --config=configs/released/adm_512x512_diffusion.py --workdir=/path

ADM, class-conditional ImageNet 512x512 (558,997,638 parameters;
configs/imagenet512.py): legacy qkv order, linear schedule, T = 1000, 250
respaced steps.

Then sample with the published flags (classifier scale 4.0, respacing as set below):

    python main.py --config=configs/released/adm_512x512_diffusion.py \
        --workdir=/path --mode=sample \
        --config.sample.classifier_workdir=/path_of_adm_512x512_classifier

(--config.sample.classifier_scale=0 samples the unguided model; import the
classifier with its own config first.)

FID in Dhariwal & Nichol 2021: 7.72 guided (scale 4.0) (guided-diffusion README).
"""

from configs import imagenet512
from configs import released


def get_config():
    """Returns the config of 512x512_diffusion.pt."""
    config = released.released_adm(imagenet512.get_config(), legacy_qkv_order=True,
                                   classifier_scale=4.0)
    return config
