"""Site providers: the code that talks to vSphere, Azure and the local lab site."""
