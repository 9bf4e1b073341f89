"""Grading tests for the course assignment.  In a student edition:  python -m pytest -q test_assignment.py

course/assignment.py copies this file into each student edition as test_assignment.py, with the
edition's exercises written into SELECTED. Each test is named after its exercise
(test_exercise_07_...) and says, when it fails, what it expected, on which input, and which property
failed. They run on a CPU in seconds and use small made-up inputs whose answers are known in closed
form or are written out below as plain loops.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import byol
import common
from engine.measure import ForwardCounter
import dino
import mocov2
import ressl
import simclr
import simsiam

SELECTED = None  # the exercises of this edition (course/assignment.py writes them); None: all

TITLES = {
    1: "common.solarize",
    2: "byol.D",
    3: "byol.byol_loss",
    4: "common.NamedStageEMA.update",
    5: "dino.Centre.update",
    6: "common.KeyQueue.push",
    7: "mocov2.info_nce",
    8: "ressl.ressl_loss",
    9: "simclr.nt_xent",
    10: "common.knn_predict",
    11: "dino.dino_loss",
    12: "common.NamedStageEMA.forward",
}


def exercise(number):
    """Skip the tests of an exercise that this edition does not have."""
    missing = SELECTED is not None and number not in SELECTED
    return pytest.mark.skipif(missing, reason=f"exercise {number} is not in this edition")


def fail(number, prop, on, expected, got, hint=None):
    """Stop the test with a message that teaches: the property, the input, what was expected, what came."""
    message = (
        f"Exercise {number} ({TITLES[number]}): {prop}\n  on:       {on}\n  expected: {expected}\n  got:      {got}"
    )
    if hint:
        message += f"\n  hint:     {hint}"
    pytest.fail(message, pytrace=False)


def scalar(number, value, on):
    """The loss as a float, after checking it is a 0-dim tensor."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        fail(number, "the loss is one number (a 0-dim tensor): the mean over the batch", on, "shape ()", shape)
    return float(value.detach())


def check_value(number, prop, on, got, expected, tol=1e-4, hint=None):
    if not math.isfinite(got) or abs(got - expected) > tol * max(1.0, abs(expected)):
        fail(number, prop, on, f"{expected:.6f}", f"{got:.6f}", hint)


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def rows(t):
    return [[float(v) for v in row] for row in t.detach()]


# ---- Exercise 1: solarisation ---------------------------------------------------------------


@exercise(1)
def test_exercise_01_solarize_inverts_pixels_at_or_above_the_threshold():
    values = [0.0, 0.25, 127 / 255, 128 / 255, 0.75, 1.0]
    x = torch.tensor(values * 4).view(2, 3, 2, 2)
    out = common.solarize(x.clone())
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        fail(
            1,
            "the output has the input's shape",
            "x of shape (2, 3, 2, 2)",
            "shape (2, 3, 2, 2)",
            getattr(out, "shape", out),
        )
    for p, o in zip(x.flatten().tolist(), out.flatten().tolist()):
        expected = 1 - p if p >= 128 / 255 else p
        if abs(o - expected) > 1e-6:
            where = (
                "exactly at the threshold 128/255"
                if abs(p - 128 / 255) < 1e-6
                else ("above" if p > 128 / 255 else "below") + " the threshold 128/255"
            )
            fail(
                1,
                "p -> 1 - p for pixels at or above the threshold, unchanged below",
                f"a pixel {p:.5f} ({where})",
                f"{expected:.5f}",
                f"{o:.5f}",
                "PIL's solarize inverts p >= threshold, the threshold included",
            )


@exercise(1)
def test_exercise_01_solarize_uses_the_threshold_given():
    x = torch.tensor([0.1, 0.3, 0.5, 0.9]).view(1, 1, 2, 2).expand(1, 3, 2, 2).contiguous()
    out = common.solarize(x, threshold=0.3)
    expected = torch.where(x >= 0.3, 1 - x, x)  # written out: [0.1, 0.7, 0.5, 0.1]
    if not torch.allclose(out, expected, atol=1e-6):
        fail(
            1,
            "the threshold is the argument, not a constant",
            "pixels 0.1, 0.3, 0.5, 0.9 with threshold=0.3",
            [round(v, 4) for v in expected[0, 0].flatten().tolist()],
            [round(v, 4) for v in out[0, 0].flatten().tolist()],
        )


# ---- Exercise 2: BYOL's distance D ----------------------------------------------------------


@exercise(2)
def test_exercise_02_D_closed_forms():
    torch.manual_seed(0)
    p = torch.randn(6, 8)
    cases = [
        (3 * p, 0.0, "z = 3 p (same direction, any length)", "2 - 2 cos = 0 when p and z point the same way"),
        (-0.5 * p, 4.0, "z = -0.5 p (opposite directions)", "2 - 2 cos = 4 when they point opposite ways"),
    ]
    p2, q = torch.zeros(6, 8), torch.zeros(6, 8)
    p2[:, 1], q[:, 0] = 2.0, 1.0
    for z, expected, on, prop in cases:
        got = scalar(2, byol.D(p, z), on)
        check_value(
            2,
            prop,
            f"p: 6 x 8 random, {on}",
            got,
            expected,
            1e-5,
            "l2-normalise p and z along dim 1, then 2 - 2 * (p * z).sum(dim=1), averaged over the rows",
        )
    got = scalar(2, byol.D(p2, q), "orthogonal rows")
    check_value(2, "2 - 2 cos = 2 for orthogonal vectors", "p rows (0, 2, 0, ...), z rows (1, 0, 0, ...)", got, 2.0)


