"""FactorVAE, the whole model in one file.

Paper: Yitong Duan, Lei Wang, Qizhong Ma, Dongsheng Zhou, Jiang Bian, Tie-Yan Liu
(2022), "FactorVAE: A Probabilistic Dynamic Factor Model Based on Variational
Autoencoder for Predicting Cross-Sectional Stock Returns", AAAI 2022.

Optional extensions from the Berkeley MFE report "Beyond FactorVAE":
  * a GAT risk extractor (graph attention over the day's stocks) and a mapping
    unit that merges its output r with the stock features e (``gat_layers > 0``);
  * a conditional posterior q(z | x, y) whose encoder sees the features as well
    as the returns (``conditional_posterior=True``).

The dynamic factor model, per trading day, for stock i:

    y_i = α_i + Σ_k β_ik z_k + ε_i,   α_i ~ N(μ_α,i, σ_α,i²),   z ~ N(μ_z, diag σ_z²)

  feature extractor  x ──GRU──▶ e                              (B, N, H)
  factor encoder     (e, y) ──portfolios y_p──▶ μ_post, σ_post  (B, K)  q(z | x, y), training only
  factor predictor   e ──attention──▶ μ_prior, σ_prior          (B, K)  p(z | x)
  factor decoder     (e, z) ──▶ μ_y = μ_α + β μ_z,  σ_y² = σ_α² + β² σ_z²   (B, N)

  prediction:             μ_y, σ_y from the prior z (no y needed)

Two objectives (``ModelConfig.objective``), per day with N real stocks:

  "elbo" (default)  the evidence lower bound of the day's whole cross-section, per stock:
                    [ Σ_i E_q[−log N(y_i | μ_α,i + β_i z, σ_α,i²)] + γ · Σ_k max(KL_k, λ) ] / N
                    where z ~ q is ONE draw shared by the day's stocks, taken in closed form:
                    E_q[(y − μ_α − β z)²] = (y − μ_α − β μ_post)² + Σ_k β_k² σ_post,k².
                    γ = 1 is the true ELBO (γ is a β-VAE's β), λ ("free bits", nats per
                    factor) keeps factors from collapsing, and γ can be annealed from 0
                    (``train.kl_warmup_epochs``). Because z is shared, the decoder must split
                    each stock's variance into a common part β² σ_z² and its own σ_α²: the
                    covariance β diag(σ_z²) βᵀ + diag(σ_α²) is fit to how stocks move together.
  "paper"           the paper's loss as written: the mean over stocks of each stock's
                    marginal −log N(y_i | μ_α + β μ_post, σ_α² + β² σ_post²), plus γ · KL per day.
                    Next to a likelihood averaged over N stocks, a KL summed per day weighs N
                    times more: in effect a β-VAE with β = γ·N, where collapse (posterior =
                    prior, the factor path unused) is the optimum for any γ near 1.

One sample is one trading day's whole padded cross-section: x (B, N, T, C),
y (B, N), mask (B, N) with True = real stock. Every softmax, attention, loss and
sum over stocks is masked, so appending padding stocks never changes an output
for a real stock, and a padded value (even NaN) never reaches a real one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(kw_only=True)
class ModelConfig:
    hidden_size: int = 64  # H
    num_factors: int = 8  # K
    num_portfolios: int = 64  # M
    attn_heads: int = 1  # attention heads per factor query in the predictor (1 = paper)
    gat_layers: int = 0  # 0 = the paper's model; >0 adds the GAT risk extractor + mapping unit
    gat_heads: int = 4
    conditional_posterior: bool = False  # encoder sees features too: q(z | x, y) ("Beyond FactorVAE")
    dropout: float = 0.0
    leaky_slope: float = 0.1
    sigma_floor: float = 1e-4  # σ = softplus(·) + floor everywhere
    gamma: float = 1.0  # KL weight γ
    objective: Literal["elbo", "paper"] = "elbo"  # see the module docstring
    free_bits: float = 0.0  # λ, nats per factor and day below which KL_k is not penalised ("elbo")
    scale_portfolios: bool = True  # y_p · sqrt(N): portfolio returns at one stock's scale (False = paper)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_factors", "num_portfolios", "attn_heads", "gat_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
        if isinstance(self.gat_layers, bool) or not isinstance(self.gat_layers, int) or self.gat_layers < 0:
            raise ValueError(f"ModelConfig.gat_layers must be a non-negative integer, got {self.gat_layers!r}")
        if not isinstance(self.conditional_posterior, bool):
            raise ValueError(f"ModelConfig.conditional_posterior must be true or false, got {self.conditional_posterior!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.leaky_slope >= 0.0:
            raise ValueError(f"ModelConfig.leaky_slope must be >= 0, got {self.leaky_slope!r}")
        if not self.sigma_floor > 0.0:  # log σ is taken in the KL
            raise ValueError(f"ModelConfig.sigma_floor must be > 0, got {self.sigma_floor!r}")
        if not (self.gamma >= 0.0 and math.isfinite(self.gamma)):
            raise ValueError(f"ModelConfig.gamma must be a finite number >= 0, got {self.gamma!r}")
        if self.objective not in ("elbo", "paper"):
            raise ValueError(f"ModelConfig.objective must be 'elbo' or 'paper', got {self.objective!r}")
        if not (self.free_bits >= 0.0 and math.isfinite(self.free_bits)):
            raise ValueError(f"ModelConfig.free_bits must be a finite number >= 0, got {self.free_bits!r}")
        if self.free_bits > 0 and self.objective == "paper":
            raise ValueError("ModelConfig.free_bits: applies to objective 'elbo' only")
        if self.hidden_size % self.attn_heads:
            raise ValueError(
                f"ModelConfig.attn_heads ({self.attn_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if self.gat_layers > 0 and self.hidden_size % self.gat_heads:
            raise ValueError(
                f"ModelConfig.gat_heads ({self.gat_heads}) must divide hidden_size ({self.hidden_size})"
            )


@dataclass
class LossParts:
    """Per-day terms, each (B,); the train loop weights and averages days itself."""

    loss: Tensor  # what is minimised (see the module docstring)
    nll: Tensor  # masked mean over real stocks of the reconstruction term, posterior z
    kl: Tensor  # Σ_k KL(N(μ_post, σ_post) ‖ N(μ_prior, σ_prior)), nats per day


@dataclass
class Prediction:
    """The prior's forecast; every per-stock tensor is 0 at padded stocks."""

    mu: Tensor  # (B, N) expected return μ_y from the prior's μ_z (no sampling)
    sigma: Tensor  # (B, N) predicted σ_y (risk)
    mu_alpha: Tensor  # (B, N)
    sigma_alpha: Tensor  # (B, N)
    beta: Tensor  # (B, N, K) factor exposures
    mu_z: Tensor  # (B, K) prior factor distribution
    sigma_z: Tensor  # (B, K)


