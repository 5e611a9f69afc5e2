"""Type URLs of the resources hotpath serves over ADS."""

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

# Order of a make-before-break push: clusters before their endpoints, listeners before routes.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

SHORT_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS"}


def ads_api_type(delta: bool) -> str:
    """The bootstrap's ``ads_config.api_type``: the control plane serves both on one port,
    state of the world (GRPC) and incremental (DELTA_GRPC); each Envoy picks one."""
    return "DELTA_GRPC" if delta else "GRPC"
