"""Runtime: processes, supervision, signals, metrics, Envoy admin, bootstrap, assets."""
