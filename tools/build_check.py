"""Checks that the Bazel BUILD files describe the source tree, without running Bazel.

Invariant kept: every Python file under the source directories is in the `srcs` of exactly one
target of the BUILD file in its own directory (a `*_test.py` in a `py_test` named after it);
every listed source exists; every dependency label names a declared, visible target; and every
import a file makes is a dependency of its target (first-party imports as `//pkg:name`,
third-party ones as `requirement("pip-name")`). Every config library under `params/` is also
reachable from `//params:all_configs`, which binaries that look models up by name depend on.

BUILD files are read by executing them as Python with stand-ins for the Starlark built-ins
(Starlark BUILD syntax is a subset of Python), so this needs neither Bazel nor network access.

Usage:
  python tools/build_check.py [--root DIR]

prints each problem with the BUILD lines that fix it and exits 1 if there is any. It never
writes a BUILD file. Standard library only, so it runs before any dependency is installed.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import glob as glob_lib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]

# Directories whose Python files must all be in BUILD targets.
SOURCE_DIRS = ('lingvo_gpipe', 'params', 'tasks', 'tests', 'bench', 'tools')

BUILD_FILE_NAMES = ('BUILD', 'BUILD.bazel')

RULES_PYTHON_DEFS = '@rules_python//python:defs.bzl'
REQUIREMENTS_BZL = '@pypi//:requirements.bzl'
PYPI_REPO = '@pypi//'
REQUIREMENTS_FILES = ('requirements.txt', 'requirements-dev.txt')

# The target that depends on every config library, so its dependents can find every model.
ALL_CONFIGS_LABEL = '//params:all_configs'
PARAMS_DIR = 'params'

# Top-level import name -> pip package, for each third-party package the code may import.
# A new third-party import needs a line here and its package in requirements*.txt.
THIRD_PARTY_PACKAGES = {
    'absl': 'absl-py',
    'numpy': 'numpy',
    'PIL': 'pillow',
    'pytest': 'pytest',
    'sacrebleu': 'sacrebleu',
    'sklearn': 'scikit-learn',
    'tensorboard': 'tensorboard',
    'tensorflow': 'tensorflow',
    'tensorflow_datasets': 'tensorflow-datasets',
}

_PY_RULES = ('py_library', 'py_binary', 'py_test')
_PUBLIC = '//visibility:public'


class BuildFileError(Exception):
  """A BUILD file that cannot be read."""


@dataclasses.dataclass
class Target:
  """One rule instance declared in a BUILD file."""
  kind: str
  name: str
  package: str  # Directory relative to the root, '' for the root package.
  srcs: list[str]
  deps: list[str]
  visibility: list[str]

  @property
  def label(self) -> str:
    return f'//{self.package}:{self.name}'


@dataclasses.dataclass
class Problem:
  """One way the BUILD files disagree with the tree; `message` says how to fix it."""
  category: str
  message: str


@dataclasses.dataclass
class Package:
  """The parsed contents of one BUILD file."""
  name: str
  build_file: Path
  targets: dict[str, Target]
  exported_files: set[str]
  problems: list[Problem]
  loaded: set[str] = dataclasses.field(default_factory=set)  # Symbols made available by load().


def NormalizePipName(name: str) -> str:
  """The repository name rules_python gives a pip package: 'absl-py' -> 'absl_py'."""
  return re.sub(r'[-_.]+', '_', name).lower()


def _IsSkippedDir(name: str) -> bool:
  return name.startswith('.') or name == '__pycache__' or name.startswith('bazel-')


def _Walk(root: Path, top: Path) -> Iterable[tuple[Path, list[str], list[str]]]:
  for dirpath, dirnames, filenames in os.walk(top):
    dirnames[:] = sorted(d for d in dirnames if not _IsSkippedDir(d))
    yield Path(dirpath), dirnames, sorted(filenames)


def _PackageName(root: Path, directory: Path) -> str:
  rel = directory.relative_to(root).as_posix()
  return '' if rel == '.' else rel


def _BuildFileIn(directory: Path) -> Path | None:
  for name in BUILD_FILE_NAMES:
    if (directory / name).is_file():
      return directory / name
  return None


# ---------------------------------------------------------------------------------------------
# Reading BUILD files.


def ParseBuildFile(root: Path, build_file: Path) -> Package:
  """Executes one BUILD file with Starlark stand-ins and returns what it declares."""
  package = Package(
      name=_PackageName(root, build_file.parent),
      build_file=build_file,
      targets={},
      exported_files=set(),
      problems=[])
  where = build_file.relative_to(root).as_posix()
  package_visibility: list[str] = []

  def AddTarget(kind: str, name: Any, srcs: Any, deps: Any, visibility: Any) -> None:
    if not isinstance(name, str) or not name:
      raise BuildFileError(f'{where}: a {kind} has no string `name`.')
    if name in package.targets:
      package.problems.append(Problem(
          'duplicate_target',
          f'{where}: target name {name!r} is declared twice; rename or merge one of them.'))
    package.targets[name] = Target(
        kind=kind, name=name, package=package.name, srcs=list(srcs or ()),
        deps=list(deps or ()),
        visibility=list(visibility) if visibility is not None else list(package_visibility))

  def Rule(kind: str):
    def Declare(*args, name=None, srcs=(), deps=(), visibility=None, **unused_kwargs):
      if args:
        raise BuildFileError(f'{where}: {kind}({name!r}) takes keyword arguments only.')
      AddTarget(kind, name, srcs, deps, visibility)
    Declare.__name__ = kind
    return Declare

  def Requirement(pip_name: str) -> str:
    return PYPI_REPO + NormalizePipName(pip_name)

  loadable = {RULES_PYTHON_DEFS: {k: Rule(k) for k in _PY_RULES},
              REQUIREMENTS_BZL: {'requirement': Requirement}}

  namespace: dict[str, Any] = {}

  def Load(label: str, *symbols: str, **aliases: str) -> None:
    if label not in loadable:
      raise BuildFileError(
          f'{where}: load({label!r}) is not understood by tools/build_check.py; use '
          f'{RULES_PYTHON_DEFS!r} or {REQUIREMENTS_BZL!r}, or teach the checker the new file.')
    for local, symbol in [(s, s) for s in symbols] + list(aliases.items()):
      if symbol not in loadable[label]:
        raise BuildFileError(
            f'{where}: {label!r} has no symbol {symbol!r} known to tools/build_check.py '
            f'(known: {", ".join(sorted(loadable[label]))}).')
      namespace[local] = loadable[label][symbol]
      package.loaded.add(local)

  def PackageFn(default_visibility=None, **unused_kwargs) -> None:
    package_visibility[:] = list(default_visibility or ())

  def Glob(include, exclude=(), **unused_kwargs) -> list[str]:
    directory = build_file.parent
    found: set[str] = set()
    for pattern in include:
      found.update(
          Path(p).relative_to(directory).as_posix()
          for p in glob_lib.glob(str(directory / pattern), recursive=True) if Path(p).is_file())
    for pattern in exclude:
      found.difference_update(
          Path(p).relative_to(directory).as_posix()
          for p in glob_lib.glob(str(directory / pattern), recursive=True))
    return sorted(found)

  def Filegroup(*args, name=None, srcs=(), visibility=None, **unused_kwargs) -> None:
    if args:
      raise BuildFileError(f'{where}: filegroup({name!r}) takes keyword arguments only.')
    AddTarget('filegroup', name, srcs, (), visibility)

  def ExportsFiles(srcs, **unused_kwargs) -> None:
    package.exported_files.update(srcs)

  namespace.update({
      '__builtins__': __builtins__,
      'load': Load,
      'package': PackageFn,
      'glob': Glob,
      'filegroup': Filegroup,
      'exports_files': ExportsFiles,
  })
  try:
    code = compile(build_file.read_text(), str(build_file), 'exec')
    exec(code, namespace)  # pylint: disable=exec-used
  except BuildFileError:
    raise
  except NameError as e:
    symbol = getattr(e, 'name', None) or str(e)
    raise BuildFileError(
        f'{where}: {e}. A rule must be loaded before use, e.g. add {symbol!r} to the line '
        f'load("{RULES_PYTHON_DEFS}", "py_library", ...) at the top of the file, or '
        f'load("{REQUIREMENTS_BZL}", "requirement") for requirement().') from e
  except Exception as e:
    raise BuildFileError(f'{where}: cannot be read: {type(e).__name__}: {e}') from e
  return package


def LoadPackages(root: Path) -> tuple[dict[str, Package], list[Problem]]:
  """Parses every BUILD file under `root`; unreadable ones become problems."""
  packages: dict[str, Package] = {}
  problems: list[Problem] = []
  for directory, _, _ in _Walk(root, root):
    build_file = _BuildFileIn(directory)
    if build_file is None:
      continue
    try:
      package = ParseBuildFile(root, build_file)
    except BuildFileError as e:
      problems.append(Problem('unreadable_build_file', str(e)))
      continue
    packages[package.name] = package
    problems.extend(package.problems)
  return packages, problems


# ---------------------------------------------------------------------------------------------
# Reading Python sources.


@dataclasses.dataclass(frozen=True)
class Import:
  """One module a source file imports at run time."""
  module: str  # Absolute dotted name.
  line: int


class _ImportCollector(ast.NodeVisitor):
  """Collects run-time imports, skipping ones that are optional or for type checking only."""

  def __init__(self, package_parts: list[str]):
    self._package_parts = package_parts
    self.imports: list[tuple[str, list[str], int]] = []  # (module, names, line)

  def visit_Try(self, node: ast.Try) -> None:
    guarded = any(_CatchesImportError(h) for h in node.handlers)
    if not guarded:
      for child in node.body:
        self.visit(child)
    for part in node.handlers + node.orelse + node.finalbody:
      self.visit(part)

  def visit_If(self, node: ast.If) -> None:
    test = node.test
    is_type_checking = (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
        isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')
    if not is_type_checking:
      for child in node.body:
        self.visit(child)
    for child in node.orelse:
      self.visit(child)
    self.visit(node.test)

  def visit_Import(self, node: ast.Import) -> None:
    for alias in node.names:
      self.imports.append((alias.name, [], node.lineno))

  def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
    if node.level:
      base = self._package_parts[:len(self._package_parts) - node.level + 1]
      module = '.'.join(base + ([node.module] if node.module else []))
    else:
      module = node.module or ''
    self.imports.append((module, [a.name for a in node.names if a.name != '*'], node.lineno))


def _CatchesImportError(handler: ast.ExceptHandler) -> bool:
  names = []
  if handler.type is None:
    return True
  for node in ast.walk(handler.type):
    if isinstance(node, ast.Name):
      names.append(node.id)
    elif isinstance(node, ast.Attribute):
      names.append(node.attr)
  return any(n in ('ImportError', 'ModuleNotFoundError', 'Exception') for n in names)


def _ModuleFile(root: Path, module: str) -> Path | None:
  """The file that defines first-party `module`, or None."""
  base = root.joinpath(*module.split('.'))
  for candidate in (base.with_name(base.name + '.py'), base / '__init__.py'):
    if candidate.is_file():
      return candidate
  return None


def _Binds(module_file: Path, name: str) -> bool:
  """Whether `module_file` binds `name` at module level (or could, via a wildcard import)."""
  tree = ast.parse(module_file.read_text(), str(module_file))
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      if node.name == name:
        return True
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      for alias in node.names:
        if alias.name == '*' or (alias.asname or alias.name.split('.')[0]) == name:
          return True
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id == name:
      return True
  return False


def _IsFirstParty(root: Path, top: str) -> bool:
  return not _IsSkippedDir(top) and ((root / top).is_dir() or (root / f'{top}.py').is_file())


def ImportsOf(root: Path, path: Path) -> tuple[list[tuple[Path, int, str]], list[tuple[str, int]],
                                              list[tuple[str, int]]]:
  """Splits the run-time imports of `path`.

  Returns:
    (first_party, third_party, missing): first-party imports as (file, line, module);
    third-party imports as (top-level module, line); imports of first-party modules that do not
    exist as (module, line).
  """
  package_parts = list(path.parent.relative_to(root).parts)
  collector = _ImportCollector(package_parts)
  collector.visit(ast.parse(path.read_text(), str(path)))
  first_party: list[tuple[Path, int, str]] = []
  third_party: list[tuple[str, int]] = []
  missing: list[tuple[str, int]] = []
  stdlib = set(sys.stdlib_module_names)
  for module, names, line in collector.imports:
    top = module.split('.')[0]
    if not top:
      continue
    if _IsFirstParty(root, top):
      resolved = False
      for name in names:
        submodule_file = _ModuleFile(root, f'{module}.{name}')
        if submodule_file is not None:
          first_party.append((submodule_file, line, f'{module}.{name}'))
          resolved = True
      if resolved:
        continue
      module_file = _ModuleFile(root, module)
      if module_file is None:
        if not root.joinpath(*module.split('.')).is_dir():  # A namespace package is fine.
          missing.append((module, line))
        continue
      # `from package import name` where the package binds no `name` can only mean a
      # submodule, and there is none.
      unbound = [n for n in names if not _Binds(module_file, n)]
      if module_file.name == '__init__.py' and unbound:
        missing.extend((f'{module}.{n}', line) for n in unbound)
      else:
        first_party.append((module_file, line, module))
    elif top not in stdlib:
      third_party.append((top, line))
  return first_party, third_party, missing


def _HasMainGuard(path: Path) -> bool:
  tree = ast.parse(path.read_text(), str(path))
  for node in tree.body:
    if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
      names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
      consts = {n.value for n in ast.walk(node.test) if isinstance(n, ast.Constant)}
      if '__name__' in names and '__main__' in consts:
        return True
  return False


def SourceFiles(root: Path) -> list[Path]:
  """Every Python file under the source directories, sorted."""
  files = []
  for top in SOURCE_DIRS:
    if not (root / top).is_dir():
      continue
    for directory, _, filenames in _Walk(root, root / top):
      files.extend(directory / f for f in filenames if f.endswith('.py'))
  return sorted(files)


def RequirementNames(root: Path) -> set[str]:
  """Normalized names of the packages in requirements*.txt."""
  names = set()
  for filename in REQUIREMENTS_FILES:
    path = root / filename
    if not path.is_file():
      continue
    for line in path.read_text().splitlines():
      line = line.split('#', 1)[0].strip()
      if not line or line.startswith('-'):
        continue
      match = re.match(r'[A-Za-z0-9][A-Za-z0-9._-]*', line)
      if match:
        names.add(NormalizePipName(match.group(0)))
  return names


# ---------------------------------------------------------------------------------------------
# Suggested BUILD entries.


def ConventionalTargetName(path: Path) -> str:
  """`foo.py` -> 'foo'; a package's `__init__.py` -> the directory's name."""
  return path.parent.name if path.name == '__init__.py' else path.stem


def ConventionalKind(path: Path) -> str:
  if path.name.endswith('_test.py'):
    return 'py_test'
  if path.name != '__init__.py' and _HasMainGuard(path):
    return 'py_binary'
  return 'py_library'


def _Quote(s: str) -> str:
  return '"' + s + '"'


def FormatTarget(kind: str, name: str, srcs: list[str], deps: list[str],
                 testonly: bool = False) -> str:
  """A BUILD rule in buildifier layout; a dep starting with '@pypi//' becomes requirement()."""
  lines = [f'{kind}(', f'    name = {_Quote(name)},']
  lines.append('    srcs = [' + ', '.join(_Quote(s) for s in srcs) + '],')
  if deps:
    lines.append('    deps = [')
    for dep in deps:
      lines.append(f'        {_DepExpression(dep)},')
    lines.append('    ],')
  if testonly:
    lines.append('    testonly = True,')
  lines.append(')')
  return '\n'.join(lines)


def _DepExpression(dep: str) -> str:
  if dep.startswith(PYPI_REPO):
    return f'requirement({_Quote(dep[len(PYPI_REPO):])})'
  return _Quote(dep)


def _ShortLabel(label: str, package: str) -> str:
  """'//a/b:c' written from package 'a/b' is ':c'; '//a/b:b' anywhere else is '//a/b'."""
  pkg, name = label[2:].split(':', 1)
  if pkg == package:
    return ':' + name
  if pkg.rsplit('/', 1)[-1] == name:
    return '//' + pkg
  return label


def _SortedDeps(deps: Iterable[str], package: str) -> list[str]:
  # Buildifier's order: same-package labels first, then by package, then by name.
  first_party = sorted({_ShortLabel(d, package) for d in deps if d.startswith('//')},
                       key=lambda d: (not d.startswith(':'), d.partition(':')[0], d))
  third_party = sorted({d for d in deps if d.startswith('@')})
  return first_party + third_party


def BuildFileHeader(kinds: Iterable[str], needs_requirement: bool) -> str:
  lines = ['load("' + RULES_PYTHON_DEFS + '", ' +
           ', '.join(_Quote(k) for k in sorted(set(kinds))) + ')']
  if needs_requirement:
    lines.append(f'load("{REQUIREMENTS_BZL}", "requirement")')
  lines += ['', f'package(default_visibility = ["{_PUBLIC}"])']
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# The check.


def _CanonicalLabel(label: str, package: str) -> str | None:
  """'//a/b' -> '//a/b:b'; ':x' or 'x' -> '//<package>:x'; external labels as they are."""
  if label.startswith('@'):
    return label
  if label.startswith('//'):
    pkg, _, name = label[2:].partition(':')
    return f'//{pkg}:{name or pkg.rsplit("/", 1)[-1]}'
  if label.startswith(':'):
    return f'//{package}:{label[1:]}'
  if '/' in label or not label:
    return None
  return f'//{package}:{label}'


def _IsVisible(target: Target, from_package: str) -> bool:
  if target.package == from_package:
    return True
  for rule in target.visibility:
    if rule == _PUBLIC:
      return True
    pkg, _, kind = rule[2:].partition(':')
    if kind == '__pkg__' and pkg == from_package:
      return True
    if kind == '__subpackages__' and (from_package == pkg or from_package.startswith(pkg + '/')):
      return True
  return False


class _Checker:
  """Runs every check over one tree and collects the problems."""

  def __init__(self, root: Path):
    self.root = root
    self.packages, self.problems = LoadPackages(root)
    self.requirements = RequirementNames(root)
    # Source file -> labels of the targets listing it in `srcs`.
    self.owners: dict[Path, list[Target]] = collections.defaultdict(list)
    for package in self.packages.values():
      directory = root / package.name
      for target in package.targets.values():
        for src in target.srcs:
          if not src.startswith((':', '//', '@')):
            self.owners[(directory / src).resolve()].append(target)

  def Add(self, category: str, message: str) -> None:
    self.problems.append(Problem(category, message))

  def Run(self) -> list[Problem]:
    self.CheckSourcesExist()
    self.CheckDeps()
    self.CheckCoverage()
    self.CheckAllConfigs()
    return self.problems

  def _BuildPath(self, package: str) -> str:
    package_obj = self.packages.get(package)
    if package_obj is not None:
      return package_obj.build_file.relative_to(self.root).as_posix()
    return f'{package}/BUILD' if package else 'BUILD'

  def _Target(self, label: str) -> Target | None:
    pkg, _, name = label[2:].partition(':')
    package = self.packages.get(pkg)
    return package.targets.get(name) if package else None

  def _LabelExists(self, label: str) -> bool:
    pkg, _, name = label[2:].partition(':')
    package = self.packages.get(pkg)
    return package is not None and (name in package.targets or name in package.exported_files)

  def CheckSourcesExist(self) -> None:
    for package in self.packages.values():
      directory = self.root / package.name
      for target in package.targets.values():
        for src in target.srcs:
          if src.startswith((':', '//')):
            self._CheckLabel(target, src, 'srcs')
          elif not (directory / src).is_file():
            self.Add('missing_src',
                     f'{self._BuildPath(package.name)}: {target.kind} {_Quote(target.name)} '
                     f'lists src {_Quote(src)}, which does not exist in '
                     f'{package.name or "."}/; remove it from srcs or create the file.')

  def _CheckLabel(self, target: Target, label: str, attribute: str) -> str | None:
    where = f'{self._BuildPath(target.package)}: {target.kind} {_Quote(target.name)}'
    canonical = _CanonicalLabel(label, target.package)
    if canonical is None:
      self.Add('bad_dep', f'{where}: {attribute} entry {_Quote(label)} is not a label; write '
               '"//path/to/package:name" or ":name".')
      return None
    if canonical.startswith(PYPI_REPO):
      pip_name = canonical[len(PYPI_REPO):]
      if pip_name not in self.requirements:
        self.Add('bad_dep', f'{where}: {attribute} entry {_DepExpression(canonical)} names a '
                 f'package missing from {" and ".join(REQUIREMENTS_FILES)}; add it there '
                 '(with a version range).')
      return canonical
    if canonical.startswith('@'):
      self.Add('bad_dep', f'{where}: {attribute} entry {_Quote(label)} is in an external '
               f'repository the checker does not know; third-party Python packages are '
               f'requirement("name") from {REQUIREMENTS_BZL}.')
      return None
    if not self._LabelExists(canonical):
      pkg, _, name = canonical[2:].partition(':')
      if pkg not in self.packages:
        hint = f'there is no BUILD file in {pkg or "."}/'
      else:
        known = ', '.join(sorted(self.packages[pkg].targets)) or 'none'
        hint = f'{self._BuildPath(pkg)} declares no target {_Quote(name)} (it has: {known})'
      self.Add('bad_dep', f'{where}: {attribute} entry {_Quote(label)} does not resolve: '
               f'{hint}. Fix the label or declare the target.')
      return None
    dep_target = self._Target(canonical)
    if dep_target is not None and not _IsVisible(dep_target, target.package):
      self.Add('bad_dep', f'{where}: depends on {canonical}, which is not visible to '
               f'//{target.package}; add package(default_visibility = ["{_PUBLIC}"]) to '
               f'{self._BuildPath(dep_target.package)}.')
    return canonical

  def CheckDeps(self) -> None:
    for package in self.packages.values():
      for target in package.targets.values():
        for dep in target.deps:
          self._CheckLabel(target, dep, 'deps')

  def _WantedDeps(self, path: Path, target_label: str | None) -> tuple[dict[str, str], list[str]]:
    """Labels `path` must depend on (label -> why) and import problems that have no label."""
    wanted: dict[str, str] = {}
    errors: list[str] = []
    rel = path.relative_to(self.root).as_posix()
    try:
      first_party, third_party, missing = ImportsOf(self.root, path)
    except SyntaxError as e:
      return {}, [f'{rel}: cannot be parsed: {e}']
    for module_file, line, module in first_party:
      owners = self.owners.get(module_file.resolve(), [])
      if owners:
        label = owners[0].label
      else:  # The imported file is not in a target yet; its own problem says which to add.
        label = (f'//{_PackageName(self.root, module_file.parent)}:'
                 f'{ConventionalTargetName(module_file)}')
      if label != target_label:
        wanted.setdefault(label, f'imports {module} (line {line})')
    for top, line in third_party:
      pip_name = THIRD_PARTY_PACKAGES.get(top)
      if pip_name is None:
        errors.append(
            f'{rel}:{line}: imports {top!r}, a third-party module tools/build_check.py does not '
            f'know. Add its pip package to requirements.txt (or requirements-dev.txt if only '
            f'tests use it) with a version range, and a line "{top}": "<pip name>" to '
            'THIRD_PARTY_PACKAGES in tools/build_check.py.')
        continue
      wanted.setdefault(PYPI_REPO + NormalizePipName(pip_name), f'imports {top} (line {line})')
    for module, line in missing:
      errors.append(f'{rel}:{line}: imports {module}, which is not a file in the repository.')
    return wanted, errors

  def CheckCoverage(self) -> None:
    uncovered: dict[str, list[Path]] = collections.defaultdict(list)
    for path in SourceFiles(self.root):
      rel = path.relative_to(self.root).as_posix()
      package = _PackageName(self.root, path.parent)
      owners = [t for t in self.owners.get(path.resolve(), []) if t.package == package]
      elsewhere = [t for t in self.owners.get(path.resolve(), []) if t.package != package]
      for target in elsewhere:
        self.Add('coverage', f'{rel} is listed in srcs of {target.label}; a file belongs to the '
                 f'BUILD file of its own directory, {package}/BUILD. Move the entry there.')
      if not owners:
        uncovered[package].append(path)
        continue
      if len(owners) > 1:
        self.Add('coverage', f'{rel} is in srcs of {len(owners)} targets '
                 f'({", ".join(t.label for t in owners)}); keep it in exactly one and make the '
                 'others depend on that one.')
      target = owners[0]
      if path.name.endswith('_test.py'):
        if target.kind != 'py_test':
          self.Add('test_rule', f'{rel} is a test but is in {target.kind} {target.label}; '
                   f'declare it as py_test(name = {_Quote(path.stem)}, srcs = '
                   f'[{_Quote(path.name)}], ...) in {self._BuildPath(package)}.')
        elif target.name != path.stem:
          self.Add('test_rule', f'{rel} is in py_test {target.label}; name the py_test after '
                   f'the file: name = {_Quote(path.stem)}.')
      wanted, errors = self._WantedDeps(path, target.label)
      for error in errors:
        self.Add('imports', error)
      have = {_CanonicalLabel(d, package) for d in target.deps}
      for label, why in sorted(wanted.items()):
        if label not in have:
          dep = _ShortLabel(label, package) if label.startswith('//') else label
          self.Add('imports', f'{rel} {why}: add {_DepExpression(dep)} to deps of '
                   f'{target.kind} {_Quote(target.name)} in {self._BuildPath(package)}.')
    for package, paths in sorted(uncovered.items()):
      self._ReportUncovered(package, paths)

  def _ReportUncovered(self, package: str, paths: list[Path]) -> None:
    snippets, kinds, needs_requirement = [], set(), False
    for path in paths:
      kind = ConventionalKind(path)
      wanted, errors = self._WantedDeps(
          path, f'//{package}:{ConventionalTargetName(path)}')
      for error in errors:
        self.Add('imports', error)
      deps = _SortedDeps(wanted, package)
      needs_requirement |= any(d.startswith('@') for d in deps)
      kinds.add(kind)
      testonly = kind == 'py_library' and package.split('/')[0] == 'tests'
      snippets.append(FormatTarget(kind, ConventionalTargetName(path), [path.name], deps,
                                   testonly=testonly))
    names = ', '.join(p.relative_to(self.root).as_posix() for p in paths)
    if package in self.packages:
      loaded = self.packages[package].loaded
      missing_loads = []
      if kinds - loaded:
        missing_loads.append(f'load("{RULES_PYTHON_DEFS}", ' +
                             ', '.join(_Quote(k) for k in sorted(kinds - loaded)) + ')')
      if needs_requirement and 'requirement' not in loaded:
        missing_loads.append(f'load("{REQUIREMENTS_BZL}", "requirement")')
      note = ''
      if missing_loads:
        note = ('\n\nand at the top of the file (merged into its existing load lines):\n\n' +
                '\n'.join(missing_loads))
      self.Add('coverage',
               f'{names} {"is" if len(paths) == 1 else "are"} in no target of '
               f'{self._BuildPath(package)}. Add:\n\n' + '\n\n'.join(snippets) + note)
    else:
      self.Add('coverage',
               f'{package}/ has Python files ({names}) but no BUILD file. Create '
               f'{package}/BUILD with:\n\n' + BuildFileHeader(kinds, needs_requirement) +
               '\n\n' + '\n\n'.join(snippets))

  def CheckAllConfigs(self) -> None:
    config_libraries = sorted(
        t.label for p in self.packages.values()
        if p.name == PARAMS_DIR or p.name.startswith(PARAMS_DIR + '/')
        for t in p.targets.values() if t.kind == 'py_library' and t.label != ALL_CONFIGS_LABEL)
    if not config_libraries:
      return
    if self._Target(ALL_CONFIGS_LABEL) is None:
      self.Add('all_configs', f'{PARAMS_DIR}/BUILD declares no target "all_configs"; add a '
               'py_library(name = "all_configs", deps = [...every config library...]) so that '
               'binaries looking models up by name have every config.')
      return
    reachable: set[str] = set()
    stack = [ALL_CONFIGS_LABEL]
    while stack:
      label = stack.pop()
      if label in reachable:
        continue
      reachable.add(label)
      target = self._Target(label)
      if target is not None:
        stack.extend(c for c in (_CanonicalLabel(d, target.package) for d in target.deps)
                     if c and c.startswith('//'))
    for label in config_libraries:
      if label not in reachable:
        self.Add('all_configs', f'{label} is not reachable from {ALL_CONFIGS_LABEL}; add '
                 f'{_Quote(_ShortLabel(label, PARAMS_DIR))} to deps of py_library '
                 f'"all_configs" in {self._BuildPath(PARAMS_DIR)}, so model lookups see it.')


def Check(root: Path = REPO_ROOT) -> list[Problem]:
  """Returns every disagreement between the BUILD files under `root` and its sources."""
  return _Checker(Path(root).resolve()).Run()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', type=Path, default=REPO_ROOT, help='Repository root.')
  args = parser.parse_args(argv)
  problems = Check(args.root)
  for problem in problems:
    print(f'[{problem.category}] {problem.message}\n')
  if problems:
    print(f'{len(problems)} BUILD problem(s).')
    return 1
  print('BUILD files match the tree.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
