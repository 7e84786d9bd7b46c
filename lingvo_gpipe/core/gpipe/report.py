"""Formats a PipeliningLayer report (a NestedMap) as a table for logs.

Invariant: the table shows every field of every cell of the report, so what a
user reads in the log is what summaries record; a figure the report could not
compute shows as '-', with a line saying why.
"""

from __future__ import annotations

from lingvo_gpipe.core.nested_map import NestedMap


def _Human(n) -> str:
  if n is None:
    return '-'
  for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.2f}{unit}'
  return str(n)


def FormatTable(report: NestedMap) -> str:
  """A fixed-width table: one row per cell, then totals, the bubble, notes."""
  header = ('cell', 'layers', 'first..last', 'params', 'flops', 'device',
            'peak_mem')
  rows = []
  for c in report.cells:
    names = c.layer_names
    span = names[0] if len(names) == 1 else f'{names[0]}..{names[-1]}'
    rows.append((str(c.cell), str(c.num_layers), span, _Human(c.num_params),
                 _Human(c.flops), c.device or '-', _Human(c.peak_bytes)))
  total_params = sum(c.num_params for c in report.cells)
  flops = [c.flops for c in report.cells]
  total_flops = None if None in flops else sum(flops)
  rows.append(('total', str(sum(c.num_layers for c in report.cells)), '',
               _Human(total_params), _Human(total_flops), '', ''))
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  lines = ['  '.join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
           for r in [header] + rows]
  bubble = report.bubble_fraction
  lines.append(
      f'K={report.num_cells} cells, M={report.num_micro_batches} micro-batches, '
      f'recompute={report.recompute}, schedule='
      f'{report.get("schedule") or "gpipe"}, bubble='
      f'{"-" if bubble is None else f"{bubble:.1%}"} (predicted with equal '
      'task times; gpipe and 1f1b: (K-1)/(M+K-1))')
  if report.get('flops_unknown'):
    lines.append(f'FLOPs: unknown, {report.flops_unknown}')
  if report.get('process_peak_bytes') is not None:
    lines.append(f'process peak memory: {_Human(report.process_peak_bytes)}B '
                 '(host allocator, all CPU devices)')
  return '\n'.join(lines)
