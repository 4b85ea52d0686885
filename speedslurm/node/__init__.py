"""The job side: what every task of a deployment's job runs on its node. ``entry.py`` is the task's entry
(``python -m speedslurm.node.entry``) and the commands of ``speedslurm-node.pyz``, ``roles.py`` runs a replica's
leader and followers, ``children.py`` their child processes and logs, ``net.py`` addresses, ports and the
heartbeat, ``idle.py`` the idle watch, ``template.py`` the job of a plain-sbatch template, ``binaries.py`` finds
llama.cpp's servers. Standard library only, and imports nothing of speedslurm but this folder,
:mod:`speedslurm.rundir` and :mod:`speedslurm.errors`: the node zipapp (:mod:`speedslurm.ops.nodepyz`) is this
folder whole with those two. The client imports it too, never the other way round."""
