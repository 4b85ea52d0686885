"""The gateway from Python: serve it (blocking, or in a background thread), manage its keys, ask a running one.

::

    from speedslurm.api import gateway

    key = gateway.add_key("alice")                      # printed once; stored hashed
    with gateway.open_gateway({"llama": "Q4_K_S"}, listen="127.0.0.1:0") as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key)

``serve`` is what ``speedslurm gateway`` runs; ``status`` and ``usage`` are what ``gateway status`` and
``gateway usage`` print (from the running gateway, through the admin key in its folder).
"""

from __future__ import annotations

import asyncio
import json
import threading
import typing as tp
import urllib.error
import urllib.request

from ..errors import SpeedslurmError, UsageError

if tp.TYPE_CHECKING:
    from ..gateway.keys import KeyStore
    from ..gateway.server import Gateway
    from ..gateway.state import Folder
    from ..settings.settings import Settings


def _settings(settings: Settings | None) -> Settings:
    from .deployments import load_settings

    return settings if settings is not None else load_settings()


def _specs(settings: Settings, models: tp.Mapping[str, str] | tp.Sequence[str]) -> tp.Any:
    from ..gateway.pool import alias_specs

    items = [f"{a}={m}" for a, m in models.items()] if isinstance(models, tp.Mapping) else list(models)
    return alias_specs(settings, items)


def serve(models: tp.Mapping[str, str] | tp.Sequence[str] = (), *, listen: str | None = None,
          settings: Settings | None = None, on_ready: tp.Callable[[Gateway], None] | None = None) -> list[str]:
    """Run the gateway in the foreground until SIGTERM, SIGINT or SIGHUP; returns the deployments it stopped.

    ``models``: alias -> model (a registry name, a .gguf path or a URL), or ``"ALIAS=MODEL"`` items; added to
    the settings' ``gateway.models``. Every alias is checked (planned) before the gateway serves:
    :class:`UsageError` for a bad one. ``on_ready(gateway)`` is called once it listens (``gateway.url``)."""
    from ..gateway.server import serve as run

    s = _settings(settings)
    specs = _specs(s, models)
    return asyncio.run(run(s, specs, listen or s.gateway.listen, on_ready=on_ready))


class RunningGateway:
    """A gateway served from a background thread (:func:`open_gateway`); ``close()`` stops it as SIGTERM does."""

    def __init__(self, settings: Settings, specs: tp.Any, listen: str) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.gateway: Gateway | None = None
        self.stopped: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(settings, specs, listen), daemon=True,
                                        name="speedslurm-gateway")
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self, settings: Settings, specs: tp.Any, listen: str) -> None:
        from ..gateway.server import serve as run

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(gw: Gateway) -> None:
                self.gateway = gw
                self._ready.set()

            self.stopped = await run(settings, specs, listen, on_ready=ready, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self._error = exc
        finally:
            self._ready.set()

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    def close(self, timeout: float | None = None) -> list[str]:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        return self.stopped

    def __enter__(self) -> RunningGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gateway(models: tp.Mapping[str, str] | tp.Sequence[str] = (), *, listen: str | None = None,
                 settings: Settings | None = None) -> RunningGateway:
    """:func:`serve` in a background thread; returns once it listens. A context manager that stops it."""
    s = _settings(settings)
    return RunningGateway(s, _specs(s, models), listen or s.gateway.listen)


# ----------------------------------------------------------------------------------------------------------
# Keys


def _folder(settings: Settings | None) -> Folder:
    from ..gateway.state import Folder

    return Folder(_settings(settings).gateway.root)


def _keys(settings: Settings | None) -> KeyStore:
    from ..gateway.keys import KeyStore

    return KeyStore(_folder(settings).open().root)


def add_key(name: str, settings: Settings | None = None) -> str:
    """A new key for ``name`` (shown once: only its hash is kept); :class:`UsageError` if ``name`` has one."""
    return _keys(settings).add(name)


def revoke_key(name: str, settings: Settings | None = None) -> None:
    """Remove ``name``'s key; a running gateway refuses it from its next request."""
    _keys(settings).revoke(name)


def list_keys(settings: Settings | None = None) -> list[dict[str, tp.Any]]:
    """The key names and when each was made (never the keys)."""
    return _keys(settings).names()


# ----------------------------------------------------------------------------------------------------------
# A running gateway


class _NoGateway(UsageError):
    """No gateway runs from the folder: none is recorded."""


class _GatewayGone(SpeedslurmError):
    """The recorded gateway refuses connections: it is not running any more (killed, crashed)."""


def _ask(settings: Settings | None, path: str, timeout: float = 10) -> dict[str, tp.Any]:
    from ..gateway.state import ADMIN_KEY

    folder = _folder(settings)
    running = folder.running()
    url = str(running.get("url") or "")
    if not url or not (folder.root / ADMIN_KEY).exists():
        raise _NoGateway(f"no gateway runs from {folder.root}",
                         fix="start one with `speedslurm gateway --model ALIAS=MODEL`")
    key = folder.admin_key()
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - the gateway's own URL
            return tp.cast("dict[str, tp.Any]", json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        raise SpeedslurmError(f"the gateway at {url} answered {exc.code} to {path}",
                              fix="check that the gateway folder belongs to the gateway that runs") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        kind = _GatewayGone if isinstance(reason, ConnectionRefusedError) else SpeedslurmError
        raise kind(f"the gateway recorded at {url} (pid {running.get('pid')}) does not answer: {reason}",
                   fix="start it again (`speedslurm gateway ...`); its deployments are re-attached") from None


def status(settings: Settings | None = None) -> dict[str, tp.Any]:
    """What ``gateway status --json`` prints: each alias's state, queue and deployments."""
    return _ask(settings, "/gateway/status")


def usage(settings: Settings | None = None) -> dict[str, tp.Any]:
    """Per key and alias: requests, prompt and completion tokens, errors (and node-hours per alias). From the
    running gateway, else (none runs, or the one recorded is gone) from what the last one saved (``"saved"``).
    A gateway that runs but does not answer as it should raises: its saved counts would be out of date."""
    try:
        return _ask(settings, "/gateway/usage")
    except (_NoGateway, _GatewayGone):
        from ..gateway.metrics import Usage

        saved = Usage.load(_folder(settings).usage())
        return {"keys": saved.per_key(), "aliases": saved.per_alias(), "by": saved.to_json()["by"],
                "unauthorized": saved.unauthorized, "saved": True}
