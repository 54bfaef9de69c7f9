"""Routing decisions: which instance an endpoint's connection goes to; pure and synchronous."""
