"""PyTorch `torch.save` state dicts, read (and, for tests, written) without torch.

This module owns the on-disk format of PyTorch checkpoints, so that weights released
for PyTorch (pytorch-fid's Inception, `pt_inception-2015-12-05-6726825d.pth`, ...)
load into JAX with numpy alone. It reads both formats `torch.load` accepts:

- zip (the default since torch 1.6; `_save` in torch/serialization.py and
  `PyTorchStreamWriter` in caffe2/serialize/inline_container.cc). An uncompressed zip
  whose entries sit under one folder, the file name without its extension when
  `torch.save` was given a path (`archive` for a buffer). Readers take the folder from
  the first entry. Records, in the order torch writes them:

      data.pkl               the object, pickle protocol 2; each storage is a persistent
                             id ('storage', torch.<T>Storage, key, location, numel)
      .format_version        "1"  (torch >= 2.7)
      .storage_alignment     "64" (torch >= 2.7)
      byteorder              "little" or "big" (torch >= 2.1; little when absent)
      data/<key>             the storage's bytes; keys "0", "1", ... by first appearance
      version                "3\\n" (kMinProducedFileFormatVersion)
      .data/serialization_id 40 digits, opaque (torch >= 2.1)

  Each record's data starts on a 64-byte boundary (a zip extra field 'FB' pads it).
- legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`; `_legacy_save`).
  Five pickles back to back: the magic number 0x1950a86a20f9469cfc6c, the protocol
  version 1001, a sys_info dict, the object (persistent ids ('storage', torch.<T>Storage,
  key, location, numel, view_metadata)), and the sorted list of storage keys. Then, per
  key in that order, the element count as a little-endian int64 and the storage's bytes,
  always little-endian (`THPStorage_writeFileRaw` in torch/csrc/serialization.cpp).

A tensor in the pickle is a call `torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, requires_grad, backward_hooks[, metadata])` (size and
stride in elements); dtypes without a legacy storage class use `_rebuild_tensor_v3`,
whose storage is untyped bytes and whose 7th argument is the dtype.

Reading never runs code from the file: the unpickler resolves a global only if it is
one of the few a state dict needs (`collections.OrderedDict`, the `torch._utils`
rebuild functions, `torch.<T>Storage`, `torch.Size`, `torch.<dtype>`), each mapped to
an inert stand-in defined here, and refuses anything else with a ValueError.

The writer (`save_state_dict`, `save_torch_object`, `StorageView`) exists for tests
across the project that need a real PyTorch checkpoint without torch installed. It
emits the same records, the same pickle (protocol 2, the same GLOBAL references,
persistent ids and memo layout as torch's pickler produces for a state dict) and the
same storage bytes as `torch.save`; only the zip container's bookkeeping (ZIP64
records, timestamps, the opaque serialization id) differs.
"""

import hashlib
import io
import os
import pickle
import pickletools
import re
import struct
import tarfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

try:
    import ml_dtypes
except ImportError:  # ml_dtypes ships with jax; without it bfloat16 widens to float32.
    ml_dtypes = None

__all__ = ['StorageView', 'TorchCheckpointError', 'check_hash', 'file_sha256',
           'hash_prefix_from_name', 'load_state_dict', 'save_state_dict', 'save_torch_object']

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL_VERSION = 1001  # torch.serialization.PROTOCOL_VERSION
PICKLE_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL
ZIP_FILE_FORMAT_VERSION = b'3\n'  # what PyTorchStreamWriter writes for torch.save
ZIP_FORMAT_VERSION_RECORD = b'1'  # `.format_version`: storages in numeric key order
STORAGE_ALIGNMENT = 64  # bytes; torch pads every zip record's data to this boundary

_ZIP_MAGIC = b'PK\x03\x04'
_HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.[^.]+$')  # torch.hub's naming convention

# numpy spelling of each torch dtype understood here. bfloat16 and float8 are read as
# raw unsigned integers and reinterpreted by `_to_output`.
_NUMPY_SPELLING = {
    'float64': 'f8', 'float32': 'f4', 'float16': 'f2', 'bfloat16': 'u2',
    'complex128': 'c16', 'complex64': 'c8',
    'int64': 'i8', 'int32': 'i4', 'int16': 'i2', 'int8': 'i1',
    'uint64': 'u8', 'uint32': 'u4', 'uint16': 'u2', 'uint8': 'u1', 'bool': '?',
    'float8_e4m3fn': 'u1', 'float8_e5m2': 'u1',
}
# torch.<T>Storage -> the dtype it holds (torch/storage.py, _dtype_to_storage_type_map).
_STORAGE_DTYPES = {
    'DoubleStorage': 'float64', 'FloatStorage': 'float32', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'ComplexDoubleStorage': 'complex128',
    'ComplexFloatStorage': 'complex64', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8',
    'BoolStorage': 'bool', 'UntypedStorage': 'uint8',
}
_WRITER_STORAGE_TYPES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()
                         if name != 'UntypedStorage'}
