"""Where a deployment's jobs run, and what the cluster is asked: the executors behind one interface
(``executor.py``: Slurm through submitit, or local processes; submit, job states, cancel), the one job-script
renderer and sbatch's refusals (``script.py``), Slurm's queries (``slurm.py``), what speedslurm relies on of
submitit (``submitit_adapter.py``), local processes known by an identity (``localproc.py``), external commands
(``proc.py``) and warm-cache placement (``warmcache.py``). Imports :mod:`speedslurm.planning`,
:mod:`speedslurm.rundir`, :mod:`speedslurm.settings`, :mod:`speedslurm.node` and :mod:`speedslurm.errors`."""
