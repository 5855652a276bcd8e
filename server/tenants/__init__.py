"""Tenants: customers sharing one server, each with its own keys, experts, files, jobs, limits and usage."""
