"""The run directory, the one contract between the client and the job side: ``records.py`` holds one typed record
per file the two share (``deployment.json``, the handshake files) and the JSON readers and writers, ``layout.py``
where each file lies and typed access to it (:class:`~speedslurm.rundir.layout.RunDir`). Standard library only,
and imports nothing of speedslurm but :mod:`speedslurm.errors`: the job side carries this folder to the nodes."""
