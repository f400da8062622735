"""EMA math against its closed form, restarts, state round trips, and the full-parameter student's EMAs."""

import copy

import pytest
import torch
from torch import nn

from shortcutfm.core.ema import EMA, EMASchedule, StudentEMAs
from shortcutfm.models.student import FullStudent

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tensors(seed, dtype=F64):
    g = _gen(seed)
    return {"w": torch.randn(3, 4, generator=g, dtype=dtype), "b": torch.randn(4, generator=g, dtype=dtype)}


def _closed_form(shadow0, live, decay, k):
    """``shadow_k = live + decay^k (shadow_0 - live)`` for a constant live tensor."""
    return {n: live[n] + decay**k * (shadow0[n] - live[n]) for n in live}


def _assert_dicts_close(got, expected, **tol):
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name].to(got[name].dtype), **tol)


@pytest.mark.parametrize("decay, k", [(0.9, 1), (0.9, 17), (0.999, 50), (0.0, 3)])
def test_ema_matches_closed_form(decay, k):
    shadow0, live = _tensors(0), _tensors(1)
    ema = EMA({n: t.clone() for n, t in shadow0.items()}, decay)
    for _ in range(k):
        ema.update(live)
    _assert_dicts_close(ema.shadow, _closed_form(shadow0, live, decay, k), rtol=1e-12, atol=1e-12)


def test_ema_updates_given_tensors_in_place_and_leaves_live_alone():
    shadow = _tensors(0, torch.float32)
    live = _tensors(1, torch.float32)
    live_before = {n: t.clone() for n, t in live.items()}
    ema = EMA(shadow, 0.5)
    ema.update(live)
    assert ema.shadow["w"] is shadow["w"]  # an adapter's weights can be the shadow
    _assert_dicts_close(live, live_before, rtol=0, atol=0)


def test_copy_of_owns_float_copies():
    live = _tensors(2, torch.bfloat16)
    ema = EMA.copy_of(live, 0.9)
    assert ema.shadow["w"].dtype == torch.float32
    assert ema.shadow["w"].data_ptr() != live["w"].data_ptr()
    before = live["w"].float()
    live["w"].add_(1.0)
    torch.testing.assert_close(ema.shadow["w"], before, rtol=0, atol=0)


def test_dual_emas_each_follow_their_decay():
    start, live = _tensors(0), _tensors(1)
    emas = StudentEMAs(
        EMASchedule(mode="dual", fast_decay=0.8, slow_decay=0.95),
        slow_shadow={n: t.clone() for n, t in start.items()},
        fast_shadow={n: t.clone() for n, t in start.items()},
    )
    assert emas.fast is not emas.slow and len(emas.averages()) == 2
    for step in range(1, 13):
        emas.update(step, live)
    _assert_dicts_close(emas.fast.shadow, _closed_form(start, live, 0.8, 12), rtol=1e-12, atol=1e-12)
    _assert_dicts_close(emas.slow.shadow, _closed_form(start, live, 0.95, 12), rtol=1e-12, atol=1e-12)


def test_single_mode_shares_one_ema_updated_once_per_step():
    start, live = _tensors(0), _tensors(1)
    emas = StudentEMAs(EMASchedule(mode="single", slow_decay=0.9), slow_shadow={n: t.clone() for n, t in start.items()})
    assert emas.fast is emas.slow and emas.averages() == [emas.slow]
    for step in range(1, 8):
        emas.update(step, live)
    _assert_dicts_close(emas.slow.shadow, _closed_form(start, live, 0.9, 7), rtol=1e-12, atol=1e-12)
    assert set(emas.state_dict()) == {"slow.w", "slow.b"}