# torch.<name> as a pickled dtype (an argument of _rebuild_tensor_v3) -> dtype.
_TORCH_DTYPES = {name: name for name in _NUMPY_SPELLING} | {
    'float': 'float32', 'double': 'float64', 'half': 'float16', 'long': 'int64',
    'int': 'int32', 'short': 'int16', 'cfloat': 'complex64', 'cdouble': 'complex128'}
# Modules a storage class is pickled from: torch.save maps every storage type to its
# name in `torch` (normalize_storage_type), but UntypedStorage is defined in
# torch.storage, so either spelling is accepted.
_STORAGE_MODULES = ('torch', 'torch.storage')
_REBUILD_FUNCTIONS = ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_tensor_v3',
                      '_rebuild_parameter', '_rebuild_parameter_with_state')


class TorchCheckpointError(ValueError):
    """A file `load_state_dict` refuses; the one-line message names the file."""


# --- hashes ---------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """Returns the hex sha256 digest of a file, read in 1 MiB chunks."""
    _require_file(path)
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def hash_prefix_from_name(path: str | os.PathLike) -> str | None:
    """Returns the sha256 prefix a weight file carries in its name, or None.

    torch.hub names released weights `<name>-<first 8+ hex digits of sha256>.<ext>`,
    e.g. `pt_inception-2015-12-05-6726825d.pth` -> '6726825d'. Fewer than 8 digits or
    upper-case hex are not that convention and give None.

    Args:
      path: the file's path or name.

    Returns:
      The lower-case hex prefix, or None when the name carries none.
    """
    match = _HASH_IN_NAME.search(os.path.basename(os.fspath(path)))
    return match.group(1) if match else None


def check_hash(path: str | os.PathLike, expected_prefix: str) -> str:
    """Checks that a file's sha256 starts with `expected_prefix`.

    Args:
      path: the file.
      expected_prefix: leading hex digits of the expected sha256 (any case).

    Returns:
      The file's full hex sha256 digest.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the digest does not start with `expected_prefix`, or the prefix is
        empty or not hexadecimal (an empty prefix would accept any file).
    """
    expected = expected_prefix.lower()
    if not re.fullmatch(r'[0-9a-f]{1,64}', expected):
        raise ValueError(f'expected sha256 prefix must be 1 to 64 hex digits, got '
                         f'{expected_prefix!r}')
    actual = file_sha256(path)
    if not actual.startswith(expected):
        raise ValueError(f'{os.fspath(path)}: sha256 {actual} does not start with the '
                         f'expected prefix {expected}')
    return actual


def _require_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} does not exist: a PyTorch checkpoint (a file '
                                'written by torch.save, e.g. a released .pt) is needed.')
    return path


# --- reader ---------------------------------------------------------------------------


class _StorageType(NamedTuple):
    """What `torch.<T>Storage` unpickles to: the dtype its bytes hold."""
    name: str
    dtype: str


class _TorchDType(NamedTuple):
    """What `torch.<dtype>` unpickles to."""
    dtype: str


class _LazyTensor(NamedTuple):
    """A tensor as the pickle describes it; its bytes are read after unpickling."""
    storage: '_Storage'
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str


class _Storage:
    """One storage: its dtype and element count, and where its bytes come from.

    A zip storage reads its record on first use; a legacy storage is filled from the
    storage section after the pickles; a legacy view storage (old torch) is a window
    `[root_offset, root_offset + numel)` of a root storage.
    """

    __slots__ = ('dtype', 'numel', 'byteorder', 'data', 'loader', 'root', 'root_offset')

    def __init__(self, dtype, numel, byteorder, loader=None, root=None, root_offset=0):
        self.dtype = dtype
        self.numel = numel
        self.byteorder = byteorder
        self.data = None
        self.loader = loader
        self.root = root
        self.root_offset = root_offset

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(_NUMPY_SPELLING[self.dtype]).itemsize

    def read(self, path: str) -> bytes:
        """Returns the storage's bytes, checking their length against the pickle's numel."""
        if self.root is not None:
            itemsize = np.dtype(_NUMPY_SPELLING[self.dtype]).itemsize
            start = self.root_offset * itemsize
            data = self.root.read(path)[start:start + self.nbytes]
        else:
            if self.data is None:
                if self.loader is None:
                    raise TorchCheckpointError(f'{path}: a tensor refers to a storage whose '
                                               'bytes are not in the file')
                self.data = self.loader()
            data = self.data
        if len(data) != self.nbytes:
            raise TorchCheckpointError(f'{path} is truncated or corrupt: a {self.dtype} '
                                       f'storage of {self.numel} elements needs '
                                       f'{self.nbytes} bytes, the file holds {len(data)}')
        return data


def _ascii(value: Any) -> Any:
    # torch.load decodes these id fields when a pickle holds them as bytes; so do we.
    return value.decode('ascii') if isinstance(value, bytes) else value


