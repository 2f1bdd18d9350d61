"""Schedules and sensors that keep predictions fresh without a human (see docs/automation.md)."""
