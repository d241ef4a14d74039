"""Backends behind the one Engine interface."""
