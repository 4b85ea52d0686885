"""speedslurm: run GGUF models across Slurm nodes with llama.cpp RPC and push prompt batches through them."""

__version__ = "0.1.0"

__all__ = ["__version__"]
