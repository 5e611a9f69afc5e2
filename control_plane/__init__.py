"""hotpath: session-affinity gateway for LLM model servers (xDS control plane)."""
