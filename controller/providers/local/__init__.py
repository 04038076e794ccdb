"""The `local` provider: directory-backed on-premises and cloud sites for the lab (see site.py)."""
