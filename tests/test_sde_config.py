"""SDEs save their own configuration (``to_config``) and ``sdediff.sdes.sde_from_config`` rebuilds them: exactly the
same kernel, drift and diffusion for every built-in class, a learned schedule's trained state restored on top, and
clear errors for what cannot be rebuilt."""

import json
import math

import pytest
import torch

import sdediff
from sdediff.interop.diffusers import DiscreteVPSDE
from sdediff.sdes import register_sde, registered_sdes, sde_from_config

FACTORIES = {
    "VPSDE": lambda: sdediff.VPSDE(beta_min=0.2, beta_max=12.0, T=2.0),
    "SubVPSDE": lambda: sdediff.SubVPSDE(beta_min=0.05, beta_max=15.0),
    "VESDE": lambda: sdediff.VESDE(sigma_min=0.02, sigma_max=30.0, T=1.5),
    "LearnedScheduleSDE": lambda: sdediff.LearnedScheduleSDE(gamma_min=-10.0, gamma_max=4.0, num_features=5),
    "DiscreteVPSDE": lambda: DiscreteVPSDE(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50, dtype=torch.float64), 0)),
}


def same_process(a, b) -> None:
    t = torch.linspace(0.0, a.T, 33, dtype=torch.float64)
    x = torch.randn(33, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        for name in ("mean_coeff", "marginal_std", "diffusion"):
            assert torch.equal(getattr(a, name)(t), getattr(b, name)(t)), name
        assert torch.equal(a.drift(x, t), b.drift(x, t))
    assert a.T == b.T and type(a) is type(b)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_round_trip_through_json(name):
    sde = FACTORIES[name]()
    config = sde.to_config()
    assert config["class"] == name and set(config) == {"class", "params"}
    text = json.dumps(config, allow_nan=False)  # plain JSON values only
    rebuilt = sde_from_config(json.loads(text))
    assert rebuilt.to_config() == config
    same_process(sde, rebuilt)
    assert name in registered_sdes()


def test_configs_hold_the_constructor_arguments():
    assert sdediff.VPSDE(0.2, 12.0, T=2.0).to_config()["params"] == {"beta_min": 0.2, "beta_max": 12.0, "T": 2.0}
    assert sdediff.VESDE(0.02, 30.0).to_config()["params"] == {"sigma_min": 0.02, "sigma_max": 30.0, "T": 1.0}
    learned = sdediff.LearnedScheduleSDE(num_features=3)
    assert learned.to_config() == {"class": "LearnedScheduleSDE", "params": learned.config}
    assert learned.config == {"gamma_min": -13.3, "gamma_max": 5.0, "num_features": 3, "T": 1.0}
    alphas = FACTORIES["DiscreteVPSDE"]().alphas_cumprod
    params = DiscreteVPSDE(alphas).to_config()["params"]
    assert isinstance(params["alphas_cumprod"], list) and torch.equal(torch.tensor(params["alphas_cumprod"],
                                                                                   dtype=torch.float64), alphas)


def test_learned_schedule_state_restores_on_top_of_its_config():
    """The configuration rebuilds the module; its trained parameters come back with load_state_dict."""
    sde = sdediff.LearnedScheduleSDE(num_features=4)
    with torch.no_grad():
        for p in sde.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rebuilt = sde_from_config(sde.to_config())
    t = torch.linspace(0, 1, 11)
    assert not torch.equal(rebuilt.gamma(t), sde.gamma(t))  # the configuration alone is the initial schedule
    rebuilt.load_state_dict(sde.state_dict())
    same_process(sde, rebuilt)


def test_trainer_checkpoints_describe_the_sde_by_its_config(tmp_path):
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    cfg = sdediff.TrainConfig(steps=1, batch_size=8, progress=False, device="cpu")
    for sde in (sdediff.SubVPSDE(beta_max=10.0), sdediff.VESDE(sigma_max=5.0)):
        _, meta = sdediff.Trainer(sdediff.MLP(2, hidden=8, depth=1), sde, data, config=cfg).state()
        assert meta["sde"] == {**sde.to_config(), "repr": repr(sde)}
        assert sde_from_config(meta["sde"]).to_config() == sde.to_config()  # extra keys ("repr") are ignored
    custom = sdediff.LinearSDE(drift_coef=lambda t: -0.5 * torch.ones_like(t), diffusion=torch.ones_like)
    with pytest.raises(NotImplementedError, match="does not define to_config"):
        custom.to_config()
    _, meta = sdediff.Trainer(sdediff.MLP(2, hidden=8, depth=1), custom, data, config=cfg).state()
    assert meta["sde"]["class"] == "LinearSDE" and meta["sde"]["params"] is None
    with pytest.raises(ValueError, match="unknown SDE class 'LinearSDE'"):
        sde_from_config(meta["sde"])


@pytest.mark.parametrize("config, message", [
    ({"class": "NoSuchSDE", "params": {}}, "unknown SDE class 'NoSuchSDE'; known: .*VPSDE"),
    ({"class": "VPSDE", "params": {"beta_min": 5.0, "beta_max": 1.0, "T": 1.0}}, "cannot rebuild VPSDE .*beta_max"),
    ({"class": "VESDE", "params": {"sigma": 1.0}}, "cannot rebuild VESDE .*sigma"),
    ({"class": "VPSDE", "params": None}, "has no parameters"),
    ({"params": {}}, "needs a 'class' name"),
    (["VPSDE"], "must be a mapping"),
])
def test_bad_configs_raise_clear_errors(config, message):
    with pytest.raises(ValueError, match=message):
        sde_from_config(config)


def test_custom_sdes_register_their_class():
    class Shifted(sdediff.VPSDE):
        def __init__(self, shift: float = 0.5):
            super().__init__(beta_min=0.1 + shift, beta_max=20.0)
            self.shift = shift

        def to_config(self):
            return {"class": type(self).__name__, "params": {"shift": self.shift}}

    with pytest.raises(ValueError, match="unknown SDE class 'Shifted'"):
        sde_from_config(Shifted(0.25).to_config())
    assert register_sde(Shifted) is Shifted and register_sde(Shifted) is Shifted  # registering again is harmless
    rebuilt = sde_from_config(Shifted(0.25).to_config())
    assert isinstance(rebuilt, Shifted) and math.isclose(rebuilt.beta_min, 0.35)
    impostor = type("VPSDE", (sdediff.VPSDE,), {})  # another class under a built-in's name
    with pytest.raises(ValueError, match="already registered"):
        register_sde(impostor)
    with pytest.raises(TypeError, match="SDE subclass"):
        register_sde(dict)
    assert type(sde_from_config(sdediff.VPSDE().to_config())) is sdediff.VPSDE
