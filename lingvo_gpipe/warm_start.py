r"""Warm start: a new run's first weights, loaded from other runs' checkpoints by rules.

`train.warm_start` lists sources (model_params.WarmStartParams): a checkpoint
written by this trainer, for any model, K, M and placement, and ordered
(regex, replacement) rules from its variables' names to this model's.

Names, on both sides, are layer paths with the task's root written `task`:
`task/network/pipeline/layers_6/net/sub_3/w` is variable `w` of the layer at
`layers_6/net/sub_3` below the network (`layers_<j>` is the pipeline's j-th
layer, whatever cell runs it). A source's names are read from the object keys
of its checkpoint (`task/network/pipeline/layers/6/net/sub/3/_var_w/...`);
the optimizer's slots, the global step and the input position are never
loaded: a warm-started run starts at step 0 with a fresh optimizer.

Example, a 5-class head on a network pretrained with another head:

  WarmStartParams('/tmp/pretrain',
                  rules=[(r'task/network/(.*)', r'task/network/\1')],
                  exclude=[r'task/network/pipeline/layers_6/net/sub_3/.*'])

Invariants: a variable is loaded from at most one source variable, whose
shape and dtype equal its own (else ConfigError naming both); excluded
variables keep their initializers; a rule that loads nothing and an exclude
pattern that matches nothing are errors unless `allow_unmatched`. Nothing is
assigned until every source has been checked. The trainer applies a warm
start only when the logdir has no checkpoint of its own (TrainProgram.Restore):
a resumed run restores its own checkpoint, never a source again.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import hyperparams

ROOT = 'task'
_VALUE_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
_VAR_PREFIX = '_var_'
# Lines of each list in the log; TensorBoard's text gets them all.
_LOG_LINES = 10


@dataclasses.dataclass(frozen=True)
class SourceVariable:
  """A variable of a source checkpoint: its rule name and checkpoint key."""
  name: str
  key: str
  shape: tuple[int, ...]
  dtype: tf.DType


@dataclasses.dataclass
class Load:
  """One target variable and the source variable it is loaded from."""
  target: str
  source: SourceVariable
  checkpoint: str
  where: str  # e.g. 'train.warm_start[0].rules[1]'


@dataclasses.dataclass
class SourcePlan:
  """What one source contributes, and what of it is left out."""
  index: int
  checkpoint: str
  loads: list[Load]
  excluded: list[tuple[str, str, str]]  # (target, source, exclude pattern)
  unmapped_sources: list[str]  # matched by no rule
  missing_targets: list[tuple[str, str, int]]  # (source, target it lacks, rule)
  rule_counts: list[int]  # loaded, per rule
  rule_excluded: list[int]  # mapped but excluded, per rule
  rules: list[tuple[str, str]]


@dataclasses.dataclass
class Plan:
  """The whole warm start: every source's loads and what stays initialized."""
  sources: list[SourcePlan]
  uninitialized: list[str]  # targets nothing was loaded into, not excluded
  excluded_targets: list[str]

  @property
  def loads(self) -> list[Load]:
    return [load for s in self.sources for load in s.loads]

  def Summary(self) -> list[str]:
    """A few lines: counts per source and of what stays at its initializer."""
    lines = [f'Warm start from {len(self.sources)} checkpoint(s): '
             f'{len(self.loads)} variables loaded; '
             f'{len(self.excluded_targets)} excluded and '
             f'{len(self.uninitialized)} reached by no rule keep their '
             'initializers.']
    for s in self.sources:
      lines.append(
          f'  train.warm_start[{s.index}] {s.checkpoint}: loaded '
          f'{len(s.loads)} ({_Weights(s.loads):,} weights); left out '
          f'{len(s.excluded)} excluded; {len(s.unmapped_sources)} source '
          f'variables matched no rule; {len(s.missing_targets)} mapped to '
          'names this model lacks.')
      for i, ((pattern, replacement), count) in enumerate(
          zip(s.rules, s.rule_counts)):
        lines.append(f'    rules[{i}] {pattern!r} -> {replacement!r}: '
                     f'{count} loaded, {s.rule_excluded[i]} excluded')
    return lines

  def ToText(self, limit: Optional[int] = None, loads: bool = True) -> str:
    """The report: the summary, then each list (at most `limit` lines each).

    `loads`: list every variable loaded too, not only their counts.
    """
    lines = self.Summary()
    for s in self.sources:
      head = f'train.warm_start[{s.index}] {s.checkpoint}'
      if loads:
        lines += _Section(f'{head}: loaded (this model <- source, shape)',
                          [f'{l.target} <- {l.source.name} '
                           f'{list(l.source.shape)}' for l in s.loads], limit)
      lines += _Section(f'{head}: left out by exclude',
                        [f'{t} <- {src} (exclude {p!r})'
                         for t, src, p in s.excluded], limit)
      lines += _Section(f'{head}: source variables no rule matched',
                        s.unmapped_sources, limit)
      lines += _Section(f'{head}: source variables mapped to names this model '
                        'lacks', [f'{src} -> {t}' for src, t, _ in
                                  s.missing_targets], limit)
    lines += _Section('This model\'s variables nothing was loaded into '
                      '(at their initializers, not excluded)',
                      self.uninitialized, limit)
    return '\n'.join(lines)


