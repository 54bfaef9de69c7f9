"""Failover drills, pure logic: fault injection, switchover planning, statement latency."""
