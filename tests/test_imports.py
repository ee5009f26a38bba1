"""The package's import graph: no loops, and no imports hidden inside functions."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'ddpm_jax'


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _graph():
    """{module: set of ddpm_jax modules it imports at the top level}, and the
    function-local ddpm_jax imports."""
    modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph, local_imports = {}, []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and (
                    node.module.startswith('ddpm_jax')):
                for alias in node.names:
                    full = f'{node.module}.{alias.name}'
                    deps.add(full if full in modules else node.module)
        graph[name] = deps - {name}
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith(
                            'ddpm_jax'):
                        local_imports.append(f'{name}.{func.name}')
    return graph, local_imports


def test_no_import_loops():
    graph, _ = _graph()
    state = {}

    def visit(node, path):
        if state.get(node) == 'done':
            return
        assert state.get(node) != 'active', 'import loop: ' + ' -> '.join(path + [node])
        state[node] = 'active'
        for dep in sorted(graph.get(node, ())):
            # `import ddpm_jax.x` runs ddpm_jax/__init__ first: the package is a parent.
            if dep != 'ddpm_jax':
                visit(dep, path + [node])
        state[node] = 'done'

    for module in sorted(graph):
        visit(module, [])
    assert 'ddpm_jax.config_lib' in graph and 'ddpm_jax.state' in graph


def test_no_function_local_package_imports():
    _, local_imports = _graph()
    assert local_imports == []


def test_maths_modules_import_no_flax_and_no_io():
    for name in ('schedules', 'diffusion', 'likelihood', 'losses', 'samplers',
                 'timestep_sampling', 'metrics', 'sde', 'sde_samplers', 'ode_likelihood',
                 'score_matching', 'sampler_registry', 'autoencoder_losses'):
        source = (PACKAGE / f'{name}.py').read_text()
        for banned in ('flax', 'orbax', 'tensorflow_datasets', 'open('):
            assert banned not in source, (name, banned)
