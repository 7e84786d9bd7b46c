"""Tests of the fill-drain schedule and the schedule simulator."""

import pytest

from lingvo_gpipe.core.gpipe import schedule


def test_fill_drain_clocks():
  s = schedule.FillDrain(2, 3)
  clocks = [[(t.kind, t.cell, t.micro_batch) for t in c] for c in s.Clocks()]
  assert clocks == [
      [('F', 0, 0)], [('F', 0, 1), ('F', 1, 0)], [('F', 0, 2), ('F', 1, 1)],
      [('F', 1, 2)],
      [('B', 1, 2)], [('B', 1, 1), ('B', 0, 2)], [('B', 1, 0), ('B', 0, 1)],
      [('B', 0, 0)]]


@pytest.mark.parametrize('k,m', [(1, 1), (1, 8), (2, 1), (2, 4), (4, 8),
                                 (8, 32)])
def test_simulated_bubble_matches_formula(k, m):
  s = schedule.FillDrain(k, m)
  result = schedule.Simulate(s, [1.0] * k, [2.0] * k)
  assert result.bubble_fraction == pytest.approx((k - 1) / (m + k - 1))
  assert s.TheoreticalBubble() == pytest.approx((k - 1) / (m + k - 1))
  assert result.step_time == pytest.approx(3.0 * (m + k - 1))


def test_slowest_cell_sets_the_pace():
  result = schedule.Simulate(schedule.FillDrain(2, 4), [1.0, 3.0], [1.0, 3.0])
  # Cell 1 works 4 × (3 + 3) back to back, after waiting for cell 0 once.
  assert result.step_time == pytest.approx(1 + 24 + 1)


def test_input_gradients_first_shorten_the_drain():
  s = schedule.FillDrain(2, 4)
  # f=1, b=2 per cell: cell 0 waits for cell 1's F3 and whole B3 (5 + 2),
  # then runs four backwards: 15 = (M+K-1)(f+b).
  assert schedule.Simulate(s, [1, 1], [2, 2]).step_time == pytest.approx(15)
  # Cell 1 hands over its input gradient halfway through each backward.
  early = schedule.Simulate(s, [1, 1], [2, 2], input_grad_times=[1, 1])
  assert early.step_time == pytest.approx(14)
  assert early.busy == [12, 12]


def test_memory_with_and_without_recompute():
  s = schedule.FillDrain(2, 4)
  with_rc = schedule.Simulate(s, [1, 1], [1, 1], boundary_bytes=[10, 10],
                              internal_bytes=[100, 100], recompute=True)
  without = schedule.Simulate(s, [1, 1], [1, 1], boundary_bytes=[10, 10],
                              internal_bytes=[100, 100], recompute=False)
  # Recompute keeps M boundaries plus one micro-batch's internals at a time.
  assert with_rc.peak_bytes == [4 * 10 + 100] * 2
  assert without.peak_bytes == [4 * 110] * 2


def test_errors():
  with pytest.raises(ValueError, match='one per cell'):
    schedule.Simulate(schedule.FillDrain(2, 2), [1.0], [1.0, 1.0])
  with pytest.raises(ValueError, match='>= 1 cell'):
    schedule.FillDrain(0, 2)


def test_times_from_flops_feed_the_simulator():
  forward, backward = schedule.TimesFromFlops([2e9, 4e9], 1e9, recompute=True)
  assert forward == [2.0, 4.0] and backward == [6.0, 12.0]
  _, no_rc = schedule.TimesFromFlops([2e9], 1e9, recompute=False)
  assert no_rc == [4.0]
  result = schedule.Simulate(schedule.FillDrain(2, 4), forward, backward)
  # The slower cell sets the pace: 4 micro-batches of 16 s, after a 2 s fill
  # and before a 6 s drain.
  assert result.step_time == pytest.approx(2 + 4 * 16 + 6)
  with pytest.raises(ValueError, match='flops_per_second must be > 0'):
    schedule.TimesFromFlops([1.0], 0)


def test_clocks_are_derived_from_the_task_lists():
  s = schedule.FillDrain(3, 5)
  for cell in range(3):
    ran = [t for clock in s.Clocks() for t in clock if t.cell == cell]
    assert ran == s.CellOrder(cell)
  assert len(s.Clocks()) == 2 * (5 + 3 - 1)


def test_a_split_backward_runs_each_input_gradient_before_its_weight_gradient():
  s = schedule.FillDrain(2, 3, split_backward=True)
  assert [(t.kind, t.micro_batch) for t in s.CellOrder(1)][3:] == [
      ('Bx', 2), ('Bw', 2), ('Bx', 1), ('Bw', 1), ('Bx', 0), ('Bw', 0)]
  # With Bx the cost a plain B hands its gradient over after, the split
  # schedule predicts what the plain one does.
  plain = schedule.Simulate(schedule.FillDrain(2, 4), [1, 1], [2, 2],
                            input_grad_times=[1, 1])
  split = schedule.Simulate(schedule.FillDrain(2, 4, split_backward=True),
                            [1, 1], [2, 2], input_grad_times=[1, 1])
  assert split.step_time == plain.step_time == pytest.approx(14)
  assert split.busy == plain.busy
  with pytest.raises(ValueError, match='give input_grad_times'):
    schedule.Simulate(schedule.FillDrain(2, 4, split_backward=True),
                      [1, 1], [2, 2])


