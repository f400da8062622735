"""Euler and Heun samplers against exact solutions, and the classifier-free guidance wrapper."""

import pytest
import torch

from gaussian_flow import GaussianFlow
from shortcutfm.core.grids import sigma_grid
from shortcutfm.core.guidance import ClassifierFreeGuidance, null_label_uncond
from shortcutfm.core.samplers import euler_sample, heun_sample, sample

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Counting:
    """Wraps a velocity function and records the sigmas (and conditioning) of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, sigma, **cond):
        self.calls.append((sigma.clone(), dict(cond)))
        return self.fn(x, sigma, **cond)


def _random_grid(n, seed, end=0.0):
    inner = torch.rand(n - 1, generator=_gen(seed), dtype=F64) * (0.99 - end) + end
    return torch.cat([torch.tensor([0.99], dtype=F64), inner.sort(descending=True).values, torch.tensor([end], dtype=F64)])


GRIDS = {
    "uniform8": lambda: sigma_grid(8, dtype=F64),
    "shifted5": lambda: sigma_grid(5, 3.0, dtype=F64),
    "one-step": lambda: sigma_grid(1, dtype=F64),
    "random13": lambda: _random_grid(13, 3),
}


@pytest.mark.parametrize("grid_name", GRIDS)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_constant_field_is_exact(grid_name, method):
    grid = GRIDS[grid_name]()
    c = torch.tensor([[0.5, -2.0, 3.0]], dtype=F64)
    model = Counting(lambda x, sigma: c.expand_as(x))
    noise = torch.randn(4, 3, generator=_gen(1), dtype=F64)
    out = sample(model, noise, grid, method=method)
    torch.testing.assert_close(out.x, noise - c * (grid[0] - grid[-1]), rtol=0, atol=1e-12)
    steps = grid.numel() - 1
    assert out.nfe == len(model.calls) == (steps if method == "euler" else 2 * steps - 1)


def test_nfe_and_evaluation_points():
    grid = sigma_grid(6, 2.0, dtype=F64)
    model = Counting(lambda x, sigma: torch.zeros_like(x))
    noise = torch.zeros(2, 1, dtype=F64)
    assert euler_sample(model, noise, grid).nfe == 6
    torch.testing.assert_close(torch.stack([c[0][0] for c in model.calls]), grid[:-1], rtol=0, atol=0)
    model.calls.clear()
    assert heun_sample(model, noise, grid).nfe == 11
    # Heun evaluates at sigma_k and sigma_{k+1}, except that it never evaluates sigma = 0
    expected = [grid[0]] + [g for g in grid[1:-1] for _ in range(2)]
    torch.testing.assert_close(torch.stack([c[0][0] for c in model.calls]), torch.stack(expected), rtol=0, atol=0)
    assert all(c[0].shape == (2,) for c in model.calls)
    model.calls.clear()
    assert heun_sample(model, noise, torch.tensor([0.9, 0.5, 0.2], dtype=F64)).nfe == 4  # ends above 0


def test_heun_exact_for_fields_linear_in_sigma():
    alpha, beta = 0.7, -3.0

    def linear(x, sigma):
        return (alpha + beta * sigma).unsqueeze(1).expand_as(x)

    def exact(x, s_from, s_to):  # x(s_to) = x(s_from) + int_{s_from}^{s_to} v ds
        return x + alpha * (s_to - s_from) + beta * (s_to**2 - s_from**2) / 2

    noise = torch.randn(5, 2, generator=_gen(2), dtype=F64)
    grid = _random_grid(7, 4, end=0.1)
    heun = heun_sample(linear, noise, grid).x
    euler = euler_sample(linear, noise, grid).x
    target = exact(noise, grid[0].item(), grid[-1].item())
    torch.testing.assert_close(heun, target, rtol=0, atol=1e-12)
    assert (euler - target).abs().min() > 1e-2
    # ending at 0, the last step is a plain Euler step from the exact state at grid[-2]
    grid = sigma_grid(4, dtype=F64)
    before_last = exact(noise, grid[0].item(), grid[-2].item())
    last = grid[-2].item()
    torch.testing.assert_close(
        heun_sample(linear, noise, grid).x, before_last - last * (alpha + beta * last), rtol=0, atol=1e-12
    )


def test_gaussian_flow_sampling_converges_to_the_flow_map():
    flow = GaussianFlow(torch.tensor([1.5, -2.0, 0.5]), torch.tensor([0.5, 1.0, 2.0]))
    noise = torch.randn(512, 3, generator=_gen(5), dtype=F64)

    def error(method, steps):
        grid = sigma_grid(steps, dtype=F64)
        exact = flow.flow(noise, grid[0].item(), 0.0)
        return (sample(flow.velocity, noise, grid, method=method).x - exact).abs().mean().item()

    euler = {n: error("euler", n) for n in (16, 32, 64)}
    heun = {n: error("heun", n) for n in (8, 16, 32)}
    assert euler[64] < 0.05
    assert 1.8 < euler[16] / euler[32] < 2.2 and 1.8 < euler[32] / euler[64] < 2.2  # first order
    assert 3.3 < heun[8] / heun[16] < 4.8 and 3.3 < heun[16] / heun[32] < 4.8  # second order
    assert heun[16] < euler[64] / 5  # fewer evaluations, smaller error
    # the samples have the data's moments
    data = euler_sample(flow.velocity, torch.randn(20_000, 3, generator=_gen(6), dtype=F64), sigma_grid(64, dtype=F64)).x
    torch.testing.assert_close(data.mean(0), flow.mu, atol=0.05, rtol=0)
    torch.testing.assert_close(data.std(0), flow.std, atol=0.03, rtol=0.05)  # Euler shrinks a little


def test_conditioning_reaches_the_model_and_float32_works():
    seen = []

    def model(x, sigma, *, y):
        seen.append(y)
        assert sigma.dtype == x.dtype == torch.float32 and sigma.shape == (x.shape[0],)
        return y.float().unsqueeze(1).expand_as(x)

    y = torch.tensor([1, 2, 3])
    out = euler_sample(model, torch.zeros(3, 2), sigma_grid(4, 3.0), y=y)
    assert all(s is y for s in seen) and out.x.dtype == torch.float32
    torch.testing.assert_close(out.x, -(1 - 1e-5) * y.float().unsqueeze(1).expand(3, 2))


@pytest.mark.parametrize(
    "grid", [[1.0, 0.5, 0.5, 0.0], [0.0, 0.5, 1.0], [0.9, 0.95, 0.0], [0.5]], ids=["flat", "increasing", "bump", "short"]
)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_bad_grid_raises(grid, method):
    with pytest.raises(ValueError, match="grid"):
        sample(lambda x, sigma: x, torch.zeros(1, 1), torch.tensor(grid), method=method)


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match="ddim"):
        sample(lambda x, sigma: x, torch.zeros(1, 1), sigma_grid(2), method="ddim")


# ---------------------------------------------------------------------------------------------------------
# classifier-free guidance


class FakeConditional:
    """v = x * 0 + (10 if the label is real else -4) + sigma; records the batch size of each call."""

    NULL = 9

    def __init__(self):
        self.batch_sizes, self.labels = [], []

    def __call__(self, x, sigma, *, y, text):
        self.batch_sizes.append(x.shape[0])
        self.labels.append(y.clone())
        real = (y != self.NULL).to(x.dtype).unsqueeze(1)
        return x * 0 + real * 10.0 + (1 - real) * -4.0 + sigma.unsqueeze(1) + text


def _inputs():
    x = torch.randn(3, 2, generator=_gen(7), dtype=F64)
    sigma = torch.tensor([0.9, 0.5, 0.1], dtype=F64)
    cond = {"y": torch.tensor([0, 1, 2]), "text": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=F64)}
    return x, sigma, cond


def _uncond(cond):
    out = null_label_uncond(FakeConditional.NULL)(cond)
    out["text"] = torch.zeros_like(cond["text"])  # the "empty prompt"
    return out


def test_cfg_scale_zero_is_conditional_with_one_call():
    model = FakeConditional()
    x, sigma, cond = _inputs()
    out = ClassifierFreeGuidance(model, 0.0, _uncond)(x, sigma, **cond)
    torch.testing.assert_close(out, 10.0 + sigma.unsqueeze(1) + cond["text"])
    assert model.batch_sizes == [3]


@pytest.mark.parametrize("scale", [1.0, 3.5, 7.0])
def test_cfg_formula_in_one_batched_call(scale):
    model = FakeConditional()
    x, sigma, cond = _inputs()
    out = ClassifierFreeGuidance(model, scale, _uncond)(x, sigma, **cond)
    v_cond = 10.0 + sigma.unsqueeze(1) + cond["text"]
    v_uncond = -4.0 + sigma.unsqueeze(1)
    torch.testing.assert_close(out, v_cond + scale * (v_cond - v_uncond), rtol=0, atol=1e-12)
    assert model.batch_sizes == [6]
    assert model.labels[0].tolist() == [0, 1, 2, 9, 9, 9]
    assert cond["y"].tolist() == [0, 1, 2]  # the caller's conditioning is not modified


def test_cfg_rejects_uncond_with_other_keys():
    x, sigma, cond = _inputs()
    guided = ClassifierFreeGuidance(FakeConditional(), 2.0, null_label_uncond(9))
    guided(x, sigma, **cond)  # same keys: fine
    bad = ClassifierFreeGuidance(FakeConditional(), 2.0, lambda c: {"y": c["y"]})
    with pytest.raises(ValueError, match="uncond_fn"):
        bad(x, sigma, **cond)
