"""Type URLs of the resources hotpath serves over ADS."""

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

# Order of a make-before-break push: clusters before their endpoints, listeners before routes.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

SHORT_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS"}

LISTENER_NAME = "hotpath"
ROUTE_CONFIG_NAME = "hotpath"
