"""python -m ddpm_jax.import_checkpoint --checkpoint=64x64_classifier.pt --config=configs/released/adm_64x64_classifier.py --workdir=/path

ADM's noise-aware ImageNet 64x64 classifier (guided-diffusion's
create_classifier: width 128, depth 4, multipliers 1,2,3,4, attention
at 32, 16 and 8 pixels with 64 channels per head, legacy qkv order, attention
pooling), on the cosine schedule of the model it guides. Point
sample.classifier_workdir of adm_64x64_diffusion at this workdir.
"""

from configs import released


def get_config():
    """Returns the config of 64x64_classifier.pt."""
    return released.adm_classifier(64, (1, 2, 3, 4), depth=4, schedule='cosine')
