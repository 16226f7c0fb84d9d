"""What an operator sees of a running server: logs (`logs`), Prometheus metrics (`metrics`),
and optional OpenTelemetry traces (`traces`).

A leaf of the house like `core`: any layer may use it, it uses nothing of the package but
`settings`. docs/operations.md says what each log line and metric means;
docs/decisions/0043-logs-and-metrics-on-the-hot-path.md why they are shaped as they are.
"""
