"""Tests for ddpm_jax.writers: the log line and the TensorBoard events it writes."""

import glob

from tensorboardX.proto import event_pb2  # Reads the event file without TensorFlow.

from ddpm_jax import writers


def _events(logdir):
    """(tag, step, value) of every scalar in the event files under `logdir`."""
    found = []
    for path in glob.glob(f'{logdir}/events.out.tfevents.*'):
        data = open(path, 'rb').read()
        pos = 0
        while pos < len(data):  # TFRecord: length u64, crc u32, payload, crc u32.
            length = int.from_bytes(data[pos:pos + 8], 'little')
            payload = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                found.append((value.tag, event.step, round(value.simple_value, 6)))
    return found


def test_scalars_go_to_stdout_and_tensorboard(tmp_path, capsys):
    writer = writers.MetricWriter(str(tmp_path), enabled=True, progress_bar=False)
    writer.write_scalars(7, {'loss': 0.25, 'tiny': 1.5e-5})
    writer.write_text('hello')
    writer.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ['step 7: loss=0.25, tiny=1.5000e-05', 'hello']
    assert sorted(_events(tmp_path)) == [('loss', 7, 0.25), ('tiny', 7, 1.5e-05)]


def test_disabled_writer_writes_nothing(tmp_path, capsys):
    writer = writers.MetricWriter(str(tmp_path / 'tb'), enabled=False)
    writer.write_scalars(1, {'loss': 1.0})
    writer.write_text('hidden')
    writer.close()
    assert capsys.readouterr().out == ''
    assert not (tmp_path / 'tb').exists()
