"""The nfsplice lab: three network namespaces joined by veth pairs (see topology)."""
