"""The run directory, the one contract between the client, the job side and the batches running against a
deployment: ``records.py`` holds one typed record per file the client and the nodes share (``deployment.json``,
the handshake files) and the JSON readers and writers, ``layout.py`` where each file lies and typed access to it
(:class:`~speedslurm.rundir.layout.RunDir`, and :class:`~speedslurm.rundir.layout.Deployment` as the client reads
one), ``batches.py`` the progress a running batch publishes (``batches/*.json``). Standard library only, and
imports nothing of speedslurm but :mod:`speedslurm.errors`: the job side carries this folder to the nodes."""