def test_split_backward_memory_holds_internals_until_the_weight_gradient():
  s = schedule.FillDrain(1, 2, split_backward=True)
  result = schedule.Simulate(s, [1], [2], boundary_bytes=[10],
                             internal_bytes=[100], input_grad_times=[1])
  assert result.peak_bytes == [2 * 10 + 100]


@pytest.mark.parametrize('k,m', [(1, 1), (2, 8), (4, 3), (4, 8), (8, 32)])
def test_one_f_one_b_keeps_at_most_k_minus_i_micro_batches(k, m):
  # Kept activations in micro-batches: 1 byte of internal activations each,
  # no recompute. Fill-drain keeps M on every cell, 1F1B min(M, K-i) on cell i.
  ones = [1.0] * k
  one_f_one_b = schedule.Simulate(schedule.OneFOneB(k, m), ones, ones,
                                  internal_bytes=ones, recompute=False)
  fill_drain = schedule.Simulate(schedule.FillDrain(k, m), ones, ones,
                                 internal_bytes=ones, recompute=False)
  assert one_f_one_b.peak_bytes == [min(m, k - i) for i in range(k)]
  assert fill_drain.peak_bytes == [m] * k
  # With equal task times, the same bubble as GPipe's, (K-1)/(M+K-1).
  bubble = (k - 1) / (m + k - 1)
  assert one_f_one_b.bubble_fraction == pytest.approx(bubble)
  assert fill_drain.bubble_fraction == pytest.approx(bubble)


def test_one_f_one_b_orders_each_cell_as_published():
  orders = [[f'{t.kind}{t.micro_batch}' for t in
             schedule.OneFOneB(3, 4).CellOrder(c)] for c in range(3)]
  assert orders[0] == ['F0', 'F1', 'F2', 'B0', 'F3', 'B1', 'B2', 'B3']
  assert orders[2] == ['F0', 'B0', 'F1', 'B1', 'F2', 'B2', 'F3', 'B3']
  split = schedule.OneFOneB(2, 2, split_backward=True).CellOrder(1)
  assert [t.kind for t in split] == ['F', 'Bx', 'Bw', 'F', 'Bx', 'Bw']


def test_zero_bubble_h1_orders_each_cell_as_published():
  # Cell k delays its weight gradients by k micro-batches, then spends the
  # ones held back in the drain, one after each input gradient.
  orders = [[f'{t.kind}{t.micro_batch}' for t in
             schedule.ZeroBubbleH1(3, 4).CellOrder(c)] for c in range(3)]
  assert orders[0] == ['F0', 'F1', 'F2', 'Bx0', 'Bw0', 'F3', 'Bx1', 'Bw1',
                       'Bx2', 'Bw2', 'Bx3', 'Bw3']
  assert orders[1] == ['F0', 'F1', 'Bx0', 'F2', 'Bx1', 'Bw0', 'F3', 'Bx2',
                       'Bw1', 'Bx3', 'Bw2', 'Bw3']
  assert orders[2] == ['F0', 'Bx0', 'F1', 'Bx1', 'F2', 'Bx2', 'Bw0', 'F3',
                       'Bx3', 'Bw1', 'Bw2', 'Bw3']


@pytest.mark.parametrize('k,m', [(2, 2), (2, 8), (4, 4), (4, 8), (8, 32)])
def test_zero_bubble_h1_has_a_third_of_one_f_one_bs_bubble_at_its_memory(k, m):
  # Equal task times F = Bx = Bw = 1 (a whole backward 2, handing its input
  # gradient over at its end). Published (M >= K): ZB-H1 idles (K-1)(F+Bx-Bw)
  # per cell, 1F1B (K-1)(F+Bx+Bw), a third; ZB-H1 keeps at most K
  # micro-batches on any cell, 1F1B's peak (its first cell's).
  ones, twos = [1.0] * k, [2.0] * k
  zb = schedule.Simulate(schedule.ZeroBubbleH1(k, m), ones, twos,
                         input_grad_times=ones, weight_grad_times=ones,
                         internal_bytes=ones, recompute=False)
  one_f_one_b = schedule.Simulate(schedule.OneFOneB(k, m), ones, twos,
                                  internal_bytes=ones, recompute=False)
  assert zb.step_time == 3 * m + (k - 1)
  assert one_f_one_b.step_time == 3 * m + 3 * (k - 1)
  assert max(zb.peak_bytes) == max(one_f_one_b.peak_bytes) == min(m, k)
  assert schedule.ZeroBubbleH1(k, m).TheoreticalBubble() == pytest.approx(
      (k - 1) / (3 * m + k - 1))
  assert schedule.OneFOneB(k, m).TheoreticalBubble() == pytest.approx(
      (k - 1) / (m + k - 1))


