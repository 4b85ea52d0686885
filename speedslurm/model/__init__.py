"""Models: the registry (``registry.py``: a name or a ``.gguf`` path becomes a
:class:`~speedslurm.model.registry.ModelSpec`), a GGUF file's header read without its weights (``gguf.py``) and
kept in the user's cache (``cache.py``), and downloads from the Hugging Face Hub (``pull.py``). Imports
:mod:`speedslurm.settings` and :mod:`speedslurm.errors`."""
