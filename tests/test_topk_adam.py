"""AdamW under top-k (``--topk-adam``): the optimizers and the options.

The compressor's side (preconditioning, first moment, dense steps) is in ``test_compress.py``,
bit-exact resume of the default and ``frozen`` in ``test_checkpoint_resume.py``.
Run: ``pytest tests/test_topk_adam.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mpilm import config, optim
from mpilm.errors import UsageError



def two_layers(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def gradients(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
    model.zero_grad(set_to_none=False)
    torch.nn.functional.mse_loss(model(x), y).backward()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_topk_adam_names_match_optim():
    assert config.TOPK_ADAM == optim.TOPK_ADAM
    for name in optim.TOPK_ADAM:
        plan = optim.topk_adam_compressor(name, 3, 7)  # every name has a compressor plan
        # the density warm-up: DGC's (--topk-warmup-steps) for plain and frozen, the variant's own otherwise
        assert plan["warmup_steps"] == (7 if name in ("plain", "frozen") else 3)
    assert optim.topk_adam_compressor("frozen", 3, 7)["dense_steps"] == 3
    with pytest.raises(ValueError):
        optim.topk_adam_compressor("sometimes")


def test_frozen_variance_equals_adamw_before_the_freeze_bit_for_bit_then_freezes_v():
    freeze = 4
    reference, frozen = two_layers(), two_layers()
    adamw = optim.build(reference.parameters(), "adamw", 1e-2, 0.1)
    variant = optim.build(frozen.parameters(), "adamw", 1e-2, 0.1, topk_adam="frozen", freeze_step=freeze)
    assert isinstance(variant, optim.FrozenVarianceAdamW) and type(adamw) is torch.optim.AdamW
    for step in range(freeze):
        assert not variant.frozen and optim.clip_limit(variant, 1.0) == 1.0
        for model, opt in ((reference, adamw), (frozen, variant)):
            gradients(model, step)
            opt.step()
        for a, b in zip(params_of(reference), params_of(frozen)):
            assert torch.equal(a, b)
    assert variant.frozen and optim.clip_limit(variant, 1.0) == 0.0  # no clip of the sparse, error-fed sum
    v_at_freeze = [variant.state[p]["exp_avg_sq"].clone() for p in frozen.parameters()]
    m = [variant.state[p]["exp_avg"].clone() for p in frozen.parameters()]
    before = params_of(frozen)
    gradients(frozen, freeze)
    variant.step()
    beta1, beta2 = optim.ADAMW_BETAS
    step = freeze + 1
    for group in variant.param_groups:
        for p in group["params"]:
            i = next(j for j, q in enumerate(frozen.parameters()) if q is p)
            assert torch.equal(variant.state[p]["exp_avg_sq"], v_at_freeze[i])  # frozen
            m_new = m[i].lerp(p.grad, 1 - beta1)
            denom = v_at_freeze[i].sqrt() / math.sqrt(1 - beta2 ** freeze) + optim.ADAMW_EPS
            expected = before[i] * (1 - 1e-2 * group["weight_decay"]) - 1e-2 / (1 - beta1 ** step) * m_new / denom
            assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="freeze_step"):
        optim.FrozenVarianceAdamW(two_layers().parameters(), 0, lr=1e-3)


def test_preconditioned_adamw_keeps_the_first_moment_and_decoupled_decay_only():
    model = two_layers()
    opt = optim.build(model.parameters(), "adamw", 1e-2, 0.1, topk_adam="precondition")
    assert isinstance(opt, optim.PreconditionedAdamW) and optim.clip_limit(opt, 1.0) == 0.0
    beta1 = optim.ADAMW_BETAS[0]
    moments = [torch.zeros_like(p) for p in model.parameters()]
    for step in range(1, 4):
        before = params_of(model)
        gradients(model, step)
        opt.step()
        for i, (group, p) in enumerate((g, p) for g in opt.param_groups for p in g["params"]):
            j = next(j for j, q in enumerate(model.parameters()) if q is p)
            moments[j] = moments[j].lerp(p.grad, 1 - beta1)
            expected = before[j] * (1 - 1e-2 * group["weight_decay"]) - 1e-2 / (1 - beta1 ** step) * moments[j]
            assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=1e-9)
    # the first moment already taken in the compressor: the update is the gradient itself
    plain = two_layers()
    momentless = optim.build(plain.parameters(), "adamw", 1e-2, 0.0, topk_adam="precondition-momentum")
    before = params_of(plain)
    gradients(plain, 0)
    momentless.step()
    for b, p in zip(before, plain.parameters()):
        assert torch.equal(p.detach(), b.add(p.grad, alpha=-1e-2))
    assert all("exp_avg" not in s for s in momentless.state.values())


@pytest.mark.parametrize("variant", ["frozen", "precondition"])
def test_optimizer_state_round_trips_through_state_dict_bit_exactly(variant):
    straight, resumed = two_layers(), two_layers()
    options = dict(topk_adam=variant, freeze_step=2)
    opt = optim.build(straight.parameters(), "adamw", 1e-2, 0.1, **options)
    for step in range(3):  # past the freeze
        gradients(straight, step)
        opt.step()
    resumed.load_state_dict(straight.state_dict())
    again = optim.build(resumed.parameters(), "adamw", 1e-2, 0.1, **options)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint holds it: a copy
    for step in range(3, 6):
        for model, o in ((straight, opt), (resumed, again)):
            gradients(model, step)
            o.step()
    for a, b in zip(params_of(straight), params_of(resumed)):
        assert torch.equal(a, b)


def test_topk_adam_options_are_checked():
    assert config.parse(["--compress", "topk"]).topk_adam_in_effect == config.TrainConfig.topk_adam
    assert config.parse(["--compress", "topk", "--optimizer", "sgd"]).topk_adam_in_effect == "plain"
    assert config.parse(["--compress", "fp16"]).topk_adam_in_effect == "plain"
    assert config.parse(["--compress", "topk", "--sync", "diloco"]).topk_adam_in_effect == "plain"
    for argv, message in (
            (["--topk-adam", "frozen"], "applies only with --compress topk and --optimizer adamw"),
            (["--compress", "topk", "--optimizer", "sgd", "--topk-adam", "plain"], "--optimizer adamw"),
            (["--compress", "topk", "--topk-adam", "plain", "--topk-adam-warmup", "5"], "applies only to"),
            (["--compress", "topk", "--topk-warmup-steps", "5"], "warm-up is --topk-adam-warmup"),
            (["--compress", "topk", "--topk-adam", "frozen", "--topk-adam-warmup", "0"], "needs --topk-adam-warmup >= 1"),
            (["--compress", "topk", "--topk-adam", "frozen", "--topk-adam-warmup", "300"], "must be below --steps"),
            (["--compress", "topk", "--topk-adam", "precondition-momentum", "--no-error-feedback"],
             "needs --error-feedback"),
            (["--compress", "topk", "--topk-adam", "frozen", "--sync", "diloco"], "applies only with --sync sync"),
            (["--compress", "topk", "--topk-adam", "sometimes"], "expected one of")):
        with pytest.raises(UsageError, match=message):
            config.parse(argv)