def _Weights(loads: Sequence[Load]) -> int:
  return sum(int(np.prod(l.source.shape)) for l in loads)


def _Section(title: str, items: list[str], limit: Optional[int]) -> list[str]:
  if not items:
    return []
  shown = items if limit is None else items[:limit]
  more = len(items) - len(shown)
  return ([f'{title}: {len(items)}'] + [f'  {item}' for item in shown] +
          ([f'  ... and {more} more'] if more else []))


# --- names ------------------------------------------------------------------------


def TargetVariables(task: base_layer.BaseLayer) -> dict[str, Any]:
  """This model's variables by rule name (`task/<layer path>/<variable>`).

  A Repeat's stacked weight is one variable, however the pipeline cut it
  (BaseLayer.StoredVars), as in the checkpoint.
  """
  names = {}
  for path, var in task.StoredVars().FlattenItems():
    name = re.sub(r'\[(\d+)\]', r'_\1', path).replace('.', '/')
    names[f'{ROOT}/{name}'] = var
  return names


def SourceName(key: str) -> Optional[str]:
  """The rule name of a checkpoint key, or None if it is no model variable.

  'task/network/pipeline/layers/6/net/sub/3/_var_w/.ATTRIBUTES/VARIABLE_VALUE'
  is 'task/network/pipeline/layers_6/net/sub_3/w': a list's element i is
  `<list>_<i>`, as in layer paths.
  """
  if not (key.startswith(ROOT + '/') and key.endswith(_VALUE_SUFFIX)):
    return None
  parts = key[:-len(_VALUE_SUFFIX)].split('/')
  if not parts[-1].startswith(_VAR_PREFIX) or any(
      p.startswith('.') for p in parts):
    return None
  parts[-1] = parts[-1][len(_VAR_PREFIX):]
  merged = []
  for part in parts:
    if part.isdigit() and merged:
      merged[-1] = f'{merged[-1]}_{part}'
    else:
      merged.append(part)
  return '/'.join(merged)


def ResolveCheckpoint(path: str, where: str) -> str:
  """The checkpoint prefix `path` names: itself, or a logdir's newest.

  Raises:
    hyperparams.ConfigError: naming `where` if there is no checkpoint there.
  """
  if not path or not isinstance(path, str):
    raise hyperparams.ConfigError(
        f'{where}.checkpoint={path!r}: set it to a checkpoint prefix '
        '(.../checkpoints/ckpt-<step>), or a logdir or its checkpoints/ '
        'directory.')
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    for directory in (checkpoint_lib.Directory(path), path):
      found = checkpoint_lib.ListCheckpoints(directory)
      if found:
        return found[-1]
    raise hyperparams.ConfigError(
        f'{where}.checkpoint={path!r}: no checkpoint in that directory or its '
        f'{checkpoint_lib.CHECKPOINT_SUBDIR}/ (no '
        f'{checkpoint_lib.CHECKPOINT_PREFIX}-<step>.index).')
  if os.path.exists(path + '.index'):
    return path
  raise hyperparams.ConfigError(
      f'{where}.checkpoint={path!r}: no such checkpoint (no {path}.index) or '
      'directory.')


def SourceVariables(path: str) -> dict[str, SourceVariable]:
  """The model variables of checkpoint `path`, by rule name."""
  reader = tf.train.load_checkpoint(path)
  shapes = reader.get_variable_to_shape_map()
  dtypes = reader.get_variable_to_dtype_map()
  found = {}
  for key, shape in shapes.items():
    name = SourceName(key)
    if name is not None:
      found[name] = SourceVariable(name, key, tuple(shape), dtypes[key])
  return found


# --- the plan -----------------------------------------------------------------------


