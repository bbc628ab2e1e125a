"""Operations: systemd notify, Prometheus metrics, JSON logs."""
