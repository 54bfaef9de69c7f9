"""MySQL/MariaDB sessions: client login, server connections, the session shell."""
