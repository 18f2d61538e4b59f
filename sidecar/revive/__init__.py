"""Revive: a credential-broker sidecar that turns dead OAuth grants into resumable recovery cases."""
