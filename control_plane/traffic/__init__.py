"""Traffic: time to first token of real requests, from Envoy's access-log stream.

entries.py turns an access-log entry into an observation; window.py keeps a sliding window
per endpoint (pure); judge.py turns a window into a verdict the prober acts on; service.py is
the gRPC access-log service the control plane serves to its Envoys.
"""
