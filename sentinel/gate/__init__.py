"""Rollout gate: is the canary model version as good as the baseline? (`sentinel gate`).

    queries.py   PromQL for every criterion, per version (also used by the templates)
    prom.py      a small Prometheus HTTP API client; its errors become InfrastructureError
    stats.py     the statistical tests (pure)
    criteria.py  one judgement per criterion from the fetched counts (pure)
    judge.py     fetch, judge, overall verdict and exit code
    report.py    text and JSON reports
    templates.py Argo Rollouts and Flagger templates generated from the SLO file
"""
