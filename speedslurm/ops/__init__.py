"""Work beside a deployment: ``doctor`` (is this cluster ready for speedslurm, ``doctor.py``), llama.cpp built as a
Slurm job (``buildllama.py``) and the node zipapp for the plain-sbatch templates (``nodepyz.py``). Imports
:mod:`speedslurm.cluster`, :mod:`speedslurm.settings`, :mod:`speedslurm.node`, :mod:`speedslurm.rundir` and
:mod:`speedslurm.errors`."""