def _int_tuple(value: Any, what: str, path: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise TorchCheckpointError(f'{path}: tensor {what} must be a tuple of non-negative '
                                   f'ints, got {value!r}')
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only builds dicts, tensors and storages.

    `find_class` is the only way a pickle reaches a callable, so allowing a handful of
    globals, each mapped to an inert object defined here, means the file cannot execute
    code. Rebuild functions are returned as bound methods, which a malicious BUILD
    opcode cannot give new attributes (such as `__defaults__`).
    """

    def __init__(self, file, path: str, persistent_load: Callable[[Any], Any] | None):
        super().__init__(file, encoding='utf-8')  # torch.load's default encoding
        self._path = path
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if module == 'collections' and name == 'OrderedDict':
            return OrderedDict
        if module == 'torch._utils' and name in _REBUILD_FUNCTIONS:
            return getattr(self, name)
        if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == 'torch' and name == 'Size':
            return tuple  # a tuple subclass; some torch versions pickled sizes as one
        if module == 'torch' and name in _TORCH_DTYPES:
            return _TorchDType(_TORCH_DTYPES[name])
        raise TorchCheckpointError(f'{self._path}: refusing to unpickle the global '
                                   f'{module}.{name}; a state dict needs only tensors and '
                                   'dicts')

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise TorchCheckpointError(f'{self._path}: unexpected persistent id {pid!r}')
        return self._persistent_load(pid)

    def _tensor(self, storage, storage_offset, size, stride, dtype=None) -> _LazyTensor:
        if not isinstance(storage, _Storage):
            raise TorchCheckpointError(f'{self._path}: a tensor is built from a '
                                       f'{type(storage).__name__}, not a storage')
        size = _int_tuple(size, 'size', self._path)
        stride = _int_tuple(stride, 'stride', self._path)
        (offset,) = _int_tuple((storage_offset,), 'storage offset', self._path)
        if len(size) != len(stride):
            raise TorchCheckpointError(f'{self._path}: tensor size {size} and stride '
                                       f'{stride} differ in length')
        return _LazyTensor(storage, offset, size, stride, dtype or storage.dtype)

    def _check_metadata(self, metadata) -> None:
        # torch appends a metadata dict only when the tensor carries extra state (such
        # as lazy conjugate/negative bits) that would change its values.
        if metadata:
            raise TorchCheckpointError(f'{self._path}: a tensor carries metadata '
                                       f'{metadata!r}, which this reader cannot apply')

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        """torch < 0.4."""
        return self._tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad,
                           backward_hooks, metadata=None):
        del requires_grad, backward_hooks  # autograd state, meaningless for weights
        self._check_metadata(metadata)
        return self._tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad,
                           backward_hooks, dtype, metadata=None):
        del requires_grad, backward_hooks
        self._check_metadata(metadata)
        if not isinstance(dtype, _TorchDType):
            raise TorchCheckpointError(f'{self._path}: _rebuild_tensor_v3 got dtype '
                                       f'{dtype!r}')
        return self._tensor(storage, storage_offset, size, stride, dtype.dtype)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        del requires_grad, backward_hooks
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        del requires_grad, backward_hooks
        if state:
            raise TorchCheckpointError(f'{self._path}: a parameter carries Python state '
                                       f'{sorted(state)!r}, which this reader cannot restore')
        return data


def _storage_from_pid(pid: Any, length: int, path: str) -> tuple:
    """Checks a ('storage', storage_type, key, location, numel, ...) persistent id."""
    if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != 'storage':
        if isinstance(pid, tuple) and pid and _ascii(pid[0]) == 'module':
            raise TorchCheckpointError(f'{path} pickles a whole torch.nn.Module, not a '
                                       'state dict; save model.state_dict() instead')
        raise TorchCheckpointError(f'{path}: unknown persistent id {pid!r}')
    if len(pid) != length:
        raise TorchCheckpointError(f'{path}: storage id {pid!r} should have {length} fields')
    storage_type, key, numel = pid[1], _ascii(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
        raise TorchCheckpointError(f'{path}: storage id names the type {storage_type!r}')
    if not isinstance(key, (str, int)) or not isinstance(numel, int) or numel < 0:
        raise TorchCheckpointError(f'{path}: malformed storage id {pid!r}')
    return storage_type, str(key), numel


def _file_dtype(dtype: str, byteorder: str) -> np.dtype:
    """The numpy dtype that reads a torch dtype's bytes as the file stores them."""
    return np.dtype(_NUMPY_SPELLING[dtype]).newbyteorder(
        '<' if byteorder == 'little' else '>')


def _to_output(raw: np.ndarray, dtype: str, path: str) -> np.ndarray:
    """A native-order, C-contiguous copy of `raw` in the dtype callers receive."""
    native = raw.astype(raw.dtype.newbyteorder('='), order='C')
    if dtype == 'bfloat16':
        if ml_dtypes is not None:
            return native.view(ml_dtypes.bfloat16)
        # bfloat16 is the upper half of a float32, so widening is exact.
        return (native.astype(np.uint32) << 16).view(np.float32)
    if dtype.startswith('float8'):
        if ml_dtypes is None:
            raise TorchCheckpointError(f'{path}: reading {dtype} tensors needs ml_dtypes')
        return native.view(getattr(ml_dtypes, dtype))
    return native


def _materialize(tensor: _LazyTensor, path: str) -> np.ndarray:
    """Copies a tensor's elements out of its storage, honouring offset and strides."""
    data = tensor.storage.read(path)
    file_dtype = _file_dtype(tensor.dtype, tensor.storage.byteorder)
    if 0 in tensor.size:
        return _to_output(np.empty(tensor.size, file_dtype), tensor.dtype, path)
    flat = np.frombuffer(data, dtype=file_dtype, count=len(data) // file_dtype.itemsize)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if last >= flat.size:
        raise TorchCheckpointError(f'{path}: a tensor of size {tensor.size}, stride '
                                   f'{tensor.stride} and offset {tensor.offset} reaches '
                                   f'past its storage of {flat.size} elements')
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset:], shape=tensor.size,
        strides=tuple(s * file_dtype.itemsize for s in tensor.stride), writeable=False)
    return _to_output(view, tensor.dtype, path)


