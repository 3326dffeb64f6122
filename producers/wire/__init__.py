"""The envelope both sides read and write: wire format v1 and lifecycle events."""
