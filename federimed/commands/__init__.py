"""CLI command groups; each module registers its commands on the root typer app.

Heavy libraries (torch, transformers, flwr) are imported inside the command bodies so that
`federimed --help` stays fast.
"""
