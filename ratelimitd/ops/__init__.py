"""Operations: systemd notify (sdnotify.py), JSON logs (logs.py), Prometheus metrics (metrics.py
records them, metric_catalogue.py lists them, metric_samples.py holds one process's values,
metric_sharing.py sums the workers' and renders them)."""
