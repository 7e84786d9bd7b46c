"""NestedMap: a dict with attribute access, for nested structures of tensors.

Invariant: a NestedMap is a plain `dict` subclass whose keys are valid Python
identifiers, so `tf.nest` treats it as a mapping (flattening in sorted-key order)
and rebuilds it as a NestedMap. Layers pass their variables (theta) and their
multi-tensor inputs (e.g. ids with paddings) as NestedMaps; the pipeline splits,
moves and merges them without knowing their shape.
"""

from __future__ import annotations

import keyword
import re
from typing import Any, Callable

_KEY_RE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
_DICT_ATTRS = frozenset(dir(dict))


class NestedMap(dict):
  """A dict whose values are reachable as attributes: `m.a.b` is `m['a']['b']`."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    for key in self:
      self._CheckKey(key)

  @staticmethod
  def _CheckKey(key: Any) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
      raise ValueError(
          f'NestedMap key {key!r} is not valid: keys must be identifiers '
          '(letters, digits and _, not starting with a digit).')
    if keyword.iskeyword(key) or key in _DICT_ATTRS:
      raise ValueError(
          f'NestedMap key {key!r} is reserved (a Python keyword or a dict '
          'method); pick another name.')

  def __setitem__(self, key: str, value: Any) -> None:
    self._CheckKey(key)
    super().__setitem__(key, value)

  def __setattr__(self, name: str, value: Any) -> None:
    self[name] = value

  def __getattr__(self, name: str) -> Any:
    try:
      return self[name]
    except KeyError:
      raise AttributeError(
          f'NestedMap has no key {name!r}; keys are {sorted(self.keys())}'
      ) from None

  def __delattr__(self, name: str) -> None:
    try:
      del self[name]
    except KeyError:
      raise AttributeError(f'NestedMap has no key {name!r}') from None

  def setdefault(self, key: str, default: Any = None) -> Any:
    self._CheckKey(key)
    return super().setdefault(key, default)

  def update(self, *args, **kwargs) -> None:
    for key, value in dict(*args, **kwargs).items():
      self[key] = value

  def copy(self) -> 'NestedMap':
    """Shallow copy that stays a NestedMap (dict.copy would return a dict)."""
    return NestedMap(self)

  def DeepCopy(self) -> 'NestedMap':
    """Copies the nested structure; leaves (tensors, variables) are shared."""
    return self.Transform(lambda x: x)

  # --- structure -----------------------------------------------------------

  def FlattenItems(self) -> list[tuple[str, Any]]:
    """(dotted path, leaf) pairs in sorted-key order, the order of Flatten.

    Lists and tuples appear as `name[i]`; empty containers have no leaves.
    """
    items = []

    def Visit(prefix: str, value: Any) -> None:
      if isinstance(value, dict):
        for key in sorted(value):
          Visit(f'{prefix}.{key}' if prefix else key, value[key])
      elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
          Visit(f'{prefix}[{i}]', v)
      else:
        items.append((prefix, value))

    Visit('', self)
    return items

  def Flatten(self) -> list[Any]:
    """Leaves in sorted-key order (the same order as `tf.nest.flatten`)."""
    return [v for _, v in self.FlattenItems()]

  def Pack(self, leaves: list[Any]) -> 'NestedMap':
    """A NestedMap of the same structure whose leaves are `leaves`, in order."""
    leaves = list(leaves)
    expected = len(self.FlattenItems())
    if len(leaves) != expected:
      raise ValueError(
          f'Pack got {len(leaves)} leaves; this NestedMap has {expected}.')
    it = iter(leaves)

    def Build(value: Any) -> Any:
      if isinstance(value, dict):
        return type(value)((k, Build(value[k])) for k in sorted(value))
      if isinstance(value, (list, tuple)):
        built = [Build(v) for v in value]
        if isinstance(value, tuple) and hasattr(value, '_fields'):
          return type(value)(*built)
        return type(value)(built)
      return next(it)

    return Build(self)

  def Transform(self, fn: Callable[[Any], Any]) -> 'NestedMap':
    """A NestedMap of the same structure with `fn` applied to every leaf."""
    return self.Pack([fn(v) for v in self.Flatten()])

  def Filter(self, fn: Callable[[Any], bool]) -> 'NestedMap':
    """Keeps the leaves for which `fn(leaf)` is true; empty branches go too."""

    def Keep(value: Any) -> Any:
      if isinstance(value, dict):
        kept = NestedMap() if isinstance(value, NestedMap) else type(value)()
        for key in sorted(value):
          sub = Keep(value[key])
          if sub is not _DROP:
            kept[key] = sub
        return kept if kept or not value else _DROP
      if isinstance(value, (list, tuple)):
        kept = [s for s in (Keep(v) for v in value) if s is not _DROP]
        return type(value)(kept) if kept or not value else _DROP
      return value if fn(value) else _DROP

    result = Keep(self)
    return NestedMap() if result is _DROP else result

  def IsCompatible(self, other: Any) -> bool:
    """True if `other` has the same nested keys (leaves may differ)."""
    if not isinstance(other, dict):
      return False
    return [k for k, _ in self.FlattenItems()] == [
        k for k, _ in NestedMap(other).FlattenItems()]

  def DebugString(self) -> str:
    """One `dotted.path  value` line per leaf, sorted; tensors by shape/dtype."""
    lines = []
    for key, value in self.FlattenItems():
      shape = getattr(value, 'shape', None)
      dtype = getattr(value, 'dtype', None)
      if shape is not None and dtype is not None:
        dtype_name = getattr(dtype, 'name', dtype)
        text = f'{type(value).__name__}(shape={list(shape)}, dtype={dtype_name})'
      else:
        text = repr(value)
      lines.append(f'{key}  {text}')
    return '\n'.join(lines)


_DROP = object()