def _describe(value: Any) -> str:
    if isinstance(value, _Storage):
        return 'bare storage'
    return type(value).__name__


def _is_tensor_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(v, _LazyTensor) for v in value.values()))


def _select(obj: Any, key: str | None, path: str) -> dict[str, _LazyTensor]:
    """The flat {name: tensor} dict at the top level of `obj`, or under `obj[key]`.

    A dotted key ('ema.shadow_params') descends through nested dicts; a list or tuple
    of tensors found there is returned as {'0': t_0, '1': t_1, ...}.
    """
    where = ''
    if key is not None:
        for part in key.split('.'):
            if not isinstance(obj, dict):
                raise TorchCheckpointError(f'{path} is not a PyTorch state dict: cannot take '
                                           f'key {part!r} of an object of type '
                                           f'{_describe(obj)}')
            if part not in obj:
                top = 'top-level ' if not where else ''
                raise TorchCheckpointError(f'{path} has no {top}key {part!r}{where}; it has '
                                           f'{list(obj)[:20]!r}')
            obj, where = obj[part], f' under key {key!r}'
        if (isinstance(obj, (list, tuple)) and obj
                and all(isinstance(v, _LazyTensor) for v in obj)):
            obj = {str(i): v for i, v in enumerate(obj)}
    if not isinstance(obj, dict):
        raise TorchCheckpointError(f'{path} is not a PyTorch state dict: the object{where} '
                                   f'is of type {_describe(obj)}')
    tensors = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise TorchCheckpointError(f'{path} is not a PyTorch state dict: key '
                                       f'{name!r}{where} is not a str')
        if not isinstance(value, _LazyTensor):
            nested = [k for k, v in obj.items() if _is_tensor_dict(v)]
            hint = (f'; state dicts sit under {nested!r}, select one with '
                    'load_state_dict(path, key=...)' if nested and key is None else '')
            raise TorchCheckpointError(f'{path} is not a PyTorch state dict: '
                                       f'{name!r}{where} is of type {_describe(value)}, not '
                                       f'a tensor{hint}')
        tensors[name] = value
    return tensors


def _load_zip(path: str, f, key: str | None) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(f) as zf:
        names = zf.namelist()
        if not names or '/' not in names[0]:
            raise TorchCheckpointError(f'{path}: zip archive has no top folder, not a '
                                       'torch.save file')
        prefix = names[0].split('/', 1)[0] + '/'  # as PyTorchStreamReader finds it
        records = set(names)
        if prefix + 'constants.pkl' in records:
            raise TorchCheckpointError(f'{path} is a TorchScript archive (torch.jit.save), '
                                       'not a state dict')
        if prefix + 'data.pkl' not in records:
            raise TorchCheckpointError(f'{path}: zip archive has no {prefix}data.pkl, not a '
                                       'torch.save file')
        byteorder = 'little'  # torch.load's default when the record is absent
        if prefix + 'byteorder' in records:
            byteorder = zf.read(prefix + 'byteorder').decode('ascii', 'replace')
            if byteorder not in ('little', 'big'):
                raise TorchCheckpointError(f'{path}: unknown byteorder record {byteorder!r}')
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            storage_type, storage_key, numel = _storage_from_pid(pid, 5, path)
            if storage_key not in storages:
                record = f'{prefix}data/{storage_key}'
                if record not in records:
                    raise TorchCheckpointError(f'{path} is truncated or corrupt: record '
                                               f'{record} is missing')
                storages[storage_key] = _Storage(storage_type.dtype, numel, byteorder,
                                                 loader=lambda: zf.read(record))
            return storages[storage_key]

        obj = _RestrictedUnpickler(io.BytesIO(zf.read(prefix + 'data.pkl')), path,
                                   persistent_load).load()
        tensors = _select(obj, key, path)
        return {name: _materialize(t, path) for name, t in tensors.items()}


