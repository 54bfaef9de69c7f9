"""Sans-IO wire protocol codecs and state machines: bytes in, events out; no I/O, no clock."""
