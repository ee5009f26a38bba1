"""python -m ddpm_jax.import_checkpoint --checkpoint=256x256_classifier.pt --config=configs/released/adm_256x256_classifier.py --workdir=/path

ADM's noise-aware ImageNet 256x256 classifier (guided-diffusion's
create_classifier: width 128, depth 2, multipliers 1,1,2,2,4,4, attention
at 32, 16 and 8 pixels with 64 channels per head, legacy qkv order, attention
pooling), on the linear schedule of the model it guides. Point
sample.classifier_workdir of adm_256x256_diffusion(_uncond) at this workdir.
"""

from configs import released


def get_config():
    """Returns the config of 256x256_classifier.pt."""
    return released.adm_classifier(256, (1, 1, 2, 2, 4, 4), depth=2, schedule='linear')
