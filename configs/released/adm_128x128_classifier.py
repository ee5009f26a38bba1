"""python -m ddpm_jax.import_checkpoint --checkpoint=128x128_classifier.pt --config=configs/released/adm_128x128_classifier.py --workdir=/path

ADM's noise-aware ImageNet 128x128 classifier (guided-diffusion's
create_classifier: width 128, depth 2, multipliers 1,1,2,3,4, attention
at 32, 16 and 8 pixels with 64 channels per head, legacy qkv order, attention
pooling), on the linear schedule of the model it guides. Point
sample.classifier_workdir of adm_128x128_diffusion at this workdir.
"""

from configs import released


def get_config():
    """Returns the config of 128x128_classifier.pt."""
    return released.adm_classifier(128, (1, 1, 2, 3, 4), depth=2, schedule='linear')