@exercise(2)
def test_exercise_02_D_is_the_batch_mean_of_2_minus_2_cos():
    torch.manual_seed(1)
    p, z = torch.randn(5, 7), torch.randn(5, 7)
    expected = sum(2 - 2 * cos(a, b) for a, b in zip(rows(p), rows(z))) / 5  # written out, row by row
    got = scalar(2, byol.D(p, z), "p, z: 5 x 7 random")
    minus_cos = sum(-cos(a, b) for a, b in zip(rows(p), rows(z))) / 5  # Algorithm 1's form
    check_value(
        2,
        "D = mean over rows i of 2 - 2 cos(p_i, z_i)",
        "p, z: 5 x 7 random (seed 1)",
        got,
        expected,
        1e-5,
        "that is Algorithm 1's -cos: this code's D is 2 - 2 cos, the same minimiser (docs/deviations.md)"
        if abs(got - minus_cos) < 1e-5
        else "a mean over the batch, not a sum; cosine of each row with the same row of z",
    )


@exercise(2)
def test_exercise_02_D_stops_the_gradient_at_the_target():
    torch.manual_seed(2)
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    byol.D(p, z).backward()
    if p.grad is None or p.grad.abs().sum() == 0:
        fail(2, "the gradient reaches the prediction p", "p, z: 4 x 8, D(p, z).backward()", "p.grad non-zero", p.grad)
    if z.grad is not None:
        fail(
            2,
            "stop-gradient: no gradient reaches the target z (Algorithm 1: z = z.detach())",
            "p, z: 4 x 8, D(p, z).backward()",
            "z.grad is None",
            f"a gradient of norm {float(z.grad.norm()):.4f}",
            "detach z before using it: the target is not trained through the loss",
        )


@exercise(2)
def test_exercise_02_simsiam_D_is_algorithm_1s_minus_cos_with_stop_gradient():
    torch.manual_seed(12)
    p, z = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    expected = sum(-cos(a, b) for a, b in zip(rows(p), rows(z))) / 5  # Algorithm 1's D, written out
    loss = simsiam.D(p, z)
    got = scalar(2, loss, "simsiam.D; p, z: 5 x 7 random")
    check_value(
        2,
        "SimSiam's D = mean over rows i of -cos(p_i, z_i), Algorithm 1's form",
        "simsiam.D; p, z: 5 x 7 random (seed 12)",
        got,
        expected,
        1e-5,
        "that is BYOL's 2 - 2 cos; SimSiam's D is -cos"
        if abs(got - (2 + 2 * expected)) < 1e-5
        else "l2-normalise p and z along dim 1, then -(p * z).sum(dim=1), averaged over the rows",
    )
    loss.backward()
    if p.grad is None or z.grad is not None:
        fail(
            2,
            "stop-gradient in SimSiam's D too: the gradient reaches p, never z",
            "simsiam.D; p, z: 5 x 7, D(p, z).backward()",
            "p.grad set, z.grad None",
            f"p.grad {'set' if p.grad is not None else 'None'}, z.grad {'set' if z.grad is not None else 'None'}",
            "detach z before using it, as in byol.D",
        )


# ---- Exercise 3: BYOL's symmetric loss ------------------------------------------------------


@exercise(3)
def test_exercise_03_byol_loss_pairs_each_prediction_with_the_other_view():
    torch.manual_seed(3)
    p_1, p_2 = torch.randn(8, 16), torch.randn(8, 16)
    got = scalar(3, byol.byol_loss(p_1, p_2, p_2, p_1), "z_1m = p_2, z_2m = p_1")
    check_value(
        3,
        "p_1 regresses z_2m and p_2 regresses z_1m: with z_2m = p_1 and z_1m = p_2 the loss is 0",
        "p_1, p_2: 8 x 16 random, z_1m = p_2, z_2m = p_1",
        got,
        0.0,
        1e-5,
        "pair view 1's prediction with view 2's target, and the other way round",
    )


@exercise(3)
def test_exercise_03_byol_loss_is_equation_5():
    torch.manual_seed(4)
    p_1, p_2, z_1m, z_2m = (torch.randn(6, 10) for _ in range(4))
    n = 6
    eq5 = -0.5 * (
        sum(cos(a, b) for a, b in zip(rows(p_1), rows(z_2m))) / n
        + sum(cos(a, b) for a, b in zip(rows(p_2), rows(z_1m))) / n
    )  # Eq. (5), written out
    got = scalar(3, byol.byol_loss(p_1, p_2, z_1m, z_2m), "6 x 10 random")
    check_value(
        3,
        "the loss is D(p_1, z_2m) / 2 + D(p_2, z_1m) / 2 = 2 + 2 L, L of Eq. (5)",
        "p_1, p_2, z_1m, z_2m: 6 x 10 random (seed 4)",
        got,
        2 + 2 * eq5,
        1e-5,
        "average the two directions (each halved), using D of exercise 2",
    )


@exercise(3)
def test_exercise_03_byol_loss_trains_the_predictions_only():
    torch.manual_seed(5)
    p_1, p_2, z_1m, z_2m = (torch.randn(4, 8, requires_grad=True) for _ in range(4))
    byol.byol_loss(p_1, p_2, z_1m, z_2m).backward()
    if p_1.grad is None or p_2.grad is None:
        fail(
            3,
            "both predictions receive a gradient",
            "4 x 8 random, loss.backward()",
            "p_1.grad, p_2.grad set",
            f"p_1.grad {'set' if p_1.grad is not None else 'None'}, "
            f"p_2.grad {'set' if p_2.grad is not None else 'None'}",
        )
    if z_1m.grad is not None or z_2m.grad is not None:
        fail(
            3,
            "stop-gradient on both targets",
            "4 x 8 random, loss.backward()",
            "z_1m.grad and z_2m.grad None",
            "a gradient reached a target",
            "use D, which detaches its target",
        )


