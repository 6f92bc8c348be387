"""fvae: FactorVAE training and distributed hyperparameter search on Ray."""

__version__ = "0.1.0"
