"""A deployment's life seen from the client: its record in the run directory (``record.py``: create, list, find by
id or job id), prepare, launch and down (``lifecycle.py``), each replica's state and why (``status.py``), waiting
until ready or ended (``waiting.py``), the node-hours held (``nodehours.py``), what its servers do now
(``live.py``), its job script for plain sbatch (``render.py``) and clean-up that a signal cannot cut short
(``cleanup.py``). Imports :mod:`speedslurm.cluster`, :mod:`speedslurm.planning`, :mod:`speedslurm.model`,
:mod:`speedslurm.batch` (a deployment as a batch's endpoint source), :mod:`speedslurm.rundir`,
:mod:`speedslurm.settings`, :mod:`speedslurm.node` and :mod:`speedslurm.errors`; never :mod:`speedslurm.api` or
:mod:`speedslurm.cli`."""