@exercise(3)
def test_exercise_03_simsiam_loss_pairs_each_prediction_with_the_other_view():
    torch.manual_seed(13)
    p_1, p_2, z_1, z_2 = (torch.randn(6, 10) for _ in range(4))
    expected = -0.5 * (
        sum(cos(a, b) for a, b in zip(rows(p_1), rows(z_2))) / 6
        + sum(cos(a, b) for a, b in zip(rows(p_2), rows(z_1))) / 6
    )  # SimSiam's symmetric loss, written out
    got = scalar(3, simsiam.simsiam_loss(p_1, p_2, z_1, z_2), "simsiam.simsiam_loss; 6 x 10 random")
    check_value(
        3,
        "SimSiam's loss is D(p_1, z_2) / 2 + D(p_2, z_1) / 2 with D = -cos",
        "simsiam.simsiam_loss; p_1, p_2, z_1m, z_2m: 6 x 10 random (seed 13)",
        got,
        expected,
        1e-5,
        "pair each view's prediction with the OTHER view's target, average the two, with simsiam.D",
    )


# ---- Exercise 4: Eq. (6), the EMA update ------------------------------------------------------


def small_encoder(stages, seed=0):
    """A quarter-quarter-width ResNet-18 (width 4) and a small projector: fast on a CPU."""
    torch.manual_seed(seed)
    online = common.Encoder(common.ResNetCIFAR("resnet18", width=4), common.mlp(32, 16, 8))
    target = common.NamedStageEMA(online, common.parse_ema_stages(stages))
    return online, target


