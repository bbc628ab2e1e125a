"""Operations: systemd notify, Prometheus metrics, JSON logs (issue 14)."""
