"""The README's quick start, run as a newcomer runs it: train on the digits, sample, score.

Slow (about 5 minutes on a 2-core CPU). It checks what the quick start promises: the
samples are recognisably the requested digits, judged by an RBF support-vector
classifier fitted on the real digits (95% accurate on held-out real digits), and
`--mode=fid` scores them with the bundled digits network: a Frechet distance to the
held-out digits near that of real training digits (8.8) and far from noise (184) or
blurred digits (130), with the requested labels.
"""

import json

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.svm import SVC

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
    env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')  # One device, as a laptop.
    result = subprocess.run([sys.executable, 'main.py', '--config=configs/digits.py', *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_quickstart_samples_are_the_requested_digits(tmp_path):
    workdir = str(tmp_path / 'digits')
    _main(f'--workdir={workdir}')
    assert os.path.isfile(os.path.join(workdir, 'samples', 'step_1500.png'))
    _main(f'--workdir={workdir}', '--mode=sample')
    samples = np.load(os.path.join(workdir, 'samples', 'samples_1500.npz'))
    images, labels = samples['images'], samples['labels']
    assert images.dtype == np.uint8 and images.shape == (100, 8, 8, 1)
    assert sorted(np.bincount(labels, minlength=10).nonzero()[0]) == list(range(10))

    digits = load_digits()
    classifier = SVC(gamma=0.001).fit(digits.data, digits.target)
    # The data source maps pixel values 0..16 to [-1, 1]; map uint8 0..255 back to 0..16.
    features = images.reshape(len(images), -1).astype(np.float64) * 16.0 / 255.0
    accuracy = np.mean(classifier.predict(features) == labels)
    assert accuracy >= 0.9, f'only {accuracy:.0%} of the samples read as their label'

    _main(f'--workdir={workdir}', '--mode=fid', '--config.sample.sampler=dpm_solver',
          '--config.sample.respacing=ddim20')
    with open(os.path.join(workdir, 'metrics_1500.json')) as f:
        scores = json.load(f)
    assert scores['num_samples'] == 1000 and scores['network'] == 'digits'
    assert scores['fid'] < 25, scores  # Measured 12.1 (real training digits: 8.8).
    assert scores['label_accuracy'] >= 0.9 and scores['precision'] > 0.6, scores
