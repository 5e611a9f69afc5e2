"""hotpath: session-affinity gateway for LLM model servers (xDS control plane)."""

import os

# Children (etcd, Envoy, simulators) are exec'd right after fork: gRPC's fork handlers are
# not needed, and with them on gRPC logs a warning on every spawn from `hotpath up`.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
