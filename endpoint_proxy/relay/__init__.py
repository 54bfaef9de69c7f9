"""Byte transports and the relay hub: how session bytes move between sockets."""
