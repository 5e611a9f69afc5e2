"""Pure builders: validated config in, xds-protos messages out."""
