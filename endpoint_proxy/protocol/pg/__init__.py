"""PostgreSQL wire protocol (v3), sans-IO."""
