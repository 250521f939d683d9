"""Proxy applications that hand their connections to the splicing engine."""
