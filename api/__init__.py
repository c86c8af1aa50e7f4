"""Letterpress HTTP front door (FastAPI). Thin: no GPU, no model imports."""
