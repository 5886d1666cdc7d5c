"""The worker process: loads one model's handler and serves batches sent by the frontend.

Only this package may import torch (through the handler); the frontend never does.
"""
