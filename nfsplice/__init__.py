"""nfsplice: TCP splicing for proxy servers on Linux (NFQUEUE engine, TCP Tap, netns lab)."""
__version__ = "0.1.0"
