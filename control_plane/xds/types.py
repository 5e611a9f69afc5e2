"""Type URLs of the resources hotpath serves over ADS."""

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# ECDS: the Lua filter's config, referenced by name from the listener's HttpFilter
# (config_discovery), so a new filter version never replaces the listener.
EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"

# Order of a make-before-break push: clusters before their endpoints; listeners before what
# they reference by name (Envoy asks for ECDS and RDS only once it has the listener). The
# filter goes before the routes: new filter code must handle the routes it finds (old or
# new), while an old filter may not understand new route metadata.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, EXTENSION_CONFIG, ROUTE)

SHORT_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS",
               EXTENSION_CONFIG: "ECDS"}


def ads_api_type(delta: bool) -> str:
    """The bootstrap's ``ads_config.api_type``: the control plane serves both on one port,
    state of the world (GRPC) and incremental (DELTA_GRPC); each Envoy picks one."""
    return "DELTA_GRPC" if delta else "GRPC"
