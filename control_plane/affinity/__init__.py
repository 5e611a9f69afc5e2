"""Session affinity across ring changes: Envoy's ring mirrored, and pins for active sessions."""
