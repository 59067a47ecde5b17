"""The sidecar's data plane: reverse proxy, admin listener, sampling, analysis worker, ingest.

    sidecar.Sidecar / sidecar.run(config)   the daemon (`sentinel run`)
    server.ClientConnection                 client side of the proxy (httptools on uvloop), its state machine
    context.ProxyContext, context.Limits    shared state, timeouts and limits, the one deadline sweep
    upstream.UpstreamPool                   pooled keep-alive connections to the model server
    exchange.Exchange                       one request/response, streamed both ways
    metrics.ProxyMetrics                    the daemon's own Prometheus registry
    sampling.Sampler                        rate, per-second cap and byte cap per model
    analysis.AnalysisManager                the spawned worker process (worker.main)
    ingest.JoinTable                        KServe logger CloudEvents joined by Ce-Id
    admin.AdminConnection                   /metrics /healthz /readyz /status /ingest
    nginx.Nginx, nginx.AccessLog            proxy.engine nginx: nginx as the data plane, counted from its access log

Nothing on the hot path imports torch, onnxruntime, scipy or the analysis code; a test
checks it in a subprocess.
"""
