"""Deployments, slots, leases and the swap state machine."""
