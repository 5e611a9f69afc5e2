"""Config stores: etcd (production) and in-memory (unit tests)."""
