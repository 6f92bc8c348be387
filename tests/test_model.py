"""Known-answer tests for fvae.model: shapes, padding invariance, the Gaussian formulas,
portfolio weights, degenerate days, gradient coverage, config validation, and a tiny overfit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fvae.model import (
    FactorVAE,
    LossParts,
    ModelConfig,
    Prediction,
    gaussian_kl,
    gaussian_nll,
    reconstruct,
)

C, T = 5, 6
SMALL = dict(hidden_size=16, num_factors=4, num_portfolios=8)
CONFIGS = {
    "paper": ModelConfig(**SMALL, objective="paper"),
    "elbo": ModelConfig(**SMALL, objective="elbo", free_bits=0.01),
    "gat_cond": ModelConfig(**SMALL, gat_layers=2, gat_heads=4, conditional_posterior=True, attn_heads=2),
}


def make_model(name: str, seed: int = 0) -> FactorVAE:
    torch.manual_seed(seed)
    return FactorVAE(CONFIGS[name], num_features=C).eval()


def make_batch(B: int = 3, N: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, T, C, generator=g)
    y = torch.randn(B, N, generator=g)
    counts = torch.tensor([N, N - 4, 3][:B])  # real stocks per day; padding at the end
    mask = torch.arange(N)[None, :] < counts[:, None]
    return x, y, mask


def pad_with_garbage(x, y, mask, extra: int, seed: int = 2):
    """Append `extra` padded stocks and overwrite every padded value with large random garbage."""
    g = torch.Generator().manual_seed(seed)
    B, N = mask.shape
    x2 = torch.cat([x, torch.zeros(B, extra, T, C)], dim=1)
    y2 = torch.cat([y, torch.zeros(B, extra)], dim=1)
    mask2 = torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    x2 = torch.where(mask2[..., None, None], x2, 100 * torch.randn(x2.shape, generator=g))
    y2 = torch.where(mask2, y2, 100 * torch.randn(y2.shape, generator=g))
    return x2, y2, mask2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes(name):
    model = make_model(name)
    x, y, mask = make_batch()
    B, N = mask.shape
    K = CONFIGS[name].num_factors
    parts = model(x, y, mask)
    assert isinstance(parts, LossParts)
    for t in (parts.loss, parts.nll, parts.kl):
        assert t.shape == (B,) and torch.isfinite(t).all()
    pred = model.predict(x, mask)
    assert isinstance(pred, Prediction)
    for f in ("mu", "sigma", "mu_alpha", "sigma_alpha"):
        assert getattr(pred, f).shape == (B, N)
    assert pred.beta.shape == (B, N, K)
    assert pred.mu_z.shape == (B, K) and pred.sigma_z.shape == (B, K)
    assert (pred.sigma[mask] > 0).all() and (pred.sigma_z > 0).all()
    for f in ("mu", "sigma", "mu_alpha", "sigma_alpha", "beta"):
        v = getattr(pred, f)
        assert torch.isfinite(v).all()
        assert (v[~mask] == 0).all(), f"{f} not 0 at padding"
    cfg = CONFIGS[name]
    if cfg.objective == "paper":
        torch.testing.assert_close(parts.loss, parts.nll + cfg.gamma * parts.kl)
    else:  # the ELBO per stock: the day's KL (with its free-bits floor) shared by its N stocks
        with torch.no_grad():
            e = model._features(x, mask)
            kl_k = gaussian_kl(*model.encoder(e, y, mask), *model.predictor(e, mask))
        penalty = kl_k.clamp(min=cfg.free_bits).sum(-1)
        torch.testing.assert_close(parts.loss, parts.nll + cfg.gamma * penalty / mask.sum(1))
    assert model.portfolio_weights(x, mask).shape == (B, N, CONFIGS[name].num_portfolios)


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_padding_invariance(name, gather):
    model = make_model(name)
    model.gather_real_rows = gather
    x, y, mask = make_batch()
    x2, y2, mask2 = pad_with_garbage(x, y, mask, extra=7)
    N = mask.shape[1]
    with torch.no_grad():
        a, b = model(x, y, mask), model(x2, y2, mask2)
        for f in ("loss", "nll", "kl"):
            torch.testing.assert_close(getattr(b, f), getattr(a, f), atol=1e-5, rtol=1e-5)
        pa, pb = model.predict(x, mask), model.predict(x2, mask2)
        for f in ("mu", "sigma", "mu_alpha", "sigma_alpha", "beta"):
            va, vb = getattr(pa, f), getattr(pb, f)
            torch.testing.assert_close(vb[:, :N][mask], va[mask], atol=1e-5, rtol=1e-5)
            assert (vb[~mask2] == 0).all()
        for f in ("mu_z", "sigma_z"):
            torch.testing.assert_close(getattr(pb, f), getattr(pa, f), atol=1e-5, rtol=1e-5)
        wa, wb = model.portfolio_weights(x, mask), model.portfolio_weights(x2, mask2)
        torch.testing.assert_close(wb[:, :N], wa, atol=1e-6, rtol=1e-5)


def test_gather_and_dense_paths_agree():
    model = make_model("gat_cond")
    x, y, mask = make_batch()
    with torch.no_grad():
        a = model(x, y, mask)
        model.gather_real_rows = False
        b = model(x, y, mask)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)


def test_nan_in_padding_does_not_leak():
    model = make_model("gat_cond").train()  # dropout 0, so train mode is deterministic
    x, y, mask = make_batch()
    x = torch.where(mask[..., None, None], x, float("nan"))
    y = torch.where(mask, y, float("nan"))
    for gather in (True, False):
        model.gather_real_rows = gather
        model.zero_grad()
        parts = model(x, y, mask)
        parts.loss.sum().backward()
        assert torch.isfinite(parts.loss).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_kl_zero_when_equal_and_matches_torch():
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(4, 8, generator=g)
    sigma = torch.rand(4, 8, generator=g) + 0.05
    assert (gaussian_kl(mu, sigma, mu, sigma) == 0).all()
    mu_p = torch.randn(4, 8, generator=g)
    sigma_p = torch.rand(4, 8, generator=g) + 0.05
    ours = gaussian_kl(mu, sigma, mu_p, sigma_p)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma), torch.distributions.Normal(mu_p, sigma_p))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours > 0).all()


def test_model_kl_zero_when_posterior_equals_prior(monkeypatch):
    model = make_model("paper")
    x, y, mask = make_batch()
    # route the posterior through the predictor: q = p, so KL must vanish and loss = nll
    monkeypatch.setattr(model.encoder, "forward", lambda e, y, mask: model.predictor(e, mask))
    parts = model(x, y, mask)
    assert (parts.kl.abs() < 1e-6).all()
    torch.testing.assert_close(parts.loss, parts.nll)


def test_nll_matches_torch_normal():
    g = torch.Generator().manual_seed(4)
    y, mu = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    sigma = torch.rand(3, 10, generator=g) + 0.1
    mask = torch.rand(3, 10, generator=g) > 0.3
    mask[:, 0] = True
    ref = -torch.distributions.Normal(mu, sigma).log_prob(y)
    ref = torch.stack([ref[b][mask[b]].mean() for b in range(3)])
    torch.testing.assert_close(gaussian_nll(y, mu, sigma, mask), ref, atol=1e-6, rtol=1e-6)

    # and the model's nll is exactly that formula applied to the posterior reconstruction
    model, (x, y, mask) = make_model("gat_cond"), make_batch()
    with torch.no_grad():
        mu_post, sigma_post, mu_alpha, sigma_alpha, beta = _posterior_and_decoder(model, x, y, mask)
        mu_y, sigma_y = reconstruct(mu_alpha, sigma_alpha, beta, mu_post, sigma_post)
        # σ_y² = σ_α² + Σ β² σ_z², μ_y = μ_α + β μ_z
        torch.testing.assert_close(mu_y, mu_alpha + torch.einsum("bnk,bk->bn", beta, mu_post))
        torch.testing.assert_close(sigma_y**2, sigma_alpha**2 + torch.einsum("bnk,bk->bn", beta**2, sigma_post**2))
        ref = -torch.distributions.Normal(mu_y, sigma_y).log_prob(y)
        ref = torch.stack([ref[b][mask[b]].mean() for b in range(mask.shape[0])])
        model.cfg = dataclasses.replace(model.cfg, objective="paper")
        torch.testing.assert_close(model(x, y, mask).nll, ref, atol=1e-5, rtol=1e-5)


def _posterior_and_decoder(model, x, y, mask):
    """μ_post, σ_post, μ_α, σ_α, β of one forward pass."""
    e = model._features(x, mask)
    return (*model.encoder(e, y, mask), *model.decoder(e))


def test_elbo_nll_is_the_expectation_over_one_shared_z():
    """The ELBO's reconstruction term in closed form equals a Monte Carlo average over draws of ONE z
    per day, shared by its stocks: E_z[mean_i −log N(y_i | μ_α,i + β_i z, σ_α,i²)], z ~ N(μ_post, σ_post²)."""
    model, (x, y, mask) = make_model("gat_cond"), make_batch()
    with torch.no_grad():
        mu_post, sigma_post, mu_alpha, sigma_alpha, beta = _posterior_and_decoder(model, x, y, mask)
        g = torch.Generator().manual_seed(0)
        S = 200_000
        z = mu_post[None] + sigma_post[None] * torch.randn(S, *mu_post.shape, generator=g, dtype=torch.float64)
        mean = mu_alpha[None] + torch.einsum("bnk,sbk->sbn", beta.double(), z)  # (S, B, N)
        ll = -torch.distributions.Normal(mean, sigma_alpha.double()[None]).log_prob(y.double()[None]).mean(0)
        mc = torch.stack([ll[b][mask[b]].mean() for b in range(mask.shape[0])])
        assert torch.allclose(model(x, y, mask).nll.double(), mc, rtol=2e-3)
        # a z shared by the stocks is not the paper's per-stock marginal
        model.cfg = dataclasses.replace(model.cfg, objective="paper")
        assert not torch.allclose(model(x, y, mask).nll.double(), mc, rtol=2e-3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_portfolio_weights_sum_to_one(name):
    model = make_model(name)
    x, y, mask = pad_with_garbage(*make_batch(), extra=3)
    w = model.portfolio_weights(x, mask)  # (B, N, M)
    assert (w[~mask] == 0).all()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(w.shape[0], w.shape[2]))


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_degenerate_days_are_finite(name, gather):
    model = make_model(name).train()
    model.gather_real_rows = gather
    x, y, _ = make_batch(B=3, N=5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 2] = True  # one real stock
    mask[1, :] = True  # a full day
    # day 2: no real stock at all (must not produce NaN either)
    parts = model(x, y, mask)
    parts.loss.sum().backward()
    assert torch.isfinite(parts.loss).all()
    assert parts.nll[2] == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    pred = model.predict(x, mask)
    for f in dataclasses.fields(pred):
        assert torch.isfinite(getattr(pred, f.name)).all(), f.name
    w = model.portfolio_weights(x, mask)
    torch.testing.assert_close(w[0, 2], torch.ones(w.shape[-1]))
    assert (w[2] == 0).all()


def test_all_padding_batch():
    model = make_model("gat_cond")
    x, y, _ = make_batch(B=2, N=4)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    parts = model(x, y, mask)
    assert torch.isfinite(parts.loss).all()
    assert (model.predict(x, mask).mu == 0).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_reach_every_parameter(name):
    model = make_model(name).train()
    x, y, mask = make_batch()
    model(x, y, mask).loss.mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"  # DDP would fail on it
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 0),
        ("hidden_size", 2.5),
        ("num_factors", -1),
        ("num_portfolios", 0),
        ("attn_heads", 0),
        ("gat_heads", 0),
        ("gat_layers", -1),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("gamma", -1.0),
        ("sigma_floor", 0.0),
        ("conditional_posterior", "yes"),
    ],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_config_divisibility():
    with pytest.raises(ValueError, match="attn_heads"):
        ModelConfig(hidden_size=10, attn_heads=3)
    with pytest.raises(ValueError, match="gat_heads"):
        ModelConfig(hidden_size=10, gat_layers=1, gat_heads=3)
    ModelConfig(hidden_size=10, gat_layers=0, gat_heads=3)  # gat_heads unused without GAT
    with pytest.raises(TypeError):
        ModelConfig(64)  # keyword-only
    with pytest.raises(ValueError, match="num_features"):
        FactorVAE(ModelConfig(), num_features=0)


def test_overfit_tiny_batch():
    torch.manual_seed(0)
    B, N = 4, 24
    x = torch.randn(B, N, T, C)
    w = torch.tensor([1.0, -0.5, 0.25, 0.0, 0.75])
    y = x[:, :, -1, :] @ w  # a fixed linear function of the last time step
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[-1, -5:] = False
    model = FactorVAE(ModelConfig(hidden_size=16, num_factors=4, num_portfolios=8), num_features=C)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(200):
        loss = model(x, y, mask).loss.mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = model(x, y, mask).loss.mean().item()
        mu = model.predict(x, mask).mu[mask]
    assert last < first - 1.5, (first, last)
    corr = torch.corrcoef(torch.stack([mu, y[mask]]))[0, 1]
    assert corr > 0.9, corr
