import pytest
import torch

from movq.config import DiscriminatorConfig, LossConfig
from movq.models.discriminator import PatchDiscriminator
from movq.training.losses import TokenizerLoss, adaptive_weight, hinge_d_loss


def test_adaptive_weight_formula_on_toy_case():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    rec = (3.0 * w).sum()  # ∇ = 3 everywhere: norm 6
    g = (w * w).sum()  # ∇ = 2w: norm 2·√30
    got = adaptive_weight(rec, g, w, eps=1e-4)
    torch.testing.assert_close(got, torch.tensor(6.0 / (2 * 30 ** 0.5 + 1e-4)))
    assert not got.requires_grad
    assert adaptive_weight(rec, g * 1e-9, w, max_value=10.0) == 10.0  # clamped


def test_hinge():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # relu(1 − real) = [0, 1] → 0.5; relu(1 + fake) = [0, 1.5] → 0.75
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.5 + 0.75)))


def _setup(disc_start):
    torch.manual_seed(0)
    cfg = LossConfig(perceptual_weight=0.0, disc_start=disc_start, disc_weight=0.5, l2_weight=1.0)
    loss = TokenizerLoss(cfg)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    feat = torch.randn(2, 4, 8, 8)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, n_layers=1))
    return loss, last, feat, x, disc


def test_generator_gating_and_terms():
    loss, last, feat, x, disc = _setup(disc_start=10)
    x_rec = last(feat)
    q = torch.tensor(0.3)
    before, logs = loss.generator_loss(x, x_rec, q, step=9)
    expected = (x - x_rec).abs().mean() + (x - x_rec).pow(2).mean() + q
    torch.testing.assert_close(before, expected)
    assert "g_loss" not in logs
    with pytest.raises(ValueError, match="logits_fake"):
        loss.generator_loss(x, x_rec, q, step=10)
    logits = disc(x_rec)
    with pytest.raises(ValueError, match="last_layer"):  # training without it would drop the GAN term
        loss.generator_loss(x, x_rec, q, step=10, logits_fake=logits)
    with torch.no_grad():  # evaluation: no graph, the GAN term is logged with weight 0
        _, logs = loss.generator_loss(x, x_rec, q, step=10, logits_fake=disc(x_rec))
    assert logs["d_weight"] == 0 and logs["g_loss"] == -disc(x_rec).mean()
    after, logs = loss.generator_loss(x, x_rec, q, step=10, logits_fake=logits, last_layer=last.weight)
    d_w = adaptive_weight(expected, -logits.mean(), last.weight) * 0.5
    torch.testing.assert_close(after, expected + d_w * -logits.mean())
    torch.testing.assert_close(logs["d_weight"], d_w)


def test_discriminator_gating():
    loss, last, feat, x, disc = _setup(disc_start=5)
    real, fake = disc(x), disc(last(feat).detach())
    assert not loss.gan_active(4) and loss.gan_active(5)  # D and the GAN term start at disc_start
    on, logs = loss.discriminator_loss(real, fake)
    assert logs["d_loss"] > 0
    torch.testing.assert_close(on, hinge_d_loss(real, fake))
    on.backward()
    assert disc.main[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", ["batch", "spectral", "none"])
def test_patch_discriminator_shapes(norm):
    d = PatchDiscriminator(DiscriminatorConfig(base_channels=8, n_layers=3, norm=norm))
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError):
        PatchDiscriminator(DiscriminatorConfig(n_layers=0))


def test_perceptual_term_loads_lpips_from_config_paths(tmp_path):
    from test_lpips import _lin_state, _vgg_state

    torch.save(_vgg_state(), tmp_path / "vgg16-397923af.pth")
    torch.save(_lin_state(), tmp_path / "vgg.pth")
    cfg = LossConfig(perceptual_weight=0.5, lpips_vgg_path=str(tmp_path / "vgg16-397923af.pth"),
                     lpips_lin_path=str(tmp_path / "vgg.pth"), disc_start=100)
    loss = TokenizerLoss(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_rec = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    total, logs = loss.generator_loss(x, x_rec, torch.tensor(0.0), step=0)
    assert logs["lpips"] > 0
    torch.testing.assert_close(total, logs["l1"] + 0.5 * logs["lpips"])
    total.backward()
    assert x_rec.grad.abs().sum() > 0


def test_missing_lpips_weights_fail_clearly(tmp_path):
    cfg = LossConfig(perceptual_weight=1.0, lpips_vgg_path=str(tmp_path / "nope.pth"), lpips_lin_path=str(tmp_path / "vgg.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TokenizerLoss(cfg)
