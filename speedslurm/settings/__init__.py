"""The settings: their types and their merge (``settings.py``: :func:`~speedslurm.settings.settings.load_settings`),
the layers and where each is found (``layers.py``: the packaged ``defaults.yaml``, the registry and profiles in
``configs/``, the user's files, ``SPEEDSLURM_*``, flags), their validation and conversion (``check.py``,
pydantic-core) and where the packaged data folders lie (``packaged.py``). Imports nothing of speedslurm but
:mod:`speedslurm.errors`."""
