"""What PostgreSQL and MySQL sessions share: context, cancel registry, session info."""
