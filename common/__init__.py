"""Utilities every layer may use (models/ included): atomic files, downloads, redaction, retries, and
the one seam onto the libraries' internals (compat)."""
