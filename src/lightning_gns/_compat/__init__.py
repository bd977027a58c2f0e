"""The one place where lightning-gns reads private PyTorch and Lightning internals (each function says which)."""