def _read_exact(f, n: int, what: str, path: str) -> bytes:
    # Checked before reading so that a corrupt element count cannot ask for more
    # memory than the file could fill.
    left = os.fstat(f.fileno()).st_size - f.tell()
    if n > left:
        raise TorchCheckpointError(f'{path} is truncated: {what} needs {n} bytes, only '
                                   f'{max(left, 0)} are left')
    return f.read(n)


def _load_legacy(path: str, f, key: str | None) -> dict[str, np.ndarray]:
    try:
        magic = _RestrictedUnpickler(f, path, None).load()
    except Exception:  # noqa: BLE001 - anything unreadable here means "not this format"
        magic = None
    if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
        if tarfile.is_tarfile(path):
            raise TorchCheckpointError(f'{path} uses the tar checkpoint format of very old '
                                       'torch (< 0.4), which is not supported')
        raise TorchCheckpointError(f'{path} is not a PyTorch checkpoint: neither a zip '
                                   'archive nor a legacy torch.save file (no magic number)')
    version = _RestrictedUnpickler(f, path, None).load()
    if version != LEGACY_PROTOCOL_VERSION:
        raise TorchCheckpointError(f'{path}: unsupported legacy protocol version {version!r}')
    # sys_info records the writer's byte order and C type sizes; storages are
    # little-endian whatever the writer's byte order, so nothing in it is needed.
    _RestrictedUnpickler(f, path, None).load()

    storages: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}

    def persistent_load(pid):
        storage_type, root_key, numel = _storage_from_pid(pid, 6, path)
        root = storages.setdefault(root_key, _Storage(storage_type.dtype, numel, 'little'))
        view_metadata = pid[5]
        if view_metadata is None:
            return root
        # torch < 1.0 could save a storage that views part of another one.
        if (not isinstance(view_metadata, tuple) or len(view_metadata) != 3
                or not all(isinstance(v, int) and v >= 0 for v in view_metadata[1:])):
            raise TorchCheckpointError(f'{path}: malformed storage view {view_metadata!r}')
        view_key, offset, view_numel = view_metadata
        return views.setdefault(str(_ascii(view_key)), _Storage(
            root.dtype, view_numel, 'little', root=root, root_offset=offset))

    obj = _RestrictedUnpickler(f, path, persistent_load).load()
    keys = _RestrictedUnpickler(f, path, None).load()
    if not isinstance(keys, list):
        raise TorchCheckpointError(f'{path}: the storage key list is a {type(keys).__name__}')
    tensors = _select(obj, key, path)
    needed = {id(t.storage.root or t.storage) for t in tensors.values()}
    for storage_key in keys:
        storage = storages.get(str(_ascii(storage_key)))
        if storage is None:
            raise TorchCheckpointError(f'{path}: storage {storage_key!r} is not used by the '
                                       'pickle')
        (numel,) = struct.unpack('<q', _read_exact(f, 8, f'storage {storage_key}', path))
        if numel != storage.numel:
            raise TorchCheckpointError(f'{path}: storage {storage_key} holds {numel} '
                                       f'elements, the pickle says {storage.numel}')
        if id(storage) in needed:
            storage.data = _read_exact(f, storage.nbytes, f'storage {storage_key}', path)
        else:
            f.seek(storage.nbytes, os.SEEK_CUR)
    return {name: _materialize(t, path) for name, t in tensors.items()}


