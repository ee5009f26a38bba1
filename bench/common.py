"""Shared pieces of the benchmarks: config loading with overrides, FLOPs, device peaks."""

from __future__ import annotations

import ast
import importlib.util

import jax
import ml_collections

# Dense peak TFLOP/s per device, (bf16, fp32-class) from vendor data sheets without
# sparsity; the second is TF32 on NVIDIA tensor cores. Matched by substring of jax's
# `device_kind`, first match wins (so 'H100 PCIe' precedes 'H100').
PEAK_TFLOPS = (
    ('H100 PCIe', (756.0, 378.0)),
    ('GH200', (989.0, 494.0)),
    ('H200', (989.0, 494.0)),
    ('H100', (989.0, 494.0)),  # SXM
    ('A100', (312.0, 156.0)),
    ('L40S', (362.0, 183.0)),
    ('L4', (121.0, 60.0)),
    ('A10', (125.0, 62.5)),
    ('V100', (125.0, 15.7)),  # fp16 tensor cores (no bf16 on V100)
    ('TPU v5 lite', (197.0, 197.0)),
    ('TPU v5e', (197.0, 197.0)),
    ('TPU v5p', (459.0, 459.0)),
    ('TPU v4', (275.0, 275.0)),
)


def load_config(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file and applies 'group.field=value' overrides.

    Values are Python literals (bare strings allowed).

    Raises:
        ValueError: A malformed override or an unknown field.
    """
    spec = importlib.util.spec_from_file_location('bench_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        if '=' not in item:
            raise ValueError(f'--override expects field=value, got {item!r}.')
        name, text = item.split('=', 1)
        *groups, leaf = name.split('.')
        node = config
        for group in groups:
            node = node[group]
        if leaf not in node:
            raise ValueError(f'--override {item}: {name} is not a config field.')
        try:
            node[leaf] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            node[leaf] = text
    return config


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program from XLA's cost analysis (None if absent)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
        analysis = analysis[0] if analysis else None
    if not analysis or 'flops' not in analysis:
        return None
    return float(analysis['flops'])


def peak_flops(device: jax.Device, dtype: str, override_tflops: float | None = None
               ) -> float | None:
    """Per-device peak FLOP/s to report utilisation against, or None if unknown.

    `override_tflops` (the --peak_tflops flag) wins on any platform; otherwise the
    table above, bf16 for 'bfloat16' models and the fp32-class figure for others, on
    accelerators only (a CPU has no entry).
    """
    if override_tflops:
        return override_tflops * 1e12
    if device.platform == 'cpu':
        return None
    for name, (bf16, fp32) in PEAK_TFLOPS:
        if name.lower() in device.device_kind.lower():
            return (bf16 if dtype == 'bfloat16' else fp32) * 1e12
    return None
