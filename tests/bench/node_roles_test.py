"""node_roles: each node of a step (bench/loop_census.py) counted under the role it plays."""

import pytest

from bench import node_roles


@pytest.mark.parametrize('op, name, role', [
    ('_MklNativeFusedMatMul', 'while_1/body/_1/while/cond/then/_2/MatMul',
     'arithmetic'),
    ('_UnaryOpsComposition', 'while/body/_1/while/cond/then/_3/Tanh',
     'arithmetic'),
    ('Merge', 'while/merge/_5', 'loop control flow'),
    ('NextIteration', 'while/next_iteration/_7', 'loop control flow'),
    ('Merge', 'while/body/_1/while/cond/output/_9', 'cond control flow'),
    ('Identity', 'while/body/_1/while/cond/pivot_t/_4', 'cond control flow'),
    ('Enter', 'while/enter/_3', 'enter/exit (once a loop)'),
    ('_Recv', 'while/LoopCond/_12', 'sends and receives'),
    ('TensorListSetItem', 'while/body/_1/while/TensorArrayV2Write',
     'arrays'),
    ('Reshape', 'while/body/_1/while/cond/then/_2/while/cond/Reshape',
     'weight packing'),
    ('Reshape', 'gradients/Reshape', 'other'),  # not a packed cell's
    ('AddV2', 'add_3', 'gradient sums'),
    ('Const', 'while/body/_1/while/Const', 'constants'),
])
def test_role(op, name, role):
  assert node_roles.Role(op, name) == role


def test_every_role_is_listed():
  roles = {node_roles.Role(op, name) for op, name in [
      ('MatMul', 'a'), ('Switch', 'while/switch'), ('Exit', 'while/exit'),
      ('Switch', 'while/body/cond/switch_pred'), ('_Send', 's'),
      ('TensorListGetItem', 'r'), ('SplitV', 'while/cond/split'),
      ('AddN', 'n'), ('Const', 'c'), ('Identity', 'i'), ('Unpack', 'u')]}
  assert roles == set(node_roles.ROLES)


def test_loop_of_a_node():
  assert node_roles.Loop('while/body/_1/while/cond/then/_2/MatMul') == 'while'
  assert node_roles.Loop('while_1/merge/_5') == 'while_1'
  assert node_roles.Loop('_cloopwhile_1/Identity_switch/_3') == 'while_1'
  assert node_roles.Loop('gradients/while_grad/Reshape') is None
