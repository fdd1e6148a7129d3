import copy

import torch
import torch.nn as nn

from msn_fast.ema import ema_update


def test_ema_formula_on_parameters_not_buffers():
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.fill_(5.0)
    before = [p.clone() for p in target.parameters()]
    ema_update(target, student, 0.9)
    for t, b, s in zip(target.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    assert torch.all(target[1].running_mean == 0)  # buffers are not averaged (official)


def test_momentum_one_freezes_target():
    student, target = nn.Linear(3, 3), nn.Linear(3, 3)
    before = target.weight.clone()
    ema_update(target, student, 1.0)
    torch.testing.assert_close(target.weight, before)
