"""Flag parsing shared by the commands: main.py, `python -m ddpm_jax.import_checkpoint`.

`parse_flags(argv, required=...)` is absl's parsing with every bad command line
turned into one `ERROR:` line naming the flag, before JAX starts a backend: a
misspelt `--config.<field>` override, a value of the wrong type, a missing or empty
required flag, a positional argument, and a `--config` file that is missing or fails
to load. A config file inside a package (configs/released/*.py imports
`from configs import ...`) is loaded with that package's root on `sys.path`, so the
commands run from any directory.
"""

import os
import sys
from collections.abc import Sequence

from absl import flags


def _config_path(argv: Sequence[str], name: str) -> str | None:
    """The file of the last `--<name>=path[:args]` (or `--<name> path`) in `argv`."""
    path = None
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(f'--{name}='):
            path = arg.split('=', 1)[1]
        elif arg == f'--{name}' and i + 1 < len(argv):
            path = argv[i + 1]
    return None if path is None else path.split(':', 1)[0]


def _add_package_root(config_path: str) -> None:
    """Puts the root of the package holding `config_path` first on `sys.path`.

    configs/released/adm_64x64_diffusion.py imports `configs.released`, which only
    resolves from the directory above `configs/`; a config outside any package
    changes nothing.
    """
    directory = os.path.dirname(os.path.abspath(config_path))
    root = directory
    while os.path.exists(os.path.join(root, '__init__.py')):
        root = os.path.dirname(root)
    if root != directory and root not in sys.path:
        sys.path.insert(0, root)


def _last_line(error: BaseException) -> str:
    """The last line of an error's message (a traceback's is the exception)."""
    cause = error.__cause__ or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


def parse_flags(argv: Sequence[str], *, required: Sequence[str] = (),
                config: str = 'config') -> list[str]:
    """absl's flag parsing for a command; bad input exits with one `ERROR:` line.

    Args:
        argv: The command line, program name first.
        required: Flags that must be given a non-empty value (e.g. 'config', 'workdir').
        config: The name of the command's `config_flags.DEFINE_config_file` flag.

    Returns:
        `[argv[0]]`: the remaining arguments, of which there are none.

    Raises:
        SystemExit: With the `ERROR:` line.
    """
    path = _config_path(argv, config)
    if path:
        _add_package_root(path)
    try:
        remaining = flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # A misspelt --config.<field>.
        message = str(e).strip('"\'').replace('\\n', ' ').replace("\\'", "'")
        name = message.split("'")[1] if message.count("'") >= 2 else None
        bad = [a for a in argv if a.startswith(f'--{config}.') and
               name in a.split('=')[0].split('.')[1:]]
        sys.exit(f'ERROR: unknown config field in {" ".join(bad) or "an override"}: '
                 f'{message}')
    except flags.Error as e:  # A value of the wrong type, an unknown flag, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # A config file's get_config() that raised: the flag, then the exception.
        sys.exit(f'ERROR: {lines[0]}' + (f' {lines[-1]}' if len(lines) > 1 else ''))
    except Exception as e:  # pylint: disable=broad-except  # The config file's own code.
        sys.exit(f'ERROR: --{config}={path}: {_last_line(e)}')
    if len(remaining) > 1:
        sys.exit(f'ERROR: unexpected argument {remaining[1]!r}: every input is a '
                 '--flag=value (see --help).')
    for name in required:
        value = path if name == config else flags.FLAGS[name].value
        if value is None or value == '':
            sys.exit(f'ERROR: --{name} must be set.')
    try:
        flags.FLAGS[config].value.seed  # pylint: disable=pointless-statement
    except Exception as e:  # pylint: disable=broad-except  # A missing or broken file.
        sys.exit(f'ERROR: --{config}={path}: {_last_line(e)}')
    return remaining
