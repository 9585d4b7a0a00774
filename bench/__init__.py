"""The benchmark harness: ``python -m bench`` (``make bench``).

It measures, in one run and under one load generator, what a stateless step costs through
the service and through its comparison points: the floor (HTTP alone), the naive peer (the
endpoint a user would write instead), the engine in a plain Python loop, and raw torch; and
what the seed step costs on sessions committed to SQLite and to Redis, on 1 session and on
64. It prints ratios, p50 and p99 latency, and writes ``docs/benchmarks.md``.

Modules: ``config`` (settings from the environment), ``workloads`` (request bodies, reference
answers, raw torch steps), ``servers`` (targets run as uvicorn subprocesses on 127.0.0.1),
``driver`` (the async httpx load generator), ``inprocess`` (loops with no HTTP),
``breakdown`` (where one request's time goes), ``stores`` (SQLite and redis-server for the
stateful rows), ``stateful`` (the session rows: set-up, checks, load, audit), ``report`` and
``stateful_report`` (tables), ``document`` (the markdown), and the two comparison apps
``floor`` and ``naive_peer``.
"""
