"""The plan of a deployment: how a model's layers are split across nodes and how many nodes it needs
(``split.py``), the plan itself (``plan.py``: nodes, replicas, context, slots, layout and the job's ``#SBATCH``
values) and ``cluster.sbatch`` checked against sbatch's own options (``sbatchopts.py``). Computed from the
settings, the model and what the caller says of the cluster, without asking it: imports
:mod:`speedslurm.model`, :mod:`speedslurm.settings` and :mod:`speedslurm.errors`."""