def move_online(online, seed=1):
    """Move the online weights away from the EMA copies, as an optimiser step would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))


def ema_named(target):
    return {f"{s}.{n}": p for s in target.ema_stages for n, p in target.ema[s].named_parameters()}


def online_named(online, stages):
    modules = online.stages()
    return {f"{s}.{n}": p for s in stages for n, p in modules[s].named_parameters()}


@exercise(4)
@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_exercise_04_update_is_equation_6(beta):
    online, target = small_encoder("block4,projector")
    move_online(online)
    before = {k: v.detach().clone() for k, v in ema_named(target).items()}
    theta = online_named(online, ["block4", "projector"])
    target.update(beta)
    for name, new in ema_named(target).items():
        expected = beta * before[name] + (1 - beta) * theta[name]
        if not torch.allclose(new, expected, atol=1e-6):
            swapped = (1 - beta) * before[name] + beta * theta[name]
            hint = (
                "this is (1 - beta) * xi + beta * theta: beta and 1 - beta are swapped; beta weighs the OLD "
                "target weights"
                if torch.allclose(new, swapped, atol=1e-6)
                else "xi <- beta * xi + (1 - beta) * theta, xi the EMA copy, theta the online weights"
            )
            fail(
                4,
                "Eq. (6) on every parameter of the EMA stages",
                f"beta = {beta}, EMA on block4,projector, parameter {name}",
                "beta * xi + (1 - beta) * theta",
                f"max difference {float((new - expected).detach().abs().max()):.3g}",
                hint,
            )


@exercise(4)
def test_exercise_04_update_at_beta_0_and_1():
    online, target = small_encoder("projector")
    move_online(online)
    before = {k: v.detach().clone() for k, v in ema_named(target).items()}
    target.update(1.0)
    for name, p in ema_named(target).items():
        if not torch.allclose(p, before[name], atol=1e-7):
            fail(
                4,
                "beta = 1 freezes the target (xi <- xi)",
                f"beta = 1, EMA on projector, parameter {name}",
                "the EMA copy unchanged",
                f"it moved by {float((p - before[name]).abs().max()):.3g}",
            )
    target.update(0.0)
    theta = online_named(online, ["projector"])
    for name, p in ema_named(target).items():
        if not torch.allclose(p, theta[name], atol=1e-7):
            fail(
                4,
                "beta = 0 copies the online weights (xi <- theta): no momentum",
                f"beta = 0, parameter {name}",
                "the EMA copy equal to the online parameter",
                f"max difference {float((p - theta[name]).abs().max()):.3g}",
                "at beta = 0 the new target is (1 - 0) * theta",
            )


@exercise(4)
def test_exercise_04_only_the_ema_copies_move():
    online, target = small_encoder("block4,projector")
    move_online(online)
    with torch.no_grad():  # the online BatchNorm statistics move too, as a training step's would
        for b in online.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    online_before = {n: p.detach().clone() for n, p in online.named_parameters()}
    buffers_before = {n: b.clone() for n, b in target.ema.named_buffers()}
    target.update(0.7)
    if target.beta != 0.7:
        fail(
            4,
            "the update records its beta in self.beta",
            "target.update(0.7)",
            "target.beta == 0.7",
            target.beta,
            "the run's log line reads target.beta: set it first, whatever beta is",
        )
    for name, p in online.named_parameters():
        if not torch.equal(p, online_before[name]):
            fail(
                4,
                "the update changes the EMA copies only, never the online network",
                f"beta = 0.7, online {name}",
                "unchanged",
                "changed",
                "write into xi (the target's parameters), read theta",
            )
    for name, b in target.ema.named_buffers():
        if not torch.equal(b, buffers_before[name]):
            fail(
                4,
                "BatchNorm running statistics are buffers, not parameters: Eq. (6) leaves them alone",
                f"beta = 0.7, EMA buffer {name}",
                "unchanged",
                "changed",
                "average target.parameter_pairs() only",
            )
    for name, p in ema_named(target).items():
        if p.requires_grad:
            fail(4, "the EMA copies never need gradients", f"after update, {name}", "requires_grad False", "True")
    _, empty = small_encoder("none")
    empty.update(0.5)  # no EMA stage: nothing to update, and no error


# ---- Exercise 5: DINO's centre ----------------------------------------------------------------


@exercise(5)
def test_exercise_05_centre_is_a_moving_mean_of_both_views():
    centre = dino.Centre(6, 0.9)
    centre.value.fill_(1.0)
    t_1, t_2 = torch.arange(12.0).view(2, 6), torch.full((2, 6), -2.0)
    centre.update([t_1, t_2])
    mean = [(sum(float(t_1[i, j]) for i in range(2)) + sum(float(t_2[i, j]) for i in range(2))) / 4 for j in range(6)]
    expected = [0.9 * 1.0 + 0.1 * m for m in mean]  # written out: c <- m c + (1 - m) mean
    got = centre.value
    if tuple(got.shape) != (1, 6):
        fail(5, "the centre stays 1 x K", "K = 6", "shape (1, 6)", tuple(got.shape))
    if not torch.allclose(got, torch.tensor([expected]), atol=1e-5):
        only_first = [0.9 + 0.1 * float(t_1[:, j].mean()) for j in range(6)]
        swapped = [0.1 * 1.0 + 0.9 * m for m in mean]
        hint = (
            "momentum and 1 - momentum are swapped: the old centre keeps weight m = 0.9"
            if torch.allclose(got, torch.tensor([swapped]), atol=1e-5)
            else "the mean runs over the rows of every global view together (here 2 + 2 rows)"
            if torch.allclose(got, torch.tensor([only_first]), atol=1e-5)
            else "c <- m * c + (1 - m) * (mean of all teacher rows), m = self.momentum"
        )
        fail(
            5,
            "c <- m c + (1 - m) mean(teacher logits over both views)",
            "c = 1, m = 0.9, view 1 rows 0..11 as 2 x 6, view 2 two rows of -2",
            [round(v, 4) for v in expected],
            [round(v, 4) for v in got.flatten().tolist()],
            hint,
        )


@exercise(5)
def test_exercise_05_centre_is_updated_in_place_and_without_gradient():
    centre = dino.Centre(4, 0.8)
    t = torch.randn(3, 4, requires_grad=True)
    centre.update([t * 2, t])
    if centre.value.requires_grad:
        fail(
            5,
            "the centre is a statistic, not trained: no autograd history",
            "teacher logits that require grad",
            "centre.value.requires_grad False",
            "True",
        )
    saved = centre.state_dict().get("value")
    if saved is None or tuple(saved.shape) != (1, 4) or not torch.equal(saved, centre.value):
        fail(
            5,
            "the centre stays the 1 x K buffer self.value (it is saved in checkpoints)",
            "one update",
            "state_dict()['value'] of shape (1, 4), the updated centre",
            None if saved is None else tuple(saved.shape),
            "update self.value in place: self.value.mul_(...).add_(...)",
        )


@exercise(5)
def test_exercise_05_centre_takes_the_global_batch_mean(monkeypatch):
    seen = []

    def every_process_mean(mean):  # a stand-in for torchrun's average over processes: every entry 5
        seen.append(tuple(mean.shape))
        return torch.full_like(mean, 5.0)

    monkeypatch.setattr(common, "mean_over_processes", every_process_mean)
    centre = dino.Centre(4, 0.5)
    centre.update([torch.zeros(2, 4), torch.ones(2, 4)])
    if seen != [(1, 4)] or not torch.allclose(centre.value, torch.full((1, 4), 2.5)):
        fail(
            5,
            "under torchrun the centre moves towards the global batch's mean: common.mean_over_processes(this "
            "process's 1 x K mean), called once",
            "m = 0.5, c = 0, this process's mean 0.5; common.mean_over_processes replaced by one that returns 5",
            "mean_over_processes called once on a 1 x K tensor; centre 2.5",
            f"called on {seen}; centre {[round(v, 4) for v in centre.value.flatten().tolist()]}",
            "batch_mean = common.mean_over_processes(batch_mean) before the moving average",
        )


# ---- Exercise 6: the key queue -----------------------------------------------------------------


@exercise(6)
def test_exercise_06_push_is_fifo_normalised_and_wraps_around():
    torch.manual_seed(6)
    queues = common.KeyQueue(8, 4, views=2)  # 2 views, K = 8 keys of d = 4
    before = queues.keys.clone()
    k_1, k_2 = torch.randn(4, 4), torch.randn(4, 4)
    queues.push(k_1, k_2)
    on = "queues of K = 8 keys, d = 4; push(k_1, k_2) with N = 4 keys per view"
    if not torch.allclose(queues.keys[0, :4], F.normalize(k_1, dim=1), atol=1e-6):
        unnormalised = torch.allclose(queues.keys[0, :4], k_1, atol=1e-6)
        fail(
            6,
            "the first push fills slots 0..3 of view 1's queue with its l2-normalised keys",
            on,
            "keys[0, :4] = k_1 / |k_1|",
            "raw keys" if unnormalised else "something else",
            "normalise each key to unit length before storing it" if unnormalised else "start at self.pointer (0)",
        )
    if not torch.allclose(queues.keys[1, :4], F.normalize(k_2, dim=1), atol=1e-6):
        fail(6, "view 2's keys go to queue 2", on, "keys[1, :4] = k_2 / |k_2|", "something else")
    if not torch.equal(queues.keys[:, 4:], before[:, 4:]):
        fail(6, "only the N oldest slots are replaced", on, "keys[:, 4:] unchanged", "changed")
    if int(queues.pointer) != 4:
        fail(6, "the pointer moves past the slots just written", on, "pointer 4", int(queues.pointer))
    queues.push(k_2, k_1)
    queues.push(k_1, k_2)  # the third push wraps around: slots 0..3 again
    if (
        int(queues.pointer) != 4
        or not torch.allclose(queues.keys[0, 4:], F.normalize(k_2, dim=1), atol=1e-6)
        or not torch.allclose(queues.keys[0, :4], F.normalize(k_1, dim=1), atol=1e-6)
    ):
        fail(
            6,
            "FIFO with wrap-around: after 3 pushes of 4 into 8 slots, slots 0..3 hold the 3rd batch and 4..7 the 2nd",
            "pushes (k_1, k_2), (k_2, k_1), (k_1, k_2)",
            "pointer 4, keys[0] = [k_1; k_2] normalised",
            f"pointer {int(queues.pointer)}",
            "slot = (pointer + i) mod K; pointer <- (pointer + N) mod K",
        )
    single = common.KeyQueue(8, 4)  # one queue, K x d: ReSSL's
    single.push(k_1)
    if single.keys.shape != (8, 4) or not torch.allclose(single.keys[:4], F.normalize(k_1, dim=1), atol=1e-6):
        fail(
            6,
            "a single queue (ReSSL's, K x d) takes a batch of keys the same way",
            "KeyQueue(8, 4); push(k_1)",
            "keys of shape (8, 4) with keys[:4] = k_1 / |k_1|",
            f"shape {tuple(single.keys.shape)}",
            "self.keys.view(-1, K, d) is V x K x d for one queue or several, and writes through to self.keys",
        )


@exercise(6)
def test_exercise_06_a_batch_that_crosses_the_end_wraps_to_slot_0():
    queue = common.KeyQueue(6, 2)  # K = 6 is not a multiple of N = 4: the second batch crosses the end
    keys = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]), dim=1)
    queue.push(keys)
    queue.push(keys)
    expected = torch.cat([keys[2:], keys[2:], keys[:2]])  # slots 4, 5, 0, 1 hold the second batch
    if int(queue.pointer) != 2 or not torch.allclose(queue.keys, expected, atol=1e-6):
        fail(
            6,
            "a batch that crosses the end of the queue goes on at slot 0 (no key is dropped)",
            "K = 6, d = 2; two pushes of the same N = 4 keys",
            "pointer 2; slots 4, 5, 0, 1 hold the second batch's keys 0, 1, 2, 3",
            f"pointer {int(queue.pointer)}; slots 0..5 {[[round(v, 3) for v in key] for key in queue.keys.tolist()]}",
            "slot = (pointer + i) mod K for each key i, not a slice that stops at K",
        )


@exercise(6)
def test_exercise_06_no_gradient_into_the_queue():
    queues = common.KeyQueue(8, 4, views=2)
    k = torch.randn(4, 4, requires_grad=True)
    queues.push(k * 1.5, k)
    if queues.keys.requires_grad or queues.keys.grad_fn is not None:
        fail(
            6,
            "the queue stores values, not graph: no gradient may flow into past keys",
            "keys that require grad",
            "queues.keys.requires_grad False",
            "True",
            "keep the @torch.no_grad() decorator, or detach the keys",
        )
    if "keys" not in queues.state_dict() or "pointer" not in queues.state_dict():
        fail(
            6,
            "keys and pointer stay buffers (saved in checkpoints)",
            "one push",
            "both in state_dict()",
            sorted(queues.state_dict()),
        )


# ---- Exercise 7: InfoNCE -------------------------------------------------------------------------


def info_nce_written_out(q, k, queue, t):
    total = 0.0
    for qi, ki in zip(rows(q), rows(k)):
        positive = math.exp(cos(qi, ki) / t)
        negatives = sum(math.exp(cos(qi, kj) / t) for kj in rows(queue))
        total += -math.log(positive / (positive + negatives))
    return total / len(q)


@exercise(7)
def test_exercise_07_info_nce_closed_forms():
    v = torch.ones(4, 8)
    uniform = F.normalize(torch.ones(20, 8), dim=1)
    got = scalar(7, mocov2.info_nce(v, v, uniform, 0.2), "q = k = ones")
    check_value(
        7,
        "every logit equal: the positive is one of K + 1 equally likely candidates, loss log(K + 1)",
        "q = k = ones(4, 8), a uniform queue of K = 20 identical unit keys, T = 0.2",
        got,
        math.log(21),
    )
    q = torch.zeros(3, 8)
    q[torch.arange(3), torch.arange(3)] = 1.0
    queue = torch.zeros(20, 8)
    queue[:, 7] = 1.0  # every key orthogonal to every query
    expected = math.log(1 + 20 * math.exp(-1 / 0.2))  # positive cos 1, negatives cos 0
    got = scalar(7, mocov2.info_nce(q, q, queue, 0.2), "orthogonal queue")
    check_value(
        7,
        "positive similarity 1, negatives 0: loss log(1 + K exp(-1 / T))",
        "q = k = 3 unit vectors, K = 20 queued keys orthogonal to them, T = 0.2",
        got,
        expected,
        hint="divide every logit (positive and negatives) by the temperature",
    )


@exercise(7)
def test_exercise_07_info_nce_against_the_written_out_loss():
    torch.manual_seed(7)
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), F.normalize(torch.randn(12, 8), dim=1)
    for t in (0.2, 0.5):
        got = scalar(7, mocov2.info_nce(q, k, queue, t), "random")
        check_value(
            7,
            "InfoNCE = -log(exp(q.k/T) / (exp(q.k/T) + sum_j exp(q.Q_j/T))), mean over the batch",
            f"q, k: 4 x 8 random (unnormalised), queue: 12 unit keys, T = {t}",
            got,
            info_nce_written_out(q, k, queue, t),
            hint="l2-normalise q and k; the positive is class 0",
        )


@exercise(7)
def test_exercise_07_info_nce_stops_the_gradient_at_the_key():
    torch.manual_seed(8)
    queues = common.KeyQueue(12, 8, views=2)
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    mocov2.info_nce(q, k, queues.keys[1], 0.2).backward()
    if q.grad is None or q.grad.abs().sum() == 0:
        fail(7, "the query q is trained", "loss.backward()", "q.grad non-zero", q.grad)
    if k.grad is not None:
        fail(
            7,
            "stop-gradient on the key: keys come from the momentum encoder and are not trained through",
            "q, k: 4 x 8 requiring grad, loss.backward()",
            "k.grad None",
            "a gradient reached k",
            "detach k",
        )


# ---- Exercise 8: ReSSL ----------------------------------------------------------------------------


def ressl_written_out(q, k, queue, ts, tt):
    total = 0.0
    for qi, ki in zip(rows(q), rows(k)):
        t = [math.exp(cos(ki, kj) / tt) for kj in rows(queue)]
        s = [math.exp(cos(qi, kj) / ts) for kj in rows(queue)]
        total += -sum(t[j] / sum(t) * math.log(s[j] / sum(s)) for j in range(len(t)))
    return total / len(q)


@exercise(8)
def test_exercise_08_ressl_loss_closed_form_and_written_out():
    v = torch.ones(4, 8)
    got = scalar(8, ressl.ressl_loss(v, v, F.normalize(torch.ones(16, 8), dim=1), 0.1, 0.04), "uniform")
    check_value(
        8,
        "a uniform queue makes both distributions uniform: loss log K",
        "q = k = ones(4, 8), 16 identical unit keys, T_s = 0.1, T_t = 0.04",
        got,
        math.log(16),
    )
    torch.manual_seed(9)
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), F.normalize(torch.randn(16, 8), dim=1)
    got = scalar(8, ressl.ressl_loss(q, k, queue, 0.1, 0.04), "random")
    check_value(
        8,
        "H(p_t, p_s) with p_t = softmax(k Q^T / T_t), p_s = softmax(q Q^T / T_s)",
        "q, k: 4 x 8 random, 16 unit keys, T_s = 0.1 (student), T_t = 0.04 (teacher)",
        got,
        ressl_written_out(q, k, queue, 0.1, 0.04),
        hint="the teacher (key k) is sharper: it uses teacher_temp; the student (query q) student_temp",
    )


@exercise(8)
def test_exercise_08_ressl_loss_stops_the_gradient_at_the_teacher():
    torch.manual_seed(10)
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    ressl.ressl_loss(q, k, F.normalize(torch.randn(16, 8), dim=1), 0.1, 0.04).backward()
    if q.grad is None or k.grad is not None:
        fail(
            8,
            "gradient into the student's q only, none into the teacher's k",
            "loss.backward()",
            "q.grad set, k.grad None",
            f"q.grad {'set' if q.grad is not None else 'None'}, k.grad {'set' if k.grad is not None else 'None'}",
            "detach k",
        )


# ---- Exercise 9: NT-Xent ------------------------------------------------------------------------


def nt_xent_written_out(anchors, candidates, t, first=0):
    a, c = rows(anchors), rows(candidates)
    n2, total = len(a), 0.0
    for i in range(n2):
        sims = [cos(a[i], c[k]) / t for k in range(len(c))]
        positive = first + (i + n2 // 2) % n2
        total += -(sims[positive] - math.log(sum(math.exp(s) for k, s in enumerate(sims) if k != first + i)))
    return total / n2


@exercise(9)
def test_exercise_09_nt_xent_closed_forms():
    n = 6
    same = torch.ones(2 * n, 8)
    got = scalar(9, simclr.nt_xent(same, same, 0.2), "identical views")
    check_value(
        9,
        "identical views: every candidate equally similar, so the positive is 1 of 2N - 1: log(2N - 1)",
        f"all 2N = {2 * n} anchors and candidates equal, T = 0.2",
        got,
        math.log(2 * n - 1),
        hint=(
            "log(2N) means candidate i (the anchor itself) is not left out"
            if abs(got - math.log(2 * n)) < 1e-4
            else "leave candidate i out of the denominator"
        ),
    )
    eye = torch.eye(3, 8)
    views = torch.cat([eye, eye])  # N = 3 images, orthonormal, two identical views each
    got = scalar(9, simclr.nt_xent(views, views, 0.5), "orthonormal images")
    check_value(
        9,
        "positive similarity 1, the 2N - 2 negatives 0: loss log(1 + (2N - 2) exp(-1 / T))",
        "N = 3 orthonormal images, two identical views each, T = 0.5",
        got,
        math.log(1 + 4 * math.exp(-2)),
        hint="divide the cosine similarities by the temperature",
    )


@exercise(9)
def test_exercise_09_nt_xent_against_the_written_out_loss():
    torch.manual_seed(11)
    anchors, candidates = torch.randn(8, 6), torch.randn(8, 6)
    two_processes = torch.cat([torch.randn(8, 6), anchors])  # another process's 2N candidates, then this one's
    for a, c, t, first, on in (
        (anchors, anchors, 0.2, 0, "plain SimCLR: anchors = candidates, 2N = 8 x 6 random, T = 0.2"),
        (anchors, candidates, 0.5, 0, "with a target: different candidates, 8 x 6 random, T = 0.5"),
        (anchors, two_processes, 0.2, 8, "under torchrun: 16 candidates, this process's from column first = 8"),
    ):
        got = scalar(9, simclr.nt_xent(a, c, t, first=first), on)
        expected = nt_xent_written_out(a, c, t, first)
        check_value(
            9,
            "l_i = -log(exp(s(i, j(i)) / T) / sum_{k != i} exp(s(i, k) / T)), j(i) = (i + N) mod 2N",
            on,
            got,
            expected,
            hint="anchor i's positive is the other view of the same image, (i + N) mod 2N: not i itself"
            + ("; with first, both indices are offset by it" if first else ""),
        )


@exercise(9)
def test_exercise_09_nt_xent_trains_anchors_and_candidates():
    torch.manual_seed(12)
    z = torch.randn(8, 6, requires_grad=True)
    simclr.nt_xent(z, z, 0.2).backward()
    a = z.detach().clone().requires_grad_(True)  # the same loss in torch ops, for its gradient
    n = F.normalize(a, dim=1)
    logits = (n @ n.T / 0.2).masked_fill(torch.eye(8, dtype=torch.bool), float("-inf"))
    F.cross_entropy(logits, (torch.arange(8) + 4) % 8).backward()
    if z.grad is None or not torch.allclose(z.grad, a.grad, atol=1e-5):
        fail(
            9,
            "in plain SimCLR gradients flow through both sides of every similarity",
            "anchors = candidates = z (8 x 6 random), T = 0.2, loss.backward()",
            "z.grad of the full loss",
            "a different gradient" if z.grad is not None else "None",
            "do not detach inside nt_xent: the caller passes targets already under stop-gradient when there is an EMA",
        )


# ---- Exercise 10: weighted kNN -----------------------------------------------------------------


def knn_written_out(train, labels, test, num_classes, k, t):
    predictions = []
    for x in rows(test):
        sims = sorted(((cos(x, y), int(c)) for y, c in zip(rows(train), labels)), reverse=True)[:k]
        votes = [0.0] * num_classes
        for sim, c in sims:
            votes[c] += math.exp(sim / t)
        predictions.append(max(range(num_classes), key=lambda c: votes[c]))
    return predictions


@exercise(10)
def test_exercise_10_knn_weights_each_vote_by_similarity():
    def at(degrees):
        return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]

    train = torch.tensor([at(8), at(60), at(-60), at(180)])
    labels = torch.tensor([1, 0, 0, 2])
    pred = common.knn_predict(train, labels, torch.tensor([at(0)]), 3, k=3, temperature=0.1)
    if int(pred[0]) != 1:
        fail(
            10,
            "votes are weighted by exp(sim / T): one close neighbour outweighs two distant ones",
            "test point at 0 degrees; neighbours: class 1 at 8 degrees (cos 0.99), class 0 at +-60 (cos 0.5); "
            "k = 3, T = 0.1",
            "class 1 (exp(9.9) = 19930 against 2 exp(5) = 297)",
            f"class {int(pred[0])}",
            "add exp(similarity / T) to the neighbour's class, not 1",
        )


@exercise(10)
def test_exercise_10_knn_against_a_written_out_count():
    torch.manual_seed(13)
    train, labels = torch.randn(40, 6), torch.randint(0, 3, (40,))
    train = train * torch.rand(40, 1).mul(20).add(0.05)  # lengths from 0.05 to 20: only directions count
    test = torch.randn(9, 6) * torch.rand(9, 1).mul(20).add(0.05)
    # k = 1 is Table 2's KNN-1; at T = 1 the far neighbours' votes count, so k and T must be the ones passed
    for k, t, chunk in ((5, 0.1, 1024), (5, 0.1, 2), (200, 0.1, 4), (1, 0.1, 1024), (5, 1.0, 1024), (10, 1.0, 3)):
        pred = common.knn_predict(train, labels, test, 3, k=k, temperature=t, chunk=chunk)
        expected = knn_written_out(train, labels, test, 3, min(k, 40), t)
        on = f"40 training features of random lengths, 9 test features, 3 classes, k = {k}, T = {t}, chunk = {chunk}"
        if not isinstance(pred, torch.Tensor) or tuple(pred.shape) != (9,) or pred.dtype != torch.long:
            fail(
                10,
                "one int64 class index per test feature",
                on,
                "int64 tensor of shape (9,)",
                f"{getattr(pred, 'dtype', type(pred).__name__)} of shape {tuple(getattr(pred, 'shape', ()))}",
            )
        if pred.tolist() != expected:
            fail(
                10,
                "cosine similarity (l2-normalise both sides), the k most similar vote with weight exp(sim / T)",
                on,
                expected,
                pred.tolist(),
                "k larger than the training set means all of it"
                if k > 40
                else "the features are not unit length: normalise them, since kNN here is cosine",
            )


# ---- Exercise 11: DINO's loss -------------------------------------------------------------------


def dino_written_out(student, teacher, centre, ts, tt):
    total, pairs = 0.0, 0
    c = [float(v) for v in centre[0]]
    for a, t_view in enumerate(teacher):
        for b, s_view in enumerate(student):
            if a == b:
                continue
            for t_row, s_row in zip(rows(t_view), rows(s_view)):
                t = [math.exp((v - cj) / tt) for v, cj in zip(t_row, c)]
                s = [math.exp(v / ts) for v in s_row]
                total += -sum(t[j] / sum(t) * math.log(s[j] / sum(s)) for j in range(len(t))) / len(t_view)
            pairs += 1
    return total / pairs


@exercise(11)
def test_exercise_11_dino_loss_with_a_uniform_teacher():
    k_size = 32
    zeros = [torch.zeros(4, k_size) for _ in range(3)]
    got = scalar(11, dino.dino_loss(zeros, zeros[:2], torch.zeros(1, k_size), 0.1, 0.04), "zeros")
    check_value(
        11,
        "uniform teacher and student: the cross-entropy of two uniform distributions is log K",
        f"all logits 0, K = {k_size}, 3 student views, 2 teacher views, centre 0",
        got,
        math.log(k_size),
    )
    torch.manual_seed(14)
    student = [torch.randn(4, k_size) for _ in range(3)]
    teacher = [torch.full((4, k_size), 2.5) for _ in range(2)]  # constant rows: a uniform teacher
    expected = dino_written_out(student, teacher, torch.zeros(1, k_size), 0.1, 0.04)
    got = scalar(11, dino.dino_loss(student, teacher, torch.zeros(1, k_size), 0.1, 0.04), "uniform teacher")
    check_value(
        11,
        "a uniform teacher: the loss is the mean of -(1/K) sum_k log P_s(k) over pairs a != b",
        "teacher rows constant (uniform after softmax), 3 random student views of 4 x 32, T_s = 0.1",
        got,
        expected,
        hint="student: log_softmax(s / T_s) along the K outputs",
    )


@exercise(11)
def test_exercise_11_dino_loss_against_the_written_out_loss():
    torch.manual_seed(15)
    k_size = 16
    student, teacher = [torch.randn(4, k_size) for _ in range(3)], [torch.randn(4, k_size) for _ in range(2)]
    centre = torch.randn(1, k_size)
    centre_before = centre.clone()
    got = scalar(11, dino.dino_loss(student, teacher, centre, 0.1, 0.04), "random")
    expected = dino_written_out(student, teacher, centre, 0.1, 0.04)
    check_value(
        11,
        "H(P_t^a, P_s^b) averaged over pairs a != b, P_t = softmax((t - c) / T_t) with the centre c as given",
        "3 student and 2 teacher views of 4 x 16 random logits, a random centre, T_s = 0.1, T_t = 0.04",
        got,
        expected,
        hint="use the centre as it is: it is updated after the loss, from "
        "this batch's teacher outputs (dino.py's main); skip the pairs where a == b",
    )
    if not torch.equal(centre, centre_before):
        fail(
            11,
            "the loss reads the centre and leaves it alone",
            "the call above",
            "centre unchanged",
            "changed",
            "the centre moves in Centre.update, after the loss",
        )


@exercise(11)
def test_exercise_11_dino_loss_stops_the_gradient_at_the_teacher():
    torch.manual_seed(16)
    student = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    dino.dino_loss(student, teacher, torch.zeros(1, 8), 0.1, 0.04).backward()
    if any(s.grad is None for s in student):
        fail(11, "every student view is trained", "2 + 2 views, loss.backward()", "each student .grad set", "None")
    if any(t.grad is not None for t in teacher):
        fail(
            11,
            "stop-gradient on the teacher: it is the momentum encoder's output, a target",
            "2 student, 2 teacher views requiring grad, loss.backward()",
            "teacher .grad None",
            "a gradient reached the teacher",
            "detach the teacher logits",
        )


# ---- Exercise 12: activation reuse, NamedStageEMA.forward -----------------------------------------


def pooled(h):
    return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)


def moved_apart(target, seed=2):
    """Make the EMA copies differ from the online stages, so that which one ran shows in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in target.ema.parameters():
            p.add_(0.5 * torch.randn_like(p))


