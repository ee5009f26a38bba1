"""The benchmarks' shared helpers: config overrides and the profile summary's parsing."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import parallel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'bench'))

import common  # noqa: E402

HLO = """HloModule jit_f

%fused_computation.7 (param_0: f32[4,3,3,8], param_1: f32[3,3,8,2]) -> f32[8,3,3,2] {
  %param_0 = f32[4,3,3,8]{3,2,1,0} parameter(0)
  %param_1 = f32[3,3,8,2]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[8,3,3,2]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3}
}

ENTRY %main.9 (x: f32[4,3,3,8]) -> f32[8,3,3,2] {
  %x = f32[4,3,3,8]{3,2,1,0} parameter(0)
  %add.3 = f32[4,3,3,8]{3,2,1,0} add(%x, %x), metadata={op_name="jit(f)/jvp(UNet)/down_0_res_1/in_conv/add"}
  %ynn_fusion.7 = f32[8,3,3,2]{3,2,1,0} fusion(%add.3, %add.3), kind=kCustom, calls=%fused_computation.7, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  ROOT %tanh.2 = f32[8,3,3,2]{3,2,1,0} tanh(%ynn_fusion.7), metadata={op_name="jit(f)/transpose(jvp(UNet))/up_12_attn_0/tanh"}
}
"""


def test_hlo_index_kinds_paths_and_filter_gradients():
    index = common._hlo_index(HLO)
    assert index['add.3'] == ('add', 'jit(f)/jvp(UNet)/down_0_res_1/in_conv/add')
    assert index['ynn_fusion.7'] == (
        '__ynn_fusion', '(convolution without metadata (filter gradients))')
    assert index['tanh.2'][0] == 'tanh'


GPU_LINES = """ENTRY %main.3 (x: bf16[8,32,32,128]) -> bf16[8,32,32,128] {
  %custom-call.5 = (bf16[8,32,32,128]{3,2,1,0}, u8[1024]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convForward", metadata={op_name="jit(f)/jvp(UNet)/down_0_res_1/in_conv/conv_general_dilated"}
  %get-tuple-element.2 = bf16[8,32,32,128]{3,2,1,0} get-tuple-element(%custom-call.5), index=0
  ROOT %loop_add_fusion = bf16[8,32,32,128]{3,2,1,0} fusion(%get-tuple-element.2), kind=kLoop, calls=%fused_add
}
"""


def test_hlo_index_reads_tuple_shaped_custom_calls():
    assert common._instruction(GPU_LINES.splitlines()[1]) == ('custom-call.5', 'custom-call')
    index = common._hlo_index(GPU_LINES)
    assert index['custom-call.5'] == (
        '__cudnn$convForward', 'jit(f)/jvp(UNet)/down_0_res_1/in_conv/conv_general_dilated')
    assert index['get-tuple-element.2'] == ('get-tuple-element', '')
    assert index['loop_add_fusion'] == ('kLoop', '(? without metadata)')


def test_op_group_folds_block_numbers_and_direction():
    assert (common._op_group('jit(f)/jvp(UNet)/down_0_res_1/in_conv/add')
            == 'fwd down_*_res_*/in_conv/add')
    assert (common._op_group('jit(f)/transpose(jvp(UNet))/up_12_attn_0/tanh')
            == 'bwd up_*_attn_*/tanh')


def test_profile_summary_attributes_the_matmul():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
    f = jax.jit(lambda a: jnp.tanh(a @ a) + 1.0)
    compiled = f.lower(x).compile()

    def run():
        for _ in range(3):
            out = compiled(x)
        jax.block_until_ready(out)

    rows = common.profile_summary(run, compiled, steps=3, top=10)
    assert rows, 'no op of the compiled module was found in the trace'
    assert sum(r['share'] for r in rows) == pytest.approx(1.0, abs=0.01)
    assert all(r['ms_per_step'] >= 0 for r in rows)
    assert any('dot' in r['op'] or 'dot' in r['kind'] or 'ynn' in r['kind'] for r in rows)


def test_profile_summary_counts_the_untraced_eigen_convolutions():
    # XLA's own CPU convolutions leave only launch events in the trace; the process
    # CPU time they take must still show up (as the '(untraced)' row) and dominate.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 32, 32, 128)), jnp.float32)
    w = jnp.asarray(0.05 * rng.normal(size=(3, 3, 128, 128)), jnp.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    compiled = jax.jit(lambda x, w: conv(conv(x, w), w) + 1.0, compiler_options={
        parallel.CPU_FUSION_OPTION: parallel.CPU_FUSION_TYPES}).lower(x, w).compile()

    def run():
        for _ in range(3):
            out = compiled(x, w)
        jax.block_until_ready(out)

    rows = common.profile_summary(run, compiled, steps=3, top=10)
    assert rows[0]['kind'] == '(untraced)', rows
    assert rows[0]['share'] > 0.5 and rows[0]['ms_per_step'] > 1.0, rows
    assert sum(r['share'] for r in rows) == pytest.approx(1.0, abs=0.01)


def test_load_config_override_rejects_unknown_field():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'digits.py')
    config = common.load_config(path, ['model.base_channels=16', 'model.dtype=bfloat16'])
    assert config.model.base_channels == 16 and config.model.dtype == 'bfloat16'
    with pytest.raises(ValueError, match='not_a_field'):
        common.load_config(path, ['model.not_a_field=1'])


TURN = """
import os, sys, time
sys.path[:0] = [{bench!r}, os.path.dirname({bench!r})]
import common
time.sleep(float(sys.argv[1]))  # 'Compiling'.
with common.device_turn(wait_s=30):
    with open(os.path.join(os.environ['BENCH_SYNC_DIR'], 'log'), 'a') as f:
        f.write(f"start {{os.environ['BENCH_SYNC_RANK']}} {{time.monotonic()}}\\n")
    time.sleep(0.3)
    with open(os.path.join(os.environ['BENCH_SYNC_DIR'], 'log'), 'a') as f:
        f.write(f"end {{os.environ['BENCH_SYNC_RANK']}} {{time.monotonic()}}\\n")
"""


def test_device_turn_times_one_at_a_time_in_rank_order_after_every_compile(tmp_path):
    import subprocess
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')
    script = tmp_path / 'turn.py'
    script.write_text(TURN.format(bench=bench))
    (tmp_path / '3.ended').write_text('')  # Rank 3 died before compiling.
    procs = []
    for rank, compile_s in ((2, 0.0), (0, 1.0), (1, 0.2)):  # Rank 0 compiles last.
        env = dict(os.environ, BENCH_SYNC_DIR=str(tmp_path), BENCH_SYNC_COUNT='4',
                   BENCH_SYNC_RANK=str(rank))
        procs.append(subprocess.Popen(  # As gpu_figures.sh: <rank>.ended once it exits.
            f'"{sys.executable}" "{script}" {compile_s}; touch "{tmp_path}/{rank}.ended"',
            shell=True, env=env))
    assert all(p.wait(timeout=60) == 0 for p in procs)
    events = [line.split() for line in (tmp_path / 'log').read_text().splitlines()]
    assert [(e[0], e[1]) for e in events] == [
        ('start', '0'), ('end', '0'), ('start', '1'), ('end', '1'), ('start', '2'), ('end', '2')]
    times = [float(e[2]) for e in events]
    assert times == sorted(times)


def test_device_turn_stops_waiting_for_a_compile_at_the_deadline(tmp_path):
    import subprocess
    import time
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')
    script = tmp_path / 'turn.py'
    script.write_text(TURN.format(bench=bench))
    env = dict(os.environ, BENCH_SYNC_DIR=str(tmp_path), BENCH_SYNC_COUNT='2',
               BENCH_SYNC_RANK='1', BENCH_SYNC_COMPILE_DEADLINE=str(time.time() + 2))
    # Rank 0 never finishes compiling: rank 1 times anyway once the deadline passes.
    out = subprocess.run([sys.executable, str(script), '0'], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 'benchmarks [0] still compile' in out.stdout
    assert [line.split()[:2] for line in (tmp_path / 'log').read_text().splitlines()] == [
        ['start', '1'], ['end', '1']]


def test_device_turn_does_nothing_without_the_sync_dir(monkeypatch, tmp_path):
    monkeypatch.delenv('BENCH_SYNC_DIR', raising=False)
    monkeypatch.chdir(tmp_path)
    with common.device_turn(wait_s=0):
        pass
    assert not os.listdir(tmp_path)


def test_program_flops_counts_a_product_and_falls_back_to_the_cpu_analysis(monkeypatch):
    """2 M N K for a matrix product, also where the backend cannot analyse a lowered
    program (as a GPU's PJRT plugin cannot) and the CPU's analysis is used."""
    m, k, n = 32, 48, 16
    lowered = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n)))
    assert common.program_flops(lowered) == 2 * m * n * k
    monkeypatch.setattr(type(lowered), 'cost_analysis', lambda self: None)
    assert common.program_flops(lowered) == 2 * m * n * k


def test_print_profile_explains_command_buffer_rows(capsys):
    row = {'ms_per_step': 1.0, 'share': 0.5, 'calls_per_step': 3.0, 'kind': '(not indexed)'}
    common.print_profile([dict(row, op='fwd in_norm/norm/reduce_sum')])
    assert 'command buffers' not in capsys.readouterr().out
    common.print_profile([dict(row, op='(command_buffer_12)')])
    assert '--xla_gpu_enable_command_buffer=' in capsys.readouterr().out


def test_print_profile_totals_every_row_by_kind(capsys):
    rows = [{'ms_per_step': ms, 'share': ms / 10, 'calls_per_step': 1.0, 'kind': kind,
             'op': f'op{i}'} for i, (kind, ms) in enumerate(
                 [('__cudnn$convForward', 4.0), ('kLoop', 3.0), ('__cudnn$convForward', 2.0),
                  ('kInput', 1.0)])]
    common.print_profile(rows, top=1)
    out = capsys.readouterr().out
    assert 'op0' in out and 'op1' not in out  # Only the top row is listed ...
    # ... but the totals count all of them.
    assert '10.00 ms/step in all; by kind: __cudnn$convForward 6.00 (60%), kLoop 3.00 (30%), ' \
           'kInput 1.00 (10%)' in out


FUSED = """%fused_norm (p0: f32[8,32], p1: f32[8,4,4,64]) -> f32[8,4,4,64] {
  %p0 = f32[8,32]{1,0} parameter(0)
  %div.1 = f32[8,32]{1,0} multiply(%p0, %p0), metadata={op_name="jit(f)/jvp(M)/in_norm/norm/div"}
  %p1 = f32[8,4,4,64]{3,2,1,0} parameter(1)
  ROOT %mul.2 = f32[8,4,4,64]{3,2,1,0} multiply(%p1, %p1), metadata={op_name="jit(f)/jvp(M)/in_norm/norm/mul"}
}

%fused_skip (p0: f32[8,4,4,64], p1: f32[1,1,64,64]) -> f32[8,4,4,64] {
  %p0 = f32[8,4,4,64]{3,2,1,0} parameter(0)
  %p1 = f32[1,1,64,64]{3,2,1,0} parameter(1)
  %reduce.3 = f32[8,4,4,64]{3,2,1,0} add(%p0, %p0), metadata={op_name="jit(f)/transpose(jvp(M))/up_1/reduce_sum"}
  %convolution.4 = f32[8,4,4,64]{3,2,1,0} convolution(%reduce.3, %p1), window={size=1x1}, metadata={op_name="jit(f)/transpose(jvp(M))/up_1/skip/conv_general_dilated"}
  ROOT %mul.5 = f32[8,4,4,64]{3,2,1,0} multiply(%convolution.4, %p0), metadata={op_name="jit(f)/transpose(jvp(M))/up_1/attn/div"}
}

ENTRY %main.6 (a: f32[8,32], x: f32[8,4,4,64], w: f32[1,1,64,64]) -> f32[8,4,4,64] {
  %a = f32[8,32]{1,0} parameter(0)
  %x = f32[8,4,4,64]{3,2,1,0} parameter(1)
  %w = f32[1,1,64,64]{3,2,1,0} parameter(2)
  %loop_fusion.1 = f32[8,4,4,64]{3,2,1,0} fusion(%a, %x), kind=kLoop, calls=%fused_norm
  ROOT %ynn_fusion.2 = f32[8,4,4,64]{3,2,1,0} fusion(%loop_fusion.1, %w), kind=kCustom, calls=%fused_skip, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
}
"""


def test_hlo_index_names_a_fusion_after_its_convolution_else_its_largest_op():
    index = common._hlo_index(FUSED)
    assert index['loop_fusion.1'] == ('kLoop', 'jit(f)/jvp(M)/in_norm/norm/mul')
    assert index['ynn_fusion.2'] == (
        '__ynn_fusion', 'jit(f)/transpose(jvp(M))/up_1/skip/conv_general_dilated')


def test_hlo_index_names_a_fusion_with_metadata_after_its_convolution():
    text = FUSED.replace(
        'calls=%fused_skip,',
        'calls=%fused_skip, metadata={op_name="jit(f)/transpose(jvp(M))/up_1/reduce_sum"},')
    assert common._hlo_index(text)['ynn_fusion.2'] == (
        '__ynn_fusion', 'jit(f)/transpose(jvp(M))/up_1/skip/conv_general_dilated')
    text = FUSED.replace('calls=%fused_norm', 'calls=%fused_norm, metadata={op_name="a/b"}')
    assert common._hlo_index(text)['loop_fusion.1'] == ('kLoop', 'a/b')  # No conv: its own.


CENSUS_HLO = """HloModule jit_step

%fused_add (p0: bf16[8,4,4,16]) -> bf16[8,4,4,16] {
  %p0 = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  ROOT %add.1 = bf16[8,4,4,16]{3,2,1,0} add(%p0, %p0), metadata={op_name="jit(step)/jvp(UNet)/down_0_res_1/add"}
}

%body (s: (s32[], f32[64])) -> (s32[], f32[64]) {
  %s = (s32[], f32[64]{0}) parameter(0)
  %v = f32[64]{0} get-tuple-element(%s), index=1
  %i = s32[] get-tuple-element(%s), index=0
  %loop_multiply_fusion = f32[64]{0} fusion(%v), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/mul"}
  ROOT %t = (s32[], f32[64]{0}) tuple(%i, %loop_multiply_fusion)
}

%cond (s: (s32[], f32[64])) -> pred[] {
  %s = (s32[], f32[64]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main.9 (x: bf16[8,4,4,16], w: bf16[3,3,16,16], m: f32[64]) -> f32[64] {
  %x = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  %w = bf16[3,3,16,16]{3,2,1,0} parameter(1)
  %m = f32[64]{0} parameter(2)
  %cudnn-conv.1 = (bf16[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/transpose(jvp(UNet))/up_2_res_0/in_conv/conv_general_dilated"}
  %get-tuple-element.2 = bf16[8,4,4,16]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %loop_add_fusion = bf16[8,4,4,16]{3,2,1,0} fusion(%get-tuple-element.2), kind=kLoop, calls=%fused_add
  %copy.3 = f32[64]{0} copy(%m)
  %init = (s32[], f32[64]{0}) tuple(%c0, %copy.3)
  %while.1 = (s32[], f32[64]{0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[64]{0} get-tuple-element(%while.1), index=1
}
"""


def test_kernel_census_counts_launches_and_their_bytes():
    census = common.kernel_census(CENSUS_HLO)
    activation = 8 * 4 * 4 * 16 * 2  # bf16[8,4,4,16]
    rows = {(r['kind'], r['op']): (r['kernels'], r['bytes']) for r in census['rows']}
    # The convolution: its tuple result (the u8[0] scratch is 0 bytes) and both operands.
    conv_bytes = activation + activation + 3 * 3 * 16 * 16 * 2
    assert rows == {
        ('__cudnn$convForward', 'bwd up_*_res_*/in_conv/conv_general_dilated'): (1, conv_bytes),
        ('kLoop', 'fwd down_*_res_*/add'): (1, 2 * activation),  # Named after its add.
        ('copy', 'copy'): (1, 2 * 64 * 4),
        ('kLoop', 'step mul'): (1, 2 * 64 * 4),  # The loop body's, counted once.
    }
    # Parameters, tuples, get-tuple-element, the while and its condition launch nothing.
    assert census['kernels'] == 4 and census['model_kernels'] == 2
    assert census['bytes'] == conv_bytes + 2 * activation + 4 * 64 * 4
    assert census['rows'][0]['kind'] == '__cudnn$convForward'  # Most bytes first.


def test_shape_bytes_sums_tuples_and_dtypes():
    assert common._shape_bytes('(bf16[2,3]{1,0}, u8[0]{0}, pred[5], f32[])') == 12 + 0 + 5 + 4


def _has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
    except ModuleNotFoundError:  # No jax_plugins package at all.
        return False


@pytest.mark.skipif(_has_cuda_plugin(),
                    reason="JAX's CUDA plugin is installed: the mesh would be made.")
def test_deviceless_gpu_mesh_without_the_cuda_plugin_is_one_error_line():
    bench = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'bench')
    result = subprocess.run(
        [sys.executable, '-c', "import common; common.deviceless_gpu_mesh('h100')"],
        cwd=bench, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        'ERROR: no CUDA compiler here'), result.stderr
    assert 'pip install "jax-cuda12-plugin[with-cuda]==' in result.stderr