@pytest.mark.parametrize("mode", ["dual", "single"])
def test_restart_every_resets_exactly_at_the_period(mode):
    period = 5
    start = _tensors(0)
    emas = StudentEMAs(
        EMASchedule(mode=mode, fast_decay=0.7, slow_decay=0.9, restart_every=period),
        slow_shadow={n: t.clone() for n, t in start.items()},
        fast_shadow={n: t.clone() for n, t in start.items()} if mode == "dual" else None,
    )
    decays = [(emas.slow, 0.9)] + ([(emas.fast, 0.7)] if mode == "dual" else [])
    expected = {id(ema): {n: t.clone() for n, t in start.items()} for ema, _ in decays}
    for step in range(1, 13):
        live = _tensors(100 + step)  # the student moves every step
        emas.update(step, live)
        for ema, decay in decays:
            if step % period == 0:
                expected[id(ema)] = {n: t.clone() for n, t in live.items()}
                _assert_dicts_close(ema.shadow, live, rtol=0, atol=0)
            else:
                expected[id(ema)] = {n: decay * expected[id(ema)][n] + (1 - decay) * live[n] for n in live}
            _assert_dicts_close(ema.shadow, expected[id(ema)], rtol=1e-12, atol=1e-12)
        if step % period != 0:
            assert not torch.equal(emas.slow.shadow["w"], live["w"])


@pytest.mark.parametrize("mode", ["dual", "single"])
def test_state_dict_round_trip(mode):
    schedule = EMASchedule(mode=mode)
    make = lambda seed: StudentEMAs(  # noqa: E731
        schedule, slow_shadow=_tensors(seed), fast_shadow=_tensors(seed + 1) if mode == "dual" else None
    )
    source, target = make(0), make(10)
    for step in range(1, 4):
        source.update(step, _tensors(20 + step))
    state = source.state_dict()
    expected_keys = {"slow.w", "slow.b"} | ({"fast.w", "fast.b"} if mode == "dual" else set())
    assert set(state) == expected_keys
    target.load_state_dict(state)
    for a, b in zip(source.averages(), target.averages()):
        _assert_dicts_close(b.shadow, a.shadow, rtol=0, atol=0)
    # the state is a copy: changing it changes neither EMA
    state["slow.w"].add_(1.0)
    assert not torch.equal(source.slow.shadow["w"], state["slow.w"])
    assert not torch.equal(target.slow.shadow["w"], state["slow.w"])


def test_mismatched_names_raise_key_error():
    ema = EMA(_tensors(0), 0.9)
    renamed = {"weight": torch.zeros(3, 4, dtype=F64), "b": torch.zeros(4, dtype=F64)}
    for call in (ema.update, ema.restart, ema.load_state_dict):
        with pytest.raises(KeyError, match="weight"):
            call(renamed)
    with pytest.raises(KeyError):
        ema.update({"w": torch.zeros(3, 4, dtype=F64)})  # missing "b"
    dual = StudentEMAs(EMASchedule(), slow_shadow=_tensors(0), fast_shadow=_tensors(1))
    with pytest.raises(KeyError):
        dual.load_state_dict({f"slow.{n}": t for n, t in _tensors(2).items()})  # no fast.* tensors


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "triple"}, "ema.mode"),
        ({"fast_decay": 1.0}, "ema.fast_decay"),
        ({"slow_decay": -0.1}, "ema.slow_decay"),
        ({"restart_every": -1}, "ema.restart_every"),
    ],
)
def test_schedule_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        EMASchedule(**kwargs)


def test_bad_decay_and_missing_fast_shadow():
    with pytest.raises(ValueError, match="decay"):
        EMA(_tensors(0), 1.0)
    with pytest.raises(ValueError, match="fast_shadow"):
        StudentEMAs(EMASchedule(mode="dual"), slow_shadow=_tensors(0))


# ---------------------------------------------------------------------------------------------------------
# the full-parameter student: EMA velocities are the module with shadow weights, the live module untouched


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.out = nn.Linear(16, 4)
        self.label = nn.Embedding(3, 16)
        self.frozen = nn.Parameter(torch.tensor(0.5), requires_grad=False)
        self.register_buffer("gain", torch.tensor(2.0))

    def forward(self, x, sigma, *, y):
        h = torch.tanh(self.inp(x) + sigma.unsqueeze(1) + self.label(y))
        return self.gain * self.out(h) + self.frozen


def _with_weights(module, weights):
    clone = copy.deepcopy(module)
    missing, unexpected = clone.load_state_dict(weights, strict=False)
    assert not unexpected
    return clone


