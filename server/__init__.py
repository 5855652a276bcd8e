"""loraplex server: HTTP edge, engine thread, model runner."""
