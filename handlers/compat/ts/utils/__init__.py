"""``ts.utils``: helpers for TorchServe handlers."""
