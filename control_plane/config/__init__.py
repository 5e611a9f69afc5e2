"""Config: the etcd schema as validated values, the last good value per key, the file format."""
