"""Model backends behind one interface (services.runtime.backends.base.LMBackend):
torch/transformers on CPU by default, vLLM on GPU (imported only when selected)."""
