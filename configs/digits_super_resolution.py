"""python main.py --config=configs/digits_super_resolution.py --workdir=/tmp/digits_sr

A digits upsampler, 8x8 -> 16x16 (ADM-U on a laptop CPU): the bundled digits served
at 16x16 (ddpm_jax.data: bicubic, antialiased) are the targets, their 2x2 area means
the 8x8 inputs, made in the train step. A class-conditional UNet of width 32 (levels
at 16 and 8 pixels, no attention; the low-resolution image is upsampled bilinearly
and concatenated to its input), cosine schedule, T = 1000, eps prediction; 1,000
steps of 64 images, Adam at 1e-3 with warm-up and cosine decay.

Measured on a 2-core CPU shared with other jobs (2026-11-29, jax 0.10.2): 9 min 40 s
for the 1,000 steps (42 s to compile the step; 3.1 steps/s, 200 images/s when the
machine was not busy). The 297 held-out test digits, area-downsampled to 8x8 and
upsampled (100 ancestral steps, 36 s for all), scored by --mode=fid (uint8 outputs):
PSNR 45.3 dB to the 16x16 originals (bilinear upsampling: 22.6 dB, nearest, computed
the same way: 21.4 dB); the samples' 2x2 means differ from the inputs by 0.6 grey
levels on average (bilinear: 13.8). The 16x16 digits are bicubic enlargements of the
8x8 ones, so here the upsampler has little to invent: this config shows the machinery
at work, not detail synthesis. The cascade below (100 images; the quick-start model
with its 100 steps and guidance 2, then 100 upsampler steps) takes 23 s including
compilation.

Then upsample the quick-start model's samples in one command (the cascade: the
8x8 model of configs/digits.py samples first, with its own settings, and its labels
condition the upsampler; both resolutions go to <workdir>/samples/):

    python main.py --config=configs/digits.py --workdir=/tmp/digits
    python main.py --config=configs/digits_super_resolution.py --workdir=/tmp/digits_sr \
        --mode=sample --config.sample.base_workdir=/tmp/digits

or the images of an .npz (uint8 [N, 8, 8, 1]; e.g. one written by --mode=sample):

    python main.py --config=configs/digits_super_resolution.py --workdir=/tmp/digits_sr \
        --mode=sample --config.sample.low_res_npz=/tmp/digits/samples/samples_1500.npz
"""

from configs import default


def get_config():
    """Returns the digits 8 -> 16 upsampler config."""
    config = default.get_config()
    config.task = 'super_resolution'

    config.data.dataset = 'digits'
    config.data.image_size = 16
    config.data.channels = 1
    config.data.random_flip = False  # A mirrored digit is a different (or no) digit.

    model = config.model
    model.low_res_size = 8
    model.base_channels = 32
    model.channel_mult = (1, 2)
    model.num_res_blocks = 1
    model.attention_resolutions = ()
    model.num_groups = 8
    model.num_classes = 10  # Labels come with the inputs (the base model's samples).

    config.diffusion.num_timesteps = 1000
    config.diffusion.schedule = 'cosine'
    config.diffusion.mean_type = 'eps'
    config.diffusion.var_type = 'fixed_small'

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.lr_schedule = 'cosine'
    config.optim.ema_decays = (0.995,)

    config.train.global_batch_size = 64
    config.train.num_train_steps = 1000
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 500
    config.train.num_grid_samples = 16

    config.sample.respacing = '100'
    config.sample.num_images = 100
    config.sample.global_batch_size = 100

    # --mode=fid: the 297 held-out digits, area-downsampled to 8x8 and upsampled, against
    # the 1,500 training digits, with the bundled digits network (16x16 averaged to 8x8).
    config.eval.metrics_network = 'digits'
    config.eval.fid_num_samples = 297
    config.eval.fid_batch_size = 100  # The last batch is padded.
    config.eval.fid_reference_split = 'train'
    config.eval.fid_reference_num_images = 1500
    return config
