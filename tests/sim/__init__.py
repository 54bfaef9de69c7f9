"""The session simulator: the real session shells over an in-memory network that cuts, delays and breaks streams."""
