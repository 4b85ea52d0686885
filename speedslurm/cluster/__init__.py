"""Where a deployment's jobs run, and what the cluster is asked. The executors behind one interface
(``executor.py``: submit, job states, cancel, and what a job held), one module each (``slurm_executor.py``:
Slurm jobs through submitit; ``local_executor.py``: processes on this machine, known by an identity that
survives pid reuse, ``localproc.py``), known by name in ``registry.py``; the one job-script renderer and sbatch's
refusals (``script.py``), Slurm's queries (``slurm.py``), what speedslurm relies on of submitit
(``submitit_adapter.py``), external commands (``proc.py``) and warm-cache placement (``warmcache.py``). Imports
:mod:`speedslurm.planning`, :mod:`speedslurm.rundir`, :mod:`speedslurm.settings` and :mod:`speedslurm.errors`."""
