"""Core layer: entropy, kNN, selection, metrics, the DDPM and datasets. Never imports Ray."""
