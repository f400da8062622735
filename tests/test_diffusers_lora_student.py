"""The LoRA student: adapters, EMA shadows that are adapter weights, safe adapter switching, checkpoints."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from diffusers_fixtures import tiny_cond, tiny_latents, tiny_transformer
from shortcutfm.core import EMASchedule, scfm_loss, scfm_targets, sample_jumps
from shortcutfm.models.diffusers import FLUX, SD3, LoraSettings, LoraStudent, adapter_tensors

torch.set_num_threads(1)


def make_student(family="flux", mode="dual", dtype=torch.float32, ema_init="zero", **kwargs) -> LoraStudent:
    transformer = tiny_transformer(family, dtype=dtype)
    schedule = EMASchedule(mode=mode, fast_decay=0.9, slow_decay=0.99)
    kwargs.setdefault("guidance_scale", 0.0)
    return LoraStudent(FLUX.velocity(transformer) if family == "flux" else SD3.velocity(transformer), family,
                       lora=LoraSettings(rank=4, alpha=4, ema_init=ema_init), schedule=schedule, **kwargs)


def perturb(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors.values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)


def grad_flags(module):
    return {name: p.requires_grad for name, p in module.named_parameters()}


def snapshot(tensors):
    return {name: t.detach().clone() for name, t in tensors.items()}


def inputs(family="flux"):
    return tiny_latents(family), torch.tensor([0.7, 0.2]), tiny_cond(family)


def test_only_student_lora_is_trainable_in_float32_on_a_bfloat16_base():
    student = make_student(dtype=torch.bfloat16)
    trainable = {n for n, p in student.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".student." in n for n in trainable)
    assert len(trainable) == len(student.trainable_tensors()) == 60  # every linear layer of tiny Flux
    for name, p in student.transformer.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in name else torch.bfloat16), name


def test_emas_are_the_adapter_weights_and_start_as_the_student():
    student = make_student(ema_init="student")
    keys = set(student.trainable_tensors())
    for ema, adapter in ((student.emas.fast, "ema_fast"), (student.emas.slow, "ema_slow")):
        weights = adapter_tensors(student.transformer, adapter)
        assert set(ema.shadow) == keys == set(weights)
        assert all(ema.shadow[k] is weights[k] for k in keys)  # shadows are the adapter's own tensors
        assert all(torch.equal(weights[k], student.trainable_tensors()[k]) for k in keys)
    x, sigma, cond = inputs()
    targets = student.target_velocities()
    with torch.no_grad():
        v_student = student.module(x, sigma, **cond)
    for role in (targets.teacher, targets.fast_ema, targets.slow_ema):
        assert torch.equal(role(x, sigma, **cond), v_student)  # LoRA B = 0: student == teacher == EMAs


def test_single_mode_keeps_one_ema_for_both_roles():
    student = make_student(mode="single")
    assert student.emas.fast is student.emas.slow
    assert set(student.transformer.peft_config) == {"student", "ema_slow"}
    targets = student.target_velocities()
    assert targets.fast_ema.adapter_name == targets.slow_ema.adapter_name == "ema_slow"


def test_teacher_pass_is_bit_exact_with_a_fresh_transformer():
    student = make_student()
    perturb(student.trainable_tensors(), 1)
    perturb(student.emas.slow.shadow, 2)
    x, sigma, cond = inputs()
    fresh = FLUX.velocity(tiny_transformer("flux"))
    with torch.no_grad():
        expected = fresh(x, sigma, **cond)
        assert not torch.equal(student.module(x, sigma, **cond), expected)
    assert torch.equal(student.target_velocities().teacher(x, sigma, **cond), expected)


def test_target_passes_restore_active_adapter_and_grad_flags_exactly():
    student = make_student()
    perturb(student.trainable_tensors(), 1)
    before = grad_flags(student.transformer)
    x, sigma, cond = inputs()
    with torch.no_grad():
        v_before = student.module(x, sigma, **cond)
    targets = student.target_velocities()
    for role in (targets.teacher, targets.fast_ema, targets.slow_ema, student.ema_velocity()):
        role(x, sigma, **cond)
        assert grad_flags(student.transformer) == before
    with pytest.raises(RuntimeError, match="boom"), student.adapter("ema_fast"):
        raise RuntimeError("boom")
    assert grad_flags(student.transformer) == before
    with student.adapter(None), student.adapter("ema_slow"):  # nested switches unwind in order
        pass
    assert grad_flags(student.transformer) == before
    assert student.transformer.active_adapters() == ["student"]
    with torch.no_grad():
        assert torch.equal(student.module(x, sigma, **cond), v_before)


def test_optimizer_step_leaves_emas_and_update_is_the_exact_lerp():
    student = make_student()
    perturb(student.trainable_tensors(), 1)
    slow_before, fast_before = snapshot(student.emas.slow.shadow), snapshot(student.emas.fast.shadow)
    optimizer = torch.optim.AdamW(student.trainable_tensors().values(), lr=1e-2, weight_decay=0.1)
    x, sigma, cond = inputs()
    student.module(x, sigma, **cond).pow(2).mean().backward()
    optimizer.step()
    assert all(torch.equal(student.emas.slow.shadow[k], slow_before[k]) for k in slow_before)
    assert all(torch.equal(student.emas.fast.shadow[k], fast_before[k]) for k in fast_before)
    live = student.trainable_tensors()
    student.emas.update(1, live)
    for ema, before in ((student.emas.slow, slow_before), (student.emas.fast, fast_before)):
        for k, old in before.items():
            expected = old + (1 - ema.decay) * (live[k].detach() - old)
            torch.testing.assert_close(ema.shadow[k], expected, rtol=0, atol=1e-7)
    with torch.no_grad():  # the EMA pass sees the moved adapter weights without any copy into the student
        slow = student.ema_velocity()(x, sigma, **cond)
        assert not torch.equal(slow, student.module(x, sigma, **cond))


def test_state_dict_round_trip_and_key_errors():
    student = make_student()
    perturb(student.trainable_tensors(), 3)
    state = student.state_dict()
    assert all(".student." not in k for k in state)
    other = make_student()
    other.load_state_dict(state)
    assert all(torch.equal(other.trainable_tensors()[k], v) for k, v in state.items())
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({k: v for k, v in list(state.items())[1:]})


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        student = make_student(gradient_checkpointing=checkpointing)
        perturb(student.trainable_tensors(), 4)
        x, sigma, cond = inputs()
        student.module(x, sigma, **cond).pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in student.trainable_tensors().items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)


def test_one_scfm_step_with_cfg_trains_only_the_student():
    cond = tiny_cond("sd3")
    uncond = {k: v[:1] * 0 for k, v in cond.items()}
    student = make_student("sd3", uncond=uncond, guidance_scale=3.5)
    perturb(student.trainable_tensors(), 5)
    jumps = sample_jumps(2, SD3.jump_sampling(teacher_prob=0.5), torch.Generator().manual_seed(0))
    targets = student.target_velocities()
    x0, noise = tiny_latents("sd3", seed=1), tiny_latents("sd3", seed=2)
    flags = grad_flags(student.transformer)
    batch = scfm_targets(x0, noise, jumps, targets, cond)
    assert grad_flags(student.transformer) == flags
    loss = scfm_loss(student.velocity()(batch.x, batch.sigma, **cond), batch).loss
    loss.backward()
    with_grad = {n for n, p in student.transformer.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in student.transformer.named_parameters() if ".student." in n}


def test_settings_errors_name_the_field():
    with pytest.raises(ValueError, match="lora.rank"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="lora.alpha"):
        LoraSettings(alpha=0)
    assert LoraSettings(target_modules=()).target_modules is None  # runs saved with [] meant the default
    with pytest.raises(ValueError, match="uncond"):
        LoraStudent(SD3.velocity(tiny_transformer("sd3")), "sd3")
    student = make_student()
    with pytest.raises(ValueError, match="already has adapters"):
        LoraStudent(student.module, "flux")


def test_from_pretrained_loads_a_frozen_bfloat16_base(tmp_path):
    tiny_transformer("sd3").save_pretrained(tmp_path / "transformer")
    uncond = {k: v[:1] for k, v in tiny_cond("sd3").items()}
    student = LoraStudent.from_pretrained("sd3", str(tmp_path), lora=LoraSettings(rank=2, alpha=2), uncond=uncond,
                                          schedule=EMASchedule(mode="single"))
    assert student.module.base_dtype == torch.bfloat16 and student.transformer.is_gradient_checkpointing
    x, sigma, cond = inputs("sd3")
    loss = student.velocity()(x, sigma, **cond).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in student.trainable_tensors().values())


def test_fast_and_slow_ema_roles_use_their_own_adapter_weights():
    """Each target role evaluates the EMA of its decay: loading that EMA's averages into the student adapter
    gives the same velocity (catches the two adapters swapped in the student or in the EMA bookkeeping)."""
    student = make_student()  # fast decay 0.9, slow 0.99
    assert (student.emas.fast.decay, student.emas.slow.decay) == (0.9, 0.99)
    for step in range(1, 4):  # the averages drift apart from the moving student
        perturb(student.trainable_tensors(), step)
        student.emas.update(step, student.trainable_tensors())
    x, sigma, cond = inputs()
    targets = student.target_velocities()
    fast, slow = targets.fast_ema(x, sigma, **cond), targets.slow_ema(x, sigma, **cond)
    assert not torch.equal(fast, slow)
    for ema, got in ((student.emas.fast, fast), (student.emas.slow, slow)):
        averages = snapshot(ema.shadow)
        perturb(student.trainable_tensors(), 99)
        with torch.no_grad():
            for name, tensor in student.trainable_tensors().items():
                tensor.copy_(averages[name])
            torch.testing.assert_close(student.module(x, sigma, **cond), got, rtol=0, atol=0)


def test_adapter_switch_restores_grad_flags_peft_would_not():
    """peft's set_adapter makes the active adapter trainable; use_adapter must instead restore exactly what was
    there: a frozen student stays frozen, and a base weight the user made trainable stays trainable."""
    student = make_student()
    for tensor in student.trainable_tensors().values():
        tensor.requires_grad_(False)
    norm_weight = next(p for n, p in student.transformer.named_parameters() if n.endswith("attn.norm_q.weight"))
    norm_weight.requires_grad_(True)
    before = grad_flags(student.transformer)
    x, sigma, cond = inputs()
    targets = student.target_velocities()
    for role in (targets.teacher, targets.fast_ema, targets.slow_ema):
        role(x, sigma, **cond)
        assert grad_flags(student.transformer) == before


def test_every_velocity_the_student_hands_out_is_guided():
    """Guidance is the student's: its own prediction, the teacher, both EMAs and the evaluation EMA are all
    ``v_c + w (v_c - v_u)`` of the plain passes, so no caller can forget to wrap them."""
    cond = tiny_cond("sd3")
    uncond = {k: v[:1] * 0 + 0.3 for k, v in cond.items()}
    w = 2.5
    student = make_student("sd3", uncond=uncond, guidance_scale=w)
    perturb(student.trainable_tensors(), 6)
    for ema in student.emas.averages():
        perturb(ema.shadow, 7 + len(ema.shadow))
    x, sigma = tiny_latents("sd3"), torch.tensor([0.7, 0.2])
    empty = {k: v.expand_as(cond[k]) for k, v in uncond.items()}
    targets = student.target_velocities()
    handed_out = {None: targets.teacher, "student": student.velocity(), "ema_fast": targets.fast_ema,
                  "ema_slow": targets.slow_ema}
    for adapter, velocity in handed_out.items():
        with torch.no_grad(), student.adapter(adapter):
            v_cond, v_uncond = student.module(x, sigma, **cond), student.module(x, sigma, **empty)
        with torch.no_grad():
            torch.testing.assert_close(velocity(x, sigma, **cond), v_cond + w * (v_cond - v_uncond), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(student.ema_velocity()(x, sigma, **cond), targets.slow_ema(x, sigma, **cond))


def test_the_authors_initialisations():
    """lora.init=gaussian draws A from N(0, 1/r) (peft's "gaussian"); lora.ema_init=zero starts both EMA adapters
    at A = B = 0; both students start as the teacher because B is 0."""
    transformer = tiny_transformer("sd3")
    student = LoraStudent(SD3.velocity(transformer), "sd3", lora=LoraSettings(rank=4, alpha=4, init="gaussian",
                                                                            ema_init="zero"), guidance_scale=0.0)
    a_matrices = torch.cat([t.flatten() for k, t in student.trainable_tensors().items() if "lora_A" in k])
    assert abs(a_matrices.std().item() - 1 / 4) < 0.03  # kaiming-uniform A would have std ~ 1/sqrt(3 * fan_in)
    assert all(t.abs().sum() == 0 for k, t in student.trainable_tensors().items() if "lora_B" in k)
    for ema in student.emas.averages():
        assert all(t.abs().sum() == 0 for t in ema.shadow.values())
    x, sigma, cond = tiny_latents("sd3"), torch.tensor([0.7, 0.2]), tiny_cond("sd3")
    targets = student.target_velocities()
    with torch.no_grad():
        torch.testing.assert_close(student.velocity()(x, sigma, **cond), targets.teacher(x, sigma, **cond))
        torch.testing.assert_close(targets.slow_ema(x, sigma, **cond), targets.teacher(x, sigma, **cond))
    with pytest.raises(ValueError, match="lora.init"):
        LoraSettings(init="orthogonal")


def test_folded_guidance_guides_the_teacher_only():
    """model.fold_guidance: the targets come from the guided teacher, but the student's own prediction and its EMAs
    are plain conditional passes (one pass per step when sampling)."""
    cond = tiny_cond("sd3")
    uncond = {k: v[:1] * 0 + 0.3 for k, v in cond.items()}
    w = 2.0
    student = make_student("sd3", uncond=uncond, guidance_scale=w, fold_guidance=True)
    perturb(student.trainable_tensors(), 6)
    for ema in student.emas.averages():
        perturb(ema.shadow, 9 + len(ema.shadow))
    x, sigma = tiny_latents("sd3"), torch.tensor([0.7, 0.2])
    empty = {k: v.expand_as(cond[k]) for k, v in uncond.items()}
    targets = student.target_velocities()
    with torch.no_grad():
        with student.adapter(None):
            t_cond, t_uncond = student.module(x, sigma, **cond), student.module(x, sigma, **empty)
        torch.testing.assert_close(targets.teacher(x, sigma, **cond), t_cond + w * (t_cond - t_uncond), atol=1e-5, rtol=1e-4)
        for adapter, velocity in (("student", student.velocity()), ("ema_slow", targets.slow_ema),
                                  ("ema_fast", targets.fast_ema), ("ema_slow", student.ema_velocity())):
            with student.adapter(adapter):
                plain = student.module(x, sigma, **cond)
            torch.testing.assert_close(velocity(x, sigma, **cond), plain)
    # the slow EMA starts unguided: teacher-taught targets take the whole jump with the guided teacher
    assert targets.teacher_whole_jump and not make_student("sd3", uncond=uncond, guidance_scale=w).target_velocities().teacher_whole_jump
