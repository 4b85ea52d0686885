"""llama.cpp discovery on this machine's real binaries (the search order and errors:
tests/unit/test_binaries.py).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from speedslurm.node import binaries as B


@pytest.mark.llama
def test_real_binaries(llama_bins: B.LlamaBinaries) -> None:
    assert llama_bins.llama_server.name == "llama-server"
    assert llama_bins.rpc_server.name in B.RPC_SERVER_NAMES
    assert re.match(r"\S+", llama_bins.version)
    # Started from a plain subprocess: no extra environment needed once the package made its links.
    assert B.env_for(llama_bins) == {}
    res = subprocess.run([str(llama_bins.llama_server), "--version"], capture_output=True, text=True, timeout=60)
    assert B.parse_version(res.stdout + res.stderr) == llama_bins.version
    assert llama_bins.build_id == llama_bins.rpc_version()
    llama_bins.check_same_build()
    proto = llama_bins.rpc_protocol()
    assert proto is not None and re.fullmatch(r"\d+\.\d+\.\d+", proto)
