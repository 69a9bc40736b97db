"""Security of the federation: TLS certificates, SuperNode keys and screening of hospital replies."""
