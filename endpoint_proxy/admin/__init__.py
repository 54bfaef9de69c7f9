"""The admin plane: HTTP server, console, status page, metric collectors."""