@exercise(12)
def test_exercise_12_target_runs_the_ema_stages_from_the_first_ones_input():
    online, target = small_encoder("block4,projector")
    moved_apart(target)
    online.eval()
    target.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        f, z, activations = online(x)
        expected = target.ema["projector"](pooled(target.ema["block4"](activations["block4"])))
        got = target(activations)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        fail(
            12,
            "the target returns one N x d output",
            "EMA on block4,projector, 4 images",
            tuple(expected.shape),
            getattr(got, "shape", got),
        )
    if not torch.allclose(got, expected, atol=1e-5):
        hint = (
            "this is the EMA projector on the online f: the target started at the LAST EMA stage, not the first"
            if torch.allclose(got, target.ema["projector"](f), atol=1e-5)
            else "this is the online output: the EMA copies did not run"
            if torch.allclose(got, z, atol=1e-5)
            else "start from activations[first EMA stage] and run that stage and every later one, EMA copies where listed"
        )
        fail(
            12,
            "Fig. 1b, Eq. (7) generalised to EMA on block4,projector: z_m = g_m(pool(block4_m(activations['block4'])))",
            "EMA copies moved away from the online stages, 4 images 8 x 8, eval mode",
            "that output",
            f"max difference {float((got - expected).abs().max()):.3g}",
            hint,
        )


