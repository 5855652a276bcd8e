"""Input checks shared by every layer: encodable text (unicode.py) and the schemas' base class (schema.py)."""
