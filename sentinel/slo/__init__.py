"""SLO specs, burn-rate windows, Prometheus rules and their tests, Grafana dashboards."""