def load_state_dict(path: str | os.PathLike, *, key: str | None = None
                    ) -> dict[str, np.ndarray]:
    """Reads a state dict saved by `torch.save`, in either format, without torch.

    Args:
      path: a file written by `torch.save(state_dict, path)` (zip or legacy format).
      key: None to read the top-level object as the state dict; otherwise the top-level
        dict's entry holding it (e.g. 'state_dict', 'model' or 'ema' in training
        checkpoints that bundle several), or a dotted path to a nested one; a list of
        tensors there ('ema.shadow_params' of score_sde) reads as {'0': ..., '1': ...}.

    Returns:
      {name: array} in the file's order. Arrays are C-contiguous native-endian copies in
      the tensor's dtype: float16/32/64, complex64/128, int8/16/32/64, uint8 (and
      uint16/32/64), bool; bfloat16 and float8 as ml_dtypes types (bfloat16 widened to
      float32 when ml_dtypes is missing).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is truncated or corrupt, is not a torch.save file, or holds
        something other than a flat dict of tensors (at `key`), or its pickle references
        any global a state dict does not need (it is then not executed). The message is
        one line naming the file.
    """
    path = _require_file(path)
    with open(path, 'rb') as f:
        try:
            if f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC:
                f.seek(0)
                return _load_zip(path, f, key)
            f.seek(0)
            return _load_legacy(path, f, key)
        except TorchCheckpointError:
            raise
        except (MemoryError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - a malformed file can fail anywhere
            detail = ' '.join(f'{type(e).__name__}: {e}'.split())
            raise TorchCheckpointError(f'{path} is truncated or corrupt, not a readable '
                                       f'PyTorch checkpoint ({detail})') from e


# --- writer (for tests) ---------------------------------------------------------------


class StorageView(NamedTuple):
    """A tensor given the way torch holds it: a strided window into a flat storage.

    `save_state_dict` writes a plain array as a contiguous tensor with a storage of its
    own. A StorageView instead writes what torch writes for a view (a transposed,
    sliced or expanded tensor): the whole storage plus offset, shape and strides.
    Views whose `storage` is the same array object share one storage in the file.

    Attributes:
      storage: 1-D array, the whole storage; its dtype is the tensor's.
      offset: index in `storage` of the tensor's first element.
      shape: the tensor's shape.
      stride: strides in elements (not bytes), one per dimension, non-negative.
    """
    storage: np.ndarray
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _TorchGlobal:
    """Stand-in for a torch global (function, storage class or dtype) in the writer.

    pickle writes a global as its module and name, and checks while pickling that the
    module really has that object; without torch those names cannot resolve. So each
    stand-in is registered in this module under a private name, pickled as a global of
    this module, and `_retarget_globals` rewrites those GLOBAL opcodes to the torch
    names afterwards (protocol 2 has no frames or byte offsets, so an opcode may change
    length). This keeps sys.modules free of fake torch modules, which other libraries
    would take for a real torch.
    """

    __slots__ = ('module', 'name', 'attr')

    def __init__(self, module: str, name: str, attr: str):
        self.module = module
        self.name = name
        self.attr = attr

    def __reduce__(self) -> str:
        return self.attr  # a str: "pickle me as the global of that name in my module"

    def __call__(self, *args):
        raise TypeError(f'{self.module}.{self.name} is a pickling stand-in, not callable')


_STAND_INS: dict[tuple[str, str], _TorchGlobal] = {}
_STAND_IN_BY_ATTR: dict[str, _TorchGlobal] = {}


def _torch_global(module: str, name: str) -> _TorchGlobal:
    """The stand-in pickled as GLOBAL `module name` (any names, for crafted tests)."""
    if (module, name) not in _STAND_INS:
        attr = f'_torch_global_{len(_STAND_INS)}'
        stand_in = _TorchGlobal(module, name, attr)
        globals()[attr] = stand_in
        _STAND_INS[module, name] = stand_in
        _STAND_IN_BY_ATTR[attr] = stand_in
    return _STAND_INS[module, name]


class _Call:
    """`func(*args)` in the pickle (GLOBAL func, args, REDUCE), as __reduce__ writes it."""

    __slots__ = ('func', 'args')

    def __init__(self, func: _TorchGlobal, args: tuple):
        self.func = func
        self.args = args

    def __reduce__(self):
        return self.func, self.args


class _WriterStorage:
    """A storage to write: its little-endian bytes, torch storage class and numel."""

    __slots__ = ('data', 'storage_type', 'numel')

    def __init__(self, data: bytes, storage_type: _TorchGlobal, numel: int):
        self.data = data
        self.storage_type = storage_type
        self.numel = numel


class _LegacyStorageView:
    """A legacy-format storage that views `numel` elements of `root` from `offset`."""

    __slots__ = ('root', 'key', 'offset', 'numel')

    def __init__(self, root: _WriterStorage, key: str, offset: int, numel: int):
        self.root = root
        self.key = key
        self.offset = offset
        self.numel = numel


def _dtype_name(dtype: np.dtype) -> str:
    if ml_dtypes is not None and dtype == ml_dtypes.bfloat16:
        return 'bfloat16'
    return np.dtype(dtype).name


def _storage_for(array: np.ndarray) -> _WriterStorage:
    """A storage holding `array`'s elements in C order, as little-endian bytes."""
    name = _dtype_name(array.dtype)
    if name not in _WRITER_STORAGE_TYPES:
        raise ValueError(f'cannot write a {array.dtype} tensor: torch.save writes only '
                         f'{sorted(_WRITER_STORAGE_TYPES)} through _rebuild_tensor_v2')
    flat = np.ascontiguousarray(array).reshape(-1)
    if name == 'bfloat16':
        data = flat.view(np.uint16).astype('<u2').tobytes()
    else:
        data = flat.astype(flat.dtype.newbyteorder('<')).tobytes()
    return _WriterStorage(data, _torch_global('torch', _WRITER_STORAGE_TYPES[name]),
                          flat.size)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    # torch's contiguous strides treat size-0 dimensions as size 1.
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


class _TensorConverter:
    """Replaces arrays and StorageViews in a nest with torch's tensor reduction."""

    def __init__(self):
        self._shared: dict[int, tuple[np.ndarray, _WriterStorage]] = {}

    def tensor(self, value: np.ndarray | StorageView) -> _Call:
        if isinstance(value, StorageView):
            base = np.asarray(value.storage)
            if base.ndim != 1:
                raise ValueError(f'StorageView.storage must be 1-D, got shape {base.shape}')
            if id(value.storage) not in self._shared:
                # Keep the array alive so its id cannot be reused by another storage.
                self._shared[id(value.storage)] = (value.storage, _storage_for(base))
            storage = self._shared[id(value.storage)][1]
            offset = int(value.offset)
            shape = tuple(int(n) for n in value.shape)
            stride = tuple(int(s) for s in value.stride)
            if (len(shape) != len(stride) or offset < 0 or min(shape + stride, default=0) < 0
                    or (0 not in shape and offset + sum(
                        (n - 1) * s for n, s in zip(shape, stride)) >= base.size)):
                raise ValueError(f'StorageView offset {offset}, shape {shape}, stride '
                                 f'{stride} does not fit a storage of {base.size}')
        else:
            array = np.asarray(value)
            storage, offset = _storage_for(array), 0
            shape = tuple(int(n) for n in array.shape)
            stride = _contiguous_stride(shape)
        # Tensor._reduce_ex_internal (torch/_tensor.py): requires_grad False for a
        # state dict's detached tensors, and always an empty OrderedDict of hooks.
        return _Call(_torch_global('torch._utils', '_rebuild_tensor_v2'),
                     (storage, offset, shape, stride, False, OrderedDict()))

    def convert(self, obj: Any) -> Any:
        if isinstance(obj, (np.ndarray, StorageView)):
            return self.tensor(obj)
        if isinstance(obj, dict):
            converted = type(obj)((k, self.convert(v)) for k, v in obj.items())
            # Keeps attributes such as the `_metadata` Module.state_dict() sets, which
            # pickle then restores with a BUILD opcode, as in torch's files.
            if hasattr(obj, '__dict__'):
                vars(converted).update(vars(obj))
            return converted
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.convert(v) for v in obj)
        if isinstance(obj, _Call):
            return _Call(obj.func, self.convert(obj.args))
        return obj


