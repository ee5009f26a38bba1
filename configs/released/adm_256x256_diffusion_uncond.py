"""python -m ddpm_jax.import_checkpoint --checkpoint=256x256_diffusion_uncond.pt --config=configs/released/adm_256x256_diffusion_uncond.py --workdir=/path

ADM, unconditional ImageNet 256x256 (552,814,086 parameters): the
ImageNet-256 network without the class embedding, guided by the class-conditional
classifier at scale 10 (labels drawn uniformly). Linear schedule, T = 1000, 250
respaced steps.

Then sample with the published flags (classifier scale 10.0, respacing as set below):

    python main.py --config=configs/released/adm_256x256_diffusion_uncond.py \
        --workdir=/path --mode=sample \
        --config.sample.classifier_workdir=/path_of_adm_256x256_classifier

(--config.sample.classifier_scale=0 samples the unguided model; import the
classifier with its own config first.)
"""

from configs import imagenet256
from configs import released


def get_config():
    """Returns the config of 256x256_diffusion_uncond.pt."""
    config = released.released_adm(imagenet256.get_config(), legacy_qkv_order=True,
                                   classifier_scale=10.0)
    config.model.num_classes = 0  # Unconditional.
    return config
