"""Example third-party llmos driver: BERT encoders in plain NumPy."""