def _perturb(module, seed):
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_full_student_ema_velocity_is_the_module_with_shadow_weights():
    torch.manual_seed(0)
    net = TinyNet()
    initial = copy.deepcopy(net)
    student = FullStudent(net, EMASchedule(mode="dual", fast_decay=0.5, slow_decay=0.8))
    assert set(student.trainable_tensors()) == {n for n, p in net.named_parameters() if n != "frozen"}
    for step in range(1, 4):
        _perturb(net, step)
        student.emas.update(step, student.trainable_tensors())
    live_before = {n: t.clone() for n, t in net.state_dict().items()}

    x = torch.randn(6, 4, generator=_gen(9))
    sigma = torch.rand(6, generator=_gen(10))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    velocities = student.target_velocities()
    for velocity, shadow in (
        (student.ema_velocity(), student.emas.slow.shadow),
        (velocities.slow_ema, student.emas.slow.shadow),
        (velocities.fast_ema, student.emas.fast.shadow),
    ):
        expected = _with_weights(net, shadow)(x, sigma, y=y)
        torch.testing.assert_close(velocity(x, sigma, y=y), expected, rtol=0, atol=1e-6)
    # the averages differ from the live module and from each other (the comparison above can fail)
    live_out = net(x, sigma, y=y)
    assert not torch.allclose(student.ema_velocity()(x, sigma, y=y), live_out, atol=1e-3)
    assert not torch.allclose(velocities.fast_ema(x, sigma, y=y), velocities.slow_ema(x, sigma, y=y), atol=1e-3)
    # the teacher is the starting model, frozen
    torch.testing.assert_close(velocities.teacher(x, sigma, y=y), initial(x, sigma, y=y), rtol=0, atol=0)
    assert not any(p.requires_grad for p in velocities.teacher.parameters())
    # nothing was written into the live module
    _assert_dicts_close(net.state_dict(), live_before, rtol=0, atol=0)
    torch.testing.assert_close(net(x, sigma, y=y), live_out, rtol=0, atol=0)


def test_full_student_emas_start_at_the_model_and_track_it():
    torch.manual_seed(1)
    net = TinyNet()
    student = FullStudent(net, EMASchedule(mode="single", slow_decay=0.9), teacher=False)
    assert student.target_velocities().teacher is None
    x, sigma, y = torch.randn(3, 4), torch.rand(3), torch.tensor([0, 1, 2])
    torch.testing.assert_close(student.ema_velocity()(x, sigma, y=y), net(x, sigma, y=y), rtol=0, atol=1e-6)
    start = {n: t.detach().clone() for n, t in student.trainable_tensors().items()}
    _perturb(net, 5)
    live = {n: t.detach().clone() for n, t in student.trainable_tensors().items()}
    for step in range(1, 6):
        student.emas.update(step, student.trainable_tensors())
    _assert_dicts_close(student.emas.slow.shadow, _closed_form(start, live, 0.9, 5), rtol=1e-5, atol=1e-6)
    # checkpoint round trip of the trainable weights
    other = FullStudent(TinyNet(), EMASchedule(), teacher=False)
    other.load_state_dict(student.state_dict())
    torch.testing.assert_close(other.module(x, sigma, y=y), net(x, sigma, y=y), rtol=0, atol=0)


def test_full_student_teacher_and_emas_follow_the_module_device():
    # accelerate.prepare moves the live module after the student is built; "meta" stands in for cuda here
    net = TinyNet()
    student = FullStudent(net, EMASchedule(mode="dual"))
    early = student.target_velocities()  # made before the move: must see the moved shadows too
    net.to("meta")
    x, sigma, y = torch.randn(3, 4, device="meta"), torch.rand(3, device="meta"), torch.tensor([0, 1, 2], device="meta")
    velocities = student.target_velocities()
    for velocity in (velocities.teacher, velocities.fast_ema, velocities.slow_ema, early.slow_ema, student.ema_velocity()):
        assert velocity(x, sigma, y=y).device.type == "meta"
    student.emas.update(1, student.trainable_tensors())
    assert all(t.device.type == "meta" for ema in student.emas.averages() for t in ema.shadow.values())
