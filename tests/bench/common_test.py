"""Tests of bench/common.py's StolenCpu: the hypervisor's share, from /proc/stat."""

import pytest

from bench import common


def _WriteStat(path, steal, total_other):
  # user nice system idle iowait irq softirq steal guest guest_nice
  path.write_text(f'cpu  {total_other} 0 0 0 0 0 0 {steal} 0 0\n'
                  'cpu0 1 2 3 4 5 6 7 8 9 10\n')


def test_stolen_share_since_reset(tmp_path, monkeypatch):
  stat = tmp_path / 'stat'
  monkeypatch.setattr(common, 'PROC_STAT', str(stat))
  _WriteStat(stat, steal=100, total_other=900)
  meter = common.StolenCpu()
  _WriteStat(stat, steal=125, total_other=975)  # 25 of 100 new jiffies
  assert meter.Fraction() == pytest.approx(0.25)
  assert meter.Text() == '25%'
  meter.Reset()
  assert meter.Fraction() is None  # no time has passed
  _WriteStat(stat, steal=125, total_other=1075)
  assert meter.Fraction() == pytest.approx(0.0)


def test_unknown_without_proc_stat(tmp_path, monkeypatch):
  monkeypatch.setattr(common, 'PROC_STAT', str(tmp_path / 'missing'))
  meter = common.StolenCpu()
  assert meter.Fraction() is None
  assert meter.Text() == 'unknown'
