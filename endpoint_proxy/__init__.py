"""endpoint_proxy: Aurora-style connection endpoints for self-managed PostgreSQL and MySQL clusters."""

__version__ = "0.1.0"
