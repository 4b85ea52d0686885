"""Batch inference: stream a JSONL prompts file through every ready replica, append OpenAI Batch result lines.

Its entry is :mod:`.runner`::

    prepared = runner.prepare_batch(prompts_path, out_path, options)  # validates; UsageError before anything is sent
    summary = runner.run_batch(source, prepared, options, console)    # BatchFailed (1) / BatchInterrupted (130)
    prepared.close()

The endpoints it sends to come from :mod:`.sources`; the prompts are read by :mod:`.inputs` and
:mod:`.promptline`, the results written by :mod:`.results` under :mod:`.writelock`; :mod:`.replicas`,
:mod:`.workqueue` and :mod:`.runstate` share the work among the replicas; :mod:`.transport` is the HTTP client.
Imports :mod:`speedslurm.rundir`, :mod:`speedslurm.polling` and :mod:`speedslurm.errors` only: it knows nothing of
Slurm or of deployments (an endpoint source hands it the replicas).
"""