@pytest.mark.parametrize('k', [1, 2, 4])
@pytest.mark.parametrize('m', [1, 2, 3, 4, 8])
def test_zero_bubble_h1_never_idles_longer_than_one_f_one_b(k, m):
  # M < K and M not a multiple of K included: every cell runs each task once.
  ones, twos = [1.0] * k, [2.0] * k
  s = schedule.ZeroBubbleH1(k, m)
  for c in range(k):
    tasks = s.CellOrder(c)
    assert sorted((t.kind, t.micro_batch) for t in tasks) == sorted(
        (kind, i) for kind in ('F', 'Bx', 'Bw') for i in range(m))
  zb = schedule.Simulate(s, ones, twos, input_grad_times=ones,
                         weight_grad_times=ones)
  assert zb.step_time <= schedule.Simulate(
      schedule.OneFOneB(k, m), ones, twos).step_time


def test_a_delayed_weight_gradient_holds_recomputed_internals_until_it_runs():
  # Cell 1 of ZB-H1 (K=2, M=2) runs F0 Bx0 F1 Bx1 Bw0 Bw1: with recompute
  # both micro-batches' recomputed internals are alive after Bx1.
  s = schedule.ZeroBubbleH1(2, 2)
  result = schedule.Simulate(s, [1, 1], [2, 2], boundary_bytes=[10, 10],
                             internal_bytes=[100, 100], input_grad_times=[1, 1])
  assert result.peak_bytes[1] == 2 * 10 + 2 * 100


@pytest.mark.parametrize('d', [1, 2, 3, 4])
@pytest.mark.parametrize('v', [1, 2, 3])
@pytest.mark.parametrize('m', [1, 2, 3, 4, 5, 8, 9])
def test_interleaved_1f1b_shortens_the_bubble_v_times(d, v, m):
  # Equal task times (a whole backward 2): published (M a multiple of D),
  # (D-1)/(V*M+D-1); otherwise (a short round) never more than 1F1B's.
  k = d * v
  s = schedule.Interleaved1F1B(k, m, num_devices=d)
  assert [s.Device(c) for c in range(k)] == [c % d for c in range(k)]
  for device in range(d):
    tasks = s.DeviceOrder(device)
    assert sorted((t.kind, t.cell, t.micro_batch) for t in tasks) == sorted(
        (kind, c, i) for kind in ('F', 'B') for c in range(device, k, d)
        for i in range(m))
  result = schedule.Simulate(s, [1.0] * k, [2.0] * k)  # would raise on a deadlock
  one_f_one_b = schedule.Simulate(schedule.OneFOneB(d, m), [1.0] * d,
                                  [2.0] * d)
  if m % d == 0:
    assert result.bubble_fraction == pytest.approx((d - 1) / (v * m + d - 1))
  assert result.bubble_fraction <= one_f_one_b.bubble_fraction + 1e-9
  assert s.TheoreticalBubble() == pytest.approx(result.bubble_fraction)
  if v == 1:
    assert [s.CellOrder(c) for c in range(k)] == [
        schedule.OneFOneB(d, m).CellOrder(c) for c in range(d)]


def test_interleaved_1f1b_orders_each_device_as_published():
  # D=2 devices, V=2 (cells 0, 2 on device 0; 1, 3 on device 1), M=4: rounds
  # of 2 micro-batches through the first cell, then the second.
  s = schedule.Interleaved1F1B(4, 4, num_devices=2)
  marks = [[f'{t.kind}{t.micro_batch}.{t.cell // 2}' for t in
            s.DeviceOrder(d)] for d in range(2)]
  assert marks[0] == ['F0.0', 'F1.0', 'F0.1', 'F1.1', 'F2.0', 'B0.1', 'F3.0',
                      'B1.1', 'F2.1', 'B0.0', 'F3.1', 'B1.0', 'B2.1', 'B3.1',
                      'B2.0', 'B3.0']
  assert marks[1][:4] == ['F0.0', 'F1.0', 'F0.1', 'B0.1']
  with pytest.raises(ValueError, match='3 cells cannot be spread evenly '
                     'over 2 devices'):
    schedule.Interleaved1F1B(3, 4, num_devices=2)


def test_interleaved_memory_counts_every_cell_on_a_device():
  # Per device, the micro-batches kept by all of its cells add up.
  s = schedule.Interleaved1F1B(4, 4, num_devices=2)
  result = schedule.Simulate(s, [1.0] * 4, [2.0] * 4, internal_bytes=[1.0] * 4,
                             recompute=False)
  assert len(result.peak_bytes) == 2
  # Device 0 warms up with 2(D-1) + (V-1)D = 4 forwards, then runs a 5th
  # before its first backward.
  assert result.peak_bytes[0] == 5
