"""python -m ddpm_jax.import_checkpoint --checkpoint=512x512_classifier.pt --config=configs/released/adm_512x512_classifier.py --workdir=/path

ADM's noise-aware ImageNet 512x512 classifier (guided-diffusion's
create_classifier: width 128, depth 2, multipliers 0.5,1,1,2,2,4,4, attention
at 32, 16 and 8 pixels with 64 channels per head, legacy qkv order, attention
pooling), on the linear schedule of the model it guides. Point
sample.classifier_workdir of adm_512x512_diffusion at this workdir.
"""

from configs import released


def get_config():
    """Returns the config of 512x512_classifier.pt."""
    return released.adm_classifier(512, (0.5, 1, 1, 2, 2, 4, 4), depth=2, schedule='linear')
