"""``ts.handler_utils``: helpers for TorchServe handlers."""