@exercise(12)
@pytest.mark.parametrize(
    "stages,low,high",
    [("projector", 1.0, 1.0), ("block4,projector", 1.01, 1.99), ("all", 2.0, 2.0), ("conv1", 2.0, 2.0)],
)
def test_exercise_12_activation_reuse_runs_the_backbone_once_per_view(stages, low, high):
    online, target = small_encoder(stages)
    counter = ForwardCounter(online, target, 8)
    online.train()
    target.train()
    _, _, activations = online(torch.randn(4, 3, 8, 8))
    target(activations)
    got = counter.forwards_per_image()
    if not low - 1e-6 <= got <= high + 1e-6:
        expected = f"{low:.2f}" if low == high else f"between {low:.2f} and {high:.2f}"
        hint = (
            "start from activations[first EMA stage]; with EMA on the projector only, the target reuses the online f "
            "and runs no backbone stage (Eq. 7)"
            if got > high
            else "the target ran fewer stages than it should: run every stage from the first EMA stage on"
        )
        fail(
            12,
            "activation reuse (Algorithm 1): stages before the first EMA stage are not run again",
            f"--ema-stages {stages}, one view, counted by engine.measure.ForwardCounter",
            f"{expected} backbone forwards per image",
            f"{got:.2f}",
            hint,
        )


