"""Development helpers that the wheel does not carry: the tests, ``make demo`` and ``bench/`` import them from a
checkout of the repository (pytest puts the repository root on ``sys.path``; see pyproject.toml).

* ``devtools.stubserver`` — a fast OpenAI-compatible stub server that behaves like llama-server;
* ``devtools.testmodels`` — a tiny random-weight llama GGUF writer and the gemma-3-270m demo model.
"""
