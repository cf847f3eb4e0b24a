"""Optional integrations (Prometheus, Sentry, health checks), each imported only when its package is installed."""