def _Rules(source: hyperparams.Params, where: str
           ) -> list[tuple[re.Pattern, str, tuple[str, str]]]:
  rules = []
  for i, rule in enumerate(source.rules or []):
    if (not isinstance(rule, (list, tuple)) or len(rule) != 2 or
        not all(isinstance(x, str) for x in rule)):
      raise hyperparams.ConfigError(
          f'{where}.rules[{i}]={rule!r}: each rule is a (regex, replacement) '
          "pair of strings, e.g. (r'task/network/(.*)', r'task/network/\\1').")
    rules.append((_Compile(rule[0], f'{where}.rules[{i}]'), rule[1],
                  tuple(rule)))
  if not rules:
    raise hyperparams.ConfigError(
        f'{where}.rules is empty: nothing would be loaded. Give at least one '
        "(regex, replacement) rule, e.g. ('(.*)', r'\\1').")
  return rules


def _Compile(pattern: Any, where: str) -> re.Pattern:
  if not isinstance(pattern, str):
    raise hyperparams.ConfigError(f'{where}={pattern!r}: a regex string.')
  try:
    return re.compile(pattern)
  except re.error as e:
    raise hyperparams.ConfigError(
        f'{where}: {pattern!r} is not a valid regex: {e}.') from None


def _Near(name: str, names: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
  return (' Did you mean: ' + ', '.join(map(repr, close)) + '?') if close else ''


def _NearPattern(pattern: str, names: Sequence[str]) -> str:
  """Did-you-mean for a regex: names whose start is close to its literal start."""
  literal = re.match(r'[^\\.^$*+?{}\[\]|()]*', pattern).group(0)
  if not literal:
    return ''
  starts = {}  # the literal's length of a name -> up to its next '/'
  for name in names:
    end = name.find('/', len(literal) - 1)
    starts.setdefault(name[:len(literal)], name[:end + 1] if end >= 0 else name)
  close = difflib.get_close_matches(literal, sorted(starts), n=3, cutoff=0.6)
  return (' Did you mean names starting with ' +
          ', '.join(repr(starts[c]) for c in close) + '?') if close else ''


def MakePlan(sources: Sequence[hyperparams.Params],
             targets: dict[str, Any],
             read: Any = SourceVariables) -> Plan:
  """Maps every source's variables onto `targets` (name -> variable); loads nothing.

  Args:
    sources: the train.warm_start entries.
    targets: this model's variables by rule name (TargetVariables).
    read: checkpoint prefix -> {name: SourceVariable} (for tests).

  Raises:
    hyperparams.ConfigError: a bad source or rule, shapes or dtypes that
      differ, a variable loaded twice, or (unless allow_unmatched) a rule
      that loads nothing or an exclude pattern that matches nothing.
  """
  loaded: dict[str, Load] = {}
  plans, all_excluded = [], set()
  for index, source in enumerate(sources):
    where = f'train.warm_start[{index}]'
    for field in ('checkpoint', 'rules', 'exclude', 'allow_unmatched'):
      if not isinstance(source, hyperparams.Params) or field not in source:
        raise hyperparams.ConfigError(
            f'{where}: not a warm-start source (fields checkpoint, rules, '
            'exclude, allow_unmatched); make it with '
            'model_params.WarmStartParams().')
    rules = _Rules(source, where)
    excludes = [(_Compile(x, f'{where}.exclude[{i}]'), x)
                for i, x in enumerate(source.exclude or [])]
    path = ResolveCheckpoint(source.checkpoint, where)
    try:
      variables = read(path)
    except (tf.errors.OpError, ValueError, OSError) as e:
      raise hyperparams.ConfigError(
          f'{where}.checkpoint: cannot read {path}: '
          f'{str(e).strip().splitlines()[0] if str(e).strip() else e!r}') from e
    if not variables:
      raise hyperparams.ConfigError(
          f'{where}.checkpoint: {path} holds no model variables (no '
          f"'{ROOT}/...' keys); is it a checkpoint written by this trainer?")
    plan = SourcePlan(index, path, [], [], [], [], [0] * len(rules),
                      [0] * len(rules), [r[2] for r in rules])
    exclude_hits = [0] * len(excludes)
    mismatched = []
    for name in sorted(variables):
      var = variables[name]
      for r, (pattern, replacement, _) in enumerate(rules):
        match = pattern.fullmatch(name)
        if match:
          break
      else:
        plan.unmapped_sources.append(name)
        continue
      try:
        target = match.expand(replacement)
      except (re.error, IndexError) as e:
        raise hyperparams.ConfigError(
            f'{where}.rules[{r}]: replacement {replacement!r} does not fit '
            f'regex {pattern.pattern!r} (on {name!r}): {e}.') from None
      if target not in targets:
        plan.missing_targets.append((name, target, r))
        continue
      hit = next((i for i, (x, _) in enumerate(excludes)
                  if x.fullmatch(target)), None)
      if hit is not None:
        exclude_hits[hit] += 1
        plan.excluded.append((target, name, excludes[hit][1]))
        plan.rule_excluded[r] += 1
        continue
      if target in loaded:
        first = loaded[target]
        raise hyperparams.ConfigError(
            f'{target} would be loaded twice: from {first.source.name} of '
            f'{first.checkpoint} ({first.where}) and from {name} of {path} '
            f'({where}.rules[{r}]). '
            'Make the rules map one source variable onto it, or exclude it.')
      shape = tuple(targets[target].shape.as_list())
      dtype = tf.as_dtype(targets[target].dtype).base_dtype
      if shape != var.shape or dtype != var.dtype:
        mismatched.append(
            f'{name} {list(var.shape)} {var.dtype.name} (source) -> {target} '
            f'{list(shape)} {dtype.name} (this model)')
        continue
      loaded[target] = Load(target, var, path, f'{where}.rules[{r}]')
      plan.loads.append(loaded[target])
      plan.rule_counts[r] += 1
    if mismatched:
      raise hyperparams.ConfigError(
          f'{where}: {len(mismatched)} variable(s) of {path} differ in shape '
          f'or dtype from the ones they map to: {"; ".join(mismatched[:5])}'
          f'{" ..." if len(mismatched) > 5 else ""}. Exclude them '
          f'({where}.exclude) to leave them at their initializers, or change '
          'the rules.')
    if not source.allow_unmatched:
      _CheckMatched(plan, rules, excludes, exclude_hits, variables, targets,
                    where)
    all_excluded.update(t for t, _, _ in plan.excluded)
    plans.append(plan)
  uninitialized = sorted(set(targets) - set(loaded) - all_excluded)
  return Plan(plans, uninitialized, sorted(all_excluded - set(loaded)))


def _CheckMatched(plan: SourcePlan, rules, excludes, exclude_hits,
                  variables: dict[str, SourceVariable],
                  targets: dict[str, Any], where: str) -> None:
  """Refuses rules that load nothing and exclude patterns that match nothing."""
  problems = []
  for r, (pattern, replacement, _) in enumerate(rules):
    if plan.rule_counts[r] or plan.rule_excluded[r]:
      continue
    produced = [(s, t) for s, t, i in plan.missing_targets if i == r]
    if produced:
      source, target = produced[0]
      problems.append(
          f'{where}.rules[{r}] ({pattern.pattern!r} -> {replacement!r}) maps '
          f'{len(produced)} source variable(s), e.g. {source!r}, to names this '
          f'model lacks, e.g. {target!r}.{_Near(target, list(targets))}')
    elif any(pattern.fullmatch(s) for s in variables):
      problems.append(
          f'{where}.rules[{r}] ({pattern.pattern!r} -> {replacement!r}) only '
          'matches source variables an earlier rule already took.')
    else:
      problems.append(
          f'{where}.rules[{r}] ({pattern.pattern!r}) matches no variable of '
          f'{plan.checkpoint}.{_NearPattern(pattern.pattern, list(variables))}')
  for (pattern, text), hits in zip(excludes, exclude_hits):
    if not hits and not any(pattern.fullmatch(t) for t in targets):
      problems.append(
          f'{where}.exclude {text!r} matches no variable of this model.'
          f'{_NearPattern(text, list(targets))}')
  if problems:
    raise hyperparams.ConfigError(
        ' '.join(problems) + f' Fix the names (they are layer paths such as '
        f'{next(iter(sorted(targets)), "task/...")!r}), or set '
        f'{where}.allow_unmatched=True.')


# --- loading ------------------------------------------------------------------------


def Apply(sources: Sequence[hyperparams.Params],
          task: base_layer.BaseLayer) -> Plan:
  """Loads `task`'s variables from `sources` (train.warm_start); returns the plan.

  Every source is checked (MakePlan) before anything is assigned.
  """
  targets = TargetVariables(task)
  plan = MakePlan(sources, targets)
  readers = {}
  for load in plan.loads:
    if load.checkpoint not in readers:
      readers[load.checkpoint] = tf.train.load_checkpoint(load.checkpoint)
    # A stacked variable assigns each piece its rows.
    targets[load.target].assign(
        readers[load.checkpoint].get_tensor(load.source.key))
  return plan


def LogText(plan: Plan) -> str:
  """The report for the log: counts, and a few lines of what was left out."""
  return plan.ToText(limit=_LOG_LINES, loads=False)