@exercise(12)
def test_exercise_12_without_ema_the_target_is_the_online_output_under_stop_gradient():
    online, target = small_encoder("none")
    _, z, activations = online(torch.randn(4, 3, 8, 8))
    got = target(activations)
    if not isinstance(got, torch.Tensor) or not torch.allclose(got, z.detach()):
        fail(
            12,
            "no EMA stage (beta = 0, Table 1's 'Remove'): the target is the online output",
            "--ema-stages none",
            "activations['output']",
            "something else",
        )
    if got.requires_grad:
        fail(
            12,
            "stop-gradient: the target output carries no gradient",
            "--ema-stages none, online output with grad",
            "requires_grad False",
            "True",
            "return activations['output'].detach()",
        )


@exercise(12)
def test_exercise_12_shared_stages_leave_the_online_running_statistics_alone():
    online, target = small_encoder("conv1")
    online.train()
    target.train()
    _, _, activations = online(torch.randn(4, 3, 8, 8))
    stats = {k: v.clone() for k, v in online.backbone.block1.state_dict().items()}
    out = target(activations)
    if out.requires_grad:
        fail(12, "the target output carries no gradient", "--ema-stages conv1", "requires_grad False", "True")
    for key, value in online.backbone.block1.state_dict().items():
        if not torch.equal(value, stats[key]):
            fail(
                12,
                "a shared stage run by the target must not change the online BatchNorm running statistics",
                "--ema-stages conv1 (block1..projector shared), train mode",
                f"online block1 {key} unchanged",
                "changed",
                "run the stages with self._run_from(start, h), which freezes the shared stages' statistics",
            )


# test_all.py runs these on the project (from course.grading_tests import *): the tests, not the helpers above
__all__ = [name for name in dir() if name.startswith("test_exercise_")]
