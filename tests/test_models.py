"""The time-conditioned MLP and UNet: shapes, zero-initialised output, conditioning, embeddings, errors."""

import math

import pytest
import torch
from problems import gen

import sdediff
from sdediff.score import ScoreModel
from sdediff.training import MLP, FourierEmbedding, SinusoidalEmbedding, UNet, dsm_loss


def perturb(model, seed=0, scale=0.05):
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("shape", [(5, 2), (5, 2, 3), (5, 1, 4, 4)])
def test_mlp_maps_any_shape_to_itself_and_starts_at_zero(shape):
    dim = math.prod(shape[1:])
    net = MLP(dim, hidden=32, depth=2)
    x = torch.randn(shape, generator=gen(0))
    out = net(x, torch.rand(5, generator=gen(1)))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    assert net(x, 0.5).shape == x.shape  # a scalar time is broadcast
    perturb(net)
    assert net(x, 0.5).abs().sum() > 0


@pytest.mark.parametrize("kwargs,size", [({"channel_mults": (1, 2)}, 8), ({"channel_mults": (1, 2, 2), "num_res_blocks": 2}, 32),
                                         ({"in_channels": 3, "base_channels": 16, "channel_mults": (1, 2, 2, 2)}, 32)])
def test_unet_shapes_and_zero_output(kwargs, size):
    net = UNet(**kwargs)
    c = kwargs.get("in_channels", 1)
    x = torch.randn(2, c, size, size, generator=gen(2))
    out = net(x, torch.rand(2, generator=gen(3)))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    perturb(net)
    assert net(x, 0.3).abs().sum() > 0


def test_networks_depend_on_time_and_train():
    sde = sdediff.VPSDE()
    for net, x in ((MLP(3, hidden=32, depth=2), torch.randn(64, 3, generator=gen(4))),
                   (UNet(base_channels=8), torch.randn(8, 1, 8, 8, generator=gen(5)))):
        perturb(net)
        a, b = net(x, torch.full((len(x),), 0.1)), net(x, torch.full((len(x),), 0.9))
        assert not torch.allclose(a, b)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        losses = []
        for i in range(30):
            loss = dsm_loss(sde, net, x, generator=gen(100 + i % 2))
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]


def test_class_conditioning_with_null_token():
    net = perturb(MLP(2, hidden=16, depth=1, num_classes=3))
    assert net.num_classes == 3 and net.null_class == 3
    assert net.cond.classes.num_embeddings == 4
    x, t = torch.randn(4, 2, generator=gen(6)), torch.rand(4, generator=gen(7))
    unconditional = net(x, t)
    torch.testing.assert_close(unconditional, net(x, t, torch.full((4,), 3)))  # y=None means the null token
    assert not torch.allclose(net(x, t, torch.zeros(4, dtype=torch.long)), net(x, t, torch.ones(4, dtype=torch.long)))
    unet = perturb(UNet(base_channels=8, num_classes=10))
    xi = torch.randn(2, 1, 8, 8, generator=gen(8))
    torch.testing.assert_close(unet(xi, 0.5), unet(xi, 0.5, torch.tensor([10, 10])))
    with pytest.raises(ValueError, match="y must"):
        net(x, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        MLP(2)(x, t, torch.zeros(4, dtype=torch.long))


def test_time_embeddings():
    t = torch.tensor([0.0, 0.25, 1.0])
    e = SinusoidalEmbedding(8)(t)
    assert e.shape == (3, 8)
    torch.testing.assert_close(e[0], torch.cat([torch.zeros(4), torch.ones(4)]))
    torch.testing.assert_close(e[1, 0], torch.sin(torch.tensor(250.0)))
    torch.manual_seed(1)
    f1 = FourierEmbedding(16)
    torch.manual_seed(2)
    f2 = FourierEmbedding(16)
    assert torch.equal(f1.w, f2.w)  # fixed by its own seed, not the global RNG
    torch.testing.assert_close(f1(t).pow(2).reshape(3, 2, 8).sum(1), torch.ones(3, 8))  # sin^2 + cos^2
    with pytest.raises(ValueError, match="even"):
        SinusoidalEmbedding(7)


def test_models_drive_the_samplers_in_float64():
    sde = sdediff.VPSDE()
    net = perturb(UNet(base_channels=8)).double()
    score = ScoreModel(net, sde, prediction="eps")
    x = sdediff.sample(sde, score, (3, 1, 8, 8), solver="heun", steps=4, generator=gen(9), dtype=torch.float64)
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float64 and torch.isfinite(x).all()
    mlp = perturb(MLP(2, hidden=16, depth=1, time_embed="sinusoidal"))
    y = sdediff.sample(sde, ScoreModel(mlp, sde, prediction="v"), (4, 2), solver="euler_maruyama", steps=5,
                       generator=gen(10))
    assert y.shape == (4, 2) and torch.isfinite(y).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="time_embed"):
        MLP(2, time_embed="learned")
    with pytest.raises(ValueError, match="dim"):
        MLP(0)
    with pytest.raises(ValueError, match="elements per sample"):
        MLP(3)(torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError, match="channel_mults"):
        UNet(channel_mults=())
    with pytest.raises(ValueError, match="divisible"):
        UNet(channel_mults=(1, 2, 2))(torch.zeros(1, 1, 6, 6), 0.5)
    with pytest.raises(ValueError, match=r"\(batch, 1, H, W\)"):
        UNet()(torch.zeros(1, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.0)
