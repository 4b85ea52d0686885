"""The gateway: one OpenAI-compatible endpoint for a lab, in front of deployments that come and go.

``speedslurm gateway`` serves HTTP (aiohttp) on the login node or a service machine. A request names an alias
(``"model"``); the gateway starts the alias's deployment when none serves (:mod:`.pool`), routes each request to the
ready replica with the most free slots, passes streamed answers through chunk by chunk (:mod:`.server`), checks
every request's key (:mod:`.keys`), counts per alias and key (:mod:`.metrics`) and records what it runs in its
folder, so that a restart re-attaches to the deployments still running (:mod:`.state`).

Owns: the gateway's HTTP server, its folder (keys, usage, deployments, admin key), routing and wake-on-request.
May import: :mod:`speedslurm.deployments` (start, watch and stop deployments, as ``up`` does), :mod:`speedslurm.rundir`,
:mod:`speedslurm.settings`, :mod:`speedslurm.errors`, :mod:`speedslurm.polling`; aiohttp. Imported by
:mod:`speedslurm.api.gateway` only (the CLI reaches it through the API). The job side never imports it.
"""