@dataclass
class Diagnosis:
    """What the posterior learnt next to the prior, for a day whose returns are known."""

    mu_prior: Tensor  # (B, N) μ_y from the prior's μ_z: the forecast
    mu_post: Tensor  # (B, N) μ_y from the posterior's μ_z: the reconstruction (uses y)
    kl: Tensor  # (B, K) KL(q ‖ p) per factor
    common_var: Tensor  # (B, N) Σ_k β_k² σ_prior,k²: the variance the factors explain
    idio_var: Tensor  # (B, N) σ_α²
    mu_z_post: Tensor  # (B, K) the posterior factor means


# ---------------------------------------------------------------------------------
# masked primitives and the two Gaussian formulas


def positive(raw: Tensor, floor: float) -> Tensor:
    """σ = softplus(raw) + floor: positive and bounded away from 0 so log σ and 1/σ stay finite."""
    return F.softplus(raw) + floor


def masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax along `dim` over real entries only; exactly 0 at masked entries.

    The fill is the dtype's most negative finite value rather than −inf, so an
    all-masked slice (a day with no real stock) yields zeros instead of NaN.
    """
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.where(mask, torch.softmax(logits, dim=dim), 0.0)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Scaled dot-product attention of queries over the day's real stocks.

    q (B, A, Q, d) · k, v (B, A, N, d) · mask (B, N) → (B, A, Q, d). Padded keys
    are masked out before the softmax (SDPA fills them with −inf). A day with no
    real stock would leave every key masked, which some SDPA backends turn into NaN,
    so such a day attends to its padding instead; its outputs are discarded downstream.
    """
    keys = mask | ~mask.any(dim=1, keepdim=True)  # (B, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :], dropout_p=dropout_p)


