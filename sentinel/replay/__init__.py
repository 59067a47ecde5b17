"""Golden replay: load an endpoint with golden samples, measure latency honestly, compare outputs.

Modules, in data-flow order: `wire` (encode requests, decode answers), `http` (a small
keep-alive client), `histogram` (log-linear latency recording), `runner` (open/closed-loop
load), `compare` (against the reference under a tolerance), `report` (objectives, JSON,
text), `push` (Prometheus metrics), `canary` (the daemon's periodic replay), `session`
(what the CLI calls). None of them imports torch.
"""
