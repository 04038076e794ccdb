"""Site providers: what the workflows call to act on a site (DESIGN §4)."""