def gaussian_nll(y: Tensor, mu: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
    """Per-day masked mean over real stocks of −log N(y | μ, σ²): (B, N) → (B,). Computed in fp32."""
    y, mu, sigma = y.float(), mu.float(), sigma.float()
    nll = 0.5 * math.log(2 * math.pi) + sigma.log() + 0.5 * ((y - mu) / sigma) ** 2  # (B, N)
    count = mask.sum(dim=1).clamp(min=1)  # (B,) a day with no real stock gives 0, not 0/0
    return torch.where(mask, nll, 0.0).sum(dim=1) / count


def gaussian_kl(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    """Elementwise KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)) in log-space, fp32:

    KL = log σ_p − log σ_q + (σ_q² + (μ_q − μ_p)²) / (2 σ_p²) − ½
       = ½ [exp(2 (log σ_q − log σ_p)) + ((μ_q − μ_p) / σ_p)² − 1] − (log σ_q − log σ_p)
    which is exactly 0 when the two distributions are equal.
    """
    mu_q, sigma_q, mu_p, sigma_p = mu_q.float(), sigma_q.float(), mu_p.float(), sigma_p.float()
    log_ratio = sigma_q.log() - sigma_p.log()  # log(σ_q / σ_p)
    return 0.5 * (torch.exp(2 * log_ratio) + ((mu_q - mu_p) / sigma_p) ** 2 - 1) - log_ratio


def expected_nll(y: Tensor, mu_alpha: Tensor, sigma_alpha: Tensor, beta: Tensor, mu_z: Tensor, sigma_z: Tensor,
                 mask: Tensor) -> Tensor:
    """Per stock E_{z ~ N(μ_z, σ_z²)}[−log N(y | μ_α + β z, σ_α²)] for one z shared by the day, fp32:

        ½ log 2π + log σ_α + [(y − μ_α − β μ_z)² + Σ_k β_k² σ_z,k²] / (2 σ_α²)

    (B, N) ×3, (B, N, K), (B, K) ×2, mask (B, N) → (B, N), 0 at padded stocks.
    """
    beta, mu_z, sigma_z = beta.float(), mu_z.float(), sigma_z.float()
    resid = y.float() - mu_alpha.float() - (beta * mu_z[:, None, :]).sum(dim=-1)  # (B, N)
    spread = (beta**2 * sigma_z[:, None, :] ** 2).sum(dim=-1)  # (B, N) posterior uncertainty through β
    var_a = sigma_alpha.float() ** 2
    nll = 0.5 * math.log(2 * math.pi) + sigma_alpha.float().log() + (resid**2 + spread) / (2 * var_a)
    return torch.where(mask, nll, 0.0)


def reconstruct(mu_alpha: Tensor, sigma_alpha: Tensor, beta: Tensor, mu_z: Tensor, sigma_z: Tensor) -> tuple[Tensor, Tensor]:
    """y = α + β z with independent Gaussian α, z:  μ_y = μ_α + β μ_z,  σ_y = sqrt(σ_α² + Σ_k β_k² σ_z,k²).

    (B, N), (B, N), (B, N, K), (B, K), (B, K) → μ_y, σ_y (B, N). Elementwise products and
    sums (not einsum) so that autocast leaves this fp32: K is small and σ_y feeds a log.
    """
    beta = beta.float()
    mu_y = mu_alpha.float() + (beta * mu_z.float()[:, None, :]).sum(dim=-1)
    var_y = sigma_alpha.float() ** 2 + (beta**2 * sigma_z.float()[:, None, :] ** 2).sum(dim=-1)
    return mu_y, var_y.sqrt()  # σ_α ≥ floor > 0, so sqrt has a finite gradient


# ---------------------------------------------------------------------------------
# the modules


class FeatureExtractor(nn.Module):
    """x (R, T, C) → e (R, H): per-step Linear + LeakyReLU, then a GRU; e = last hidden state."""

    def __init__(self, num_features: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(num_features, cfg.hidden_size)
        self.gru = nn.GRU(cfg.hidden_size, cfg.hidden_size, num_layers=1, batch_first=True)
        self.slope = cfg.leaky_slope

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.proj(x), self.slope)  # (R, T, H)
        _, h_last = self.gru(h)  # (1, R, H)
        return h_last[0]


class GATLayer(nn.Module):
    """Multi-head graph attention over the complete graph of one day's real stocks.

    Edge weights are scaled dot-product scores (a graph-transformer form of GAT) rather
    than GAT's additive a·[W h_i ‖ W h_j]: SDPA then never materialises the (N, N)
    score matrix on GPU. Residual + LayerNorm over H act per stock, so padding-safe.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.gat_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.slope = cfg.leaky_slope
        self.dropout = cfg.dropout

    def forward(self, r: Tensor, mask: Tensor) -> Tensor:
        B, N, H = r.shape
        G = self.heads
        q, k, v = self.qkv(r).view(B, N, 3, G, H // G).permute(2, 0, 3, 1, 4)  # each (B, G, N, H/G)
        p = self.dropout if self.training else 0.0
        h = attend(q, k, v, mask, p).transpose(1, 2).reshape(B, N, H)  # heads concatenated
        h = F.dropout(F.leaky_relu(self.out(h), self.slope), p, self.training)
        return self.norm(r + h)  # (B, N, H)


class FactorEncoder(nn.Module):
    """Posterior q(z | x, y): returns through M learnt portfolios → (μ_post, σ_post).

    Portfolio layer: a_p = softmax over the day's real stocks of Linear(e) (B, N, M), so each
    portfolio is a long-only weighting of stocks; y_p = a_pᵀ y (B, M).
    Conditional posterior ("Beyond FactorVAE"): each portfolio's weighted features a_pᵀ e
    (B, M, H) are projected to one number per portfolio and appended to y_p → (B, 2M).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        M, K = cfg.num_portfolios, cfg.num_factors
        self.scale = cfg.scale_portfolios
        self.portfolio = nn.Linear(cfg.hidden_size, M)
        self.feature_return = nn.Linear(cfg.hidden_size, 1) if cfg.conditional_posterior else None
        width = 2 * M if cfg.conditional_posterior else M
        self.mu = nn.Linear(width, K)
        self.sigma = nn.Linear(width, K)
        self.floor = cfg.sigma_floor

    def weights(self, e: Tensor, mask: Tensor) -> Tensor:
        return masked_softmax(self.portfolio(e), mask[..., None], dim=1)  # (B, N, M), columns sum to 1

    def forward(self, e: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        a_p = self.weights(e, mask)  # (B, N, M)
        # elementwise, not einsum, to keep the portfolio returns fp32 under autocast
        y_p = (a_p * y[..., None].float()).sum(dim=1)  # (B, M)
        if self.scale:
            # a softmax portfolio of N stocks averages a cross-section of unit-spread returns down to
            # ~1/sqrt(N): the linear maps to μ_post would need weights ~sqrt(N) times larger before
            # the posterior could follow the day's returns (measured: it never gets there, and the
            # factors collapse into the alpha). sqrt(N) restores one stock's scale.
            y_p = y_p * mask.sum(dim=1, keepdim=True).clamp(min=1).float().sqrt()
        if self.feature_return is not None:
            e_p = torch.einsum("bnm,bnh->bmh", a_p.to(e.dtype), e)  # (B, M, H)
            y_p = torch.cat([y_p, self.feature_return(e_p).squeeze(-1).float()], dim=-1)  # (B, 2M)
        return self.mu(y_p), positive(self.sigma(y_p), self.floor)  # μ_post, σ_post (B, K)


class FactorDecoder(nn.Module):
    """Alpha layer (μ_α, σ_α) and beta layer β from e; `reconstruct` combines them with z."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H = cfg.hidden_size
        self.alpha_hidden = nn.Linear(H, H)
        self.alpha_mu = nn.Linear(H, 1)
        self.alpha_sigma = nn.Linear(H, 1)
        self.beta = nn.Linear(H, cfg.num_factors)
        self.slope = cfg.leaky_slope
        self.floor = cfg.sigma_floor

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h_alpha = F.leaky_relu(self.alpha_hidden(e), self.slope)  # (B, N, H)
        mu_alpha = self.alpha_mu(h_alpha).squeeze(-1)  # (B, N)
        sigma_alpha = positive(self.alpha_sigma(h_alpha).squeeze(-1), self.floor)  # (B, N)
        return mu_alpha, sigma_alpha, self.beta(e)  # β (B, N, K)


class FactorPredictor(nn.Module):
    """Prior p(z | x): K learnt queries attend over the day's stocks → (μ_prior, σ_prior).

    The paper scores with a ReLU-ed cosine similarity normalised by its sum; that is 0/0
    when every score is negative (likely on a day with one stock), so this uses scaled
    dot-product softmax attention instead. Each factor query has `attn_heads` heads
    (H split into heads and concatenated back; 1 = paper).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H, K = cfg.hidden_size, cfg.num_factors
        self.heads = cfg.attn_heads
        self.query = nn.Parameter(torch.randn(K, H))  # q_k
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.hidden = nn.Linear(H, H)
        self.mu = nn.Linear(H, 1)
        self.sigma = nn.Linear(H, 1)
        self.slope = cfg.leaky_slope
        self.floor = cfg.sigma_floor

    def forward(self, e: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        B, N, H = e.shape
        A, K = self.heads, self.query.shape[0]
        k = self.key(e).view(B, N, A, H // A).transpose(1, 2)  # (B, A, N, H/A)
        v = self.value(e).view(B, N, A, H // A).transpose(1, 2)  # (B, A, N, H/A)
        q = self.query.view(K, A, H // A).transpose(0, 1).expand(B, A, K, H // A)  # (B, A, K, H/A)
        h = attend(q, k, v, mask).transpose(1, 2).reshape(B, K, H)  # h_k, heads concatenated
        h = F.leaky_relu(self.hidden(h), self.slope)  # distribution network (B, K, H)
        return self.mu(h).squeeze(-1), positive(self.sigma(h).squeeze(-1), self.floor)  # (B, K)


class FactorVAE(nn.Module):
    """FactorVAE; `forward` is the training loss, `predict` the prior forecast."""

    # Run the GRU only over real stocks (x[mask], scattered back): a big CPU saving, but a
    # data-dependent shape. Set False for torch.compile / CUDA graphs. Dynamo leaves nn.GRU
    # eager (one graph break) unless torch._dynamo.config.allow_rnn = True; with that and
    # this False, torch.compile(fullgraph=True) works.
    gather_real_rows: bool = True

    def __init__(self, cfg: ModelConfig, *, num_features: int) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        H = cfg.hidden_size
        self.cfg = cfg
        self.extractor = FeatureExtractor(num_features, cfg)
        self.gat = nn.ModuleList(GATLayer(cfg) for _ in range(cfg.gat_layers))  # risk extractor
        self.mapping = nn.Linear(2 * H, H) if cfg.gat_layers > 0 else None  # mapping unit
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = FactorEncoder(cfg)
        self.decoder = FactorDecoder(cfg)
        self.predictor = FactorPredictor(cfg)
        # KL warm-up: the training loop fills this in place (a tensor, so a CUDA graph reads it)
        self.register_buffer("kl_scale", torch.ones(()), persistent=False)

    def _features(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, N, T, C), mask (B, N) → e (B, N, H), exactly 0 at padded stocks."""
        if x.dim() != 4 or mask.shape != x.shape[:2]:
            raise ValueError(f"expected x (B, N, T, C) and mask (B, N), got {tuple(x.shape)} and {tuple(mask.shape)}")
        B, N, T, C = x.shape
        keep = mask[..., None]  # (B, N, 1)
        if self.gather_real_rows:
            # (R, H) over the R real stocks; an all-padding batch skips the GRU (no empty RNN batch)
            h = self.extractor(x[mask]) if bool(mask.any()) else x.new_zeros(0, self.cfg.hidden_size)
            e = h.new_zeros(B, N, h.shape[-1])
            e[mask] = h
        else:
            x = torch.where(mask[..., None, None], x, 0.0)  # padded values, even NaN, never enter the GRU
            e = self.extractor(x.reshape(B * N, T, C)).view(B, N, -1)  # (B, N, H)
        e = self.drop(e)
        if self.mapping is not None:
            r = e
            for layer in self.gat:
                r = layer(r, mask)  # (B, N, H)
            e = F.leaky_relu(self.mapping(torch.cat([e, r], dim=-1)), self.cfg.leaky_slope)  # mapping unit
            e = self.drop(e)
        return torch.where(keep, e, 0.0)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor) -> LossParts:
        """Training: reconstruct y from the posterior z and regularise the prior towards it."""
        e = self._features(x, mask)  # (B, N, H)
        y = torch.where(mask, y, 0.0)  # (B, N); a padded NaN would otherwise poison gradients
        mu_post, sigma_post = self.encoder(e, y, mask)  # (B, K)
        mu_prior, sigma_prior = self.predictor(e, mask)  # (B, K)
        mu_alpha, sigma_alpha, beta = self.decoder(e)
        kl_k = gaussian_kl(mu_post, sigma_post, mu_prior, sigma_prior)  # (B, K)
        kl = kl_k.sum(dim=-1)  # (B,)
        if self.cfg.objective == "paper":
            # each stock's marginal under z ~ q, scored as if the stocks drew their own z
            mu_y, sigma_y = reconstruct(mu_alpha, sigma_alpha, beta, mu_post, sigma_post)  # (B, N)
            nll = gaussian_nll(y, mu_y, sigma_y, mask)  # (B,)
            return LossParts(loss=nll + self.cfg.gamma * self.kl_scale * kl, nll=nll, kl=kl)
        # the ELBO of the cross-section, with the day's one z taken in closed form, per stock
        count = mask.sum(dim=1).clamp(min=1)  # (B,)
        nll = expected_nll(y, mu_alpha, sigma_alpha, beta, mu_post, sigma_post, mask).sum(dim=1) / count  # (B,)
        penalty = kl_k.clamp(min=self.cfg.free_bits).sum(dim=-1) if self.cfg.free_bits > 0 else kl  # (B,)
        return LossParts(loss=nll + self.cfg.gamma * self.kl_scale * penalty / count, nll=nll, kl=kl)

    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        """Forecast from the prior: predictor → decoder, means only (no sampling)."""
        e = self._features(x, mask)
        mu_z, sigma_z = self.predictor(e, mask)  # (B, K)
        mu_alpha, sigma_alpha, beta = self.decoder(e)
        mu_y, sigma_y = reconstruct(mu_alpha, sigma_alpha, beta, mu_z, sigma_z)  # (B, N)
        return Prediction(
            mu=torch.where(mask, mu_y, 0.0),
            sigma=torch.where(mask, sigma_y, 0.0),
            mu_alpha=torch.where(mask, mu_alpha, 0.0),
            sigma_alpha=torch.where(mask, sigma_alpha, 0.0),
            beta=torch.where(mask[..., None], beta, 0.0),
            mu_z=mu_z,
            sigma_z=sigma_z,
        )

    def diagnose(self, x: Tensor, y: Tensor, mask: Tensor) -> Diagnosis:
        """Posterior and prior side by side (one feature pass): is the posterior informative, are
        the factors used, and how is each stock's variance split between factors and its own?"""
        e = self._features(x, mask)
        y = torch.where(mask, y, 0.0)
        mu_post, sigma_post = self.encoder(e, y, mask)
        mu_prior, sigma_prior = self.predictor(e, mask)
        mu_alpha, sigma_alpha, beta = self.decoder(e)
        m = lambda t: torch.where(mask, t, 0.0)  # noqa: E731
        return Diagnosis(
            mu_prior=m(reconstruct(mu_alpha, sigma_alpha, beta, mu_prior, sigma_prior)[0]),
            mu_post=m(reconstruct(mu_alpha, sigma_alpha, beta, mu_post, sigma_post)[0]),
            kl=gaussian_kl(mu_post, sigma_post, mu_prior, sigma_prior),
            common_var=m((beta.float() ** 2 * sigma_prior.float()[:, None, :] ** 2).sum(dim=-1)),
            idio_var=m(sigma_alpha.float() ** 2),
            mu_z_post=mu_post,
        )

    def portfolio_weights(self, x: Tensor, mask: Tensor) -> Tensor:
        """a_p (B, N, M): each portfolio's weights over the day's real stocks (sum to 1, 0 on padding)."""
        return self.encoder.weights(self._features(x, mask), mask)
