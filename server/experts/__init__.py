"""The experts' lifecycle below the HTTP edge (service.py), and what a registration says (spec.py)."""