class _TorchPickler(pickle.Pickler):
    """Pickles like torch.save's pickler: protocol 2, storages as persistent ids."""

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self._legacy = legacy
        self._keys: dict[int, str] = {}
        self.storages: dict[str, _WriterStorage] = {}  # key -> storage, first use first

    def _key(self, storage: _WriterStorage) -> str:
        # torch's zip writer numbers storages by first appearance; its legacy writer
        # uses str(storage._cdata), any unique decimal string, which this mimics.
        if id(storage) not in self._keys:
            self._keys[id(storage)] = str(len(self._keys))
            self.storages[self._keys[id(storage)]] = storage
        return self._keys[id(storage)]

    def persistent_id(self, obj: Any) -> tuple | None:
        if isinstance(obj, _LegacyStorageView):
            if not self._legacy:
                raise ValueError('storage views exist only in the legacy format')
            root = obj.root
            return ('storage', root.storage_type, self._key(root), 'cpu', root.numel,
                    (obj.key, obj.offset, obj.numel))
        if not isinstance(obj, _WriterStorage):
            return None
        pid = ('storage', obj.storage_type, self._key(obj), 'cpu', obj.numel)
        return pid + (None,) if self._legacy else pid


def _retarget_globals(data: bytes) -> bytes:
    """Rewrites GLOBAL opcodes naming stand-ins in this module to the torch names."""
    ops = list(pickletools.genops(data))
    out = bytearray()
    for i, (opcode, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        chunk = data[pos:end]
        if opcode.name == 'GLOBAL':
            module, name = arg.split(' ', 1)
            if module == __name__:
                stand_in = _STAND_IN_BY_ATTR[name]
                chunk = b'c' + f'{stand_in.module}\n{stand_in.name}\n'.encode('ascii')
        out += chunk
    return bytes(out)


def _dumps(obj: Any, legacy: bool) -> tuple[bytes, dict[str, _WriterStorage]]:
    buf = io.BytesIO()
    pickler = _TorchPickler(buf, legacy)
    pickler.dump(obj)
    return _retarget_globals(buf.getvalue()), pickler.storages


def _default_archive_name(path: str) -> str:
    """The zip folder torch.save uses for a path: the file name up to its last dot."""
    base = os.path.basename(path)
    stem = base[:base.rindex('.')] if '.' in base else base
    # A non-ascii or empty name makes torch write through a Python stream: 'archive'.
    return stem if stem and stem.isascii() else 'archive'


def _serialization_id(records: list[tuple[str, bytes]]) -> bytes:
    # torch combines c10 hashes of the record names and their CRCs; readers only log
    # it, so any 40 digits that change with the content serve.
    digest = hashlib.sha256()
    for name, data in records:
        digest.update(name.encode() + b'\0' + data)
    a, b = struct.unpack('<QQ', digest.digest()[:16])
    return f'{a % 10**20:020d}{b % 10**20:020d}'.encode('ascii')


def _alignment_extra(header_offset: int, name: str, size: int) -> bytes:
    """The 'FB' zip extra field that starts the record's data on a 64-byte boundary."""
    # Mirrors detail::getPadding in caffe2/serialize/inline_container.cc: 30-byte local
    # header, the name, 4 bytes of extra-field header, plus the ZIP64 extra field
    # Python's zipfile adds for very large records.
    start = header_offset + 30 + len(name.encode('ascii')) + 4
    if size * 1.05 > zipfile.ZIP64_LIMIT:
        start += 20
    padding = -start % STORAGE_ALIGNMENT
    return b'FB' + struct.pack('<H', padding) + b'Z' * padding


def _write_zip(path: str, pickled: bytes, storages: dict[str, _WriterStorage],
               archive_name: str) -> None:
    records = [('data.pkl', pickled),
               ('.format_version', ZIP_FORMAT_VERSION_RECORD),
               ('.storage_alignment', str(STORAGE_ALIGNMENT).encode('ascii')),
               ('byteorder', b'little')]
    records += [(f'data/{key}', storage.data) for key, storage in storages.items()]
    records.append(('version', ZIP_FILE_FORMAT_VERSION))
    records.append(('.data/serialization_id', _serialization_id(records)))
    with open(path, 'wb') as f, zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(f'{archive_name}/{name}', date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.extra = _alignment_extra(f.tell(), info.filename, len(data))
            zf.writestr(info, data)


def _write_legacy(path: str, pickled: bytes, storages: dict[str, _WriterStorage]) -> None:
    keys = sorted(storages)  # _legacy_save sorts the keys as strings
    # torch measures the sizes with struct.Struct('=h'/'=i'/'=l'), which are standard
    # sizes: 2, 4 and 4 bytes on every platform.
    sys_info = dict(protocol_version=LEGACY_PROTOCOL_VERSION, little_endian=True,
                    type_sizes=dict(short=2, int=4, long=4))
    with open(path, 'wb') as f:
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, sys_info):
            f.write(pickle.dumps(header, protocol=PICKLE_PROTOCOL))
        f.write(pickled)
        f.write(pickle.dumps(keys, protocol=PICKLE_PROTOCOL))
        for key in keys:
            f.write(struct.pack('<q', storages[key].numel))
            f.write(storages[key].data)


def save_torch_object(path: str | os.PathLike, obj: Any, *, legacy: bool = False,
                      archive_name: str | None = None) -> None:
    """Writes `obj` as `torch.save(obj, path)` would, with every array as a CPU tensor.

    For tests that need PyTorch checkpoints without torch: nested dicts, lists and
    tuples are pickled as they are, and each np.ndarray or StorageView inside becomes a
    tensor (requires_grad=False). A dict stays a dict and an OrderedDict an
    OrderedDict, as torch would pickle them.

    Args:
      path: the file to write.
      obj: the object; arrays may be float16/32/64, bfloat16 (ml_dtypes),
        complex64/128, int8/16/32/64, uint8 or bool.
      legacy: write the pre-1.6 format (`_use_new_zipfile_serialization=False`)
        instead of the zip format.
      archive_name: the zip's top folder; None uses torch's choice for a path (the
        file name without its extension). Ignored when `legacy`.

    Raises:
      ValueError: an array's dtype has no legacy torch storage class (uint16 and the
        like, which torch writes through _rebuild_tensor_v3).
    """
    path = os.fspath(path)
    pickled, storages = _dumps(_TensorConverter().convert(obj), legacy)
    if legacy:
        _write_legacy(path, pickled, storages)
    else:
        _write_zip(path, pickled, storages, archive_name or _default_archive_name(path))


def save_state_dict(path: str | os.PathLike, tensors: Mapping[str, np.ndarray | StorageView],
                    *, legacy: bool = False, archive_name: str | None = None) -> None:
    """Writes a state dict as `torch.save(model.state_dict(), path)` would.

    The file holds an OrderedDict of CPU tensors, as `Module.state_dict()` returns.
    Meant for tests; see `save_torch_object`.

    Args:
      path: the file to write.
      tensors: {name: array or StorageView}, written in this order. A plain array
        becomes a contiguous tensor with its own storage; StorageViews that share a
        `storage` array share one storage in the file, as torch's views do. A
        `_metadata` attribute on `tensors` (module versions, as `Module.state_dict()`
        sets it) is written too.
      legacy: write the pre-1.6 format instead of the zip format.
      archive_name: the zip's top folder; None uses the file name without extension.

    Raises:
      ValueError: an unsupported dtype, or a StorageView that leaves its storage.
    """
    state_dict = OrderedDict(tensors)
    if hasattr(tensors, '_metadata'):
        state_dict._metadata = tensors._metadata
    save_torch_object(path, state_dict, legacy=legacy, archive_name=archive_name)
