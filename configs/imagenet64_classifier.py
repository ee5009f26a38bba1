"""python main.py --config=configs/imagenet64_classifier.py --workdir=/path

ADM's noise-aware ImageNet 64x64 classifier for guidance: 65,438,568 parameters.

The downsampling half of the ADM UNet (Dhariwal & Nichol 2021, Sec. 4 and App. I;
released 64x64_classifier.pt): width 128, depth 4, multipliers 1,2,3,4, attention
at 32, 16 and 8 pixels with 64 channels per head, BigGAN down-sampling, AdaGN and
attention pooling to 1000 logits. Trained on x_t from the ImageNet 64 model's
cosine schedule (the schedule of the model it guides: guided-diffusion samples the
64x64 classifier with --noise_schedule cosine) with AdamW (lr 3e-4 annealed linearly
to 0, weight decay 0.05), batch 256, 300k steps (the classifier training flags of
guided-diffusion's README, given there for the 128x128 classifier), in float32 as
theirs (no --classifier_use_fp16; add --config.model.dtype=bfloat16 for speed), on
guided-diffusion's random crops (`data.random_crop`: the short side resized to
64-80 pixels, a random 64x64 square). The data are TFDS's imagenet_resized/64x64, as
configs/imagenet64.py's; guided-diffusion crops full-size ImageNet (imagenet2012
here, with data.dataset='imagenet2012'). Point sample.classifier_workdir of
configs/imagenet64.py at this run's workdir.
"""

from configs import default


def get_config():
    """Returns the ADM ImageNet 64 classifier config."""
    config = default.get_config()

    config.task = 'classifier'

    data = config.data
    data.dataset = 'imagenet_resized/64x64'
    data.eval_split = 'validation'
    data.image_size = 64
    data.channels = 3
    data.center_crop = True
    data.resize = 'adm'  # guided-diffusion's center_crop_arr (evaluation) and
    data.random_crop = True  # random_crop_arr in training (classifier_train.py).

    model = config.model
    model.name = 'classifier'
    model.base_channels = 128
    model.channel_mult = (1, 2, 3, 4)
    model.num_res_blocks = 4
    model.attention_resolutions = (32, 16, 8)
    model.num_head_channels = 64
    model.resblock_updown = True
    model.use_scale_shift_norm = True
    model.num_classes = 1000
    model.bias_init = 'torch'  # PyTorch's uniform biases, as guided-diffusion's start.
    model.dtype = 'float32'  # guided-diffusion trains its classifiers in float32.

    config.diffusion.schedule = 'cosine'  # The noise of the model it guides.

    optim = config.optim
    optim.optimizer = 'adamw'
    optim.learning_rate = 3e-4
    optim.lr_schedule = 'linear'
    optim.weight_decay = 0.05
    optim.grad_clip_norm = 0.0

    train = config.train
    train.global_batch_size = 256
    train.num_train_steps = 300_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    return config
